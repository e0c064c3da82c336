"""The set-up of incremental indexing: which indexed images come later, their IDs, and what a fine-tuning epoch replays.

* :func:`split_new` - a seeded share of a database's indexed images is the *new* batch;
* :func:`incremental_codecs` - the initial images keep IDs 0..n_old-1, the new ones get the next numbers,
  every ID with the digits of the final size, so the decoder's length never changes;
* :func:`finetune_tasks`, :func:`replay_count`, :func:`epoch_examples` - the new images, plus ``ratio`` old
  images per new image resampled each epoch, as :func:`~vitdsi_utils.training.loop.fit` draws them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vitdsi_utils.ids.codec import IDCodec, decimal_codes
from vitdsi_utils.training.loop import epoch_counts
from vitdsi_utils.training.tasks import IndexingTask, Pool, as_tasks

#: The strategies' labels in the tables (fine-tuning's is :func:`finetune_name`).
INITIAL = "initial (old images only)"


SCRATCH = "retrain from scratch"


def finetune_name(ratio: float) -> str:
    """The strategy label of fine-tuning with ``ratio`` replayed old images per new image."""
    return "fine-tune, no replay" if ratio == 0 else f"fine-tune, replay {ratio:g}:1"


def incremental_codecs(n_old: int, n_new: int, capacity: int | None = None) -> tuple[IDCodec, IDCodec]:
    """(codec of the initial IDs 0..n_old-1, codec of all IDs 0..n_old+n_new-1), both with the digits of ``capacity``.

    The first codec's IDs are the first rows of the second, so a model indexed with the first can be
    fine-tuned and searched with the second; the new IDs are n_old..n_old+n_new-1.
    """
    if n_old < 1 or n_new < 1:
        raise ValueError(f"need at least one initial and one new image, got n_old={n_old}, n_new={n_new}")
    total = n_old + n_new
    capacity = total if capacity is None else int(capacity)
    if capacity < total:
        raise ValueError(f"capacity {capacity} is below the {total} images to index; give capacity >= {total}")
    width = len(str(capacity - 1))
    return IDCodec(decimal_codes(n_old, width)), IDCodec(decimal_codes(total, width))


def split_new(n_index: int, new_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(initial rows, new rows) of a database's indexed images: a seeded sample of ``new_fraction`` is new.

    Both are sorted database rows, so each part keeps the database's ID order (class blocks for
    clustered IDs).
    """
    if not 0 < new_fraction < 1:
        raise ValueError(f"new_fraction must lie in (0, 1), got {new_fraction}")
    n_new = int(round(new_fraction * n_index))
    if not 1 <= n_new < n_index:
        raise ValueError(f"{n_index} indexed images and new_fraction {new_fraction} leave no initial or no new image")
    rng = np.random.default_rng(seed)
    new = np.sort(rng.choice(n_index, size=n_new, replace=False))
    return np.setdiff1d(np.arange(n_index), new), new


def replay_count(n_new: int, ratio: float) -> int:
    """Old images replayed per fine-tuning epoch: ``round(ratio * n_new)`` (0 for no replay)."""
    if ratio < 0:
        raise ValueError(f"the replay ratio must be >= 0, got {ratio}")
    return 0 if ratio == 0 else max(1, round(ratio * n_new))


def finetune_tasks(old_images: torch.Tensor, new_images: torch.Tensor, ratio: float) -> tuple[list, float | None]:
    """(training tasks, mix_ratio for :func:`train.fit`): the new images as task "indexing" (rows n_old..),
    plus the old ones as task "replay" (rows 0..n_old-1) when ``ratio`` > 0, resampled to
    :func:`replay_count` examples per epoch."""
    n_old = len(old_images)
    tasks: list[Any] = [IndexingTask(new_images, torch.arange(n_old, n_old + len(new_images)))]
    if ratio > 0:
        tasks.append(("replay", old_images, torch.arange(n_old)))
        return tasks, float(ratio)
    return tasks, None


def epoch_examples(n_old: int, n_new: int, ratio: float, seed: int = 0, epochs: int = 1) -> list[np.ndarray]:
    """The rows one fine-tuning run trains on in each of its first ``epochs`` epochs, drawn exactly as
    :func:`train.fit` draws them (same pool, same seeded generator); for tests and for inspection."""

    images = torch.zeros(n_old + n_new, 1, 1, 3, dtype=torch.uint8)
    tasks, mix = finetune_tasks(images[:n_old], images[n_old:], ratio)
    codec = IDCodec(decimal_codes(n_old + n_new))
    pool = Pool(as_tasks(tasks), codec, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    counts = epoch_counts(pool, mix)
    return [pool.rows[pool.epoch_order(generator, counts)].numpy() for _ in range(epochs)]
