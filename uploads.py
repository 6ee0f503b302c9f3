"""Multipart uploads (audio for transcription) go through disk, never RAM.

The body is written to temp-uploads/ as it arrives while werkzeug's
sans-IO multipart decoder reads the same bytes, so the limits (number of
files, size per file, audio formats, the `file` field) are checked on the
way in, without a second pass and without holding a file in memory. The
spooled body is then sent upstream from disk exactly as the client sent it.

A student's uploads in flight are counted with slots.py's locked files, which
a crashed worker cannot keep taken.
"""

import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from werkzeug.sansio.multipart import (
    Data,
    Epilogue,
    Field,
    File,
    MultipartDecoder,
    NeedData,
)

from errors import BadRequest, ProxyError, TooLarge
from slots import get_slots_folder, take_slot

logger = logging.getLogger(__name__)

TEMP_FOLDER_NAME = "temp-uploads"
MAX_FILES = 5
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_UPLOADS_PER_STUDENT = 10
# Text fields (model, prompt, language...) are small; this is all we keep.
MAX_FIELD_BYTES = 64 * 1024
# Room for the multipart framing and text fields around the files.
MAX_BODY_BYTES = MAX_FILES * MAX_FILE_BYTES + 1024 * 1024
AUDIO_ENDPOINTS = frozenset({"audio/transcriptions", "audio/translations"})
AUDIO_EXTENSIONS = frozenset(
    {"mp3", "mp4", "mpeg", "mpga", "m4a", "wav", "webm", "flac", "ogg", "oga"}
)
READ_SIZE = 256 * 1024
SWEEP_EVERY_SECONDS = 5 * 60
STALE_AFTER_SECONDS = 10 * 60


class TooManyUploads(ProxyError):
    """The student already has the most uploads in flight."""

    status = 429
    error_type = "requests"
    code = "too_many_uploads"
    should_retry = True


@dataclass
class UploadedFile:
    """One file part, as much as we keep of it: names and size."""

    field: str
    filename: str
    size: int = 0


@dataclass
class SpooledUpload:
    """A multipart body on disk and what its parts said."""

    path: Path
    size: int = 0
    fields: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    body: object = None

    def describe(self):
        """Return field names and file names and sizes, never contents."""
        files = ",".join(f"{f.field}:{f.filename}({f.size} B)" for f in self.files)
        return f"multipart fields={','.join(self.fields)} files={files}"


def get_temp_folder(data_dir):
    """Return temp-uploads/ inside the data folder, creating it."""
    folder = Path(data_dir) / TEMP_FOLDER_NAME
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def upload_slot(data_dir, student_fingerprint):
    """Hold one of the student's upload slots, or raise TooManyUploads."""
    owner = "upload-" + student_fingerprint.removeprefix("sha256:")[:32]
    slot = take_slot(get_slots_folder(data_dir), owner, MAX_UPLOADS_PER_STUDENT)
    if slot is None:
        raise TooManyUploads(
            f"You already have {MAX_UPLOADS_PER_STUDENT} uploads in progress. Wait "
            "for one to finish, then try again.",
            headers={"Retry-After": "5"},
        )

    try:
        yield
    finally:
        slot.release()


@contextmanager
def spool_upload(stream, content_type_options, folder, endpoint):
    """Write a multipart body to disk while checking it; delete it afterwards.

    Yields a SpooledUpload whose `body` is open for reading. Raises
    BadRequest or TooLarge, having deleted the partial file, when a limit is
    broken; the file is deleted however the request ends (success, upstream
    error, client abort). Files are named after the worker's pid, so the
    master can delete what a crashed worker left (see gunicorn.conf.py).
    """
    boundary = content_type_options.get("boundary", "").encode("latin-1")
    if not boundary:
        raise BadRequest("The multipart body has no boundary in its Content-Type.")

    name = f"{os.getpid()}-{uuid.uuid4().hex}.upload"
    upload = SpooledUpload(path=Path(folder) / name)
    try:
        with open(upload.path, "wb") as spool:
            _copy_and_check(stream, spool, MultipartDecoder(boundary), upload)

        _check_required_parts(upload, endpoint)
        with open(upload.path, "rb") as upload.body:
            # Unlinked while open: the bytes stay readable until sent, and
            # nothing is left behind if the worker dies while sending them.
            upload.path.unlink()
            yield upload
    finally:
        upload.path.unlink(missing_ok=True)


