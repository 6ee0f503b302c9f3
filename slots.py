"""Counted slots shared by every worker process and thread on this machine.

A slot is an exclusive flock on one small file. The operating system drops
a process's locks when it dies, so a worker that crashes mid-request cannot
keep a slot taken, and no lease or clean-up is needed. The count is per
machine: several machines behind one address each allow the full number.

flock is called directly rather than through filelock: a slot is taken on
every API request, and filelock's re-entrancy and fork bookkeeping cost
about 0.3 ms per request there (bench/run.py, W1), for one system call's
work. flock locks belong to an open file, not to a process, so two threads
of one worker exclude each other like two workers do.
"""

import fcntl
import os
from functools import cache
from pathlib import Path

SLOTS_FOLDER_NAME = "slots"


@cache
def get_slots_folder(data_dir):
    """Return the folder of slot lock files inside the data folder, creating it.

    Cached: it is asked for on every request; take_slot recreates the folder
    if somebody deletes it while the proxy runs.
    """
    folder = Path(data_dir) / SLOTS_FOLDER_NAME
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Slot:
    """One taken slot; `release()` frees it (once; later calls do nothing)."""

    def __init__(self, descriptor):
        self._descriptor = descriptor

    def release(self):
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is not None:
            # Closing the file drops its lock.
            os.close(descriptor)


def take_slot(folder, owner, capacity):
    """Lock one of `owner`'s `capacity` slots; return a Slot, or None if all taken."""
    for number in range(capacity):
        descriptor = _open_slot_file(folder, f"{owner}-{number}.lock")
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            continue

        return Slot(descriptor)

    return None


def _open_slot_file(folder, name):
    path = os.path.join(folder, name)
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        return os.open(path, flags, 0o600)
