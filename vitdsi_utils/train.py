"""Training: indexing (image -> own ID), retrieval fine-tuning (query -> relevant ID), multi-task.

Retrieval fine-tuning has two optional extras: targets redrawn every epoch among a query's
relevant IDs (:class:`SameClassTargets`) and augmented views of the indexed images as extra
queries for their own ID (:class:`AugmentedViews`).

All three run through :func:`fit`, one loop over *tasks*: a task is a set of examples
``image -> database row`` with a name. Every task's images are moved to the training device
once; an epoch is a seeded ``torch.randperm`` over the examples of all tasks together and a
batch is an index slice of it, so there is no per-sample Python work and no DataLoader.

The loss is cross-entropy over every decoder position except PAD targets, computed for all
positions in one teacher-forced pass. Metrics per epoch and task (``History`` rows): loss
(per non-PAD token), token accuracy (non-PAD positions) and sequence accuracy (every non-PAD
position right under teacher forcing). Train metrics are running values over the epoch in
train mode (dropout on), as the paper's training curves are; validation runs in eval mode.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Sequence, TypeVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._io import atomic_path, write_json
from .augment import augment
from .ids import IDCodec
from .model import DSIConfig, DSIModel

_C = TypeVar("_C", bound="PlainConfig")

CHECKPOINT_FORMAT = 1
STOP_METRICS = ("ia", "eval", "train")
HISTORY_COLUMNS = ("phase", "epoch", "split", "task", "loss", "token_acc", "seq_acc", "seconds", "n_examples")


#: Integer fields of TrainConfig and their smallest allowed value.
_TRAIN_INTS = {"batch_size": 1, "epochs": 0, "seed": 0, "warmup_steps": 0, "eval_every": 1, "eval_batch_size": 1,
               "checkpoint_every": 1, "stop_beam": 1, "stop_check_every": 0}
_TRAIN_FLOATS = ("lr", "target_accuracy", "weight_decay", "label_smoothing", "grad_clip", "stop_check_from")


class PlainConfig:
    """``to_dict`` / ``from_dict`` of the training configs (dataclasses of plain values).

    ``from_dict`` ignores keys it does not know, so a checkpoint written by a version with more
    settings still loads; a missing key takes its default.
    """

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[_C], values: dict[str, Any]) -> _C:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class TrainConfig(PlainConfig):
    """Optimisation settings of :func:`fit` (plain values, stored in checkpoints)."""

    lr: float = 5e-4  # Adam learning rate (after warm-up)
    batch_size: int = 32  # examples per optimiser step
    epochs: int = 200  # at most this many epochs per phase
    target_accuracy: float = 0.98  # stop once the stop_on task's accuracy (see stop_metric) reaches this
    # How that accuracy is read, after the epoch's last step:
    # "ia": IA@1 of beam search (beam ``stop_beam``) over the stop task's images, each of which must
    #       return its own ID first: what the evaluation measures (tasks with one example per image,
    #       as indexing; else "eval");
    #       it runs only on epochs where the cheaper "eval" check already passes;
    # "eval": teacher-forced sequence accuracy in eval mode (no dropout), i.e. greedy decoding;
    # "train": the running accuracy during the epoch, with dropout (cheapest; lags the model).
    stop_metric: str = "ia"
    # beam width of the "ia" check: the evaluation's top-100 beam (a wider beam can find a wrong ID
    # that outscores the right one, so a narrower check would promise more than the evaluation finds)
    stop_beam: int = 100
    stop_check_from: float = 0.8  # "ia"/"eval": check only on epochs whose running accuracy reaches this x target
    # "ia"/"eval": also check every this many epochs, whatever the running accuracy (0: never). Dropout
    # can hold the running accuracy far below the model's: at N = 13,394 with 5-digit IDs it read 0.64
    # while IA@1 was 0.99, so the gate above never opened
    stop_check_every: int = 0
    weight_decay: float = 0.0  # > 0 switches Adam to AdamW (decoupled decay)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    seed: int = 0  # seeds the epoch permutations and torch's RNG (dropout) of a fresh run
    device: str = "auto"  # "auto" (cuda if available, else cpu), or any torch device string
    amp: bool = True  # bf16 autocast; only on CUDA (CPU stays float32)
    compile: bool = False  # torch.compile the model; only on CUDA
    progress: bool = True  # tqdm bar over epochs with loss/accuracy
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    warmup_steps: int = 0  # linear learning-rate warm-up over this many steps
    eval_every: int = 1  # validate every n epochs (and after the last)
    eval_batch_size: int = 256  # examples per validation pass
    checkpoint_every: int = 1  # with a checkpoint path: save every n epochs (and after the last)

    def __post_init__(self) -> None:
        for name, low in _TRAIN_INTS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r} ({type(value).__name__})")
            setattr(self, name, int(value))
        for name in _TRAIN_FLOATS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
                hint = ""
                if isinstance(value, str):
                    # YAML 1.1 (PyYAML) reads 1e-3 as text; it needs a dot in the mantissa
                    hint = "; in a YAML profile write numbers like 1e-3 as 1.0e-3 or 0.001"
                raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__}){hint}")
            setattr(self, name, float(value))
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.stop_metric not in STOP_METRICS:
            raise ValueError(f"stop_metric must be one of {STOP_METRICS}, got {self.stop_metric!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay} and {self.grad_clip}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda if available else cpu; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) random generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    ) -> "RetrievalPairs":
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
    right form. Relevance is :func:`metrics.label_relevance`, the one the metrics use, so the
    pairs teach exactly what the evaluation rewards. Pairs come sorted by query, then row. With
    ``max_pairs_per_query`` a query keeps a seeded random subset of at most that many rows.
    """
    from .metrics import label_relevance

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
        raise TypeError(f"relevant must be a boolean (queries, rows) matrix, got {relevant.dtype} {tuple(relevant.shape)}")
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
        self.relevant = torch.as_tensor(np.asarray(self.relevant) if not isinstance(self.relevant, torch.Tensor)
                                        else self.relevant).cpu().bool()
        if self.relevant.ndim != 2 or len(self.relevant) != len(self.images):
            raise ValueError(
                f"relevant must be (n_queries, n_rows) with one row per image; got {tuple(self.relevant.shape)} "
                f"for {len(self.images)} images"
            )
        self.query_idx = self.relevant.any(1).nonzero().flatten()  # queries that have a relevant row

    def __len__(self) -> int:
        return len(self.query_idx)

    @classmethod
    def from_labels(cls, images: torch.Tensor, query_labels: Any, db_labels: Any, *, name: str = "retrieval"
                    ) -> "SameClassTargets":
        """Targets drawn among the rows relevant by :func:`metrics.label_relevance` (same class / shared label)."""
        from .metrics import label_relevance

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
class _Task:
    name: str
    images: torch.Tensor
    rows: torch.Tensor
    image_idx: torch.Tensor | None  # None: example i reads image i
    augment: tuple[bool, float] | None = None  # (flip, min_crop): a fresh random view per example and batch
    relevant: torch.Tensor | None = None  # (n_examples, n_rows) bool: rows redrawn every epoch among these


