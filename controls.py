"""Classroom controls: budgets, request limits, allowlists, keys that end.

Checks run in this order, cheapest refusal first: in `authenticate`, a
disabled or expired key, a disallowed endpoint and a used-up budget; then
flask-limiter's per-student and global request rates; then the student's
concurrent requests; in the view, the model. Request limits count in
`ratestore` (a SQLite file shared by all workers) unless
RATE_LIMIT_STORAGE_URI names another storage, such as Redis.

config.json is stat-ed on every request, like keys.json, and re-read when it
changed; a bad value is logged once per worker and the last good settings
stay. A keys.json `role` plays no part here: an admin key meets the same
limits, and a teacher who wants more gives that entry its own budgets.
"""

import fnmatch
import logging
import os
from datetime import date, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flask import current_app, g, request
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded
from limits import parse_many

import db
import ratestore  # noqa: F401 (registers the sqlite:// storage scheme)
from budgets import check_budget
from config import (
    ConfigError,
    get_config_path,
    get_data_path,
    get_last_good_path,
    load_settings,
    save_last_good_copy,
)
from errors import Forbidden, RateLimited, error_response
from keys import WatchedFile, is_budget, stat_signature
from slots import get_slots_folder, take_slot

logger = logging.getLogger(__name__)

# Settings a changed config.json applies at once; the others need a restart.
RELOADED = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "UPSTREAM_TIMEOUT",
    "UPSTREAM_CONNECT_TIMEOUT",
    "MAX_BODY_MB",
    "DAILY_TOKEN_BUDGET",
    "TOTAL_TOKEN_BUDGET",
    "BUDGET_TIMEZONE",
    "RATE_LIMIT_PER_STUDENT",
    "RATE_LIMIT_GLOBAL",
    "MAX_CONCURRENT_PER_STUDENT",
    "ALLOWED_ENDPOINTS",
    "ALLOWED_MODELS",
    "DEFAULT_MODEL",
)
MAX_MODEL_NAME_BYTES = 256
COPY_CHUNK_BYTES = 64 * 1024


def init_app(app, overrides=None):
    """Check the control settings and install the checks; raise ConfigError."""
    check_settings(app.config)
    db.use_budget_timezone(app.config["USAGE_DB"], app.config["BUDGET_TIMEZONE"])
    app.extensions["settings_watcher"] = SettingsWatcher(app, overrides)

    app.after_request(_finish_request)
    app.extensions["limiter"] = _init_limiter(app)
    app.after_request(_remember_retry_after)
    app.before_request(_hold_slot)
    app.register_error_handler(RateLimitExceeded, _answer_rate_limited)


def check_settings(settings):
    """Raise ConfigError naming the first control setting that is wrong."""
    for name in ("DAILY_TOKEN_BUDGET", "TOTAL_TOKEN_BUDGET"):
        if not is_budget(settings[name]):
            raise ConfigError(f"{name} must be a whole number >= 0, or null")

    try:
        ZoneInfo(settings["BUDGET_TIMEZONE"])
    except (ZoneInfoNotFoundError, TypeError, ValueError) as error:
        raise ConfigError(
            'BUDGET_TIMEZONE must be an IANA time zone such as "Europe/Paris", '
            f"not {settings['BUDGET_TIMEZONE']!r}"
        ) from error

    for name in ("RATE_LIMIT_PER_STUDENT", "RATE_LIMIT_GLOBAL"):
        _check_rate(name, settings[name])

    concurrent = settings["MAX_CONCURRENT_PER_STUDENT"]
    if concurrent is not None and not (is_budget(concurrent) and concurrent > 0):
        raise ConfigError(
            "MAX_CONCURRENT_PER_STUDENT must be a whole number > 0, or null"
        )

    for name in ("ALLOWED_ENDPOINTS", "ALLOWED_MODELS"):
        value = settings[name]
        if value is not None and not (
            isinstance(value, list) and all(isinstance(v, str) and v for v in value)
        ):
            raise ConfigError(f"{name} must be a list of names, or null")

    if settings["DEFAULT_MODEL"] is not None and not isinstance(
        settings["DEFAULT_MODEL"], str
    ):
        raise ConfigError("DEFAULT_MODEL must be a model name, or null")

    default, allowed = settings["DEFAULT_MODEL"], settings["ALLOWED_MODELS"]
    if (
        default is not None
        and allowed is not None
        and not _is_allowed(default, allowed)
    ):
        raise ConfigError(f"DEFAULT_MODEL {default!r} is not in ALLOWED_MODELS")


