"""The DSI model: a ViT encoder reads an image, a Transformer decoder writes a database ID.

The encoder is a plain ViT without a class token (patch embedding, positional encoding,
pre-norm Transformer blocks, final LayerNorm). The decoder is a pre-norm Transformer
decoder over the ID tokens of an :class:`~vitdsi_utils.ids.codec.IDCodec`; it cross-attends to
every encoder token. Both stacks are ``torch.nn`` Transformer layers, which dispatch to
fused scaled-dot-product attention on GPU.

The encoder lives in :class:`ViTEncoder` (settings in :class:`ViTConfig`), which
:class:`DSIModel` extends with the decoder; the dense retrieval baseline
(:mod:`vitdsi_utils.baselines.dense`) extends the same class, so both models share one encoder
implementation and the DSI checkpoint keys stay as they were.

Input format (one, on purpose): images are ``uint8`` tensors ``(B, H, W, 3)``, exactly as the
dataset is stored on the device. :meth:`DSIModel.encode` converts them to float, scales to
[0, 1] and normalises with fixed ImageNet channel statistics held as buffers, so callers
never normalise (and can never normalise twice).
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from typing import Any, TypeVar

import torch
import torch.nn as nn

from vitdsi_utils.ids.codec import IDCodec
from vitdsi_utils.model.kv_cache import IncrementalDecoder

POS_ENCODINGS = ("sinusoidal", "learned", "conditional")


# ImageNet statistics: the conventional choice for natural images, fixed so checkpoints
# never depend on the data they were trained on
IMAGE_MEAN = (0.485, 0.456, 0.406)


IMAGE_STD = (0.229, 0.224, 0.225)


_Config = TypeVar("_Config", bound="ViTConfig")


#: Fewer patch tokens per side than this draw a warning (once per image and patch size and process):
#: a 2 x 2 or 3 x 3 grid leaves the encoder a handful of coarse patches to attend over.
MIN_GRID = 4


_WARNED_GRIDS: set[tuple[int, int]] = set()


def _warn_few_tokens(image_size: int, patch_size: int) -> None:
    """Warn once per (image size, patch size) when the patch grid is smaller than MIN_GRID x MIN_GRID."""
    grid = image_size // patch_size
    if grid >= MIN_GRID or (image_size, patch_size) in _WARNED_GRIDS:
        return
    _WARNED_GRIDS.add((image_size, patch_size))
    finer = [p for p in range(patch_size - 1, 0, -1) if image_size % p == 0 and image_size // p >= MIN_GRID]
    advice = (
        f"patch_size {finer[0]} gives {image_size // finer[0]} x {image_size // finer[0]} tokens at this size"
        if finer
        else "use larger images"
    )
    warnings.warn(
        f"patch_size {patch_size} at {image_size} px leaves {grid} x {grid} = {grid * grid} token(s) per image: "
        f"the encoder sees each image as {grid * grid} coarse patch(es) and its attention has little to work with; "
        f"{advice} (PATCH_SIZE in a study profile, model.patch_size in a recipe)",
        UserWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning of this module at the code that built the config."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename in (
        __file__,
        "<string>",
    ):  # "<string>": dataclass __init__
        frame, level = frame.f_back, level + 1
    return level - 1


@dataclass
class ViTConfig:
    """Hyper-parameters of a :class:`ViTEncoder` (plain values, so they round-trip through JSON)."""

    image_size: int = 160  # side of the square input images, px
    patch_size: int = 16  # side of a square patch; must divide image_size
    channels: int = 3  # RGB
    dim: int = 128  # token width (of the encoder, and of the DSI decoder)
    mlp_dim: int = 256  # hidden width of each block's feed-forward layer
    depth: int = 6  # encoder blocks (the DSI decoder has as many)
    heads: int = 4  # attention heads; must divide dim
    dropout: float = 0.1  # in attention, feed-forward and after the embeddings
    pos_encoding: str = "sinusoidal"  # "sinusoidal" (fixed 1-D table) | "learned" | "conditional" (PEG)
    norm_eps: float = 1e-5  # epsilon of every LayerNorm (torch's default; torchvision's ViTs use 1e-6)

    #: integer fields that must be >= 1 (subclasses extend the tuple)
    _POSITIVE = ("image_size", "patch_size", "channels", "dim", "mlp_dim", "depth", "heads")

    def __post_init__(self) -> None:
        for name in self._POSITIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
            setattr(self, name, int(value))  # numpy integers become plain ints (JSON- and checkpoint-safe)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, Real):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, Real) or not 0 < self.norm_eps < 1:
            raise ValueError(f"norm_eps must be a small positive number (e.g. 1e-5), got {self.norm_eps!r}")
        self.norm_eps = float(self.norm_eps)
        if self.patch_size > self.image_size:
            raise ValueError(
                f"patch_size {self.patch_size} is larger than image_size {self.image_size}: an image must hold "
                f"at least one patch; use patch_size <= {self.image_size} (one that divides it) or larger images"
            )
        if self.image_size % self.patch_size:
            patches = [p for p in range(1, self.image_size + 1) if self.image_size % p == 0]
            lower = self.image_size - self.image_size % self.patch_size
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}: "
                f"patch sizes that work for {self.image_size} px are {patches}; image sizes that work "
                f"for {self.patch_size} px patches are multiples of {self.patch_size} "
                f"(e.g. {lower or self.patch_size} or {lower + self.patch_size})"
            )
        if self.dim % self.heads:
            heads = [h for h in range(1, self.dim + 1) if self.dim % h == 0]
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}; head counts that work: {heads}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"unknown pos_encoding {self.pos_encoding!r}; choose one of {POS_ENCODINGS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        _warn_few_tokens(self.image_size, self.patch_size)

    @property
    def grid(self) -> int:
        """Patches along one side of the image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def to_dict(self) -> dict[str, Any]:
        """Plain-value dict (JSON- and ``weights_only``-safe)."""
        return asdict(self)

    @classmethod
    def from_dict(cls: type[_Config], values: dict[str, Any]) -> _Config:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they are usually typos)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**values)


