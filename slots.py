"""Counted slots shared by every worker process and thread on this machine.

A slot is an exclusive lock on one small file (flock through filelock).
The operating system drops a process's locks when it dies, so a worker
that crashes mid-request cannot keep a slot taken, and no lease or
clean-up is needed. The count is per machine: several machines behind one
address each allow the full number.
"""

from functools import cache
from pathlib import Path

from filelock import FileLock, Timeout

SLOTS_FOLDER_NAME = "slots"


@cache
def get_slots_folder(data_dir):
    """Return the folder of slot lock files inside the data folder, creating it.

    Cached: it is asked for on every request; filelock recreates the folder
    if somebody deletes it while the proxy runs.
    """
    folder = Path(data_dir) / SLOTS_FOLDER_NAME
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def take_slot(folder, owner, capacity):
    """Lock one of `owner`'s `capacity` slots; return the lock, or None if all are taken.

    The caller releases the returned lock (`lock.release()`) from the same thread.
    """
    for number in range(capacity):
        lock = FileLock(Path(folder) / f"{owner}-{number}.lock", thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue

        return lock

    return None
