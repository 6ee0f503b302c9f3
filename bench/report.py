"""The benchmark's table: one row per figure, with its target."""

import os
import platform

import click


def build_table(results):
    """Return the rows of the table: workload, metric, upstream, proxy, target, ok."""
    rows = []
    w1 = results.get("W1")
    if w1:
        rows.extend(table_w1(w1["upstream"], w1["proxy"]))
        if w1.get("floor"):
            rows.extend(table_floor(w1["upstream"], w1["floor"]))

    if results.get("W2"):
        rows.extend(table_w2(results["W2"]["upstream"], results["W2"]["proxy"]))
        if results["W2"].get("floor"):
            rows.extend(
                table_w2_floor(results["W2"]["upstream"], results["W2"]["floor"])
            )

    if results.get("W3"):
        rows.extend(table_w3(results["W3"]))

    if results.get("W4"):
        rows.extend(table_w4(results["W4"]))

    if results.get("W5"):
        rows.extend(table_w5(results["W5"]))

    return rows


def all_answered(*outcomes):
    """Tell whether every request of these W1 or W5 rounds was sent and answered.

    A figure is only judged against its target when it is: failed or unsent
    requests make a proxy look cheap or fast.
    """
    return all(o["complete"] and o["failures"] == 0 for o in outcomes)


def table_w1(up, px):
    added_p99 = px["p99_ms"] - up["p99_ms"]
    ratio = px["rps"] / up["rps"]
    cpu = px["cpu_ms_per_request"]
    measured = all_answered(up, px)
    return [
        (
            "W1",
            "requests ok",
            f"{up['requests'] - up['failures']}",
            f"{px['requests'] - px['failures']}",
            "all",
            # Counts the requests sent too: the client's time limit may cut a run.
            measured,
        ),
        (
            "W1",
            "requests/s",
            f"{up['rps']:.0f}",
            f"{px['rps']:.0f} ({ratio:.0%})",
            ">= 20%",
            measured and ratio >= 0.2,
        ),
        (
            "W1",
            "latency p50 ms",
            f"{up['p50_ms']:.1f}",
            f"{px['p50_ms']:.1f}",
            "",
            None,
        ),
        (
            "W1",
            "latency p99 ms",
            f"{up['p99_ms']:.1f}",
            f"{px['p99_ms']:.1f} (+{added_p99:.1f})",
            "+<= 10",
            measured and added_p99 <= 10,
        ),
        (
            "W1",
            "proxy CPU ms/request",
            "-",
            f"{cpu['proxy']:.2f}",
            "<= 1",
            measured and cpu["proxy"] <= 1,
        ),
        (
            "W1",
            "upstream CPU ms/request",
            f"{up['cpu_ms_per_request']['upstream']:.2f}",
            f"{cpu['upstream']:.2f}",
            "",
            None,
        ),
        (
            "W1",
            "client CPU ms/request",
            f"{up['cpu_ms_per_request']['client']:.2f}",
            f"{cpu['client']:.2f}",
            "",
            None,
        ),
    ]


def table_floor(up, floor):
    # Not the proxy: bench/floor_app.py, what gunicorn + Flask + requests
    # cost with none of the proxy's work. No target; it bounds what is possible.
    ratio = floor["rps"] / up["rps"]
    added_p99 = floor["p99_ms"] - up["p99_ms"]
    return [
        _figure(
            "W1",
            "floor app requests ok",
            f"{up['requests'] - up['failures']}",
            f"{floor['requests'] - floor['failures']}",
        ),
        _figure(
            "W1",
            "floor app requests/s",
            f"{up['rps']:.0f}",
            f"{floor['rps']:.0f} ({ratio:.0%})",
        ),
        _figure(
            "W1",
            "floor app latency p99 ms",
            f"{up['p99_ms']:.1f}",
            f"{floor['p99_ms']:.1f} (+{added_p99:.1f})",
        ),
        _figure(
            "W1",
            "floor app CPU ms/request",
            "-",
            f"{floor['cpu_ms_per_request']['proxy']:.2f}",
        ),
    ]


def table_w2_floor(up, floor):
    added_first = floor["first_chunk_p50_ms"] - up["first_chunk_p50_ms"]
    gained_p99 = floor["chunk_delay_p99_ms"] - up["chunk_delay_p99_ms"]
    return [
        _figure(
            "W2",
            "floor app streams complete",
            f"{up['complete']}/{up['streams']}",
            f"{floor['complete']}/{floor['streams']}",
        ),
        _figure(
            "W2",
            "floor app first chunk p50 ms",
            f"{up['first_chunk_p50_ms']:.1f}",
            f"{floor['first_chunk_p50_ms']:.1f} (+{added_first:.1f})",
        ),
        _figure(
            "W2",
            "floor app chunk delay p99 ms",
            f"{up['chunk_delay_p99_ms']:.1f}",
            f"{floor['chunk_delay_p99_ms']:.1f} (+{gained_p99:.1f})",
        ),
    ]


def _figure(workload, metric, upstream, through):
    """A table row shown for information, with no target."""
    return (workload, metric, upstream, through, "", None)