@dataclass
class DSIConfig(ViTConfig):
    """Hyper-parameters of :class:`DSIModel`: the encoder's (:class:`ViTConfig`) plus the ID vocabulary."""

    vocab_size: int = 13  # ID tokens incl. BOS/EOS/PAD: codec.vocab_size (10 digits + 3)
    max_id_length: int = 4  # decoder positions: codec.max_length (content tokens + EOS)

    _POSITIVE = ViTConfig._POSITIVE + ("vocab_size", "max_id_length")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size must cover at least one content token and BOS/EOS/PAD, got {self.vocab_size}")

    @classmethod
    def from_codec(cls, codec: IDCodec, **overrides: Any) -> DSIConfig:
        """A config whose vocabulary and decoder length fit ``codec``; other fields from ``overrides``."""
        return cls(**{**overrides, "vocab_size": codec.vocab_size, "max_id_length": codec.max_length})


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Fixed sin/cos position table (length, dim) of "Attention is all you need"."""
    position = torch.arange(length, dtype=torch.float32)[:, None]  # (length, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (ceil(dim/2),)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


class PatchEmbedding(nn.Module):
    """Normalise uint8 images and cut them into patch tokens: (B, H, W, C) uint8 -> (B, P, D)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Conv2d(config.channels, config.dim, kernel_size=config.patch_size, stride=config.patch_size)
        mean = torch.tensor(IMAGE_MEAN if config.channels == 3 else [0.5] * config.channels)
        std = torch.tensor(IMAGE_STD if config.channels == 3 else [0.5] * config.channels)
        # (x / 255 - mean) / std folded into one multiply-add; constants, so not saved in checkpoints
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        # a permuted NHWC tensor is a channels_last NCHW view: no copy before the conv
        x = images.permute(0, 3, 1, 2).float() * self.scale + self.shift  # (B, C, H, W)
        x = self.proj(x)  # (B, D, grid, grid)
        return x.flatten(2).transpose(1, 2)  # (B, P, D)

    def _check(self, images: torch.Tensor) -> None:
        c = self.config
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"images must be a uint8 tensor (B, H, W, {c.channels}); got {got}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (c.image_size, c.image_size, c.channels):
            raise ValueError(
                f"images must have shape (B, {c.image_size}, {c.image_size}, {c.channels}) (channels last); "
                f"got {tuple(images.shape)}"
            )


