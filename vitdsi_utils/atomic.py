"""Atomic writes: a reader sees the old file or the new one, never half of one.

Every file the toolkit writes (caches, manifests, checkpoints, tables, figures, reports) goes
through :func:`atomic_path` or :func:`atomic_dir`: the content is written under a hidden
temporary name beside the target (``.<name>.<random>.tmp``) and renamed over the target only
once the writer has returned. If the writer raises (a full disk, Ctrl-C, a bug), the
temporary file is deleted and the previous file, if any, is left as it was. A process killed
with SIGKILL cannot clean up, so it may leave a hidden ``.tmp`` entry behind; no reader of
the toolkit ever opens one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_default_mode(path: Path, directory: bool) -> None:
    """Give ``path`` the mode a plain ``open()`` / ``mkdir()`` would have given it.

    ``mkstemp`` and ``mkdtemp`` create private entries (0600 / 0700) so that nobody can
    tamper with them while they are written; once renamed, they must be as readable as any
    other output, e.g. by colleagues sharing a machine.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _give_default_mode(tmp, directory=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path`` (replacing an old one).

    An existing ``path`` is first renamed to a hidden name and deleted only after the new
    folder is in place, so a crash between the two renames loses no data. If another process
    puts a folder at ``path`` between those renames (two runs building the same cache), its
    folder is kept and ours is discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old: Path | None = None
    try:
        yield tmp
        _give_default_mode(tmp, directory=True)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)  # renaming a folder onto an empty folder is allowed
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.is_dir():  # not the race described above: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically; return the path."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
