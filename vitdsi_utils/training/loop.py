"""Training: indexing (image -> own ID), retrieval fine-tuning (query -> relevant ID), multi-task.

Retrieval fine-tuning has two optional extras: targets redrawn every epoch among a query's
relevant IDs (:class:`SameClassTargets`) and augmented views of the indexed images as extra
queries for their own ID (:class:`AugmentedViews`).

All three run through :func:`fit`, which plugs the DSI's objective into the one training loop
(:func:`vitdsi_utils.training.engine.run_training`). The objective works over *tasks*: a task is a set of examples
``image -> database row`` with a name. Every task's images are moved to the training device
once; an epoch is a seeded ``torch.randperm`` over the examples of all tasks together and a
batch is an index slice of it, so there is no per-sample Python work and no DataLoader.

The loss is cross-entropy over every decoder position except PAD targets, computed for all
positions in one teacher-forced pass. Metrics per epoch and task (``History`` rows): loss
(per non-PAD token), token accuracy (non-PAD positions) and sequence accuracy (every non-PAD
position right under teacher forcing). Train metrics are running values over the epoch in
train mode (dropout on), as the paper's training curves are; validation runs in eval mode.

Under a process group (:mod:`vitdsi_utils.distributed`) every process builds each global batch
(so the targets redrawn and the views augmented are the same everywhere), trains on its shard,
and divides its shard's token-loss sum by the *global* batch's non-PAD token count times the
number of processes: DDP averages the gradients, which then equal those of one process on the
whole batch. The metric sums, the eval-mode stop checks and the validation are sharded over the
processes and summed, so every process writes the same history and takes the same stop decision.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vitdsi_utils import distributed
from vitdsi_utils.devices import autocast, compile_model, optimizer_kwargs, resolve_device
from vitdsi_utils.ids.codec import IDCodec
from vitdsi_utils.model.decoding import indexing_accuracy
from vitdsi_utils.model.vit import DSIModel
from vitdsi_utils.training.checkpoint import (
    CheckpointError,
    check_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from vitdsi_utils.training.config import TrainConfig
from vitdsi_utils.training.engine import Checkpointing, EpochEnd, linear_warmup, run_training
from vitdsi_utils.training.history import History
from vitdsi_utils.training.reuse import REUSE_HINT, resume_differences
from vitdsi_utils.training.tasks import (
    IndexingTask,
    Pool,
    RetrievalPairs,
    Task,
    as_tasks,
)


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


@torch.no_grad()
def _evaluate_pool(model: DSIModel, pool: Pool, pad: int, batch_size: int, amp: bool | str) -> torch.Tensor:
    """Per-task sums (n_tasks, 5) of :func:`_batch_stats` over the pool, in eval mode.

    Under a process group each process scores its share of the examples and the sums are added
    up over the processes, so every process returns the same sums.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(pool.names), 5, dtype=torch.float64, device=pool.device)
    share = distributed.shard_range(len(pool))  # range(0, len(pool)) in one process
    try:
        for start in range(share.start, share.stop, batch_size):
            ids = torch.arange(start, min(start + batch_size, share.stop), device=pool.device)
            images, inputs, targets, task = pool.batch(ids)
            with autocast(pool.device, amp):
                logits = model(images, inputs)
            sums.index_add_(0, task, _batch_stats(logits, targets, token_losses(logits, targets, pad), pad))
    finally:
        model.train(was_training)
    return distributed.all_reduce_sum(sums)


def evaluate(
    model: DSIModel, codec: IDCodec, tasks: Any, *, batch_size: int = 256, amp: bool | str = True
) -> dict[str, dict[str, float]]:
    """Teacher-forced loss / token_acc / seq_acc per task (and "all"), in eval mode, on the model's device.

    ``amp`` as :attr:`TrainConfig.amp` (:func:`vitdsi_utils.devices.autocast`).
    """
    pool = Pool(as_tasks(tasks), codec, model.device)
    return _summaries(_evaluate_pool(model, pool, codec.pad, batch_size, amp), pool.names)


# ------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------
def make_optimizer(model: DSIModel, config: TrainConfig, *, fused: bool | None = None) -> torch.optim.Optimizer:
    """Adam, or AdamW when weight_decay > 0; fused kernels on CUDA (:func:`vitdsi_utils.devices.optimizer_kwargs`).

    ``fused`` overrides that choice (torch has fused Adam on the CPU too), for tests and benchmarks.
    """
    options = optimizer_kwargs(model.device) if fused is None else ({"fused": True} if fused else {})
    if config.weight_decay > 0:
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, **options)
    return torch.optim.Adam(model.parameters(), lr=config.lr, **options)


