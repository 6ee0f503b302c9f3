"""Settings: defaults, then config.json, then environment variables.

Every setting is spelled once, in DEFAULTS. The file keeps the Node proxy's
shape (`{"OPENAI_API_KEY": "sk-..."}`) so an old config.json still works; an
environment variable of the same name wins over the file, which lets a
teacher start the proxy with no file at all.
"""

import json
import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent

DEFAULTS = {
    "OPENAI_API_KEY": None,
    "OPENAI_BASE_URL": "https://api.openai.com/v1",
    # Seconds to wait for the upstream's next byte (not for a whole stream).
    "UPSTREAM_TIMEOUT": 600.0,
    "UPSTREAM_CONNECT_TIMEOUT": 10.0,
    # Folder for keys.json, usage.sqlite, access.log and temp-uploads/;
    # a relative path is taken from the project folder.
    "DATA_DIR": str(PROJECT_DIR),
    "MAX_BODY_MB": 50,
    # "*" for any origin, or a list of origins such as ["https://x.edu"].
    "CORS_ORIGINS": "*",
    # How many reverse proxies in front of us set X-Forwarded-For; 0 trusts none.
    "TRUSTED_PROXIES": 0,
    "ACCESS_LOG_MAX_MB": 100,
    "ACCESS_LOG_BACKUPS": 5,
    # Teacher keys that may read the whole class's usage, besides keys.json
    # entries with "role": "admin". They are not API keys: /v1/ refuses them.
    "ADMIN_KEYS": [],
    # Classroom controls (controls.py). Token budgets: null means unlimited;
    # a student's keys.json entry may override them.
    "DAILY_TOKEN_BUDGET": None,
    "TOTAL_TOKEN_BUDGET": None,
    # IANA zone whose midnight starts a new budget day, e.g. "Europe/Paris".
    "BUDGET_TIMEZONE": "UTC",
    # flask-limiter limit strings ("60/minute;1000/day"); null means no limit.
    "RATE_LIMIT_PER_STUDENT": "60/minute",
    "RATE_LIMIT_GLOBAL": None,
    "MAX_CONCURRENT_PER_STUDENT": 10,
    # Where request counts live; null is a SQLite file in DATA_DIR, shared by
    # every worker on this machine. Several machines: "redis://host:6379".
    "RATE_LIMIT_STORAGE_URI": None,
    # Allowed endpoints ("chat/completions") and models ("gpt-4o-mini*");
    # null allows all. DEFAULT_MODEL fills JSON requests that name none.
    "ALLOWED_ENDPOINTS": None,
    "ALLOWED_MODELS": None,
    "DEFAULT_MODEL": None,
}

REQUIRED = ("OPENAI_API_KEY",)
# How environment variables spell settings whose default is null.
WHOLE_NUMBER_SETTINGS = ("DAILY_TOKEN_BUDGET", "TOTAL_TOKEN_BUDGET")
LIST_SETTINGS = ("CORS_ORIGINS", "ADMIN_KEYS", "ALLOWED_ENDPOINTS", "ALLOWED_MODELS")
DEFAULTS_EXAMPLE = '{"OPENAI_API_KEY": "sk-..."}'


class ConfigError(Exception):
    """The configuration cannot be used; the message names what to fix."""


def get_config_path(environ=os.environ):
    """Return the config.json path: $PROXY_CONFIG or the project folder's."""
    return Path(environ.get("PROXY_CONFIG") or PROJECT_DIR / "config.json")


def load_settings(overrides=None, environ=os.environ, require_api_key=True):
    """Merge defaults, config.json, the environment and `overrides`, then check.

    The scripts pass require_api_key=False: they only need the data folder.
    """
    settings = dict(DEFAULTS)
    settings.update(_read_config_file(get_config_path(environ)))
    settings.update(_read_environment(environ))
    settings.update(overrides or {})

    _check(settings, REQUIRED if require_api_key else ())
    settings["DATA_DIR"] = str(PROJECT_DIR / Path(settings["DATA_DIR"]).expanduser())
    settings["OPENAI_BASE_URL"] = normalize_base_url(settings["OPENAI_BASE_URL"])
    return settings


