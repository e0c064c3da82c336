"""Encoder initialisation: self-supervised pretraining, and weights from elsewhere.

The DSI normally starts from random weights and has to learn what images look like from 128
indexed images and a few hundred queries. This module gives its ViT encoder (and the dense
baseline's, which is the same :class:`~vitdsi_utils.model.ViTEncoder`) a better start.

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

**One entry point for every initialisation** (:func:`init_encoder`): copy the encoder part of
a DSI model or dense encoder from

* ``"ssl"``: a checkpoint of :func:`train_ssl` / :func:`save_ssl`;
* ``"dense"``: a dense-retrieval checkpoint (:func:`vitdsi_utils.dense.save_dense`);
* ``"dsi"``: a DSI checkpoint (:func:`vitdsi_utils.train.save_checkpoint`);
* ``"torchvision"``: a state dict of torchvision's ``VisionTransformer`` (e.g. the
  ``vit_b_16`` weights file a user has locally), with its parameter names mapped onto ours.

The encoder weights are the parameters whose names start with ``patch_embed.``, ``pos_embed``,
``peg.`` or ``encoder.`` (:data:`ENCODER_PREFIXES`): the same keys in every
:class:`ViTEncoder` subclass, so any of them can initialise any other. The architecture fields
of the configs (:data:`ARCHITECTURE_FIELDS`) must agree; dropout need not.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._io import atomic_path
from .model import ViTConfig, ViTEncoder
from .train import (History, PlainConfig, TrainConfig, _rng_state, load_checkpoint, resolve_device, restore_training,
                    seed_everything)

__all__ = [
    "ARCHITECTURE_FIELDS",
    "ENCODER_PREFIXES",
    "INIT_SOURCES",
    "EncoderInit",
    "SSLConfig",
    "SSLEncoder",
    "augment_views",
    "embedding_probe",
    "encoder_state_dict",
    "info_nce",
    "init_encoder",
    "load_ssl",
    "outside_images",
    "save_ssl",
    "torchvision_overrides",
    "torchvision_to_encoder",
    "train_ssl",
]

INIT_SOURCES = ("ssl", "dense", "dsi", "torchvision")
#: The parameter-name prefixes of the encoder part of every ViTEncoder subclass.
ENCODER_PREFIXES = ViTEncoder.ENCODER_KEYS
#: Config fields that decide the encoder's parameter shapes and meaning; they must agree to copy weights.
ARCHITECTURE_FIELDS = ("image_size", "patch_size", "channels", "dim", "mlp_dim", "depth", "heads", "pos_encoding",
                       "norm_eps")
CHECKPOINT_KIND = "ssl-encoder"
CHECKPOINT_FORMAT = 1


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

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 2 or self.checkpoint_every < 1 or self.warmup_steps < 0:
            raise ValueError("epochs and warmup_steps must be >= 0, batch_size >= 2 (InfoNCE needs negatives) "
                             "and checkpoint_every >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.temperature <= 0:
            raise ValueError("lr and temperature must be positive, weight_decay non-negative")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale is an area fraction in (0, 1], got {self.min_scale}")
        if self.max_ratio < 1:
            raise ValueError(f"max_ratio is an aspect ratio >= 1, got {self.max_ratio}")
        if not 0 <= self.jitter < 1 or not 0 <= self.jitter_p <= 1 or not 0 <= self.gray_p <= 1:
            raise ValueError("jitter must lie in [0, 1); jitter_p and gray_p are probabilities")
        if self.proj_hidden < 1 or self.proj_dim < 1:
            raise ValueError("proj_hidden and proj_dim must be >= 1")

    def recipe(self) -> dict[str, Any]:
        """The settings that shape the trained encoder (not device, progress or checkpointing).

        ``epochs`` is part of it: the learning rate decays over all epochs, so a run cannot be
        resumed with another number of epochs.
        """
        return {k: v for k, v in self.to_dict().items() if k not in {"device", "progress", "checkpoint_every"}}


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
        return _embed(self, images, batch_size)


@torch.no_grad()
def _embed(encoder: ViTEncoder, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unit-norm mean-pooled tokens (n, D) of any ViTEncoder, in eval mode."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    was_training = encoder.training
    encoder.eval()
    try:
        out = [F.normalize(encoder.encode(images[i : i + batch_size].to(encoder.device)).mean(dim=1), dim=-1).cpu()
               for i in range(0, len(images), batch_size)]
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
        raise ValueError(f"need two (B, D) batches of the same shape with B >= 2, got {tuple(z1.shape)} and {tuple(z2.shape)}")
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
        raise ValueError(f"only {len(rows)} images lie outside the databases ({len(image_set.images)} in the source); "
                         "pretraining needs more: use a smaller N or add images to the source")
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
) -> "History":
    """Pretrain ``model`` in place on unlabelled uint8 ``images`` (n, S, S, 3) with InfoNCE; return the history.

    An epoch is one seeded permutation of the images cut into batches of ``batch_size`` (the
    last partial batch is dropped when it holds fewer than 2 images); each batch gives two
    views per image (:func:`augment_views`). AdamW with linear warm-up and cosine decay over
    all epochs. History rows (``phase="ssl"``, ``split="train"``) hold the epoch's mean
    ``loss`` and ``pos_sim`` / ``neg_sim`` (mean cosine similarity of partners and of other
    views, in the projection space) and the seconds. With ``checkpoint_path`` a checkpoint is
    written every ``checkpoint_every`` epochs and after the last; an existing one is resumed
    (a finished run returns at once) when it was written for the same model, settings and images.
    """
    config = config or SSLConfig()
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    c = model.config
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (c.image_size, c.image_size, c.channels):
        raise ValueError(f"images must be uint8 (n, {c.image_size}, {c.image_size}, {c.channels}); "
                         f"got {images.dtype} {tuple(images.shape)}")
    if len(images) < 2:
        raise ValueError("self-supervised training needs at least 2 images")
    device = resolve_device(config.device)
    model.to(device)
    data = images.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    history = History()
    fingerprint = _fingerprint(images)
    per_epoch = len(images) // config.batch_size + (len(images) % config.batch_size >= 2)
    total_steps = max(1, per_epoch * config.epochs)
    start_epoch, step = 0, 0
    if checkpoint_path is not None and resume and Path(checkpoint_path).exists():
        state = _read_ssl(checkpoint_path, device)
        problems = _mismatches(state, model, config, fingerprint)
        if problems:
            raise ValueError(f"{checkpoint_path} was written for another run ({'; '.join(problems)}); delete it "
                             "to pretrain again, or ask for its settings")
        if state["epoch"] > config.epochs:
            raise ValueError(f"{checkpoint_path} holds {state['epoch']} epochs, more than the {config.epochs} asked "
                             "for; delete it to pretrain again")
        restore_training(state, model, optimizer, history, generator)
        start_epoch, step = int(state["epoch"]), int(state["extra"].get("step", 0))
    else:
        torch.manual_seed(config.seed)

    def save(epoch: int) -> None:
        save_ssl(checkpoint_path, model, config, history, epoch=epoch, optimizer=optimizer,
                 rng=_rng_state(generator), extra={"data": fingerprint, "step": step, "n_images": len(images)})

    bar = tqdm(range(start_epoch, config.epochs), initial=start_epoch, total=config.epochs, desc="ssl",
               disable=not config.progress)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(images), generator=generator)
        batches = [b for b in order.split(config.batch_size) if len(b) >= 2]
        sums = torch.zeros(3, dtype=torch.float64)
        for ids in batches:
            batch = data[ids.to(device)]
            v1, v2 = augment_views(batch, generator, config), augment_views(batch, generator, config)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total_steps, config)
            z = model(torch.cat([v1, v2]))
            z1, z2 = z[: len(ids)], z[len(ids):]
            loss = info_nce(z1, z2, config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            with torch.no_grad():
                sim = z1 @ z2.T
                pos = sim.diagonal().mean()
                neg = (sim.sum() - sim.diagonal().sum()) / max(1, sim.numel() - len(ids))
            sums += torch.stack([loss.detach(), pos, neg]).double().cpu()
        means = (sums / max(1, len(batches))).tolist()
        history.append({"phase": "ssl", "epoch": epoch + 1, "split": "train", "task": "infonce", "loss": means[0],
                        "pos_sim": means[1], "neg_sim": means[2], "seconds": time.perf_counter() - t0,
                        "n_examples": int(sum(len(b) for b in batches))})
        bar.set_postfix(loss=f"{means[0]:.3f}", pos=f"{means[1]:.2f}", neg=f"{means[2]:.2f}")
        if checkpoint_path is not None and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs):
            save(epoch + 1)
    bar.close()
    if checkpoint_path is not None and not Path(checkpoint_path).exists():
        save(config.epochs)
    model.eval()
    return history


def _mismatches(state: dict, model: SSLEncoder, config: SSLConfig, fingerprint: str) -> list[str]:
    problems = []
    saved = {**ViTConfig().to_dict(), **state["config"]}
    for key, value in model.config.to_dict().items():
        if saved.get(key) != value:
            problems.append(f"model {key}: saved {saved.get(key)!r}, requested {value!r}")
    stored = SSLConfig.from_dict(state["ssl_config"] or {}).recipe()
    for key, value in config.recipe().items():
        if stored.get(key) != value:
            problems.append(f"{key}: saved {stored.get(key)!r}, requested {value!r}")
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
    """Write the pretrained encoder atomically: plain data and tensors only, so it loads with ``weights_only=True``.

    ``encoder`` holds the encoder weights alone (what :func:`init_encoder` copies), ``model``
    the encoder with its projection head (what resuming needs).
    """
    state = {
        "format": CHECKPOINT_FORMAT,
        "kind": CHECKPOINT_KIND,
        "model": model.state_dict(),
        "encoder": encoder_state_dict(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "config": model.config.to_dict(),
        "head": {"proj_hidden": model.head[0].out_features, "proj_dim": model.head[2].out_features},
        "ssl_config": config.to_dict() if config is not None else None,
        "epoch": int(epoch),
        "history": [dict(r) for r in history or []],
        "rng": rng,
        "extra": dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def _torch_load(path: str | os.PathLike, what: str, hint: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that say what the file should have been."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {hint}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickles with code, truncated files, foreign formats raise several types
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ValueError(f"{path} is not {what} that loads safely ({type(error).__name__}: {reason}); {hint}") from error


def _kind_of(state: Any) -> str:
    """What a loaded checkpoint is, in words ("a dense checkpoint", "a dsi checkpoint", ...)."""
    if isinstance(state, dict):
        if state.get("kind") == "dense-encoder":
            return "a dense checkpoint"
        if "codec" in state:
            return "a dsi checkpoint"
        if "conv_proj.weight" in state:
            return "a torchvision state dict"
    return "an unknown file"


def _read_ssl(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    hint = "pretrain an encoder with `vitdsi pretrain` or pretrain.train_ssl(..., checkpoint_path=...)"
    state = _torch_load(path, "a self-supervised encoder checkpoint", hint, map_location)
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        kind = _kind_of(state)
        raise ValueError(f"{path} is {kind}, not a self-supervised encoder checkpoint; "
                         + (f"use source {kind.split()[1]!r} for it" if kind.split()[1] in INIT_SOURCES else hint))
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unknown SSL checkpoint format {state.get('format')!r} "
                         f"(this version reads {CHECKPOINT_FORMAT}); pretrain again")
    return state


def load_ssl(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[SSLEncoder, dict]:
    """(pretrained encoder with its head, in eval mode; meta: configs, epoch, history, extra)."""
    state = _read_ssl(path, map_location)
    model = SSLEncoder(ViTConfig.from_dict(state["config"]), **state["head"])
    model.load_state_dict(state["model"])
    model.to(map_location).eval()
    meta = {k: v for k, v in state.items() if k not in ("model", "encoder", "optimizer", "rng")}
    meta["history"] = History(meta["history"])
    return model, meta


# ------------------------------------------------------------------------------------------
# torchvision's VisionTransformer -> our encoder
# ------------------------------------------------------------------------------------------
_TV_REQUIRED = ("conv_proj.weight", "conv_proj.bias", "class_token", "encoder.pos_embedding", "encoder.ln.weight",
                "encoder.ln.bias")
_TV_BLOCK = {  # torchvision EncoderBlock name -> nn.TransformerEncoderLayer name
    "ln_1": "norm1",
    "self_attention.in_proj_weight": "self_attn.in_proj_weight",
    "self_attention.in_proj_bias": "self_attn.in_proj_bias",
    "self_attention.out_proj": "self_attn.out_proj",
    "ln_2": "norm2",
    "mlp.0": "linear1",
    "mlp.3": "linear2",
    "mlp.linear_1": "linear1",  # torchvision < 0.13 named the MLP layers so
    "mlp.linear_2": "linear2",
}
#: LayerNorm epsilon of torchvision's ViTs (``partial(nn.LayerNorm, eps=1e-6)``).
TORCHVISION_NORM_EPS = 1e-6


def _resolve_torchvision_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or the cached file of a torchvision weights name such as ``ViT_B_16_Weights.IMAGENET1K_V1``.

    A weights name whose file is not in torch hub's cache would have to be downloaded; that is
    an error (these machines are offline) which gives the URL and the place to put the file.
    """
    path = Path(path)
    if path.is_file():
        return path
    text = str(path)
    if path.suffix in ("", ".DEFAULT") or text.startswith(("ViT_", "vit_")):
        try:
            from torchvision.models import get_model_weights, get_weight
        except ImportError:  # pragma: no cover - torchvision is in requirements.txt
            get_weight = get_model_weights = None
        weights = None
        if get_weight is not None:
            for resolve in (lambda: get_weight(text), lambda: get_model_weights(text).DEFAULT):
                try:
                    weights = resolve()
                    break
                except Exception:
                    continue
        if weights is not None:
            cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
            if cached.is_file():
                return cached
            raise FileNotFoundError(
                f"torchvision's {text} weights are not on this machine, and torchvision would have to download "
                f"them from {weights.url}; this machine cannot download. Fetch that file elsewhere and pass its "
                f"path (or copy it to {cached})"
            )
    raise FileNotFoundError(
        f"{path} does not exist: pass the path of a torchvision VisionTransformer state dict "
        "(torch.save(model.state_dict(), path)), or a torchvision weights name such as "
        "ViT_B_16_Weights.IMAGENET1K_V1 whose file is in torch hub's cache"
    )


