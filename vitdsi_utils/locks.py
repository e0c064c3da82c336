"""One process at a time in a run folder: a lock file that a second process waits for, or is refused.

Training writes checkpoints and finished models into a run folder, and decides from what it
finds there whether to train, resume or load. Two processes doing that in the same folder at
once would train the same model twice and overwrite each other's files. So every function that
trains into a folder holds :func:`run_folder_lock` while it works: the folder's ``.lock`` file,
locked with :mod:`filelock` (an OS lock: it is released when the process ends, even by SIGKILL,
so a dead process never leaves the folder locked).

A second process that wants the folder prints one line saying who holds it and waits; when the
first is done it finds the finished model and loads it. How long it waits is
``VITDSI_LOCK_TIMEOUT`` (seconds; unset: as long as it takes; 0: refuse at once) or the
``timeout`` argument; after that it raises :class:`RunFolderBusy`. The lock is re-entrant
within a thread (a study that holds it may call a phase that takes it again), and two threads
of one process contend for it like two processes.

Under a process group (``torchrun``, :mod:`vitdsi_utils.distributed`) the processes of one job
are one run: every process enters the lock at the same point, rank 0 alone takes the OS lock for
all of them (the others wait until it holds it, and raise :class:`RunFolderBusy` with it when it
gives up), and rank 0 releases it only once every process has left the ``with`` block. Were
each process to take the lock itself, the second would wait for the first, which waits for
the second at its next collective: a deadlock.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from vitdsi_utils import distributed, settings

#: The lock file every run folder gets, and the note beside it that names the holder.
LOCK_NAME, OWNER_NAME = ".lock", ".lock.owner.json"

_WAIT = object()  # timeout argument not given: settings.lock_timeout()


class RunFolderBusy(TimeoutError):
    """Another process (or thread) holds the run folder's lock, and the wait for it timed out."""


_held = threading.local()  # per thread: resolved folder -> depth of nested run_folder_lock calls


def _holder(folder: Path) -> str:
    """Who holds ``folder``'s lock, from the note the holder wrote ("pid 123 on host since ..."), or ''."""
    try:
        owner = json.loads((folder / OWNER_NAME).read_text())
        return f"pid {owner['pid']} on {owner['host']}, since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _write_owner(folder: Path) -> None:
    note = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "thread": threading.current_thread().name,
        "command": " ".join(sys.argv)[:500],
    }
    try:
        (folder / OWNER_NAME).write_text(json.dumps(note))
    except OSError:  # the note only improves messages
        pass


@contextmanager
def run_folder_lock(folder: str | os.PathLike, *, timeout: Any = _WAIT) -> Iterator[Path]:
    """Hold ``folder``'s lock (creating the folder) for the ``with`` block; yield the folder.

    ``timeout``: seconds to wait for another holder (None: as long as it takes; 0: not at all);
    default ``VITDSI_LOCK_TIMEOUT``. Raises :class:`RunFolderBusy` when the wait times out.
    Under a process group every process must enter it together; rank 0 holds the lock for all.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    depths: dict[str, int] = _held.__dict__.setdefault("depths", {})
    if depths.get(key):  # this thread holds it already (every process of a group nests alike)
        depths[key] += 1
        try:
            yield folder
        finally:
            depths[key] -= 1
        return
    grouped = distributed.active()
    if grouped and not distributed.is_main():
        refused = distributed.broadcast_object(None)  # rank 0's verdict: None once it holds the lock
        if refused:
            raise RunFolderBusy(refused)
        depths[key] = 1
        try:
            yield folder
        except BaseException:
            depths.pop(key, None)
            raise
        depths.pop(key, None)
        distributed.barrier()  # rank 0 releases the lock once every process is done in the folder
        return
    wait = settings.lock_timeout() if timeout is _WAIT else timeout
    lock = FileLock(folder / LOCK_NAME)
    try:
        _acquire(lock, folder, wait)
    except RunFolderBusy as error:
        if grouped:
            distributed.broadcast_object(str(error))
        raise
    if grouped:
        distributed.broadcast_object(None)
    depths[key] = 1
    _write_owner(folder)
    try:
        yield folder
    except BaseException:
        _release(lock, folder, depths, key)
        raise
    if grouped:
        distributed.barrier()
    _release(lock, folder, depths, key)


def _acquire(lock: FileLock, folder: Path, wait: float | None) -> None:
    """Take ``lock`` at once, or wait ``wait`` seconds for it (None: as long as it takes); RunFolderBusy if not."""
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _holder(folder)
        who = f" ({holder})" if holder else ""
        if wait is not None and wait <= 0:
            raise RunFolderBusy(
                f"{folder} is in use by another run{who}; wait for it to finish, or set "
                f"{settings.LOCK_TIMEOUT_ENV} to the seconds to wait for it (unset: wait as long as it takes)"
            ) from None
        print(
            f"waiting for {folder}: another run is training there{who}"
            + (f"; giving up after {wait:g} s" if wait is not None else ""),
            file=sys.stderr,
            flush=True,
        )
        try:
            lock.acquire(timeout=-1 if wait is None else wait)
        except Timeout:
            raise RunFolderBusy(
                f"{folder} is still in use by another run{who} after waiting {wait:g} s for its lock "
                f"({folder / LOCK_NAME}); wait for it to finish, or raise {settings.LOCK_TIMEOUT_ENV}"
            ) from None


def _release(lock: FileLock, folder: Path, depths: dict[str, int], key: str) -> None:
    depths.pop(key, None)
    try:
        (folder / OWNER_NAME).unlink()
    except OSError:
        pass
    lock.release()
