"""Benchmark: what the proxy adds on top of the upstream alone (issue 6).

Starts tests/fake_upstream.py and `gunicorn wsgi:app` (the shipped
gunicorn.conf.py) on 127.0.0.1, runs each workload straight to the
upstream and then through the proxy, prints one table and writes JSON.

    .venv/bin/python bench/run.py            # full run, about 4 minutes
    .venv/bin/python bench/run.py --quick    # smaller counts, under 1 minute

Client, upstream and proxy share the machine's cores, so wall-clock
figures (throughput, latency) include the client's own cost in both
columns alike. CPU figures do not: the proxy's CPU is read from /proc
(utime + stime of the gunicorn master and its workers), the client's from
getrusage, each on its own line.
"""

import asyncio
import json
import os
import runpy
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import click
from clients import open_streams, percentile, send_chats, upload
from procs import (
    PROJECT_DIR,
    ROWS_SETTLE_SECONDS,
    UPSTREAM_KEY,
    RssSampler,
    count_rows,
    get_free_port,
    list_tree,
    make_students,
    prefill_rows,
    read_client_cpu_seconds,
    read_cpu_seconds,
    start_floor_proxy,
    start_proxy,
    start_upstream,
    stop,
    wait_for_rows,
    wait_until_up,
    write_keys,
)
from report import build_table, describe_machine, print_table

FULL = {
    "w1_requests": 5000,
    "w1_concurrency": 32,
    "w2_streams": 500,
    "w2_chunks": 50,
    "w2_interval_ms": 50,
    "w3_megabytes": 50,
    "w3_small_megabytes": 5,
    "w3_concurrent": 20,
    "w5_requests": 5000,
    "w5_keys": (10, 100, 1000),
    "w5_rows": (10_000, 1_000_000),
    "warmup_requests": 500,
}
# Rounds of each W5 case; the best counts.
W5_ROUNDS = 3
# Rounds of each W3 upload, straight and through the proxy; the median counts.
W3_ROUNDS = 3

QUICK = {
    **FULL,
    "w1_requests": 1000,
    "w2_streams": 200,
    "w2_chunks": 20,
    "w3_megabytes": 10,
    "w3_small_megabytes": 1,
    "w3_concurrent": 20,
    "w5_requests": 1000,
    "w5_rows": (10_000, 100_000),
    "warmup_requests": 200,
}


