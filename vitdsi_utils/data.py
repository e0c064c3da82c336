"""Image sources -> preprocessed uint8 arrays (cached) -> an indexed database with query splits.

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

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from . import settings
from ._io import atomic_dir, atomic_path
from .ids import ID_SCHEMES, dense_id_order

SOURCES = ("imagenette", "digits", "folder", "coco")
#: Image sizes the study uses (64, 160, 256) plus 32 px for smoke runs.
SIZES = (32, 64, 160, 256)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLIT_FOLDERS = ("train", "val", "test")
ROLES = ("index", "train", "val", "test")
LABEL_SEPARATOR = ";"  # joins the labels of one image in manifests and caches ("0;3;17")
_CACHE_VERSION = 1  # bump when preprocessing changes, so old caches are not reused
#: File names that are not valid UTF-8 (e.g. Latin-1 names from an old camera) reach Python as
#: lone surrogates; CSV files store and restore their original bytes with this error handler.
FILE_NAME_ERRORS = "surrogateescape"

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
    skipped: list[str] = field(default_factory=list)  # unreadable files, relative paths
    dropped_aspect: int = 0  # readable images outside the aspect range
    label_matrix: np.ndarray | None = None  # (M, C) bool for multi-label sources, else None
    unannotated: list[str] = field(default_factory=list)  # multi-label sources: images without labels, left out

    def __post_init__(self) -> None:
        if self.label_matrix is not None:
            matrix = np.asarray(self.label_matrix, dtype=bool)
            if matrix.shape != (len(self.labels), len(self.classes)):
                raise ValueError(
                    f"label_matrix must be (images, classes) = {(len(self.labels), len(self.classes))}, got {matrix.shape}"
                )
            if len(matrix) and not matrix.any(axis=1).all():
                raise ValueError("every image of a multi-label set needs at least one label; leave unlabelled images out")
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
# Loading one image
# --------------------------------------------------------------------------------------
def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as 8-bit RGB: grey, 16-bit, palette, CMYK and alpha images converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: rescale to 8 bits instead of letting PIL clip at 255
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # composite transparent pixels on white, as a viewer would show them
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def center_square(image: Image.Image) -> Image.Image:
    """Crop the largest centred square."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _in_range(width: int, height: int, aspect_range: tuple[float, float]) -> bool:
    return aspect_range[0] <= width / height <= aspect_range[1]


def load_image(path: str | os.PathLike, size: int, aspect_range: tuple[float, float] = (0.9, 1.1)) -> np.ndarray | None:
    """Return one preprocessed image (size, size, 3) uint8, or None when its aspect is out of range.

    Raises OSError (or a PIL error) when the file cannot be decoded. An image whose aspect is
    out of range whichever way its EXIF tag rotates it is rejected from its header alone, so a
    large panorama costs no decoding.
    """
    with Image.open(path) as image:
        width, height = image.size
        if width < 1 or height < 1:
            raise OSError("image has no pixels")
        if not _in_range(width, height, aspect_range) and not _in_range(height, width, aspect_range):
            return None
        # photos shot in portrait are stored rotated; this decodes the whole image
        image = ImageOps.exif_transpose(image)
        width, height = image.size
        if not _in_range(width, height, aspect_range):
            return None
        image = center_square(to_rgb(image))
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return np.asarray(image, dtype=np.uint8)


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


