"""create.py and usage.py, run as a teacher runs them: as subprocesses."""

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple

import pytest
import requests
from conftest import PROJECT_DIR, add_student, stop_process, wait_for_usage_rows

import db
from keys import fingerprint

NODE_SCHEMA = (
    "CREATE TABLE usage_log (id INTEGER PRIMARY KEY AUTOINCREMENT, api_key TEXT,"
    " date TEXT, model TEXT, endpoint TEXT, prompt_tokens INTEGER,"
    " completion_tokens INTEGER, total_tokens INTEGER)"
)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A config.json whose DATA_DIR is tmp_path, named by PROXY_CONFIG."""
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"DATA_DIR": str(tmp_path)}))
    monkeypatch.setenv("PROXY_CONFIG", str(config_path))
    return tmp_path


def run_script(script, *args):
    """Run a script of the project as the teacher would; return the result."""
    return subprocess.run(
        [sys.executable, "-W", "error", script, *args],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )


def read_entries(data_dir):
    return json.loads((data_dir / "keys.json").read_text())


def make_node_store(path, rows):
    """Write a usage.sqlite as the Node proxy did: plaintext keys, ISO dates."""
    connection = sqlite3.connect(path)
    connection.execute(NODE_SCHEMA.replace("TABLE", "TABLE IF NOT EXISTS", 1))
    connection.executemany(
        "INSERT INTO usage_log (api_key, date, model, endpoint, prompt_tokens,"
        " completion_tokens, total_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    connection.commit()
    connection.close()


def write_keys(data_dir, entries):
    (data_dir / "keys.json").write_text(json.dumps(entries))


# create.py


def test_create_adds_an_entry_with_a_long_random_key_and_prints_it(data_dir):
    result = run_script("create.py", "Ada Lovelace", "ada@school.test")

    assert result.returncode == 0, result.stderr
    [entry] = read_entries(data_dir)
    assert (entry["name"], entry["email"]) == ("Ada Lovelace", "ada@school.test")
    assert len(entry["key"]) >= 40
    assert entry["key"] in result.stdout
    assert json.loads(result.stdout) == entry
    assert result.stderr == ""


def test_create_makes_a_different_key_each_time(data_dir):
    run_script("create.py", "A", "a@school.test")
    run_script("create.py", "B", "b@school.test")

    first, second = read_entries(data_dir)
    assert first["key"] != second["key"]


def test_keys_file_stays_readable_by_its_owner_only(data_dir):
    run_script("create.py", "A", "a@school.test")
    run_script("create.py", "B", "b@school.test")

    mode = stat.S_IMODE(os.stat(data_dir / "keys.json").st_mode)
    assert mode == 0o600


@pytest.mark.parametrize("args", [(), ("Only A Name",)])
def test_create_without_arguments_prints_usage_and_fails(data_dir, args):
    result = run_script("create.py", *args)

    assert result.returncode != 0
    assert "Usage:" in result.stderr
    assert not (data_dir / "keys.json").exists() or read_entries(data_dir) == []


@pytest.mark.parametrize("email", ["not-an-email", "a@b", "two words@x.org", "@x.org"])
def test_create_with_a_malformed_email_fails_and_adds_nothing(data_dir, email):
    result = run_script("create.py", "Someone", email)

    assert result.returncode == 1
    assert "not an e-mail address" in result.stderr
    assert not (data_dir / "keys.json").exists() or read_entries(data_dir) == []


def test_create_with_an_email_already_present_fails_clearly(data_dir):
    run_script("create.py", "Ada", "ada@school.test")

    result = run_script("create.py", "Ada Again", "ADA@school.test")

    assert result.returncode == 1
    assert "already has a key" in result.stderr
    assert len(read_entries(data_dir)) == 1


def test_create_from_csv_adds_new_people_and_reports_added_and_skipped(data_dir):
    run_script("create.py", "Ada", "ada@school.test")
    roster = data_dir / "roster.csv"
    roster.write_text(
        "name,email\nAda,ada@school.test\nBob,bob@school.test\nCy,cy@school.test\n"
    )

    result = run_script("create.py", "--csv", str(roster))

    assert result.returncode == 0, result.stderr
    assert "added 2, skipped 1" in result.stdout + result.stderr
    emails = [entry["email"] for entry in read_entries(data_dir)]
    assert emails == ["ada@school.test", "bob@school.test", "cy@school.test"]
    for entry in read_entries(data_dir)[1:]:
        assert entry["key"] in result.stdout


def test_create_from_csv_with_a_bad_row_adds_nobody(data_dir):
    roster = data_dir / "roster.csv"
    roster.write_text("name,email\nBob,bob@school.test\nCy,not-an-email\n")

    result = run_script("create.py", "--csv", str(roster))

    assert result.returncode == 1
    assert "line 3" in result.stderr
    assert not (data_dir / "keys.json").exists() or read_entries(data_dir) == []


def test_ten_creates_at_once_lose_no_entry_and_never_show_a_half_written_file(
    data_dir,
):
    keys_path = data_dir / "keys.json"
    keys_path.write_text("[]\n")
    stop = threading.Event()
    problems, reads = [], []

    def watch():
        while not stop.is_set():
            try:
                reads.append(len(json.loads(keys_path.read_text())))
            except ValueError as error:
                problems.append(error)

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        with ThreadPoolExecutor(10) as pool:
            results = list(
                pool.map(
                    lambda n: run_script("create.py", f"S{n}", f"s{n}@school.test"),
                    range(10),
                )
            )
    finally:
        stop.set()
        reader.join()

    assert [r.returncode for r in results] == [0] * 10, [r.stderr for r in results]
    assert problems == []
    assert len(reads) > 10
    emails = sorted(entry["email"] for entry in read_entries(data_dir))
    assert emails == sorted(f"s{n}@school.test" for n in range(10))


# usage.py


def insert_rows(data_dir, rows):
    """Write usage rows as the proxy does, keyed by fingerprint."""
    path = str(data_dir / "usage.sqlite")
    db.init_db(path)
    connection = db.connect(path)
    try:
        connection.executemany(db.INSERT_ROW, [astuple(row) for row in rows])
    finally:
        connection.close()


def make_row(student, model, prompt, completion):
    return db.UsageRow(
        api_key=student.fingerprint,
        date="2025-01-01T00:00:00.000Z",
        model=model,
        endpoint="/v1/chat/completions",
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        email=student.email,
        name=student.name,
        method="POST",
        status=200,
        duration_ms=5,
        streamed=False,
        partial=False,
    )


@pytest.fixture
def class_usage(data_dir):
    """Two students with usage, one without; returns them light to heavy."""
    light = add_student(data_dir / "keys.json")
    heavy = add_student(data_dir / "keys.json")
    idle = add_student(data_dir / "keys.json")
    insert_rows(
        data_dir,
        [
            make_row(light, "gpt-4o-mini", 10, 5),
            make_row(heavy, "gpt-4o-mini", 100, 50),
            make_row(heavy, "gpt-4o", 1000, 500),
            make_row(heavy, "gpt-4o", 1000, 500),
        ],
    )
    return light, heavy, idle


def test_usage_table_lists_everyone_largest_total_first(class_usage):
    light, heavy, idle = class_usage

    result = run_script("usage.py")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "Name",
        "E-mail",
        "Requests",
        "Prompt",
        "Completion",
        "Total",
        "Last",
        "seen",
        "(UTC)",
    ]
    body = [line.rsplit(None, 1)[0] for line in lines[2:]]  # without last seen
    assert heavy.email in body[0]
    assert light.email in body[1]
    assert idle.email in body[2]
    assert body[0].split()[-4:] == ["3", "2,100", "1,050", "3,150"]
    assert body[1].split()[-4:] == ["1", "10", "5", "15"]
    assert body[2].split()[-4:] == ["0", "0", "0", "0"]
    assert heavy.name in body[0]


def test_usage_for_one_email_gives_totals_and_a_breakdown_by_model(class_usage):
    _, heavy, _ = class_usage

    result = run_script("usage.py", heavy.email.upper())

    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"{heavy.name} <{heavy.email}>" in text
    assert "3,150" in text
    [gpt4o] = [line for line in text.splitlines() if line.startswith("gpt-4o ")]
    [mini] = [line for line in text.splitlines() if line.startswith("gpt-4o-mini")]
    assert gpt4o.split()[1:] == ["2", "2,000", "1,000", "3,000"]
    assert mini.split()[1:] == ["1", "100", "50", "150"]
    assert text.index("gpt-4o ") < text.index("gpt-4o-mini")


def test_usage_for_an_unknown_email_fails_clearly(class_usage):
    result = run_script("usage.py", "nobody@school.test")

    assert result.returncode == 1
    assert "nobody@school.test" in result.stderr
    assert result.stdout == ""


NODE_KEYS = ["sk-node-alice-0123456789abcdef", "sk-node-bob-fedcba9876543210"]


def make_node_files(folder):
    """Write a usage.sqlite and keys.json as the Node proxy left them."""
    folder.mkdir(parents=True, exist_ok=True)
    write_keys(
        folder,
        [
            {"key": NODE_KEYS[0], "name": "Alice", "email": "alice@school.test"},
            {"key": NODE_KEYS[1], "name": "Bob", "email": "bob@school.test"},
        ],
    )
    make_node_store(
        folder / "usage.sqlite",
        [
            (NODE_KEYS[0], "2024-03-01T10:00:00.000Z", "gpt-4", "/v1/chat/completions",
             10, 20, 30),
            (NODE_KEYS[0], "2024-03-02T10:00:00.000Z", "gpt-3.5-turbo",
             "/v1/chat/completions", 1, 2, 3),
            (NODE_KEYS[1], "2024-03-03T10:00:00.000Z", "gpt-4", "/v1/chat/completions",
             100, 200, 300),
        ],
    )  # fmt: skip
    make_node_store(
        folder / "usage.sqlite",
        [
            (NODE_KEYS[1], "2024-02-01T10:00:00Z", "gpt-4", "/v1/embeddings", 0, 0, 0)
            for _ in range(500)
        ],
    )
    assert NODE_KEYS[0].encode() in (folder / "usage.sqlite").read_bytes()
    return folder


@pytest.fixture
def node_store(data_dir):
    """The data folder holding the Node proxy's files."""
    return make_node_files(data_dir)