def get_last_good_path(config_path):
    """Return where the last usable copy of config.json is kept."""
    return Path(f"{config_path}.last-good")


def save_last_good_copy(config_path):
    """Copy config.json aside if it parses, for workers to fall back to.

    Owner-only, as the file holds the OpenAI key. A missing or broken file
    is left alone.
    """
    try:
        text = Path(config_path).read_text(encoding="utf-8")
        json.loads(text)
    except (OSError, ValueError):
        return

    copy = get_last_good_path(config_path)
    temp = copy.with_name(f".{copy.name}.{os.getpid()}")
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)

    os.replace(temp, copy)


def normalize_base_url(url):
    """Accept a base URL as the openai SDK takes it, with or without `/v1`.

    A bare host (`http://localhost:11434`) gets `/v1`, as OpenAI-compatible
    servers serve it there; a URL with a path (`.../v1`, `.../v1beta/openai`)
    is used as written.
    """
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"OPENAI_BASE_URL must start with http:// or https://: {url}")

    return url if parts.path else url + "/v1"


def get_data_path(settings, name):
    """Return the path of a data file (keys.json, usage.sqlite, ...)."""
    return Path(settings["DATA_DIR"]) / name


def _read_config_file(path):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        logger.info("no config file at %s: using environment variables", path)
        return {}

    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, "
            f"column {error.colno}"
        ) from error

    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a JSON object, like {DEFAULTS_EXAMPLE}")

    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        logger.warning("ignoring unknown settings in %s: %s", path, ", ".join(unknown))

    return {name: values[name] for name in values if name in DEFAULTS}


def _read_environment(environ):
    values = {}
    for name, default in DEFAULTS.items():
        raw = environ.get(name)
        if raw is None or raw == "":
            continue

        values[name] = _parse_env_value(name, raw, default)

    return values


def _parse_env_value(name, raw, default):
    if name in WHOLE_NUMBER_SETTINGS:
        default = 0

    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return type(default)(raw)
        except ValueError as error:
            raise ConfigError(
                f"environment variable {name} must be a number"
            ) from error

    if name in LIST_SETTINGS and raw != "*":
        return _split_list(raw)

    return raw


def _split_list(raw):
    return [item.strip() for item in raw.split(",") if item.strip()]


def _check(settings, required):
    for name in required:
        if not settings.get(name):
            raise ConfigError(
                f"{name} is not set: put it in {get_config_path()} "
                f"({DEFAULTS_EXAMPLE}) or in the environment"
            )

    for name in (
        "UPSTREAM_TIMEOUT",
        "UPSTREAM_CONNECT_TIMEOUT",
        "MAX_BODY_MB",
        "ACCESS_LOG_MAX_MB",
    ):
        if not _is_positive_number(settings[name]):
            raise ConfigError(
                f"{name} must be a positive number, not {settings[name]!r}"
            )

    for name in ("TRUSTED_PROXIES", "ACCESS_LOG_BACKUPS"):
        if not isinstance(settings[name], int) or settings[name] < 0:
            raise ConfigError(f"{name} must be a whole number >= 0")

    origins = settings["CORS_ORIGINS"]
    if origins != "*" and not (
        isinstance(origins, list) and all(isinstance(o, str) for o in origins)
    ):
        raise ConfigError('CORS_ORIGINS must be "*" or a list of origins')

    admin_keys = settings["ADMIN_KEYS"]
    if not isinstance(admin_keys, list) or not all(
        isinstance(key, str) and key.strip() for key in admin_keys
    ):
        raise ConfigError('ADMIN_KEYS must be a list of keys, like ["sk-teacher-..."]')


def _is_positive_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
