"""Where the toolkit reads images and writes caches and reports: one place, set by environment."""

from __future__ import annotations

import os
from pathlib import Path

#: A local Imagenette tree in torchvision's ImageFolder layout (``<dir>/{train,val}/<wnid>/*.JPEG``).
IMAGENETTE_ENV = "VITDSI_IMAGENETTE_DIR"


#: A local MS COCO images folder, e.g. ``.../coco/train2017`` (the ``file_name`` of every image
#: in the annotations file is read relative to it).
COCO_IMAGES_ENV = "VITDSI_COCO_IMAGES"


#: The COCO-format instances file that describes those images, e.g. ``.../annotations/instances_train2017.json``.
COCO_ANNOTATIONS_ENV = "VITDSI_COCO_ANNOTATIONS"


#: Where decoded-image caches, downloads and checkpoints go (default: ``<project>/data``).
DATA_ENV = "VITDSI_DATA_DIR"


#: Where tables, figures and executed notebooks go (default: ``<project>/reports``).
REPORTS_ENV = "VITDSI_REPORTS_DIR"


#: Seconds a run waits for another process to leave the run folder it wants (default: as long as it
#: takes; 0: refuse at once). See :mod:`vitdsi_utils.locks`.
LOCK_TIMEOUT_ENV = "VITDSI_LOCK_TIMEOUT"


def project_root() -> Path:
    """The repository root when the package is installed from a checkout, else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def portable_path(path: str | Path) -> str:
    """``path`` relative to the project root when it lies inside it (so a table that names it stays true
    in another checkout), else absolute. :func:`resolve_portable` reads it back."""
    path = Path(path).resolve()
    try:
        return path.relative_to(project_root().resolve()).as_posix()
    except ValueError:
        return str(path)


def resolve_portable(path: str | Path) -> Path:
    """A path written by :func:`portable_path`: relative ones are read against the project root."""
    path = Path(path)
    return path if path.is_absolute() else project_root() / path


def data_dir() -> Path:
    """The data folder (created if missing)."""
    path = Path(os.environ.get(DATA_ENV) or project_root() / "data")
    path.mkdir(parents=True, exist_ok=True)
    return path


def reports_dir() -> Path:
    """The reports folder (created if missing)."""
    path = Path(os.environ.get(REPORTS_ENV) or project_root() / "reports")
    path.mkdir(parents=True, exist_ok=True)
    return path


def imagenette_dir() -> Path | None:
    """The local Imagenette copy named by ``VITDSI_IMAGENETTE_DIR``, or None when unset."""
    value = os.environ.get(IMAGENETTE_ENV)
    return Path(value).expanduser() if value else None


def coco_images_dir() -> Path | None:
    """The COCO images folder named by ``VITDSI_COCO_IMAGES``, or None when unset."""
    value = os.environ.get(COCO_IMAGES_ENV)
    return Path(value).expanduser() if value else None


def coco_annotations_file() -> Path | None:
    """The COCO instances JSON named by ``VITDSI_COCO_ANNOTATIONS``, or None when unset."""
    value = os.environ.get(COCO_ANNOTATIONS_ENV)
    return Path(value).expanduser() if value else None


def lock_timeout() -> float | None:
    """``VITDSI_LOCK_TIMEOUT`` in seconds (>= 0), or None (wait as long as it takes) when unset or empty."""
    value = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0:  # also NaN
        raise ValueError(f"{LOCK_TIMEOUT_ENV} must be a number of seconds >= 0 (0: refuse at once), got {value!r}")
    return seconds