def list_image_files(root: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
    """Scan an ImageFolder tree; return (files relative to root, class names, label per file).

    Accepts ``<root>/<class>/<image>`` and ``<root>/{train,val,test}/<class>/<image>`` (the
    splits are pooled: the study draws its own database and query splits). Class folders
    without images are ignored with a warning.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in subdirs if p.name in SPLIT_FOLDERS]
    bases = split_dirs if split_dirs and len(split_dirs) == len(subdirs) else [root]
    per_class: dict[str, list[str]] = {}
    for base in bases:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not _is_utf8(class_dir.name):
                # class names appear in tables, figures and the demo, which need real text
                raise ValueError(
                    f"the class folder {os.fsencode(class_dir)!r} has a name that is not valid UTF-8; "
                    "rename it (e.g. with `convmv -f latin1 -t utf8`)"
                )
            files = sorted(
                str(f.relative_to(root))
                for f in class_dir.iterdir()
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
            )
            per_class.setdefault(class_dir.name, []).extend(files)
    empty = sorted(name for name, files in per_class.items() if not files)
    if empty:
        warnings.warn(f"ignoring class folders with no images: {', '.join(empty)}", stacklevel=2)
    classes = sorted(name for name, files in per_class.items() if files)
    if not classes:
        raise FileNotFoundError(
            f"no images under {root}: expected <root>/<class>/<image> with extensions {sorted(IMAGE_EXTENSIONS)}"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        files.extend(per_class[name])
        labels.extend([label] * len(per_class[name]))
    return files, classes, labels


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _cache_key(
    source: str, root: Path, files: Sequence[str], size: int, aspect_range: tuple[float, float], extra: str = ""
) -> str:
    digest = hashlib.sha1()
    digest.update(json.dumps([_CACHE_VERSION, source, str(root.resolve()), size, list(aspect_range)]).encode())
    for name in files:  # a changed, added or removed file gives a new key
        # os.fsencode keeps the exact bytes of names that are not valid UTF-8
        try:
            stat = (root / name).stat()
            digest.update(os.fsencode(name) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:  # a listed file that is missing is reported as unreadable when decoding
            digest.update(os.fsencode(name) + b"\0missing\n")
    if extra:  # e.g. the labels of an annotations file, which the file list alone does not pin
        digest.update(extra.encode())
    return digest.hexdigest()[:16]


def describe_read_error(error: BaseException) -> str:
    """A short reason why a file could not be read as an image (no temporary paths, one line)."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image file Pillow can read (empty, or another format under an image extension)"
    if isinstance(error, Image.DecompressionBombError):
        return f"too many pixels (over {2 * (Image.MAX_IMAGE_PIXELS or 0):,}); downscale it first"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _decode_all(
    root: Path, files: Sequence[str], size: int, aspect_range: tuple[float, float], progress: bool, desc: str
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Decode files in parallel; return (images of kept files, kept mask, unreadable file -> reason)."""
    out = np.zeros((len(files), size, size, 3), dtype=np.uint8)
    kept = np.zeros(len(files), dtype=bool)
    unreadable: dict[str, str] = {}

    def work(i: int) -> None:
        try:
            image = load_image(root / files[i], size, aspect_range)
        except Exception as error:  # truncated, empty or non-image files: skipped and reported below
            unreadable[files[i]] = describe_read_error(error)
            return
        if image is not None:
            out[i] = image
            kept[i] = True

    # Pillow releases the GIL while decoding and resampling, so threads use every core
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(tqdm(pool.map(work, range(len(files))), total=len(files), desc=desc, disable=not progress, unit="img"))
    return out[kept], kept, dict(sorted(unreadable.items()))


def _decode_cached(
    source: str,
    root: Path,
    table: pd.DataFrame,
    size: int,
    aspect_range: tuple[float, float],
    cache: bool,
    data_dir: Path | None,
    progress: bool,
    info: dict,
    key_extra: str = "",
) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Decode the files of ``table`` (a ``file`` column, then label columns), or read them from the cache.

    Returns (images of the kept files, the kept rows of ``table``, ``info`` plus ``skipped``
    and ``dropped_aspect``), and warns once about unreadable files.
    """
    key = _cache_key(source, root, table["file"].tolist(), size, aspect_range, key_extra)
    cache_dir = (data_dir or settings.data_dir()) / "cache" / f"{source}-{size}px-{key}"
    cached = _read_cache(cache_dir) if cache else None
    if cached is not None:
        images, table, info = cached
    else:
        files = table["file"].tolist()
        images, kept, unreadable = _decode_all(root, files, size, aspect_range, progress, f"decoding {source} @{size}px")
        table = table[kept]
        info = {
            "source": source,
            "root": str(root),
            "size": size,
            "aspect_range": list(aspect_range),
            **info,
            "skipped": list(unreadable),
            "skip_reasons": unreadable,
            "dropped_aspect": int((~kept).sum()) - len(unreadable),
        }
        if cache:
            with atomic_dir(cache_dir) as tmp:
                np.save(tmp / "images.npy", images)
                table.to_csv(tmp / "files.csv", index=False, errors=FILE_NAME_ERRORS)
                (tmp / "info.json").write_text(json.dumps(info, indent=2))
    if info["skipped"]:
        reasons = info.get("skip_reasons", {})
        shown = "; ".join(f"{name} ({reasons[name]})" if name in reasons else name for name in info["skipped"][:10])
        more = f"; and {len(info['skipped']) - 10} more" if len(info["skipped"]) > 10 else ""
        warnings.warn(
            f"skipped {len(info['skipped'])} unreadable image file(s) under {root}: {shown}{more}. "
            "They are listed in the manifest with role 'skipped'; fix or delete them to silence this warning",
            stacklevel=4,
        )
    return images, table, info


def _load_folder(
    source: str,
    root: Path,
    size: int,
    aspect_range: tuple[float, float],
    cache: bool,
    data_dir: Path | None,
    progress: bool,
) -> ImageSet:
    files, classes, labels = list_image_files(root)
    listing = pd.DataFrame({"file": files, "label": labels})
    images, table, info = _decode_cached(
        source, root, listing, size, aspect_range, cache, data_dir, progress, {"classes": classes}
    )
    # classes whose every image was unreadable or out of aspect range keep their label slot,
    # so labels stay comparable across sizes; build_database ignores empty classes
    return ImageSet(
        images=images,
        labels=table["label"].to_numpy(dtype=np.int64),
        classes=list(info["classes"]),
        files=table["file"].tolist(),
        source=source,
        root=str(root),
        skipped=list(info["skipped"]),
        dropped_aspect=int(info["dropped_aspect"]),
    )


def _read_cache(cache_dir: Path) -> tuple[np.ndarray, pd.DataFrame, dict] | None:
    """(images, file table, info) of a decoded-image cache, or None when there is none or it is damaged.

    Caches are written atomically, so damage means something outside the toolkit changed the
    folder; the images are then decoded again (and the cache rewritten) rather than trusted.
    """
    if not (cache_dir / "info.json").exists():
        return None
    try:
        info = json.loads((cache_dir / "info.json").read_text())
        table = pd.read_csv(cache_dir / "files.csv", keep_default_na=False, encoding_errors=FILE_NAME_ERRORS,
                            dtype={"labels": str})  # label sets such as "3" or "0;3" stay text
        images = np.load(cache_dir / "images.npy", mmap_mode="r", allow_pickle=False)
        if images.ndim != 4 or len(images) != len(table) or not {"classes", "skipped", "dropped_aspect"} <= set(info):
            raise ValueError("its parts do not fit together")
    except (OSError, ValueError, KeyError) as error:
        warnings.warn(f"ignoring the damaged image cache {cache_dir} ({error}); decoding the images again", stacklevel=4)
        return None
    return images, table, info


def _missing_coco_message(reason: str) -> str:
    return (
        f"COCO images are not available ({reason}). Set {settings.COCO_IMAGES_ENV} to the images folder "
        f"(e.g. .../coco/train2017) and {settings.COCO_ANNOTATIONS_ENV} to its instances file (e.g. "
        ".../coco/annotations/instances_train2017.json), or pass root= and annotations= to load_images. "
        "Nothing is downloaded: get COCO from https://cocodataset.org first."
    )


def coco_paths(
    root: str | os.PathLike | None = None, annotations: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """(images folder, instances JSON) of the ``coco`` source: the arguments, else the environment variables."""
    images_dir = Path(root).expanduser() if root is not None else settings.coco_images_dir()
    annotations_file = Path(annotations).expanduser() if annotations is not None else settings.coco_annotations_file()
    missing = [name for name, value in ((settings.COCO_IMAGES_ENV, images_dir),
                                        (settings.COCO_ANNOTATIONS_ENV, annotations_file)) if value is None]
    if missing:
        raise FileNotFoundError(_missing_coco_message(f"{' and '.join(missing)} not set"))
    if not images_dir.is_dir():
        raise FileNotFoundError(_missing_coco_message(f"images folder {images_dir} does not exist"))
    if not annotations_file.is_file():
        raise FileNotFoundError(_missing_coco_message(f"annotations file {annotations_file} does not exist"))
    return images_dir, annotations_file


def _load_coco(
    root: Path,
    annotations: Path,
    size: int,
    aspect_range: tuple[float, float],
    cache: bool,
    data_dir: Path | None,
    progress: bool,
) -> ImageSet:
    from .coco import read_coco_annotations

    cache_root = (data_dir or settings.data_dir()) / "cache"
    coco = read_coco_annotations(annotations, cache_root if cache else None)
    if not coco.files:
        raise ValueError(f"{annotations} has no annotated image: nothing to retrieve")
    if not any((root / name).is_file() for name in coco.files[:1000]):
        raise FileNotFoundError(_missing_coco_message(
            f"none of the first images named in {annotations.name} (e.g. {coco.files[0]}) is in {root}; "
            f"does {settings.COCO_IMAGES_ENV} name the folder that file describes?"
        ))
    if coco.unannotated:
        warnings.warn(
            f"left out {len(coco.unannotated)} of {len(coco.files) + len(coco.unannotated)} images of "
            f"{annotations.name}: they have no object annotation, so no query could find them relevant "
            "(manifests list them with role 'unannotated')",
            stacklevel=3,
        )
    listing = pd.DataFrame({"file": coco.files, "labels": [LABEL_SEPARATOR.join(map(str, s)) for s in coco.label_sets]})
    info = {"classes": coco.categories, "category_ids": coco.category_ids, "annotations": str(annotations),
            "unannotated": coco.unannotated}
    images, table, info = _decode_cached(
        "coco", root, listing, size, aspect_range, cache, data_dir, progress, info, key_extra=coco.digest()
    )
    label_sets = [tuple(int(t) for t in text.split(LABEL_SEPARATOR)) for text in table["labels"]]
    matrix = label_matrix_from_sets(label_sets, len(info["classes"]))
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
    )


def _load_digits(size: int, progress: bool) -> ImageSet:
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
    )


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
) -> ImageSet:
    """Load every usable image of ``source`` at ``size`` px; see the module docstring.

    ``root`` is the folder of a ``folder`` source, a local Imagenette copy, or the COCO images
    folder; ``annotations`` is the COCO instances JSON (both default to the environment).
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
        return _load_digits(size, progress)
    if source == "coco":
        images_dir, annotations_file = coco_paths(root, annotations)
        return _load_coco(images_dir, annotations_file, size, (lo, hi), cache, data_dir, progress)
    if source == "imagenette":
        folder = Path(root) if root is not None else imagenette_root(download, data_dir)
    else:
        if root is None:
            raise ValueError("source='folder' needs root=<path to an ImageFolder tree>")
        folder = Path(root).expanduser()
    return _load_folder(source, folder, size, (lo, hi), cache, data_dir, progress)


# --------------------------------------------------------------------------------------
# The indexed database and the query splits
# --------------------------------------------------------------------------------------
def apportion(total: int, weights: Sequence[float]) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (largest remainders; ties by position)."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = total - counts.sum()
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:remainder]] += 1
    return counts


def max_balanced_size(class_counts: Sequence[int]) -> int:
    """The largest N that :func:`build_database` can balance over these class sizes."""
    counts = np.asarray([c for c in class_counts if c > 0])
    smallest = counts.min()
    return int(len(counts) * smallest + min(len(counts) - 1, int((counts > smallest).sum())))


def balanced_quota(counts: Sequence[int], n: int) -> np.ndarray:
    """Split ``n`` images over classes holding ``counts`` images, as evenly as the counts allow.

    Every class gets ``min(count, L)`` images, with L the largest level whose total stays within
    ``n``; the images left over go one each to the classes with images to spare, in the given
    order. When every class can take an equal share this is the plain balanced split.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if n > counts.sum():
        raise ValueError(f"cannot draw {n} images from classes holding {int(counts.sum())}")
    low, high = 0, int(counts.max(initial=0))
    while low < high:  # bisection on the level L
        mid = (low + high + 1) // 2
        if np.minimum(counts, mid).sum() <= n:
            low = mid
        else:
            high = mid - 1
    quota = np.minimum(counts, low)
    spare = np.flatnonzero(counts > low)[: n - int(quota.sum())]
    quota[spare] += 1
    return quota


