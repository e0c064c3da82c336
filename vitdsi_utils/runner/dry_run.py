"""The dry run of a profile: every notebook of its grid, end to end, in minutes instead of hours.

``vitdsi study --profile paper --dry-run`` runs the profile's notebooks with every *grid
dimension* as the profile has it (each N of every N list, 0 = every usable image included, every
ID scheme, every seed, every ablation factor, replay ratio, pooling, baseline, k, re-ranking depth,
image size, patch size, positional encoding and learning rate) and shrinks what only costs time:

* every epoch cap to 1 (:data:`DRY_EPOCHS`): a phase trains one epoch, so no stop rule fires;
* the model's width and depth (:data:`DRY_MODEL`): 32 wide, one encoder and one decoder block;
* the budgets of the baselines and loops (:data:`DRY_BUDGETS`): fewer visual words and k-means
  restarts, fewer SSL images, a small timed batch in the scale study;
* every database size N divided by :data:`N_DIVISOR` (never below the smallest balanced N, 4 images
  per class), so the paper's 512 / 1024 / 2048 become 40 / 64 / 128 and its scale curve
  512 ... 8,192 becomes 40 ... 512; a 0 ("every usable image") stays 0;
* the images: the first images of each class of the profile's source (file names in sorted
  order), linked into ``data/dry-run/`` as an ImageFolder tree, just enough for the largest scaled
  N (:func:`dry_run_images`); "every usable image" then means every image of that tree.

The report goes to ``reports/<profile>-dry-run/`` and the models to ``data/runs/<profile>-dry-run/``,
so nothing of a real run is touched. Its numbers mean nothing; it shows that every code path of the
grid runs. What it leaves out is listed in ``docs/study_runner.md`` ("The dry run").
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from vitdsi_utils import settings
from vitdsi_utils.atomic import atomic_dir
from vitdsi_utils.data.files import list_image_files
from vitdsi_utils.data.images import dataset_name, imagenette_root

#: Epoch caps of every training loop of the study: one epoch each.
DRY_EPOCHS = (
    "INDEX_EPOCHS",
    "RETRIEVAL_EPOCHS",
    "DENSE_EPOCHS",
    "INIT_EPOCHS",
    "IDS_MULTITASK_EPOCHS",
    "SCALE_INDEX_EPOCHS",
    "SSL_EPOCHS",
    "INC_FINETUNE_EPOCHS",
)

#: The model's size: the smoke profile's width and depth (the patch size is a grid dimension, kept).
DRY_MODEL = {"DIM": 32, "MLP_DIM": 64, "DEPTH": 1}

#: Budgets that only cost time, each at most this value (a smaller value in the profile is kept).
DRY_BUDGETS = {
    "BOVW_WORDS": 16,
    "BOVW_VOCABULARIES": 2,  # two, so the average over vocabularies still runs
    "VLAD_WORDS": 4,
    "CLUSTER_N_INIT": 1,
    "SCALE_QUERIES": 4,
    "SCALE_REPEATS": 1,
    "SSL_IMAGES": 64,  # None (every outside image) counts as above it
    "SSL_BATCH_SIZE": 32,
}

#: Keys that hold one database size N, and keys that hold a list of them.
N_KEYS = ("ABLATION_N", "PRETRAIN_N", "INC_N", "CLUSTER_N")
N_LIST_KEYS = ("NS", "IDS_NS", "SCALE_NS", "SCALE_IA_NS")

#: Every database size is divided by this.
N_DIVISOR = 16

#: The smallest N a balanced database takes: 4 images per class (one indexed, three queries).
MIN_PER_CLASS = 4

#: Sources whose images the dry run caps by linking a subset of their files (digits is small already;
#: COCO's images are described by its annotations file, which a subset of links would not match).
CAPPED_SOURCES = ("imagenette", "folder")


def scaled_n(n: int | None, n_classes: int = 10) -> int | None:
    """A database size of the dry run: ``n`` / :data:`N_DIVISOR`, at least 4 per class; 0 and None as given."""
    if n is None or n == 0:
        return n
    return max(int(n) // N_DIVISOR, MIN_PER_CLASS * n_classes)


def dry_run_parameters(params: dict[str, Any], n_classes: int = 10) -> tuple[dict[str, Any], list[str]]:
    """(the profile's parameters for a dry run, one line per changed key: ``KEY: old -> new``).

    Keys the profile does not have are left out; grid dimensions are never changed (see the module
    docstring). ``n_classes`` sets the smallest balanced N (4 images per class).
    """
    new = dict(params)
    for key in DRY_EPOCHS:
        if new.get(key) is not None:
            new[key] = 1
    for key, value in DRY_MODEL.items():
        if key in new:
            new[key] = min(new[key], value)
    if "HEADS" in new and "DIM" in new and new["DIM"] % new["HEADS"]:
        new["HEADS"] = math.gcd(new["DIM"], new["HEADS"])
    for key, most in DRY_BUDGETS.items():
        if key in new:
            new[key] = most if new[key] is None else min(new[key], most)
    for key in N_KEYS:
        if key in new:
            new[key] = scaled_n(new[key], n_classes)
    for key in N_LIST_KEYS:
        if key in new:
            new[key] = [scaled_n(n, n_classes) for n in new[key]]
    changes = [f"{key}: {params[key]} -> {new[key]}" for key in params if new[key] != params[key]]
    return new, changes


def largest_n(params: dict[str, Any]) -> int:
    """The largest database size the parameters ask for (0, every usable image, counts as none)."""
    sizes = [params.get(key) for key in N_KEYS] + [n for key in N_LIST_KEYS for n in params.get(key) or []]
    return max([int(n) for n in sizes if n], default=0)


def per_class_cap(params: dict[str, Any], n_classes: int = 10) -> int:
    """Images per class the dry run links: the largest N's share of a class, plus a tenth for images
    the aspect rule may leave out, and at least 4 per class."""
    share = math.ceil(largest_n(params) / n_classes)
    return max(math.ceil(share * 1.1) + 2, MIN_PER_CLASS)


def _source_root(params: dict[str, Any]) -> Path:
    if params.get("DATASET_ROOT"):
        return Path(params["DATASET_ROOT"]).expanduser()
    if params["DATASET"] == "imagenette":
        return imagenette_root()
    raise ValueError("the folder source needs DATASET_ROOT (--root PATH)")


def dry_run_images(params: dict[str, Any], per_class: int | None = None) -> Path:
    """An ImageFolder tree of links to the first ``per_class`` images of each class of the profile's source.

    ``per_class`` defaults to :func:`per_class_cap` of ``params`` (the dry run's parameters). The
    files are taken in the order :func:`~vitdsi_utils.data.files.list_image_files` lists them
    (splits pooled, sorted by name), so the tree is the same on every machine that has the same
    files. It is written once, atomically, under ``data/dry-run/`` and reused.
    """
    root = _source_root(params).resolve()
    files, classes, labels = list_image_files(root)
    labels = np.asarray(labels)
    per_class = per_class or per_class_cap(params, len(classes))
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    tree = settings.data_dir() / "dry-run" / f"{params['DATASET']}-{digest}-{per_class}"
    if tree.is_dir():
        return tree
    with atomic_dir(tree) as tmp:
        for label, name in enumerate(classes):
            folder = tmp / name
            folder.mkdir()
            for i in np.flatnonzero(labels == label)[:per_class]:
                relative = Path(files[i])
                # a split folder (train/, val/) goes into the link's name, so equal names of two splits stay apart
                link = "-".join([*relative.parts[:-2], relative.name])
                os.symlink(root / relative, folder / link)
    return tree


def make_dry_run(params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the dry run's parameters with its image subset as DATASET_ROOT where the source is capped, the changes).

    See the module docstring. The data set keeps its name in the reports (``DATASET_NAME``).
    """
    new, changes = dry_run_parameters(params)
    if new.get("DATASET") in CAPPED_SOURCES:
        tree = dry_run_images(new)
        # the reports name the profile's data, not the tree of links
        new["DATASET_NAME"] = dataset_name(new["DATASET"], _source_root(params), new.get("DATASET_NAME"))
        new["DATASET_ROOT"] = str(tree)
        changes.append(f"images: the first {tree.name.rsplit('-', 1)[-1]} per class of the source, linked in {tree}")
    else:
        changes.append(
            f"images: every image of the {new.get('DATASET')} source (the dry run caps only {CAPPED_SOURCES})"
        )
    return new, changes