def table_w2(up, px):
    # Delays of streams that never completed are not figures.
    measured = all(o["complete"] == o["streams"] for o in (up, px))
    added_first = px["first_chunk_p50_ms"] - up["first_chunk_p50_ms"]
    gained_p50 = px["chunk_delay_p50_ms"] - up["chunk_delay_p50_ms"]
    gained_p99 = px["chunk_delay_p99_ms"] - up["chunk_delay_p99_ms"]
    return [
        (
            "W2",
            "streams complete",
            f"{up['complete']}/{up['streams']}",
            f"{px['complete']}/{px['streams']}",
            "all",
            px["complete"] == px["streams"],
        ),
        (
            "W2",
            "first chunk p50 ms",
            f"{up['first_chunk_p50_ms']:.1f}",
            f"{px['first_chunk_p50_ms']:.1f} (+{added_first:.1f})",
            "+<= 20",
            measured and added_first <= 20,
        ),
        (
            "W2",
            "chunk delay p50 ms",
            f"{up['chunk_delay_p50_ms']:.1f}",
            f"{px['chunk_delay_p50_ms']:.1f} (+{gained_p50:.1f})",
            "",
            None,
        ),
        (
            "W2",
            "chunk delay p99 ms",
            f"{up['chunk_delay_p99_ms']:.1f}",
            f"{px['chunk_delay_p99_ms']:.1f} (+{gained_p99:.1f})",
            "+<= 20",
            measured and gained_p99 <= 20,
        ),
        (
            "W2",
            "proxy CPU s (whole run)",
            "-",
            f"{px['cpu_seconds']['proxy']:.2f}",
            "",
            None,
        ),
    ]


def table_w3(w3):
    return [
        *_upload_rows(w3["upstream"], w3["proxy"], f"1 x {w3['megabytes']} MB", 10),
        # The issue sets a memory target for the single large upload only.
        *_upload_rows(
            w3["upstream_many"],
            w3["proxy_many"],
            f"{w3['concurrent']} x {w3['small_megabytes']} MB at once",
            None,
        ),
    ]


def _upload_rows(up, px, label, memory_target_mb):
    ratio = px["seconds"] / up["seconds"]
    growth = px["proxy_rss_growth_mb"]
    all_ok = set(px["statuses"]) == {200} == set(up["statuses"])
    return [
        ("W3", f"{label}: status", _statuses(up), _statuses(px), "200", all_ok),
        (
            "W3",
            f"{label}: s",
            f"{up['seconds']:.2f}",
            f"{px['seconds']:.2f} (x{ratio:.1f})",
            "x <= 3",
            ratio <= 3 and all_ok,
        ),
        (
            "W3",
            f"{label}: proxy peak RSS growth MB",
            "-",
            f"{growth:.1f} (of {px['proxy_rss_baseline_mb']:.0f})",
            "" if memory_target_mb is None else f"<= {memory_target_mb}",
            None if memory_target_mb is None else all_ok and growth <= memory_target_mb,
        ),
    ]


def _statuses(outcome):
    return ",".join(str(status) for status in sorted(set(outcome["statuses"])))


def table_w4(w4):
    rows = []
    for name, check in w4.items():
        same_rows = check["rows"] == check["sent"]
        same_tokens = list(check["tokens_reported"]) == list(check["tokens_stored"])
        rows.append(
            (
                "W4",
                f"{name} rows / sent",
                f"{check['sent']}",
                f"{check['rows']}",
                "equal",
                same_rows,
            )
        )
        rows.append(
            (
                "W4",
                f"{name} tokens p/c/t",
                "/".join(str(t) for t in check["tokens_reported"]),
                "/".join(str(t) for t in check["tokens_stored"]),
                "equal",
                same_tokens,
            )
        )
    return rows


def table_w5(w5):
    key_cases, row_cases = w5["key_cases"], w5["row_cases"]
    rows = [
        (
            "W5",
            f"{c['keys']} keys, {c['rows'][0]:,} to {c['rows'][1]:,} rows: CPU ms/req",
            "-",
            f"{c['cpu_ms_per_request']:.2f} ({c['rps']:.0f}/s)",
            "",
            None,
        )
        for c in key_cases + row_cases
    ]
    failures = sum(c["failures"] for c in key_cases + row_cases)
    rows.append(("W5", "requests failed", "-", f"{failures}", "0", failures == 0))
    growths = (
        ("keys", key_cases[0], key_cases[-1]),
        ("rows", row_cases[0], row_cases[-1]),
    )
    for label, small, large in growths:
        growth = large["cpu_ms_per_request"] / small["cpu_ms_per_request"] - 1
        measured = all_answered(small, large)
        rows.append(
            (
                "W5",
                f"cost growth, most vs fewest {label}",
                "-",
                f"{growth:+.0%}",
                "<= 10%",
                measured and abs(growth) <= 0.10,
            )
        )
    return rows


def print_table(rows):
    header = ("", "metric", "upstream alone", "through proxy", "target", "")
    lines = [header] + [
        (w, m, u, p, t, "" if ok is None else ("ok" if ok else "MISS"))
        for w, m, u, p, t, ok in rows
    ]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        click.echo(
            "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths))
        )


def describe_machine():
    return {
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
