"""Image files -> one preprocessed uint8 array, cached on disk, and what was left out on the way.

Every source of :mod:`vitdsi_utils.data.images` that reads files (``imagenette``, ``folder``,
``coco``) lists them first and then calls :func:`decode_cached`: the files are decoded in
parallel threads (Pillow releases the GIL), each kept when its aspect ratio lies in the range
asked for, centre-cropped and resized to ``size`` px. The result is stored under
``<data>/cache/<source>-<size>px-<key>/``, the key hashing the settings and every file's name,
size and modification time, so a rerun reads the array instead of decoding again and a changed
folder is decoded afresh. A damaged cache is ignored with a warning, never trusted.

Unreadable files and files outside the aspect range are reported once per process in one
warning each (:func:`warn_left_out`, :func:`warn_upscaled`); the manifest keeps the full list.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from vitdsi_utils import settings
from vitdsi_utils.atomic import atomic_dir
from vitdsi_utils.data.files import FILE_NAME_ERRORS, describe_read_error, load_image

#: Image sizes the study uses (64, 160, 256) plus 32 px for smoke runs.
SIZES = (32, 64, 160, 256)

_CACHE_VERSION = 2  # bump when preprocessing or the cached facts change, so old caches are not reused


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


def _decode_all(
    root: Path, files: Sequence[str], size: int, aspect_range: tuple[float, float], progress: bool, desc: str
) -> tuple[np.ndarray, np.ndarray, dict[str, str], dict[str, str], dict[str, list[int]]]:
    """Decode files in parallel.

    Returns (images of kept files, kept mask, unreadable file -> reason, file outside the aspect
    range -> reason, upscaled file -> [width, height]: kept images whose shorter side is below ``size``).
    """
    out = np.zeros((len(files), size, size, 3), dtype=np.uint8)
    kept = np.zeros(len(files), dtype=bool)
    unreadable: dict[str, str] = {}
    dropped: dict[str, str] = {}
    upscaled: dict[str, list[int]] = {}
    low, high = aspect_range

    def work(i: int) -> None:
        try:
            image, (width, height) = load_image(root / files[i], size, aspect_range, return_size=True)
        except Exception as error:  # truncated, empty or non-image files: skipped and reported below
            unreadable[files[i]] = describe_read_error(error)
            return
        if image is None:
            dropped[files[i]] = f"{width} x {height} px: aspect {width / height:.2f} is outside [{low:g}, {high:g}]"
            return
        out[i] = image
        kept[i] = True
        if min(width, height) < size:
            upscaled[files[i]] = [width, height]

    # Pillow releases the GIL while decoding and resampling, so threads use every core
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(tqdm(pool.map(work, range(len(files))), total=len(files), desc=desc, disable=not progress, unit="img"))
    return (
        out[kept],
        kept,
        dict(sorted(unreadable.items())),
        dict(sorted(dropped.items())),
        dict(sorted(upscaled.items())),
    )


def decode_cached(
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

    Returns (images of the kept files, the kept rows of ``table``, ``info`` plus ``skipped``,
    ``skip_reasons`` (unreadable files), ``dropped`` (file -> reason, outside the aspect range),
    ``dropped_aspect`` (their number) and ``upscaled`` (file -> [width, height])).
    """
    key = _cache_key(source, root, table["file"].tolist(), size, aspect_range, key_extra)
    cache_dir = (data_dir or settings.data_dir()) / "cache" / f"{source}-{size}px-{key}"
    cached = _read_cache(cache_dir) if cache else None
    if cached is not None:
        return cached
    files = table["file"].tolist()
    images, kept, unreadable, dropped, upscaled = _decode_all(
        root, files, size, aspect_range, progress, f"decoding {source} @{size}px"
    )
    table = table[kept]
    info = {
        "source": source,
        "root": str(root),
        "size": size,
        "aspect_range": list(aspect_range),
        **info,
        "skipped": list(unreadable),
        "skip_reasons": unreadable,
        "dropped": dropped,
        "dropped_aspect": len(dropped),
        "upscaled": upscaled,
    }
    if cache:
        with atomic_dir(cache_dir) as tmp:
            np.save(tmp / "images.npy", images)
            table.to_csv(tmp / "files.csv", index=False, errors=FILE_NAME_ERRORS)
            (tmp / "info.json").write_text(json.dumps(info, indent=2))
    return images, table, info


def _named(entries: Sequence[tuple[str, str]], limit: int = 10) -> str:
    """'a.jpg (reason); b.jpg (reason)' for the first ``limit`` entries, then how many more."""
    shown = "; ".join(f"{name} ({reason})" if reason else name for name, reason in entries[:limit])
    return shown + (f"; and {len(entries) - limit} more" if len(entries) > limit else "")


