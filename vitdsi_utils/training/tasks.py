"""Training examples: indexing (image -> own ID), retrieval pairs (query -> relevant ID) and their variants.

A task is a set of (image, target ID) examples; :class:`Pool` holds several tasks on the training
device and draws the batches of an epoch from them (multi-task training mixes them by a ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np
import torch

from vitdsi_utils.data.augment import augment
from vitdsi_utils.data.relevance import label_relevance
from vitdsi_utils.ids.codec import IDCodec


# ------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------
def _as_long(x: Any) -> torch.Tensor:
    return (x.cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).long().flatten()


def _as_images(x: Any) -> torch.Tensor:
    images = torch.as_tensor(x)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise TypeError(f"task images must be uint8 (n, H, W, 3); got {images.dtype} {tuple(images.shape)}")
    return images


@dataclass
class IndexingTask:
    """Indexing examples: ``images[i]`` (uint8 (n, H, W, 3)) -> its own database row ``rows[i]`` (default i)."""

    images: torch.Tensor
    rows: torch.Tensor | None = None
    name: str = "indexing"

    def __post_init__(self) -> None:
        self.images = _as_images(self.images)
        self.rows = torch.arange(len(self.images)) if self.rows is None else _as_long(self.rows)
        if len(self.rows) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.rows)} rows")

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class RetrievalPairs:
    """Retrieval examples: query image -> the row of a relevant database image.

    Without ``query_idx``, ``images[i]`` pairs with ``rows[i]``. With it, ``images`` holds each
    query image once and pair i reads ``images[query_idx[i]]``, so a query with hundreds of
    relevant rows is stored once.
    """

    images: torch.Tensor
    rows: torch.Tensor
    query_idx: torch.Tensor | None = None
    name: str = "retrieval"

    def __post_init__(self) -> None:
        self.images = _as_images(self.images)
        self.rows = _as_long(self.rows)
        if self.query_idx is None:
            if len(self.rows) != len(self.images):
                raise ValueError(f"{len(self.images)} images but {len(self.rows)} rows (pass query_idx?)")
        else:
            self.query_idx = _as_long(self.query_idx)
            if len(self.query_idx) != len(self.rows):
                raise ValueError("query_idx and rows must have the same length")
            if len(self.query_idx) and (self.query_idx.min() < 0 or self.query_idx.max() >= len(self.images)):
                raise ValueError("query_idx points outside images")

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_labels(
        cls,
        images: torch.Tensor,
        query_labels: Any,
        db_labels: Any,
        *,
        max_pairs_per_query: int | None = None,
        seed: int = 0,
        name: str = "retrieval",
    ) -> RetrievalPairs:
        """Pairs of every query image with every relevant database row (see :func:`relevant_pairs`)."""
        query_idx, rows = relevant_pairs(query_labels, db_labels, max_pairs_per_query=max_pairs_per_query, seed=seed)
        return cls(images, rows, query_idx, name=name)


def _labels(x: Any) -> torch.Tensor:
    return x.cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def relevant_pairs(
    query_labels: Any, db_labels: Any, *, max_pairs_per_query: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query_idx, db_rows), each (n_pairs,): one pair per relevant database row of every query.

    Labels are class ids (n,) -- relevant means the same class -- or multi-hot (n, C) --
    relevant means at least one shared label (COCO); ``Database.relevance_labels`` gives the
    right form. Relevance is :func:`~vitdsi_utils.data.relevance.label_relevance`, the one the metrics use, so the
    pairs teach exactly what the evaluation rewards. Pairs come sorted by query, then row. With
    ``max_pairs_per_query`` a query keeps a seeded random subset of at most that many rows.
    """

    relevant = torch.from_numpy(label_relevance(_labels(query_labels).numpy(), _labels(db_labels).numpy()))  # (Q, N)
    query_idx, rows = relevant.nonzero(as_tuple=True)  # row-major: by query, then row
    if max_pairs_per_query is not None and len(query_idx):
        if max_pairs_per_query < 1:
            raise ValueError("max_pairs_per_query must be >= 1")
        g = torch.Generator().manual_seed(seed)
        key = torch.rand(len(query_idx), generator=g)
        order = key.argsort()
        order = order[query_idx[order].argsort(stable=True)]  # by query, random inside a query
        counts = torch.bincount(query_idx, minlength=relevant.shape[0])
        first = torch.cumsum(counts, 0) - counts  # first pair of each query in that order
        rank = torch.arange(len(order)) - first[query_idx[order]]
        keep = order[rank < max_pairs_per_query].sort().values  # back to (query, row) order
        query_idx, rows = query_idx[keep], rows[keep]
    return query_idx.long(), rows.long()


