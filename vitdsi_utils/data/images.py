"""Image sources -> preprocessed uint8 arrays, cached, with a manifest that names every file and its fate.

A study database is drawn from these images by :mod:`vitdsi_utils.data.database`.

Sources:

* ``imagenette``: the ten Imagenette classes. Read from the folder named by
  ``VITDSI_IMAGENETTE_DIR`` when set; otherwise torchvision downloads the official
  ``imagenette2-160`` archive into ``<data>/raw/``.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits, upsampled to RGB. No download;
  the dataset of smoke runs and tests.
* ``folder``: any ImageFolder tree (``<root>/<class>/<image>``), e.g. a user's own photos.
* ``coco``: MS COCO (or any COCO-format data set): an images folder and its ``instances_*.json``,
  named by ``VITDSI_COCO_IMAGES`` and ``VITDSI_COCO_ANNOTATIONS`` (or ``root=`` and
  ``annotations=``). Never downloaded. Every image carries the *set* of its annotated object
  categories; images without annotations are left out and counted.

Single-label sources give each image one class. Multi-label sources (``coco``) give each image a
set of labels, stored as a boolean matrix ``label_matrix`` (images x categories), plus a
*primary* label: the image's rarest category (fewest usable images in the whole source; ties go
to the lower category index). The primary label stands in for "the class" wherever one is needed:
balancing a database, grouping clustered IDs, galleries. Relevance never uses it: a database image
is relevant to a query when their label sets intersect (for single-label data: the same class).
Rarest rather than most frequent, because on COCO the most frequent category of almost every
photo with people is "person": balancing over it would leave persons out of nearly every other
category's share, while the rarest category spreads co-occurring frequent categories over all
shares and gives rare categories as many images as the data has.

Preprocessing follows the study: keep images whose aspect ratio (width / height) lies in
``aspect_range`` (default [0.9, 1.1]), crop the centre square, resize to ``size`` px, RGB uint8.
Decoded images are cached under ``<data>/cache/`` keyed by the settings and the file list,
so a rerun does not decode JPEGs again.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from vitdsi_utils import settings
from vitdsi_utils.data.coco import coco_paths, missing_coco_message, read_coco_annotations
from vitdsi_utils.data.decode import SIZES, decode_cached, left_out_rows, warn_left_out, warn_upscaled
from vitdsi_utils.data.files import (
    scan_image_folder,
)

SOURCES = ("imagenette", "digits", "folder", "coco")


LABEL_SEPARATOR = ";"  # joins the labels of one image in manifests and caches ("0;3;17")


IMAGENETTE_CLASSES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}


@dataclass
class ImageSet:
    """Every usable image of a source, preprocessed: ``images[i]`` has class ``classes[labels[i]]``.

    For multi-label sources ``label_matrix[i, j]`` says whether image i shows category
    ``classes[j]``, and ``labels[i]`` is its primary label (see :func:`primary_labels`).
    """

    images: np.ndarray  # (M, S, S, 3) uint8
    labels: np.ndarray  # (M,) int64; the primary label of multi-label images
    classes: list[str]
    files: list[str]  # (M,) paths relative to root (or synthetic names)
    source: str
    root: str | None = None
    skipped: list[str] = field(default_factory=list)  # files that cannot be read as images, relative paths
    dropped_aspect: int = 0  # readable images outside the aspect range
    label_matrix: np.ndarray | None = None  # (M, C) bool for multi-label sources, else None
    unannotated: list[str] = field(default_factory=list)  # multi-label sources: images without labels, left out
    #: every file of the source that is not used, one row each: file, class, label (-1: unknown), role
    #: (``skipped``: cannot be read; ``dropped``: outside the aspect range; ``unannotated``) and reason
    left_out: pd.DataFrame = field(default_factory=lambda: left_out_frame([]))
    #: what reports call the data set: the source, or for a folder its folder's name (see :func:`dataset_name`)
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.source
        if self.label_matrix is not None:
            matrix = np.asarray(self.label_matrix, dtype=bool)
            if matrix.shape != (len(self.labels), len(self.classes)):
                raise ValueError(
                    f"label_matrix must be (images, classes) = {(len(self.labels), len(self.classes))}, got {matrix.shape}"
                )
            if len(matrix) and not matrix.any(axis=1).all():
                raise ValueError(
                    "every image of a multi-label set needs at least one label; leave unlabelled images out"
                )
            if not matrix[np.arange(len(matrix)), self.labels].all():
                raise ValueError("an image's primary label must be one of its labels")
            self.label_matrix = matrix

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    @property
    def is_multilabel(self) -> bool:
        """Whether images carry label sets (relevance: at least one shared label) rather than one class."""
        return self.label_matrix is not None

    def class_counts(self) -> pd.Series:
        """Images per class name (per primary label for multi-label sets)."""
        return pd.Series(np.bincount(self.labels, minlength=len(self.classes)), index=self.classes)

    def category_counts(self) -> pd.Series:
        """Images showing each class name: a multi-label image counts once for every label it has."""
        if self.label_matrix is None:
            return self.class_counts()
        return pd.Series(self.label_matrix.sum(axis=0), index=self.classes)

    def summary(self) -> str:
        """One line: usable images, the classes that have any (naming those that have none), and what was left out."""
        counts = self.class_counts()
        empty = counts.index[counts.to_numpy() == 0].tolist()
        held = int((counts > 0).sum())
        kind = (
            ("primary categories" if self.is_multilabel else "classes")
            if held != 1
            else ("primary category" if self.is_multilabel else "class")
        )
        line = f"{len(self)} usable {self.name} images at {self.size} px in {held} {kind}"
        if empty and not self.is_multilabel:
            shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
            line += (
                f" ({len(empty)} of the {len(counts)} class folders {'has' if len(empty) == 1 else 'have'} "
                f"no usable image: {shown}; every file there is unreadable or outside the aspect range)"
            )
        elif self.is_multilabel:
            line += f" ({int((self.category_counts() > 0).sum())} of {len(self.classes)} categories shown)"
        line += f"; {self.dropped_aspect} dropped by the aspect rule, {len(self.skipped)} unreadable"
        if self.is_multilabel:
            line += f", {len(self.unannotated)} left out for having no annotation"
        return line


#: Columns of the table of files a source does not use (``ImageSet.left_out``), as manifests list them.
LEFT_OUT_COLUMNS = ("file", "class", "label", "role", "reason")


def left_out_frame(rows: Sequence[Sequence[Any]]) -> pd.DataFrame:
    """The table of unused files from rows (file, class, label, role, reason); labels stay integers (-1: unknown)."""
    frame = pd.DataFrame(list(rows), columns=list(LEFT_OUT_COLUMNS))
    return frame.astype({"file": object, "class": object, "label": np.int64, "role": object, "reason": object})


def dataset_name(source: str, root: str | os.PathLike | None = None, name: str | None = None) -> str:
    """What reports call a data set: ``name`` when given, else the source; a ``folder`` source is named after its folder.

    A folder whose name is also a source's (``imagenette``, ...) becomes ``folder-<name>``, so a
    folder of one's own images is never labelled as one of the bundled sources. The result is
    safe in file names: characters other than letters, digits, ``.``, ``_`` and ``-`` become ``-``.
    """
    if name is None or not str(name).strip():
        if source == "folder" and root is not None:
            name = Path(root).expanduser().resolve().name or "folder"
            if name in SOURCES:
                name = f"folder-{name}"
        else:
            name = source
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name).strip()).strip("-.")
    if not cleaned:
        raise ValueError(f"dataset name {name!r} has no letter or digit; name it with letters, digits, '.', '_' or '-'")
    return cleaned


def primary_labels(label_matrix: np.ndarray) -> np.ndarray:
    """The primary label (M,) of every row of a boolean (M, C) label matrix: its rarest label.

    Rarity is the number of rows (images) that carry a label; ties go to the lower label.
    Every row needs at least one label.
    """
    matrix = np.asarray(label_matrix, dtype=bool)
    if matrix.ndim != 2:
        raise ValueError(f"label_matrix must be 2-D (images, classes), got shape {matrix.shape}")
    if len(matrix) and not matrix.any(axis=1).all():
        raise ValueError("every image needs at least one label to have a primary label")
    frequency = matrix.sum(axis=0).astype(np.float64)
    cost = np.where(matrix, frequency[None, :], np.inf)
    return cost.argmin(axis=1).astype(np.int64)  # argmin takes the first (lowest) label on ties


def label_matrix_from_sets(label_sets: Sequence[Sequence[int]], n_classes: int) -> np.ndarray:
    """A boolean (M, C) matrix from M label sets of label indices in 0..C-1."""
    matrix = np.zeros((len(label_sets), n_classes), dtype=bool)
    for i, labels in enumerate(label_sets):
        matrix[i, list(labels)] = True
    return matrix


def label_sets_from_matrix(label_matrix: np.ndarray) -> list[tuple[int, ...]]:
    """The label set (sorted tuple of label indices) of every row of a boolean (M, C) matrix."""
    return [tuple(np.flatnonzero(row).tolist()) for row in np.asarray(label_matrix, dtype=bool)]


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------
def _missing_imagenette_message(reason: str) -> str:
    return (
        f"Imagenette images are not available ({reason}). Either set {settings.IMAGENETTE_ENV} to a "
        "local copy in ImageFolder layout (<dir>/train/<wnid>/*.JPEG, <dir>/val/...), or let "
        "torchvision download imagenette2-160 (needs internet; load_images(..., download=True)), "
        "or use source='digits' for a download-free run."
    )


def imagenette_root(download: bool = True, data_dir: Path | None = None) -> Path:
    """The Imagenette folder: ``VITDSI_IMAGENETTE_DIR``, an earlier download, or a new download."""
    local = settings.imagenette_dir()
    if local is not None:
        if not local.is_dir():
            raise FileNotFoundError(_missing_imagenette_message(f"{settings.IMAGENETTE_ENV}={local} is not a folder"))
        return local
    raw = (data_dir or settings.data_dir()) / "raw"
    downloaded = raw / "imagenette2-160"
    if downloaded.is_dir():
        return downloaded
    if not download:
        raise FileNotFoundError(_missing_imagenette_message(f"{settings.IMAGENETTE_ENV} is unset and download=False"))
    from torchvision.datasets import Imagenette

    try:
        Imagenette(str(raw), split="train", size="160px", download=True)
    except Exception as error:  # network errors come in many types; all mean the same here
        raise FileNotFoundError(_missing_imagenette_message(f"download failed: {error}")) from error
    return downloaded


def _load_folder(
    source: str,
    root: Path,
    size: int,
    aspect_range: tuple[float, float],
    cache: bool,
    data_dir: Path | None,
    progress: bool,
    name: str | None = None,
) -> ImageSet:
    scan = scan_image_folder(root)
    listing = pd.DataFrame({"file": scan.files, "label": scan.labels})
    images, table, info = decode_cached(
        source, root, listing, size, aspect_range, cache, data_dir, progress, {"classes": scan.classes}
    )
    classes = list(info["classes"])
    rows = [
        (file, folder, classes.index(folder) if folder in classes else -1, "skipped", reason)
        for file, (folder, reason) in scan.unused.items()
    ]
    rows += left_out_rows(info, dict(zip(scan.files, scan.labels)), classes)
    left_out = left_out_frame(sorted(rows))
    warn_left_out(root, left_out, aspect_range)
    warn_upscaled(info.get("upscaled", {}), len(table), size)
    # classes whose every image was unreadable or out of aspect range keep their label slot,
    # so labels stay comparable across sizes; build_database ignores empty classes
    return ImageSet(
        images=images,
        labels=table["label"].to_numpy(dtype=np.int64),
        classes=classes,
        files=table["file"].tolist(),
        source=source,
        root=str(root),
        skipped=sorted(left_out.loc[left_out["role"] == "skipped", "file"]),
        dropped_aspect=int(info["dropped_aspect"]),
        left_out=left_out,
        name=dataset_name(source, root, name),
    )


def _load_coco(
    root: Path,
    annotations: Path,
    size: int,
    aspect_range: tuple[float, float],
    cache: bool,
    data_dir: Path | None,
    progress: bool,
    name: str | None = None,
) -> ImageSet:

    cache_root = (data_dir or settings.data_dir()) / "cache"
    coco = read_coco_annotations(annotations, cache_root if cache else None)
    if not coco.files:
        raise ValueError(f"{annotations} has no annotated image: nothing to retrieve")
    if not any((root / name).is_file() for name in coco.files[:1000]):
        raise FileNotFoundError(
            missing_coco_message(
                f"none of the first images named in {annotations.name} (e.g. {coco.files[0]}) is in {root}; "
                f"does {settings.COCO_IMAGES_ENV} name the folder that file describes?"
            )
        )
    if coco.unannotated:
        warnings.warn(
            f"left out {len(coco.unannotated)} of {len(coco.files) + len(coco.unannotated)} images of "
            f"{annotations.name}: they have no object annotation, so no query could find them relevant "
            "(manifests list them with role 'unannotated')",
            stacklevel=3,
        )
    listing = pd.DataFrame({"file": coco.files, "labels": [LABEL_SEPARATOR.join(map(str, s)) for s in coco.label_sets]})
    info = {
        "classes": coco.categories,
        "category_ids": coco.category_ids,
        "annotations": str(annotations),
        "unannotated": coco.unannotated,
    }
    images, table, info = decode_cached(
        "coco", root, listing, size, aspect_range, cache, data_dir, progress, info, key_extra=coco.digest()
    )
    label_sets = [tuple(int(t) for t in text.split(LABEL_SEPARATOR)) for text in table["labels"]]
    matrix = label_matrix_from_sets(label_sets, len(info["classes"]))
    # the primary label of a left-out image is not defined (it depends on the usable images), so -1
    rows = left_out_rows(info, {}, info["classes"])
    rows += [
        (file, "", -1, "unannotated", f"no object annotation in {annotations.name}") for file in info["unannotated"]
    ]
    left_out = left_out_frame(sorted(rows))
    warn_left_out(root, left_out, aspect_range)
    warn_upscaled(info.get("upscaled", {}), len(table), size)
    return ImageSet(
        images=images,
        labels=primary_labels(matrix),
        classes=list(info["classes"]),
        files=table["file"].tolist(),
        source="coco",
        root=str(root),
        skipped=list(info["skipped"]),
        dropped_aspect=int(info["dropped_aspect"]),
        label_matrix=matrix,
        unannotated=list(info["unannotated"]),
        left_out=left_out,
        name=dataset_name("coco", root, name),
    )


def _load_digits(size: int, progress: bool, name: str | None = None) -> ImageSet:
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (1797, 8, 8), ink is bright
    images = np.stack(
        [
            np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BILINEAR).convert("RGB"))
            for g in tqdm(grey, desc=f"digits @{size}px", disable=not progress, unit="img")
        ]
    )
    return ImageSet(
        images=images,
        labels=digits.target.astype(np.int64),
        classes=[str(d) for d in range(10)],
        files=[f"digits/{i:04d}" for i in range(len(grey))],
        source="digits",
        name=dataset_name("digits", None, name),
    )


def check_dataset(
    source: str, root: str | os.PathLike | None = None, annotations: str | os.PathLike | None = None
) -> tuple[str | None, str | None]:
    """Check that ``source`` can be read with ``root`` / ``annotations``; return both as absolute paths (or None).

    Catches before any work starts what :func:`load_images` would fail on: an unknown source, a
    ``folder`` without its root, a root or annotations file that does not exist, COCO without its
    two paths (from the arguments or the environment), or paths given to a source that reads none
    (``digits``). The messages name the command-line options and the profile keys.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown dataset source {source!r}; choose one of {SOURCES}")
    given = {"--root (DATASET_ROOT)": root, "--annotations (DATASET_ANNOTATIONS)": annotations}
    if source == "digits":
        named = [option for option, value in given.items() if value is not None]
        if named:
            raise ValueError(
                f"the digits source is bundled with scikit-learn and reads no files; drop {' and '.join(named)}"
            )
        return None, None
    if source in ("folder", "imagenette") and annotations is not None:
        raise ValueError(f"--annotations (DATASET_ANNOTATIONS) belongs to the coco source, not {source}; drop it")
    if source == "folder" and root is None:
        raise ValueError(
            "the folder source needs its images: --root PATH on the command line (DATASET_ROOT in a profile), "
            "an ImageFolder tree <root>/<class>/<image>"
        )
    if source == "coco":
        images_dir, annotations_file = coco_paths(root, annotations)  # raises, naming what is missing
        return (
            str(images_dir.resolve()) if root is not None else None,
            str(annotations_file.resolve()) if annotations is not None else None,
        )
    if root is None:
        return None, None
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"the image folder {folder} (--root, DATASET_ROOT) does not exist or is not a folder")
    return str(folder.resolve()), None