def epoch_counts(pool: Pool, mix_ratio: float | None) -> dict[str, int] | None:
    if mix_ratio is None:
        return None
    if "indexing" not in pool.names:
        raise ValueError("mix_ratio is relative to an 'indexing' task, and there is none")
    n_index = pool.spans[pool.names.index("indexing")][1]
    # augmented views keep their own count (views per indexed image): the ratio is about retrieval queries
    return {
        name: max(1, round(mix_ratio * n_index))
        for i, name in enumerate(pool.names)
        if name != "indexing" and i not in pool.augmented
    }


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
    configuration, ID set, database, mix ratio or training settings (the recipe of
    :class:`TrainConfig`; the epoch cap only has to be at least the epochs the checkpoint holds,
    see :mod:`vitdsi_utils.training.reuse`) raises :class:`CheckpointError` naming each difference.
    While it trains with a checkpoint, it holds the lock of the checkpoint's folder
    (:func:`vitdsi_utils.training.engine.run_training`). The returned history's ``reached_target``
    says whether the stop rule fired (None when there is none: ``stop_on=None`` or no target).
    """
    config = config or TrainConfig()
    model.check_codec(codec)
    device = resolve_device(config.device)
    tasks, val_tasks = as_tasks(train), as_tasks(val)
    if not tasks:
        raise ValueError("nothing to train on")
    names = [t.name for t in tasks]
    if stop_on is not None and stop_on not in names:
        raise ValueError(f"stop_on={stop_on!r} names no training task (tasks: {names}); pass stop_on=None")
    phase = phase or "+".join(names)
    model.to(device)
    optimizer = make_optimizer(model, config)
    objective = _DSIObjective(model, codec, tasks, val_tasks, config, device, stop_on, phase, mix_ratio)

    def load(path: Path) -> dict[str, Any]:
        state = load_checkpoint(path, map_location=device)
        if state["extra"].get("phase") != phase:
            raise CheckpointError(
                f"{path} holds phase {state['extra'].get('phase')!r}, not {phase!r}; "
                "give each phase its own checkpoint path"
            )
        check_checkpoint(state, path, config=model.config, codec=codec, data=data_info)
        saved_mix = state["extra"].get("mix_ratio")
        if saved_mix != mix_ratio:
            raise CheckpointError(
                f"{path} was written for other settings: mix_ratio: saved {saved_mix!r}, requested {mix_ratio!r}. "
                + REUSE_HINT.format(files=path)
            )
        problems = resume_differences(
            state["train_config"], config, epoch=int(state["epoch"]), stop_rule=stop_on is not None
        )
        if problems:
            raise CheckpointError(
                f"{path} was written for other training settings: "
                + "; ".join(problems)
                + ". "
                + REUSE_HINT.format(files=path)
            )
        return state

    def save(path: Path, epoch: int, counters: dict[str, Any], generator: torch.Generator) -> None:
        extra = {"phase": phase, **counters, "mix_ratio": mix_ratio, "data": dict(data_info or {})}
        save_checkpoint(
            path, model, optimizer, model.config, config, epoch, history, codec, generator=generator, extra=extra
        )

    history = History() if history is None else history
    checkpoint = Checkpointing(checkpoint_path, load, save, every=config.checkpoint_every, resume=resume)
    history = run_training(
        model,
        objective,
        optimizer,
        epochs=config.epochs,
        seed=config.seed,
        lr_at=linear_warmup(config.lr, config.warmup_steps),
        grad_clip=config.grad_clip,
        history=history,
        checkpoint=checkpoint,
        desc=phase,
        progress=config.progress,
    )
    history.reached_target = history.stopped if stop_on is not None and config.target_accuracy is not None else None
    return history


class _DSIObjective:
    """Teacher-forced cross-entropy over the examples of every task; stop checks and validation per epoch."""

    def __init__(
        self,
        model: DSIModel,
        codec: IDCodec,
        tasks: list[Task],
        val_tasks: list[Task],
        config: TrainConfig,
        device: torch.device,
        stop_on: str | None,
        phase: str,
        mix_ratio: float | None,
    ):
        self.model, self.codec, self.tasks, self.config = model, codec, tasks, config
        self.stop_on, self.phase = stop_on, phase
        self.names = [t.name for t in tasks]
        self.pool = Pool(tasks, codec, device)
        self.val_pool = Pool(val_tasks, codec, device) if val_tasks else None
        self.counts = epoch_counts(self.pool, mix_ratio)
        self.stop_pool: Pool | None = None  # the stop task alone, built on the first eval-mode check
        # the model compiled or not (TrainConfig.compile), on any device; it shares the model's weights
        self.step_model: torch.nn.Module = compile_model(model, config.compile)
        self.wrapped: tuple[torch.nn.Module, torch.nn.Module] | None = None  # (DDP wrapper, what steps call)
        self.sums = torch.zeros(len(self.names), 5, dtype=torch.float64, device=device)

    def _train_forward(self, model: torch.nn.Module) -> torch.nn.Module:
        """What a training step calls: the (compiled) model, or the DDP wrapper the engine passed (compiled alike)."""
        if model is self.model:
            return self.step_model
        if self.wrapped is None or self.wrapped[0] is not model:
            self.wrapped = (model, compile_model(model, self.config.compile))
        return self.wrapped[1]

    def epoch_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        self.pool.resample(generator)  # redrawn targets (same-class mode); a no-op for fixed pairs
        order = self.pool.epoch_order(generator, self.counts)
        self.sums.zero_()
        return list(order.split(self.config.batch_size))

    def loss(self, model: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # the whole global batch is built (augmented views drawn) on every process: the generator stays in step
        images, inputs, targets, task = self.pool.batch(batch, generator)
        pad = self.codec.pad
        world = distributed.world_size()
        if world > 1:
            tokens = (targets != pad).sum().clamp_min(1)  # the global batch's, which the loss is a mean over
            part = distributed.shard_slice(len(batch))
            images, inputs, targets, task = images[part], inputs[part], targets[part], task[part]
        with autocast(self.pool.device, self.config.amp):
            logits = self._train_forward(model)(images, inputs)  # (B, L, V)
        losses = token_losses(logits, targets, pad, self.config.label_smoothing)  # (B, L)
        # summed on the device: no host sync inside the epoch
        self.sums.index_add_(0, task, _batch_stats(logits.detach(), targets, losses, pad))
        if world > 1:
            # DDP averages over the processes: world * (shard's sum / global tokens), averaged, is the global mean
            return losses.sum() * world / tokens
        return losses.sum() / (targets != pad).sum().clamp_min(1)

    def end_epoch(self, model: torch.nn.Module, epoch: int, seconds: float) -> EpochEnd:
        config, stop_on, phase = self.config, self.stop_on, self.phase
        # every process's sums added up (copied to the host, so the timing includes queued GPU work)
        train_metrics = _summaries(distributed.all_reduce_sum(self.sums), self.names)
        rows = [
            {"phase": phase, "epoch": epoch, "split": "train", "task": name, **m, "seconds": seconds}
            for name, m in train_metrics.items()
        ]
        stopped = _reached_target(train_metrics, stop_on, config, epoch)
        if stopped is None:  # running accuracy close enough: re-score the stop task without dropout
            t1 = time.perf_counter()
            stop_task = self.tasks[self.names.index(stop_on)]
            self.stop_pool = self.stop_pool or Pool([stop_task], self.codec, self.pool.device)
            pooled = _evaluate_pool(self.step_model, self.stop_pool, self.codec.pad, config.eval_batch_size, config.amp)
            m = _summaries(pooled, [stop_on])[stop_on]
            stopped = m["seq_acc"] >= config.target_accuracy
            if stopped and config.stop_metric == "ia" and stop_task.image_idx is None:  # image i -> row i
                m["ia1"] = _indexing_accuracy(self.model, self.codec, stop_task, config.stop_beam)
                stopped = m["ia1"] >= config.target_accuracy
            row = {"phase": phase, "epoch": epoch, "split": "train_eval", "task": stop_on}
            rows.append({**row, **m, "seconds": time.perf_counter() - t1})
        last = stopped or epoch == config.epochs
        shown = self.names[0] if len(self.names) == 1 else "all"  # the task whose numbers the progress bar shows
        postfix = {
            "loss": f"{train_metrics[shown]['loss']:.4f}",
            "acc": f"{train_metrics[stop_on or shown]['seq_acc']:.3f}",
        }
        if self.val_pool is not None and (epoch % config.eval_every == 0 or last):
            t1 = time.perf_counter()
            pooled = _evaluate_pool(self.step_model, self.val_pool, self.codec.pad, config.eval_batch_size, config.amp)
            val_metrics = _summaries(pooled, self.val_pool.names)
            val_seconds = time.perf_counter() - t1
            for name, m in val_metrics.items():
                rows.append({"phase": phase, "epoch": epoch, "split": "val", "task": name, **m, "seconds": val_seconds})
            val_shown = self.val_pool.names[0] if len(self.val_pool.names) == 1 else "all"
            postfix["val_acc"] = f"{val_metrics[val_shown]['seq_acc']:.3f}"
        return EpochEnd(rows, postfix, bool(stopped))


def _reached_target(train_metrics: dict, stop_on: str | None, config: TrainConfig, epoch: int) -> bool | None:
    """True / False: stop or not; None: re-score in eval mode to decide (the running accuracy is close,
    or ``epoch`` is one of the periodic ``stop_check_every`` checks)."""
    if stop_on is None or config.target_accuracy is None:
        return False
    running = train_metrics[stop_on]["seq_acc"]
    if config.stop_metric == "train":
        return running >= config.target_accuracy
    periodic = config.stop_check_every > 0 and epoch % config.stop_check_every == 0
    return None if periodic or running >= config.stop_check_from * config.target_accuracy else False


def _indexing_accuracy(model: DSIModel, codec: IDCodec, task: Task, beam: int) -> float:
    """IA@1: the share of the task's images whose beam-search top-1 is their own row."""

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
