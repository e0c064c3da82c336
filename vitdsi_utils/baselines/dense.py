"""Dense retrieval baseline: a ViT trained for metric learning, its database in a flat FAISS index.

The "index-then-retrieve" counterpart of the DSI with a learned representation. It follows the
recipe of "Training Vision Transformers for Image Retrieval" (El-Nouby et al., 2021;
listed in ``docs/protocol.md``):

* the encoder is the DSI's ViT encoder (:class:`~vitdsi_utils.model.vit.ViTEncoder`, same size by
  default: patch 16, width 128, 6 blocks, 4 heads), pooled into one vector per image (the mean
  of the patch tokens, or the output of an added class token as in El-Nouby et al.) and
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

This module holds the encoder, :func:`train_dense` and its checkpoints; the losses and the batches
with positives are in :mod:`vitdsi_utils.baselines.contrastive`. Searching with
it is :class:`vitdsi_utils.retrieval.searchers.DenseRetriever` (scikit-learn style: ``fit``,
``transform``, ``index``, ``search``) over :class:`vitdsi_utils.baselines.index.FlatIPIndex`;
the study that trains and scores it is :mod:`vitdsi_utils.studies.dense`.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitdsi_utils import distributed, metrics
from vitdsi_utils.baselines.contrastive import class_batches, dense_loss
from vitdsi_utils.baselines.index import FlatIPIndex
from vitdsi_utils.data.augment import augment
from vitdsi_utils.data.relevance import label_relevance
from vitdsi_utils.devices import resolve_device
from vitdsi_utils.model.vit import ViTConfig, ViTEncoder
from vitdsi_utils.training.checkpoint import CheckpointError, read_checkpoint, rng_state, write_checkpoint
from vitdsi_utils.training.config import PlainConfig, check_int, check_number
from vitdsi_utils.training.engine import Checkpointing, EpochEnd, linear_warmup, run_training
from vitdsi_utils.training.history import History
from vitdsi_utils.training.reuse import REUSE_HINT, differences

#: The model name of the dense rows in the result tables.
DENSE_MODEL = "Dense (contrastive ViT)"


POOLINGS = ("cls", "mean")


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
@dataclass
class DenseConfig(ViTConfig):
    """Hyper-parameters of :class:`DenseEncoder`: the ViT encoder's plus the pooling."""

    # "mean": mean of the patch tokens | "cls": output of an added class token (El-Nouby et al.'s choice, for
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
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 256, *, shard: bool = True) -> torch.Tensor:
        """Embeddings (n, D) float32 on the CPU, in eval mode, ``batch_size`` images at a time.

        Under a process group with ``shard=True`` this is a collective call: every process passes
        the same images, embeds its whole batches of them and gets all embeddings back, bit for
        bit those of one process. ``shard=False`` embeds every image here.
        """
        images = _as_image_tensor(images, self.config)
        share = distributed.shard_range(len(images), batch_size) if shard else range(0, len(images))
        was_training = self.training
        self.eval()
        try:
            out = [
                self(images[i : min(i + batch_size, share.stop)].to(self.device)).cpu()
                for i in range(share.start, share.stop, batch_size)
            ]
        finally:
            self.train(was_training)
        embeddings = torch.cat(out) if out else torch.empty(0, self.config.dim)
        return distributed.gather_rows(embeddings) if shard else embeddings