def remove_uploads_of(folder, pid):
    """Delete the uploads a dead worker process was still receiving; never raises."""
    try:
        for path in Path(folder).glob(f"{pid}-*.upload"):
            path.unlink(missing_ok=True)
    except OSError:
        logger.exception("could not delete a dead worker's uploads pid=%s", pid)


def _copy_and_check(stream, spool, decoder, upload):
    reader = _PartReader(upload)
    while chunk := stream.read(READ_SIZE):
        upload.size += len(chunk)
        if upload.size > MAX_BODY_BYTES:
            raise TooLarge(f"The upload is over {MAX_BODY_BYTES // 2**20} MB in all.")

        spool.write(chunk)
        if not reader.finished:  # bytes after the closing boundary are ignored
            decoder.receive_data(chunk)
            reader.drain(decoder)

    if not reader.finished:
        decoder.receive_data(None)
        reader.drain(decoder)

    if not reader.finished:
        raise BadRequest("The multipart body ended early: the upload is incomplete.")


class _PartReader:
    """Follow the decoder's events and enforce the per-part limits."""

    def __init__(self, upload):
        self.upload = upload
        self.current = None
        self.finished = False

    def drain(self, decoder):
        try:
            while not self.finished:
                event = decoder.next_event()
                if isinstance(event, NeedData):
                    break

                self._handle(event)
        except ValueError as error:
            raise BadRequest(f"The multipart body is malformed: {error}.") from error

    def _handle(self, event):
        if isinstance(event, File):
            self._start_file(event)
        elif isinstance(event, Field):
            self.current = event.name
            self.upload.fields[event.name] = b""
        elif isinstance(event, Data):
            self._add_data(event.data)
        elif isinstance(event, Epilogue):
            self.finished = True

    def _start_file(self, event):
        if len(self.upload.files) >= MAX_FILES:
            raise BadRequest(f"At most {MAX_FILES} files can be sent in one request.")

        self.current = UploadedFile(event.name, event.filename or "")
        self.upload.files.append(self.current)

    def _add_data(self, data):
        if isinstance(self.current, UploadedFile):
            self.current.size += len(data)
            if self.current.size > MAX_FILE_BYTES:
                raise TooLarge(
                    f"{self.current.filename!r} is over the "
                    f"{MAX_FILE_BYTES // 2**20} MB limit per file."
                )
            return

        value = self.upload.fields[self.current] + data
        if len(value) > MAX_FIELD_BYTES:
            raise TooLarge(f"The form field {self.current!r} is too long.")

        self.upload.fields[self.current] = value


def _check_required_parts(upload, endpoint):
    upload.fields = {
        name: value.decode("utf-8", "replace") for name, value in upload.fields.items()
    }
    if endpoint not in AUDIO_ENDPOINTS:
        return

    if not any(part.field == "file" for part in upload.files):
        raise BadRequest("Attach the audio as a 'file' field.", param="file")

    for part in upload.files:
        extension = (
            part.filename.rpartition(".")[2].lower() if "." in part.filename else ""
        )
        if extension not in AUDIO_EXTENSIONS:
            raise BadRequest(
                f"{part.filename!r} is not an accepted audio file. Use one of: "
                f"{', '.join(sorted(AUDIO_EXTENSIONS))}.",
                param=part.field,
                code="invalid_file_format",
            )


def sweep(folder, older_than=STALE_AFTER_SECONDS):
    """Delete spooled uploads older than `older_than` seconds; return how many."""
    cutoff = time.time() - older_than
    removed = 0
    for path in Path(folder).glob("*.upload"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue

    if removed:
        logger.info("swept stale uploads folder=%s removed=%d", folder, removed)

    return removed


_sweepers = {}
_sweepers_lock = threading.Lock()


def start_sweeper(folder):
    """Sweep `folder` every few minutes from a daemon thread, once per process."""
    key = (os.getpid(), str(folder))
    with _sweepers_lock:
        if key in _sweepers:
            return

        thread = threading.Thread(
            target=_sweep_forever, args=(folder,), name="upload-sweeper", daemon=True
        )
        _sweepers[key] = thread
        thread.start()


def _sweep_forever(folder):
    while True:
        time.sleep(SWEEP_EVERY_SECONDS)
        try:
            sweep(folder)
        except OSError:
            logger.exception("upload sweep failed folder=%s", folder)
