"""Dense retrieval baseline: a ViT trained for metric learning, its database in a flat FAISS index.

The "index-then-retrieve" counterpart of the DSI with a learned representation. It follows the
recipe of "Training Vision Transformers for Image Retrieval" (El-Nouby et al., 2021; seed 001
of the study):

* the encoder is the DSI's ViT encoder (:class:`~vitdsi_utils.model.ViTEncoder`, same size by
  default: patch 16, width 128, 6 blocks, 4 heads), pooled into one vector per image (the mean
  of the patch tokens, or the output of an added class token as in seed 001) and
  L2-normalised, so an inner product is a cosine similarity;
* it is trained with a contrastive loss with margin ``beta`` (0.5): every same-class pair of a
  batch is pulled together, and a different-class pair is pushed apart only while its
  similarity exceeds the margin;
* plus a differential-entropy regulariser of weight ``lambda`` (0.7): the Kozachenko-Leonenko
  estimate ``-mean_i log(min_{j != i} ||z_i - z_j||)`` over the batch (Sablayrolles et al.,
  2019), which spreads the embeddings over the sphere and so keeps them from collapsing;
* the indexed (database) images are embedded once and stored in a FAISS ``IndexFlatIP``;
  a query is answered with its top-k database rows by inner product (exact search).

In formulas, for a batch of N embeddings z with labels y::

    L_contrastive = 1/N sum_i [ sum_{j != i, y_j = y_i} (1 - z_i.z_j) + sum_{y_j != y_i} max(0, z_i.z_j - beta) ]
    L_entropy     = -1/N sum_i log(min_{j != i} ||z_i - z_j||)
    L             = L_contrastive + lambda * L_entropy

Batches are drawn so that positives always exist: each batch is made of groups of
``per_class`` images of one class (see :func:`class_batches`).

Entry points: :class:`DenseRetriever` (scikit-learn style: ``fit``, ``transform``, ``index``,
``search``), :func:`train_dense`, :func:`evaluate_dense` and :func:`train_or_load`, which the
notebook ``07_dense`` and ``vitdsi dense`` use.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics
from ._io import atomic_path
from .augment import augment  # noqa: F401  (also importable from here, where it first lived)
from .model import ViTConfig, ViTEncoder
from .train import History, PlainConfig, _rng_state, load_model, restore_training

__all__ = [
    "DENSE_MODEL",
    "POOLINGS",
    "DenseConfig",
    "DenseEncoder",
    "DenseTrainConfig",
    "DenseRetriever",
    "FlatIPIndex",
    "LossTerms",
    "augment",
    "class_batches",
    "contrastive_loss",
    "entropy_loss",
    "dense_loss",
    "train_dense",
    "save_dense",
    "load_dense",
    "evaluate_dense",
    "train_or_load",
    "faiss_available",
    "training_images",
    "first_stages",
    "rerank_database",
    "dense_markdown",
    "dense_study",
]

#: The model name of the dense rows in the result tables.
DENSE_MODEL = "Dense (contrastive ViT)"
POOLINGS = ("cls", "mean")
CHECKPOINT_KIND = "dense-encoder"
CHECKPOINT_FORMAT = 1
BACKENDS = ("auto", "faiss", "torch")
FAISS_PIN = "faiss-cpu==1.15.1"  # the version requirements.txt pins

# Queries scored against the database at once by the torch backend, so (queries x database) stays bounded.
_SEARCH_CHUNK = 1024


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
@dataclass
class DenseConfig(ViTConfig):
    """Hyper-parameters of :class:`DenseEncoder`: the ViT encoder's plus the pooling."""

    # "mean": mean of the patch tokens | "cls": output of an added class token (seed 001's choice, for
    # pretrained ViTs). Trained from scratch at 64 px, mean pooling scored higher on the val queries.
    pooling: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {POOLINGS}")


