"""Self-supervised pretraining of a ViT encoder (SimCLR style), and its checkpoints.

The DSI normally starts from random weights and has to learn what images look like from 128
indexed images and a few hundred queries. This module gives its ViT encoder (and the dense
baseline's, which is the same :class:`~vitdsi_utils.model.vit.ViTEncoder`) a better start, to be
copied by :func:`vitdsi_utils.baselines.init.init_encoder`.

**Self-supervised pretraining** (:func:`train_ssl`). No pretrained weights can be downloaded on
the project's machines, so the encoder learns from unlabelled images itself, SimCLR style:
every image is augmented twice (:func:`augment_views`: random resized crop, horizontal flip,
colour jitter, random grayscale; all batched torch operations on uint8 tensors, seeded), the
two views are encoded, mean-pooled and passed through a small projection head
(:class:`SSLEncoder`), and the InfoNCE loss (:func:`info_nce`) asks each view to pick out its
partner among the ``2B - 1`` other views of the batch. Labels are never read.

The images come from *outside* the database (:func:`outside_images`): every image of the
source that no database of the study draws, for any of the given sizes N and the seed, in any
role (indexed, train, val or test query). So the pretraining never sees an image that is
later memorised or used as a query; it only sees other photos of the same ten classes, which
is what a user with a photo archive beside their database would have.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitdsi_utils import distributed
from vitdsi_utils.devices import resolve_device
from vitdsi_utils.model.vit import ViTConfig, ViTEncoder
from vitdsi_utils.training.checkpoint import CheckpointError, read_checkpoint, rng_state, write_checkpoint
from vitdsi_utils.training.config import PlainConfig, check_int, check_number
from vitdsi_utils.training.engine import Checkpointing, EpochEnd, run_training
from vitdsi_utils.training.history import History
from vitdsi_utils.training.reuse import REUSE_HINT, differences

#: The parameter-name prefixes of the encoder part of every ViTEncoder subclass.
ENCODER_PREFIXES = ViTEncoder.ENCODER_KEYS


#: Config fields that decide the encoder's parameter shapes and meaning; they must agree to copy weights.
ARCHITECTURE_FIELDS = (
    "image_size",
    "patch_size",
    "channels",
    "dim",
    "mlp_dim",
    "depth",
    "heads",
    "pos_encoding",
    "norm_eps",
)


# ------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------
@dataclass
class SSLConfig(PlainConfig):
    """Settings of :func:`train_ssl` (plain values, stored in checkpoints)."""

    epochs: int = 20  # passes over the unlabelled images
    batch_size: int = 256  # images per step (2 views each, so 2 x batch_size encoder inputs)
    lr: float = 1e-3  # AdamW learning rate after warm-up (cosine decay to 0 afterwards)
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    warmup_steps: int = 50  # linear learning-rate warm-up
    temperature: float = 0.2  # InfoNCE softmax temperature
    proj_hidden: int = 256  # hidden width of the projection head
    proj_dim: int = 64  # output width of the projection head (the loss works there)
    min_scale: float = 0.25  # random resized crop: smallest area fraction of the image
    max_ratio: float = 4 / 3  # random resized crop: aspect ratios log-uniform in [1 / max_ratio, max_ratio]
    jitter: float = 0.4  # colour jitter strength: brightness, contrast, saturation factors in [1 - s, 1 + s]
    jitter_p: float = 0.8  # probability that a view is colour-jittered
    gray_p: float = 0.2  # probability that a view is turned to grayscale
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0  # seeds the head, the batches, the augmentations and dropout
    device: str = "auto"  # "auto" (cuda if available, else cpu), or any torch device string
    progress: bool = True  # tqdm bar over epochs
    checkpoint_every: int = 1  # with a checkpoint path: save every n epochs (and after the last)

    #: How a run is executed, not what it learns. ``epochs`` is not among them: the learning rate
    #: decays over all epochs, so a run cannot be reused or resumed with another number of epochs.
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"device", "progress", "checkpoint_every"})

    def __post_init__(self) -> None:
        for name, low in (
            ("epochs", 1),
            ("batch_size", 2),
            ("warmup_steps", 0),
            ("proj_hidden", 1),
            ("proj_dim", 1),
            ("seed", 0),
            ("checkpoint_every", 1),
        ):
            setattr(self, name, check_int(name, getattr(self, name), low))  # batch_size >= 2: InfoNCE needs negatives
        self.lr = check_number("lr", self.lr, 0, low_open=True)
        self.temperature = check_number("temperature", self.temperature, 0, low_open=True)
        for name in ("weight_decay", "grad_clip"):
            setattr(self, name, check_number(name, getattr(self, name), 0))
        self.min_scale = check_number("min_scale (an area fraction)", self.min_scale, 0, 1, low_open=True)
        self.max_ratio = check_number("max_ratio (an aspect ratio)", self.max_ratio, 1)
        self.jitter = check_number("jitter", self.jitter, 0, 1, high_open=True)
        for name in ("jitter_p", "gray_p"):
            setattr(self, name, check_number(f"{name} (a probability)", getattr(self, name), 0, 1))


# ------------------------------------------------------------------------------------------
# Augmentations: batched, on uint8 (B, H, W, C), seeded by a CPU generator
# ------------------------------------------------------------------------------------------
def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def augment_views(images: torch.Tensor, generator: torch.Generator, config: SSLConfig | None = None) -> torch.Tensor:
    """One random view of every uint8 image (B, H, W, C): same shape, same dtype, same device.

    Per image, independently: a random resized crop (area fraction uniform in
    [``min_scale``, 1], aspect ratio log-uniform in [1 / ``max_ratio``, ``max_ratio``], uniform position, resized back
    bilinearly), a horizontal flip with probability 1/2, with probability ``jitter_p`` colour
    jitter (brightness, contrast and saturation factors uniform in [1 - jitter, 1 + jitter],
    applied in that order) and with probability ``gray_p`` conversion to grayscale. Hue is not
    jittered. Every random number comes from ``generator``, so the same seed gives the same views.
    """
    config = config or SSLConfig()
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"images must be a uint8 tensor (B, H, W, C); got {got}")
    n, device = len(images), images.device
    if n == 0:
        return images.clone()
    # random resized crop + flip as one affine map per image (output -> input coordinates in [-1, 1])
    area = _uniform(n, config.min_scale, 1.0, generator)
    log_ratio = _uniform(n, -math.log(config.max_ratio), math.log(config.max_ratio), generator)
    ratio = torch.exp(log_ratio)
    width = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the side
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = width * flip
    theta[:, 1, 1] = height
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    x = images.permute(0, 3, 1, 2).float() / 255.0  # (B, C, H, W) in [0, 1]
    grid = F.affine_grid(theta.to(device), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # colour jitter: brightness, contrast, saturation (torchvision's definitions), on a random subset
    s = config.jitter
    jittered = (torch.rand(n, generator=generator) < config.jitter_p).float()
    factors = [1 + jittered * (_uniform(n, 1 - s, 1 + s, generator) - 1) for _ in range(3)]
    brightness, contrast, saturation = (f.to(device)[:, None, None, None] for f in factors)
    x = (x * brightness).clamp(0, 1)
    if x.shape[1] == 3:
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]  # (B, 1, H, W)
        x = ((x - gray.mean(dim=(2, 3), keepdim=True)) * contrast + gray.mean(dim=(2, 3), keepdim=True)).clamp(0, 1)
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
        x = ((x - gray) * saturation + gray).clamp(0, 1)
        to_gray = (torch.rand(n, generator=generator) < config.gray_p).to(device)[:, None, None, None]
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
        x = torch.where(to_gray, gray.expand_as(x), x)
    else:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean).clamp(0, 1)
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ------------------------------------------------------------------------------------------
# The model and the objective
# ------------------------------------------------------------------------------------------
class SSLEncoder(ViTEncoder):
    """The ViT encoder plus a projection head: uint8 (B, H, W, 3) -> unit vectors (B, proj_dim).

    The representation is the mean of the encoder's patch tokens (what the DSI's decoder and the
    dense encoder read); the head (Linear, GELU, Linear) exists only for the loss and is dropped
    when the encoder initialises another model.
    """

    def __init__(self, config: ViTConfig, proj_hidden: int = 256, proj_dim: int = 64):
        super().__init__(config)
        self.head = nn.Sequential(nn.Linear(config.dim, proj_hidden), nn.GELU(), nn.Linear(proj_hidden, proj_dim))

    def representation(self, images: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder tokens (B, D), before the head."""
        return self.encode(images).mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.representation(images)), dim=-1)

    @torch.no_grad()
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised representations (n, D) on the CPU, in eval mode (for probes and retrieval)."""
        return embed_images(self, images, batch_size)


@torch.no_grad()
def embed_images(encoder: ViTEncoder, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unit-norm mean-pooled tokens (n, D) of any ViTEncoder, in eval mode."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    was_training = encoder.training
    encoder.eval()
    try:
        out = [
            F.normalize(encoder.encode(images[i : i + batch_size].to(encoder.device)).mean(dim=1), dim=-1).cpu()
            for i in range(0, len(images), batch_size)
        ]
    finally:
        encoder.train(was_training)
    return torch.cat(out) if out else torch.empty(0, encoder.config.dim)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two batches of unit vectors (B, D) where ``z1[i]`` and ``z2[i]`` are views of one image.

    Each of the 2B views is a query whose positive is its partner and whose negatives are the
    other 2B - 2 views; the loss is the mean cross-entropy of picking the partner, with cosine
    similarities divided by ``temperature``. Its floor is 0; a random embedding scores about
    ``log(2B - 1)``.
    """
    if z1.shape != z2.shape or z1.ndim != 2 or len(z1) < 2:
        raise ValueError(
            f"need two (B, D) batches of the same shape with B >= 2, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    z = torch.cat([z1, z2])  # (2B, D)
    logits = (z @ z.T) / temperature
    logits.fill_diagonal_(-float("inf"))
    b = len(z1)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits.float(), target)


