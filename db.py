"""The usage store: usage.sqlite, one row per forwarded request.

The table keeps the Node proxy's columns so its files open unchanged;
migrations add ours. Where the Node proxy stored the student's key in
`api_key`, we store the key's fingerprint (see keys.fingerprint), and a
migration rewrites old rows the same way, so the file never holds a copy
of a key while old rows stay attributed to their student.

Token columns hold NULL when the upstream reported no usage: unknown is
not zero.

Usage is queued when a response ends and written by one thread per
worker (accounting.py), many rows per transaction. The budget read of
every request shares one connection per worker (shared_connection);
reports keep one per thread. WAL mode and a long busy timeout let several
gunicorn workers write at once.
"""

import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from keys import fingerprint

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_SECONDS = 30
WRITE_ATTEMPTS = 5


def _create_node_table(connection):
    # The Node proxy's table, for files that do not have it yet.
    connection.execute(
        "CREATE TABLE IF NOT EXISTS usage_log ("
        " id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " api_key TEXT, date TEXT, model TEXT, endpoint TEXT,"
        " prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER)"
    )


def _add_request_columns(connection):
    columns = {
        "email": "TEXT",
        "name": "TEXT",
        "method": "TEXT",
        "status": "INTEGER",
        "duration_ms": "INTEGER",
        "streamed": "INTEGER NOT NULL DEFAULT 0",
        "partial": "INTEGER NOT NULL DEFAULT 0",
        "audio_seconds": "REAL",
    }
    existing = {row[1] for row in connection.execute("PRAGMA table_info(usage_log)")}
    for name, kind in columns.items():
        if name not in existing:
            connection.execute(f"ALTER TABLE usage_log ADD COLUMN {name} {kind}")


def _hash_node_keys(connection):
    connection.create_function("fingerprint", 1, fingerprint, deterministic=True)
    connection.execute(
        "UPDATE usage_log SET api_key = fingerprint(api_key)"
        " WHERE api_key IS NOT NULL AND api_key NOT LIKE 'sha256:%'"
    )


def _normalize_node_dates(connection):
    # SQLite's CURRENT_TIMESTAMP writes "YYYY-MM-DD HH:MM:SS" (UTC); reports
    # compare dates as ISO 8601 text ending in Z, so old rows are rewritten.
    connection.execute(
        "UPDATE usage_log SET date = replace(date, ' ', 'T') || '.000Z' WHERE date GLOB"
        " '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9]'"
    )


def _index_student_and_date(connection):
    connection.execute(
        "CREATE INDEX IF NOT EXISTS usage_by_key_date ON usage_log (api_key, date)"
    )
    connection.execute("CREATE INDEX IF NOT EXISTS usage_by_date ON usage_log (date)")


def _add_token_totals(connection):
    connection.execute(
        "CREATE TABLE IF NOT EXISTS token_totals ("
        " api_key TEXT NOT NULL, day TEXT NOT NULL, tokens INTEGER NOT NULL,"
        " PRIMARY KEY (api_key, day)) WITHOUT ROWID"
    )
    connection.execute("CREATE TABLE IF NOT EXISTS token_totals_zone (name TEXT)")
    _rebuild_token_totals(connection, "UTC")


# Applied in order; PRAGMA user_version counts the steps a file has had.
def _add_estimated_column(connection):
    connection.execute(
        "ALTER TABLE usage_log ADD COLUMN tokens_estimated INTEGER NOT NULL DEFAULT 0"
    )


MIGRATIONS = (
    _create_node_table,
    _add_request_columns,
    _hash_node_keys,
    _normalize_node_dates,
    _index_student_and_date,
    _add_token_totals,
    _add_estimated_column,
)

TOTAL_DAY = "all"
ADD_TOKENS = (
    "INSERT INTO token_totals (api_key, day, tokens) VALUES (?, ?, ?)"
    " ON CONFLICT (api_key, day) DO UPDATE SET tokens = tokens + excluded.tokens"
)


@dataclass
class UsageRow:
    """One forwarded request, as stored."""

    api_key: str  # the key's fingerprint, never the key
    date: str  # ISO 8601 UTC, as the Node proxy wrote it
    model: str | None
    endpoint: str
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    email: str
    name: str
    method: str
    status: int
    duration_ms: int
    streamed: bool
    partial: bool
    audio_seconds: float | None = None
    # The proxy's estimate, not the upstream's count (a stream cut short).
    tokens_estimated: bool = False


ROW_COLUMNS = tuple(f.name for f in fields(UsageRow))
INSERT_ROW = (
    f"INSERT INTO usage_log ({', '.join(ROW_COLUMNS)})"
    f" VALUES ({', '.join('?' for _ in ROW_COLUMNS)})"
)

_local = threading.local()
_shared = {}
_shared_lock = threading.Lock()


def connect(path):
    """Open a connection tuned for many writers; autocommit mode."""
    connection = sqlite3.connect(
        path,
        timeout=BUSY_TIMEOUT_SECONDS,
        isolation_level=None,
        check_same_thread=False,
    )
    _use_wal(connection)
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def _use_wal(connection):
    # Switching a new file to WAL needs an exclusive lock, and SQLite answers
    # "locked" at once, without the busy timeout, when another process opens
    # the file at the same moment; by the next try that one has switched it.
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            if attempt == WRITE_ATTEMPTS:
                raise

            time.sleep(0.05 * attempt)