def _as_tasks(tasks: Any) -> list[_Task]:
    if tasks is None:
        return []
    if isinstance(tasks, (IndexingTask, RetrievalPairs, tuple)):
        tasks = [tasks]
    out = []
    for t in tasks:
        if isinstance(t, IndexingTask):
            out.append(_Task(t.name, t.images, t.rows, None))
        elif isinstance(t, RetrievalPairs):
            out.append(_Task(t.name, t.images, t.rows, t.query_idx))
        elif isinstance(t, SameClassTargets):
            relevant = t.relevant[t.query_idx]
            out.append(_Task(t.name, t.images, relevant.float().argmax(1), t.query_idx, relevant=relevant))
        elif isinstance(t, AugmentedViews):
            n = len(t.images)
            out.append(_Task(t.name, t.images, t.rows.repeat(t.views), torch.arange(n).repeat(t.views),
                             augment=(t.flip, t.min_crop)))
        elif isinstance(t, tuple) and len(t) in (3, 4):
            name, images, rows = t[0], _as_images(t[1]), _as_long(t[2])
            idx = _as_long(t[3]) if len(t) == 4 and t[3] is not None else None
            if idx is None and len(rows) != len(images):
                raise ValueError(f"task {name!r}: {len(images)} images but {len(rows)} rows")
            out.append(_Task(str(name), images, rows, idx))
        else:
            raise TypeError(
                "a task is IndexingTask, RetrievalPairs, SameClassTargets, AugmentedViews or "
                f"(name, images, rows[, image_idx]); got {type(t).__name__}"
            )
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be distinct, got {names}")
    return out