# ------------------------------------------------------------------------------------------
# Images outside the database
# ------------------------------------------------------------------------------------------
def outside_images(image_set: Any, databases: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(images, source rows) of every image of ``image_set`` that none of ``databases`` uses.

    A database uses an image in any role (indexed, train, val or test query); its manifest's
    ``source_row`` says which. Pass every database the study will evaluate for this seed (all
    N; the ID schemes draw the same images), so that no pretraining image is ever indexed or
    used as a query. Labels are not returned: the pretraining must not read them.
    """
    used = np.zeros(len(image_set.images), dtype=bool)
    for db in databases:
        used[db.manifest["source_row"].to_numpy()] = True
    rows = np.flatnonzero(~used)
    if len(rows) < 2:
        raise ValueError(
            f"only {len(rows)} images lie outside the databases ({len(image_set.images)} in the source); "
            "pretraining needs more: use a smaller N or add images to the source"
        )
    return image_set.images[rows], rows


# ------------------------------------------------------------------------------------------
# Training and checkpoints
# ------------------------------------------------------------------------------------------
def _fingerprint(images: torch.Tensor) -> str:
    """A short hash of a sample of the training images, so a checkpoint is not resumed on other data."""
    sample = images[:: max(1, len(images) // 64)].contiguous().numpy().tobytes()
    return hashlib.sha1(sample + str(tuple(images.shape)).encode()).hexdigest()[:16]


def _lr_at(step: int, total: int, config: SSLConfig) -> float:
    """Linear warm-up, then cosine decay to zero at ``total`` steps."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_ssl(
    model: SSLEncoder,
    images: np.ndarray | torch.Tensor,
    *,
    config: SSLConfig | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = True,
) -> History:
    """Pretrain ``model`` in place on unlabelled uint8 ``images`` (n, S, S, 3) with InfoNCE; return the history.

    An epoch is one seeded permutation of the images cut into batches of ``batch_size`` (the
    last partial batch is dropped when it holds fewer than 2 images); each batch gives two
    views per image (:func:`augment_views`). AdamW with linear warm-up and cosine decay over
    all epochs. History rows (``phase="ssl"``, ``split="train"``) hold the epoch's mean
    ``loss`` and ``pos_sim`` / ``neg_sim`` (mean cosine similarity of partners and of other
    views, in the projection space) and the seconds. With ``checkpoint_path`` a checkpoint is
    written every ``checkpoint_every`` epochs and after the last; an existing one is resumed
    (a finished run returns at once) when it was written for the same model, settings (the
    recipe of :class:`SSLConfig`, epochs included) and images; otherwise a CheckpointError names
    every difference. The checkpoint's folder is locked while this runs
    (:func:`~vitdsi_utils.training.engine.run_training`).
    """
    config = config or SSLConfig()
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    c = model.config
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (c.image_size, c.image_size, c.channels):
        raise ValueError(
            f"images must be uint8 (n, {c.image_size}, {c.image_size}, {c.channels}); "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if len(images) < 2:
        raise ValueError("self-supervised training needs at least 2 images")
    device = resolve_device(config.device)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    fingerprint = _fingerprint(images)
    per_epoch = len(images) // config.batch_size + (len(images) % config.batch_size >= 2)
    total_steps = max(1, per_epoch * config.epochs)
    objective = _InfoNCEObjective(images.to(device), config)

    def load(path: Path) -> dict[str, Any]:
        state = read_ssl_checkpoint(path, device)
        problems = _mismatches(state, model, config, fingerprint)
        if problems:
            raise CheckpointError(
                f"{path} was written for another run: {'; '.join(problems)}. " + REUSE_HINT.format(files=path)
            )
        return state

    def save(path: Path, epoch: int, counters: dict[str, Any], generator: torch.Generator) -> None:
        save_ssl(
            path,
            model,
            config,
            history,
            epoch=epoch,
            optimizer=optimizer,
            rng=rng_state(generator),
            extra={"data": fingerprint, "step": counters["step"], "n_images": len(images)},
        )

    history = History()
    checkpoint = Checkpointing(checkpoint_path, load, save, every=config.checkpoint_every, resume=resume)
    run_training(
        model,
        objective,
        optimizer,
        epochs=config.epochs,
        seed=config.seed,
        lr_at=lambda step: _lr_at(step, total_steps, config),
        grad_clip=config.grad_clip,
        history=history,
        checkpoint=checkpoint,
        desc="ssl",
        progress=config.progress,
    )
    model.eval()
    return history


class _InfoNCEObjective:
    """InfoNCE between two augmented views of every image of a batch (SimCLR).

    Under a process group the loss is computed as in :class:`~vitdsi_utils.baselines.dense._DenseObjective`:
    both views of the whole global batch are drawn on every process, each process encodes its
    shard of them, the projections of all shards are gathered (this process's own live) and the
    global batch's loss, times the number of processes, is what DDP averages. Every process
    computes the same loss and similarities, so the metric sums need no all-reduce.
    """

    def __init__(self, data: torch.Tensor, config: SSLConfig):
        self.data, self.config = data, config
        self.sums = torch.zeros(3, dtype=torch.float64)
        self.batches: list[torch.Tensor] = []

    def epoch_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        order = torch.randperm(len(self.data), generator=generator)
        self.batches = [b for b in order.split(self.config.batch_size) if len(b) >= 2]
        self.sums.zero_()
        return self.batches

    def loss(self, model: torch.nn.Module, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = self.data[ids.to(self.data.device)]
        v1, v2 = augment_views(batch, generator, self.config), augment_views(batch, generator, self.config)
        world = distributed.world_size()
        if world > 1:  # this shard's views encoded, live among every other shard's projections
            part = distributed.shard_slice(len(ids))
            local = model(torch.cat([v1[part], v2[part]]))
            half = len(local) // 2
            z1 = distributed.gather_rows(local[:half], live=True)
            z2 = distributed.gather_rows(local[half:], live=True)
        else:
            z = model(torch.cat([v1, v2]))
            z1, z2 = z[: len(ids)], z[len(ids) :]
        loss = info_nce(z1, z2, self.config.temperature)
        with torch.no_grad():
            sim = z1 @ z2.T
            pos = sim.diagonal().mean()
            neg = (sim.sum() - sim.diagonal().sum()) / max(1, sim.numel() - len(ids))
        self.sums += torch.stack([loss.detach(), pos, neg]).double().cpu()
        return loss * world if world > 1 else loss

    def end_epoch(self, model: torch.nn.Module, epoch: int, seconds: float) -> EpochEnd:
        means = (self.sums / max(1, len(self.batches))).tolist()
        row = {
            "phase": "ssl",
            "epoch": epoch,
            "split": "train",
            "task": "infonce",
            "loss": means[0],
            "pos_sim": means[1],
            "neg_sim": means[2],
            "seconds": seconds,
            "n_examples": int(sum(len(b) for b in self.batches)),
        }
        return EpochEnd([row], {"loss": f"{means[0]:.3f}", "pos": f"{means[1]:.2f}", "neg": f"{means[2]:.2f}"})


def _mismatches(state: dict, model: SSLEncoder, config: SSLConfig, fingerprint: str) -> list[str]:
    """Every difference between a checkpoint and the run that wants it (model, recipe incl. epochs, images)."""
    problems = differences({**ViTConfig().to_dict(), **state["config"]}, model.config.to_dict(), "model ")
    problems += differences(SSLConfig.recipe_of(state["train_config"] or {}), config.recipe())
    if state["extra"].get("data") != fingerprint:
        problems.append("the images differ")
    return problems


def encoder_state_dict(model: ViTEncoder) -> dict[str, torch.Tensor]:
    """The encoder part of any :class:`ViTEncoder` subclass's state dict (:meth:`ViTEncoder.encoder_state_dict`)."""
    return model.encoder_state_dict()


def save_ssl(
    path: str | os.PathLike,
    model: SSLEncoder,
    config: SSLConfig | None,
    history: list[dict] | None,
    *,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the pretrained encoder: a checkpoint of kind ``"ssl-encoder"`` (loads with ``weights_only=True``).

    ``encoder`` holds the encoder weights alone (what :func:`init_encoder` copies), ``model``
    the encoder with its projection head (what resuming needs).
    """
    return write_checkpoint(
        path,
        "ssl-encoder",
        model=model,
        optimizer=optimizer,
        config=model.config.to_dict(),
        train_config=config.to_dict() if config is not None else None,
        epoch=epoch,
        history=history,
        rng=rng,
        extra=extra,
        encoder=encoder_state_dict(model),
        head={"proj_hidden": model.head[0].out_features, "proj_dim": model.head[2].out_features},
    )


def read_ssl_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The state of a self-supervised encoder checkpoint (:func:`~vitdsi_utils.training.checkpoint.read_checkpoint`)."""
    hint = "pretrain an encoder with `make pretrain` or baselines.ssl.train_ssl(..., checkpoint_path=...)"
    return read_checkpoint(path, "ssl-encoder", map_location, hint=hint)


def load_ssl(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[SSLEncoder, dict]:
    """(pretrained encoder with its head, in eval mode; meta: configs, epoch, history, extra)."""
    state = read_ssl_checkpoint(path, map_location)
    model = SSLEncoder(ViTConfig.from_dict(state["config"]), **state["head"])
    model.load_state_dict(state["model"])
    model.to(map_location).eval()
    meta = {k: v for k, v in state.items() if k not in ("model", "encoder", "optimizer", "rng")}
    meta["history"] = History(meta["history"])
    return model, meta