class DenseEncoder(ViTEncoder):
    """The ViT encoder with one L2-normalised embedding per image: uint8 (B, H, W, 3) -> float (B, D).

    Images are uint8 and channels-last, as everywhere in the toolkit (the encoder normalises
    them). With ``pooling="cls"`` a learned class token is put before the patch tokens and its
    output is the embedding; with ``"mean"`` the patch tokens are averaged.
    """

    config: DenseConfig

    def __init__(self, config: DenseConfig):
        super().__init__(config)
        if config.pooling == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        else:
            self.cls_token = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings (B, D) float32 of uint8 images (B, H, W, 3)."""
        tokens = self.encode(images, prefix=self.cls_token)  # (B, [1 +] P, D)
        pooled = tokens[:, 0] if self.cls_token is not None else tokens.mean(dim=1)
        return F.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Embeddings (n, D) float32 on the CPU, in eval mode, ``batch_size`` images at a time."""
        images = _as_image_tensor(images, self.config)
        was_training = self.training
        self.eval()
        try:
            out = [self(images[i : i + batch_size].to(self.device)).cpu() for i in range(0, len(images), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.config.dim)


def _as_image_tensor(images: np.ndarray | torch.Tensor, config: ViTConfig) -> torch.Tensor:
    """uint8 images (n, S, S, C) as a CPU tensor; a clear error for anything else."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"images must be uint8 (n, {config.image_size}, {config.image_size}, {config.channels}); got {got}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (config.image_size, config.image_size, config.channels):
        raise ValueError(
            f"images must have shape (n, {config.image_size}, {config.image_size}, {config.channels}); "
            f"got {tuple(images.shape)}"
        )
    return images


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


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
@dataclass
class DenseTrainConfig(PlainConfig):
    """Optimisation settings of :func:`train_dense` (plain values, stored in checkpoints)."""

    epochs: int = 50  # passes over the training images
    batch_size: int = 64  # images per step (seed 001: 64)
    per_class: int = 2  # images of one class that enter a batch together, so positives always exist
    lr: float = 5e-4  # AdamW learning rate after warm-up
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    warmup_steps: int = 50  # linear learning-rate warm-up
    margin: float = 0.5  # contrastive margin beta (seed 001: 0.5)
    entropy_weight: float = 0.7  # weight lambda of the differential-entropy regulariser (seed 001: 0.7)
    flip: bool = True  # random horizontal flips of the training images
    min_crop: float = 1.0  # < 1: random crops of this fraction of the side or more, resized back (1: no crops)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0  # seeds the initial weights, the batches, the flips and dropout
    device: str = "auto"  # "auto" (cuda if available, else cpu), or any torch device string
    progress: bool = True  # tqdm bar over epochs
    eval_batch_size: int = 256  # images per forward pass when embedding
    checkpoint_every: int = 5  # with a checkpoint path: save every n epochs (and after the last)

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.eval_batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("epochs must be >= 0; batch_size, eval_batch_size and checkpoint_every >= 1")
        if self.per_class < 2 or self.batch_size < self.per_class:
            raise ValueError(f"need 2 <= per_class <= batch_size, got per_class={self.per_class}, "
                             f"batch_size={self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0 or self.entropy_weight < 0:
            raise ValueError("lr must be positive; weight_decay and entropy_weight non-negative")
        if not 0.0 < self.min_crop <= 1.0:
            raise ValueError(f"min_crop is a fraction of the image side in (0, 1], got {self.min_crop}")
        if not -1.0 <= self.margin <= 1.0:
            raise ValueError(f"margin is a cosine similarity and must lie in [-1, 1], got {self.margin}")

    def recipe(self) -> dict[str, Any]:
        """The settings that shape the trained model (not epochs, device, progress or batch sizes of embedding)."""
        ignored = {"epochs", "device", "progress", "eval_batch_size", "checkpoint_every"}
        return {k: v for k, v in self.to_dict().items() if k not in ignored}


def _resolve_device(device: str) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _labels_tensor(labels: Any, n: int) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(labels)).long().flatten()
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    return labels


def _fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A short hash of the training images and labels, so a checkpoint is not resumed on other data."""
    digest = hashlib.sha1(labels.cpu().numpy().astype(np.int64).tobytes())
    digest.update(np.ascontiguousarray(images.cpu().numpy()).tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def _validation_scores(
    model: DenseEncoder, val: tuple, batch_size: int, k: int = 10
) -> dict[str, float]:
    """mAP@k and P@k of the val queries against the val database, by exact cosine search."""
    query_images, query_labels, db_images, db_labels = val
    queries = model.embed(query_images, batch_size)
    database = model.embed(db_images, batch_size)
    _, rows = FlatIPIndex(database.numpy(), backend="torch").search(queries.numpy(), k)
    relevant = metrics.label_relevance(np.asarray(query_labels), np.asarray(db_labels))
    hits = metrics.relevance_matrix(rows, relevant)
    n_relevant = relevant.sum(axis=1)
    return {
        f"map@{k}": float(np.nanmean(metrics.average_precision_at_k(hits, n_relevant, k))),
        f"p@{k}": float(metrics.precision_at_k(hits, k).mean()),
    }


def train_dense(
    model: DenseEncoder,
    images: np.ndarray | torch.Tensor,
    labels: Any,
    *,
    config: DenseTrainConfig | None = None,
    val: tuple | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = True,
) -> "History":
    """Train ``model`` in place on uint8 ``images`` (n, S, S, 3) with class ``labels`` (n,); return the history.

    The images are moved to the training device once as one uint8 tensor; an epoch is
    :func:`class_batches` over them, so there is no per-sample Python work. History rows
    (``phase="dense"``): per epoch a ``train`` row with the mean ``loss``, ``contrastive`` and
    ``entropy`` over the epoch's steps, and with ``val=(query_images, query_labels,
    db_images, db_labels)`` a ``val`` row with ``map@10`` and ``p@10`` of the val queries
    searched in that database. With ``checkpoint_path`` a checkpoint is written every
    ``config.checkpoint_every`` epochs and after the last; if it exists and ``resume``,
    training continues from it (a finished run returns at once).
    """
    config = config or DenseTrainConfig()
    device = _resolve_device(config.device)
    images = _as_image_tensor(images, model.config)
    labels = _labels_tensor(labels, len(images))
    if len(images) < 2:
        raise ValueError("training needs at least 2 images")
    model.to(device)
    data, targets = images.to(device), labels.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    history = History()
    start_epoch, step = 0, 0
    fingerprint = _fingerprint(images, labels)

    if checkpoint_path is not None and resume and Path(checkpoint_path).exists():
        state = _read_checkpoint(checkpoint_path, device)
        # a config field added after the checkpoint was written has its default value
        saved_config = {**DenseConfig().to_dict(), **state["config"]}
        if saved_config != model.config.to_dict():
            raise ValueError(f"{checkpoint_path} holds a model with another configuration; delete it to retrain")
        stored = DenseTrainConfig.from_dict(state["train_config"] or {}).recipe()
        if stored != config.recipe():
            changed = sorted(k for k in stored if stored[k] != config.recipe()[k])
            raise ValueError(f"{checkpoint_path} was trained with other settings ({', '.join(changed)}); "
                             "delete it to retrain")
        if state["extra"].get("data") != fingerprint:
            raise ValueError(f"{checkpoint_path} was trained on other images; delete it to retrain")
        if state["epoch"] > config.epochs:
            raise ValueError(f"{checkpoint_path} holds a model trained for {state['epoch']} epochs, more than the "
                             f"{config.epochs} asked for; delete it to retrain")
        restore_training(state, model, optimizer, history, generator)
        start_epoch, step = int(state["epoch"]), int(state["extra"].get("step", 0))
    else:
        torch.manual_seed(config.seed)

    def save(epoch: int) -> None:
        save_dense(checkpoint_path, model, config, history, epoch=epoch, optimizer=optimizer,
                   rng=_rng_state(generator), extra={"data": fingerprint, "step": step})

    bar = tqdm(range(start_epoch, config.epochs), initial=start_epoch, total=config.epochs, desc="dense",
               disable=not config.progress)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        batches = class_batches(labels, config.batch_size, config.per_class, generator)
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for ids in batches:
            ids = ids.to(device)
            batch = augment(data[ids], generator, flip=config.flip, min_crop=config.min_crop)
            if config.warmup_steps:
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps)
            terms = dense_loss(model(batch), targets[ids], margin=config.margin,
                               entropy_weight=config.entropy_weight)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            sums += torch.stack([t.detach().double() for t in terms])
        means = (sums / max(len(batches), 1)).tolist()
        row = {"phase": "dense", "epoch": epoch + 1, "split": "train", "task": "contrastive",
               "loss": means[0], "contrastive": means[1], "entropy": means[2],
               "seconds": time.perf_counter() - t0, "n_examples": int(sum(len(b) for b in batches))}
        history.append(row)
        postfix = {"loss": f"{means[0]:.3f}"}
        if val is not None:
            t1 = time.perf_counter()
            scores = _validation_scores(model, val, config.eval_batch_size)
            history.append({"phase": "dense", "epoch": epoch + 1, "split": "val", "task": "contrastive",
                            **scores, "seconds": time.perf_counter() - t1, "n_examples": len(val[0])})
            postfix["val_map@10"] = f"{scores['map@10']:.3f}"
        bar.set_postfix(postfix)
        if checkpoint_path is not None and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs):
            save(epoch + 1)
    bar.close()
    if checkpoint_path is not None and not Path(checkpoint_path).exists():
        save(config.epochs)  # zero epochs asked for: still leave the (untrained) model where it was asked for
    model.eval()
    return history


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------
def save_dense(
    path: str | os.PathLike,
    model: DenseEncoder,
    train_config: DenseTrainConfig | None,
    history: list[dict] | None,
    *,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the encoder, its configs, history, optimiser and RNG state atomically (plain data and tensors only)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "kind": CHECKPOINT_KIND,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "config": model.config.to_dict(),
        "train_config": train_config.to_dict() if train_config is not None else None,
        "epoch": int(epoch),
        "history": [dict(r) for r in history or []],
        "rng": rng,
        "extra": dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def _read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: train a dense encoder first (DenseRetriever.fit(..., checkpoint_path=...), "
            "`vitdsi dense`, or notebook 07_dense)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated files and foreign pickles raise several types
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error}); "
                         "delete it and train again") from error
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        what = "a DSI checkpoint" if isinstance(state, dict) and "codec" in state else "not a dense-encoder checkpoint"
        raise ValueError(f"{path} is {what}; load DSI models with train.load_model, dense encoders from "
                         "files written by save_dense / train_dense")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unknown dense checkpoint format {state.get('format')!r} "
                         f"(this version reads format {CHECKPOINT_FORMAT}); train again")
    return state


