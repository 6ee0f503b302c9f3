"""usage.sqlite: db.py as plain Python, then many gunicorn workers at once."""

import multiprocessing
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import requests
from conftest import wait_for_usage_rows

import accounting
import db
from keys import fingerprint

NODE_SCHEMA = (
    "CREATE TABLE usage_log (id INTEGER PRIMARY KEY AUTOINCREMENT, api_key TEXT,"
    " date TEXT, model TEXT, endpoint TEXT, prompt_tokens INTEGER,"
    " completion_tokens INTEGER, total_tokens INTEGER)"
)
NODE_COLUMNS = (
    "id, api_key, date, model, endpoint, prompt_tokens, completion_tokens, total_tokens"
)
NODE_ROWS = [
    ("sk-alice-1", "2024-03-01T10:00:00.000Z", "gpt-4", "/v1/chat/completions", 10, 20, 30),
    ("sk-bob-2", "2024-03-02T11:30:00.000Z", "gpt-3.5-turbo", "/v1/completions", 1, 2, 3),
    ("sk-alice-1", "2024-03-03T12:00:00.000Z", None, "/v1/images", None, None, None),
    (None, "2024-03-04T00:00:00.000Z", "gpt-4", "/v1/chat/completions", 0, 0, 0),
]  # fmt: skip
PROCESSES = 4
ROWS_PER_PROCESS = 200
BURST = 60
FRESH_STORE_ROUNDS = 60


def make_node_file(path):
    connection = sqlite3.connect(path)
    connection.execute(NODE_SCHEMA)
    connection.executemany(
        "INSERT INTO usage_log (api_key, date, model, endpoint, prompt_tokens,"
        " completion_tokens, total_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)",
        NODE_ROWS,
    )
    connection.commit()
    connection.close()


def read_all(path, query):
    connection = sqlite3.connect(path)
    try:
        return connection.execute(query).fetchall()
    finally:
        connection.close()


def make_row(api_key, number):
    return db.UsageRow(
        api_key=api_key,
        date="2025-01-01T00:00:00.000Z",
        model="gpt-4o-mini",
        endpoint="/v1/chat/completions",
        prompt_tokens=number,
        completion_tokens=1,
        total_tokens=number + 1,
        email="w@school.test",
        name="Writer",
        method="POST",
        status=200,
        duration_ms=1,
        streamed=False,
        partial=False,
    )


def test_migrating_a_node_file_keeps_every_row_and_its_figures(tmp_path):
    path = str(tmp_path / "usage.sqlite")
    make_node_file(path)

    db.init_db(path)

    rows = read_all(path, f"SELECT {NODE_COLUMNS} FROM usage_log ORDER BY id")
    expected = [
        (number, fingerprint(key) if key else None, *rest)
        for number, (key, *rest) in enumerate(NODE_ROWS, start=1)
    ]
    assert rows == expected


def test_migrated_node_rows_get_defaults_for_the_new_columns(tmp_path):
    path = str(tmp_path / "usage.sqlite")
    make_node_file(path)

    db.init_db(path)

    flags = read_all(path, "SELECT streamed, partial, email, status FROM usage_log")
    assert flags == [(0, 0, None, None)] * len(NODE_ROWS)


def test_migrating_twice_changes_nothing(tmp_path):
    path = str(tmp_path / "usage.sqlite")
    make_node_file(path)
    db.init_db(path)
    before = read_all(path, "SELECT * FROM usage_log ORDER BY id")

    db.init_db(path)

    assert read_all(path, "SELECT * FROM usage_log ORDER BY id") == before


def test_a_fresh_file_gets_the_whole_schema(tmp_path):
    path = str(tmp_path / "usage.sqlite")

    db.init_db(path)

    columns = [row[1] for row in read_all(path, "PRAGMA table_info(usage_log)")]
    assert columns[:8] == NODE_COLUMNS.split(", ")
    assert set(db.ROW_COLUMNS) <= set(columns)
    assert read_all(path, "PRAGMA user_version") == [(len(db.MIGRATIONS),)]
    assert read_all(path, "PRAGMA journal_mode") == [("wal",)]


def test_a_row_without_usage_stores_unknown_rather_than_zero(tmp_path):
    path = str(tmp_path / "usage.sqlite")
    db.init_db(path)
    row = make_row("sha256:x", 0)
    row.prompt_tokens = row.completion_tokens = row.total_tokens = None

    assert db.record_usage(path, row)

    tokens = read_all(path, "SELECT prompt_tokens, completion_tokens FROM usage_log")
    assert tokens == [(None, None)]


