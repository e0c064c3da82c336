"""The dense encoder's objective: a margin contrastive loss, a differential-entropy regulariser, and
batches that always hold positive pairs (see :mod:`vitdsi_utils.baselines.dense` for the formulas)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------
# The objective
# ------------------------------------------------------------------------------------------
class LossTerms(NamedTuple):
    """The training objective and its two parts (scalar tensors)."""

    total: torch.Tensor
    contrastive: torch.Tensor
    entropy: torch.Tensor


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Contrastive loss with a margin on the similarities of unit vectors (B, D) with labels (B,).

    ``1/B * sum_i [sum_{j != i, same label} (1 - s_ij) + sum_{other label} max(0, s_ij - margin)]``
    with ``s_ij = z_i . z_j``. Negatives less similar than the margin contribute nothing.
    """
    similarity = embeddings @ embeddings.T  # (B, B)
    same = labels[:, None] == labels[None, :]
    not_self = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = (1.0 - similarity)[same & not_self].sum()
    negative = F.relu(similarity - margin)[~same].sum()
    return (positive + negative) / len(labels)


def entropy_loss(embeddings: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko differential-entropy regulariser: ``-mean_i log(min_{j != i} ||z_i - z_j||)``.

    Minimising it pushes every embedding away from its nearest neighbour in the batch. The
    nearest neighbour is found by inner product (the embeddings are unit vectors) and the
    distance computed directly, with ``eps`` guarding against log 0 for duplicates.
    """
    if len(embeddings) < 2:
        raise ValueError("the entropy regulariser needs at least 2 embeddings in a batch")
    with torch.no_grad():
        similarity = embeddings @ embeddings.T
        similarity.fill_diagonal_(-float("inf"))
        nearest = similarity.argmax(dim=1)  # (B,)
    distance = F.pairwise_distance(embeddings, embeddings[nearest], eps=eps)  # (B,)
    return -torch.log(distance + eps).mean()


def dense_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.5, entropy_weight: float = 0.7
) -> LossTerms:
    """The training objective ``contrastive + entropy_weight * entropy`` and its parts."""
    contrastive = contrastive_loss(embeddings, labels, margin)
    entropy = entropy_loss(embeddings) if entropy_weight else embeddings.new_zeros(())
    return LossTerms(contrastive + entropy_weight * entropy, contrastive, entropy)


# ------------------------------------------------------------------------------------------
# Batches with positives
# ------------------------------------------------------------------------------------------
def class_batches(
    labels: torch.Tensor, batch_size: int, per_class: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """One epoch of batches of example indices, each made of groups of ``per_class`` same-class examples.

    Every class is shuffled and cut into groups of ``per_class``; the groups of all classes
    are shuffled together and ``batch_size // per_class`` of them form a batch. So every
    example appears at most once per epoch (the last ``count % per_class`` of a class, a
    different random few each epoch, sit the epoch out), no batch holds an image twice, and
    every example of a batch has at least ``per_class - 1`` positives beside it. All of it is
    tensor operations seeded by ``generator``.
    """
    if per_class < 2:
        raise ValueError(f"per_class must be >= 2 so that every batch holds positive pairs, got {per_class}")
    if batch_size < per_class:
        raise ValueError(f"batch_size {batch_size} must hold at least one group of per_class={per_class} images")
    _, labels = torch.unique(labels.cpu(), return_inverse=True)  # labels 0..C-1
    n = len(labels)
    order = torch.randperm(n, generator=generator)
    order = order[torch.argsort(labels[order], stable=True)]  # by class, random inside a class
    counts = torch.bincount(labels)
    first = torch.cumsum(counts, 0) - counts
    ranked = labels[order]
    rank = torch.arange(n) - first[ranked]  # position inside its class
    usable = rank < (counts - counts % per_class)[ranked]
    groups = order[usable].view(-1, per_class)  # each class's usable run is a whole number of groups
    if len(groups) == 0:
        raise ValueError(
            f"no class has {per_class} or more training images (class sizes {counts.tolist()}); "
            "lower per_class or train on more images"
        )
    groups = groups[torch.randperm(len(groups), generator=generator)]
    per_batch = max(1, batch_size // per_class)
    return [chunk.reshape(-1) for chunk in groups.split(per_batch)]