def draw_relevant(relevant: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One uniformly drawn relevant database row per query: (Q,) long from a boolean (Q, N) relevance matrix.

    Every query needs at least one relevant row. The draw is one vectorised call (no Python
    loop over queries) and takes its random numbers from ``generator``, so a seeded run repeats it.
    """
    relevant = torch.as_tensor(relevant)
    if relevant.ndim != 2 or relevant.dtype != torch.bool:
        raise TypeError(
            f"relevant must be a boolean (queries, rows) matrix, got {relevant.dtype} {tuple(relevant.shape)}"
        )
    empty = (~relevant.any(1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f"{len(empty)} queries (first: {empty[:5].tolist()}) have no relevant row; drop them first")
    return torch.multinomial(relevant.float(), 1, generator=generator).flatten()


@dataclass
class SameClassTargets:
    """Retrieval examples whose target is redrawn every epoch: query i -> one random relevant row.

    Instead of fixed (query, relevant ID) pairs, each epoch pairs every query image once with a
    relevant database row drawn uniformly (:func:`draw_relevant`, seeded by the training run's
    generator), so over the epochs a query meets many relevant IDs while an epoch stays one
    example per query. ``relevant`` is a boolean (n_queries, n_rows) matrix; queries with no
    relevant row are left out. Build it from labels with :meth:`from_labels`.
    """

    images: torch.Tensor
    relevant: torch.Tensor
    name: str = "retrieval"

    def __post_init__(self) -> None:
        self.images = _as_images(self.images)
        self.relevant = (
            torch.as_tensor(np.asarray(self.relevant) if not isinstance(self.relevant, torch.Tensor) else self.relevant)
            .cpu()
            .bool()
        )
        if self.relevant.ndim != 2 or len(self.relevant) != len(self.images):
            raise ValueError(
                f"relevant must be (n_queries, n_rows) with one row per image; got {tuple(self.relevant.shape)} "
                f"for {len(self.images)} images"
            )
        self.query_idx = self.relevant.any(1).nonzero().flatten()  # queries that have a relevant row

    def __len__(self) -> int:
        return len(self.query_idx)

    @classmethod
    def from_labels(
        cls, images: torch.Tensor, query_labels: Any, db_labels: Any, *, name: str = "retrieval"
    ) -> SameClassTargets:
        """Targets drawn among the rows relevant by :func:`~vitdsi_utils.data.relevance.label_relevance` (same class / shared label)."""

        relevant = label_relevance(_labels(query_labels).numpy(), _labels(db_labels).numpy())
        return cls(images, torch.from_numpy(np.asarray(relevant, dtype=bool)), name=name)


@dataclass
class AugmentedViews:
    """Randomly flipped and cropped views of the indexed images, each -> its own image's row.

    Extra retrieval examples: a view is a slightly different picture of an indexed image, a
    stand-in for a query that shows the same thing. Each epoch holds ``views`` examples per
    image, and every example gets a fresh view when its batch is built (:func:`augment.augment`
    with ``flip`` and ``min_crop``, seeded by the training run's generator).
    """

    images: torch.Tensor
    rows: torch.Tensor | None = None
    views: int = 1
    flip: bool = True
    min_crop: float = 0.7
    name: str = "views"

    def __post_init__(self) -> None:
        self.images = _as_images(self.images)
        self.rows = torch.arange(len(self.images)) if self.rows is None else _as_long(self.rows)
        if len(self.rows) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.rows)} rows")
        if isinstance(self.views, bool) or not isinstance(self.views, Integral) or self.views < 1:
            raise ValueError(f"views must be an integer >= 1 (views of each image per epoch), got {self.views!r}")
        if not 0 < self.min_crop <= 1:
            raise ValueError(f"min_crop must lie in (0, 1] (1: no crops), got {self.min_crop}")

    def __len__(self) -> int:
        return len(self.rows) * self.views


@dataclass
class Task:
    name: str
    images: torch.Tensor
    rows: torch.Tensor
    image_idx: torch.Tensor | None  # None: example i reads image i
    augment: tuple[bool, float] | None = None  # (flip, min_crop): a fresh random view per example and batch
    relevant: torch.Tensor | None = None  # (n_examples, n_rows) bool: rows redrawn every epoch among these


def as_tasks(tasks: Any) -> list[Task]:
    if tasks is None:
        return []
    if isinstance(tasks, (IndexingTask, RetrievalPairs, tuple)):
        tasks = [tasks]
    out = []
    for t in tasks:
        if isinstance(t, IndexingTask):
            out.append(Task(t.name, t.images, t.rows, None))
        elif isinstance(t, RetrievalPairs):
            out.append(Task(t.name, t.images, t.rows, t.query_idx))
        elif isinstance(t, SameClassTargets):
            relevant = t.relevant[t.query_idx]
            out.append(Task(t.name, t.images, relevant.float().argmax(1), t.query_idx, relevant=relevant))
        elif isinstance(t, AugmentedViews):
            n = len(t.images)
            out.append(
                Task(
                    t.name,
                    t.images,
                    t.rows.repeat(t.views),
                    torch.arange(n).repeat(t.views),
                    augment=(t.flip, t.min_crop),
                )
            )
        elif isinstance(t, tuple) and len(t) in (3, 4):
            name, images, rows = t[0], _as_images(t[1]), _as_long(t[2])
            idx = _as_long(t[3]) if len(t) == 4 and t[3] is not None else None
            if idx is None and len(rows) != len(images):
                raise ValueError(f"task {name!r}: {len(images)} images but {len(rows)} rows")
            out.append(Task(str(name), images, rows, idx))
        else:
            raise TypeError(
                "a task is IndexingTask, RetrievalPairs, SameClassTargets, AugmentedViews or "
                f"(name, images, rows[, image_idx]); got {type(t).__name__}"
            )
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be distinct, got {names}")
    return out


class Pool:
    """The examples of several tasks on one device: images once, per-example index tensors."""

    def __init__(self, tasks: list[Task], codec: IDCodec, device: torch.device):
        self.names = [t.name for t in tasks]
        unique: dict[int, int] = {}  # id(images tensor) -> offset in the joint tensor
        chunks, offset = [], 0
        for t in tasks:
            if id(t.images) not in unique:
                unique[id(t.images)] = offset
                chunks.append(t.images)
                offset += len(t.images)
        self.images = chunks[0].to(device) if len(chunks) == 1 else torch.cat([c.to(device) for c in chunks])
        image_idx, rows, task, self.spans = [], [], [], []
        start = 0
        for i, t in enumerate(tasks):
            n = len(t.rows)
            if n and (t.rows.min() < 0 or t.rows.max() >= len(codec)):
                raise ValueError(f"task {t.name!r} has rows outside 0..{len(codec) - 1}")
            local = torch.arange(n) if t.image_idx is None else t.image_idx
            image_idx.append(local + unique[id(t.images)])
            rows.append(t.rows)
            task.append(torch.full((n,), i, dtype=torch.long))
            self.spans.append((start, n))
            start += n
        self.image_idx = torch.cat(image_idx).to(device)
        self.rows = torch.cat(rows).to(device)
        self.task = torch.cat(task).to(device)
        self.augments = [t.augment for t in tasks]  # per task: (flip, min_crop) or None
        self.augmented = {i for i, a in enumerate(self.augments) if a is not None}
        self.resampled = [(i, t.relevant) for i, t in enumerate(tasks) if t.relevant is not None]
        for i, relevant in self.resampled:
            if relevant.shape[1] != len(codec):
                raise ValueError(
                    f"task {self.names[i]!r}: relevance over {relevant.shape[1]} rows, codec has {len(codec)}"
                )
        self.targets = codec.targets().to(device)  # (n_ids, L)
        self.inputs = codec.decoder_inputs(self.targets)  # (n_ids, L)
        self.device = device

    def __len__(self) -> int:
        return len(self.rows)

    def epoch_order(self, generator: torch.Generator, counts: dict[str, int] | None = None) -> torch.Tensor:
        """Shuffled example ids of one epoch; ``counts`` resamples named tasks to that many examples."""
        parts = []
        for name, (start, n) in zip(self.names, self.spans):
            want = n if counts is None or name not in counts else counts[name]
            ids = torch.arange(start, start + n)
            if want != n:
                # whole copies while the task is too small, then a random remainder without replacement
                extra = torch.randperm(n, generator=generator)[: want % n] + start
                ids = torch.cat([ids.repeat(want // n), extra])
            parts.append(ids)
        ids = torch.cat(parts)
        return ids[torch.randperm(len(ids), generator=generator)].to(self.device)

    def resample(self, generator: torch.Generator) -> None:
        """Redraw the target row of every example of the redrawn tasks (one vectorised draw per task)."""
        for i, relevant in self.resampled:
            start, n = self.spans[i]
            self.rows[start : start + n] = draw_relevant(relevant, generator).to(self.device)

    def batch(
        self, ids: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images (B,H,W,3) uint8, decoder inputs (B,L), targets (B,L), task ids (B,)) of example ids (B,).

        With ``generator``, the examples of augmented tasks get a fresh random view each.
        """
        rows, task = self.rows[ids], self.task[ids]
        images = self.images[self.image_idx[ids]]
        if generator is not None:
            for i in self.augmented:
                mask = task == i
                if bool(mask.any()):
                    flip, min_crop = self.augments[i]
                    images[mask] = augment(images[mask], generator, flip=flip, min_crop=min_crop)
        return images, self.inputs[rows], self.targets[rows], task
