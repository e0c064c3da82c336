"""The checkpoint format of every trained model: weights, optimiser, settings, history and RNG state in one file.

One format for all three kinds of model (:data:`KINDS`): the DSI (``"dsi"``, which adds its IDs'
codec), the dense retrieval encoder (``"dense-encoder"``) and the self-supervised encoder
(``"ssl-encoder"``, which adds the encoder's weights alone and its projection head's sizes).
Checkpoints hold tensors and plain data only and are read with ``weights_only=True``; a file of
another kind is refused with both kinds named, and a DSI checkpoint written for other settings
with every difference named (:func:`checkpoint_mismatches`). Files of the first format (1),
which had no ``kind`` field, are read as well.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitdsi_utils import distributed
from vitdsi_utils.atomic import atomic_path
from vitdsi_utils.ids.codec import IDCodec
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.training.config import TrainConfig
from vitdsi_utils.training.history import History

CHECKPOINT_FORMAT = 2
#: The kinds of checkpoint, and how messages name them.
KINDS = {
    "dsi": "a DSI checkpoint",
    "dense-encoder": "a dense-encoder checkpoint",
    "ssl-encoder": "a self-supervised encoder checkpoint",
}
#: Entries every checkpoint holds, whatever its kind; a kind adds its own (:data:`KIND_ENTRIES`).
CHECKPOINT_KEYS = ("format", "kind", "model", "optimizer", "config", "train_config", "epoch", "history", "rng", "extra")
KIND_ENTRIES = {"dsi": ("codec",), "dense-encoder": (), "ssl-encoder": ("encoder", "head")}


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------
def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    """The random streams a resumed run continues: torch's CPU stream, every CUDA device's (none without
    CUDA) and the run's own ``generator`` (epoch order, augmentation draws).

    Under a process group the CUDA states are left out: reading them would touch (and create a
    context on) every GPU from every process, and a data-parallel run reseeds torch's RNG every
    epoch anyway (:func:`vitdsi_utils.distributed.epoch_seed`).
    """
    cuda = torch.cuda.is_available() and not distributed.active()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else [],
        "generator": generator.get_state() if generator is not None else None,
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    """Put back the streams of :func:`rng_state`. The CUDA states only in one process and where there are
    as many CUDA devices as when they were saved; elsewhere (another machine, the CPU, a process group)
    they are left out, and the run continues with the CPU and generator streams."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = torch.cuda.is_available() and not distributed.active()
    if state.get("cuda") and cuda and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"].cpu())


def restore_training(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    history: list,
    generator: torch.Generator | None,
) -> None:
    """Put a run back where checkpoint ``state`` left it: weights, optimiser, history rows and RNG streams.

    Shared by every resumable training loop (DSI, dense encoder, self-supervised encoder); each
    reads its own epoch and step counters from ``state``. A checkpoint saved without an
    optimiser leaves ``optimizer`` as it is.
    """
    model.load_state_dict(state["model"])
    if state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    history[:] = state["history"]
    set_rng_state(state["rng"], generator)


def _plain(value: Any, where: str) -> Any:
    """``value`` with NumPy scalars as Python numbers and paths as text; TypeError for anything else but plain data.

    A checkpoint is read with ``weights_only=True``, which refuses every object that is not a
    tensor or plain data, so an odd value must fail when the checkpoint is written, not hours
    later when it is read.
    """
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"checkpoint entry {where} is a {type(value).__name__}; checkpoints hold only tensors and plain data "
        "(numbers, text, lists, dicts) so that loading one never runs code: convert it first"
    )


