"""Student keys: the keys.json file, its hot reload and its locked writes.

Keys are looked up by the SHA-256 of the presented key, so a lookup takes
the same path whatever the key's prefix is: no character-by-character
comparison of secrets gives a timing oracle. The same digest, as
`fingerprint()`, identifies a student in usage.sqlite without a copy of
the key.

The proxy stats keys.json on every request (mtime, size and inode, so an
atomic replace is seen too) and reloads it when it changed. A file that
does not parse or validate, or that suddenly lists nobody, leaves the last
good set in force. That set is kept in keys.json.last-good, so every
worker falls back to the same keys, including workers started later.
"""

import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import date

from filelock import FileLock

logger = logging.getLogger(__name__)

EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
KEY_PREFIX = "sk-proxy-"
HELP_ADD_KEY = "add students with: python create.py NAME EMAIL"
ROLES = ("student", "admin")


class KeysFileError(Exception):
    """keys.json cannot be used; the message says where it is wrong."""


@dataclass(frozen=True)
class Student:
    """One keys.json entry; `entry` keeps every field, known or not."""

    name: str
    email: str
    fingerprint: str
    disabled: bool = False
    entry: dict = field(default_factory=dict, compare=False, repr=False)


def fingerprint(key):
    """Return the non-secret identity of a key, as stored in usage.sqlite."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key():
    """Return a new key from the operating system's secure random source."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def is_valid_email(email):
    """Tell whether `email` looks like an e-mail address."""
    return bool(EMAIL_PATTERN.match(email))


def parse_keys(text, source="keys.json"):
    """Parse and validate keys.json text; raise KeysFileError when wrong."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise KeysFileError(
            f"{source} is not valid JSON: {error.msg} at line {error.lineno}"
        ) from error

    if not isinstance(entries, list):
        raise KeysFileError(f"{source} must be a JSON list of entries")

    seen = set()
    for number, entry in enumerate(entries, start=1):
        _check_entry(entry, number, source)
        if entry["key"].strip() in seen:
            raise KeysFileError(f"{source}: entry {number} repeats another entry's key")

        seen.add(entry["key"].strip())

    return entries


def _check_entry(entry, number, source):
    if not isinstance(entry, dict):
        raise KeysFileError(f"{source}: entry {number} is not an object")

    for name in ("key", "name", "email"):
        if not isinstance(entry.get(name), str) or not entry[name].strip():
            raise KeysFileError(f"{source}: entry {number} has no {name!r} text")

    if not isinstance(entry.get("disabled", False), bool):
        raise KeysFileError(
            f"{source}: entry {number} 'disabled' must be true or false"
        )

    if entry.get("role", "student") not in ROLES:
        raise KeysFileError(f"{source}: entry {number} 'role' must be one of {ROLES}")

    for name in ("daily_token_budget", "total_token_budget"):
        if not is_budget(entry.get(name)):
            raise KeysFileError(
                f"{source}: entry {number} {name!r} must be a whole number >= 0 or null"
            )

    if "expires" in entry and not is_day(entry["expires"]):
        raise KeysFileError(f"{source}: entry {number} 'expires' must read YYYY-MM-DD")


def is_budget(value):
    """Tell whether `value` is a token budget: None (unlimited) or an int >= 0."""
    if value is None:
        return True

    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_day(value):
    """Tell whether `value` is a YYYY-MM-DD date."""
    try:
        return date.fromisoformat(value).isoformat() == value
    except (TypeError, ValueError):
        return False


def is_admin(student):
    """Tell whether a Student may read the whole class's usage."""
    return student.entry.get("role") == "admin"


def find_admin_key(key, admin_keys):
    """Return a teacher Student for a key listed in ADMIN_KEYS, or None."""
    wanted = fingerprint(key)
    if wanted not in {fingerprint(admin_key) for admin_key in admin_keys}:
        return None

    return Student(
        name="Teacher",
        email="(ADMIN_KEYS)",
        fingerprint=wanted,
        entry={"role": "admin"},
    )


def index_students(entries):
    """Return a dict from key fingerprint to Student."""
    students = {}
    for entry in entries:
        student = Student(
            name=entry["name"],
            email=entry["email"],
            fingerprint=fingerprint(entry["key"].strip()),
            disabled=entry.get("disabled", False),
            entry=entry,
        )
        students[student.fingerprint] = student

    return students


