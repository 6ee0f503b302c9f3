"""A fake OpenAI API server: the only upstream fake in the tests and the benchmark.

Run it as a script; once listening it prints one line, ``LISTENING <port>``::

    python tests/fake_upstream.py --host 127.0.0.1 --port 0 --api-key sk-upstream-test

It serves until SIGINT or SIGTERM. Importing the module has no side effects;
``create_app(api_key)`` builds the aiohttp application for in-process use.

Every ``/v1/`` request needs ``Authorization: Bearer <api key>`` (else 401). These
optional request headers steer the answer:

- ``x-fake-status: N``: answer N with a real-shaped error body (429 adds
  ``retry-after: 0``).
- ``x-fake-delay-ms: N``: wait N ms before answering (also before errors).
- ``x-fake-chunks: N``: content pieces per answer, default 5. Non-streamed
  answers join the same N pieces.
- ``x-fake-interval-ms: N``: pause after each streamed content chunk.
- ``x-fake-break-after: K``: streams are cut (connection closed, no terminal
  event) after K content chunks, or after the last one if K >= N; binary audio
  counts 16 KiB chunks. JSON answers send a full Content-Length, then only the
  first K bytes of the body.
- ``x-fake-split-bytes: N``: write streams in N-byte pieces, 2 ms apart.
- ``x-fake-gzip: 1``: gzip JSON bodies (``Content-Encoding: gzip``).
- ``x-fake-timestamps: 1``: streamed text pieces read ``t=<time.time()>;``.
- ``x-fake-audio-bytes: N``: size of the speech answer, default 64 KiB.

Usage numbers are fixed so tests can assert them. N is the content chunk count;
streamed and non-streamed answers to the same request report the same numbers:

- chat: prompt_tokens 9, completion_tokens N, total_tokens 9 + N.
- completions: prompt_tokens 5, completion_tokens N, total_tokens 5 + N.
- responses: input_tokens 12, output_tokens N, total_tokens 12 + N.
- embeddings: prompt_tokens = total_tokens = 8 per input item.
- transcriptions: whisper-1 ``{"type": "duration", "seconds": 9}``; other models
  tokens 14 in (all audio), 45 out, 59 total. Translations carry no usage.
- speech: none in binary answers; ``stream_format: "sse"`` ends with 14/101/115.

Cached, reasoning and other detail counts are always 0.

Control endpoints, without auth: ``GET /__fake/requests`` lists the last 1000
``/v1`` requests, ``POST /__fake/reset`` clears them, ``GET /__fake/health``.
"""

import argparse
import asyncio
import base64
import collections
import gzip
import hashlib
import itertools
import json
import signal
import struct
import time

from aiohttp import web

DEFAULT_CHUNKS = 5
MAX_RECORDS = 1000
MAX_JSON_BYTES = 64 * 1024 * 1024
UPLOAD_CHUNK_BYTES = 64 * 1024
AUDIO_BYTES = 64 * 1024
AUDIO_CHUNK_BYTES = 16 * 1024
SPLIT_PAUSE_SECONDS = 0.002
DEFAULT_MODEL = "gpt-4o-mini"
SYSTEM_FINGERPRINT = "fp_fake"
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
DONE_EVENT = b"data: [DONE]\n\n"

PIECES = ("Héllo ", "wörld ", "世界 ", "🎉 ")
TRANSCRIPT = "Héllo wörld 世界 🎉"

CHAT_PROMPT_TOKENS = 9
COMPLETION_PROMPT_TOKENS = 5
RESPONSE_INPUT_TOKENS = 12
EMBEDDING_TOKENS_PER_INPUT = 8
EMBEDDING_DIMENSIONS = 8
WHISPER_SECONDS = 9
TRANSCRIBE_USAGE = {
    "type": "tokens",
    "input_tokens": 14,
    "input_token_details": {"text_tokens": 0, "audio_tokens": 14},
    "output_tokens": 45,
    "total_tokens": 59,
}
SPEECH_SSE_USAGE = {"input_tokens": 14, "output_tokens": 101, "total_tokens": 115}

AUDIO_CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "aac": "audio/aac",
    "opus": "audio/opus",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}

