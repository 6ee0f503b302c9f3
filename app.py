"""The proxy's Flask application: key check, forwarding view, accounting."""

import json
import logging
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from functools import partial

from flask import Flask, Response, current_app, g, jsonify, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

import controls
import db
from accesslog import describe_json_body, hide_keys, init_access_log
from accounting import account
from config import get_data_path, load_settings
from errors import (
    BadRequest,
    Forbidden,
    MissingKey,
    NotFound,
    ProxyError,
    TooLarge,
    UnsupportedMediaType,
    UpstreamError,
    error_body,
    error_response,
)
from forward import (
    build_client_headers,
    build_upstream_headers,
    build_upstream_url,
    relay,
    send_upstream,
)
from keys import KeyRing, find_admin_key, read_presented_key
from metering import Meter, ask_for_stream_usage
from page import register_page
from uploads import MAX_BODY_BYTES as MAX_UPLOAD_BODY_BYTES
from uploads import get_temp_folder, spool_upload, start_sweeper, sweep, upload_slot

logger = logging.getLogger(__name__)

FORWARDED_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
# Paths that need a key: the API we forward, and the usage page's JSON.
KEYED_PREFIXES = ("/v1/", "/api/")
JSON_MIMETYPES = ("application/json",)
# Data files with students' keys, prompts or usage: owner-only.
PRIVATE_DATA_FILES = ("keys.json", "usage.sqlite", "access.log", "temp-uploads")
# Response headers a browser page may read (rate limits, request ids).
EXPOSED_HEADERS = [
    "x-request-id",
    "openai-processing-ms",
    "retry-after",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    # flask-limiter's, for the proxy's own request limits.
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
]


def create_app(config=None):
    """Build the proxy from config.json and the environment, plus `config`."""
    settings = load_settings(overrides=config)
    app = Flask(__name__)
    app.config.update(settings)
    app.config["MAX_CONTENT_LENGTH"] = int(settings["MAX_BODY_MB"] * 1024 * 1024)
    app.config["USAGE_DB"] = str(get_data_path(settings, "usage.sqlite"))

    get_data_path(settings, "").mkdir(parents=True, exist_ok=True)
    keyring = KeyRing(str(get_data_path(settings, "keys.json")))
    keyring.load()
    app.extensions["keyring"] = keyring
    db.init_db(app.config["USAGE_DB"])
    sweep(get_temp_folder(settings["DATA_DIR"]))
    init_access_log(
        get_data_path(settings, "access.log"),
        settings["ACCESS_LOG_MAX_MB"],
        settings["ACCESS_LOG_BACKUPS"],
    )

    _make_private(settings, PRIVATE_DATA_FILES)
    CORS(app, origins=settings["CORS_ORIGINS"], expose_headers=EXPOSED_HEADERS)
    if settings["TRUSTED_PROXIES"]:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings["TRUSTED_PROXIES"])

    _register_handlers(app)
    controls.init_app(app, config)
    _warn_about_unsafe_settings(settings)
    logger.info(
        "proxy ready upstream=%s data=%s",
        settings["OPENAI_BASE_URL"],
        settings["DATA_DIR"],
    )
    return app


def _make_private(settings, names):
    # Files an older version (or a copy) left readable by others.
    for name in names:
        path = get_data_path(settings, name)
        if path.exists():
            path.chmod(0o700 if path.is_dir() else 0o600)


def _register_handlers(app):
    # Werkzeug would answer /v1//host/x with a redirect built from the
    # client's Host header; build_upstream_url refuses the empty segment.
    app.url_map.merge_slashes = False
    app.before_request(authenticate)
    app.after_request(finish_request)
    app.add_url_rule("/health", view_func=health)
    app.add_url_rule("/v1/<path:subpath>", view_func=proxy, methods=FORWARDED_METHODS)
    register_page(app)
    app.register_error_handler(ProxyError, error_response)
    app.register_error_handler(HTTPException, _answer_http_exception)
    app.register_error_handler(Exception, _answer_unexpected_exception)


def _warn_about_unsafe_settings(settings):
    base_url = settings["OPENAI_BASE_URL"]
    is_loopback = base_url.startswith(
        ("http://127.", "http://localhost", "http://[::1]")
    )
    if base_url.startswith("http://") and not is_loopback:
        logger.warning(
            "OPENAI_BASE_URL is plain http: the OpenAI key travels unencrypted"
        )


def health():
    """Answer load balancers and uptime checks; needs no key."""
    return jsonify(status="ok")


def authenticate():
    """Before each request: find the student behind the key, or refuse."""
    g.started = time.monotonic()
    g.student = None
    g.who = "-"
    if request.method == "OPTIONS" or not request.path.startswith(KEYED_PREFIXES):
        return

    keyring = current_app.extensions["keyring"]
    keyring.refresh()
    key = g.presented_key = read_presented_key(request.headers)
    if key is None:
        g.who = "(no key)"
        raise MissingKey(
            "No API key provided. Send your proxy key as 'Authorization: Bearer "
            "KEY' (what the openai SDKs do) or in an 'api-key' header."
        )

    student = keyring.find(key)
    if student is None and request.path.startswith("/api/"):
        student = find_admin_key(key, current_app.config["ADMIN_KEYS"])

    if student is None:
        g.who = "(unknown key)"
        raise MissingKey(
            "This API key is not valid for this proxy. Check it for typos, or ask "
            "your teacher for your key."
        )

    g.student = student
    g.who = f"{student.name} <{student.email}>"
    # A disabled student may still read their own usage, not call the API.
    if student.disabled and request.path.startswith("/v1/"):
        raise Forbidden(
            "Your key is disabled. Ask your teacher to enable it.", code="key_disabled"
        )

    controls.check_student(student, request.path)