def load_images(
    source: str = "imagenette",
    size: int = 160,
    *,
    root: str | os.PathLike | None = None,
    annotations: str | os.PathLike | None = None,
    aspect_range: tuple[float, float] = (0.9, 1.1),
    download: bool = True,
    cache: bool = True,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    name: str | None = None,
) -> ImageSet:
    """Load every usable image of ``source`` at ``size`` px; see the module docstring.

    ``root`` is the folder of a ``folder`` source, a local Imagenette copy, or the COCO images
    folder; ``annotations`` is the COCO instances JSON (both default to the environment).
    ``name`` is what reports call the data (``ImageSet.name``; default: :func:`dataset_name`,
    the folder's name for a ``folder`` source, else the source).

    One warning names the files that are not used (unreadable ones, broken links, directories,
    images outside the aspect range, ...; the manifest lists all of them with their reason), and
    one more counts the images smaller than ``size`` px, which are upscaled.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown dataset source {source!r}; choose one of {SOURCES}")
    if size not in SIZES:
        raise ValueError(f"unsupported image size {size}; choose one of {SIZES} px")
    lo, hi = aspect_range
    if not 0 < lo <= hi:
        raise ValueError(f"aspect_range must satisfy 0 < low <= high, got {aspect_range}")
    data_dir = Path(data_dir) if data_dir is not None else None
    if source == "digits":
        return _load_digits(size, progress, name)
    if source == "coco":
        images_dir, annotations_file = coco_paths(root, annotations)
        return _load_coco(images_dir, annotations_file, size, (lo, hi), cache, data_dir, progress, name)
    if source == "imagenette":
        folder = Path(root) if root is not None else imagenette_root(download, data_dir)
    else:
        if root is None:
            raise ValueError(
                "source='folder' needs root=<path to an ImageFolder tree <root>/<class>/<image>> "
                "(on the command line: --root PATH; in a study profile: DATASET_ROOT)"
            )
        folder = Path(root).expanduser()
    return _load_folder(source, folder, size, (lo, hi), cache, data_dir, progress, name)