MODELS = (
    ("gpt-4o-mini", 1721172741),
    ("gpt-4o", 1715367049),
    ("gpt-3.5-turbo-instruct", 1692901427),
    ("text-embedding-3-small", 1705948997),
    ("whisper-1", 1677532384),
    ("gpt-4o-mini-transcribe", 1742068463),
    ("gpt-4o-mini-tts", 1742403959),
)

# Real bodies from OPENAI-SHAPES.md section 10: (message, type, param, code).
ERROR_BODIES = {
    400: (
        "This model's maximum context length is 128000 tokens. However, your "
        "messages resulted in 130000 tokens. Please reduce the length of the messages.",
        "invalid_request_error",
        "messages",
        "context_length_exceeded",
    ),
    403: (
        "Country, region, or territory not supported",
        "request_forbidden",
        None,
        "unsupported_country_region_territory",
    ),
    404: (
        "The model `gpt-x` does not exist or you do not have access to it.",
        "invalid_request_error",
        None,
        "model_not_found",
    ),
    429: (
        "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): "
        "Limit 30000, Used 30000, Requested 100. Please try again in 644ms.",
        "tokens",
        None,
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
        None,
    ),
}
BAD_KEY_MESSAGE = (
    "Incorrect API key provided: {}. You can find your API key at "
    "https://platform.openai.com/account/api-keys."
)
NO_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an "
    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
BAD_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. The OpenAI API expects a "
    "JSON payload, but what was sent was not valid JSON."
)

API_KEY = web.AppKey("api_key", str)
RECORDS = web.AppKey("records", collections.deque)
COUNTER = web.AppKey("counter", itertools.count)


class ApiError(Exception):
    """An error answer, raised by helpers and returned by the middleware."""

    def __init__(
        self, status, message, error_type, param=None, code=None, headers=None
    ):
        super().__init__(message)
        self.response = make_error(status, message, error_type, param, code, headers)


def make_error(status, message, error_type, param=None, code=None, headers=None):
    """Return an error response in the shape the OpenAI SDKs parse."""
    error = {"message": message, "type": error_type, "param": param, "code": code}
    return web.Response(
        status=status, body=_dump_json({"error": error}), headers=_json_headers(headers)
    )


def _dump_json(payload):
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _json_headers(extra=None):
    return {"Content-Type": "application/json", **(extra or {})}


def _get_int_header(request, name, default=None):
    try:
        return max(0, int(request.headers[name]))
    except (KeyError, ValueError):
        return default


def _has_flag(request, name):
    return request.headers.get(name, "").strip().lower() in ("1", "true", "yes")


def _next_number(request):
    return next(request.app[COUNTER])


# Recording, auth and forced answers for every /v1 request.


@web.middleware
async def serve_v1(request, handler):
    """Record a /v1 request, then apply delay, auth and x-fake-status."""
    if not request.path.startswith("/v1/"):
        return await handler(request)

    request["record"] = _start_record(request)
    await _read_json_body(request)
    delay = _get_int_header(request, "x-fake-delay-ms", 0)
    if delay:
        await asyncio.sleep(delay / 1000)

    try:
        _check_auth(request)
        _check_forced_status(request)
        return await handler(request)
    except ApiError as error:
        return error.response


def _start_record(request):
    headers = {}
    for name, value in request.headers.items():
        name = name.lower()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value

    record = {
        "method": request.method,
        "path": request.path,
        "query": dict(request.query),
        "headers": headers,
        "json": None,
        "body_size": 0,
        "form": {},
        "files": [],
        "client_disconnected": None,
    }
    request.app[RECORDS].append(record)
    return record


async def _read_json_body(request):
    """Read a non-multipart body; multipart uploads are streamed by their handler."""
    if request.content_type.startswith("multipart/"):
        return

    body = await request.read()
    request["record"]["body_size"] = len(body)
    try:
        request["record"]["json"] = json.loads(body) if body else None
    except ValueError:
        request["body_error"] = True


def _check_auth(request):
    key = _get_presented_key(request)
    if key == request.app[API_KEY]:
        return

    if not key:
        raise ApiError(
            401, NO_KEY_MESSAGE, "invalid_request_error", None, "invalid_api_key"
        )

    _raise_bad_key(key)