@dataclass
class Database:
    """An indexed database (IDB) with its query splits; one manifest row per image.

    ``manifest`` columns: ``file``, ``class``, ``label``, ``role`` (index / train / val /
    test), ``row`` (database row for index images, else -1), ``id`` (the ID text of index
    images, else empty) and ``source_row`` (position in the ImageSet). Index images come first,
    in ID order, so database row ``r`` has ID number ``r``. A multi-label database adds
    ``labels`` (label indices, ";"-joined) and ``categories`` (their names); there ``class``
    and ``label`` give the primary label.
    """

    manifest: pd.DataFrame
    images: np.ndarray  # (len(manifest), S, S, 3) uint8, aligned with manifest
    classes: list[str]
    settings: dict
    skipped: list[str] = field(default_factory=list)
    label_matrix: np.ndarray | None = None  # (len(manifest), C) bool for multi-label data, aligned with manifest
    unannotated: list[str] = field(default_factory=list)  # source images left out for having no label

    def _mask(self, role: str) -> np.ndarray:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; choose one of {ROLES}")
        return (self.manifest["role"] == role).to_numpy()

    def split(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        """Return (images (n, S, S, 3) uint8, labels (n,) int64) of one role (primary labels if multi-label)."""
        mask = self._mask(role)
        return self.images[mask], self.manifest["label"].to_numpy()[mask]

    @property
    def is_multilabel(self) -> bool:
        """Whether relevance means "at least one shared label" (True) or "the same class" (False)."""
        return self.label_matrix is not None

    def multi_hot(self, role: str) -> np.ndarray:
        """The label sets of one role as a boolean (n, C) matrix (one-hot classes for single-label data)."""
        mask = self._mask(role)
        if self.label_matrix is not None:
            return self.label_matrix[mask]
        return np.eye(len(self.classes), dtype=bool)[self.manifest["label"].to_numpy()[mask]]

    def relevance_labels(self, role: str) -> np.ndarray:
        """What relevance compares for one role: classes (n,) int64, or label sets (n, C) bool if multi-label.

        :func:`metrics.label_relevance` and :func:`train.relevant_pairs` take either form.
        """
        return self.multi_hot(role) if self.is_multilabel else self.split(role)[1]

    def relevance(self, query_role: str = "test") -> np.ndarray:
        """(Q, n_index) bool: whether indexed row r is relevant to query q of ``query_role``."""
        from .metrics import label_relevance

        return label_relevance(self.relevance_labels(query_role), self.relevance_labels("index"))

    @property
    def n_index(self) -> int:
        return int((self.manifest["role"] == "index").sum())

    @property
    def index_labels(self) -> np.ndarray:
        """Labels of the database rows (n_index,)."""
        return self.split("index")[1]

    def counts(self) -> pd.DataFrame:
        """Images per class and role (per primary label for multi-label data)."""
        return pd.crosstab(self.manifest["class"], self.manifest["role"]).reindex(columns=list(ROLES), fill_value=0)

    def fingerprint(self) -> dict[str, object]:
        """Plain values that identify this database: its settings and a digest of the indexed images in ID order.

        Checkpoints store it, so a model is never resumed or reused for another database (another
        ID scheme, seed, N or image folder); the folder's location is left out, so moving it is fine.
        """
        index = self.manifest[self.manifest["role"] == "index"]
        digest = hashlib.sha1()
        for file, name in zip(index["file"], index["class"]):
            digest.update(f"{file}\t{name}\n".encode("utf-8", FILE_NAME_ERRORS))
        keys = ("source", "size", "n", "id_scheme", "seed")
        return {**{k: self.settings.get(k) for k in keys}, "indexed_images_sha1": digest.hexdigest()[:16]}

    def category_counts(self) -> pd.DataFrame:
        """Images showing each class, per role: a multi-label image counts once for each of its labels."""
        frame = pd.DataFrame({role: self.multi_hot(role).sum(axis=0) for role in ROLES}, index=self.classes)
        return frame[frame.sum(axis=1) > 0]

    def save_manifest(self, path: str | os.PathLike) -> Path:
        """Write the manifest as CSV (atomically), with unreadable source files as role 'skipped'
        and source images without labels as role 'unannotated'."""
        left_out = [pd.DataFrame({"file": files, "role": role})
                    for files, role in ((self.skipped, "skipped"), (self.unannotated, "unannotated")) if files]
        table = pd.concat([self.manifest, *left_out], ignore_index=True) if left_out else self.manifest
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False, errors=FILE_NAME_ERRORS)
        return Path(path)


