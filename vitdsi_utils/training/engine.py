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
    """A training task for :func:`run_training`."""

    def epoch_batches(self, generator: torch.Generator) -> Sequence[Any]:
        """The batches of one epoch, drawn with ``generator`` (called in train mode, before any step)."""

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """The scalar loss of one batch (the objective keeps the running statistics it reports)."""

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
    """
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
        checkpoint.save(path, epoch, {"step": step, "stopped": stopped}, generator)

    epoch_range = range(start_epoch, start_epoch if stopped else epochs)
    bar = tqdm(epoch_range, initial=start_epoch, total=epochs, desc=desc, disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        for batch in objective.epoch_batches(generator):
            loss = objective.loss(model, batch, generator)
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
        stopped = end.stop
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
