"""config.json and keys.json: start-up, overrides, hot reload, bad saves."""

import json
import os
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import (
    PROJECT_DIR,
    UPSTREAM_KEY,
    _wait_until_healthy,
    add_student,
    start_gunicorn,
    stop_process,
)

import keys
from config import normalize_base_url

REQUESTS_PER_CHECK = 12
WORKERS = 2
RELOADED = "reloaded keys"
KEPT = "keeping the last good keys"


@pytest.fixture
def gunicorn_env(tmp_path):
    """Start gunicorn with a given environment; stopped after the test."""
    started = []

    def start(env, workers=1):
        running = start_gunicorn(env, tmp_path, workers)
        started.append(running)
        _wait_until_healthy(running)
        return running

    yield start
    for running in started:
        stop_process(running.process)


def chat(proxy, key, **headers):
    return requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}", **headers},
        json={"model": "gpt-4o-mini", "messages": []},
        timeout=10,
    )


def statuses(proxy, key, count=REQUESTS_PER_CHECK):
    return {chat(proxy, key).status_code for _ in range(count)}


def count_lines(text, phrase):
    return sum(phrase in line for line in text.splitlines())


def hit_every_worker(proxy, key, phrase, workers=WORKERS):
    """Send bursts until each worker has logged `phrase` once more; return statuses.

    gunicorn hands connections to whichever worker accepts first, often the
    same one, so only the log shows that every worker has seen a save.
    """
    wanted = count_lines(proxy.log(), phrase) + workers
    seen = set()
    for _ in range(40):
        with ThreadPoolExecutor(8) as pool:
            answers = pool.map(
                lambda _: chat(proxy, key, **{"x-fake-delay-ms": "20"}), range(8)
            )
            seen |= {answer.status_code for answer in answers}

        if count_lines(proxy.log(), phrase) >= wanted:
            return seen

    pytest.fail(f"not every worker logged {phrase!r}:\n{proxy.log()}")


# config.json