def build_database(
    image_set: ImageSet,
    n: int,
    *,
    id_scheme: str = "random",
    seed: int = 0,
    index_fraction: float = 0.25,
    query_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> Database:
    """Draw ``n`` images balanced over classes and split them as the study does.

    Per class: ``index_fraction`` of its images go to the indexed database, the rest to the
    retrieval pool, which splits ``query_fractions`` into train / val / test queries. Totals
    are exact (largest-remainder rounding), e.g. N = 512 gives 128 indexed images. IDs follow
    ``id_scheme`` (random or clustered). The draw depends only on ``seed``, so the two ID
    schemes see the same images in the same roles.

    Multi-label data is balanced over primary labels (each image's rarest label, see
    :func:`primary_labels`) as far as the data allows: every primary label gets
    ``min(its images, L)`` with L as large as N permits (:func:`balanced_quota`), so a rare
    category gives all it has and the others share the rest evenly. Clustered IDs group the
    indexed images by primary label. Single-label data must balance exactly.
    """
    if id_scheme not in ID_SCHEMES:
        raise ValueError(f"unknown ID scheme {id_scheme!r}; choose one of {ID_SCHEMES}")
    if isinstance(n, bool) or not isinstance(n, Integral):
        raise ValueError(f"N must be a whole number of images, got {n!r} ({type(n).__name__})")
    n = int(n)
    if not 0 < index_fraction < 1:
        raise ValueError(f"index_fraction must lie in (0, 1), got {index_fraction}")
    if len(query_fractions) != 3 or min(query_fractions) < 0 or not np.isclose(sum(query_fractions), 1.0):
        raise ValueError(f"query_fractions must be three non-negative numbers summing to 1, got {query_fractions}")
    multilabel = image_set.is_multilabel
    counts = np.bincount(image_set.labels, minlength=len(image_set.classes))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        kind = "primary categories" if multilabel else "class(es) with images"
        raise ValueError(
            f"the {image_set.source} images hold {len(present)} {kind}; "
            "retrieval needs at least 2 classes (primary categories for multi-label data)"
        )
    empty = [image_set.classes[i] for i in np.flatnonzero(counts == 0)]
    if empty and not multilabel:
        warnings.warn(
            f"class(es) {', '.join(empty)} have no usable images (all unreadable or outside the aspect range) "
            "and are left out of the database",
            stacklevel=2,
        )
    smallest = int(counts[present].min())
    if multilabel:
        largest = int(counts.sum())
        holding = f"with {len(present)} primary categories (smallest {smallest} images), so a database"
    else:
        largest = max_balanced_size(counts[present])
        holding = f"in {len(present)} classes (smallest class {smallest}), so a balanced database"
        if largest < len(present) * 4:
            # every class needs one indexed image and three pool images at the smallest N
            small = [image_set.classes[i] for i in present if counts[i] < 4]
            raise ValueError(
                f"too few images: a balanced database needs at least 4 usable images per class, but "
                f"{', '.join(small)} ha{'s' if len(small) == 1 else 've'} fewer (smallest class: {smallest}). "
                "Add images to those classes or remove their folders"
            )
    if not len(present) * 4 <= n <= largest:
        raise ValueError(
            f"N={n} is not possible: {image_set.source} at {image_set.size}px has {len(image_set)} usable images "
            f"{holding} takes N between {len(present) * 4} and {largest}"
        )

    rng = np.random.default_rng(seed)
    # the classes with the most images take the remainder, so every N up to the maximum works
    order = present[np.argsort(-counts[present], kind="stable")]
    quota = np.zeros(len(image_set.classes), dtype=np.int64)
    quota[order] = balanced_quota(counts[order], n)
    n_index = apportion(n, [index_fraction, 1 - index_fraction])[0]
    index_quota = np.zeros_like(quota)
    index_quota[order] = apportion(n_index, quota[order])

    picked, roles = [], []
    pool_by_class = []
    for label in present:
        members = rng.permutation(np.flatnonzero(image_set.labels == label))[: quota[label]]
        picked.append(members[: index_quota[label]])
        roles.append(np.full(index_quota[label], "index", dtype=object))
        pool_by_class.append((label, members[index_quota[label]:]))
    pool_sizes = np.array([len(m) for _, m in pool_by_class])
    split_totals = apportion(int(pool_sizes.sum()), query_fractions)
    # val and test are apportioned over classes; train takes what is left in each class
    val_quota = apportion(int(split_totals[1]), pool_sizes)
    test_quota = apportion(int(split_totals[2]), pool_sizes)
    for (label, members), n_val, n_test in zip(pool_by_class, val_quota, test_quota):
        n_train = len(members) - n_val - n_test
        picked.append(members)
        roles.append(np.array(["train"] * n_train + ["val"] * n_val + ["test"] * n_test, dtype=object))

    source_rows = np.concatenate(picked)
    manifest = pd.DataFrame(
        {
            "file": [image_set.files[i] for i in source_rows],
            "label": image_set.labels[source_rows],
            "role": np.concatenate(roles),
            "source_row": source_rows,
        }
    )
    manifest.insert(1, "class", [image_set.classes[i] for i in manifest["label"]])
    label_columns: list[str] = []
    if multilabel:
        sets = label_sets_from_matrix(image_set.label_matrix[source_rows])
        manifest["labels"] = [LABEL_SEPARATOR.join(map(str, labels)) for labels in sets]
        manifest["categories"] = [LABEL_SEPARATOR.join(image_set.classes[j] for j in labels) for labels in sets]
        label_columns = ["labels", "categories"]
    is_index = (manifest["role"] == "index").to_numpy()
    index_part = manifest[is_index].reset_index(drop=True)
    # the ID scheme decides which index image takes which consecutive number
    id_order = dense_id_order(index_part["label"].to_numpy(), id_scheme, seed=seed + 1)
    index_part = index_part.iloc[id_order].reset_index(drop=True)
    width = len(str(len(index_part) - 1))
    index_part["row"] = np.arange(len(index_part))
    index_part["id"] = [str(r).zfill(width) for r in range(len(index_part))]
    if query_fractions[2] > 0 and not (manifest["role"] == "test").any():
        enough = next(
            (m for m in range(n + 1, largest + 1)
             if apportion(m - apportion(m, [index_fraction, 1 - index_fraction])[0], query_fractions)[2] > 0),
            None,
        )
        advice = f"use N >= {enough}" if enough is not None else "add images"
        warnings.warn(
            f"N={n} leaves no test queries (the retrieval pool of {int(pool_sizes.sum())} images is split "
            f"{list(query_fractions)}), so test metrics will be empty; {advice}",
            stacklevel=2,
        )
    queries = manifest[~is_index].copy()
    queries["role"] = pd.Categorical(queries["role"], categories=ROLES)
    queries = queries.sort_values(["role", "label"], kind="stable").reset_index(drop=True)
    queries["role"] = queries["role"].astype(str)
    queries["row"] = -1
    queries["id"] = ""
    manifest = pd.concat([index_part, queries], ignore_index=True)
    manifest = manifest[["file", "class", "label", "role", "row", "id", "source_row", *label_columns]]
    images = np.ascontiguousarray(image_set.images[manifest["source_row"].to_numpy()])
    return Database(
        manifest=manifest,
        images=images,
        classes=list(image_set.classes),
        settings={
            "source": image_set.source,
            "root": image_set.root,
            "size": image_set.size,
            "n": n,
            "id_scheme": id_scheme,
            "seed": seed,
            "index_fraction": index_fraction,
            "query_fractions": list(query_fractions),
        },
        skipped=list(image_set.skipped),
        label_matrix=image_set.label_matrix[manifest["source_row"].to_numpy()] if multilabel else None,
        unannotated=list(image_set.unannotated),
    )