class PositionEncodingGenerator(nn.Module):
    """Conditional position encoding (CPVT's PEG): x + depth-wise 3x3 conv over the patch grid."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, P, D = x.shape
        grid = x.transpose(1, 2).reshape(B, D, self.grid, self.grid)  # (B, D, g, g)
        return x + self.conv(grid).flatten(2).transpose(1, 2)  # (B, P, D)


def _block_kwargs(config: ViTConfig) -> dict[str, Any]:
    return dict(
        d_model=config.dim,
        nhead=config.heads,
        dim_feedforward=config.mlp_dim,
        dropout=config.dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
        layer_norm_eps=config.norm_eps,
    )


class ViTEncoder(nn.Module):
    """The ViT encoder: uint8 images (B, H, W, 3) -> tokens (B, P, D); see the module docstring.

    Subclasses add heads: :class:`DSIModel` a decoder of IDs, ``dense.DenseEncoder`` a pooled
    embedding. The attribute names below are the checkpoint keys of every subclass.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbedding(c)
        if c.pos_encoding == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches, c.dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        elif c.pos_encoding == "sinusoidal":
            self.register_buffer("pos_embed", sinusoidal_table(c.num_patches, c.dim)[None], persistent=False)
        else:
            self.pos_embed = None
        self.peg = PositionEncodingGenerator(c.dim, c.grid) if c.pos_encoding == "conditional" else None
        self.embed_dropout = nn.Dropout(c.dropout)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**_block_kwargs(c)),
            num_layers=c.depth,
            norm=nn.LayerNorm(c.dim, eps=c.norm_eps),
            enable_nested_tensor=False,  # no padding masks here; the nested path only warns with norm_first
        )

    def encode(self, images: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Encode uint8 images (B, H, W, 3) into tokens (B, P, D), or (B, T + P, D) with ``prefix``.

        ``prefix`` (1 or B, T, D) are extra tokens (e.g. a class token) put before the patch
        tokens after the positional encoding: they carry no position, attend and are attended
        to like the patches, and the conditional position generator skips them.
        """
        x = self.patch_embed(images)  # (B, P, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        n_prefix = 0
        if prefix is not None:
            n_prefix = prefix.shape[1]
            x = torch.cat([prefix.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (B, T + P, D)
        x = self.embed_dropout(x)
        for i, block in enumerate(self.encoder.layers):
            x = block(x)
            if i == 0 and self.peg is not None:
                # CPVT: the generator works best after the first block, once tokens carry local context
                x = self.peg(x) if n_prefix == 0 else torch.cat([x[:, :n_prefix], self.peg(x[:, n_prefix:])], dim=1)
        return self.encoder.norm(x)

    #: the encoder's own parameter and buffer names (their prefixes); subclasses add heads beside them
    ENCODER_KEYS = ("patch_embed.", "pos_embed", "peg.", "encoder.")

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights only (no decoder, class token or other head): what :meth:`load_encoder` copies."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.ENCODER_KEYS)}

    def load_encoder(self, other: ViTEncoder | dict[str, torch.Tensor]) -> None:
        """Copy the encoder weights of ``other`` (another :class:`ViTEncoder`, or its
        :meth:`encoder_state_dict`) into this model; the heads keep their weights.

        A DSI can so start from a trained dense encoder (``dense.DenseEncoder``) or a
        self-supervised one. The two encoders must have the same shape: a ValueError names every
        encoder field that differs (image size, patch size, width, depth, ...) and says what to do.
        """
        if isinstance(other, ViTEncoder):
            mine, theirs = self.config, other.config
            differ = [
                f"{name}: this model {getattr(mine, name)!r}, the source {getattr(theirs, name)!r}"
                for name in (f.name for f in fields(ViTConfig))
                if name != "dropout" and getattr(mine, name) != getattr(theirs, name)
            ]
            if differ:
                raise ValueError(
                    "the encoders differ in "
                    + "; ".join(differ)
                    + ". Build this model with the source's encoder settings, or train a source of this shape"
                )
            state = other.encoder_state_dict()
        else:
            state = {k: v for k, v in dict(other).items() if k.startswith(self.ENCODER_KEYS)}
        own = self.encoder_state_dict()
        missing = sorted(set(own) - set(state))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or wrong:
            raise ValueError(
                f"the source encoder does not fit this model: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                f"other shapes {wrong[:4]}{' ...' if len(wrong) > 4 else ''}; use a source trained with the same "
                "encoder settings (patch size, width, depth, heads, positional encoding, image size)"
            )
        with torch.no_grad():
            for key, value in self.state_dict().items():  # state_dict tensors share storage with the model
                if key in own:
                    value.copy_(state[key])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        """Trainable parameter count."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class DSIModel(ViTEncoder):
    """ViT encoder + autoregressive ID decoder; see the module docstring for the input format."""

    config: DSIConfig

    def __init__(self, config: DSIConfig):
        # the encoder's modules are created first, in the order they always were, so a seeded
        # initialisation gives the same weights as before the encoder became a base class
        super().__init__(config)
        c = config
        self.token_embed = nn.Embedding(c.vocab_size, c.dim)
        if c.pos_encoding == "learned":
            self.token_pos = nn.Parameter(torch.zeros(1, c.max_id_length, c.dim))
            nn.init.trunc_normal_(self.token_pos, std=0.02)
        else:
            self.register_buffer("token_pos", sinusoidal_table(c.max_id_length, c.dim)[None], persistent=False)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(**_block_kwargs(c)), num_layers=c.depth, norm=nn.LayerNorm(c.dim, eps=c.norm_eps)
        )
        mask = nn.Transformer.generate_square_subsequent_mask(c.max_id_length)  # 0 on/below diagonal, -inf above
        self.register_buffer("causal_mask", mask, persistent=False)
        self.head = nn.Linear(c.dim, c.vocab_size)

    # ---------------------------------------------------------------------------------
    def decode(self, memory: torch.Tensor, decoder_inputs: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, L, V) for every prefix of ``decoder_inputs`` (B, L), given memory (B, P, D)."""
        L = decoder_inputs.shape[1]
        if L > self.config.max_id_length:
            raise ValueError(f"decoder inputs have {L} positions; the model has {self.config.max_id_length}")
        x = self.token_embed(decoder_inputs) + self.token_pos[:, :L]  # (B, L, D)
        x = self.embed_dropout(x)
        # the causal mask lets one forward pass train every ID position at once (teacher forcing)
        x = self.decoder(x, memory, tgt_mask=self.causal_mask[:L, :L], tgt_is_causal=True)  # (B, L, D)
        return self.head(x)  # (B, L, V)

    def incremental_decoder(self, memory: torch.Tensor, max_width: int = 1) -> IncrementalDecoder:
        """A token-by-token decoder of up to ``max_width`` hypotheses per query over the encoder tokens
        ``memory`` (B, P, D); see :class:`IncrementalDecoder`."""
        return IncrementalDecoder(self, memory, max_width)

    def forward(self, images: torch.Tensor, decoder_inputs: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, L, V) for uint8 images (B, H, W, 3) and decoder inputs (B, L)."""
        return self.decode(self.encode(images), decoder_inputs)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (B, P, D), for dense retrieval and clustering (alias of :meth:`encode`)."""
        return self.encode(images)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """One global descriptor per image (B, D): the mean of the encoder tokens."""
        return self.encode(images).mean(dim=1)

    # ---------------------------------------------------------------------------------
    def check_codec(self, codec: IDCodec) -> None:
        """Raise ValueError unless the model's vocabulary and decoder length fit ``codec``."""
        c = self.config
        if c.vocab_size != codec.vocab_size:
            raise ValueError(f"model vocab_size {c.vocab_size} != codec.vocab_size {codec.vocab_size}")
        if c.max_id_length < codec.max_length:
            raise ValueError(f"model max_id_length {c.max_id_length} < codec.max_length {codec.max_length}")