def _as_image_tensor(images: np.ndarray | torch.Tensor, config: ViTConfig) -> torch.Tensor:
    """uint8 images (n, S, S, C) as a CPU tensor; a clear error for anything else."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(
            f"images must be uint8 (n, {config.image_size}, {config.image_size}, {config.channels}); got {got}"
        )
    if images.ndim != 4 or tuple(images.shape[1:]) != (config.image_size, config.image_size, config.channels):
        raise ValueError(
            f"images must have shape (n, {config.image_size}, {config.image_size}, {config.channels}); "
            f"got {tuple(images.shape)}"
        )
    return images


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
@dataclass
class DenseTrainConfig(PlainConfig):
    """Optimisation settings of :func:`train_dense` (plain values, stored in checkpoints)."""

    epochs: int = 50  # passes over the training images
    batch_size: int = 64  # images per step (El-Nouby et al.: 64)
    per_class: int = 2  # images of one class that enter a batch together, so positives always exist
    lr: float = 5e-4  # AdamW learning rate after warm-up
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    warmup_steps: int = 50  # linear learning-rate warm-up
    margin: float = 0.5  # contrastive margin beta (El-Nouby et al.: 0.5)
    entropy_weight: float = 0.7  # weight lambda of the differential-entropy regulariser (El-Nouby et al.: 0.7)
    flip: bool = True  # random horizontal flips of the training images
    min_crop: float = 1.0  # < 1: random crops of this fraction of the side or more, resized back (1: no crops)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0  # seeds the initial weights, the batches, the flips and dropout
    device: str = "auto"  # "auto" (cuda if available, else cpu), or any torch device string
    progress: bool = True  # tqdm bar over epochs
    eval_batch_size: int = 256  # images per forward pass when embedding
    checkpoint_every: int = 5  # with a checkpoint path: save every n epochs (and after the last)

    #: How a run is executed, not what it learns: an encoder is reused whatever these are.
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"device", "progress", "eval_batch_size", "checkpoint_every"})

    def __post_init__(self) -> None:
        for name, low in (
            ("epochs", 1),
            ("batch_size", 1),
            ("per_class", 2),
            ("warmup_steps", 0),
            ("seed", 0),
            ("eval_batch_size", 1),
            ("checkpoint_every", 1),
        ):
            setattr(self, name, check_int(name, getattr(self, name), low))
        if self.batch_size < self.per_class:
            raise ValueError(
                f"need 2 <= per_class <= batch_size, got per_class={self.per_class}, batch_size={self.batch_size}"
            )
        self.lr = check_number("lr", self.lr, 0, low_open=True)
        for name in ("weight_decay", "entropy_weight", "grad_clip"):
            setattr(self, name, check_number(name, getattr(self, name), 0))
        self.min_crop = check_number("min_crop (a fraction of the image side)", self.min_crop, 0, 1, low_open=True)
        self.margin = check_number("margin (a cosine similarity)", self.margin, -1, 1)


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
def _validation_scores(model: DenseEncoder, val: tuple, batch_size: int, k: int = 10) -> dict[str, float]:
    """mAP@k and P@k of the val queries against the val database, by exact cosine search."""
    query_images, query_labels, db_images, db_labels = val
    queries = model.embed(query_images, batch_size)
    database = model.embed(db_images, batch_size)
    _, rows = FlatIPIndex(database.numpy(), backend="torch").search(queries.numpy(), k)
    relevant = label_relevance(np.asarray(query_labels), np.asarray(db_labels))
    hits = metrics.relevance_matrix(rows, relevant)
    n_relevant = relevant.sum(axis=1)
    return {
        f"map@{k}": float(np.nanmean(metrics.average_precision_at_k(hits, n_relevant, k))),
        f"p@{k}": float(metrics.precision_at_k(hits, k).mean()),
    }


def dense_mismatches(
    state: dict[str, Any], model_config: DenseConfig, config: DenseTrainConfig, fingerprint: str
) -> list[str]:
    """Why a dense checkpoint cannot be reused or resumed for this model, these settings and images.

    Every setting of the recipe must match (:attr:`DenseTrainConfig.RUNTIME_FIELDS` need not), and
    the images. Epochs: the learning rate does not depend on them (warm-up, then constant), so a
    checkpoint of fewer epochs than asked for resumes up to them, and one of more is refused.
    """
    # a config field added after the checkpoint was written has its default value
    problems = differences({**DenseConfig().to_dict(), **state["config"]}, model_config.to_dict(), "model ")
    saved = DenseTrainConfig.recipe_of(state["train_config"] or {})
    wanted = config.recipe()
    saved.pop("epochs"), wanted.pop("epochs")
    problems += differences(saved, wanted)
    if state["extra"].get("data") != fingerprint:
        problems.append("training images: other images or labels")
    if int(state["epoch"]) > config.epochs:
        problems.append(f"epochs: it holds {state['epoch']} epochs, more than the {config.epochs} requested")
    return problems


def train_dense(
    model: DenseEncoder,
    images: np.ndarray | torch.Tensor,
    labels: Any,
    *,
    config: DenseTrainConfig | None = None,
    val: tuple | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = True,
) -> History:
    """Train ``model`` in place on uint8 ``images`` (n, S, S, 3) with class ``labels`` (n,); return the history.

    The images are moved to the training device once as one uint8 tensor; an epoch is
    :func:`class_batches` over them, so there is no per-sample Python work. History rows
    (``phase="dense"``): per epoch a ``train`` row with the mean ``loss``, ``contrastive`` and
    ``entropy`` over the epoch's steps, and with ``val=(query_images, query_labels,
    db_images, db_labels)`` a ``val`` row with ``map@10`` and ``p@10`` of the val queries
    searched in that database. With ``checkpoint_path`` a checkpoint is written every
    ``config.checkpoint_every`` epochs and after the last; if it exists and ``resume``,
    training continues from it (a finished run returns at once) when it was written for this
    model, these settings and these images (:func:`dense_mismatches`: more epochs than it holds
    continue it; anything else is refused with a CheckpointError naming every difference). The
    checkpoint's folder is locked while this runs (:func:`~vitdsi_utils.training.engine.run_training`).
    """
    config = config or DenseTrainConfig()
    device = resolve_device(config.device)
    images = _as_image_tensor(images, model.config)
    labels = _labels_tensor(labels, len(images))
    if len(images) < 2:
        raise ValueError("training needs at least 2 images")
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    fingerprint = _fingerprint(images, labels)
    objective = _DenseObjective(images.to(device), labels, labels.to(device), config, val)

    def load(path: Path) -> dict[str, Any]:
        state = read_dense_checkpoint(path, device)
        problems = dense_mismatches(state, model.config, config, fingerprint)
        if problems:
            raise CheckpointError(
                f"{path} was trained for other settings: {'; '.join(problems)}. " + REUSE_HINT.format(files=path)
            )
        return state

    def save(path: Path, epoch: int, counters: dict[str, Any], generator: torch.Generator) -> None:
        save_dense(
            path,
            model,
            config,
            history,
            epoch=epoch,
            optimizer=optimizer,
            rng=rng_state(generator),
            extra={"data": fingerprint, "step": counters["step"]},
        )

    history = History()
    checkpoint = Checkpointing(checkpoint_path, load, save, every=config.checkpoint_every, resume=resume)
    run_training(
        model,
        objective,
        optimizer,
        epochs=config.epochs,
        seed=config.seed,
        lr_at=linear_warmup(config.lr, config.warmup_steps),
        grad_clip=config.grad_clip,
        history=history,
        checkpoint=checkpoint,
        desc="dense",
        progress=config.progress,
    )
    model.eval()
    return history


class _DenseObjective:
    """Contrastive loss with the entropy regulariser over class-balanced batches of augmented views.

    Under a process group the loss couples every pair of the global batch, so it cannot be
    split into per-shard losses: every process augments the whole global batch (the generator
    stays in step), embeds its shard, gathers the other shards' embeddings (without their
    gradient paths) and computes the global batch's loss, with its own rows live. Scaled by the
    number of processes, DDP's average of the gradients is the gradient of the global loss (see
    ``docs/distributed.md``). Every process computes the same loss value, so the metric sums need
    no all-reduce.
    """

    def __init__(
        self,
        data: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor,
        config: DenseTrainConfig,
        val: tuple | None,
    ):
        self.data, self.labels, self.targets, self.config, self.val = data, labels, targets, config, val
        self.sums = torch.zeros(3, dtype=torch.float64, device=data.device)
        self.batches: list[torch.Tensor] = []

    def epoch_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        self.batches = class_batches(self.labels, self.config.batch_size, self.config.per_class, generator)
        self.sums.zero_()
        return self.batches

    def loss(self, model: torch.nn.Module, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        ids = ids.to(self.data.device)
        c = self.config
        batch = augment(self.data[ids], generator, flip=c.flip, min_crop=c.min_crop)
        world = distributed.world_size()
        if world > 1:  # this shard's embeddings, live among every other shard's
            embeddings = distributed.gather_rows(model(batch[distributed.shard_slice(len(ids))]), live=True)
        else:
            embeddings = model(batch)
        terms = dense_loss(embeddings, self.targets[ids], margin=c.margin, entropy_weight=c.entropy_weight)
        self.sums += torch.stack([t.detach().double() for t in terms])
        return terms.total * world if world > 1 else terms.total

    def end_epoch(self, model: torch.nn.Module, epoch: int, seconds: float) -> EpochEnd:
        means = (self.sums / max(len(self.batches), 1)).tolist()
        rows = [
            {
                "phase": "dense",
                "epoch": epoch,
                "split": "train",
                "task": "contrastive",
                "loss": means[0],
                "contrastive": means[1],
                "entropy": means[2],
                "seconds": seconds,
                "n_examples": int(sum(len(b) for b in self.batches)),
            }
        ]
        postfix = {"loss": f"{means[0]:.3f}"}
        if self.val is not None:
            t1 = time.perf_counter()
            scores = _validation_scores(model, self.val, self.config.eval_batch_size)
            rows.append(
                {
                    "phase": "dense",
                    "epoch": epoch,
                    "split": "val",
                    "task": "contrastive",
                    **scores,
                    "seconds": time.perf_counter() - t1,
                    "n_examples": len(self.val[0]),
                }
            )
            postfix["val_map@10"] = f"{scores['map@10']:.3f}"
        return EpochEnd(rows, postfix)


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
    """Write the encoder, its configs, history, optimiser and RNG state: a checkpoint of kind ``"dense-encoder"``."""
    return write_checkpoint(
        path,
        "dense-encoder",
        model=model,
        optimizer=optimizer,
        config=model.config.to_dict(),
        train_config=train_config.to_dict() if train_config is not None else None,
        epoch=epoch,
        history=history,
        rng=rng,
        extra=extra,
    )


def read_dense_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state of a dense-encoder checkpoint (:func:`~vitdsi_utils.training.checkpoint.read_checkpoint`)."""
    hint = (
        "train a dense encoder first (DenseRetriever.fit(..., checkpoint_path=...), `make dense`, or notebook "
        "07_dense); DSI models load with training.checkpoint.load_model"
    )
    return read_checkpoint(path, "dense-encoder", map_location, hint=hint)


def load_dense(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[DenseEncoder, dict]:
    """(encoder in eval mode, meta: every checkpoint entry but weights, optimiser and RNG); ``weights_only=True``."""
    state = read_dense_checkpoint(path, map_location)
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
    return int(read_dense_checkpoint(path)["epoch"]) >= epochs
