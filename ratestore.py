"""A SQLite storage for flask-limiter: request counts shared by every worker.

flask-limiter's `memory://` storage counts in each process, so gunicorn's
two workers would each allow a student the full limit. The `limits` library
behind it ships no storage for one machine without a server (a file or
SQLite backend was asked for and never merged: alisaifee/limits#54, #227),
and Redis or memcached would be one more daemon for a teacher to run. A
SQLite file in WAL mode is shared by every process and thread on the machine,
and each hit is one UPSERT statement, which SQLite applies atomically: the
counts are exact. Registering the `sqlite` scheme here makes
`storage_uri="sqlite:////abs/path/ratelimits.sqlite"` work like any other.
"""

import itertools
import sqlite3
import threading
import time

from limits.storage import Storage

import db

# Every this many hits a process deletes expired counters.
PRUNE_EVERY = 1000

CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS counters ("
    " key TEXT PRIMARY KEY, count INTEGER NOT NULL, expires REAL NOT NULL)"
    " WITHOUT ROWID"
)
# An expired counter starts again from `amount`, like limits' own storages.
INCREMENT = (
    "INSERT INTO counters (key, count, expires) VALUES (:key, :amount, :expires)"
    " ON CONFLICT (key) DO UPDATE SET"
    " count = CASE WHEN expires <= :now THEN :amount ELSE count + :amount END,"
    " expires = CASE WHEN expires <= :now THEN :expires ELSE expires END"
    " RETURNING count, expires"
)
# How long, and how many, counters a thread just incremented answer `get`
# from memory.
JUST_COUNTED_SECONDS = 1.0
JUST_COUNTED_MAX = 8


class SqliteStorage(Storage):
    """Fixed-window counters in a SQLite file; use with strategy "fixed-window"."""

    STORAGE_SCHEME = ["sqlite"]

    def __init__(self, uri, wrap_exceptions=False, **options):
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.path = uri.removeprefix("sqlite://")
        self._local = threading.local()
        self._hits = itertools.count(1)

    @property
    def base_exceptions(self):
        return sqlite3.Error

    def incr(self, key, expiry, amount=1):
        """Add `amount` to a counter and return its new value."""
        now = time.time()
        values = {"key": key, "amount": amount, "expires": now + expiry, "now": now}
        with self._connection() as connection:
            count, expires = connection.execute(INCREMENT, values).fetchone()
            if next(self._hits) % PRUNE_EVERY == 0:
                connection.execute("DELETE FROM counters WHERE expires <= ?", (now,))

        just_counted = self._get_just_counted()
        if len(just_counted) >= JUST_COUNTED_MAX:
            just_counted.clear()
        just_counted[key] = (count, expires, time.monotonic())

        return count

    def get(self, key):
        """Return a counter's value, 0 when missing or expired."""
        row = self._select(key)
        return row[0] if row else 0

    def get_expiry(self, key):
        """Return when a counter expires, as a Unix time."""
        row = self._select(key)
        return row[1] if row else time.time()

    def check(self):
        """Tell whether the file can be read."""
        try:
            with self._connection() as connection:
                connection.execute("SELECT 1").fetchone()
            return True
        except sqlite3.Error:
            return False

    def reset(self):
        """Delete every counter; return how many there were."""
        self._get_just_counted().clear()
        with self._connection() as connection:
            return connection.execute("DELETE FROM counters").rowcount

    def clear(self, key):
        """Delete one counter."""
        self._get_just_counted().pop(key, None)
        with self._connection() as connection:
            connection.execute("DELETE FROM counters WHERE key = ?", (key,))

    def _select(self, key):
        # flask-limiter reads back the counter it has just incremented, to
        # fill the X-RateLimit headers: answer that from memory, saving two
        # queries per request. Only the headers can be a moment behind.
        remembered = self._get_just_counted().get(key)
        if remembered is not None:
            count, expires, when = remembered
            if time.monotonic() - when < JUST_COUNTED_SECONDS and expires > time.time():
                return count, expires

        with self._connection() as connection:
            return connection.execute(
                "SELECT count, expires FROM counters WHERE key = ? AND expires > ?",
                (key, time.time()),
            ).fetchone()

    def _get_just_counted(self):
        just_counted = getattr(self._local, "just_counted", None)
        if just_counted is None:
            just_counted = self._local.just_counted = {}

        return just_counted

    def _connection(self):
        # One connection per process (see db.shared_connection), opened anew
        # in each worker gunicorn forks.
        return db.shared_connection(self.path, prepare=_prepare)


def _prepare(connection):
    # Counters are worth little after a power cut; skip the fsyncs.
    connection.execute("PRAGMA synchronous=OFF")
    connection.execute(CREATE_TABLE)
