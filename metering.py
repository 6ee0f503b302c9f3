"""Reading token usage out of upstream answers, whole or streamed.

Streams are handled as server-sent events: bytes are cut at the blank line
that ends each event and only whole events are parsed, so an event split
across network reads, or a UTF-8 character split across chunks, is
reassembled before anyone decodes it.
"""

import json
import logging
import re

logger = logging.getLogger(__name__)

# Streamed endpoints where the upstream sends usage only when asked with
# stream_options.include_usage. Every other endpoint rejects that option.
USAGE_OPTION_ENDPOINTS = frozenset({"chat/completions", "completions"})

# Stream events whose payload carries the final usage of the request.
TERMINAL_EVENT_TYPES = frozenset(
    {
        "response.completed",
        "response.incomplete",
        "response.failed",
        "transcript.text.done",
        "speech.audio.done",
        "image_generation.completed",
        "image_edit.completed",
    }
)

EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# A "usage" key with a value other than null. With include_usage every chat
# chunk carries "usage":null; only the events this finds are worth parsing.
USAGE_VALUE = re.compile(rb'"usage"\s*:(?!\s*null\b)')

# A non-streamed JSON answer larger than this is relayed but not metered.
MAX_METERED_BODY = 64 * 1024 * 1024


def ask_for_stream_usage(endpoint, payload):
    """Add stream_options.include_usage where needed; return True if added.

    The caller strips the extra usage-only chunk from what the student
    receives when this returns True, so their stream is the one they asked for.
    """
    if endpoint not in USAGE_OPTION_ENDPOINTS or payload.get("stream") is not True:
        return False

    options = payload.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict) or options.get("include_usage"):
        return False

    payload["stream_options"] = {**options, "include_usage": True}
    return True


class EventSplitter:
    """Cut a byte stream into whole server-sent events."""

    def __init__(self):
        self._buffer = b""

    def feed(self, data):
        """Return the whole events completed by `data`, each with its blank line."""
        self._buffer += data
        events = []
        start = 0
        while match := EVENT_END.search(self._buffer, start):
            events.append(self._buffer[start : match.end()])
            start = match.end()

        self._buffer = self._buffer[start:]
        return events

    def rest(self):
        """Return what is left after the last whole event (a cut stream)."""
        rest, self._buffer = self._buffer, b""
        return rest


def event_data(event):
    """Return the joined `data:` lines of one event, as bytes."""
    lines = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)

    return b"\n".join(lines)


class Meter:
    """What one request used, filled in while its answer passes through."""

    def __init__(self, strip_usage_chunk=False):
        self.strip_usage_chunk = strip_usage_chunk
        self.prompt_tokens = None
        self.completion_tokens = None
        self.total_tokens = None
        self.audio_seconds = None
        self.model = None
        self.streamed = False
        self.partial = False
        self.events = 0

    def read_usage(self, usage):
        """Record a usage object of any endpoint's shape."""
        if not isinstance(usage, dict):
            return

        if usage.get("type") == "duration":
            self.audio_seconds = _number(usage.get("seconds"))
            return

        prompt = _number(usage.get("prompt_tokens", usage.get("input_tokens")))
        completion = _number(usage.get("completion_tokens", usage.get("output_tokens")))
        total = _number(usage.get("total_tokens"))
        if total is None and prompt is not None:
            total = prompt + (completion or 0)

        self.prompt_tokens = prompt
        self.completion_tokens = completion if completion is not None else 0
        self.total_tokens = total

    def estimate_cut_stream(self, request_bytes):
        """Fill in estimated tokens for a stream cut before its usage came.

        A student who stops every stream just before the end must not escape
        their budget: about one token per event came back, and a prompt costs
        about one token per four bytes. Returns True if it estimated.
        """
        if not (self.streamed and self.partial) or self.total_tokens is not None:
            return False

        self.prompt_tokens = request_bytes // 4
        self.completion_tokens = self.events
        self.total_tokens = self.prompt_tokens + self.completion_tokens
        return True

    def read_body(self, body):
        """Record usage from a whole JSON answer."""
        try:
            answer = json.loads(body)
        except ValueError:
            return

        if isinstance(answer, dict):
            self.model = (
                answer.get("model") if isinstance(answer.get("model"), str) else None
            )
            self.read_usage(answer.get("usage"))

    def read_event(self, event):
        """Record usage from one stream event; return False to hold it back."""
        self.events += 1
        if b"usage" not in event or not USAGE_VALUE.search(event):
            return True

        try:
            payload = json.loads(event_data(event))
        except ValueError:
            return True

        if not isinstance(payload, dict):
            return True

        if payload.get("type") in TERMINAL_EVENT_TYPES:
            self._read_terminal_event(payload)
            return True

        if payload.get("usage") is None:
            return True

        self.read_usage(payload["usage"])
        # The usage-only chunk (`choices: []`) the proxy asked for itself.
        return not (self.strip_usage_chunk and payload.get("choices") == [])

    def _read_terminal_event(self, payload):
        response = payload.get("response")
        if isinstance(response, dict):
            self.read_usage(response.get("usage"))
        else:
            self.read_usage(payload.get("usage"))


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None

    return value