def _load_torchvision_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    file = _resolve_torchvision_file(path)
    hint = ("save the weights as a state dict: torch.save(vit.state_dict(), path) with vit a "
            "torchvision.models.VisionTransformer (e.g. torchvision.models.vit_b_16(weights=...))")
    state = _torch_load(file, "a torchvision state dict", hint)
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "conv_proj.weight" in state["model"]:
        state = state["model"]  # a training checkpoint that wraps the state dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} is not a state dict (a dict of tensors); {hint}")
    missing = [k for k in _TV_REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{file} is not a torchvision VisionTransformer state dict: it lacks {missing} "
                         f"(it has e.g. {sorted(state)[:5]}); {hint}")
    if any(k.startswith("conv_proj.") and k not in ("conv_proj.weight", "conv_proj.bias") for k in state):
        raise ValueError(f"{file} holds a ViT with a convolutional stem (conv_proj is a stack of layers); only the "
                         "plain patch projection maps onto this encoder")
    return state


def _torchvision_depth(state: dict[str, torch.Tensor]) -> int:
    prefix = "encoder.layers.encoder_layer_"
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def torchvision_overrides(path: str | os.PathLike) -> dict[str, Any]:
    """The ViTConfig fields under which a torchvision ViT state dict loads exactly (use as model overrides).

    Read from the shapes: patch size and width from ``conv_proj``, depth from the layers, MLP
    width from the first MLP layer, image size from the positional table; the number of heads
    is not stored in a state dict, so it is the usual ``dim // 64`` (vit_b: 12, vit_l: 16) and
    should be checked against the model the weights came from.
    """
    state = _load_torchvision_state(path)
    return _torchvision_fields(state)


