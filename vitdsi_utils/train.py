"""Training: indexing (image -> own ID), retrieval fine-tuning (query -> relevant ID), multi-task.

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
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._io import atomic_path, write_json
from .ids import IDCodec
from .model import DSIConfig, DSIModel

CHECKPOINT_FORMAT = 1
HISTORY_COLUMNS = ("phase", "epoch", "split", "task", "loss", "token_acc", "seq_acc", "seconds", "n_examples")


@dataclass
class TrainConfig:
    """Optimisation settings of :func:`fit` (plain values, stored in checkpoints)."""

    lr: float = 5e-4  # Adam learning rate (after warm-up)
    batch_size: int = 32  # examples per optimiser step
    epochs: int = 200  # at most this many epochs per phase
    target_accuracy: float = 0.98  # stop once the stop_on task's sequence accuracy (see stop_metric) reaches this
    # "eval": the stop task's training examples re-scored in eval mode (no dropout), after the epoch's
    # last step, i.e. the accuracy the trained model really has (greedy IA@1 for indexing);
    # "train": the running accuracy during the epoch, with dropout (cheaper, lags the model)
    stop_metric: str = "eval"
    stop_check_from: float = 0.8  # with "eval": re-score only on epochs whose running accuracy reaches this
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
        if self.batch_size < 1 or self.epochs < 0 or self.eval_every < 1 or self.checkpoint_every < 1:
            raise ValueError("batch_size, eval_every and checkpoint_every must be >= 1, epochs >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.stop_metric not in ("eval", "train"):
            raise ValueError(f"stop_metric must be 'eval' or 'train', got {self.stop_metric!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


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
    relevant means at least one shared label. Pairs come sorted by query, then row. With
    ``max_pairs_per_query`` a query keeps a seeded random subset of at most that many rows.
    """
    q, d = _labels(query_labels), _labels(db_labels)
    if q.ndim == 1 and d.ndim == 1:
        relevant = q[:, None] == d[None, :]  # (Q, N)
    elif q.ndim == 2 and d.ndim == 2:
        relevant = (q.double() @ d.double().T) > 0  # (Q, N)
    else:
        raise ValueError("query and database labels must both be (n,) class ids or both (n, C) multi-hot")
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


@dataclass
class _Task:
    name: str
    images: torch.Tensor
    rows: torch.Tensor
    image_idx: torch.Tensor | None  # None: example i reads image i


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
        elif isinstance(t, tuple) and len(t) in (3, 4):
            name, images, rows = t[0], _as_images(t[1]), _as_long(t[2])
            idx = _as_long(t[3]) if len(t) == 4 and t[3] is not None else None
            if idx is None and len(rows) != len(images):
                raise ValueError(f"task {name!r}: {len(images)} images but {len(rows)} rows")
            out.append(_Task(str(name), images, rows, idx))
        else:
            raise TypeError(f"a task is IndexingTask, RetrievalPairs or (name, images, rows[, image_idx]); got {t!r}")
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

    def batch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images (B,H,W,3) uint8, decoder inputs (B,L), targets (B,L), task ids (B,)) of example ids (B,)."""
        rows = self.rows[ids]
        return self.images[self.image_idx[ids]], self.inputs[rows], self.targets[rows], self.task[ids]


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
        "config": config.to_dict(),
        "train_config": dict(train_config) if train_config is not None else None,
        "epoch": int(epoch),
        "history": [dict(r) for r in history] if history is not None else [],
        "codec": {"codes": [list(c) for c in codec.codes], "base": codec.base},
        "rng": _rng_state(generator),
        "extra": dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs)."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    return state


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[DSIModel, IDCodec, dict]:
    """(model in eval mode, codec, meta: every other checkpoint entry but weights, optimiser and RNG)."""
    state = load_checkpoint(path, map_location)
    model = DSIModel(DSIConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])
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
    return {name: max(1, round(mix_ratio * n_index)) for name in pool.names if name != "indexing"}


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
) -> History:
    """Train ``model`` in place on the tasks in ``train``; return the history (``history`` extended).

    ``train`` / ``val``: a list of :class:`IndexingTask`, :class:`RetrievalPairs` or
    ``(name, images, rows[, image_idx])`` tuples. The examples of all tasks share one shuffled
    epoch; ``mix_ratio`` resamples every task but "indexing" to ``mix_ratio * n_indexing``
    examples per epoch. Training stops after ``config.epochs`` epochs or once task
    ``stop_on``'s sequence accuracy on its training examples reaches ``config.target_accuracy``
    (None: never early). By default (``config.stop_metric="eval"``) that accuracy is re-measured
    in eval mode after the epoch, so a stopped indexing run really has that greedy IA@1; those
    checks are kept in the history as split "train_eval".
    With ``checkpoint_path`` a checkpoint is saved every ``config.checkpoint_every`` epochs;
    if it exists and ``resume``, training continues from it exactly where it stopped.
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
            raise ValueError(f"{checkpoint_path} holds phase {state['extra'].get('phase')!r}, not {phase!r}")
        if [tuple(c) for c in state["codec"]["codes"]] != codec.codes or state["codec"]["base"] != codec.base:
            raise ValueError(f"{checkpoint_path} was trained with different IDs")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history[:] = state["history"]
        start_epoch, step, stopped = state["epoch"], state["extra"]["step"], state["extra"]["stopped"]
        _set_rng_state(state["rng"], generator)
    else:
        torch.manual_seed(config.seed)

    def save(epoch: int) -> None:
        extra = {"phase": phase, "step": step, "stopped": stopped, "mix_ratio": mix_ratio}
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
        order = pool.epoch_order(generator, counts)
        sums = torch.zeros(len(names), 5, dtype=torch.float64, device=device)
        for start in range(0, len(order), config.batch_size):
            images, inputs, targets, task = pool.batch(order[start : start + config.batch_size])
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
        stopped = _reached_target(train_metrics, stop_on, config)
        if stopped is None:  # running accuracy close enough: re-score the stop task without dropout
            t1 = time.perf_counter()
            stop_pool = stop_pool or _Pool([tasks[names.index(stop_on)]], codec, device)
            m = _summaries(
                _evaluate_pool(step_model, stop_pool, codec.pad, config.eval_batch_size, config.amp), [stop_on]
            )[stop_on]
            row = {"phase": phase, "epoch": epoch + 1, "split": "train_eval", "task": stop_on}
            history.append({**row, **m, "seconds": time.perf_counter() - t1})
            stopped = m["seq_acc"] >= config.target_accuracy
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


def _reached_target(train_metrics: dict, stop_on: str | None, config: TrainConfig) -> bool | None:
    """True / False: stop or not; None: the running accuracy is close, re-score in eval mode to decide."""
    if stop_on is None:
        return False
    running = train_metrics[stop_on]["seq_acc"]
    if config.stop_metric == "train":
        return running >= config.target_accuracy
    return None if running >= config.stop_check_from * config.target_accuracy else False


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