class _Pool:
    """The examples of several tasks on one device: images once, per-example index tensors."""

    def __init__(self, tasks: list[_Task], codec: IDCodec, device: torch.device):
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
                raise ValueError(f"task {self.names[i]!r}: relevance over {relevant.shape[1]} rows, codec has {len(codec)}")
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


# ------------------------------------------------------------------------------------------
# Loss and metrics
# ------------------------------------------------------------------------------------------
def token_losses(logits: torch.Tensor, targets: torch.Tensor, pad: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy per position (B, L) of logits (B, L, V) against targets (B, L); 0 at PAD targets."""
    return F.cross_entropy(
        logits.float().transpose(1, 2), targets, ignore_index=pad, label_smoothing=label_smoothing, reduction="none"
    )


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, pad: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the non-PAD positions of a batch (the training objective)."""
    mask = targets != pad
    return token_losses(logits, targets, pad, label_smoothing).sum() / mask.sum().clamp_min(1)


# columns of the per-task running sums
_LOSS, _TOKENS, _TOKEN_OK, _SEQ_OK, _N = range(5)


def _batch_stats(logits: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-example (B, 5): loss sum, non-PAD tokens, right tokens, sequence right, 1."""
    mask = targets != pad
    right = (logits.argmax(dim=-1) == targets) & mask  # (B, L)
    ones = torch.ones_like(targets[:, 0])
    columns = [losses.detach().sum(1), mask.sum(1), right.sum(1), (right | ~mask).all(1), ones]
    return torch.stack([c.to(torch.float64) for c in columns], dim=1)


def _summaries(sums: torch.Tensor, names: list[str]) -> dict[str, dict[str, float]]:
    """Per-task metrics (and "all" when there are several tasks) from (n_tasks, 5) sums."""
    sums = sums.cpu()
    groups = {name: sums[i] for i, name in enumerate(names)}
    if len(names) > 1:
        groups["all"] = sums.sum(0)
    out = {}
    for name, s in groups.items():
        tokens, n = max(float(s[_TOKENS]), 1.0), max(float(s[_N]), 1.0)
        out[name] = {
            "loss": float(s[_LOSS]) / tokens,
            "token_acc": float(s[_TOKEN_OK]) / tokens,
            "seq_acc": float(s[_SEQ_OK]) / n,
            "n_examples": int(s[_N]),
        }
    return out


def _autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()


@torch.no_grad()
def _evaluate_pool(model: DSIModel, pool: _Pool, pad: int, batch_size: int, amp: bool) -> torch.Tensor:
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(pool.names), 5, dtype=torch.float64, device=pool.device)
    try:
        for start in range(0, len(pool), batch_size):
            ids = torch.arange(start, min(start + batch_size, len(pool)), device=pool.device)
            images, inputs, targets, task = pool.batch(ids)
            with _autocast(pool.device, amp):
                logits = model(images, inputs)
            sums.index_add_(0, task, _batch_stats(logits, targets, token_losses(logits, targets, pad), pad))
    finally:
        model.train(was_training)
    return sums


def evaluate(
    model: DSIModel, codec: IDCodec, tasks: Any, *, batch_size: int = 256, amp: bool = True
) -> dict[str, dict[str, float]]:
    """Teacher-forced loss / token_acc / seq_acc per task (and "all"), in eval mode, on the model's device."""
    pool = _Pool(_as_tasks(tasks), codec, model.device)
    return _summaries(_evaluate_pool(model, pool, codec.pad, batch_size, amp), pool.names)


# ------------------------------------------------------------------------------------------
# History
# ------------------------------------------------------------------------------------------
class History(list):
    """Per-epoch metric rows (dicts with :data:`HISTORY_COLUMNS`), one per phase/epoch/split/task."""

    def to_frame(self) -> pd.DataFrame:
        """The rows as a DataFrame with the standard columns first."""
        frame = pd.DataFrame(list(self))
        if frame.empty:
            return pd.DataFrame(columns=list(HISTORY_COLUMNS))
        first = [c for c in HISTORY_COLUMNS if c in frame.columns]
        return frame[first + [c for c in frame.columns if c not in first]]

    def save_csv(self, path: str | os.PathLike) -> Path:
        """Write the rows as CSV atomically; return the path."""
        with atomic_path(path) as tmp:
            self.to_frame().to_csv(tmp, index=False)
        return Path(path)

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the rows as a JSON list atomically; return the path."""
        return write_json(path, list(self))

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> "History":
        return cls(json.loads(Path(path).read_text()))

    def last(self, split: str = "train", task: str | None = None, phase: str | None = None) -> dict | None:
        """The latest row matching split (and task / phase when given), or None."""
        for row in reversed(self):
            if row["split"] == split and task in (None, row["task"]) and phase in (None, row["phase"]):
                return row
        return None


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------
def _rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state() if generator is not None else None,
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"].cpu())


def restore_training(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    history: list,
    generator: torch.Generator | None,
) -> None:
    """Put a run back where checkpoint ``state`` left it: weights, optimiser, history rows and RNG streams.

    Shared by every resumable training loop (DSI, dense encoder, self-supervised encoder); each
    reads its own epoch and step counters from ``state``. A checkpoint saved without an
    optimiser leaves ``optimizer`` as it is.
    """
    model.load_state_dict(state["model"])
    if state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    history[:] = state["history"]
    _set_rng_state(state["rng"], generator)


def _plain(value: Any, where: str) -> Any:
    """``value`` with NumPy scalars as Python numbers and paths as text; TypeError for anything else but plain data.

    A checkpoint is read with ``weights_only=True``, which refuses every object that is not a
    tensor or plain data, so an odd value must fail when the checkpoint is written, not hours
    later when it is read.
    """
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"checkpoint entry {where} is a {type(value).__name__}; checkpoints hold only tensors and plain data "
        "(numbers, text, lists, dicts) so that loading one never runs code: convert it first"
    )


def save_checkpoint(
    path: str | os.PathLike,
    model: DSIModel,
    optimizer: torch.optim.Optimizer | None,
    config: DSIConfig,
    train_config: TrainConfig | dict | None,
    epoch: int,
    history: Sequence[dict] | None,
    codec: IDCodec,
    *,
    generator: torch.Generator | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write model, optimiser, configs (as dicts), codec codes, history and RNG states atomically.

    Everything is plain data or tensors, so :func:`load_checkpoint` can use ``weights_only=True``.
    """
    if isinstance(train_config, TrainConfig):
        train_config = train_config.to_dict()
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "config": _plain(config.to_dict(), "config"),
        "train_config": _plain(dict(train_config), "train_config") if train_config is not None else None,
        "epoch": int(epoch),
        "history": _plain([dict(r) for r in history], "history") if history is not None else [],
        "codec": {"codes": [[int(t) for t in c] for c in codec.codes], "base": int(codec.base)},
        "rng": _rng_state(generator),
        "extra": _plain(dict(extra or {}), "extra"),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, refused as unsafe, or written for another run."""


#: Entries every checkpoint of :func:`save_checkpoint` holds.
CHECKPOINT_KEYS = ("format", "model", "optimizer", "config", "train_config", "epoch", "history", "codec", "rng", "extra")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    The file is read with ``weights_only=True``: only tensors and plain data (dicts, lists,
    numbers, strings) are accepted, so nothing in it can run code. A file holding any other
    object is refused with :class:`CheckpointError`, as is a damaged or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects other than tensors and plain data, and "
                "unpickling them could run arbitrary code. vitdsi checkpoints never hold such objects; if you "
                "did not write this file yourself, delete it (and train again)"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({error}); delete it and train again") from error
    except Exception as error:  # torch reports a damaged file as EOFError, RuntimeError, KeyError, ...
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(error).__name__}: {reason}); it is damaged or was not "
            "written by vitdsi. Delete it and train again"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path}: unknown checkpoint format {found!r} (this version reads format {CHECKPOINT_FORMAT}); "
            "delete it and train again"
        )
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the checkpoint entries {missing}; delete it and train again")
    return state


def checkpoint_mismatches(
    state: dict[str, Any],
    *,
    config: DSIConfig | dict[str, Any] | None = None,
    codec: IDCodec | None = None,
    data: dict[str, Any] | None = None,
) -> list[str]:
    """What differs between a loaded checkpoint and the run that wants it, one line per field.

    ``config``: the model configuration the run asks for (a :class:`DSIConfig`, or a dict of
    the fields to check). ``codec``: the IDs the run uses. ``data``: facts about the database
    (e.g. :meth:`Database.fingerprint <vitdsi_utils.data.Database.fingerprint>`); a key the
    checkpoint does not record (older checkpoints) is not checked.
    """
    problems = []
    if config is not None:
        wanted = config.to_dict() if isinstance(config, DSIConfig) else dict(config)
        defaults = DSIConfig().to_dict()
        saved = {**defaults, **state["config"]}  # a field added after the checkpoint was written has its default
        for key, value in wanted.items():
            if saved.get(key) != value:
                problems.append(f"model {key}: saved {saved.get(key)!r}, requested {value!r}")
    if codec is not None:
        saved_codes = [tuple(c) for c in state["codec"]["codes"]]
        saved_base = state["codec"]["base"]
        if saved_base != codec.base:
            problems.append(f"ID base: saved {saved_base}, requested {codec.base}")
        if len(saved_codes) != len(codec.codes):
            problems.append(f"IDs: saved {len(saved_codes)} IDs, requested {len(codec.codes)}")
        elif saved_codes != codec.codes:
            row = next(r for r, (a, b) in enumerate(zip(saved_codes, codec.codes)) if a != b)
            problems.append(f"IDs: row {row} has ID {saved_codes[row]} saved, {codec.codes[row]} requested")
    if data is not None:
        saved_data = state["extra"].get("data") or {}
        for key, value in data.items():
            if key in saved_data and saved_data[key] != value:
                problems.append(f"data {key}: saved {saved_data[key]!r}, requested {value!r}")
    return problems


def check_checkpoint(
    state: dict[str, Any],
    path: str | os.PathLike,
    *,
    config: DSIConfig | dict[str, Any] | None = None,
    codec: IDCodec | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Raise :class:`CheckpointError` naming every mismatch found by :func:`checkpoint_mismatches`."""
    problems = checkpoint_mismatches(state, config=config, codec=codec, data=data)
    if problems:
        raise CheckpointError(
            f"{path} was written for another database or model: " + "; ".join(problems)
            + ". Delete it (or use another run folder) to train for these settings, or request the saved ones"
        )


def load_model(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    expect_config: DSIConfig | dict[str, Any] | None = None,
    expect_codec: IDCodec | None = None,
    expect_data: dict[str, Any] | None = None,
) -> tuple[DSIModel, IDCodec, dict]:
    """(model in eval mode, codec, meta: every other checkpoint entry but weights, optimiser and RNG).

    With ``expect_*`` the checkpoint must match that model configuration, those IDs and that
    database (see :func:`checkpoint_mismatches`), or :class:`CheckpointError` names the difference.
    """
    state = load_checkpoint(path, map_location)
    check_checkpoint(state, path, config=expect_config, codec=expect_codec, data=expect_data)
    model = DSIModel(DSIConfig.from_dict(state["config"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: the weights do not fit the model configuration stored beside them ({str(error)[:200]}); "
            "the file is damaged: delete it and train again"
        ) from error
    model.to(map_location).eval()
    codec = IDCodec([tuple(c) for c in state["codec"]["codes"]], base=state["codec"]["base"])
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "rng")}
    meta["history"] = History(meta["history"])
    return model, codec, meta


# ------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------
def make_optimizer(model: DSIModel, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam, or AdamW when weight_decay > 0; fused kernels on CUDA."""
    fused = {"fused": True} if model.device.type == "cuda" else {}
    if config.weight_decay > 0:
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, **fused)
    return torch.optim.Adam(model.parameters(), lr=config.lr, **fused)


def _epoch_counts(pool: _Pool, mix_ratio: float | None) -> dict[str, int] | None:
    if mix_ratio is None:
        return None
    if "indexing" not in pool.names:
        raise ValueError("mix_ratio is relative to an 'indexing' task, and there is none")
    n_index = pool.spans[pool.names.index("indexing")][1]
    # augmented views keep their own count (views per indexed image): the ratio is about retrieval queries
    return {name: max(1, round(mix_ratio * n_index)) for i, name in enumerate(pool.names)
            if name != "indexing" and i not in pool.augmented}


def fit(
    model: DSIModel,
    codec: IDCodec,
    train: Any,
    *,
    val: Any = None,
    config: TrainConfig | None = None,
    history: History | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = True,
    stop_on: str | None = "indexing",
    phase: str | None = None,
    mix_ratio: float | None = None,
    data_info: dict[str, Any] | None = None,
) -> History:
    """Train ``model`` in place on the tasks in ``train``; return the history (``history`` extended).

    ``train`` / ``val``: a list of :class:`IndexingTask`, :class:`RetrievalPairs`,
    :class:`SameClassTargets` (targets redrawn at the start of every epoch),
    :class:`AugmentedViews` (a fresh random view per example and batch) or
    ``(name, images, rows[, image_idx])`` tuples. The examples of all tasks share one shuffled
    epoch; ``mix_ratio`` resamples every task but "indexing" and augmented views to
    ``mix_ratio * n_indexing`` examples per epoch. Validation never augments or redraws (a
    :class:`SameClassTargets` given as ``val`` scores each query's first relevant row). Training stops after ``config.epochs`` epochs or once task
    ``stop_on``'s sequence accuracy on its training examples reaches ``config.target_accuracy``
    (None: never early). By default (``config.stop_metric="ia"``) that is re-measured after the
    epoch without dropout, first teacher-forced and then, for an indexing task, as IA@1 of beam
    search, so a stopped indexing run really has that IA@1; those checks are kept in the
    history as split "train_eval" (column ``ia1`` where beam search ran).
    With ``checkpoint_path`` a checkpoint is saved every ``config.checkpoint_every`` epochs;
    if it exists and ``resume``, training continues from it exactly where it stopped.
    ``data_info`` (plain values describing the database, e.g. ``Database.fingerprint()``) is
    stored in the checkpoint; resuming from a checkpoint of another phase, model
    configuration, ID set or database raises :class:`CheckpointError` naming the difference.
    """
    config = config or TrainConfig()
    model.check_codec(codec)
    device = resolve_device(config.device)
    tasks, val_tasks = _as_tasks(train), _as_tasks(val)
    if not tasks:
        raise ValueError("nothing to train on")
    names = [t.name for t in tasks]
    if stop_on is not None and stop_on not in names:
        raise ValueError(f"stop_on={stop_on!r} names no training task (tasks: {names}); pass stop_on=None")
    phase = phase or "+".join(names)
    history = History() if history is None else history
    model.to(device)
    pool = _Pool(tasks, codec, device)
    val_pool = _Pool(val_tasks, codec, device) if val_tasks else None
    counts = _epoch_counts(pool, mix_ratio)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    step_model = model
    if config.compile:
        if device.type == "cuda":
            step_model = torch.compile(model)
        else:
            warnings.warn("TrainConfig.compile only applies on CUDA; training uncompiled", stacklevel=2)

    start_epoch, step, stopped = 0, 0, False
    if checkpoint_path is not None and resume and Path(checkpoint_path).exists():
        state = load_checkpoint(checkpoint_path, map_location=device)
        if state["extra"].get("phase") != phase:
            raise CheckpointError(
                f"{checkpoint_path} holds phase {state['extra'].get('phase')!r}, not {phase!r}; "
                "give each phase its own checkpoint path"
            )
        check_checkpoint(state, checkpoint_path, config=model.config, codec=codec, data=data_info)
        restore_training(state, model, optimizer, history, generator)
        start_epoch, step, stopped = state["epoch"], state["extra"]["step"], state["extra"]["stopped"]
    else:
        torch.manual_seed(config.seed)

    def save(epoch: int) -> None:
        extra = {"phase": phase, "step": step, "stopped": stopped, "mix_ratio": mix_ratio, "data": dict(data_info or {})}
        save_checkpoint(
            checkpoint_path, model, optimizer, model.config, config, epoch, history, codec,
            generator=generator, extra=extra,
        )

    stop_pool = None  # the stop task alone, built on the first eval-mode check
    shown = names[0] if len(names) == 1 else "all"  # the task whose numbers the progress bar shows
    epochs = range(start_epoch, start_epoch if stopped else config.epochs)  # a finished run resumes to a no-op
    bar = tqdm(epochs, initial=start_epoch, total=config.epochs, desc=phase, disable=not config.progress)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        pool.resample(generator)  # redrawn targets (same-class mode); a no-op for fixed pairs
        order = pool.epoch_order(generator, counts)
        sums = torch.zeros(len(names), 5, dtype=torch.float64, device=device)
        for start in range(0, len(order), config.batch_size):
            images, inputs, targets, task = pool.batch(order[start : start + config.batch_size], generator)
            if config.warmup_steps:
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps)
            with _autocast(device, config.amp):
                logits = step_model(images, inputs)  # (B, L, V)
            losses = token_losses(logits, targets, codec.pad, config.label_smoothing)  # (B, L)
            loss = losses.sum() / (targets != codec.pad).sum().clamp_min(1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            # summed on the device: no host sync inside the epoch
            sums.index_add_(0, task, _batch_stats(logits.detach(), targets, losses, codec.pad))
        train_metrics = _summaries(sums, names)  # copies to the host, so the timing includes queued GPU work
        seconds = time.perf_counter() - t0
        for task_name, m in train_metrics.items():
            row = {"phase": phase, "epoch": epoch + 1, "split": "train", "task": task_name}
            history.append({**row, **m, "seconds": seconds})
        stopped = _reached_target(train_metrics, stop_on, config, epoch + 1)
        if stopped is None:  # running accuracy close enough: re-score the stop task without dropout
            t1 = time.perf_counter()
            stop_task = tasks[names.index(stop_on)]
            stop_pool = stop_pool or _Pool([stop_task], codec, device)
            m = _summaries(
                _evaluate_pool(step_model, stop_pool, codec.pad, config.eval_batch_size, config.amp), [stop_on]
            )[stop_on]
            stopped = m["seq_acc"] >= config.target_accuracy
            if stopped and config.stop_metric == "ia" and stop_task.image_idx is None:  # image i -> row i
                m["ia1"] = _indexing_accuracy(model, codec, stop_task, config.stop_beam)
                stopped = m["ia1"] >= config.target_accuracy
            row = {"phase": phase, "epoch": epoch + 1, "split": "train_eval", "task": stop_on}
            history.append({**row, **m, "seconds": time.perf_counter() - t1})
        last = stopped or epoch + 1 == config.epochs
        postfix = {
            "loss": f"{train_metrics[shown]['loss']:.4f}",
            "acc": f"{train_metrics[stop_on or shown]['seq_acc']:.3f}",
        }
        if val_pool is not None and ((epoch + 1) % config.eval_every == 0 or last):
            t1 = time.perf_counter()
            val_metrics = _summaries(
                _evaluate_pool(step_model, val_pool, codec.pad, config.eval_batch_size, config.amp), val_pool.names
            )
            seconds = time.perf_counter() - t1
            for task_name, m in val_metrics.items():
                row = {"phase": phase, "epoch": epoch + 1, "split": "val", "task": task_name}
                history.append({**row, **m, "seconds": seconds})
            val_shown = val_pool.names[0] if len(val_pool.names) == 1 else "all"
            postfix["val_acc"] = f"{val_metrics[val_shown]['seq_acc']:.3f}"
        bar.set_postfix(postfix)
        if checkpoint_path is not None and ((epoch + 1) % config.checkpoint_every == 0 or last):
            save(epoch + 1)
        if stopped:
            break
    bar.close()
    return history


def _reached_target(train_metrics: dict, stop_on: str | None, config: TrainConfig, epoch: int) -> bool | None:
    """True / False: stop or not; None: re-score in eval mode to decide (the running accuracy is close,
    or ``epoch`` is one of the periodic ``stop_check_every`` checks)."""
    if stop_on is None:
        return False
    running = train_metrics[stop_on]["seq_acc"]
    if config.stop_metric == "train":
        return running >= config.target_accuracy
    periodic = config.stop_check_every > 0 and epoch % config.stop_check_every == 0
    return None if periodic or running >= config.stop_check_from * config.target_accuracy else False


def _indexing_accuracy(model: DSIModel, codec: IDCodec, task: _Task, beam: int) -> float:
    """IA@1: the share of the task's images whose beam-search top-1 is their own row."""
    from .decoding import indexing_accuracy  # decoding imports the model module too; keep train importable alone

    return indexing_accuracy(model, codec, task.images, task.rows, beam_size=max(1, beam))


def train_indexing(
    model: DSIModel, codec: IDCodec, images: torch.Tensor, rows: torch.Tensor | None = None, **kwargs: Any
) -> History:
    """Indexing phase: database image i (n, H, W, 3) -> the ID of ``rows[i]`` (default i), until target accuracy.

    Keyword arguments go to :func:`fit` (val, config, history, checkpoint_path, resume, ...).
    """
    kwargs.setdefault("stop_on", "indexing")
    return fit(model, codec, [IndexingTask(images, rows)], phase=kwargs.pop("phase", "indexing"), **kwargs)


def train_retrieval(model: DSIModel, codec: IDCodec, pairs: RetrievalPairs, **kwargs: Any) -> History:
    """Retrieval fine-tuning: query image -> relevant database ID, ``config.epochs`` epochs unless ``stop_on``.

    Keyword arguments go to :func:`fit`; pass ``val=RetrievalPairs(...)`` for the validation curves.
    """
    kwargs.setdefault("stop_on", None)
    return fit(model, codec, [pairs], phase=kwargs.pop("phase", "retrieval"), **kwargs)


def train_multitask(
    model: DSIModel,
    codec: IDCodec,
    indexing: IndexingTask,
    pairs: RetrievalPairs,
    *,
    mix_ratio: float | None = 1.0,
    **kwargs: Any,
) -> History:
    """Indexing and retrieval examples in one shuffled epoch; ``mix_ratio`` retrieval pairs per indexing example.

    ``mix_ratio=None`` uses every retrieval pair once per epoch. Keyword arguments go to :func:`fit`.
    """
    kwargs.setdefault("stop_on", None)
    return fit(model, codec, [indexing, pairs], mix_ratio=mix_ratio, phase=kwargs.pop("phase", "multitask"), **kwargs)