def load_dense(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[DenseEncoder, dict]:
    """(encoder in eval mode, meta: every checkpoint entry but weights, optimiser and RNG); ``weights_only=True``."""
    state = _read_checkpoint(path, map_location)
    model = DenseEncoder(DenseConfig.from_dict(state["config"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"{path}: the weights do not fit the stored configuration ({error})") from error
    model.to(map_location).eval()
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "rng")}
    meta["history"] = History(meta["history"])
    return model, meta


# ------------------------------------------------------------------------------------------
# Exact inner-product search
# ------------------------------------------------------------------------------------------
def _finished(path: str | os.PathLike | None, epochs: int) -> bool:
    """Whether a checkpoint at ``path`` already holds ``epochs`` epochs (so fitting only loads it)."""
    if path is None or not Path(path).is_file():
        return False
    return int(_read_checkpoint(path)["epoch"]) >= epochs


def faiss_available() -> bool:
    """Whether ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


class FlatIPIndex:
    """Exact top-k search by inner product over database vectors (n_db, D): FAISS ``IndexFlatIP`` or torch.

    ``backend="auto"`` uses FAISS when it can be imported and otherwise falls back, with a
    warning, to a torch matrix product and a stable sort (ties go to the lower row); both
    return the same ranking up to ties. ``"faiss"`` insists on FAISS, ``"torch"`` never uses it.
    ``search`` returns ``(D, I)`` in the FAISS convention: scores (Q, k') float32 and rows
    (Q, k') int64, sorted by descending score, with ``k' = min(k, n_db)``.
    """

    def __init__(self, vectors: np.ndarray, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"database vectors must be a non-empty (n_db, D) array, got shape {vectors.shape}")
        self.vectors = vectors
        self.backend = self._resolve(backend)
        if self.backend == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatIP(vectors.shape[1])
            self._faiss.add(vectors)

    @staticmethod
    def _resolve(backend: str) -> str:
        if backend == "torch":
            return "torch"
        if faiss_available():
            return "faiss"
        if backend == "faiss":
            raise ImportError(f"backend='faiss' needs FAISS: install it with `pip install {FAISS_PIN}`")
        warnings.warn(
            f"faiss is not installed (`pip install {FAISS_PIN}`); searching with a torch matrix product "
            "instead: the same ranking, slower on large databases",
            UserWarning,
            stacklevel=3,
        )
        return "torch"

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k database rows of each query vector (Q, D) by inner product; see the class docstring."""
        k = min(_check_k(k), len(self))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (Q, {self.dim}), got {queries.shape}")
        if self.backend == "faiss":
            scores, rows = self._faiss.search(queries, k)
            return scores.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)
        database = torch.from_numpy(self.vectors)
        scores = np.empty((len(queries), k), dtype=np.float32)
        rows = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), _SEARCH_CHUNK):
            similarity = torch.from_numpy(queries[start : start + _SEARCH_CHUNK]) @ database.T
            top, order = torch.sort(similarity, dim=1, descending=True, stable=True)
            scores[start : start + len(top)] = top[:, :k].numpy()
            rows[start : start + len(top)] = order[:, :k].numpy()
        return scores, rows