def _get_presented_key(request):
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def _raise_bad_key(key):
    message = BAD_KEY_MESSAGE.format(mask_key(key))
    raise ApiError(401, message, "invalid_request_error", None, "invalid_api_key")


def mask_key(key):
    """Return a key shortened the way OpenAI shows it, like ``sk-ab***cd``."""
    if len(key) < 10:
        return "***"

    return f"{key[:5]}***{key[-2:]}"


def _check_forced_status(request):
    status = _get_int_header(request, "x-fake-status")
    if status is None or status < 400:
        return

    if status == 401:
        _raise_bad_key(_get_presented_key(request))

    generic = (f"Fake upstream error {status}.", _get_error_type(status), None, None)
    message, error_type, param, code = ERROR_BODIES.get(status, generic)
    headers = {"retry-after": "0"} if status == 429 else None
    raise ApiError(status, message, error_type, param, code, headers)


def _get_error_type(status):
    return "server_error" if status >= 500 else "invalid_request_error"


def _get_json_body(request):
    """Return the request's JSON object, or raise the API's 400 for bad JSON."""
    body = request["record"]["json"]
    if request.get("body_error") or not isinstance(body, dict):
        raise ApiError(400, BAD_JSON_MESSAGE, "invalid_request_error")

    return body


def _get_model(body, default=DEFAULT_MODEL):
    model = body.get("model")
    return model if isinstance(model, str) and model else default


def _wants_usage(body):
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _get_piece(index, timestamps):
    if timestamps:
        return f"t={time.time():.6f};"

    return PIECES[index % len(PIECES)]


def _join_pieces(count):
    return "".join(_get_piece(index, False) for index in range(count))


# Sending JSON and streams.


async def send_json(request, payload):
    """Send a 200 JSON answer, honouring x-fake-gzip and x-fake-break-after."""
    body = _dump_json(payload)
    headers = _json_headers()
    if _has_flag(request, "x-fake-gzip"):
        body = gzip.compress(body, compresslevel=1)
        headers["Content-Encoding"] = "gzip"

    cut_at = _get_int_header(request, "x-fake-break-after")
    if cut_at is None:
        return web.Response(body=body, headers=headers)

    response = web.StreamResponse(headers=headers)
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: min(cut_at, len(body) - 1)])
    _cut_connection(request)
    return response


def _cut_connection(request):
    # Closing the transport skips aiohttp's clean ending (final chunk or full
    # length); the ConnectionError it then meets in write_eof is swallowed.
    if request.transport is not None:
        request.transport.close()


def format_sse(payload, event=None):
    """Return one server-sent event as bytes, with an ``event:`` line if named."""
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    if event is None:
        return f"data: {data}\n\n".encode()

    return f"event: {event}\ndata: {data}\n\n".encode()


async def send_stream(request, events, content_type=SSE_CONTENT_TYPE):
    """Stream ``(bytes, kind)`` events; record whether the client hung up.

    ``kind`` is "head", "content" or "tail"; x-fake-break-after counts
    "content" events and never lets a "tail" event out.
    """
    record = request["record"]
    response = web.StreamResponse(
        headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
    )
    try:
        await response.prepare(request)
        await _write_events(request, response, events)
    except ConnectionError:
        record["client_disconnected"] = True
    except asyncio.CancelledError:
        record["client_disconnected"] = True
        raise
    else:
        record["client_disconnected"] = False

    return response


async def _write_events(request, response, events):
    split = _get_int_header(request, "x-fake-split-bytes", 0)
    interval = _get_int_header(request, "x-fake-interval-ms", 0) / 1000
    cut_after = _get_int_header(request, "x-fake-break-after")
    written = 0
    # Events are built lazily, so a timestamp piece is taken when it is sent.
    for data, kind in events:
        if _should_cut(kind, written, cut_after):
            _cut_connection(request)
            return

        await _write_bytes(response, data, split)
        if kind == "content":
            written += 1
            if interval:
                await asyncio.sleep(interval)

    if cut_after is not None:
        _cut_connection(request)


def _should_cut(kind, written, cut_after):
    if cut_after is None or kind == "head":
        return False

    return kind == "tail" or written >= cut_after


