"""Reading one image file: decode, convert to RGB, crop the centre square, resize; list an ImageFolder tree, or sample it.

Every reader of the toolkit goes through :func:`load_image`, which returns ``None`` (with a reason from
:func:`describe_read_error`) for a file it cannot use, so one bad file never stops a study.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


SPLIT_FOLDERS = ("train", "val", "test")


#: File names that are not valid UTF-8 (e.g. Latin-1 names from an old camera) reach Python as
#: lone surrogates; CSV files store and restore their original bytes with this error handler.
FILE_NAME_ERRORS = "surrogateescape"


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


def load_image(
    path: str | os.PathLike, size: int, aspect_range: tuple[float, float] = (0.9, 1.1), *, return_size: bool = False
) -> np.ndarray | None | tuple[np.ndarray | None, tuple[int, int]]:
    """Return one preprocessed image (size, size, 3) uint8, or None when its aspect is out of range.

    Raises OSError (or a PIL error) when the file cannot be decoded. An image whose aspect is
    out of range whichever way its EXIF tag rotates it is rejected from its header alone, so a
    large panorama costs no decoding. With ``return_size`` the result is ``(image or None,
    (width, height))``, the size as shown (after EXIF rotation when the image was decoded): an
    image whose shorter side is below ``size`` was upscaled.
    """
    with Image.open(path) as image:
        width, height = image.size
        if width < 1 or height < 1:
            raise OSError("image has no pixels")
        if not _in_range(width, height, aspect_range) and not _in_range(height, width, aspect_range):
            return (None, (width, height)) if return_size else None
        # photos shot in portrait are stored rotated; this decodes the whole image
        image = ImageOps.exif_transpose(image)
        width, height = image.size
        if not _in_range(width, height, aspect_range):
            return (None, (width, height)) if return_size else None
        image = center_square(to_rgb(image))
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
        array = np.asarray(image, dtype=np.uint8)
        return (array, (width, height)) if return_size else array


@dataclass
class FolderScan:
    """What :func:`scan_image_folder` found: the image files by class, and every other entry with its reason.

    ``files[i]`` (relative to the root) has label ``labels[i]``, the index of its class in
    ``classes``. ``unused`` maps each entry that is not read to ``(class folder or "", reason)``:
    broken symbolic links, directories (also one named like an image, ``x.jpg/``), other non-files,
    files whose extension is not an image's, and images outside any class folder. Hidden entries
    (names starting with ".") are ignored, and so are non-image files beside the class folders
    (an archive's ``README`` or ``.csv``).
    """

    files: list[str]
    classes: list[str]
    labels: list[int]
    unused: dict[str, tuple[str, str]] = field(default_factory=dict)


def _unused_reason(entry: Path) -> str | None:
    """Why an entry of a class folder is not read as an image (None: it is read)."""
    if entry.is_symlink() and not entry.exists():
        return "broken symbolic link"
    if entry.is_dir():
        if entry.suffix.lower() in IMAGE_EXTENSIONS:
            return "a directory, not an image file"
        return "a folder inside a class folder (images are read only from <root>/<class>/)"
    if not entry.is_file():
        return "not a regular file"
    if entry.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file extension ({entry.suffix or 'none'})"
    return None


def scan_image_folder(root: str | os.PathLike) -> FolderScan:
    """Scan an ImageFolder tree: the image files by class, and every entry that is not used with its reason.

    Accepts ``<root>/<class>/<image>`` and ``<root>/{train,val,test}/<class>/<image>`` (the
    splits are pooled: the study draws its own database and query splits). Class folders
    without images are ignored with a warning. See :class:`FolderScan` for what counts as unused.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    visible = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    subdirs = [p for p in visible if p.is_dir()]
    split_dirs = [p for p in subdirs if p.name in SPLIT_FOLDERS]
    bases = split_dirs if split_dirs and len(split_dirs) == len(subdirs) else [root]
    per_class: dict[str, list[str]] = {}
    unused: dict[str, tuple[str, str]] = {}
    for base in bases:
        for entry in sorted(p for p in base.iterdir() if not p.name.startswith(".")):
            if not entry.is_dir():
                if entry.suffix.lower() in IMAGE_EXTENSIONS:
                    unused[str(entry.relative_to(root))] = ("", "an image outside any class folder")
                continue
            if not _is_utf8(entry.name):
                # class names appear in tables, figures and the demo, which need real text
                raise ValueError(
                    f"the class folder {os.fsencode(entry)!r} has a name that is not valid UTF-8; "
                    "rename it (e.g. with `convmv -f latin1 -t utf8`)"
                )
            files = per_class.setdefault(entry.name, [])
            for item in sorted(entry.iterdir()):
                if item.name.startswith("."):
                    continue
                reason = _unused_reason(item)
                if reason is None:
                    files.append(str(item.relative_to(root)))
                else:
                    unused[str(item.relative_to(root))] = (entry.name, reason)
    empty = sorted(name for name, files in per_class.items() if not files)
    if empty:
        warnings.warn(f"ignoring class folders with no images: {', '.join(empty)}", stacklevel=3)
    classes = sorted(name for name, files in per_class.items() if files)
    if not classes:
        raise FileNotFoundError(
            f"no images under {root}: expected <root>/<class>/<image> with extensions {sorted(IMAGE_EXTENSIONS)}"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        files.extend(sorted(per_class[name]))
        labels.extend([label] * len(per_class[name]))
    return FolderScan(files, classes, labels, dict(sorted(unused.items())))


def list_image_files(root: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
    """Scan an ImageFolder tree; return (files relative to root, class names, label per file).

    The image files of :func:`scan_image_folder`, without the entries it leaves out.
    """
    scan = scan_image_folder(root)
    return scan.files, scan.classes, scan.labels


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def describe_read_error(error: BaseException) -> str:
    """A short reason why a file could not be read as an image (no temporary paths, one line)."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image file Pillow can read (empty, or another format under an image extension)"
    if isinstance(error, Image.DecompressionBombError):
        return f"too many pixels (over {2 * (Image.MAX_IMAGE_PIXELS or 0):,}); downscale it first"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def sample_image_folder(
    root: str | Path, size: int, per_class: int = 6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A few preprocessed images per class of an ImageFolder tree, without decoding the whole tree.

    Returns (images (n, size, size, 3) uint8, labels (n,), class names); images outside the
    aspect range are skipped, as in the study.
    """

    files, classes, labels = list_image_files(root)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    images, kept = [], []
    for label in range(len(classes)):
        for i in rng.permutation(np.flatnonzero(labels == label)):
            try:
                image = load_image(Path(root) / files[i], size)
            except OSError:  # an unreadable file is left out here, as load_images leaves it out
                continue
            if image is not None:
                images.append(image)
                kept.append(label)
            if kept.count(label) == per_class:
                break
    return np.stack(images), np.asarray(kept), classes