def _check_rate(name, value):
    if value is None:
        return

    try:
        limits = parse_many(value)
    except (ValueError, TypeError) as error:
        raise ConfigError(
            f'{name} must read like "60/minute" or "60/minute;1000/day", not {value!r}'
        ) from error

    if any(limit.amount < 1 for limit in limits):
        raise ConfigError(f"{name} of 0 would refuse every request; use null for none")


class SettingsWatcher(WatchedFile):
    """config.json, re-read when its stat changes; a bad file keeps the last good."""

    def __init__(self, app, overrides):
        path = get_config_path()
        super().__init__(path, stat_signature(path))
        self.app = app
        self.overrides = overrides
        save_last_good_copy(path)

    def _reload(self, signature):
        self._apply(removed=signature is None)
        self._signature = signature

    def _apply(self, removed):
        if removed:
            # Likely a slip (or an editor's save dance): switching budgets and
            # allowlists off because a file vanished would lose the class's
            # limits without a word.
            logger.warning(
                "%s was removed: keeping the current settings; restart the proxy "
                "to run from environment variables only",
                self.path,
            )
            return

        try:
            settings = self._load(self.path)
            save_last_good_copy(self.path)
            source = self.path
        except ConfigError as error:
            settings = self._load_last_good(error)
            if settings is None:
                return

            source = get_last_good_path(self.path)

        self._use(settings, source)

    def _load(self, path):
        settings = load_settings(
            overrides=self.overrides, environ={**os.environ, "PROXY_CONFIG": str(path)}
        )
        check_settings(settings)
        return settings

    def _load_last_good(self, error):
        # Every worker, even one started after the bad save, falls back to
        # the same file: the last config.json that any of them could use.
        try:
            settings = self._load(get_last_good_path(self.path))
        except ConfigError:
            logger.error("keeping the previous settings: %s", error)
            return None

        logger.error("keeping the last good settings: %s", error)
        return settings

    def _use(self, settings, source):
        if settings["BUDGET_TIMEZONE"] != self.app.config["BUDGET_TIMEZONE"]:
            db.use_budget_timezone(
                self.app.config["USAGE_DB"], settings["BUDGET_TIMEZONE"]
            )

        changed = [n for n in settings if settings[n] != self.app.config.get(n)]
        self.app.config.update({n: settings[n] for n in RELOADED})
        self.app.config["MAX_CONTENT_LENGTH"] = int(
            settings["MAX_BODY_MB"] * 1024 * 1024
        )
        waiting = sorted(set(changed) - set(RELOADED))
        logger.info("applied settings path=%s changed=%s", source, ",".join(changed))
        if waiting:
            logger.warning("restart the proxy to apply: %s", ", ".join(waiting))


def check_student(student, path):
    """Refuse an expired key, a disallowed endpoint or a used-up budget.

    Only API calls are refused: a student over budget, expired or rate
    limited can still read their usage page, which is when they need it.
    """
    settings = current_app.config
    current_app.extensions["settings_watcher"].refresh()
    if not is_api_call(path):
        return

    _check_expiry(student, settings["BUDGET_TIMEZONE"])
    _check_endpoint(path.removeprefix("/v1/"), settings["ALLOWED_ENDPOINTS"])
    check_budget(student, settings["USAGE_DB"], settings)


def is_api_call(path):
    """Tell whether a path is forwarded upstream (and so limited and metered)."""
    return path.startswith("/v1/")


def is_expired(student, zone_name):
    """Tell whether the student's key is past its `expires` day in `zone_name`."""
    expires = student.entry.get("expires")
    today = datetime.now(ZoneInfo(zone_name)).date()
    return expires is not None and today > date.fromisoformat(expires)


def _check_expiry(student, zone_name):
    if is_expired(student, zone_name):
        expires = student.entry["expires"]
        raise Forbidden(
            f"Your key expired at the end of {expires} ({zone_name}). Ask your "
            "teacher for a new key or a later end date.",
            code="key_expired",
        )


