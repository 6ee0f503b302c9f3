"""Student keys: the keys.json file, its hot reload and its locked writes.

Keys are looked up by the SHA-256 of the presented key, so a lookup takes
the same path whatever the key's prefix is: no character-by-character
comparison of secrets gives a timing oracle. The same digest, as
`fingerprint()`, identifies a student in usage.sqlite without a copy of
the key.

The proxy stats keys.json on every request (mtime, size and inode, so an
atomic replace is seen too) and reloads it when it changed. A file that
does not parse or validate keeps the last good set in force.
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

from filelock import FileLock

logger = logging.getLogger(__name__)

EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
KEY_PREFIX = "sk-proxy-"
HELP_ADD_KEY = "add students with: python create.py NAME EMAIL"


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
        if entry["key"] in seen:
            raise KeysFileError(f"{source}: entry {number} repeats another entry's key")

        seen.add(entry["key"])

    return entries


def _check_entry(entry, number, source):
    if not isinstance(entry, dict):
        raise KeysFileError(f"{source}: entry {number} is not an object")

    for name in ("key", "name", "email"):
        if not isinstance(entry.get(name), str) or not entry[name].strip():
            raise KeysFileError(f"{source}: entry {number} has no {name!r} text")

    if not isinstance(entry.get("disabled", False), bool):
        raise KeysFileError(f"{source}: entry {number} 'disabled' must be true or false")


def index_students(entries):
    """Return a dict from key fingerprint to Student."""
    students = {}
    for entry in entries:
        student = Student(
            name=entry["name"],
            email=entry["email"],
            fingerprint=fingerprint(entry["key"]),
            disabled=entry.get("disabled", False),
            entry=entry,
        )
        students[student.fingerprint] = student

    return students


class KeyRing:
    """The keys in force, reloaded from keys.json when the file changes."""

    def __init__(self, path):
        self.path = path
        self._students = {}
        self._signature = None
        self._lock = threading.Lock()

    def load(self):
        """Load keys.json at start-up, creating an empty one if missing.

        Raises KeysFileError: at start-up there is no last good set to keep.
        """
        if _create_empty_keys_file(self.path):
            logger.warning("created an empty %s: %s", self.path, HELP_ADD_KEY)

        signature = _stat_signature(self.path)
        self._students = index_students(parse_keys(_read(self.path), self.path))
        self._signature = signature
        if not self._students:
            logger.warning("no keys in %s yet: %s", self.path, HELP_ADD_KEY)

    def refresh(self):
        """Reload keys.json if it changed since the last look; cheap otherwise."""
        signature = _stat_signature(self.path)
        if signature == self._signature:
            return

        with self._lock:
            if signature != self._signature:
                self._reload(signature)

    def find(self, key):
        """Return the Student for a presented key, or None."""
        return self._students.get(fingerprint(key))

    def find_by_fingerprint(self, value):
        """Return the Student whose key has this fingerprint, or None."""
        return self._students.get(value)

    def students(self):
        """Return every Student in force."""
        return list(self._students.values())

    def _reload(self, signature):
        # The signature is stored last: other threads skip the lock once it
        # matches, so it must not match before the new keys are in force.
        try:
            entries = parse_keys(_read(self.path), self.path)
        except (OSError, KeysFileError) as error:
            logger.error("keeping the previous keys: %s", error)
            # Remembered even for a bad file: one bad save, one error line.
            self._signature = signature
            return

        self._students = index_students(entries)
        self._signature = signature
        logger.info("reloaded keys path=%s students=%d", self.path, len(entries))


def _stat_signature(path):
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
