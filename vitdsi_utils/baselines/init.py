"""Encoder initialisation: start a DSI's (or dense model's) ViT encoder from another checkpoint.

Sources (:data:`INIT_SOURCES`): a self-supervised encoder (:mod:`vitdsi_utils.baselines.ssl`), the dense
baseline's encoder (:mod:`vitdsi_utils.baselines.dense`), or torchvision ViT weights from a local file.

The encoder weights are the parameters whose names start with ``patch_embed.``, ``pos_embed``,
``peg.`` or ``encoder.`` (:data:`~vitdsi_utils.baselines.ssl.ENCODER_PREFIXES`): the same keys in
every :class:`~vitdsi_utils.model.vit.ViTEncoder` subclass, so any of them can initialise any other.
The architecture fields of the configs (:data:`~vitdsi_utils.baselines.ssl.ARCHITECTURE_FIELDS`)
must agree; dropout need not. torchvision's ``VisionTransformer`` names are mapped onto ours.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitdsi_utils.baselines.dense import DenseConfig, read_dense_checkpoint
from vitdsi_utils.baselines.ssl import (
    ARCHITECTURE_FIELDS,
    ENCODER_PREFIXES,
    encoder_state_dict,
    read_ssl_checkpoint,
)
from vitdsi_utils.model.vit import DSIConfig, ViTConfig, ViTEncoder
from vitdsi_utils.training.checkpoint import load_checkpoint

#: Where an encoder can start from: a self-supervised, dense or DSI checkpoint, or torchvision ViT weights.
INIT_SOURCES = ("ssl", "dense", "dsi", "torchvision")


# ------------------------------------------------------------------------------------------
# torchvision's VisionTransformer -> our encoder
# ------------------------------------------------------------------------------------------
def _torch_load(path: str | os.PathLike, what: str, hint: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that say what the file should have been."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {hint}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickles with code, truncated files, foreign formats raise several types
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise ValueError(
            f"{path} is not {what} that loads safely ({type(error).__name__}: {reason}); {hint}"
        ) from error


_TV_REQUIRED = (
    "conv_proj.weight",
    "conv_proj.bias",
    "class_token",
    "encoder.pos_embedding",
    "encoder.ln.weight",
    "encoder.ln.bias",
)


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


def resolve_torchvision_file(path: str | os.PathLike) -> Path:
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
    file = resolve_torchvision_file(path)
    hint = (
        "save the weights as a state dict: torch.save(vit.state_dict(), path) with vit a "
        "torchvision.models.VisionTransformer (e.g. torchvision.models.vit_b_16(weights=...))"
    )
    state = _torch_load(file, "a torchvision state dict", hint)
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "conv_proj.weight" in state["model"]:
        state = state["model"]  # a training checkpoint that wraps the state dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} is not a state dict (a dict of tensors); {hint}")
    missing = [k for k in _TV_REQUIRED if k not in state]
    if missing:
        raise ValueError(
            f"{file} is not a torchvision VisionTransformer state dict: it lacks {missing} "
            f"(it has e.g. {sorted(state)[:5]}); {hint}"
        )
    if any(k.startswith("conv_proj.") and k not in ("conv_proj.weight", "conv_proj.bias") for k in state):
        raise ValueError(
            f"{file} holds a ViT with a convolutional stem (conv_proj is a stack of layers); only the "
            "plain patch projection maps onto this encoder"
        )
    return state


def _torchvision_depth(state: dict[str, torch.Tensor]) -> int:
    prefix = "encoder.layers.encoder_layer_"
    return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})


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
    mlp = (
        state["encoder.layers.encoder_layer_0.mlp.0.weight"]
        if "encoder.layers.encoder_layer_0.mlp.0.weight" in state
        else state.get("encoder.layers.encoder_layer_0.mlp.linear_1.weight")
    )
    return {
        "image_size": grid * patch if grid * grid == n_pos else None,
        "patch_size": int(patch),
        "channels": int(channels),
        "dim": int(dim),
        "mlp_dim": int(mlp.shape[0]) if mlp is not None else None,
        "depth": _torchvision_depth(state),
        "heads": max(1, int(dim) // 64),
        "pos_encoding": "learned",
        "norm_eps": TORCHVISION_NORM_EPS,
    }


def torchvision_to_encoder(
    state: dict[str, torch.Tensor], config: ViTConfig
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
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
    checks = [
        ("patch_size", "patch size (conv_proj kernel)"),
        ("dim", "width (hidden_dim)"),
        ("channels", "input channels"),
        ("depth", "blocks (num_layers)"),
        ("mlp_dim", "MLP width (mlp_dim)"),
    ]
    for name, what in checks:
        if getattr(config, name) != found[name]:
            problems.append(f"{name}={getattr(config, name)} but the weights have {what} {found[name]}")
    n_pos = state["encoder.pos_embedding"].shape[1] - 1
    if n_pos != config.num_patches:
        size = f"{found['image_size']} px" if found["image_size"] else f"{n_pos} patch positions"
        problems.append(
            f"image_size={config.image_size} gives {config.num_patches} patches, but the positional "
            f"table was trained for {size} ({n_pos} patches); resize the images to that size"
        )
    if config.pos_encoding != "learned":
        problems.append(
            f"pos_encoding={config.pos_encoding!r} but torchvision's positions are a learned table; "
            "use pos_encoding='learned'"
        )
    if config.norm_eps != TORCHVISION_NORM_EPS:
        problems.append(
            f"norm_eps={config.norm_eps:g} but torchvision's LayerNorms use eps "
            f"{TORCHVISION_NORM_EPS:g}; use norm_eps={TORCHVISION_NORM_EPS:g}"
        )
    if config.dim % config.heads:
        problems.append(f"heads={config.heads} does not divide dim {config.dim}")
    if problems:
        wanted = {k: v for k, v in found.items() if v is not None}
        raise ValueError(
            "the torchvision ViT weights do not fit this encoder: "
            + "; ".join(problems)
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
            rest = key[len(source) :]
            for tv_name, ours in _TV_BLOCK.items():
                if rest == tv_name or rest.startswith(tv_name + "."):
                    out[f"encoder.layers.{i}.{ours}{rest[len(tv_name) :]}"] = value
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


def _source_encoder(
    source: str, path: str | os.PathLike, target: ViTConfig
) -> tuple[dict, ViTConfig | None, torch.Tensor | None, str, dict]:
    """(encoder state, its config (None: already checked), class token, file, details) of one source."""
    if source == "ssl":
        state = read_ssl_checkpoint(path)
        return state["encoder"], ViTConfig.from_dict(state["config"]), None, str(path), {"epochs": state["epoch"]}
    if source == "dense":
        state = read_dense_checkpoint(path)
        model = state["model"]
        return (
            {k: v for k, v in model.items() if k.startswith(ENCODER_PREFIXES)},
            DenseConfig.from_dict(state["config"]),
            model.get("cls_token"),
            str(path),
            {"epochs": state["epoch"]},
        )
    if source == "dsi":
        state = load_checkpoint(path)
        return (
            {k: v for k, v in state["model"].items() if k.startswith(ENCODER_PREFIXES)},
            DSIConfig.from_dict(state["config"]),
            None,
            str(path),
            {"epochs": state["epoch"]},
        )
    if source == "torchvision":
        file = resolve_torchvision_file(path)
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
        problems = [
            f"{name}: {getattr(config, name)!r} in {path}, {getattr(model.config, name)!r} in the model"
            for name in ARCHITECTURE_FIELDS
            if getattr(config, name) != getattr(model.config, name)
        ]
        if problems:
            raise ValueError(
                f"the {source} encoder in {path} does not fit this model: "
                + "; ".join(problems)
                + ". Build the model with the encoder's settings (or pretrain one for these)"
            )
    wanted = encoder_state_dict(model)
    missing = sorted(set(wanted) - set(weights))
    extra = sorted(set(weights) - set(wanted))
    if missing or extra:
        raise ValueError(
            f"the {source} weights in {path} do not match the encoder's parameters "
            f"(missing {missing[:5]}, unexpected {extra[:5]}); the file is damaged or of another model"
        )
    model.load_encoder(weights)  # checks the shapes too
    with torch.no_grad():
        copied_cls = False
        own = getattr(model, "cls_token", None)
        if cls is not None and isinstance(own, torch.Tensor) and own.shape == cls.shape:
            own.copy_(cls.to(own.dtype))
            copied_cls = True
    return EncoderInit(source, str(file), sorted(weights), cls, copied_cls, details)