# ------------------------------------------------------------------------------------------
# The retriever
# ------------------------------------------------------------------------------------------
class DenseRetriever:
    """Dense image retrieval, scikit-learn style: ``fit`` the encoder, ``index`` the database, ``search``.

    ``fit(images, labels)`` trains a new :class:`DenseEncoder` (``model_config``) with
    ``train_config``; ``index(images)`` embeds the database images into a :class:`FlatIPIndex`
    (``backend``); ``search(query_images, k)`` returns ``(D, I)``: cosine scores and database
    rows (Q, k') like :meth:`bovw.BoVW.search`. ``transform`` (alias ``embed``) gives the
    unit-norm embeddings (n, D) float32. :meth:`from_checkpoint` wraps a saved encoder.

    Attributes after fitting: ``model_`` (the encoder), ``history_`` (per-epoch rows),
    ``fit_seconds_``; after indexing: ``index_`` (the FlatIPIndex), ``index_seconds_``.
    """

    def __init__(
        self,
        model_config: DenseConfig | None = None,
        train_config: DenseTrainConfig | None = None,
        *,
        backend: str = "auto",
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.model_config = model_config
        self.train_config = train_config
        self.backend = backend

    # -- fitting ---------------------------------------------------------------------------
    def fit(
        self,
        images: np.ndarray,
        labels: Any,
        *,
        val: tuple | None = None,
        checkpoint_path: str | os.PathLike | None = None,
    ) -> "DenseRetriever":
        """Train a new encoder on uint8 ``images`` (n, S, S, 3) with ``labels`` (n,); see :func:`train_dense`."""
        images = np.asarray(images)
        config = self.model_config or DenseConfig(image_size=int(images.shape[1]) if images.ndim == 4 else 160)
        train_config = self.train_config or DenseTrainConfig()
        torch.manual_seed(train_config.seed)  # the initial weights are as reproducible as the training
        model = DenseEncoder(config)
        start = time.perf_counter()
        self.loaded_ = _finished(checkpoint_path, train_config.epochs)
        self.history_ = train_dense(model, images, labels, config=train_config, val=val,
                                    checkpoint_path=checkpoint_path)
        self.model_ = model
        # the training time the history records (all epochs, also those of an earlier, resumed run)
        self.fit_seconds_ = float(sum(row.get("seconds", 0.0) for row in self.history_))
        self.call_seconds_ = time.perf_counter() - start
        return self

    @classmethod
    def from_model(cls, model: DenseEncoder, *, backend: str = "auto", history: list | None = None) -> "DenseRetriever":
        """A retriever around an already trained encoder."""
        retriever = cls(model.config, backend=backend)
        retriever.model_ = model.eval()
        retriever.history_ = History(history or [])
        retriever.fit_seconds_ = 0.0
        return retriever

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, *, backend: str = "auto", device: str = "cpu"
    ) -> "DenseRetriever":
        """A retriever around the encoder saved at ``path`` (``weights_only`` loading; errors say what to do)."""
        model, meta = load_dense(path, map_location=_resolve_device(device))
        retriever = cls.from_model(model, backend=backend, history=meta["history"])
        retriever.train_config = DenseTrainConfig.from_dict(meta["train_config"]) if meta["train_config"] else None
        retriever.fit_seconds_ = float(sum(row.get("seconds", 0.0) for row in meta["history"]))
        return retriever

    def _check_fitted(self, what: str = "model_") -> None:
        if not hasattr(self, what):
            step = "fit() or from_checkpoint()" if what == "model_" else "index(database_images)"
            raise RuntimeError(f"this DenseRetriever is not ready: call {step} first")

    # -- encoding, indexing, search --------------------------------------------------------
    def transform(self, images: np.ndarray) -> np.ndarray:
        """Unit-norm embeddings (n, D) float32 of uint8 images (n, S, S, 3)."""
        self._check_fitted()
        batch = self.train_config.eval_batch_size if self.train_config else 256
        return self.model_.embed(images, batch).numpy()

    embed = transform

    def index(self, images: np.ndarray) -> "DenseRetriever":
        """Embed the database images (n_db, S, S, 3) and build the flat inner-product index over them."""
        start = time.perf_counter()
        self.index_ = FlatIPIndex(self.transform(images), backend=self.backend)
        self.index_seconds_ = time.perf_counter() - start
        return self

    @property
    def database_vectors(self) -> np.ndarray:
        """The indexed embeddings (n_db, D) float32."""
        self._check_fitted("index_")
        return self.index_.vectors

    def search(self, query_images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosine scores (Q, k') float32, database rows (Q, k') int64) of uint8 query images; k' = min(k, n_db)."""
        self._check_fitted("index_")
        k = _check_k(k)  # before the forward pass, so a bad k fails fast
        return self.index_.search(self.transform(query_images), k)

    def search_vectors(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` for embeddings (Q, D) from :meth:`transform`."""
        self._check_fitted("index_")
        return self.index_.search(query_vectors, k)


# ------------------------------------------------------------------------------------------
# One database: train (or load), evaluate
# ------------------------------------------------------------------------------------------
def training_images(db: Any, *, include_index: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The labelled images the encoder learns from: the train queries, plus the indexed images.

    The fine-tuned DSI learns from the same two sets (train queries as inputs, indexed images
    through their IDs), so with ``include_index`` both models see the same labelled images.
    Validation and test queries are never trained on.
    """
    images, labels = db.split("train")
    if include_index:
        index_images, index_labels = db.split("index")
        images, labels = np.concatenate([images, index_images]), np.concatenate([labels, index_labels])
    return images, labels


def train_or_load(
    db: Any,
    *,
    model_overrides: dict | None = None,
    train_config: DenseTrainConfig | None = None,
    include_index: bool = True,
    run_dir: str | os.PathLike | None = None,
    backend: str = "auto",
) -> DenseRetriever:
    """The dense retriever of ``db``: trained on :func:`training_images`, with the val queries as validation.

    With ``run_dir`` the encoder is saved as ``dense.pt`` there; a later call with the same
    settings loads it instead of training again (``retriever.loaded_`` is then True), and an
    interrupted training resumes. The retriever comes back with ``db``'s indexed images indexed.
    """
    train_config = train_config or DenseTrainConfig()
    path = Path(run_dir) / "dense.pt" if run_dir is not None else None
    images, labels = training_images(db, include_index=include_index)
    index_images, index_labels = db.split("index")
    val_images, val_labels = db.split("val")
    val = (val_images, val_labels, index_images, index_labels) if len(val_images) else None
    config = DenseConfig(image_size=int(db.settings["size"]), **(model_overrides or {}))
    retriever = DenseRetriever(config, train_config, backend=backend)
    retriever.fit(images, labels, val=val, checkpoint_path=path)
    return retriever.index(index_images)


def evaluate_dense(
    retriever: DenseRetriever, db: Any, *, k: int = 100, query_role: str = "test", seed: int = 0
) -> tuple[pd.DataFrame, dict]:
    """Index ``db``'s indexed images and score the top-``k`` lists of its ``query_role`` queries.

    Returns (table, timings): the rows of :func:`evaluation.retrieval_metrics` (mAP@10, P@10,
    R@100 and the paper protocol, with intervals and chance), labelled like the other models'
    rows (``model`` = :data:`DENSE_MODEL`, source, size, n, ``ids`` "-", seed), and the wall
    times of indexing and search (embedding the queries included). ``seed`` seeds the
    bootstrap; ``seed`` in the table is the database's.
    """
    from .evaluation import retrieval_metrics

    index_images, index_labels = db.split("index")
    query_images, query_labels = db.split(query_role)
    retriever.index(index_images)
    start = time.perf_counter()
    _, ranked = retriever.search(query_images, k)
    searched = time.perf_counter() - start
    table = retrieval_metrics(ranked, query_labels, index_labels, seed=seed)
    s = db.settings
    table = table.assign(model=DENSE_MODEL, source=s["source"], size=s["size"], n=s["n"], ids="-", seed=s["seed"])
    timings = {
        "index_s": retriever.index_seconds_,
        "search_s": searched,
        "search_ms_per_query": 1000 * searched / max(len(query_images), 1),
        "n_index": len(index_images),
        "train_s": getattr(retriever, "fit_seconds_", float("nan")),
        "backend": retriever.index_.backend,
    }
    return table, timings


# ------------------------------------------------------------------------------------------
# The study: dense beside BoVW and DSI, and re-ranking, for every database of a grid
# ------------------------------------------------------------------------------------------
def first_stages(db: Any, *, bovw: Any = None, dsi_run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The first-stage searchers available for ``db``: a fitted BoVW, and the DSI models a run folder holds.

    DSI models are ``zero_shot.pt`` / ``fine_tuned.pt`` in ``dsi_run_dir`` (the folder of
    ``db``'s run, as notebooks 03/04 or ``vitdsi dsi`` write it); a model trained on another
    database (other IDs) is an error rather than a silent mismatch.
    """
    from .demo import BoVWSearcher, DSISearcher
    from .experiments import FINE_TUNED, ZERO_SHOT
    from .ids import make_codec

    stages: dict[str, Any] = {}
    if bovw is not None:
        stages["BoVW"] = BoVWSearcher(bovw)
    if dsi_run_dir is not None:
        expected = make_codec(db.n_index).codes
        for name, file in ((ZERO_SHOT, "zero_shot.pt"), (FINE_TUNED, "fine_tuned.pt")):
            path = Path(dsi_run_dir) / file
            if path.is_file():
                model, codec, _ = load_model(path)
                if codec.codes != expected:
                    raise ValueError(f"{path} was trained on another database (its IDs differ); delete it and retrain")
                stages[name] = DSISearcher(model, codec)
    return stages


def rerank_database(
    db: Any,
    retriever: DenseRetriever,
    stages: dict[str, Any],
    *,
    depths: tuple[int, ...] = (10, 50, 100),
    k: int = 100,
    include_alone: bool = True,
    query_role: str = "test",
) -> pd.DataFrame:
    """:func:`rerank.rerank_study` of ``stages`` re-scored by the dense encoder, on ``db``'s test queries.

    The retriever's index is rebuilt over ``db``'s indexed images first (their row order
    follows ``db``'s ID scheme). Rows are labelled with ``n``, ``ids`` (the scheme for DSI
    first stages, "-" for the others, whose results do not depend on IDs) and ``seed``.
    ``include_alone`` adds the dense search alone (first_stage "-").
    """
    from .rerank import VectorScorer, rerank_study

    retriever.index(db.split("index")[0])
    query_images, query_labels = db.split(query_role)
    study = rerank_study(stages, VectorScorer.from_dense(retriever, "dense"), query_images, query_labels,
                         db.index_labels, depths=depths, k=k, seed=int(db.settings["seed"]),
                         include_alone=include_alone)
    s = db.settings
    ids = np.where(study["first_stage"].str.startswith("DSI"), s["id_scheme"], "-")
    return study.assign(n=s["n"], ids=ids, seed=s["seed"], size=s["size"], source=s["source"])


def dense_markdown(results: pd.DataFrame, histories: pd.DataFrame | None, settings: dict[str, Any]) -> str:
    """The report of a dense study: settings, Table-1 rows beside BoVW (and DSI), training time."""
    from .evaluation import TABLE1_NOTE, table1_markdown

    lines = [
        f"# Dense retrieval baseline on {settings['source']} at {settings['size']} px",
        "",
        f"Encoder: {settings['model']}. Training: {settings['training']}. "
        "The database's indexed images are embedded once into a flat inner-product index; a test "
        "query returns its top-100 by cosine similarity. BoVW is fitted on the same database. "
        + (f"DSI rows: {settings['dsi']}. " if settings.get("dsi") else "") + TABLE1_NOTE,
        "",
        table1_markdown(results),
    ]
    dense = results[results["model"] == DENSE_MODEL]
    if len(dense):
        lines += ["", "Training time and search cost per database:", "",
                  dense.groupby(["n", "seed"])[["train_s", "search_ms_per_query"]].first().round(1)
                  .reset_index().to_markdown(index=False)]
    if histories is not None and len(histories):
        val = histories[histories["split"] == "val"]
        if len(val):
            best = val.groupby("n")["map@10"].agg(["max", "last"]).round(3).reset_index()
            lines += ["", "Validation mAP@10 during training (val queries, best and last epoch):", "",
                      best.rename(columns={"max": "best val mAP@10", "last": "last val mAP@10"})
                      .to_markdown(index=False)]
    return "\n".join(lines)


def dense_study(
    source: str = "imagenette",
    size: int = 64,
    ns: tuple[int, ...] = (512, 1024),
    seeds: tuple[int, ...] = (0,),
    *,
    schemes: tuple[str, ...] = ("clustered",),
    model_overrides: dict | None = None,
    train_config: DenseTrainConfig | None = None,
    include_index: bool = True,
    bovw_words: int = 200,
    bovw_vocabularies: int = 1,
    depths: tuple[int, ...] = (10, 50, 100),
    k: int = 100,
    runs_dir: str | os.PathLike | None = None,
    dsi_runs: str | os.PathLike | None = None,
    dsi_table: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train, evaluate and re-rank for every N and seed; return (results, re-ranking, histories).

    Per database (drawn with ``schemes[0]``'s IDs): the dense encoder is trained (or loaded
    from ``runs_dir``) and evaluated, and BoVW is fitted and evaluated on the same test
    queries (averaged over ``bovw_vocabularies`` k-means vocabularies). The re-ranking study
    re-scores BoVW's candidates and, for every scheme whose DSI models ``dsi_runs/<run name>/``
    holds, the DSI's, with the dense encoder. ``dsi_table``
    (a CSV written by ``vitdsi dsi``) adds the DSI rows of the same databases to the results
    for comparison. With ``out_dir``: ``dense_<source>_<size>px``, ``rerank_<source>_<size>px``
    (CSV + Markdown), ``histories_dense_<source>_<size>px.csv`` and the figure
    ``rerank_<source>_<size>px.png``.
    """
    from .data import build_database, load_images
    from .evaluation import attach_paper, evaluate_bovw
    from .experiments import run_name
    from .plots import save_figure
    from .rerank import rerank_markdown, tradeoff_figure
    from .tables import write_table

    train_config = train_config or DenseTrainConfig(progress=progress)
    image_set = load_images(source, size, root=root, progress=progress)
    results, reranking, histories = [], [], []
    for n in ns:
        for seed in seeds:
            db = build_database(image_set, n, id_scheme=schemes[0], seed=seed)
            run_dir = Path(runs_dir) / f"{source}-{size}px-N{n}-seed{seed}" if runs_dir is not None else None
            retriever = train_or_load(db, model_overrides=model_overrides, train_config=train_config,
                                      include_index=include_index, run_dir=run_dir)
            histories.append(retriever.history_.to_frame().assign(n=n, ids="-", seed=seed))
            table, timings = evaluate_dense(retriever, db, k=k, seed=seed)
            results.append(table.assign(**timings))
            bovw = evaluate_bovw(db, n_words=bovw_words, k=k, seed=seed, vocabularies=bovw_vocabularies,
                                 progress=progress)
            results.append(bovw.rows(db))
            for i, scheme in enumerate(schemes):
                scheme_db = db if i == 0 else build_database(image_set, n, id_scheme=scheme, seed=seed)
                dsi_dir = Path(dsi_runs) / run_name(scheme_db) if dsi_runs is not None else None
                stages = first_stages(scheme_db, bovw=bovw.model if i == 0 else None, dsi_run_dir=dsi_dir)
                if stages or i == 0:
                    reranking.append(rerank_database(scheme_db, retriever, stages, depths=depths, k=k,
                                                     include_alone=i == 0))
    if dsi_table is not None:
        dsi = pd.read_csv(dsi_table)
        keep = dsi["n"].isin(ns) & dsi["seed"].isin(seeds) & (dsi["size"] == size) & (dsi["source"] == source)
        results.append(dsi[keep].drop(columns=[c for c in ("paper",) if c in dsi.columns]))
    results_frame = attach_paper(pd.concat(results, ignore_index=True))
    rerank_frame = pd.concat(reranking, ignore_index=True)
    history_frame = pd.concat(histories, ignore_index=True)
    if out_dir is not None:
        out_dir = Path(out_dir)
        model_config = DenseConfig(image_size=size, **(model_overrides or {}))
        settings = {
            "source": source, "size": size,
            "model": (f"ViT patch {model_config.patch_size}, width {model_config.dim}, {model_config.depth} blocks, "
                      f"{model_config.heads} heads, {model_config.pooling} pooling, {model_config.pos_encoding} positions"),
            "training": (f"{train_config.epochs} epochs of AdamW (lr {train_config.lr}, weight decay "
                         f"{train_config.weight_decay}), batches of {train_config.batch_size} in groups of "
                         f"{train_config.per_class} same-class images, contrastive margin {train_config.margin} + "
                         f"{train_config.entropy_weight} x differential entropy, on the train queries"
                         + (" and the indexed images" if include_index else "")),
            "dsi": f"copied from `{dsi_table}` (same databases and test queries)" if dsi_table is not None else None,
        }
        stem = f"{source}_{size}px"
        write_table(results_frame, out_dir / f"dense_{stem}", markdown=dense_markdown(results_frame, history_frame, settings))
        write_table(rerank_frame, out_dir / f"rerank_{stem}", markdown=rerank_markdown(rerank_frame, source, size))
        history_frame.to_csv(out_dir / f"histories_dense_{stem}.csv", index=False)
        save_figure(tradeoff_figure(rerank_frame, "mAP@10"), out_dir / f"rerank_{stem}.png")
    return results_frame, rerank_frame, history_frame
