"""A study database: N images balanced over classes, split into indexed images and train / val / test queries.

:func:`build_database` draws the images of one database from an :class:`~vitdsi_utils.data.images.ImageSet`
(25% of each class indexed, the rest a query pool split 0.8 / 0.1 / 0.1) and orders the indexed rows by
ID scheme; :func:`database_with_ids` adds the IDs of any scheme of :mod:`vitdsi_utils.ids.schemes`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vitdsi_utils.atomic import atomic_path
from vitdsi_utils.data.files import FILE_NAME_ERRORS
from vitdsi_utils.data.images import LABEL_SEPARATOR, ImageSet, label_sets_from_matrix, left_out_frame
from vitdsi_utils.data.relevance import label_relevance
from vitdsi_utils.ids.codec import ID_SCHEMES, dense_id_order
from vitdsi_utils.ids.schemes import IDAssignment, assign_ids

ROLES = ("index", "train", "val", "test")


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
    and ``label`` give the primary label. ``left_out`` lists the source's files that no database
    can use (``ImageSet.left_out``); :meth:`save_manifest` writes them below the manifest.
    """

    manifest: pd.DataFrame
    images: np.ndarray  # (len(manifest), S, S, 3) uint8, aligned with manifest
    classes: list[str]
    settings: dict
    skipped: list[str] = field(default_factory=list)
    label_matrix: np.ndarray | None = None  # (len(manifest), C) bool for multi-label data, aligned with manifest
    unannotated: list[str] = field(default_factory=list)  # source images left out for having no label
    left_out: pd.DataFrame = field(default_factory=lambda: left_out_frame([]))  # file, class, label, role, reason

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

        :attr:`relevance_kind` names the form for :func:`~vitdsi_utils.data.relevance.label_relevance`
        (whose ``kind=`` it is); :func:`training.tasks.relevant_pairs` takes either form.
        """
        return self.multi_hot(role) if self.is_multilabel else self.split(role)[1].astype(np.int64)

    @property
    def relevance_kind(self) -> str:
        """The form of :meth:`relevance_labels`: ``"multi-hot"`` for multi-label data, else ``"class"``."""
        return "multi-hot" if self.is_multilabel else "class"

    def relevance(self, query_role: str = "test") -> np.ndarray:
        """(Q, n_index) bool: whether indexed row r is relevant to query q of ``query_role``."""

        return label_relevance(
            self.relevance_labels(query_role), self.relevance_labels("index"), kind=self.relevance_kind
        )

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

    def manifest_table(self) -> pd.DataFrame:
        """The manifest as written: every image of the database, then every file of the source it does not use.

        The left-out files come with role ``skipped`` (cannot be read: unreadable, a broken link, a
        directory, ...), ``dropped`` (outside the aspect range) or ``unannotated``, their class and label
        where known (else "" and -1), ``row`` and ``source_row`` -1, and a ``reason``. The integer
        columns (``label``, ``row``, ``source_row``) stay integers whatever is left out.
        """
        left = self.left_out
        listed = set(left["file"])
        extra = [
            (file, "", -1, role, "")
            for files, role in ((self.skipped, "skipped"), (self.unannotated, "unannotated"))
            for file in files
            if file not in listed
        ]
        if extra:  # a database built by hand may name left-out files without the table
            left = pd.concat([left, left_out_frame(extra)], ignore_index=True)
        used = self.manifest.assign(reason="")
        rows = left.assign(row=-1, id="", source_row=-1)
        for column in used.columns.difference(rows.columns):  # labels, categories of multi-label data
            rows[column] = ""
        table = pd.concat([used, rows[used.columns]], ignore_index=True)
        return table.astype({"label": np.int64, "row": np.int64, "source_row": np.int64})

    def save_manifest(self, path: str | os.PathLike) -> Path:
        """Write :meth:`manifest_table` as CSV (atomically): the database's images, then the source's
        left-out files (roles 'skipped', 'dropped', 'unannotated') with their reason."""
        table = self.manifest_table()
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
        pool_by_class.append((label, members[index_quota[label] :]))
    pool_sizes = np.array([len(m) for _, m in pool_by_class])
    split_totals = apportion(int(pool_sizes.sum()), query_fractions)
    # val and test are apportioned over classes; train takes what is left in each class
    val_quota = apportion(int(split_totals[1]), pool_sizes)
    test_quota = apportion(int(split_totals[2]), pool_sizes)
    for (_, members), n_val, n_test in zip(pool_by_class, val_quota, test_quota):
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
            (
                m
                for m in range(n + 1, largest + 1)
                if apportion(m - apportion(m, [index_fraction, 1 - index_fraction])[0], query_fractions)[2] > 0
            ),
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
            "dataset": image_set.name,
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
        left_out=image_set.left_out.copy(),
    )


def database_with_ids(
    image_set: Any, n: int, scheme: str, *, seed: int = 0, **id_params: Any
) -> tuple[Database, IDAssignment]:
    """A database of ``n`` images of ``image_set`` and its indexed images' IDs under any scheme.

    The dense schemes (random, clustered) order the database's rows, so the database is built with
    that scheme; the others are given to the indexed images of the random build, which holds the same
    images in the same roles. ``id_params`` go to :func:`assign_ids`.
    """

    db = build_database(image_set, n, id_scheme=scheme if scheme in ID_SCHEMES else "random", seed=seed)
    return db, assign_ids(db, scheme, seed=seed, **id_params)


def databases(image_set: Any, ns: Iterable[int], schemes: Iterable[str], seeds: Iterable[int]) -> Iterator[Any]:
    """Every database of the grid, N by N: ``build_database(image_set, n, id_scheme, seed)``."""

    for n in ns:
        for scheme in schemes:
            for seed in seeds:
                yield build_database(image_set, n, id_scheme=scheme, seed=seed)


# ------------------------------------------------------------------------------------------
# Databases that index every image they draw (the scale study)
# ------------------------------------------------------------------------------------------
def index_all_database(image_set: ImageSet, n: int, *, id_scheme: str = "random", seed: int = 0) -> Database:
    """A database of ``n`` images, all indexed (role ``index``; no query roles), IDs 0..n-1 by ``id_scheme``.

    The draw is balanced over the classes as in :func:`data.build_database` (each class gets
    ``min(its images, L)``, L as large as ``n`` permits), so ``n = len(image_set)`` indexes
    every image. ``settings["index_fraction"]`` is 1.0, which tells these databases apart.
    """
    n = int(n)
    if not 1 <= n <= len(image_set):
        raise ValueError(f"n must lie in 1..{len(image_set)} (the usable {image_set.source} images), got {n}")
    counts = np.bincount(image_set.labels, minlength=len(image_set.classes))
    order = np.argsort(-counts, kind="stable")  # the largest classes take the remainder
    quota = np.zeros_like(counts)
    quota[order] = balanced_quota(counts[order], n)
    rng = np.random.default_rng(seed)
    picked = np.concatenate(
        [rng.permutation(np.flatnonzero(image_set.labels == c))[: quota[c]] for c in range(len(counts)) if quota[c]]
    )
    labels = image_set.labels[picked]
    picked = picked[dense_id_order(labels, id_scheme, seed=seed + 1)]
    width = len(str(n - 1))
    manifest = pd.DataFrame(
        {
            "file": [image_set.files[i] for i in picked],
            "class": [image_set.classes[i] for i in image_set.labels[picked]],
            "label": image_set.labels[picked],
            "role": "index",
            "row": np.arange(n),
            "id": [str(r).zfill(width) for r in range(n)],
            "source_row": picked,
        }
    )
    return Database(
        manifest=manifest,
        images=np.ascontiguousarray(image_set.images[picked]),
        classes=list(image_set.classes),
        settings={
            "source": image_set.source,
            "dataset": image_set.name,
            "root": image_set.root,
            "size": image_set.size,
            "n": n,
            "id_scheme": id_scheme,
            "seed": seed,
            "index_fraction": 1.0,
            "query_fractions": [0.0, 0.0, 0.0],
        },
        skipped=list(image_set.skipped),
        label_matrix=image_set.label_matrix[picked] if image_set.is_multilabel else None,
        left_out=image_set.left_out.copy(),
    )


def query_views(db: Database, n_queries: int, seed: int = 0) -> np.ndarray:
    """``n_queries`` horizontally flipped copies of indexed images drawn with ``seed`` (with replacement
    only when the database holds fewer images): uint8 (n_queries, S, S, 3)."""
    if n_queries < 1:
        raise ValueError(f"n_queries must be at least 1, got {n_queries}")
    images, _ = db.split("index")
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(images), size=n_queries, replace=n_queries > len(images))
    return np.ascontiguousarray(images[rows, :, ::-1])