def test_invalid_config_json_stops_start_up_naming_the_file_and_line(tmp_path):
    config_path = tmp_path / "config.json"
    # The comma missing after line 3 is noticed on line 4.
    config_path.write_text(
        '{\n  "OPENAI_API_KEY": "sk-x",\n  "DATA_DIR": "."\n  "X": 1\n}'
    )

    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "wsgi:app", "--bind", "127.0.0.1:0"],
        cwd=PROJECT_DIR,
        env={**os.environ, "PROXY_CONFIG": str(config_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert str(config_path) in output
    assert "line 4" in output
    assert "Traceback" not in output


def test_without_config_json_it_starts_from_the_environment_and_says_so(
    gunicorn_env, upstream, tmp_path
):
    running = gunicorn_env(
        {
            "PROXY_CONFIG": str(tmp_path / "missing.json"),
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "OPENAI_BASE_URL": upstream.url,
            "DATA_DIR": str(tmp_path),
        },
        workers=2,
    )
    student = add_student(running.keys_path)

    assert statuses(running, student.key) == {200}
    assert count_lines(running.log(), "using environment variables") == 1
    assert str(tmp_path / "missing.json") in running.log()


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_base_url_works_with_or_without_v1_and_trailing_slash(
    proxy_factory, upstream, suffix
):
    running = proxy_factory(workers=1, OPENAI_BASE_URL=upstream.url + suffix)
    student = add_student(running.keys_path)

    assert chat(running, student.key).status_code == 200

    [seen] = upstream.requests()
    assert seen["path"] == "/v1/chat/completions"


def test_base_url_with_a_path_is_used_as_written():
    # As the openai SDK does: only a bare host gets /v1 (see test_forward.py).
    assert normalize_base_url("http://h:1/openai/v1/") == "http://h:1/openai/v1"
    assert normalize_base_url("http://h:1/openai") == "http://h:1/openai"


def test_environment_variables_override_config_json(gunicorn_env, upstream, tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(
        json.dumps(
            {
                "OPENAI_API_KEY": "sk-wrong-key-in-the-file",
                "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
                "DATA_DIR": str(tmp_path / "from-file"),
            }
        )
    )
    running = gunicorn_env(
        {
            "PROXY_CONFIG": str(config_path),
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "OPENAI_BASE_URL": upstream.url,
            "DATA_DIR": str(tmp_path),
        }
    )
    student = add_student(running.keys_path)

    assert chat(running, student.key).status_code == 200
    assert not (tmp_path / "from-file").exists()


# keys.json


def test_missing_keys_json_is_created_empty_and_the_log_says_how_to_add_keys(
    proxy_factory,
):
    running = proxy_factory(name="fresh")

    assert json.loads(running.keys_path.read_text()) == []
    assert stat.S_IMODE(running.keys_path.stat().st_mode) == 0o600
    assert "python create.py NAME EMAIL" in running.log()


def test_a_key_saved_while_running_works_on_the_next_requests(proxy_factory, upstream):
    running = proxy_factory()
    statuses(running, "sk-not-yet")

    student = add_student(running.keys_path)

    assert hit_every_worker(running, student.key, RELOADED) == {200}
    assert statuses(running, student.key) == {200}


def test_an_atomically_replaced_keys_file_is_seen(proxy_factory, upstream):
    running = proxy_factory()
    old = add_student(running.keys_path)
    assert hit_every_worker(running, old.key, RELOADED) == {200}
    new_entry = {"key": "sk-replaced-0123456789", "name": "New", "email": "n@x.test"}

    temporary = running.data_dir / "keys.json.new"
    temporary.write_text(json.dumps([new_entry]))
    os.replace(temporary, running.keys_path)

    assert hit_every_worker(running, new_entry["key"], RELOADED) == {200}
    assert statuses(running, old.key) == {401}


BAD_SAVES = {
    "half-written": lambda entries: json.dumps(entries)[:-20],
    "not JSON": lambda entries: "this is not json\n",
    "not a list": lambda entries: json.dumps({"students": entries}),
    "entry without name": lambda entries: json.dumps(
        [*entries[:-1], {k: v for k, v in entries[-1].items() if k != "name"}]
    ),
    "entry without email": lambda entries: json.dumps(
        [*entries[:-1], {k: v for k, v in entries[-1].items() if k != "email"}]
    ),
    "empty file": lambda entries: "",
}


@pytest.mark.parametrize("problem", BAD_SAVES)
def test_a_bad_keys_save_keeps_the_last_good_keys_and_logs_one_error(
    proxy_factory, upstream, problem
):
    running = proxy_factory()
    old = add_student(running.keys_path)
    assert hit_every_worker(running, old.key, RELOADED) == {200}
    entries = json.loads(running.keys_path.read_text())
    new = {"key": "sk-new-after-bad-save-0123", "name": "New", "email": "new@x.test"}

    running.keys_path.write_text(BAD_SAVES[problem]([*entries, new]))

    assert hit_every_worker(running, old.key, KEPT) == {200}
    assert statuses(running, new["key"]) == {401}
    # One error per worker process, not one per request.
    assert count_lines(running.log(), KEPT) == WORKERS
    assert old.key not in running.log() and new["key"] not in running.log()


def test_workers_agree_after_a_bad_save_even_if_one_missed_the_good_one(
    proxy_factory, upstream
):
    running = proxy_factory()
    student = add_student(running.keys_path)
    assert hit_every_worker(running, student.key, RELOADED) == {200}
    entries = json.loads(running.keys_path.read_text())
    entries[-1]["disabled"] = True
    running.keys_path.write_text(json.dumps(entries))
    # Usually one worker answers this one request and sees the disabling.
    assert chat(running, student.key).status_code == 403

    running.keys_path.write_text("[{")

    assert hit_every_worker(running, student.key, KEPT) == {403}
    assert statuses(running, student.key) == {403}


def test_a_save_that_lists_nobody_does_not_lock_the_class_out(proxy_factory, upstream):
    running = proxy_factory()
    student = add_student(running.keys_path)
    assert hit_every_worker(running, student.key, RELOADED) == {200}

    running.keys_path.write_text("[]\n")

    assert hit_every_worker(running, student.key, KEPT) == {200}
    assert "disabled" in running.log()


def test_spaces_around_a_key_in_keys_json_are_ignored(tmp_path):
    path = tmp_path / "keys.json"
    entry = {"key": "  sk-spaced-0123456789 ", "name": "S", "email": "s@x.test"}
    path.write_text(json.dumps([entry]))
    keyring = keys.KeyRing(str(path))

    keyring.load()

    assert keyring.find("sk-spaced-0123456789").email == "s@x.test"


def test_fixing_a_bad_keys_save_brings_the_new_keys_in(proxy_factory, upstream):
    running = proxy_factory()
    old = add_student(running.keys_path)
    hit_every_worker(running, old.key, RELOADED)
    entries = json.loads(running.keys_path.read_text())
    running.keys_path.write_text("[{")
    hit_every_worker(running, old.key, KEPT)
    new_entry = {"key": "sk-after-fix-0123456789", "name": "Fix", "email": "f@x.test"}

    running.keys_path.write_text(json.dumps([*entries, new_entry]))

    assert hit_every_worker(running, new_entry["key"], RELOADED) == {200}
    assert statuses(running, old.key) == {200}


def test_a_thread_arriving_during_a_reload_sees_the_new_keys(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    path.write_text("[]")
    keyring = keys.KeyRing(str(path))
    keyring.load()
    entry = {"key": "sk-during-reload-0123", "name": "N", "email": "n@x.test"}
    path.write_text(json.dumps([entry]))
    parse = keys.parse_keys
    parsing = threading.Event()

    def parse_slowly(*args):
        parsing.set()
        time.sleep(0.3)  # a big keys.json, or a busy machine
        return parse(*args)

    monkeypatch.setattr(keys, "parse_keys", parse_slowly)
    first = threading.Thread(target=keyring.refresh)
    first.start()
    parsing.wait(5)

    keyring.refresh()
    found = keyring.find(entry["key"])

    first.join()
    assert found is not None


def test_disabling_a_key_while_running_refuses_it_with_403(proxy_factory, upstream):
    running = proxy_factory()
    student = add_student(running.keys_path)
    hit_every_worker(running, student.key, RELOADED)
    entries = json.loads(running.keys_path.read_text())
    entries[0]["disabled"] = True
    upstream.reset()

    running.keys_path.write_text(json.dumps(entries))

    assert hit_every_worker(running, student.key, RELOADED) == {403}
    answer = chat(running, student.key)
    assert answer.json()["error"]["code"] == "key_disabled"
    assert upstream.requests() == []


def test_an_empty_save_is_refused_even_by_a_worker_that_saw_no_keys_yet(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text("[]")
    fresh_worker, busy_worker = keys.KeyRing(str(path)), keys.KeyRing(str(path))
    fresh_worker.load()
    busy_worker.load()
    entry = {"key": "sk-seen-by-one-worker", "name": "N", "email": "n@x.test"}
    path.write_text(json.dumps([entry]))
    busy_worker.refresh()

    path.write_text("[]")
    os.utime(path, ns=(1, 1))  # a new signature even within one clock tick
    fresh_worker.refresh()

    assert fresh_worker.find("sk-seen-by-one-worker") is not None
    assert json.loads((tmp_path / "keys.json.last-good").read_text()) == [entry]