class WatchedFile:
    """A file re-read when its stat signature changes; cheap when it has not.

    Subclasses define `_reload(signature)`, which must store the signature
    in `self._signature` last: a thread that sees it matching skips the lock,
    so it must not match before the new contents are in force.
    """

    def __init__(self, path, signature=None):
        self.path = path
        self._signature = signature
        self._lock = threading.Lock()

    def refresh(self):
        """Re-read the file if it changed since the last look."""
        signature = stat_signature(self.path)
        if signature == self._signature:
            return

        with self._lock:
            if signature != self._signature:
                self._reload(signature)


class KeyRing(WatchedFile):
    """The keys in force, reloaded from keys.json when the file changes."""

    def __init__(self, path):
        super().__init__(path)
        self._students = {}

    def load(self):
        """Load keys.json at start-up, creating an empty one if missing.

        A broken keys.json falls back to the last good set that any process
        saw; raises KeysFileError when there is none.
        """
        if _create_empty_keys_file(self.path):
            logger.warning("created an empty %s: %s", self.path, HELP_ADD_KEY)

        self._reload(stat_signature(self.path), required=True)
        if not self._students:
            logger.warning("no keys in %s yet: %s", self.path, HELP_ADD_KEY)

    def find(self, key):
        """Return the Student for a presented key, or None."""
        return self._students.get(fingerprint(key))

    def find_by_fingerprint(self, value):
        """Return the Student whose key has this fingerprint, or None."""
        return self._students.get(value)

    def students(self):
        """Return every Student in force."""
        return list(self._students.values())

    def _reload(self, signature, required=False):
        # The signature is stored even for a bad file, so one bad save logs
        # one error instead of one per request.
        try:
            entries = self._read_entries()
            _write_atomically(self.last_good_path, entries)
        except (OSError, KeysFileError) as error:
            entries = self._read_last_good(error, required)
            if entries is not None:
                self._students = index_students(entries)
        else:
            self._students = index_students(entries)
            verb = "loaded" if required else "reloaded"
            logger.info("%s keys path=%s students=%d", verb, self.path, len(entries))

        self._signature = signature

    @property
    def last_good_path(self):
        """Where the last good keys.json is kept, for every worker to share."""
        return f"{self.path}.last-good"

    def _read_entries(self):
        entries = parse_keys(_read(self.path), self.path)
        # Compared with the shared last good set, not this worker's own: a
        # worker that has not served a request yet still holds the set the
        # master loaded at start-up, which may be empty.
        if not entries and (self._students or self._has_last_good_entries()):
            raise KeysFileError(
                f"{self.path} has no entries; to switch everyone off, mark "
                'their entries "disabled": true instead'
            )

        return entries

    def _has_last_good_entries(self):
        try:
            return bool(parse_keys(_read(self.last_good_path), self.last_good_path))
        except (OSError, KeysFileError):
            return False

    def _read_last_good(self, error, required):
        # Every worker falls back to the same file, so all of them agree on
        # who may enter, even those that never saw the last good save.
        try:
            entries = parse_keys(_read(self.last_good_path), self.last_good_path)
        except (OSError, KeysFileError):
            if required:
                raise error from None

            logger.error("keeping the last good keys: %s", error)
            return None

        logger.error("keeping the last good keys (%s): %s", self.last_good_path, error)
        return entries


def stat_signature(path):
    """Return what tells a changed file: mtime, size and inode (None if missing)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None

    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def _read(path):
    with open(path, encoding="utf-8") as file:
        return file.read()


def _create_empty_keys_file(path):
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False

    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write("[]\n")

    return True


def update_keys(path, change):
    """Apply `change(entries)` to keys.json under a lock, then replace it atomically.

    `change` edits the list in place or returns a new one; its return value
    is also returned. Readers never see a half-written file, and concurrent
    writers (several create.py runs) are serialized by the lock file.
    """
    with FileLock(f"{path}.lock", timeout=30):
        _create_empty_keys_file(path)
        entries = parse_keys(_read(path), path)
        result = change(entries)
        _write_atomically(path, entries)

    return result


def _write_atomically(path, entries):
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temp_path = tempfile.mkstemp(prefix=".keys-", dir=folder)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(entries, file, indent=2, ensure_ascii=False)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())

        os.chmod(temp_path, 0o600)
        os.replace(temp_path, path)
    except BaseException:
        os.unlink(temp_path)
        raise


def read_presented_key(headers):
    """Return the key a client sent, from any header we accept, or None.

    Accepted: `Authorization: Bearer KEY` (the openai SDKs), `api-key` (the
    Node proxy) and `x-api-key`.
    """
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()

    for name in ("api-key", "x-api-key"):
        value = headers.get(name, "").strip()
        if value:
            return value

    return None