def get_db(path):
    """Return this thread's connection to `path`, opening it on first use."""
    connections = getattr(_local, "connections", None)
    if connections is None:
        connections = _local.connections = {}

    connection = connections.get(path)
    if connection is None:
        connection = connections[path] = connect(path)

    return connection


@contextmanager
def shared_connection(path, prepare=None):
    """Hold this process's one connection to `path` for a short statement.

    For statements that every request runs (the budget read, the rate-limit
    counters): each SQLite connection keeps its own page cache and drops it
    whenever another connection wrote, so one connection per thread would
    re-read the same pages on every request. `prepare(connection)` runs
    once, when the connection is opened.
    """
    entry = _shared.get(path)
    if entry is None or entry[0] != os.getpid():
        with _shared_lock:
            entry = _shared.get(path)
            # A forked worker must not reuse its parent's connection.
            if entry is None or entry[0] != os.getpid():
                connection = connect(path)
                if prepare is not None:
                    prepare(connection)
                entry = _shared[path] = (os.getpid(), connection, threading.Lock())

    _, connection, lock = entry
    with lock:
        yield connection


def init_db(path):
    """Create the schema, or bring an older file (Node's included) up to date."""
    connection = connect(path)
    try:
        connection.execute("BEGIN IMMEDIATE")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        for step in MIGRATIONS[version:]:
            step(connection)
            logger.info("migrated usage store path=%s step=%s", path, step.__name__)

        connection.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        connection.execute("COMMIT")
    finally:
        connection.close()


def record_usage(path, row):
    """Insert one usage row and add it to the running totals; see write_rows."""
    return write_rows(path, [row])


def write_rows(path, rows):
    """Insert usage rows and their running totals in one transaction.

    Retries while another process holds the file. Never raises: rows that
    cannot be written are logged with their facts, so the teacher can still
    account for them.
    """
    error = None
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            _insert_with_totals(get_db(path), rows)
            return True
        except sqlite3.Error as failure:
            error = failure
            if "locked" not in str(error) and "busy" not in str(error):
                break

            time.sleep(0.05 * attempt)

    for row in rows:
        logger.error(
            "usage row lost user=%s endpoint=%s model=%s tokens=%s status=%s error=%s",
            row.email,
            row.endpoint,
            row.model,
            row.total_tokens,
            row.status,
            error,
        )
    return False


def _insert_with_totals(connection, rows):
    connection.execute("BEGIN IMMEDIATE")
    try:
        # Not dataclasses.astuple: it deep-copies every field.
        connection.executemany(
            INSERT_ROW, [[getattr(row, name) for name in ROW_COLUMNS] for row in rows]
        )
        zone = connection.execute("SELECT name FROM token_totals_zone").fetchone()
        zone_name = zone[0] if zone else "UTC"
        additions = []
        for row in rows:
            if row.api_key is not None:
                tokens = row.total_tokens or 0
                day = get_local_day(row.date, zone_name)
                additions += [
                    (row.api_key, day, tokens),
                    (row.api_key, TOTAL_DAY, tokens),
                ]

        connection.executemany(ADD_TOKENS, additions)

        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def get_local_day(date, zone_name):
    """Return the YYYY-MM-DD date, in zone `zone_name`, of an ISO 8601 UTC time."""
    try:
        moment = datetime.fromisoformat(date)
    except (TypeError, ValueError):
        return str(date)[:10]

    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)

    return moment.astimezone(ZoneInfo(zone_name)).date().isoformat()


def read_token_totals(path, api_key, day):
    """Return (tokens on `day`, tokens in total) for one key: two row reads."""
    with shared_connection(path) as connection:
        found = dict(
            connection.execute(
                "SELECT day, tokens FROM token_totals"
                " WHERE api_key = ? AND day IN (?, ?)",
                (api_key, day, TOTAL_DAY),
            )
        )
    return found.get(day, 0), found.get(TOTAL_DAY, 0)


def use_budget_timezone(path, zone_name):
    """Make the daily totals count days in `zone_name`, rebuilding them if needed.

    The rebuild reads every usage row once; it runs only when the zone
    changes, inside one write transaction, so other workers wait for it.
    """
    connection = connect(path)
    try:
        connection.execute("BEGIN IMMEDIATE")
        zone = connection.execute("SELECT name FROM token_totals_zone").fetchone()
        if zone is None or zone[0] != zone_name:
            _rebuild_token_totals(connection, zone_name)
            logger.info("rebuilt daily token totals timezone=%s", zone_name)

        connection.execute("COMMIT")
    finally:
        connection.close()


def _rebuild_token_totals(connection, zone_name):
    connection.create_function(
        "local_day", 1, lambda date: get_local_day(date, zone_name), deterministic=True
    )
    connection.execute("DELETE FROM token_totals")
    connection.execute(
        "INSERT INTO token_totals (api_key, day, tokens)"
        " SELECT api_key, local_day(date), SUM(COALESCE(total_tokens, 0))"
        " FROM usage_log WHERE api_key IS NOT NULL GROUP BY 1, 2"
        " UNION ALL SELECT api_key, ?, SUM(COALESCE(total_tokens, 0))"
        " FROM usage_log WHERE api_key IS NOT NULL GROUP BY 1",
        (TOTAL_DAY,),
    )
    connection.execute("DELETE FROM token_totals_zone")
    connection.execute("INSERT INTO token_totals_zone (name) VALUES (?)", (zone_name,))
