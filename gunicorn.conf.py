"""gunicorn settings for `gunicorn wsgi:app`.

Flags on the command line win over this file (`--bind`, `--workers`,
`--threads`), and so do the environment variables read below.

gthread workers: each request holds a thread, not a process, so hundreds
of long streams fit in a few processes. The plain sync worker serves one
request per process, so 500 open streams would need 500 processes. For
short requests gthread also measured cheaper than sync with the same
minimal app (bench/floor_app.py: about 1.6 ms of CPU a request against
1.8). gevent and eventlet are not sync workers, which this project keeps
to; measured once for comparison (`GUNICORN_CMD_ARGS="-k gevent
--worker-connections 1000"`), gevent cost 2.0 ms a W1 request (gthread:
2.3 to 3.3 in the same day's runs) and added 337 ms to W2's first chunk
(gthread: 550 to 830), with the floor app at 0.84 ms. The worker's timeout only watches
the worker's own heartbeat, which its main loop keeps sending while request
threads wait on the upstream, so a ten-minute stream is not killed.
"""

import os
from pathlib import Path

bind = os.environ.get("PROXY_BIND", "0.0.0.0:8080")
worker_class = "gthread"
# Chosen with bench/run.py on 2 cores. One process per core: two workers
# use both cores despite the GIL. In one session's runs, W1 cost 1.9 ms of
# CPU a request with two, 2.5 with three and 3.1 with four (more processes
# contend for SQLite's write lock and for the cores), W2's streams did no
# better, and each worker is one more copy of the app in memory.
workers = int(os.environ.get("PROXY_WORKERS", "2"))
# workers * threads is how many requests (streams included) run at once: a
# stream holds its thread to the end. 500 concurrent streams must all start,
# and the kernel does not spread connections evenly over the workers, so
# each worker gets room for more than half of them. All are started at boot
# (post_worker_init). That room has a price: with 16 threads a worker, W1
# cost 1.7 to 2.3 ms of CPU a request, with 384 2.3 to 3.3 (alternating
# runs, 2026-12-04). Why is not settled: a pool handing work to the most
# recently idle thread, rather than the longest idle, won back under a tenth.
threads = int(os.environ.get("PROXY_THREADS", "384"))
timeout = 60
graceful_timeout = 30
keepalive = 5
# Streams still open this long before a stopping worker is killed are ended
# and accounted for (see _cut_long_answers_before_the_kill).
CUT_BEFORE_KILL_SECONDS = 5
# Load the app once in the master: a bad config.json stops start-up with one
# message instead of a crash loop of workers.
preload_app = True
# gunicorn 27's control socket lives at one fixed path per user, so two
# proxies on one machine would fight over it; we do not use it.
control_socket_disable = True


# The uploads folder, found once the app has loaded: a config.json saved
# with a mistake later must not break these hooks, or the master with them.
_uploads_folder = None


def when_ready(server):
    """Remember where uploads are spooled, from the app the master loaded."""
    global _uploads_folder
    from uploads import TEMP_FOLDER_NAME

    flask_app = server.app.wsgi()
    _uploads_folder = Path(flask_app.config["DATA_DIR"]) / TEMP_FOLDER_NAME


def child_exit(server, worker):
    """When a worker dies (crash or kill), delete the uploads it was receiving."""
    from uploads import remove_uploads_of

    if _uploads_folder is not None:
        remove_uploads_of(_uploads_folder, worker.pid)


def worker_exit(server, worker):
    """Write the usage rows and log lines this worker still has queued."""
    import accounting

    accounting.writer.flush()


def on_exit(server):
    """On a graceful shutdown, delete uploads no request will finish now."""
    from uploads import sweep

    if _uploads_folder is not None and _uploads_folder.is_dir():
        sweep(_uploads_folder, older_than=-1)


def post_worker_init(worker):
    """Get the worker ready: all its threads started, a stop that loses nothing."""
    _start_all_threads(worker)
    _cut_long_answers_before_the_kill(worker)


def _start_all_threads(worker):
    """Start all of the worker's request threads now, not in the first rush.

    gthread starts a thread for a request when none is idle, and its main
    loop waits for each new thread to run: when a class's 500 streams
    arrive at once, that start-up queued them for about a second more
    (bench/run.py, W2's first chunk: +0.4 to +0.6 s with this, +0.7 to +1.0 s
    without). Idle threads cost little: 768 of them added 14 MB of resident
    memory. `tpool` is gthread's own attribute; with another worker class
    this does nothing.
    """
    import threading

    pool = getattr(worker, "tpool", None)
    if pool is None:
        return

    release = threading.Event()
    waiting = [pool.submit(release.wait) for _ in range(worker.cfg.threads)]
    release.set()
    for future in waiting:
        future.result()


def _cut_long_answers_before_the_kill(worker):
    """On a graceful stop, end answers that would outlive graceful_timeout.

    gunicorn kills a stopping worker (a restart, a reload, SIGTERM) that is
    still busy after graceful_timeout, and a stream killed that way leaves
    no usage row and no log line. A few seconds before that, the streams
    still open are ended with an error event, accounted for as partial,
    and the queued rows are written before the worker exits.
    """
    import signal
    import threading

    from forward import cut_open_answers

    stop_gracefully = signal.getsignal(signal.SIGTERM)
    delay = max(worker.cfg.graceful_timeout - CUT_BEFORE_KILL_SECONDS, 1)

    def on_stop(signum, frame):
        stop_gracefully(signum, frame)
        timer = threading.Timer(delay, cut_open_answers)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_stop)