class Bench:
    """The running servers, the students and the results of one run."""

    def __init__(self, work_dir, sizes, controls=True):
        self.sizes = sizes
        self.controls = controls
        self.data_dir = work_dir / "data"
        self.data_dir.mkdir()
        self.usage_path = self.data_dir / "usage.sqlite"
        self.students = make_students(max(sizes["w5_keys"]))
        self.results = {}
        # Every server started, so that each is stopped whatever happens.
        self.processes = []

    def __enter__(self):
        try:
            self.upstream, self.upstream_url = start_upstream()
            self.processes.append(self.upstream)
            self.proxy, self.proxy_url = self.start_proxy(self.data_dir, 10)
            floor_dir = self.data_dir.parent / "floor"
            floor_dir.mkdir()
            self.floor, self.floor_url = start_floor_proxy(
                self.upstream_url, get_free_port(), floor_dir
            )
            self.processes.append(self.floor)
            wait_until_up(
                self.floor, f"{self.floor_url}/health", floor_dir / "floor.log"
            )
        except BaseException:
            stop(*self.processes)
            raise

        return self

    def __exit__(self, *exc):
        stop(*self.processes)

    def start_twin(self, rows, key_count):
        """Start a proxy of its own on a usage.sqlite holding `rows` rows."""
        data_dir = self.data_dir.parent / f"rows-{rows}"
        data_dir.mkdir()
        process, url = self.start_proxy(data_dir, key_count)
        usage_path = data_dir / "usage.sqlite"
        started = time.monotonic()
        prefill_rows(usage_path, rows, self.students[:key_count])
        return {
            "process": process,
            "url": url,
            "usage_path": usage_path,
            "prefill_seconds": time.monotonic() - started,
            "rounds": [],
        }

    def start_proxy(self, data_dir, key_count):
        """Start `gunicorn wsgi:app` on `data_dir` with the first `key_count` keys."""
        write_keys(data_dir, self.students[:key_count])
        process, url = start_proxy(
            data_dir, self.upstream_url, get_free_port(), self.controls
        )
        self.processes.append(process)
        wait_until_up(process, f"{url}/health", data_dir / "gunicorn.log")
        return process, url

    def keys(self, count):
        return [s["key"] for s in self.students[:count]]

    def run_chats(self, through_proxy, keys, count):
        """Run a W1 round; return figures with CPU per request by process."""
        base = self.proxy_url if through_proxy else self.upstream_url
        url = f"{base}/v1/chat/completions"
        keys = keys if through_proxy else [UPSTREAM_KEY]
        return self.measure_chats(url, keys, count, count_rows_too=through_proxy)

    def run_floor_chats(self, count):
        """Run a W1 round through bench/floor_app.py; its CPU counts as the proxy's."""
        url = f"{self.floor_url}/v1/chat/completions"
        return self.measure_chats(url, ["-"], count, proxy=self.floor)

    def measure_chats(
        self, url, keys, count, count_rows_too=False, proxy=None, usage_path=None
    ):
        usage_path = usage_path or self.usage_path
        concurrency = self.sizes["w1_concurrency"]
        asyncio.run(send_chats(url, keys, self.sizes["warmup_requests"], concurrency))
        settle_rows(usage_path)

        before = self.read_cpu(proxy)
        first_id = count_rows(usage_path)
        outcome = asyncio.run(send_chats(url, keys, count, concurrency))
        after = self.read_cpu(proxy)
        figures = summarize_chats(outcome, before, after, count)
        if count_rows_too:
            figures["rows"] = wait_for_rows(usage_path, first_id, count)

        return figures

    def read_cpu(self, proxy=None):
        proxy = proxy or self.proxy
        return {
            # Listed anew each time: workers may still be starting.
            "proxy": read_cpu_seconds(list_tree(proxy.pid)),
            "upstream": read_cpu_seconds([self.upstream.pid]),
            "client": read_client_cpu_seconds(),
        }

    def run_streams(self, through_proxy, floor=False):
        sizes = self.sizes
        base = self.proxy_url if through_proxy else self.upstream_url
        keys = self.keys(10) if through_proxy else [UPSTREAM_KEY]
        if floor:
            base, keys = self.floor_url, ["-"]
        first_id = count_rows(self.usage_path)
        before = self.read_cpu(self.floor if floor else None)
        records = asyncio.run(
            open_streams(
                f"{base}/v1/chat/completions",
                keys,
                sizes["w2_streams"],
                sizes["w2_chunks"],
                sizes["w2_interval_ms"],
                ask_usage=not through_proxy,
            )
        )
        after = self.read_cpu(self.floor if floor else None)
        figures = summarize_streams(records, sizes["w2_chunks"], before, after)
        if through_proxy:
            figures["rows"] = wait_for_rows(
                self.usage_path, first_id, sizes["w2_streams"]
            )

        return figures

    def run_upload(self, through_proxy, paths):
        base = self.proxy_url if through_proxy else self.upstream_url
        # 10 uploads in flight per student at most: spread them over keys.
        keys = self.keys(1 + len(paths) // 10) if through_proxy else [UPSTREAM_KEY]
        url = f"{base}/v1/audio/transcriptions"
        with RssSampler(self.proxy.pid) as sampler:
            outcome = asyncio.run(upload(url, keys, paths))

        outcome["proxy_rss_growth_mb"] = (sampler.peak - sampler.baseline) / 2**20
        outcome["proxy_rss_baseline_mb"] = sampler.baseline / 2**20
        return outcome

    def compare_uploads(self, paths):
        """Upload `paths` straight and through the proxy, in turn, W3_ROUNDS times.

        Returns (straight, through) of the median round by time: an upload
        takes a fraction of a second, so one slow spell would decide a
        single round.
        """
        straight, through = [], []
        for _ in range(W3_ROUNDS):
            straight.append(self.run_upload(False, paths))
            through.append(self.run_upload(True, paths))

        return median_round(straight), median_round(through)


def median_round(rounds):
    ordered = sorted(rounds, key=lambda outcome: outcome["seconds"])
    middle = dict(ordered[len(ordered) // 2])
    middle["seconds_rounds"] = [outcome["seconds"] for outcome in rounds]
    # Memory: the highest of the rounds, so no peak is hidden.
    if "proxy_rss_growth_mb" in middle:
        middle["proxy_rss_growth_mb"] = max(o["proxy_rss_growth_mb"] for o in rounds)
    middle["statuses"] = [s for outcome in rounds for s in outcome["statuses"]]
    return middle


def summarize_chats(outcome, before, after, count):
    latencies = outcome["latencies"]
    done = len(latencies)
    return {
        "requests": done,
        "failures": outcome["failures"],
        "rps": done / outcome["elapsed"],
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "cpu_ms_per_request": {
            name: 1000 * (after[name] - before[name]) / max(done, 1) for name in after
        },
        "usage_reported": outcome["usage"],
        "complete": done == count,
    }


def summarize_streams(records, chunks, before, after):
    delays = [d for r in records for d in r["delays"]]
    firsts = [r["first"] for r in records if r["first"] is not None]
    complete = sum(
        1 for r in records if r["ok"] and r["done"] and len(r["delays"]) == chunks
    )
    usages = [r["usage"] for r in records if r["usage"]]
    return {
        "streams": len(records),
        "complete": complete,
        "chunks": len(delays),
        "first_chunk_p50_ms": 1000 * (percentile(firsts, 0.5) or 0),
        "first_chunk_p99_ms": 1000 * (percentile(firsts, 0.99) or 0),
        "chunk_delay_p50_ms": 1000 * (percentile(delays, 0.5) or 0),
        "chunk_delay_p99_ms": 1000 * (percentile(delays, 0.99) or 0),
        "usage_per_stream": usages[0] if usages else None,
        "cpu_seconds": {name: after[name] - before[name] for name in after},
    }


# The run, step by step.


def run_w1(bench):
    count = bench.sizes["w1_requests"]
    bench.results["W1"] = {
        "upstream": bench.run_chats(False, None, count),
        "proxy": bench.run_chats(True, bench.keys(10), count),
        "floor": bench.run_floor_chats(count),
    }


def run_w2(bench):
    bench.results["W2"] = {
        "upstream": bench.run_streams(False),
        "proxy": bench.run_streams(True),
        "floor": bench.run_streams(False, floor=True),
    }


def run_w4(bench):
    w1, w2 = bench.results.get("W1"), bench.results.get("W2")
    if w1 and w2:
        bench.results["W4"] = check_accounting(
            w1["proxy"], w2["upstream"], w2["proxy"], bench.sizes
        )


def check_accounting(w1_proxy, w2_direct, w2_proxy, sizes):
    """Compare rows and token sums with what was sent and reported upstream."""
    per_stream = w2_direct["usage_per_stream"] or {}
    streams = sizes["w2_streams"]
    expected_w2 = [
        streams * per_stream.get(name, 0)
        for name in ("prompt_tokens", "completion_tokens", "total_tokens")
    ]
    w1_rows, w2_rows = w1_proxy["rows"], w2_proxy["rows"]
    return {
        "W1": {
            "sent": sizes["w1_requests"],
            "rows": w1_rows[0],
            "tokens_reported": w1_proxy["usage_reported"],
            "tokens_stored": list(w1_rows[1:]),
        },
        "W2": {
            "sent": streams,
            "rows": w2_rows[0],
            "tokens_reported": expected_w2,
            "tokens_stored": list(w2_rows[1:]),
        },
    }


def run_w3(bench):
    big = bench.data_dir.parent / "upload-big.mp3"
    small = bench.data_dir.parent / "upload-small.mp3"
    # MB, not MiB, as the issue counts them.
    write_random_file(big, bench.sizes["w3_megabytes"])
    write_random_file(small, bench.sizes["w3_small_megabytes"])
    many = [small] * bench.sizes["w3_concurrent"]
    upstream, proxy = bench.compare_uploads([big])
    upstream_many, proxy_many = bench.compare_uploads(many)
    bench.results["W3"] = {
        "megabytes": bench.sizes["w3_megabytes"],
        "upstream": upstream,
        "proxy": proxy,
        "concurrent": len(many),
        "small_megabytes": bench.sizes["w3_small_megabytes"],
        "upstream_many": upstream_many,
        "proxy_many": proxy_many,
    }
    big.unlink()
    small.unlink()


def write_random_file(path, megabytes):
    with open(path, "wb") as file:
        block = os.urandom(1_000_000)
        file.writelines(block for _ in range(megabytes))


def run_w5(bench):
    sizes = bench.sizes
    count = sizes["w5_requests"]
    fewest_keys = sizes["w5_keys"][0]
    # Keys: the main proxy, its keys.json rewritten for each case.
    rounds = {keys: [] for keys in sizes["w5_keys"]}
    # Rows: two twin proxies started alike, one on a small usage.sqlite and
    # one on a large one, so that only the rows differ between them.
    twins = [bench.start_twin(rows, fewest_keys) for rows in sizes["w5_rows"]]
    rows_before = [count_rows(twin["usage_path"]) for twin in twins]
    keys_rows_before = count_rows(bench.usage_path)
    # Every case takes its turn in every round: a slow spell of a shared
    # machine then falls on all cases alike.
    for number in range(W5_ROUNDS):
        # Each round starts with another case: none is always the first
        # after the twins' turn, nor always the last in a growing file.
        key_counts = list(sizes["w5_keys"])
        shift = number % len(key_counts)
        for keys in key_counts[shift:] + key_counts[:shift]:
            write_keys(bench.data_dir, bench.students[:keys])
            rounds[keys].append(bench.run_chats(True, bench.keys(keys), count))

        for twin in twins:
            twin["rounds"].append(
                bench.measure_chats(
                    f"{twin['url']}/v1/chat/completions",
                    bench.keys(fewest_keys),
                    count,
                    proxy=twin["process"],
                    usage_path=twin["usage_path"],
                )
            )

    write_keys(bench.data_dir, bench.students[:fewest_keys])
    keys_rows = (keys_rows_before, count_rows(bench.usage_path))
    bench.results["W5"] = {
        "key_cases": [
            summarize_w5_case(keys, keys_rows, rounds[keys])
            for keys in sizes["w5_keys"]
        ],
        "row_cases": [
            summarize_w5_case(
                fewest_keys,
                (before, count_rows(twin["usage_path"])),
                twin["rounds"],
            )
            for before, twin in zip(rows_before, twins)
        ],
        "prefill_seconds": [twin["prefill_seconds"] for twin in twins],
    }


def summarize_w5_case(keys, rows, rounds):
    # Best of the rounds: other load on a shared machine only ever adds CPU.
    best = min(rounds, key=lambda figures: figures["cpu_ms_per_request"]["proxy"])
    return {
        "keys": keys,
        # usage.sqlite's rows before the case's first round and after its last.
        "rows": list(rows),
        "rps": best["rps"],
        "cpu_ms_per_request": best["cpu_ms_per_request"]["proxy"],
        "cpu_ms_per_request_rounds": [
            figures["cpu_ms_per_request"]["proxy"] for figures in rounds
        ],
        "failures": sum(figures["failures"] for figures in rounds),
        "complete": all(figures["complete"] for figures in rounds),
    }


@click.command()
@click.option("--quick", is_flag=True, help="Smaller counts; under a minute.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=PROJECT_DIR / "bench" / "results.json",
    show_default=True,
    help="Where to write the JSON results.",
)
@click.option(
    "--only",
    type=click.Choice(["W1", "W2", "W3", "W5"]),
    multiple=True,
    help="Run only these workloads (W4 comes with W1 plus W2).",
)
@click.option(
    "--without-controls",
    is_flag=True,
    help="Run the proxy with request limits, in-flight slots and budgets off.",
)
def main(quick, out, only, without_controls):
    """Measure the proxy against the fake upstream alone; print a table."""
    check_writable(out)
    # A plain `kill` ends the run as Ctrl-C does: servers stopped, files removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sizes = QUICK if quick else FULL
    only = set(only) or {"W1", "W2", "W3", "W5"}
    started = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    try:
        with Bench(work_dir, sizes, controls=not without_controls) as bench:
            if "W1" in only:
                run_w1(bench)
            if "W2" in only:
                run_w2(bench)
            run_w4(bench)
            if "W3" in only:
                run_w3(bench)
            if "W5" in only:
                run_w5(bench)
            results = bench.results
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    report = {
        "machine": describe_machine(),
        "sizes": sizes,
        "gunicorn": read_gunicorn_settings(),
        "controls": not without_controls,
        "seconds": time.monotonic() - started,
        "results": results,
    }
    print_table(build_table(results))
    try:
        out.write_text(json.dumps(report, indent=2, default=list))
    except OSError as error:
        raise click.ClickException(f"could not write the results: {error}") from error

    click.echo(
        f"\n{report['machine']['cpus']} CPUs shared by client, proxy and upstream; "
        "proxy CPU from /proc (gunicorn master + workers), client CPU from getrusage."
    )
    if without_controls:
        click.echo("The proxy ran with request limits, slots and budgets off.")
    click.echo(f"run took {report['seconds']:.0f} s; results in {out}")


def check_writable(out):
    """Fail before the run, not after it, if the results cannot be written."""
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a"):
            pass
    except OSError as error:
        raise click.BadParameter(str(error), param_hint="--out") from error

    if not existed:
        out.unlink()


def settle_rows(usage_path):
    # Warm-up rows are written as responses close; let them land first.
    last = -1
    deadline = time.monotonic() + ROWS_SETTLE_SECONDS
    while time.monotonic() < deadline and last != count_rows(usage_path):
        last = count_rows(usage_path)
        time.sleep(0.3)


def read_gunicorn_settings():
    """The worker settings the proxy ran with: gunicorn.conf.py as loaded."""
    conf = runpy.run_path(str(PROJECT_DIR / "gunicorn.conf.py"))
    return {
        "worker_class": conf["worker_class"],
        "workers": conf["workers"],
        "threads": conf["threads"],
        # Flags here win over the file (the README's gevent comparison).
        "GUNICORN_CMD_ARGS": os.environ.get("GUNICORN_CMD_ARGS"),
    }


if __name__ == "__main__":
    main()
