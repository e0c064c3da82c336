"""The one training loop: seeding, resuming, the learning-rate schedule, gradient steps, progress, checkpoints.

Every model of the toolkit trains through :func:`run_training`: the DSI's indexing, retrieval and
multi-task phases (:func:`vitdsi_utils.training.loop.fit`), the dense retrieval encoder
(:func:`vitdsi_utils.baselines.dense.train_dense`) and the self-supervised encoder
(:func:`vitdsi_utils.baselines.ssl.train_ssl`). What differs between them plugs in:

* an :class:`Objective` draws an epoch's batches, computes a batch's loss (keeping its own running
  statistics), and at the end of an epoch writes history rows, validates and says whether to stop;
* a :class:`Checkpointing` reads a checkpoint back (refusing one written for another run) and
  writes one.

The order of random draws is fixed by this loop: the run's generator is seeded with ``seed``
(and the global torch RNG too, which drives dropout) unless a checkpoint is resumed, in which
case both streams continue from where they were saved. An epoch draws its batches first, then
each step draws whatever the objective needs for that batch (augmentations), so a resumed run
and an uninterrupted one see the same numbers.

**Data parallel.** Under a process group (``torchrun``; :mod:`vitdsi_utils.distributed`) every
process runs this loop on the same global batches, drawn from the same seeded generator, and
an objective trains each process on its shard of each batch (:func:`~vitdsi_utils.distributed.shard_slice`)
with a loss scaled so that the gradients ``DistributedDataParallel`` averages are those of the
whole batch's loss. The generator advances as in one process, so a checkpoint resumes with any
number of processes. Torch's global RNG (dropout) is reseeded every epoch from (seed, epoch,
rank). The objective reports metrics summed over the processes, every process takes rank 0's
stop decision, rank 0 alone writes checkpoints and shows progress (the others wait), and every
process reads the checkpoint to resume. One process runs exactly the code it ran before. See
``docs/distributed.md``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from vitdsi_utils import distributed
from vitdsi_utils.locks import run_folder_lock
from vitdsi_utils.training.checkpoint import restore_training
from vitdsi_utils.training.history import History


@dataclass
class EpochEnd:
    """What an objective reports after an epoch: history rows, progress-bar fields, and whether to stop."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    postfix: dict[str, str] = field(default_factory=dict)
    stop: bool = False


class Objective(Protocol):
    """A training task for :func:`run_training`.

    Under a process group, ``epoch_batches`` still returns the global batches (every process
    draws the same ones), ``loss`` trains this process on its shard of ``batch`` and keeps every
    draw of ``generator`` the global batch's, and ``end_epoch`` reports metrics of all processes.
    """

    def epoch_batches(self, generator: torch.Generator) -> Sequence[Any]:
        """The batches of one epoch, drawn with ``generator`` (called in train mode, before any step)."""

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """The scalar loss of one batch (the objective keeps the running statistics it reports).

        ``model`` is the model to call for the step: the trained model itself, or under a process
        group its ``DistributedDataParallel`` wrapper.
        """

    def end_epoch(self, model: torch.nn.Module, epoch: int, seconds: float) -> EpochEnd:
        """Rows for the history of epoch ``epoch`` (1-based) that took ``seconds`` to train, and the stop decision."""


@dataclass
class Checkpointing:
    """Where and how a run keeps its checkpoint.

    ``load(path)`` returns the checkpoint's state after checking that it belongs to this run (it
    raises, naming the differences, when it does not); ``save(path, epoch, counters, generator)``
    writes one, ``counters`` being ``{"step": ..., "stopped": ...}`` and ``generator`` the run's
    random stream (its state goes into the checkpoint). A checkpoint is written every ``every``
    epochs and after the last one.
    """

    path: str | os.PathLike | None
    load: Callable[[Path], dict[str, Any]]
    save: Callable[[Path, int, dict[str, Any], torch.Generator], None]
    every: int = 1
    resume: bool = True