async def _write_bytes(response, data, split):
    if not split:
        await response.write(data)
        return

    # The pause lets each piece leave as its own TCP segment (aiohttp sets
    # TCP_NODELAY), so clients see events and UTF-8 characters split apart.
    for start in range(0, len(data), split):
        await response.write(data[start : start + split])
        await asyncio.sleep(SPLIT_PAUSE_SECONDS)


# Chat completions.


async def handle_chat(request):
    """Answer POST /v1/chat/completions, streamed or not."""
    body = _get_json_body(request)
    ident = f"chatcmpl-{_next_number(request)}"
    model = _get_model(body)
    count = _get_int_header(request, "x-fake-chunks", DEFAULT_CHUNKS)
    if body.get("stream") is True:
        timestamps = _has_flag(request, "x-fake-timestamps")
        events = _iter_chat_events(ident, model, count, _wants_usage(body), timestamps)
        return await send_stream(request, events)

    return await send_json(request, build_chat_completion(ident, model, count))


def build_chat_completion(ident, model, count):
    """Return a non-streamed chat.completion whose content has ``count`` pieces."""
    message = {
        "role": "assistant",
        "content": _join_pieces(count),
        "refusal": None,
        "annotations": [],
    }
    return {
        "id": ident,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        ],
        "usage": get_chat_usage(count),
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def get_chat_usage(count):
    """Return the chat usage object for an answer of ``count`` pieces."""
    return {
        "prompt_tokens": CHAT_PROMPT_TOKENS,
        "completion_tokens": count,
        "total_tokens": CHAT_PROMPT_TOKENS + count,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _iter_chat_events(ident, model, count, include_usage, timestamps):
    base = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }

    def chunk(delta, finish_reason=None):
        choice = {"index": 0, "delta": delta, "logprobs": None}
        payload = {**base, "choices": [{**choice, "finish_reason": finish_reason}]}
        if include_usage:
            payload["usage"] = None
        return format_sse(payload)

    yield chunk({"role": "assistant", "content": ""}), "head"
    for index in range(count):
        yield chunk({"content": _get_piece(index, timestamps)}), "content"

    yield chunk({}, "stop"), "tail"
    if include_usage:
        usage_chunk = {**base, "choices": [], "usage": get_chat_usage(count)}
        yield format_sse(usage_chunk), "tail"

    yield DONE_EVENT, "tail"


# Legacy completions.


async def handle_completions(request):
    """Answer POST /v1/completions, streamed or not."""
    body = _get_json_body(request)
    ident = f"cmpl-{_next_number(request)}"
    model = _get_model(body, "gpt-3.5-turbo-instruct")
    count = _get_int_header(request, "x-fake-chunks", DEFAULT_CHUNKS)
    if body.get("stream") is True:
        timestamps = _has_flag(request, "x-fake-timestamps")
        events = _iter_completion_events(
            ident, model, count, _wants_usage(body), timestamps
        )
        return await send_stream(request, events)

    payload = _build_completion(ident, model, _join_pieces(count), "stop")
    payload["usage"] = get_completion_usage(count)
    return await send_json(request, payload)