def write_checkpoint(
    path: str | os.PathLike,
    kind: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: dict[str, Any],
    train_config: dict[str, Any] | None,
    epoch: int,
    history: Sequence[dict] | None,
    rng: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    **entries: Any,
) -> Path:
    """Write a checkpoint of ``kind`` atomically; ``entries`` are the kind's own (:data:`KIND_ENTRIES`).

    Everything is plain data or tensors, so :func:`read_checkpoint` can use ``weights_only=True``;
    anything else raises TypeError here, when it is written, not when it is read. Under a process
    group every process calls it and rank 0 alone writes; the others wait until the file is there
    (:func:`vitdsi_utils.distributed.on_main`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; choose one of {list(KINDS)}")
    if sorted(entries) != sorted(KIND_ENTRIES[kind]):
        raise ValueError(f"a {kind} checkpoint holds the entries {list(KIND_ENTRIES[kind])}, got {sorted(entries)}")
    state = {
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "config": _plain(dict(config), "config"),
        "train_config": _plain(dict(train_config), "train_config") if train_config is not None else None,
        "epoch": int(epoch),
        "history": _plain([dict(r) for r in history], "history") if history is not None else [],
        "rng": rng,
        "extra": _plain(dict(extra or {}), "extra"),
        **{key: _plain(value, key) for key, value in entries.items()},
    }
    distributed.on_main(_save_atomically, state, path)
    return Path(path)


def _save_atomically(state: dict[str, Any], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def save_checkpoint(
    path: str | os.PathLike,
    model: DSIModel,
    optimizer: torch.optim.Optimizer | None,
    config: DSIConfig,
    train_config: TrainConfig | dict | None,
    epoch: int,
    history: Sequence[dict] | None,
    codec: IDCodec,
    *,
    generator: torch.Generator | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a DSI checkpoint: model, optimiser, configs, the codec's codes, history and RNG states."""
    if isinstance(train_config, TrainConfig):
        train_config = train_config.to_dict()
    return write_checkpoint(
        path,
        "dsi",
        model=model,
        optimizer=optimizer,
        config=config.to_dict(),
        train_config=train_config,
        epoch=epoch,
        history=history,
        rng=rng_state(generator),
        extra=extra,
        codec={"codes": [[int(t) for t in c] for c in codec.codes], "base": int(codec.base)},
    )


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, refused as unsafe, or written for another run."""


def read_checkpoint(
    path: str | os.PathLike, kind: str | None = None, map_location: str | torch.device = "cpu", *, hint: str = ""
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`write_checkpoint`, of ``kind`` when given.

    The file is read with ``weights_only=True``: only tensors and plain data (dicts, lists,
    numbers, strings) are accepted, so nothing in it can run code. A file holding any other
    object is refused with :class:`CheckpointError`, as is a damaged or foreign file and one of
    another kind. ``hint`` ends the message of a missing file (how to make one).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: the file does not exist" + (f"; {hint}" if hint else ""))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        with path.open("rb") as file:
            pickled = file.read(2) in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
        if "weights only" in str(error).lower() and pickled:  # a zip or pickle holding objects, not mere garbage
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects other than tensors and plain data, and "
                "unpickling them could run arbitrary code. vitdsi checkpoints never hold such objects; if you "
                "did not write this file yourself, delete it (and train again)"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({error}); delete it and train again") from error
    except Exception as error:  # torch reports a damaged file as EOFError, RuntimeError, KeyError, ...
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(error).__name__}: {reason}); it is damaged or was not "
            "written by vitdsi. Delete it and train again"
        ) from error
    state = _upgrade(state)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path}: unknown checkpoint format {found!r} (this version reads formats 1 and {CHECKPOINT_FORMAT}); "
            "delete it and train again"
        )
    if kind is not None and state.get("kind") != kind:
        found = KINDS.get(state.get("kind"), f"a checkpoint of unknown kind {state.get('kind')!r}")
        raise CheckpointError(f"{path} is {found}, not {KINDS[kind]}" + (f"; {hint}" if hint else ""))
    missing = [key for key in (*CHECKPOINT_KEYS, *KIND_ENTRIES.get(state.get("kind"), ())) if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the checkpoint entries {missing}; delete it and train again")
    return state


def _upgrade(state: Any) -> Any:
    """A checkpoint of format 1 in format 2: the kind it did not record (DSI files had none), one settings key."""
    if not isinstance(state, dict) or state.get("format") != 1:
        return state
    state = {**state, "format": CHECKPOINT_FORMAT}
    state.setdefault("kind", "dsi")
    if state["kind"] == "ssl-encoder" and "ssl_config" in state:
        state["train_config"] = state.pop("ssl_config")
    return state


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a DSI checkpoint (:func:`read_checkpoint` of kind ``"dsi"``)."""
    return read_checkpoint(path, "dsi", map_location)


