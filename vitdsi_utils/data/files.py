"""Reading one image file: decode, convert to RGB, crop the centre square, resize; list an ImageFolder tree.

Every reader of the toolkit goes through :func:`load_image`, which returns ``None`` (with a reason from
:func:`describe_read_error`) for a file it cannot use, so one bad file never stops a study.
"""

from __future__ import annotations

import os
import warnings
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


def describe_read_error(error: BaseException) -> str:
    """A short reason why a file could not be read as an image (no temporary paths, one line)."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image file Pillow can read (empty, or another format under an image extension)"
    if isinstance(error, Image.DecompressionBombError):
        return f"too many pixels (over {2 * (Image.MAX_IMAGE_PIXELS or 0):,}); downscale it first"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."