def linear_warmup(lr: float, warmup_steps: int) -> Callable[[int], float] | None:
    """The learning rate at step s: ``lr * min(1, (s + 1) / warmup_steps)``; None (leave it) without warm-up."""
    if not warmup_steps:
        return None
    return lambda step: lr * min(1.0, (step + 1) / warmup_steps)


def run_training(
    model: torch.nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    seed: int,
    lr_at: Callable[[int], float] | None = None,
    grad_clip: float = 0.0,
    history: History | None = None,
    checkpoint: Checkpointing | None = None,
    desc: str = "train",
    progress: bool = True,
) -> History:
    """Train ``model`` in place for up to ``epochs`` epochs of ``objective``; return the history (extended).

    ``lr_at(step)`` sets the learning rate of every parameter group before each step (None:
    leave the optimiser's). ``grad_clip`` > 0 clips the gradients' global norm. A finished run
    (its checkpoint holds the last epoch, or it stopped early) resumes to a no-op. The history's
    ``stopped`` says whether the objective ended the run early (now or in the run resumed).

    With a checkpoint path, the checkpoint's folder is locked from reading the checkpoint to
    writing the last one (:func:`vitdsi_utils.locks.run_folder_lock`): a second run on the same
    folder waits, then resumes from (or finds finished) what the first wrote.

    Under a process group every process calls this with the same arguments; see the module's
    notes on data parallelism.
    """
    distributed.warn_if_ungrouped()
    path = Path(checkpoint.path) if checkpoint is not None and checkpoint.path is not None else None
    with run_folder_lock(path.parent) if path is not None else nullcontext():
        return _run_training(
            model,
            objective,
            optimizer,
            epochs=epochs,
            seed=seed,
            lr_at=lr_at,
            grad_clip=grad_clip,
            history=history,
            checkpoint=checkpoint,
            desc=desc,
            progress=progress,
        )


def _run_training(
    model: torch.nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    seed: int,
    lr_at: Callable[[int], float] | None,
    grad_clip: float,
    history: History | None,
    checkpoint: Checkpointing | None,
    desc: str,
    progress: bool,
) -> History:
    history = History() if history is None else history
    generator = torch.Generator().manual_seed(seed)
    start_epoch, step, stopped = 0, 0, False
    path = Path(checkpoint.path) if checkpoint is not None and checkpoint.path is not None else None
    if path is not None and checkpoint.resume and path.exists():
        state = checkpoint.load(path)
        restore_training(state, model, optimizer, history, generator)
        start_epoch = int(state["epoch"])
        step = int(state["extra"].get("step", 0))
        stopped = bool(state["extra"].get("stopped", False))
    else:
        torch.manual_seed(seed)

    def save(epoch: int) -> None:
        # rank 0 writes, the others wait for the file (one process: just the call)
        distributed.on_main(checkpoint.save, path, epoch, {"step": step, "stopped": stopped}, generator)

    parallel = distributed.active()
    step_model = distributed.data_parallel(model)  # the model itself in one process
    epoch_range = range(start_epoch, start_epoch if stopped else epochs)
    show = progress and distributed.is_main()
    bar = tqdm(epoch_range, initial=start_epoch, total=epochs, desc=desc, disable=not show)
    for epoch in bar:
        t0 = time.perf_counter()
        if parallel:  # dropout: a stream per (seed, epoch, rank), the same whatever epoch a run resumed at
            torch.manual_seed(distributed.epoch_seed(seed, epoch))
        step_model.train()
        for batch in objective.epoch_batches(generator):
            loss = objective.loss(step_model, batch, generator)
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            step += 1
        end = objective.end_epoch(model, epoch + 1, time.perf_counter() - t0)
        history.extend(end.rows)
        stopped = distributed.broadcast_object(end.stop)  # every process stops where rank 0 does
        bar.set_postfix(end.postfix)
        last = stopped or epoch + 1 == epochs
        if path is not None and ((epoch + 1) % checkpoint.every == 0 or last):
            save(epoch + 1)
        if stopped:
            break
    bar.close()
    if isinstance(history, History):  # a plain list of rows works too
        history.stopped = bool(stopped)
    return history