def checkpoint_mismatches(
    state: dict[str, Any],
    *,
    config: DSIConfig | dict[str, Any] | None = None,
    codec: IDCodec | None = None,
    data: dict[str, Any] | None = None,
) -> list[str]:
    """What differs between a loaded checkpoint and the run that wants it, one line per field.

    ``config``: the model configuration the run asks for (a :class:`DSIConfig`, or a dict of
    the fields to check). ``codec``: the IDs the run uses. ``data``: facts about the database
    (e.g. :meth:`Database.fingerprint <vitdsi_utils.data.database.Database.fingerprint>`); a key the
    checkpoint does not record (older checkpoints) is not checked.
    """
    problems = []
    if config is not None:
        wanted = config.to_dict() if isinstance(config, DSIConfig) else dict(config)
        defaults = DSIConfig().to_dict()
        saved = {**defaults, **state["config"]}  # a field added after the checkpoint was written has its default
        for key, value in wanted.items():
            if saved.get(key) != value:
                problems.append(f"model {key}: saved {saved.get(key)!r}, requested {value!r}")
    if codec is not None:
        saved_codes = [tuple(c) for c in state["codec"]["codes"]]
        saved_base = state["codec"]["base"]
        if saved_base != codec.base:
            problems.append(f"ID base: saved {saved_base}, requested {codec.base}")
        if len(saved_codes) != len(codec.codes):
            problems.append(f"IDs: saved {len(saved_codes)} IDs, requested {len(codec.codes)}")
        elif saved_codes != codec.codes:
            row = next(r for r, (a, b) in enumerate(zip(saved_codes, codec.codes)) if a != b)
            problems.append(f"IDs: row {row} has ID {saved_codes[row]} saved, {codec.codes[row]} requested")
    if data is not None:
        saved_data = state["extra"].get("data") or {}
        for key, value in data.items():
            if key in saved_data and saved_data[key] != value:
                problems.append(f"data {key}: saved {saved_data[key]!r}, requested {value!r}")
    return problems


def check_checkpoint(
    state: dict[str, Any],
    path: str | os.PathLike,
    *,
    config: DSIConfig | dict[str, Any] | None = None,
    codec: IDCodec | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Raise :class:`CheckpointError` naming every mismatch found by :func:`checkpoint_mismatches`."""
    problems = checkpoint_mismatches(state, config=config, codec=codec, data=data)
    if problems:
        raise CheckpointError(
            f"{path} was written for another database or model: "
            + "; ".join(problems)
            + ". Delete it (or use another run folder) to train for these settings, or request the saved ones"
        )


def load_model(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    expect_config: DSIConfig | dict[str, Any] | None = None,
    expect_codec: IDCodec | None = None,
    expect_data: dict[str, Any] | None = None,
) -> tuple[DSIModel, IDCodec, dict]:
    """(model in eval mode, codec, meta: every other checkpoint entry but weights, optimiser and RNG).

    With ``expect_*`` the checkpoint must match that model configuration, those IDs and that
    database (see :func:`checkpoint_mismatches`), or :class:`CheckpointError` names the difference.
    """
    state = load_checkpoint(path, map_location)
    check_checkpoint(state, path, config=expect_config, codec=expect_codec, data=expect_data)
    model = DSIModel(DSIConfig.from_dict(state["config"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: the weights do not fit the model configuration stored beside them ({str(error)[:200]}); "
            "the file is damaged: delete it and train again"
        ) from error
    model.to(map_location).eval()
    codec = IDCodec([tuple(c) for c in state["codec"]["codes"]], base=state["codec"]["base"])
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "rng")}
    meta["history"] = History(meta["history"])
    return model, codec, meta
