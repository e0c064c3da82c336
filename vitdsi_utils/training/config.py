"""Training settings as plain dataclasses, and the seeds.

:func:`resolve_device` is :func:`vitdsi_utils.devices.resolve_device`, importable from here as before.
"""

from __future__ import annotations

import math
import random
from dataclasses import MISSING, asdict, dataclass, fields
from numbers import Integral, Real
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from vitdsi_utils.devices import check_amp, check_compile
from vitdsi_utils.devices import resolve_device as resolve_device  # re-exported: its old home

_C = TypeVar("_C", bound="PlainConfig")


STOP_METRICS = ("ia", "eval", "train")


#: Integer fields of TrainConfig and their smallest allowed value (epochs: a phase trains at least one).
_TRAIN_INTS = {
    "batch_size": 1,
    "epochs": 1,
    "seed": 0,
    "warmup_steps": 0,
    "eval_every": 1,
    "eval_batch_size": 1,
    "checkpoint_every": 1,
    "stop_beam": 1,
    "stop_check_every": 0,
}


# ------------------------------------------------------------------------------------------
# Checks of numeric settings: one line that names the setting, its allowed range and the value
# ------------------------------------------------------------------------------------------
def _yaml_hint(value: Any) -> str:
    # YAML 1.1 (PyYAML) reads 1e-3 as text; it needs a dot in the mantissa
    return "; in a YAML profile write numbers like 1e-3 as 1.0e-3 or 0.001" if isinstance(value, str) else ""


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` as an int when it is an integer >= ``low``; else ValueError naming ``name`` (may be '')."""
    wrong_type = isinstance(value, bool) or not isinstance(value, Integral)
    if wrong_type or value < low:
        kind = f" ({type(value).__name__})" if wrong_type else ""
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}{kind}".lstrip())
    return int(value)


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float when it is a number in the range; else ValueError naming ``name`` and the range.

    ``low``/``high`` bound the range (None: unbounded), ``*_open`` excludes the bound itself.
    """
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__}){_yaml_hint(value)}".lstrip())
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        if low is not None and high is not None:
            where = f"lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            where = f"be {'>' if low_open else '>='} {low:g}"
        else:
            where = f"be {'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{name} must {where}, got {value:g}".lstrip())
    return value


class PlainConfig:
    """``to_dict`` / ``from_dict`` of the training configs (dataclasses of plain values), and their recipe.

    ``from_dict`` ignores keys it does not know, so a checkpoint written by a version with more
    settings still loads; a missing key takes its default.

    A config's *recipe* is every setting that shapes what training produces; the others,
    :attr:`RUNTIME_FIELDS`, only say how the run is executed (device, progress bar, how often to
    checkpoint or validate, batch size of evaluation passes). A trained artefact is reused, and
    a checkpoint resumed, only when its recipe matches the one asked for
    (:mod:`vitdsi_utils.training.reuse`); runtime fields never block that.
    """

    #: Fields that do not shape the trained artefact; each subclass names its own.
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[_C], values: dict[str, Any]) -> _C:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default value (fields without a default are left out)."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    @classmethod
    def recipe_of(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The recipe of saved settings ``values`` (a config's ``to_dict``, perhaps written by an older version).

        A field the dict lacks (added after it was written) takes its default; unknown keys are
        dropped. Nothing is validated, so settings a newer version refuses can still be compared.
        """
        known = [f.name for f in fields(cls)]
        merged = {**cls.defaults(), **{k: v for k, v in values.items() if k in known}}
        return {k: merged.get(k) for k in known if k not in cls.RUNTIME_FIELDS}

    def recipe(self) -> dict[str, Any]:
        """The settings that shape the trained artefact: every field but :attr:`RUNTIME_FIELDS`."""
        return type(self).recipe_of(self.to_dict())


#: Fields of TrainConfig's stop rule: they shape only a phase that stops at a target (indexing, consolidation).
STOP_RULE_FIELDS = ("target_accuracy", "stop_metric", "stop_beam", "stop_check_from", "stop_check_every")


@dataclass
class TrainConfig(PlainConfig):
    """Optimisation settings of :func:`fit` (plain values, stored in checkpoints)."""

    #: How a run is executed, not what it learns: a trained model is reused whatever these are.
    #: (amp and compile change the arithmetic's rounding only, as the device does.)
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"device", "amp", "compile", "progress", "eval_every", "eval_batch_size", "checkpoint_every"}
    )

    lr: float = 5e-4  # Adam learning rate (after warm-up)
    batch_size: int = 32  # examples per optimiser step
    epochs: int = 200  # at most this many epochs per phase
    # stop once the stop_on task's accuracy (see stop_metric) reaches this, a fraction in (0, 1];
    # None: no stop rule, every phase trains all its epochs
    target_accuracy: float | None = 0.98
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
    # bf16 autocast (vitdsi_utils.devices): true / "auto" on CUDA only (the CPU stays float32),
    # "bf16" on any device (the CPU too), false never
    amp: bool | str = True
    # torch.compile the model, on any device: false (eager), true (inductor) or a backend's name
    # (e.g. "aot_eager": traced but no generated kernels, compiles in seconds on a CPU)
    compile: bool | str = False
    progress: bool = True  # tqdm bar over epochs with loss/accuracy
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    warmup_steps: int = 0  # linear learning-rate warm-up over this many steps
    eval_every: int = 1  # validate every n epochs (and after the last)
    eval_batch_size: int = 256  # examples per validation pass
    checkpoint_every: int = 1  # with a checkpoint path: save every n epochs (and after the last)

    def __post_init__(self) -> None:
        for name, low in _TRAIN_INTS.items():
            setattr(self, name, check_int(name, getattr(self, name), low))
        self.lr = check_number("lr", self.lr, 0, low_open=True)
        if self.target_accuracy is not None:
            self.target_accuracy = check_number("target_accuracy", self.target_accuracy, 0, 1, low_open=True)
        # > 1 / target_accuracy: the running accuracy never opens the gate (only stop_check_every checks)
        self.stop_check_from = check_number("stop_check_from", self.stop_check_from, 0)
        self.weight_decay = check_number("weight_decay", self.weight_decay, 0)
        self.grad_clip = check_number("grad_clip", self.grad_clip, 0)
        self.label_smoothing = check_number("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        if self.stop_metric not in STOP_METRICS:
            raise ValueError(f"stop_metric must be one of {STOP_METRICS}, got {self.stop_metric!r}")
        self.amp = check_amp(self.amp)
        self.compile = check_compile(self.compile)

    @classmethod
    def recipe_of(cls, values: dict[str, Any], *, stop_rule: bool = True) -> dict[str, Any]:
        """The settings that shape a model trained with ``values``.

        Every field but :attr:`RUNTIME_FIELDS`, and of the stop rule (:data:`STOP_RULE_FIELDS`) only
        what the rule reads: nothing but ``target_accuracy`` in a phase without a stop rule
        (``stop_rule=False``: retrieval fine-tuning trains all its epochs) or without a target,
        ``stop_beam`` only for the "ia" metric, ``stop_check_*`` not for the "train" metric.
        """
        recipe = super().recipe_of(values)
        unused = set()
        if not stop_rule:
            unused = set(STOP_RULE_FIELDS)
        elif recipe["target_accuracy"] is None:
            unused = set(STOP_RULE_FIELDS) - {"target_accuracy"}
        else:
            if recipe["stop_metric"] != "ia":
                unused.add("stop_beam")
            if recipe["stop_metric"] == "train":
                unused |= {"stop_check_from", "stop_check_every"}
        return {k: v for k, v in recipe.items() if k not in unused}

    def recipe(self, *, stop_rule: bool = True) -> dict[str, Any]:
        return type(self).recipe_of(self.to_dict(), stop_rule=stop_rule)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) random generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