def _check_endpoint(subpath, allowed):
    if allowed is None:
        return

    names = [name.strip("/").removeprefix("v1/") for name in allowed]
    if not any(subpath == name or subpath.startswith(name + "/") for name in names):
        raise Forbidden(
            f"This proxy does not forward /v1/{subpath}. Allowed endpoints: "
            f"{', '.join('/v1/' + name for name in names) or 'none'}.",
            code="endpoint_not_allowed",
        )


def apply_model_rules(payload):
    """Check a JSON body's model and fill in DEFAULT_MODEL; return True if changed."""
    if not isinstance(payload, dict):
        return False

    default = current_app.config["DEFAULT_MODEL"]
    changed = "model" not in payload and default is not None
    if changed:
        payload["model"] = default

    check_model(payload.get("model"))
    return changed


def _is_allowed(model, patterns):
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns)


def check_model(model):
    """Refuse a model outside ALLOWED_MODELS; a request naming none passes."""
    allowed = current_app.config["ALLOWED_MODELS"]
    if allowed is None or model is None:
        return

    if not isinstance(model, str) or not _is_allowed(model, allowed):
        raise Forbidden(
            f"The model {model!r} is not allowed on this proxy. Allowed models: "
            f"{', '.join(allowed) or 'none'}.",
            code="model_not_allowed",
            param="model",
        )


def _init_limiter(app):
    storage_uri = app.config["RATE_LIMIT_STORAGE_URI"] or (
        "sqlite://" + str(get_data_path(app.config, "ratelimits.sqlite"))
    )
    limiter = Limiter(
        key_func=_get_student_key,
        application_limits=[
            _build_limit("RATE_LIMIT_PER_STUDENT", _get_student_key, "student"),
            _build_limit("RATE_LIMIT_GLOBAL", lambda: "everyone", "global"),
        ],
        strategy="fixed-window",
        storage_uri=storage_uri,
        headers_enabled=True,
    )
    limiter.init_app(app)
    return limiter


def _build_limit(name, key_function, scope):
    return ApplicationLimit(
        lambda: current_app.config[name] or "1/second",
        key_function=key_function,
        scope=scope,
        exempt_when=lambda: (
            g.get("student") is None
            or current_app.config[name] is None
            or not is_api_call(request.path)
        ),
    )


def _get_student_key():
    student = g.get("student")
    return student.fingerprint if student is not None else "-"


def _answer_rate_limited(error):
    g.rate_limited = True
    limit = error.limit.limit
    who = "for everyone together" if error.limit.scope == "global" else "per student"
    return error_response(
        RateLimited(
            f"Rate limit reached: this proxy allows {limit} requests {who}. Wait "
            "for the time in the Retry-After header, then try again."
        )
    )


def _hold_slot():
    # Runs after flask-limiter's check, so a refused request holds no slot.
    student, most = g.get("student"), current_app.config["MAX_CONCURRENT_PER_STUDENT"]
    if student is None or most is None or not is_api_call(request.path):
        return

    owner = "request-" + student.fingerprint.removeprefix("sha256:")[:32]
    slot = take_slot(get_slots_folder(current_app.config["DATA_DIR"]), owner, most)
    if slot is None:
        g.refused_slot = True
        raise RateLimited(
            f"You already have {most} requests running, the most this proxy allows "
            "at once. Wait for one to finish, then try again.",
            headers={"Retry-After": "1"},
        )

    g.slot = slot


def _remember_retry_after(response):
    # Runs just before flask-limiter's after_request, which sets Retry-After
    # on every response; _finish_request puts back what was there.
    g.retry_after = response.headers.get("Retry-After")
    return response


def _finish_request(response):
    # Registered before flask-limiter's own after_request, so it runs after it.
    if g.get("refused_slot"):
        response.headers["Retry-After"] = "1"
    elif not g.get("rate_limited") and "retry_after" in g:
        response.headers.pop("Retry-After", None)
        if g.retry_after is not None:
            response.headers["Retry-After"] = g.retry_after

    if g.get("slot") is not None:
        # Released once the answer has been sent, or the client went away.
        response.call_on_close(g.pop("slot").release)

    return response