def proxy(subpath):
    """Forward one /v1/ request upstream and stream the answer back."""
    settings = current_app.config
    if g.presented_key in subpath:
        raise BadRequest("Your key is in the URL: send it only in a header.")

    url = build_upstream_url(settings["OPENAI_BASE_URL"], subpath, request.query_string)
    meter = Meter()
    with ExitStack() as cleanup:
        body = _read_body(subpath, meter, cleanup)
        g.meter = meter
        upstream = send_upstream(
            request.method,
            url,
            build_upstream_headers(request.headers, settings["OPENAI_API_KEY"]),
            body,
            (settings["UPSTREAM_CONNECT_TIMEOUT"], settings["UPSTREAM_TIMEOUT"]),
        )

    if upstream.status_code == 401:
        upstream.close()
        _refuse_misconfigured_proxy()

    return Response(
        relay(upstream, meter),
        status=upstream.status_code,
        headers=build_client_headers(upstream.headers),
    )


def _read_body(subpath, meter, cleanup):
    """Return the body to send upstream, after checking its type and limits.

    Uploads are spooled to disk; `cleanup` deletes them once sent.
    """
    has_body = request.content_length or request.headers.get("Transfer-Encoding")
    if not has_body:
        return None

    mimetype = request.mimetype
    if mimetype in JSON_MIMETYPES or mimetype.endswith("+json"):
        return _read_json_body(subpath, meter)

    if mimetype == "multipart/form-data":
        return _spool_multipart_body(subpath, cleanup)

    raise UnsupportedMediaType(
        "Send the request body as JSON with 'Content-Type: application/json' "
        f"(this request said {mimetype or 'nothing'!r})."
    )


def _read_json_body(subpath, meter):
    raw = _read_whole_body()
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as error:
        g.body = f'"<invalid JSON, {len(raw)} bytes>"'
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        raise BadRequest(
            f"The request body is not valid JSON ({reason}). Check quotes and commas."
        ) from error

    g.body = describe_json_body(payload)
    if not isinstance(payload, dict):
        return raw

    changed = controls.apply_model_rules(payload)
    g.model = payload.get("model") if isinstance(payload.get("model"), str) else None
    if ask_for_stream_usage(subpath, payload):
        meter.strip_usage_chunk = changed = True

    if changed:
        raw = json.dumps(payload, ensure_ascii=False).encode("utf-8")

    return raw


def _read_whole_body():
    raw = request.get_data(cache=False)
    # Werkzeug cuts a body sent without Content-Length (chunked) at the limit
    # without a word; one more byte from the server's stream tells.
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if len(raw) >= limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()

    return raw


def _spool_multipart_body(subpath, cleanup):
    data_dir = current_app.config["DATA_DIR"]
    folder = get_temp_folder(data_dir)
    start_sweeper(folder)
    cleanup.enter_context(upload_slot(data_dir, g.student.fingerprint))
    # Several files of up to 50 MB each: the JSON limit does not apply here.
    # One byte over, so that spool_upload sees a chunked body that is too
    # long (werkzeug would cut it at the limit without a word).
    request.max_content_length = MAX_UPLOAD_BODY_BYTES + 1
    upload = cleanup.enter_context(
        spool_upload(request.stream, request.mimetype_params, folder, subpath)
    )
    g.body = json.dumps(upload.describe())
    g.model = upload.fields.get("model")
    controls.check_model(g.model)
    return upload.body


def _refuse_misconfigured_proxy():
    logger.error(
        "the upstream refused the proxy's own OPENAI_API_KEY (401): fix it in "
        "config.json; every student request fails until then"
    )
    error = UpstreamError(
        "The proxy is misconfigured: the OpenAI API refused the proxy's own key. "
        "Your key is fine; please tell your teacher.",
        code="proxy_misconfigured",
    )
    error.should_retry = False
    raise error


def finish_request(response):
    """After each request: account for it once the body has been sent."""
    # A student may paste a key into a prompt, a file name or even the URL.
    secrets = (g.get("presented_key"), current_app.config["OPENAI_API_KEY"])
    record = {
        "student": g.get("student"),
        "who": g.get("who", "-"),
        "client": request.remote_addr or "-",
        "method": request.method,
        "path": hide_keys(request.path, *secrets),
        "status": response.status_code,
        "started": g.get("started", time.monotonic()),
        "date": _utc_now(),
        "model": g.get("model"),
        "meter": g.get("meter"),
        "body": hide_keys(g.get("body"), *secrets),
        "usage_db": current_app.config["USAGE_DB"],
        "request_bytes": request.content_length or 0,
    }
    if request.method != "OPTIONS":
        response.call_on_close(partial(account, record))

    return response


def _utc_now():
    now = datetime.now(UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _answer_http_exception(error):
    if error.code == 413:
        limit = current_app.config["MAX_BODY_MB"]
        return error_response(
            TooLarge(f"The request body is over the proxy's {limit} MB limit.")
        )

    if error.code == 404:
        return error_response(
            NotFound(f"No route {request.path} on this proxy: API calls go under /v1/.")
        )

    response = jsonify(error_body(error.description, "invalid_request_error"))
    response.status_code = error.code
    return response


def _answer_unexpected_exception(error):
    logger.exception("unexpected error path=%s", request.path)
    response = jsonify(
        error_body("The proxy hit an internal error. Try again.", "server_error")
    )
    response.status_code = 500
    return response