def assert_no_plaintext_keys(data_dir):
    for path in data_dir.glob("usage.sqlite*"):
        content = path.read_bytes()
        for key in NODE_KEYS:
            assert key.encode() not in content, f"{key} left in {path.name}"


def test_usage_attributes_node_rows_to_the_right_students(node_store):
    result = run_script("usage.py")

    assert result.returncode == 0, result.stderr
    # Each row ends with the last-seen time; the figures come before it.
    bob, alice = (line.split()[:-1] for line in result.stdout.splitlines()[2:])
    assert (bob[0], bob[-4:]) == ("Bob", ["501", "100", "200", "300"])
    assert (alice[0], alice[-4:]) == ("Alice", ["2", "11", "22", "33"])
    alice = run_script("usage.py", "alice@school.test")
    assert alice.returncode == 0, alice.stderr
    assert "gpt-3.5-turbo" in alice.stdout


def test_usage_leaves_no_plaintext_key_in_a_node_store(node_store):
    result = run_script("usage.py")

    assert result.returncode == 0, result.stderr
    assert_no_plaintext_keys(node_store)


def test_proxy_leaves_no_plaintext_key_in_a_node_store(proxy_factory, tmp_path):
    folder = make_node_files(tmp_path / "node")

    running = proxy_factory(name="node")

    assert_no_plaintext_keys(folder)
    stop_process(running.process)
    assert_no_plaintext_keys(folder)