def _torchvision_fields(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    dim, channels, patch, _ = state["conv_proj.weight"].shape
    n_pos = state["encoder.pos_embedding"].shape[1] - 1
    grid = int(round(math.sqrt(n_pos)))
    mlp = state["encoder.layers.encoder_layer_0.mlp.0.weight"] if "encoder.layers.encoder_layer_0.mlp.0.weight" in state \
        else state.get("encoder.layers.encoder_layer_0.mlp.linear_1.weight")
    return {"image_size": grid * patch if grid * grid == n_pos else None, "patch_size": int(patch),
            "channels": int(channels), "dim": int(dim), "mlp_dim": int(mlp.shape[0]) if mlp is not None else None,
            "depth": _torchvision_depth(state), "heads": max(1, int(dim) // 64), "pos_encoding": "learned",
            "norm_eps": TORCHVISION_NORM_EPS}


def torchvision_to_encoder(state: dict[str, torch.Tensor], config: ViTConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(our encoder's state dict, class token (1, 1, D)) from a torchvision ViT state dict, for ``config``.

    torchvision adds position 0 of its table to the class token and positions 1.. to the
    patches; our encoder adds positions to the patches only and puts a class token (a
    ``prefix``) after that, so the returned class token is ``class_token + pos_embedding[:, :1]``
    and ``encode(images, prefix=cls)`` computes what torchvision's encoder computes. The
    classification head is not mapped. ValueError names every config field that does not
    match the weights (the heads cannot be read from the weights and are not checked).
    """
    found = _torchvision_fields(state)
    problems = []
    checks = [("patch_size", "patch size (conv_proj kernel)"), ("dim", "width (hidden_dim)"),
              ("channels", "input channels"), ("depth", "blocks (num_layers)"), ("mlp_dim", "MLP width (mlp_dim)")]
    for name, what in checks:
        if getattr(config, name) != found[name]:
            problems.append(f"{name}={getattr(config, name)} but the weights have {what} {found[name]}")
    n_pos = state["encoder.pos_embedding"].shape[1] - 1
    if n_pos != config.num_patches:
        size = f"{found['image_size']} px" if found["image_size"] else f"{n_pos} patch positions"
        problems.append(f"image_size={config.image_size} gives {config.num_patches} patches, but the positional "
                        f"table was trained for {size} ({n_pos} patches); resize the images to that size")
    if config.pos_encoding != "learned":
        problems.append(f"pos_encoding={config.pos_encoding!r} but torchvision's positions are a learned table; "
                        "use pos_encoding='learned'")
    if config.norm_eps != TORCHVISION_NORM_EPS:
        problems.append(f"norm_eps={config.norm_eps:g} but torchvision's LayerNorms use eps "
                        f"{TORCHVISION_NORM_EPS:g}; use norm_eps={TORCHVISION_NORM_EPS:g}")
    if config.dim % config.heads:
        problems.append(f"heads={config.heads} does not divide dim {config.dim}")
    if problems:
        wanted = {k: v for k, v in found.items() if v is not None}
        raise ValueError(
            "the torchvision ViT weights do not fit this encoder: " + "; ".join(problems)
            + f". Build the model with these settings (e.g. model_overrides={wanted}, which "
            "pretrain.torchvision_overrides(path) returns; check heads against the model the weights came from)"
        )
    out = {
        "patch_embed.proj.weight": state["conv_proj.weight"],
        "patch_embed.proj.bias": state["conv_proj.bias"],
        "pos_embed": state["encoder.pos_embedding"][:, 1:],
        "encoder.norm.weight": state["encoder.ln.weight"],
        "encoder.norm.bias": state["encoder.ln.bias"],
    }
    for i in range(config.depth):
        source = f"encoder.layers.encoder_layer_{i}."
        for key, value in state.items():
            if not key.startswith(source):
                continue
            rest = key[len(source):]
            for tv_name, ours in _TV_BLOCK.items():
                if rest == tv_name or rest.startswith(tv_name + "."):
                    out[f"encoder.layers.{i}.{ours}{rest[len(tv_name):]}"] = value
                    break
            else:
                raise ValueError(f"unexpected torchvision parameter {key!r}: this mapping knows {sorted(_TV_BLOCK)}")
    cls = state["class_token"] + state["encoder.pos_embedding"][:, :1]
    return out, cls


# ------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------
@dataclass
class EncoderInit:
    """What :func:`init_encoder` did: the source, the file, the keys copied, and the class token if any."""

    source: str
    path: str
    copied: list[str]
    class_token: torch.Tensor | None = None  # (1, 1, D); the torchvision or dense class token, when the source has one
    class_token_copied: bool = False  # whether the model's own cls_token received it
    details: dict[str, Any] = field(default_factory=dict)

    def tag(self) -> str:
        """A short text naming the source and the file's content (for run names and checkpoint fingerprints)."""
        digest = hashlib.sha1(Path(self.path).read_bytes()).hexdigest()[:12] if Path(self.path).is_file() else "-"
        return f"{self.source}:{digest}"


def _source_encoder(source: str, path: str | os.PathLike, target: ViTConfig) -> tuple[dict, ViTConfig | None, torch.Tensor | None, str, dict]:
    """(encoder state, its config (None: already checked), class token, file, details) of one source."""
    if source == "ssl":
        state = _read_ssl(path)
        return state["encoder"], ViTConfig.from_dict(state["config"]), None, str(path), {"epochs": state["epoch"]}
    if source == "dense":
        from .dense import DenseConfig, _read_checkpoint

        state = _read_checkpoint(path)
        model = state["model"]
        return ({k: v for k, v in model.items() if k.startswith(ENCODER_PREFIXES)},
                DenseConfig.from_dict(state["config"]), model.get("cls_token"), str(path), {"epochs": state["epoch"]})
    if source == "dsi":
        from .model import DSIConfig

        state = load_checkpoint(path)
        return ({k: v for k, v in state["model"].items() if k.startswith(ENCODER_PREFIXES)},
                DSIConfig.from_dict(state["config"]), None, str(path), {"epochs": state["epoch"]})
    if source == "torchvision":
        file = _resolve_torchvision_file(path)
        weights, cls = torchvision_to_encoder(_load_torchvision_state(file), target)
        return weights, None, cls, str(file), {}
    raise ValueError(f"unknown encoder source {source!r}; choose one of {INIT_SOURCES}")


def init_encoder(model: ViTEncoder, source: str, path: str | os.PathLike) -> EncoderInit:
    """Copy encoder weights from ``path`` into ``model`` (a DSIModel, DenseEncoder, SSLEncoder or ViTEncoder), in place.

    ``source`` is one of :data:`INIT_SOURCES` (see the module docstring). Only the encoder
    part is replaced (:data:`ENCODER_PREFIXES`); a DSI's decoder and head, a projection head or
    a dense class token keep their values, except that a ``cls_token`` of ``model`` receives the
    source's class token when it has one (a dense encoder with class-token pooling, or
    torchvision's, which then carries its position-0 embedding). The architecture fields of both
    configs must agree (:data:`ARCHITECTURE_FIELDS`), or ValueError names each mismatch.
    Files are read with ``weights_only=True``.
    """
    if not isinstance(model, ViTEncoder):
        raise TypeError(f"model must be a ViTEncoder (DSIModel, DenseEncoder, ...), got {type(model).__name__}")
    if source not in INIT_SOURCES:
        raise ValueError(f"unknown encoder source {source!r}; choose one of {INIT_SOURCES}")
    weights, config, cls, file, details = _source_encoder(source, path, model.config)
    if config is not None:
        problems = [f"{name}: {getattr(config, name)!r} in {path}, {getattr(model.config, name)!r} in the model"
                    for name in ARCHITECTURE_FIELDS if getattr(config, name) != getattr(model.config, name)]
        if problems:
            raise ValueError(f"the {source} encoder in {path} does not fit this model: " + "; ".join(problems)
                             + ". Build the model with the encoder's settings (or pretrain one for these)")
    wanted = encoder_state_dict(model)
    missing = sorted(set(wanted) - set(weights))
    extra = sorted(set(weights) - set(wanted))
    if missing or extra:
        raise ValueError(f"the {source} weights in {path} do not match the encoder's parameters "
                         f"(missing {missing[:5]}, unexpected {extra[:5]}); the file is damaged or of another model")
    model.load_encoder(weights)  # checks the shapes too
    with torch.no_grad():
        copied_cls = False
        own = getattr(model, "cls_token", None)
        if cls is not None and isinstance(own, torch.Tensor) and own.shape == cls.shape:
            own.copy_(cls.to(own.dtype))
            copied_cls = True
    return EncoderInit(source, str(file), sorted(weights), cls, copied_cls, details)


# ------------------------------------------------------------------------------------------
# Probes: is the representation any good, before any DSI training?
# ------------------------------------------------------------------------------------------
def embedding_probe(encoder: ViTEncoder, db: Any, *, k: int = 10, seed: int = 0) -> dict[str, float]:
    """Label-free quality checks of ``encoder``'s mean-pooled embeddings on a database.

    * ``knn_acc``: each test query takes the majority class of its ``k`` nearest indexed
      images (cosine): the database lookup a DSI has to learn;
    * ``linear_acc``: a logistic regression on the train queries' and indexed images'
      embeddings, scored on the test queries;
    * ``map@10``: retrieval of the indexed images by cosine similarity, over the test queries;
    * ``chance``: the share of the most common test class.
    """
    from sklearn.linear_model import LogisticRegression

    from . import metrics

    index_images, index_labels = db.split("index")
    test_images, test_labels = db.split("test")
    train_images, train_labels = db.split("train")
    index_z, test_z = _embed(encoder, index_images).numpy(), _embed(encoder, test_images).numpy()
    train_z = _embed(encoder, train_images).numpy()
    similarity = test_z @ index_z.T
    nearest = np.argsort(-similarity, axis=1, kind="stable")
    votes = index_labels[nearest[:, :k]]
    n_classes = int(max(index_labels.max(), test_labels.max())) + 1
    counts = np.stack([(votes == c).sum(axis=1) for c in range(n_classes)], axis=1)
    knn = float((counts.argmax(axis=1) == test_labels).mean())
    probe = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    probe.fit(np.concatenate([train_z, index_z]), np.concatenate([train_labels, index_labels]))
    linear = float((probe.predict(test_z) == test_labels).mean())
    relevant = metrics.label_relevance(test_labels, index_labels)
    hits = metrics.relevance_matrix(nearest[:, :10], relevant)
    ap = metrics.average_precision_at_k(hits, relevant.sum(axis=1), 10)
    chance = float(np.bincount(test_labels).max() / len(test_labels))
    return {"knn_acc": knn, "linear_acc": linear, "map@10": float(np.nanmean(ap)), "chance": chance}


# ------------------------------------------------------------------------------------------
# The study: pretrain, probe, train the DSI from the pretrained encoder, compare with scratch
# ------------------------------------------------------------------------------------------
COMPARED = ("IA@1", "IA@5", "mAP@10", "P@10", "R@100")


def pretrain_study(
    source: str = "imagenette",
    size: int = 64,
    n: int = 512,
    seed: int = 0,
    scheme: str = "clustered",
    *,
    exclude_ns: Sequence[int] = (512, 1024, 2048),
    model_overrides: dict | None = None,
    ssl_config: SSLConfig | None = None,
    index_config: Any = None,
    retrieval_config: Any = None,
    max_pairs_per_query: int | None = None,
    baseline_table: str | os.PathLike | None = None,
    baseline_histories: str | os.PathLike | None = None,
    train_scratch: bool = False,
    max_images: int | None = None,
    semantic_ids: dict | None = None,
    runs_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Pretrain an encoder on the images outside the databases, then index and fine-tune a DSI from it.

    The pretraining images are every image of ``source`` that none of the databases of sizes
    ``exclude_ns`` (and ``n``) for ``seed`` uses (:func:`outside_images`). The encoder is the
    DSI's (``model_overrides`` as for ``vitdsi dsi``). The probes (:func:`embedding_probe`)
    compare the pretrained encoder with a randomly initialised one on the database. The DSI
    is trained from the pretrained encoder with ``index_config`` / ``retrieval_config``; the
    from-scratch numbers come from ``baseline_table`` (a ``vitdsi dsi`` CSV, with
    ``baseline_histories`` for its curves) or, with ``train_scratch``, from a run here.
    ``max_images`` pretrains on a seeded random subset of that many outside images (None: all),
    for a shorter run.

    ``semantic_ids`` (e.g. ``{"k": 10, "c": 10}``) adds a third DSI, also from the SSL encoder, whose
    IDs are label-free semantic IDs: hierarchical k-means over the *SSL encoder's* embeddings of
    the indexed images (:func:`~vitdsi_utils.semantic_ids.assign_ids`, tag ``semantic-ssl-k..-c..``).
    ``id_facts`` then says how often sibling IDs (same parent prefix) share a class, for those IDs
    and for the same k-means over a randomly initialised encoder's embeddings.

    Returns and (with ``out_dir``) writes: ``results`` (DSI rows, ``init`` = scratch / ssl, ``ids``
    the scheme), ``probes``, ``ssl_history``, ``histories`` (indexing curves), ``paired``,
    ``id_facts`` and a figure; ``markdown`` is the report (settings, the tables and the probes).
    """
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 2):
        raise ValueError(f"max_images must be None or an integer >= 2 (InfoNCE needs two images), got {max_images!r}")
    from .data import build_database, load_images
    from .evaluation import attach_paper
    from .experiments import run_experiment, run_name
    from .model import DSIConfig

    runs_dir = Path(runs_dir) if runs_dir is not None else None
    ssl_config = ssl_config or SSLConfig(progress=progress)
    index_config = index_config or TrainConfig(epochs=400, lr=1e-3, warmup_steps=100, target_accuracy=0.99, seed=seed)
    retrieval_config = retrieval_config or TrainConfig(epochs=10, lr=1e-3, seed=seed)
    overrides = dict(model_overrides or {})
    image_set = load_images(source, size, root=root, progress=progress)
    db = build_database(image_set, n, id_scheme=scheme, seed=seed)
    others = [build_database(image_set, m, id_scheme=scheme, seed=seed) for m in sorted(set(exclude_ns) - {n})
              if m <= len(image_set.images)]
    images, rows = outside_images(image_set, [db, *others])
    if max_images is not None and max_images < len(images):
        keep = np.sort(np.random.default_rng(seed).choice(len(images), size=max_images, replace=False))
        images, rows = images[keep], rows[keep]
    # the encoder of the DSI: every architecture field of the DSI's config, so the weights fit it
    dsi_fields = DSIConfig(image_size=size, **overrides).to_dict()
    encoder_config = ViTConfig(**{k: v for k, v in dsi_fields.items() if k in {f.name for f in fields(ViTConfig)}})
    # one folder per pretraining (epochs, batch, number of images), so a study whose SSL settings
    # change trains a new encoder beside the old one instead of refusing the old checkpoint
    ssl_tag = f"e{ssl_config.epochs}-b{ssl_config.batch_size}-i{len(images)}"
    ssl_dir = runs_dir / f"ssl-{source}-{size}px-N{n}-seed{seed}-{ssl_tag}" if runs_dir is not None else None
    ssl_path = ssl_dir / "ssl.pt" if ssl_dir is not None else None
    torch.manual_seed(ssl_config.seed)
    model = SSLEncoder(encoder_config, ssl_config.proj_hidden, ssl_config.proj_dim)
    start = time.perf_counter()
    ssl_history = train_ssl(model, images, config=ssl_config, checkpoint_path=ssl_path)
    ssl_frame = ssl_history.to_frame()
    ssl_seconds = float(ssl_frame["seconds"].sum()) if len(ssl_frame) else time.perf_counter() - start

    seed_everything(seed)
    random_encoder = ViTEncoder(encoder_config)
    probes = pd.DataFrame([
        {"encoder": "random init", **embedding_probe(random_encoder, db, seed=seed)},
        {"encoder": "SSL pretrained", **embedding_probe(model, db, seed=seed)},
    ]).assign(n=n, ids=scheme, seed=seed, ssl_images=len(images), ssl_epochs=int(ssl_frame["epoch"].max()))

    if ssl_path is None:  # no run folder: the encoder still has to reach the DSI through a file
        import tempfile

        ssl_path = Path(tempfile.mkdtemp()) / "ssl.pt"
        save_ssl(ssl_path, model, ssl_config, ssl_history, epoch=ssl_config.epochs)
    tables, histories, models = [], [], {}
    # (init, encoder file, IDs: None = the database's own; else an IDAssignment)
    runs: list[tuple[str, Any, Any]] = [("ssl", ("ssl", ssl_path), None)]
    if train_scratch:
        runs.append(("scratch", None, None))
    id_facts = pd.DataFrame()
    if semantic_ids is not None:
        semantic, id_facts = _ssl_semantic_ids(db, model, random_encoder, seed, semantic_ids)
        runs.append(("ssl", ("ssl", ssl_path), semantic))
    for init, spec, assignment in runs:
        ids = scheme if assignment is None else assignment.scheme
        name = run_name(db, None if assignment is None else assignment.tag) + (
            f"-init-{init}-{ssl_tag}" if spec is not None else "")
        experiment = run_experiment(
            db, model_overrides=overrides, index_config=index_config, retrieval_config=retrieval_config,
            run_dir=runs_dir / name if runs_dir is not None else None, max_pairs_per_query=max_pairs_per_query,
            encoder_init=spec, codec=None if assignment is None else assignment.codec, ids=ids,
        )
        tables.append(experiment.table.assign(init=init))
        if assignment is None:
            models[init] = experiment
        for phase in (experiment.zero_shot, experiment.fine_tuned):
            if phase is not None and len(phase.history):
                histories.append(phase.history.to_frame().assign(n=n, ids=ids, seed=seed, init=init))
    paired = pd.DataFrame()
    if "scratch" in models:
        from .semantic_ids import codec_for

        codec = codec_for(db)
        paired = pd.concat([
            paired_comparison(getattr(models["ssl"], attr).model, getattr(models["scratch"], attr).model, codec, db,
                              seed=seed).assign(model=name)
            for attr, name in (("zero_shot", "DSI zero-shot"), ("fine_tuned", "DSI fine-tuned"))
        ], ignore_index=True)
    if baseline_table is not None:
        base = pd.read_csv(baseline_table)
        keep = (base["n"] == n) & (base["ids"] == scheme) & (base["seed"] == seed) & (base["size"] == size) \
            & (base["source"] == source)
        if not keep.any():
            raise ValueError(f"{baseline_table} has no row for {source} {size} px, N={n}, {scheme} IDs, seed {seed}; "
                             "run `make dsi` first, or pass train_scratch=True (--scratch)")
        label = "scratch (make dsi)" if train_scratch else "scratch"
        tables.append(base[keep].drop(columns=[c for c in ("paper",) if c in base.columns]).assign(init=label))
        if baseline_histories is not None and Path(baseline_histories).is_file() and not train_scratch:
            bh = pd.read_csv(baseline_histories)
            bh = bh[(bh["n"] == n) & (bh["ids"] == scheme) & (bh["seed"] == seed)]
            histories.append(bh.assign(init="scratch"))
    results = attach_paper(pd.concat(tables, ignore_index=True))
    history_frame = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    out = {"results": results, "probes": probes, "ssl_history": ssl_frame, "histories": history_frame,
           "paired": paired, "id_facts": id_facts}
    out["markdown"] = _pretrain_markdown(out, source, size, n, scheme, seed, encoder_config, ssl_config, len(images),
                                         ssl_seconds, index_config, retrieval_config, max_pairs_per_query)
    if out_dir is not None:
        _write_pretrain_report(out, Path(out_dir), source, size)
    return out


def _ssl_semantic_ids(db: Any, ssl_encoder: ViTEncoder, random_encoder: ViTEncoder, seed: int,
                      params: dict) -> tuple[Any, pd.DataFrame]:
    """Semantic IDs from the SSL encoder's embeddings of the indexed images, and facts beside those of a random encoder."""
    from .semantic_ids import assign_ids, sibling_agreement

    index_images = db.split("index")[0]
    rows, assignments = [], {}
    for name, tag, encoder in (("random init", "random-encoder", random_encoder), ("SSL pretrained", "ssl", ssl_encoder)):
        embeddings = _embed(encoder, index_images).double().numpy()
        assignments[tag] = assign_ids(db, "semantic", embeddings=embeddings, embedding_name=tag, seed=seed, **params)
        agreement, chance = sibling_agreement(assignments[tag].codec, db.index_labels)
        rows.append({"embeddings": name, **assignments[tag].summary(), "sibling_agreement": agreement,
                     "sibling_chance": chance})
    return assignments["ssl"], pd.DataFrame(rows)


def paired_comparison(
    model_a: Any, model_b: Any, codec: Any, db: Any, *, k: int = 100, n_resamples: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per-query differences ``a - b`` of two DSI models on the same queries, with paired bootstrap intervals.

    IA@1 over the indexed images; AP@10 and P@10 over the test queries, from the same top-``k``
    beam search as the evaluation. A paired interval is much narrower than the two separate
    intervals when both models find the same queries easy or hard. Rows: ``metric``, ``a``,
    ``b``, ``diff``, ``ci_low``, ``ci_high``, ``n``.
    """
    from . import metrics
    from .decoding import beam_search

    index_images, _ = db.split("index")
    query_images, _ = db.split("test")
    relevant = metrics.label_relevance(db.relevance_labels("test"), db.relevance_labels("index"))
    per_model = []
    for model in (model_a, model_b):
        # the evaluation's search (evaluation.evaluate_dsi: top-5, so a beam of 5): with a beam of 1
        # the top-1 can differ, and the paired IA@1 would not match the table's
        _, own = beam_search(model, torch.from_numpy(index_images), codec, k=min(5, len(codec)))
        _, ranked = beam_search(model, torch.from_numpy(query_images), codec, k=min(k, len(codec)))
        hits = metrics.relevance_matrix(ranked.numpy(), relevant)
        per_model.append({
            "IA@1": metrics.indexing_accuracy_at_k(own.numpy(), np.arange(len(index_images)), 1),
            "mAP@10": metrics.average_precision_at_k(hits, relevant.sum(axis=1), 10),
            "P@10": metrics.precision_at_k(hits, 10),
        })
    rows = []
    for metric in ("IA@1", "mAP@10", "P@10"):
        a, b = per_model[0][metric], per_model[1][metric]
        diff = a - b
        low, high = metrics.bootstrap_ci(diff, n_resamples=n_resamples, seed=seed)
        rows.append({"metric": metric, "a": float(np.nanmean(a)), "b": float(np.nanmean(b)),
                     "diff": float(np.nanmean(diff)), "ci_low": low, "ci_high": high, "n": int(np.isfinite(diff).sum())})
    return pd.DataFrame(rows)


def comparison_frame(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, init): the compared metrics as 'value [low, high]', epochs and train time."""
    from .tables import format_interval

    rows = []
    keys = ["model", "init"] + (["ids"] if "ids" in results else [])
    for key, group in results.groupby(keys, sort=False):
        row = dict(zip(keys, key))
        for metric in COMPARED:
            hit = group[group["metric"] == metric]
            row[metric] = format_interval(*hit[["value", "ci_low", "ci_high"]].iloc[0]) if len(hit) else "–"
        row["epochs"] = int(group["epochs"].iloc[0]) if "epochs" in group else None
        row["train_s"] = round(float(group["train_s"].iloc[0]), 1) if "train_s" in group else None
        rows.append(row)
    return pd.DataFrame(rows).sort_values(keys, ascending=[False] + [True] * (len(keys) - 1), ignore_index=True)


def pretrain_figure(ssl_history: pd.DataFrame, histories: pd.DataFrame):
    """Left: the InfoNCE loss per pretraining epoch. Right: indexing IA@1 / accuracy per epoch, scratch vs SSL."""
    from matplotlib.ticker import MaxNLocator

    from .plots import _new_figure

    fig, axes = _new_figure(1, 2, (9.0, 3.3))
    left, right = axes[0]
    left.plot(ssl_history["epoch"], ssl_history["loss"], "o-", color="tab:purple")
    left.set_xlabel("pretraining epoch")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("InfoNCE loss")
    left.set_title("self-supervised pretraining")
    left.grid(alpha=0.3)
    if len(histories):
        indexing = histories[histories["phase"] == "indexing"]
        if "ids" not in indexing:
            indexing = indexing.assign(ids="")
        styles = {"scratch": ("--", "tab:blue"), "ssl": ("-", "tab:orange")}
        others = iter(["tab:green", "tab:red", "tab:purple", "tab:brown"])  # further ID schemes of one init
        runs = list(dict.fromkeys(zip(indexing["init"], indexing["ids"])))
        several_ids = len({ids for _, ids in runs}) > 1
        for init, ids in runs:
            style, color = styles.get(init, (":", "tab:gray"))
            if ids != runs[0][1]:
                style, color = "-.", next(others, "tab:gray")
            label = f"{init}" + (f", {ids} IDs" if several_ids else "")
            run = indexing[(indexing["init"] == init) & (indexing["ids"] == ids)]
            for split, fmt, what in (("train", style, "running, dropout"), ("train_eval", "o", "stop check, no dropout")):
                part = run[run["split"] == split]
                if len(part):
                    right.plot(part["epoch"], part["seq_acc"], fmt, ms=3, color=color, label=f"{label}: {what}")
    right.set_xlabel("indexing epoch")
    right.set_ylabel("sequence accuracy on the indexed images")
    right.set_ylim(-0.02, 1.02)
    right.set_title("indexing: from scratch vs from the SSL encoder")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _pretrain_markdown(out: dict, source: str, size: int, n: int, scheme: str, seed: int,
                       encoder_config: ViTConfig, ssl_config: SSLConfig, n_images: int, ssl_seconds: float,
                       index_config: Any, retrieval_config: Any, max_pairs: int | None) -> str:
    """The report of :func:`pretrain_study`: settings, DSI rows by initialisation, paired differences, probes."""
    comparison = comparison_frame(out["results"])
    probes = out["probes"][["encoder", "knn_acc", "linear_acc", "map@10", "chance"]].round(3)
    c, s = encoder_config, ssl_config
    markdown = "\n".join([
        f"# Encoder pretraining on {source} at {size} px (N = {n}, {scheme} IDs, seed {seed})",
        "",
        f"Encoder: ViT patch {c.patch_size}, width {c.dim}, {c.depth} blocks, {c.heads} heads, {c.pos_encoding} "
        f"positions (the DSI's). Pretraining: SimCLR-style InfoNCE (temperature {s.temperature}) on two views per "
        f"image (random resized crop down to {s.min_scale:g} of the area, flip, colour jitter {s.jitter:g} with "
        f"p {s.jitter_p:g}, grayscale with p {s.gray_p:g}), projection head {c.dim}-{s.proj_hidden}-{s.proj_dim}, "
        f"AdamW lr {s.lr:g} (warm-up {s.warmup_steps} steps, cosine decay), batch {s.batch_size}, {s.epochs} epochs "
        f"over {n_images} images that no database of the study uses ({ssl_seconds / 60:.1f} min). "
        f"DSI: indexing lr {index_config.lr:g}, warm-up {index_config.warmup_steps}, until IA@1 >= "
        f"{index_config.target_accuracy} (at most {index_config.epochs} epochs); fine-tuning {retrieval_config.epochs} "
        f"epochs" + (f", at most {max_pairs} pairs per query" if max_pairs else "") + ". Metrics over all test "
        "queries (IA: all indexed images), 95% bootstrap intervals in brackets.",
        "",
        comparison.to_markdown(index=False),
        *([] if out["paired"].empty else [
            "",
            "Paired differences, SSL init minus scratch, on the same indexed images / test queries "
            "(95% paired bootstrap intervals):",
            "",
            out["paired"][["model", "metric", "a", "b", "diff", "ci_low", "ci_high", "n"]]
            .rename(columns={"a": "ssl", "b": "scratch"}).round(3).to_markdown(index=False),
        ]),
        *([] if out["id_facts"].empty else [
            "",
            "Semantic IDs from the encoder's embeddings (hierarchical k-means over the mean-pooled embeddings of the "
            "indexed images; the `semantic` rows above are the DSI from the SSL encoder with the SSL ones). "
            "`sibling_agreement`: the share of pairs of images under the same parent prefix that share a class; "
            "`sibling_chance`: the same for random groups of those sizes.",
            "",
            out["id_facts"][["embeddings", "tag", "n_ids", "mean_length", "max_length", "sibling_agreement",
                             "sibling_chance"]].round(3).to_markdown(index=False),
        ]),
        "",
        "Probes of the mean-pooled encoder embeddings on the database (before any DSI training): "
        "kNN (k = 10) class accuracy of the test queries among the indexed images, a logistic-regression "
        "probe trained on the train queries and indexed images, and cosine retrieval mAP@10.",
        "",
        probes.to_markdown(index=False),
    ])
    return markdown


def _write_pretrain_report(out: dict, out_dir: Path, source: str, size: int) -> None:
    from .plots import save_figure
    from .tables import write_csv, write_table

    stem = f"{source}_{size}px"
    write_table(out["results"], out_dir / f"pretrain_{stem}", markdown=out["markdown"])
    write_table(out["probes"], out_dir / f"probes_{stem}")
    if not out["paired"].empty:
        write_table(out["paired"], out_dir / f"paired_{stem}")
    if not out["id_facts"].empty:
        write_table(out["id_facts"], out_dir / f"ids_{stem}")
    write_csv(out["ssl_history"], out_dir / f"ssl_history_{stem}.csv")
    if len(out["histories"]):
        write_csv(out["histories"], out_dir / f"histories_{stem}.csv")
    save_figure(pretrain_figure(out["ssl_history"], out["histories"]), out_dir / f"pretrain_{stem}.png")
