"""Sending a request to the upstream and relaying its answer as it arrives.

The student's key stays here: it is removed with the other headers that
describe the hop from the client, and the proxy's own key is added.
Answers are relayed without buffering: event streams one whole event at a
time, everything else in pieces as the socket delivers them.
"""

import json
import logging
import os
import socket
import threading
from urllib.parse import quote

import requests
import urllib3

from errors import BadRequest, UpstreamError, UpstreamTimeout, error_body
from metering import MAX_METERED_BODY, EventSplitter

logger = logging.getLogger(__name__)

HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

# Client headers that describe the hop to us, or carry the student's key.
NOT_FORWARDED_REQUEST_HEADERS = HOP_BY_HOP_HEADERS | {
    "host",
    "content-length",
    "authorization",
    "api-key",
    "x-api-key",
    "cookie",
    "origin",
    "referer",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    # We ask for identity and relay decoded bytes: no double gzip decoding.
    "accept-encoding",
    # The teacher's key decides which organization and project are billed.
    "openai-organization",
    "openai-project",
}

# Upstream headers that our server sets itself or that no longer hold once
# the body is relayed decoded.
NOT_RELAYED_RESPONSE_HEADERS = HOP_BY_HOP_HEADERS | {
    "content-encoding",
    "content-length",
    "server",
    "date",
}

# Characters that may stay as they are in a path segment (RFC 3986 pchar).
SEGMENT_SAFE_CHARACTERS = "-._~!$&'()*+,;=:@"
QUERY_SAFE_CHARACTERS = SEGMENT_SAFE_CHARACTERS + "/?%"

KEY_QUERY_PARAMETERS = frozenset({"api_key", "api-key", "apikey", "key"})

READ_SIZE = 64 * 1024
SEND_SIZE = 256 * 1024

# Connections a worker keeps open to the upstream, at most: one per
# request running at once, so none is discarded for lack of room (urllib3
# would log a warning each time). Idle ones wait at the back of the pool.
POOL_SIZE = 1024

_shared = {}
_shared_lock = threading.Lock()


def build_upstream_url(base_url, subpath, query_string=b""):
    """Join the upstream base and a client path that must stay under it.

    Raises BadRequest for empty, `.` or `..` segments and control characters,
    so no path can leave the base (the host cannot change: every segment is
    percent-encoded and the path always follows the base's own).
    """
    segments = subpath.split("/")
    for segment in segments:
        if segment in ("", ".", "..") or not segment.isprintable() or "\\" in segment:
            raise BadRequest(f"invalid path /v1/{subpath}: use a plain API path")

    path = "/".join(
        quote(segment, safe=SEGMENT_SAFE_CHARACTERS) for segment in segments
    )
    url = f"{base_url}/{path}"
    if query_string:
        query = query_string.decode("latin-1")
        if not query.isprintable():
            raise BadRequest("invalid query string: control characters are not allowed")

        # A key put in the query (we never read keys there) stays here too.
        kept = [
            part
            for part in query.split("&")
            if part.partition("=")[0].lower() not in KEY_QUERY_PARAMETERS
        ]
        if kept:
            url += "?" + quote("&".join(kept), safe=QUERY_SAFE_CHARACTERS + "=")

    return url


def build_upstream_headers(client_headers, api_key):
    """Return the headers to send upstream: the client's, minus hop and keys."""
    # Headers named in Connection are hop-by-hop too (RFC 9110, 7.6.1).
    dropped = NOT_FORWARDED_REQUEST_HEADERS | {
        name.strip().lower() for name in client_headers.get("Connection", "").split(",")
    }
    headers = {
        name: value
        for name, value in client_headers.items()
        if name.lower() not in dropped
    }
    headers["Authorization"] = f"Bearer {api_key}"
    headers["Accept-Encoding"] = "identity"
    return headers


def build_client_headers(upstream_headers):
    """Return the upstream's response headers that go back to the client."""
    return [
        (name, value)
        for name, value in upstream_headers.items()
        if name.lower() not in NOT_RELAYED_RESPONSE_HEADERS
    ]


class _InterruptibleWait:
    """Mixin for urllib3 connections: a stopping worker can end their wait.

    A request still waiting for the upstream's first byte (a slow model)
    has no answer to cut yet; shutting its socket down makes getresponse
    fail at once, and the student gets an error instead of a killed
    connection.
    """

    def getresponse(self, *args, **kwargs):
        with _open_answers_lock:
            _waiting_connections.add(self)
        try:
            return super().getresponse(*args, **kwargs)
        finally:
            with _open_answers_lock:
                _waiting_connections.discard(self)


class _HTTPConnection(_InterruptibleWait, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_InterruptibleWait, urllib3.connection.HTTPSConnection):
    pass


class _HTTPConnectionPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSConnectionPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _UploadFriendlyAdapter(requests.adapters.HTTPAdapter):
    # urllib3 sends a file body 16 KiB at a time; a 50 MB upload read from
    # disk goes out faster in larger pieces.
    def init_poolmanager(self, *args, **kwargs):
        kwargs["blocksize"] = SEND_SIZE
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _HTTPConnectionPool,
            "https": _HTTPSConnectionPool,
        }


