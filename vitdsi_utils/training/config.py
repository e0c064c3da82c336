"""Training settings as plain dataclasses, the device, and the seeds."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from typing import Any, TypeVar

import numpy as np
import torch

_C = TypeVar("_C", bound="PlainConfig")


STOP_METRICS = ("ia", "eval", "train")


#: Integer fields of TrainConfig and their smallest allowed value.
_TRAIN_INTS = {"batch_size": 1, "epochs": 0, "seed": 0, "warmup_steps": 0, "eval_every": 1, "eval_batch_size": 1,
               "checkpoint_every": 1, "stop_beam": 1, "stop_check_every": 0}


_TRAIN_FLOATS = ("lr", "target_accuracy", "weight_decay", "label_smoothing", "grad_clip", "stop_check_from")


class PlainConfig:
    """``to_dict`` / ``from_dict`` of the training configs (dataclasses of plain values).

    ``from_dict`` ignores keys it does not know, so a checkpoint written by a version with more
    settings still loads; a missing key takes its default.
    """

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[_C], values: dict[str, Any]) -> _C:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class TrainConfig(PlainConfig):
    """Optimisation settings of :func:`fit` (plain values, stored in checkpoints)."""

    lr: float = 5e-4  # Adam learning rate (after warm-up)
    batch_size: int = 32  # examples per optimiser step
    epochs: int = 200  # at most this many epochs per phase
    target_accuracy: float = 0.98  # stop once the stop_on task's accuracy (see stop_metric) reaches this
    # How that accuracy is read, after the epoch's last step:
    # "ia": IA@1 of beam search (beam ``stop_beam``) over the stop task's images, each of which must
    #       return its own ID first: what the evaluation measures (tasks with one example per image,
    #       as indexing; else "eval");
    #       it runs only on epochs where the cheaper "eval" check already passes;
    # "eval": teacher-forced sequence accuracy in eval mode (no dropout), i.e. greedy decoding;
    # "train": the running accuracy during the epoch, with dropout (cheapest; lags the model).
    stop_metric: str = "ia"
    # beam width of the "ia" check: the evaluation's top-100 beam (a wider beam can find a wrong ID
    # that outscores the right one, so a narrower check would promise more than the evaluation finds)
    stop_beam: int = 100
    stop_check_from: float = 0.8  # "ia"/"eval": check only on epochs whose running accuracy reaches this x target
    # "ia"/"eval": also check every this many epochs, whatever the running accuracy (0: never). Dropout
    # can hold the running accuracy far below the model's: at N = 13,394 with 5-digit IDs it read 0.64
    # while IA@1 was 0.99, so the gate above never opened
    stop_check_every: int = 0
    weight_decay: float = 0.0  # > 0 switches Adam to AdamW (decoupled decay)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    seed: int = 0  # seeds the epoch permutations and torch's RNG (dropout) of a fresh run
    device: str = "auto"  # "auto" (cuda if available, else cpu), or any torch device string
    amp: bool = True  # bf16 autocast; only on CUDA (CPU stays float32)
    compile: bool = False  # torch.compile the model; only on CUDA
    progress: bool = True  # tqdm bar over epochs with loss/accuracy
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    warmup_steps: int = 0  # linear learning-rate warm-up over this many steps
    eval_every: int = 1  # validate every n epochs (and after the last)
    eval_batch_size: int = 256  # examples per validation pass
    checkpoint_every: int = 1  # with a checkpoint path: save every n epochs (and after the last)

    def __post_init__(self) -> None:
        for name, low in _TRAIN_INTS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r} ({type(value).__name__})")
            setattr(self, name, int(value))
        for name in _TRAIN_FLOATS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
                hint = ""
                if isinstance(value, str):
                    # YAML 1.1 (PyYAML) reads 1e-3 as text; it needs a dot in the mantissa
                    hint = "; in a YAML profile write numbers like 1e-3 as 1.0e-3 or 0.001"
                raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__}){hint}")
            setattr(self, name, float(value))
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.stop_metric not in STOP_METRICS:
            raise ValueError(f"stop_metric must be one of {STOP_METRICS}, got {self.stop_metric!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay} and {self.grad_clip}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda if available else cpu; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) random generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
