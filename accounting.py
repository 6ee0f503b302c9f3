"""Accounting for finished requests: a usage row and an access-log line each.

Request threads only describe what happened and queue it; one thread per
worker writes the queue out, many rows per SQLite transaction and many
lines per access.log write. Written by each request thread itself, rows
from two workers fought over SQLite's write lock, whose busy handler sleeps
a millisecond or more per attempt, and every write handed the GIL around
between dozens of threads: W1 of bench/run.py ran at half the rate.

Lines are written before the rows of the same batch, so once a request's
row is in usage.sqlite its line is in access.log. Whatever is still queued
when a worker stops gracefully is written first (gunicorn.conf.py's
worker_exit, and atexit); a worker killed outright loses what it had
queued, milliseconds' worth.
"""

import atexit
import os
import queue
import threading
import time

import db
from accesslog import format_line, write_lines
from metering import Meter

BATCH_SIZE = 500
# Marks the end of the queue for flush().
_STOP = object()


def account(record):
    """Queue the usage row and access line of a request whose answer closed.

    Runs when the response is closed: after the last byte, or when the
    client went away, so duration, tokens and `partial` are final.
    """
    # TODO: a worker killed outright (SIGKILL, out of memory) never gets
    # here for its open streams, so they leave neither row nor line.
    meter = record["meter"] or Meter()
    estimated = meter.estimate_cut_stream(record["request_bytes"])
    model = record["model"] or meter.model
    duration_ms = int((time.monotonic() - record["started"]) * 1000)
    student = record["student"]
    row = None
    if student is not None and record["meter"] is not None:
        row = db.UsageRow(
            api_key=student.fingerprint,
            date=record["date"],
            model=model,
            endpoint=record["path"],
            prompt_tokens=meter.prompt_tokens,
            completion_tokens=meter.completion_tokens,
            total_tokens=meter.total_tokens,
            email=student.email,
            name=student.name,
            method=record["method"],
            status=record["status"],
            duration_ms=duration_ms,
            streamed=meter.streamed,
            partial=meter.partial,
            audio_seconds=meter.audio_seconds,
            tokens_estimated=estimated,
        )

    line = format_line(
        {
            "user": record["who"],
            "client": record["client"],
            "method": record["method"],
            "path": record["path"],
            "status": record["status"],
            "ms": duration_ms,
            "model": model,
            "prompt_tokens": meter.prompt_tokens,
            "completion_tokens": meter.completion_tokens,
            "total_tokens": meter.total_tokens,
            "partial": meter.partial,
            "body": record["body"],
        }
    )
    writer.put(record["usage_db"], row, line)


class AccountingWriter:
    """One thread per process writing queued (usage file, row, line) items."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pid = None
        self._queue = None
        self._thread = None

    def put(self, usage_path, row, line):
        """Queue a row (or None) for `usage_path` and an access-log line."""
        self._ensure_thread()
        self._queue.put((usage_path, row, line))

    def flush(self, timeout=10):
        """Write everything queued so far; the thread stops until the next put."""
        with self._lock:
            thread = self._thread
            if self._pid != os.getpid() or thread is None or not thread.is_alive():
                return

            self._queue.put(_STOP)
            self._thread = None

        thread.join(timeout)

    def _ensure_thread(self):
        thread = self._thread
        if self._pid == os.getpid() and thread is not None and thread.is_alive():
            return

        with self._lock:
            if self._pid != os.getpid():
                # A forked worker inherits the queue but not the thread.
                self._pid = os.getpid()
                self._queue = queue.SimpleQueue()
                self._thread = None

            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, args=(self._queue,), daemon=True
                )
                self._thread.name = "accounting-writer"
                self._thread.start()

    @staticmethod
    def _run(items):
        while True:
            batch = [items.get()]
            while len(batch) < BATCH_SIZE:
                try:
                    batch.append(items.get_nowait())
                except queue.Empty:
                    break

            stopping = _STOP in batch
            batch = [item for item in batch if item is not _STOP]
            write_lines([line for _, _, line in batch])
            rows_by_path = {}
            for usage_path, row, _ in batch:
                if row is not None:
                    rows_by_path.setdefault(usage_path, []).append(row)

            for usage_path, rows in rows_by_path.items():
                db.write_rows(usage_path, rows)

            if stopping:
                return


writer = AccountingWriter()
atexit.register(writer.flush)