def _build_completion(ident, model, text, finish_reason):
    choice = {
        "text": text,
        "index": 0,
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    return {
        "id": ident,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [choice],
    }


def get_completion_usage(count):
    """Return the legacy completion usage for an answer of ``count`` pieces."""
    return {
        "prompt_tokens": COMPLETION_PROMPT_TOKENS,
        "completion_tokens": count,
        "total_tokens": COMPLETION_PROMPT_TOKENS + count,
    }


def _iter_completion_events(ident, model, count, include_usage, timestamps):
    def chunk(text, finish_reason=None):
        payload = _build_completion(ident, model, text, finish_reason)
        if include_usage:
            payload["usage"] = None
        return format_sse(payload)

    for index in range(count):
        yield chunk(_get_piece(index, timestamps)), "content"

    yield chunk("", "stop"), "tail"
    if include_usage:
        usage_chunk = _build_completion(ident, model, "", None)
        usage_chunk.update(choices=[], usage=get_completion_usage(count))
        yield format_sse(usage_chunk), "tail"

    yield DONE_EVENT, "tail"


# Responses.


async def handle_responses(request):
    """Answer POST /v1/responses, streamed (named events) or not."""
    body = _get_json_body(request)
    _check_response_stream_options(body)
    number = _next_number(request)
    model = _get_model(body)
    count = _get_int_header(request, "x-fake-chunks", DEFAULT_CHUNKS)
    if body.get("stream") is True:
        timestamps = _has_flag(request, "x-fake-timestamps")
        events = _iter_response_events(number, model, count, timestamps)
        return await send_stream(request, events)

    item = _build_message(number, "completed", _join_pieces(count))
    payload = _build_response(number, model, "completed", [item], count)
    return await send_json(request, payload)


def _check_response_stream_options(body):
    # The Responses API takes only include_obfuscation here and rejects the
    # chat-style include_usage, which proxies are tempted to inject.
    options = body.get("stream_options")
    if options is None:
        return

    name = "stream_options"
    if isinstance(options, dict):
        unknown = sorted(set(options) - {"include_obfuscation"})
        if not unknown:
            return
        name = f"stream_options.{unknown[0]}"

    message = f"Unknown parameter: '{name}'."
    raise ApiError(
        400, message, "invalid_request_error", "stream_options", "unknown_parameter"
    )


def _build_response(number, model, status, output, count):
    now = int(time.time())
    return {
        "id": f"resp_{number}",
        "object": "response",
        "created_at": now,
        "completed_at": now if status == "completed" else None,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": get_response_usage(count) if status == "completed" else None,
        "user": None,
        "metadata": {},
    }


def get_response_usage(count):
    """Return the Responses usage object for an answer of ``count`` pieces."""
    return {
        "input_tokens": RESPONSE_INPUT_TOKENS,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": count,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": RESPONSE_INPUT_TOKENS + count,
    }


def _build_message(number, status, text=None):
    content = [] if text is None else [_build_text_part(text)]
    return {
        "type": "message",
        "id": f"msg_{number}",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _build_text_part(text):
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _iter_response_events(number, model, count, timestamps):
    sequence = itertools.count()
    where = {"item_id": f"msg_{number}", "output_index": 0, "content_index": 0}
    yield from _iter_response_head(sequence, number, model, where)
    pieces = []
    for index in range(count):
        pieces.append(_get_piece(index, timestamps))
        fields = {**where, "delta": pieces[-1], "logprobs": []}
        yield _make_event(sequence, "response.output_text.delta", fields), "content"

    yield from _iter_response_tail(sequence, number, model, where, pieces)


def _make_event(sequence, kind, fields):
    payload = {"type": kind, "sequence_number": next(sequence), **fields}
    return format_sse(payload, event=kind)


def _iter_response_head(sequence, number, model, where):
    pending = _build_response(number, model, "in_progress", [], 0)
    item = _build_message(number, "in_progress")
    heads = (
        ("response.created", {"response": pending}),
        ("response.in_progress", {"response": pending}),
        ("response.output_item.added", {"output_index": 0, "item": item}),
        ("response.content_part.added", {**where, "part": _build_text_part("")}),
    )
    for kind, fields in heads:
        yield _make_event(sequence, kind, fields), "head"


def _iter_response_tail(sequence, number, model, where, pieces):
    text = "".join(pieces)
    item = _build_message(number, "completed", text)
    done = _build_response(number, model, "completed", [item], len(pieces))
    tails = (
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": _build_text_part(text)}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        ("response.completed", {"response": done}),
    )
    for kind, fields in tails:
        yield _make_event(sequence, kind, fields), "tail"


# Embeddings.


async def handle_embeddings(request):
    """Answer POST /v1/embeddings with one vector per input item."""
    body = _get_json_body(request)
    items = count_inputs(body.get("input"))
    if items == 0:
        message = "'input' is a required property and must not be empty."
        raise ApiError(400, message, "invalid_request_error", "input")

    dimensions = body.get("dimensions")
    if not isinstance(dimensions, int) or not 0 < dimensions <= 4096:
        dimensions = EMBEDDING_DIMENSIONS

    as_base64 = body.get("encoding_format") == "base64"
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": _make_vector(index, dimensions, as_base64),
        }
        for index in range(items)
    ]
    tokens = items * EMBEDDING_TOKENS_PER_INPUT
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    model = _get_model(body, "text-embedding-3-small")
    return await send_json(
        request, {"object": "list", "data": data, "model": model, "usage": usage}
    )


