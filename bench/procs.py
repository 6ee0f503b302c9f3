"""The benchmark's servers and data: processes, /proc readings, keys and rows."""

import json
import os
import resource
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import click

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from config import DEFAULTS
from keys import fingerprint, generate_key, update_keys

UPSTREAM_KEY = "sk-bench-upstream-key"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
START_SECONDS = 30
ROWS_SETTLE_SECONDS = 20


def list_tree(pid):
    """Return `pid` and all its descendants' pids."""
    pids = [pid]
    for current in pids:
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                pids.extend(int(child) for child in task.read_text().split())
            except OSError:
                pass

    return pids


def read_cpu_seconds(pids):
    """Return user + system CPU seconds used so far by `pids`."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue

        total += int(fields[11]) + int(fields[12])

    return total / CLOCK_TICKS


def read_rss_bytes(pids):
    """Return the summed resident memory of `pids`."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except OSError:
            continue

    return total * PAGE_BYTES


def read_client_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RssSampler:
    """Sample a process tree's resident memory in a thread; keep the peak."""

    def __init__(self, pid, every=0.01):
        self.pids = list_tree(pid)
        self.every = every
        self.baseline = read_rss_bytes(self.pids)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, read_rss_bytes(self.pids))
            self._stop.wait(self.every)


# Starting and stopping the servers.


def start_upstream():
    """Start the fake upstream; return (process, base url)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "tests/fake_upstream.py",
            "--port",
            "0",
            "--api-key",
            UPSTREAM_KEY,
        ],
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        if not line.startswith("LISTENING"):
            raise click.ClickException("the fake upstream did not start")
    except BaseException:
        # Ctrl-C or kill while it starts: it is not in the run's list yet.
        stop(process)
        raise

    return process, f"http://127.0.0.1:{line.split()[1]}"


# The limits stay on, so their cost is measured, but high enough that the
# benchmark's bursts from a few keys are never refused.
CONTROLS_ON = {
    "RATE_LIMIT_PER_STUDENT": "1000000/minute",
    "MAX_CONCURRENT_PER_STUDENT": 1000,
    "DAILY_TOKEN_BUDGET": 10**12,
}
CONTROLS_OFF = dict.fromkeys(CONTROLS_ON)


def start_proxy(data_dir, upstream_url, port, controls=True):
    """Start `gunicorn wsgi:app` with gunicorn.conf.py; return (process, url).

    With `controls` false, request limits, in-flight slots and budgets are
    off: what is left is keys, forwarding, accounting and the access log.
    """
    config_path = data_dir / "config.json"
    config = {
        "OPENAI_API_KEY": UPSTREAM_KEY,
        "OPENAI_BASE_URL": upstream_url,
        "DATA_DIR": str(data_dir),
        **(CONTROLS_ON if controls else CONTROLS_OFF),
    }
    config_path.write_text(json.dumps(config))
    env = {**get_clean_environment(), "PROXY_CONFIG": str(config_path)}
    with open(data_dir / "gunicorn.log", "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "wsgi:app",
                "--bind",
                f"127.0.0.1:{port}",
            ],
            cwd=PROJECT_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    return process, f"http://127.0.0.1:{port}"


def get_clean_environment():
    """This environment without the proxy's settings.

    They would win over the bench's config.json: a teacher's exported
    OPENAI_API_KEY, DATA_DIR or OPENAI_BASE_URL would send benchmark traffic
    to the real API or write it into the class's usage.sqlite.
    """
    return {name: value for name, value in os.environ.items() if name not in DEFAULTS}


def start_floor_proxy(upstream_url, port, data_dir):
    """Start bench/floor_app.py as the proxy is started: the shipped gunicorn.conf.py."""
    env = {
        **get_clean_environment(),
        "FLOOR_UPSTREAM_URL": upstream_url,
        "FLOOR_UPSTREAM_KEY": UPSTREAM_KEY,
        "FLOOR_DATA_DIR": str(data_dir),
    }
    with open(data_dir / "floor.log", "w") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "gunicorn", "bench.floor_app:app"),
                *("--bind", f"127.0.0.1:{port}"),
            ],
            cwd=PROJECT_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    return process, f"http://127.0.0.1:{port}"


def wait_until_up(process, url, log_path):
    """Wait for `url` to answer; fail with the end of the server's log if not."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urlopen_local(url):
                return
        except OSError:
            time.sleep(0.1)

    try:
        last_lines = Path(log_path).read_text(errors="replace").splitlines()[-15:]
    except OSError:
        last_lines = []
    raise click.ClickException(
        "\n".join([f"{url} did not come up; its log ended:", *last_lines])
    )


def urlopen_local(url):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(url, timeout=2)


def get_free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(*processes):
    """Stop `processes`: all are asked at once, so an interrupt leaves none."""
    for process in processes:
        if process.poll() is None:
            process.terminate()

    try:
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    except BaseException:
        for process in processes:
            if process.poll() is None:
                process.kill()
        raise


# Students and rows.


def make_students(count):
    """Return `count` (key, name, email) students."""
    return [
        {"key": generate_key(), "name": f"Bench {n}", "email": f"bench{n}@school.test"}
        for n in range(count)
    ]


def write_keys(data_dir, students):
    """Replace keys.json with `students`, as create.py would (locked, atomic)."""

    def replace(entries):
        entries[:] = students

    update_keys(str(data_dir / "keys.json"), replace)


def count_rows(usage_path):
    with sqlite3.connect(usage_path) as connection:
        return connection.execute(
            "SELECT COALESCE(MAX(id), 0) FROM usage_log"
        ).fetchone()[0]


def wait_for_rows(usage_path, after_id, expected):
    """Wait until `expected` rows follow `after_id`; return what was written."""
    deadline = time.monotonic() + ROWS_SETTLE_SECONDS
    while time.monotonic() < deadline:
        if count_rows(usage_path) - after_id >= expected:
            break

        time.sleep(0.1)

    time.sleep(0.3)  # late extra rows would show here
    with sqlite3.connect(usage_path) as connection:
        return connection.execute(
            "SELECT COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),"
            " SUM(total_tokens) FROM usage_log WHERE id > ?",
            (after_id,),
        ).fetchone()


def prefill_rows(usage_path, total, students):
    """Top usage.sqlite up to `total` rows in one transaction."""
    missing = total - count_rows(usage_path)
    if missing <= 0:
        return 0

    fingerprints = [fingerprint(s["key"]) for s in students]
    rows = (
        (
            fingerprints[n % len(fingerprints)],
            f"2025-{1 + n % 12:02d}-{1 + n % 28:02d}T10:05:00.000Z",
            "gpt-4o-mini",
            "/v1/chat/completions",
            9,
            5,
            14,
            students[n % len(students)]["email"],
            students[n % len(students)]["name"],
            "POST",
            200,
            20,
        )
        for n in range(missing)
    )
    with sqlite3.connect(usage_path) as connection:
        connection.executemany(
            "INSERT INTO usage_log (api_key, date, model, endpoint, prompt_tokens,"
            " completion_tokens, total_tokens, email, name, method, status, duration_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    # The rows went to the write-ahead log; copy them into the file now, or
    # the proxy's next write would do it and the copy would count as its CPU.
    with sqlite3.connect(usage_path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    return missing