def test_usage_joins_node_rows_and_new_proxy_rows_of_a_student(
    proxy_factory, upstream, tmp_path, monkeypatch
):
    folder = make_node_files(tmp_path / "node")
    running = proxy_factory(name="node")
    requests.post(
        f"{running.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {NODE_KEYS[0]}"},
        json={"model": "gpt-4o-mini", "messages": []},
        timeout=10,
    )
    wait_for_usage_rows(running.usage_path, fingerprint(NODE_KEYS[0]), 3)
    monkeypatch.setenv("PROXY_CONFIG", str(folder / "config.json"))

    result = run_script("usage.py", "alice@school.test")

    assert result.returncode == 0, result.stderr
    [totals] = [line for line in result.stdout.splitlines() if line.startswith(" ")]
    assert totals.split() == ["3", "20", "27", "47"]
    assert "gpt-4o-mini" in result.stdout
    assert_no_plaintext_keys(folder)


def test_create_refuses_to_touch_a_broken_keys_file(data_dir):
    (data_dir / "keys.json").write_text('[{"key": "sk-a", "name": "A"')

    result = run_script("create.py", "Ada", "ada@school.test")

    assert result.returncode == 1
    assert "not valid JSON" in result.stderr
    assert (data_dir / "keys.json").read_text() == '[{"key": "sk-a", "name": "A"'


def test_usage_csv_does_not_let_a_student_chosen_text_become_a_formula(data_dir):
    student = add_student(data_dir / "keys.json", name="=HYPERLINK(1)")
    insert_rows(data_dir, [make_row(student, "+SUM(1+1)", 10, 5)])

    by_student = run_script("usage.py", "--csv")
    by_model = run_script("usage.py", "--csv", "--by", "model")

    assert by_student.returncode == 0, by_student.stderr
    assert "'=HYPERLINK(1)" in by_student.stdout
    assert "'+SUM(1+1)" in by_model.stdout
    lines = by_student.stdout.splitlines() + by_model.stdout.splitlines()
    assert not any(
        cell.startswith(("=", "+")) for line in lines for cell in line.split(",")
    )


def test_create_teacher_makes_an_admin_key(data_dir):
    result = run_script("create.py", "--teacher", "Grace Hopper", "grace@school.test")

    assert result.returncode == 0, result.stderr
    [entry] = read_entries(data_dir)
    assert entry["role"] == "admin"