def count_inputs(value):
    """Return how many embeddings an ``input`` asks for (a token list counts once)."""
    if isinstance(value, str):
        return 1

    if not isinstance(value, list) or not value:
        return 0

    return 1 if all(isinstance(item, int) for item in value) else len(value)


def get_vector(index, dimensions):
    """Return the vector of input ``index``, exact in float32 (base64 round-trips)."""
    return [index + (position + 1) / 8 for position in range(dimensions)]


def _make_vector(index, dimensions, as_base64):
    vector = get_vector(index, dimensions)
    if not as_base64:
        return vector

    return base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode("ascii")


# Audio.


async def handle_speech(request):
    """Answer POST /v1/audio/speech with chunked fake MP3 bytes (or SSE)."""
    body = _get_json_body(request)
    if body.get("stream_format") == "sse":
        count = _get_int_header(request, "x-fake-chunks", DEFAULT_CHUNKS)
        return await send_stream(request, _iter_speech_events(count))

    size = _get_int_header(request, "x-fake-audio-bytes", AUDIO_BYTES)
    content_type = AUDIO_CONTENT_TYPES.get(body.get("response_format"), "audio/mpeg")
    return await send_stream(request, _iter_audio_chunks(size), content_type)


def make_audio(size):
    """Return ``size`` deterministic bytes that start with an ID3 tag."""
    pattern = bytes(range(256))
    return (b"ID3" + pattern * (size // len(pattern) + 1))[:size]


def _iter_audio_chunks(size):
    audio = make_audio(size)
    for start in range(0, size, AUDIO_CHUNK_BYTES):
        yield audio[start : start + AUDIO_CHUNK_BYTES], "content"


def _iter_speech_events(count):
    audio = base64.b64encode(make_audio(AUDIO_CHUNK_BYTES)).decode("ascii")
    for _ in range(count):
        yield format_sse({"type": "speech.audio.delta", "audio": audio}), "content"

    yield format_sse({"type": "speech.audio.done", "usage": SPEECH_SSE_USAGE}), "tail"


async def handle_transcription(request):
    """Answer POST /v1/audio/transcriptions; usage depends on the model."""
    form = await read_audio_form(request)
    model = form["model"]
    if form.get("stream") == "true" and model != "whisper-1":
        count = _get_int_header(request, "x-fake-chunks", DEFAULT_CHUNKS)
        return await send_stream(request, _iter_transcript_events(count))

    if model == "whisper-1":
        usage = {"type": "duration", "seconds": WHISPER_SECONDS}
    else:
        usage = TRANSCRIBE_USAGE

    return await _send_transcript(request, form, usage, "transcribe")


async def handle_translation(request):
    """Answer POST /v1/audio/translations, which never reports usage."""
    form = await read_audio_form(request)
    return await _send_transcript(request, form, None, "translate")


async def _send_transcript(request, form, usage, task):
    response_format = form.get("response_format", "json")
    if response_format in ("text", "srt", "vtt"):
        # Plain bodies; srt and vtt get the bare transcript, not real cues.
        text = f"{TRANSCRIPT}\n"
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    payload = {"text": TRANSCRIPT}
    if response_format == "verbose_json":
        payload.update(
            task=task, language="english", duration=WHISPER_SECONDS, segments=[]
        )

    if usage is not None:
        payload["usage"] = usage

    return await send_json(request, payload)


def _iter_transcript_events(count):
    for index in range(count):
        delta = {"type": "transcript.text.delta", "delta": PIECES[index % len(PIECES)]}
        yield format_sse({**delta, "logprobs": []}), "content"

    done = {
        "type": "transcript.text.done",
        "text": TRANSCRIPT,
        "usage": TRANSCRIBE_USAGE,
    }
    yield format_sse(done), "tail"


async def read_audio_form(request):
    """Stream a multipart upload into the record; return its text fields.

    File parts are hashed chunk by chunk, never held whole in memory. Raises
    ApiError (400) unless there is a ``file`` part and a ``model`` field.
    """
    if not request.content_type.startswith("multipart/"):
        message = "Expected a multipart/form-data body with 'file' and 'model'."
        raise ApiError(400, message, "invalid_request_error", "file")

    record = request["record"]
    async for part in await request.multipart():
        if part.filename is None:
            _store_field(record["form"], part.name, await part.text())
        else:
            record["files"].append(await _read_file_part(part))

    await request.read()
    record["body_size"] = request.content.total_bytes
    _check_audio_form(record)
    return record["form"]


def _store_field(form, name, value):
    if name not in form:
        form[name] = value
    elif isinstance(form[name], list):
        form[name].append(value)
    else:
        form[name] = [form[name], value]


async def _read_file_part(part):
    digest = hashlib.sha256()
    size = 0
    while chunk := await part.read_chunk(UPLOAD_CHUNK_BYTES):
        digest.update(chunk)
        size += len(chunk)

    return {
        "field": part.name,
        "filename": part.filename,
        "size": size,
        "sha256": digest.hexdigest(),
    }


def _check_audio_form(record):
    if not any(upload["field"] == "file" for upload in record["files"]):
        message = "Missing required parameter: 'file'."
        raise ApiError(
            400, message, "invalid_request_error", "file", "missing_required_parameter"
        )

    if not isinstance(record["form"].get("model"), str) or not record["form"]["model"]:
        message = "Missing required parameter: 'model'."
        raise ApiError(
            400, message, "invalid_request_error", "model", "missing_required_parameter"
        )


# Models and unknown paths.


async def handle_models(request):
    """Answer GET /v1/models."""
    data = [_build_model(name, created) for name, created in MODELS]
    return await send_json(request, {"object": "list", "data": data})


async def handle_model(request):
    """Answer GET /v1/models/{model}, or 404 model_not_found."""
    name = request.match_info["model"]
    for known, created in MODELS:
        if known == name:
            return await send_json(request, _build_model(known, created))

    message = f"The model `{name}` does not exist or you do not have access to it."
    raise ApiError(404, message, "invalid_request_error", None, "model_not_found")


def _build_model(name, created):
    return {"id": name, "object": "model", "created": created, "owned_by": "system"}


async def handle_unknown(request):
    """Answer any other /v1 path (or method) the way the API does."""
    message = f"Invalid URL ({request.method} {request.path})"
    raise ApiError(404, message, "invalid_request_error")


# Control endpoints for tests.


async def list_requests(request):
    """Return every recorded /v1 request, oldest first."""
    return web.json_response(list(request.app[RECORDS]))


async def reset_requests(request):
    """Forget the recorded requests."""
    cleared = len(request.app[RECORDS])
    request.app[RECORDS].clear()
    return web.json_response({"cleared": cleared})


async def check_health(request):
    """Answer 200 while the server runs."""
    return web.json_response({"status": "ok"})


def create_app(api_key):
    """Build the fake upstream application accepting ``api_key``."""
    app = web.Application(middlewares=[serve_v1], client_max_size=MAX_JSON_BYTES)
    app[API_KEY] = api_key
    app[RECORDS] = collections.deque(maxlen=MAX_RECORDS)
    app[COUNTER] = itertools.count(1)
    app.router.add_post("/v1/chat/completions", handle_chat)
    app.router.add_post("/v1/completions", handle_completions)
    app.router.add_post("/v1/responses", handle_responses)
    app.router.add_post("/v1/embeddings", handle_embeddings)
    app.router.add_post("/v1/audio/speech", handle_speech)
    app.router.add_post("/v1/audio/transcriptions", handle_transcription)
    app.router.add_post("/v1/audio/translations", handle_translation)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/v1/models/{model}", handle_model)
    app.router.add_route("*", "/v1/{tail:.*}", handle_unknown)
    app.router.add_get("/__fake/requests", list_requests)
    app.router.add_post("/__fake/reset", reset_requests)
    app.router.add_get("/__fake/health", check_health)
    return app


async def serve(host, port, api_key):
    """Serve until SIGINT or SIGTERM, after printing ``LISTENING <port>``."""
    stop = _listen_for_stop_signals()
    runner = web.AppRunner(create_app(api_key), access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    print(f"LISTENING {runner.addresses[0][1]}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _listen_for_stop_signals():
    # Installed before LISTENING is printed, so a test may signal at once.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    return stop


def main(argv=None):
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description="Fake OpenAI API upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default="sk-upstream-test")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.api_key))


if __name__ == "__main__":
    main()
