"""Shared fixtures: the fake OpenAI upstream, a real gunicorn proxy, students.

The upstream is the only fake. The proxy runs as `gunicorn wsgi:app` with
the shipped gunicorn.conf.py, and the official openai SDK talks to it.
"""

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import requests

PROJECT_DIR = Path(__file__).resolve().parent.parent
UPSTREAM_KEY = "sk-upstream-test-key-0123456789"
sys.path.insert(0, str(PROJECT_DIR))

from keys import fingerprint, update_keys


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, tmp_path):
    """Keep the developer's own OpenAI settings out of every test."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "DATA_DIR", "CORS_ORIGINS"):
        monkeypatch.delenv(name, raising=False)

    monkeypatch.setenv("PROXY_CONFIG", str(tmp_path / "no-config.json"))


def start_process(args, ready_line=None, env=None, cwd=PROJECT_DIR):
    """Start a subprocess; with `ready_line`, wait until stdout prints it."""
    process = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE if ready_line else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if ready_line else None,
        text=True,
    )
    if ready_line:
        for line in process.stdout:
            if line.startswith(ready_line):
                return process, line.strip()

        raise RuntimeError(f"{args[0]} exited before printing {ready_line!r}")

    return process, None


def stop_process(process):
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

    if process.stdout is not None:
        process.stdout.close()


class FakeUpstream:
    """Handle on the fake OpenAI server running in a subprocess."""

    def __init__(self, port):
        self.url = f"http://127.0.0.1:{port}"

    def requests(self):
        return requests.get(f"{self.url}/__fake/requests", timeout=5).json()

    def reset(self):
        requests.post(f"{self.url}/__fake/reset", timeout=5)


@pytest.fixture(scope="session")
def fake_upstream():
    """The fake OpenAI API, on a random loopback port, for the whole run."""
    process, line = start_process(
        [
            sys.executable,
            str(PROJECT_DIR / "tests" / "fake_upstream.py"),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--api-key",
            UPSTREAM_KEY,
        ],
        ready_line="LISTENING",
    )
    yield FakeUpstream(int(line.split()[1]))
    stop_process(process)


@pytest.fixture
def upstream(fake_upstream):
    """The fake upstream with its request record emptied."""
    fake_upstream.reset()
    return fake_upstream


def get_free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Proxy:
    """A running `gunicorn wsgi:app` and its data folder."""

    url: str
    data_dir: Path
    process: subprocess.Popen
    log_path: Path

    @property
    def keys_path(self):
        return self.data_dir / "keys.json"

    @property
    def usage_path(self):
        return self.data_dir / "usage.sqlite"

    def log(self):
        return self.log_path.read_text(errors="replace")

    def access_log(self):
        path = self.data_dir / "access.log"
        return path.read_text() if path.exists() else ""


def start_proxy(data_dir, settings, workers=2, threads=32, gunicorn_args=()):
    """Start gunicorn on a free port with config.json = `settings`; wait for it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = data_dir / "config.json"
    config_path.write_text(json.dumps({"DATA_DIR": str(data_dir), **settings}))
    proxy = start_gunicorn(
        {"PROXY_CONFIG": str(config_path)}, data_dir, workers, threads, gunicorn_args
    )
    _wait_until_healthy(proxy)
    return proxy


def start_gunicorn(env, data_dir, workers=1, threads=32, gunicorn_args=()):
    """Start `gunicorn wsgi:app` on a free port with `env` added; do not wait."""
    port = get_free_port()
    log_path = data_dir / "gunicorn.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "gunicorn", "wsgi:app"),
                *("--bind", f"127.0.0.1:{port}"),
                *("--workers", str(workers), "--threads", str(threads)),
                *gunicorn_args,
            ],
            cwd=PROJECT_DIR,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    return Proxy(f"http://127.0.0.1:{port}", data_dir, process, log_path)


def worker_pids(master_pid):
    """Return the pids of a gunicorn master's workers."""
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text()
    return [int(pid) for pid in children.split()]


def _wait_until_healthy(proxy, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proxy.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited:\n{proxy.log()}")

        try:
            requests.get(f"{proxy.url}/health", timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.05)

    raise RuntimeError(f"gunicorn did not answer /health:\n{proxy.log()}")


def upstream_settings(fake_upstream):
    # Request limits are off unless a test turns them on: tests send bursts
    # from one student that the default 60/minute and 10 at once would refuse.
    return {
        "OPENAI_API_KEY": UPSTREAM_KEY,
        "OPENAI_BASE_URL": fake_upstream.url,
        "RATE_LIMIT_PER_STUDENT": None,
        "MAX_CONCURRENT_PER_STUDENT": None,
    }


@pytest.fixture(scope="session")
def proxy(fake_upstream, tmp_path_factory):
    """One gunicorn proxy (2 workers) in front of the fake upstream."""
    running = start_proxy(
        tmp_path_factory.mktemp("proxy"), upstream_settings(fake_upstream)
    )
    yield running
    stop_process(running.process)


@pytest.fixture
def proxy_factory(fake_upstream, tmp_path):
    """Build a proxy with its own settings; stopped after the test."""
    started = []

    def build(workers=2, name="custom", gunicorn_args=(), **settings):
        running = start_proxy(
            tmp_path / name,
            {**upstream_settings(fake_upstream), **settings},
            workers,
            gunicorn_args=gunicorn_args,
        )
        started.append(running)
        return running

    yield build
    for running in started:
        stop_process(running.process)


@dataclass
class Student:
    name: str
    email: str
    key: str

    @property
    def fingerprint(self):
        return fingerprint(self.key)


def add_student(keys_path, disabled=False, **extra):
    """Add a fresh student to keys.json (as create.py would) and return it."""
    tag = uuid.uuid4().hex[:8]
    student = Student(f"Student {tag}", f"s{tag}@school.test", f"sk-test-{tag}")
    entry = {"key": student.key, "name": student.name, "email": student.email}
    if disabled:
        entry["disabled"] = True

    update_keys(str(keys_path), lambda entries: entries.append({**entry, **extra}))
    return student


@pytest.fixture
def student(proxy):
    """A new student of the shared proxy: their usage rows are theirs alone."""
    return add_student(proxy.keys_path)


@pytest.fixture
def make_client():
    """Build official openai SDK clients for a proxy; closed after the test."""
    made = []

    def build(proxy, key):
        sdk = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=key, max_retries=0)
        made.append(sdk)
        return sdk

    yield build
    for sdk in made:
        sdk.close()


@pytest.fixture
def client(proxy, student, make_client):
    """The official openai SDK, pointed at the proxy with the student's key."""
    return make_client(proxy, student.key)


def read_usage_rows(usage_path, fingerprint_value):
    connection = sqlite3.connect(usage_path)
    connection.row_factory = sqlite3.Row
    try:
        rows = connection.execute(
            "SELECT * FROM usage_log WHERE api_key = ? ORDER BY id",
            (fingerprint_value,),
        ).fetchall()
    finally:
        connection.close()

    return [dict(row) for row in rows]


def wait_for_usage_rows(usage_path, fingerprint_value, count, seconds=10):
    """Return the student's rows once there are `count` of them.

    A row is written when the response closes, a moment after the client
    has read the last byte, hence the wait. Fails if more rows appear.
    """
    deadline = time.monotonic() + seconds
    rows = []
    while time.monotonic() < deadline:
        rows = read_usage_rows(usage_path, fingerprint_value)
        if len(rows) >= count:
            break

        time.sleep(0.02)

    time.sleep(0.2)
    rows = read_usage_rows(usage_path, fingerprint_value)
    assert len(rows) == count, rows
    return rows