def _get_adapter():
    # One adapter per process, shared by its threads: urllib3's pool is
    # thread-safe and hands back the most recently used connection, so a
    # few warm keep-alive connections serve whichever thread runs the next
    # request (gthread rotates requests over all its threads; per-thread
    # pools meant a cold connection for most requests after a burst of
    # streams). Requests go to the adapter without a Session: a Session's
    # cookie jar, environment lookups and setting merges cost about 0.3 ms a
    # request and the proxy needs none of them (upstream cookies must not
    # follow one student's request into another's).
    if _shared.get("pid") != os.getpid():
        with _shared_lock:
            if _shared.get("pid") != os.getpid():
                _shared["adapter"] = _UploadFriendlyAdapter(
                    pool_connections=4, pool_maxsize=POOL_SIZE
                )
                _shared["pid"] = os.getpid()

    return _shared["adapter"]


def send_upstream(method, url, headers, body, timeouts):
    """Send the request and return the streamed requests.Response.

    Raises UpstreamTimeout or UpstreamError, with the network error as cause.
    """
    try:
        prepared = requests.PreparedRequest()
        prepared.prepare(method=method, url=url, headers=headers, data=body)
        return _get_adapter().send(prepared, stream=True, timeout=timeouts)
    except requests.Timeout as error:
        raise UpstreamTimeout(
            "The OpenAI API did not answer in time. Try again in a moment."
        ) from error
    except requests.RequestException as error:
        if _stopping.is_set():
            raise UpstreamError(
                "The proxy is restarting and had to end this request before the "
                "OpenAI API answered. Try again in a moment.",
                code="proxy_restarting",
            ) from error
        raise UpstreamError(
            "The proxy could not reach the OpenAI API. Try again in a moment; "
            "if it keeps failing, tell your teacher."
        ) from error


def is_event_stream(upstream):
    """Tell whether the upstream answers with server-sent events."""
    content_type = upstream.headers.get("content-type", "")
    return content_type.startswith("text/event-stream")


class _OpenAnswer:
    """An answer being relayed, which cut_open_answers may end early."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.cut = False


_open_answers = set()
_waiting_connections = set()
_open_answers_lock = threading.Lock()
_stopping = threading.Event()


def cut_open_answers():
    """End every upstream request still open in this process; return how many.

    For a worker about to be stopped: each answer being relayed ends as if
    the upstream broke (an error event on a stream), and each request still
    waiting for its answer fails with a "restarting" error, so all of them
    are still accounted for before the process goes.
    """
    _stopping.set()
    with _open_answers_lock:
        answers = list(_open_answers)
        waiting = list(_waiting_connections)

    for connection in waiting:
        try:
            connection.sock.shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError):
            pass  # answered or closed meanwhile

    for answer in answers:
        answer.cut = True
        try:
            # Wakes the thread blocked reading this socket.
            answer.upstream.raw.shutdown()
        except (ValueError, RuntimeError, OSError):
            pass  # already finished or released

    return len(answers) + len(waiting)


def relay(upstream, meter):
    """Yield the upstream's body to the client as it arrives, metering it.

    Closing the generator (the client went away) closes the upstream
    connection at once and leaves the meter marked partial.
    """
    # TODO: a hang-up is only noticed at the next write, so a client that
    # leaves while the upstream is silent (a model thinking for minutes)
    # keeps the upstream request open until then; watching the client socket
    # (environ["gunicorn.socket"]) between reads would notice it sooner.
    finished = False
    event_stream = meter.streamed = is_event_stream(upstream)
    answer = _OpenAnswer(upstream)
    with _open_answers_lock:
        _open_answers.add(answer)
    try:
        if event_stream:
            yield from _relay_events(upstream, meter)
        else:
            yield from _relay_body(upstream, meter)

        finished = not answer.cut
        if answer.cut and event_stream:
            yield _stream_error_event(cut=True)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
        if answer.cut:
            logger.info("answer cut short: the worker is stopping url=%s", upstream.url)
        else:
            logger.warning("upstream stream broke url=%s error=%s", upstream.url, error)
        if event_stream:
            yield _stream_error_event(cut=answer.cut)
    finally:
        with _open_answers_lock:
            _open_answers.discard(answer)
        upstream.close()
        meter.partial = meter.partial or not finished


def _read_pieces(upstream):
    # read1 returns as soon as the socket has data; read(amt) would wait for
    # a full `amt` bytes and hold back a slow stream.
    raw = upstream.raw
    while piece := raw.read1(READ_SIZE, decode_content=True):
        yield piece


def _relay_events(upstream, meter):
    splitter = EventSplitter()
    for piece in _read_pieces(upstream):
        events = [event for event in splitter.feed(piece) if meter.read_event(event)]
        if events:
            yield b"".join(events)

    rest = splitter.rest()
    if rest:
        meter.partial = True
        yield rest


def _relay_body(upstream, meter):
    content_type = upstream.headers.get("content-type", "")
    copy = bytearray() if content_type.startswith("application/json") else None
    for piece in _read_pieces(upstream):
        if copy is not None and len(copy) + len(piece) <= MAX_METERED_BODY:
            copy += piece

        yield piece

    if copy is not None:
        meter.read_body(bytes(copy))


def _stream_error_event(cut=False):
    # The status is long sent; an error event is how OpenAI reports a failure
    # mid-stream, and the SDKs raise APIError on it.
    if cut:
        body = error_body(
            "The proxy is restarting and had to end this answer early; it is "
            "incomplete. Try again in a moment.",
            "server_error",
            "proxy_restarting",
        )
    else:
        body = error_body(
            "The connection to the OpenAI API broke mid-stream; the answer is "
            "incomplete. Try again.",
            "server_error",
            "upstream_stream_broken",
        )
    return b"data: " + json.dumps(body).encode() + b"\n\n"