#: The left-out and upscaling warnings given in this process: a notebook that loads the same images twice
#: (BoVW, then VLAD) says each once.
_SAID: set[str] = set()


def _warn_once(message: str, stacklevel: int) -> None:
    if message not in _SAID:
        _SAID.add(message)
        warnings.warn(message, stacklevel=stacklevel + 1)


def warn_left_out(root: Path, left_out: pd.DataFrame, aspect_range: tuple[float, float], stacklevel: int = 4) -> None:
    """One warning that names every file left out (the first ten of each kind) and where the full list is."""
    skipped = left_out[left_out["role"] == "skipped"]
    dropped = left_out[left_out["role"] == "dropped"]
    parts = []
    if len(skipped):
        parts.append(
            f"skipped {len(skipped)} unreadable image file(s) under {root}: "
            + _named(list(zip(skipped["file"], skipped["reason"])))
        )
    if len(dropped):
        where = "" if len(skipped) else f" under {root}"
        sizes = [reason.split(":")[0] for reason in dropped["reason"]]  # "96 x 48 px: aspect 2.00 is outside ..."
        parts.append(
            f"dropped {len(dropped)} image(s){where} whose aspect ratio (width / height) is outside "
            f"[{aspect_range[0]:g}, {aspect_range[1]:g}]: " + _named(list(zip(dropped["file"], sizes)))
        )
    if parts:
        _warn_once(
            "; ".join(parts) + ". The manifest lists every one with its reason (role 'skipped' or 'dropped', "
            "column 'reason'); fix or delete them to silence this warning",
            stacklevel=stacklevel,
        )


def warn_upscaled(upscaled: dict[str, list[int]], n_images: int, size: int, stacklevel: int = 4) -> None:
    """One warning when images smaller than ``size`` px were upscaled, with their number and the smallest ones."""
    if not upscaled:
        return
    smallest = sorted(upscaled.items(), key=lambda item: (min(item[1]), item[0]))
    shown = ", ".join(f"{name} ({w} x {h} px)" for name, (w, h) in smallest[:5])
    fits = [s for s in SIZES if s <= min(smallest[-1][1])]
    advice = (
        f"use SIZE {fits[-1]} or less to avoid it"
        if fits
        else f"no supported size ({', '.join(map(str, SIZES))} px) avoids it for all of them"
    )
    _warn_once(
        f"{len(upscaled)} of {n_images} images are smaller than {size} px and were upscaled, so they hold less "
        f"detail than the image size suggests: smallest {shown}"
        + (f" and {len(upscaled) - 5} more" if len(upscaled) > 5 else "")
        + f"; {advice}",
        stacklevel=stacklevel,
    )


def left_out_rows(info: dict, labels: dict[str, int], classes: Sequence[str]) -> list[tuple]:
    """Rows (file, class, label, role, reason) for the unreadable and the dropped files of a decoding ``info``."""
    rows = []
    for role, reasons in (("skipped", info.get("skip_reasons", {})), ("dropped", info.get("dropped", {}))):
        for name, reason in reasons.items():
            label = int(labels.get(name, -1))
            rows.append((name, classes[label] if label >= 0 else "", label, role, reason))
    return rows


def _read_cache(cache_dir: Path) -> tuple[np.ndarray, pd.DataFrame, dict] | None:
    """(images, file table, info) of a decoded-image cache, or None when there is none or it is damaged.

    Caches are written atomically, so damage means something outside the toolkit changed the
    folder; the images are then decoded again (and the cache rewritten) rather than trusted.
    """
    if not (cache_dir / "info.json").exists():
        return None
    try:
        info = json.loads((cache_dir / "info.json").read_text())
        table = pd.read_csv(
            cache_dir / "files.csv", keep_default_na=False, encoding_errors=FILE_NAME_ERRORS, dtype={"labels": str}
        )  # label sets such as "3" or "0;3" stay text
        images = np.load(cache_dir / "images.npy", mmap_mode="r", allow_pickle=False)
        if (
            images.ndim != 4
            or len(images) != len(table)
            or not {"classes", "skipped", "dropped", "upscaled"} <= set(info)
        ):
            raise ValueError("its parts do not fit together")
    except (OSError, ValueError, KeyError) as error:
        warnings.warn(
            f"ignoring the damaged image cache {cache_dir} ({error}); decoding the images again", stacklevel=4
        )
        return None
    return images, table, info