def queue_rows_and_exit(path, count):
    """Child process: queue rows for the writer thread, then exit at once."""
    db.init_db(path)
    for number in range(count):
        accounting.writer.put(path, make_row("sha256:queued", number), "a line")


def test_rows_still_queued_when_a_process_exits_are_written(tmp_path):
    # Queued rows live in memory for a moment; a worker that stops (gunicorn's
    # graceful stop, a restart) must write them before it goes.
    path = str(tmp_path / "usage.sqlite")
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=queue_rows_and_exit, args=(path, 5000))
    child.start()
    child.join(60)

    assert child.exitcode == 0
    rows = read_all(path, "SELECT COUNT(*), SUM(total_tokens) FROM usage_log")
    assert rows == [(5000, sum(number + 1 for number in range(5000)))]
    totals = read_all(path, "SELECT tokens FROM token_totals WHERE day = 'all'")
    assert totals == [(rows[0][1],)]


def test_rows_of_several_files_are_queued_to_the_right_file(tmp_path):
    paths = [str(tmp_path / f"usage-{n}.sqlite") for n in range(2)]
    for path in paths:
        db.init_db(path)
    for number in range(10):
        accounting.writer.put(paths[number % 2], make_row("sha256:two", number), "-")
    accounting.writer.flush()

    for n, path in enumerate(paths):
        written = read_all(path, "SELECT prompt_tokens FROM usage_log ORDER BY id")
        assert written == [(number,) for number in range(n, 10, 2)]


def write_rows(path, writer, start):
    """Child process: open the store as a worker would and write its rows."""
    start.wait()
    db.init_db(path)
    results = [
        db.record_usage(path, make_row(f"sha256:writer{writer}", number))
        for number in range(ROWS_PER_PROCESS)
    ]
    return results.count(True)


def test_several_processes_writing_at_once_lose_no_row(tmp_path):
    path = str(tmp_path / "usage.sqlite")
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(PROCESSES) as pool:
        start = manager.Event()
        pending = [
            pool.apply_async(write_rows, (path, writer, start))
            for writer in range(PROCESSES)
        ]
        start.set()
        written = [result.get(timeout=120) for result in pending]

    assert written == [ROWS_PER_PROCESS] * PROCESSES
    counts = read_all(
        path, "SELECT api_key, COUNT(DISTINCT prompt_tokens) FROM usage_log GROUP BY 1"
    )
    assert counts == [(f"sha256:writer{n}", ROWS_PER_PROCESS) for n in range(PROCESSES)]


def open_fresh_store(path, start):
    """Child process: open a new store as usage.py or a starting proxy would."""
    start.wait()
    db.init_db(path)
    return db.record_usage(path, make_row("sha256:opener", 1))


def test_several_processes_opening_a_fresh_store_at_once_all_succeed(tmp_path):
    # The race is narrow: many fresh files make it show.
    context = multiprocessing.get_context("spawn")
    results = []
    with context.Manager() as manager, context.Pool(PROCESSES) as pool:
        for round_number in range(FRESH_STORE_ROUNDS):
            path = str(tmp_path / f"usage-{round_number}.sqlite")
            start = manager.Event()
            pending = [
                pool.apply_async(open_fresh_store, (path, start))
                for _ in range(PROCESSES)
            ]
            start.set()
            results += [result.get(timeout=60) for result in pending]

    assert results == [True] * PROCESSES * FRESH_STORE_ROUNDS


def test_a_burst_through_gunicorn_leaves_exactly_one_row_per_request(
    proxy, upstream, student
):
    def ask(number):
        return requests.post(
            f"{proxy.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {student.key}"},
            json={"model": f"model-{number}", "messages": []},
            timeout=60,
        ).status_code

    with ThreadPoolExecutor(BURST) as pool:
        statuses = list(pool.map(ask, range(BURST)))

    assert statuses == [200] * BURST
    rows = wait_for_usage_rows(proxy.usage_path, student.fingerprint, BURST)
    assert sorted(row["model"] for row in rows) == sorted(
        f"model-{number}" for number in range(BURST)
    )
    assert all(row["total_tokens"] == 14 for row in rows)
    assert "usage row lost" not in proxy.log()
