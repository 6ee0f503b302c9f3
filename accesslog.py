"""access.log: one line per request, redacted, rotated across processes.

Rotation is done by concurrent-log-handler, which takes a file lock around
each write and each rollover, so several gunicorn workers share one file
without losing or interleaving lines. accounting.py formats a line per
request and writes them in batches, one write per batch.

Each line has the same fields in the same order. Text that comes from the
client is written as a JSON string, so a newline or quote in it cannot
forge a line or a field. Keys and Authorization values are never passed in.
"""

import json
import logging
import re
import time

from concurrent_log_handler import ConcurrentRotatingFileHandler

logger = logging.getLogger(__name__)

ACCESS_LOGGER_NAME = "proxy.access"

# Strings longer than this that look like base64 (images, audio, files)
# are cut to a short prefix. Base64 may be wrapped in lines but holds no
# spaces, so a long prompt of plain words is not taken for it.
LONG_STRING = 256
KEPT_PREFIX = 32
BASE64_CHARACTERS = re.compile(r"^(data:[\w/+.-]+;base64,)?[A-Za-z0-9+/=_\-\r\n]+$")
MAX_LOGGED_BODY = 4000
# What OpenAI keys and our own (sk-proxy-...) look like.
KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_\-]{16,}")


def init_access_log(path, max_megabytes, backups):
    """Attach the rotating file handler to the access logger and return it."""
    handler = ConcurrentRotatingFileHandler(
        str(path), maxBytes=int(max_megabytes * 1024 * 1024), backupCount=backups
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger = logging.getLogger(ACCESS_LOGGER_NAME)
    for old in list(access_logger.handlers):
        access_logger.removeHandler(old)
        old.close()

    access_logger.addHandler(handler)
    access_logger.setLevel(logging.INFO)
    access_logger.propagate = False
    return access_logger


def redact_payload(value):
    """Return a copy of parsed JSON with base64 payloads cut to a prefix."""
    if isinstance(value, dict):
        return {key: redact_payload(item) for key, item in value.items()}

    if isinstance(value, list):
        return [redact_payload(item) for item in value]

    if isinstance(value, str) and len(value) > LONG_STRING:
        if BASE64_CHARACTERS.match(value[:4096]):
            return f"{value[:KEPT_PREFIX]}...[{len(value)} chars]"

    return value


def describe_json_body(payload):
    """Return the redacted body as one escaped line, cut to a sane length."""
    try:
        redacted = redact_payload(payload)
        text = json.dumps(redacted, ensure_ascii=True, separators=(",", ":"))
    except RecursionError:
        return '"<JSON nested too deeply to log>"'
    if len(text) > MAX_LOGGED_BODY:
        text = f"{text[:MAX_LOGGED_BODY]}...[{len(text)} chars]"

    return text


def hide_keys(text, own_key=None, upstream_key=None):
    """Return logged text without keys a student pasted into a body.

    Their own key reads `[their key]`; the proxy's key and anything shaped
    like a key, `[a key]`. A hand-made key of another shape pasted by
    somebody else is not recognised.
    """
    if not text:
        return text

    if own_key:
        text = text.replace(own_key, "[their key]")

    if upstream_key:
        text = text.replace(upstream_key, "[a key]")

    return KEY_LIKE.sub("[a key]", text)


def format_line(entry):
    """Return the access-log line for a finished request.

    `entry` is a dict with: user, client, method, path, status, ms, model,
    prompt_tokens, completion_tokens, total_tokens, partial, body.
    """
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tokens = "/".join(
        _token_text(entry.get(name))
        for name in ("prompt_tokens", "completion_tokens", "total_tokens")
    )
    return " ".join(
        (
            when,
            f"user={_quote(entry['user'])}",
            f"client={_quote(entry['client'])}",
            f"method={_quote(entry['method'])}",
            f"path={_quote(entry['path'])}",
            f"status={entry['status']}",
            f"ms={entry['ms']}",
            f"model={_quote(entry.get('model') or '-')}",
            f"tokens={tokens}",
            f"partial={'yes' if entry.get('partial') else 'no'}",
            f"body={entry.get('body') or '-'}",
        )
    )


def write_lines(lines):
    """Write request lines to access.log in one write; never raises."""
    if not lines:
        return

    try:
        # One record, so one lock and one write for the whole batch.
        logging.getLogger(ACCESS_LOGGER_NAME).info("\n".join(lines))
    except Exception:  # a full disk must not break the answers already sent
        logger.exception("could not write the access log")


def _quote(text):
    return json.dumps(str(text), ensure_ascii=True)


def _token_text(value):
    return "?" if value is None else str(value)
