"""Where and in what precision the models run: the device, bf16 autocast, torch.compile, fused Adam.

One place for the choices every entry point makes, so that training, evaluation and decoding
agree and each choice can be tested without a GPU:

* :func:`resolve_device`: ``"auto"`` (the default of every entry point) is CUDA when there is
  one, else the CPU.
* :func:`autocast` / :func:`amp_dtype`: the ``amp`` setting (:data:`AMP_MODES`). ``True`` or
  ``"auto"``: bf16 autocast on CUDA only, the CPU stays float32 (what ``amp=True`` always meant,
  so CPU results do not move); ``"bf16"``: bf16 autocast on any device, the CPU included;
  ``False``: float32 everywhere.
* :func:`compile_backend`: the ``compile`` setting. ``False``: eager; ``True``: torch's default
  backend (inductor); a text: that backend (e.g. ``"aot_eager"``, which traces without
  generating kernels and so compiles in seconds on a CPU).
* :func:`optimizer_kwargs`: fused Adam kernels on CUDA, the plain ones elsewhere.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

#: Values of an ``amp`` setting: True and "auto" (bf16 on CUDA only), "bf16" (bf16 anywhere), False (off).
AMP_MODES = (True, False, "auto", "bf16")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) -> ``cuda`` when torch sees a CUDA device, else ``cpu``; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_amp(amp: Any, name: str = "amp") -> bool | str:
    """``amp`` when it is one of :data:`AMP_MODES`; else ValueError naming ``name`` and the choices."""
    if isinstance(amp, bool) or amp in ("auto", "bf16"):
        return amp
    raise ValueError(
        f"{name} must be true or 'auto' (bf16 autocast on CUDA only), 'bf16' (on any device, the CPU too) "
        f"or false (float32), got {amp!r}"
    )


def amp_dtype(device: torch.device | str, amp: bool | str | None) -> torch.dtype | None:
    """The autocast dtype of setting ``amp`` on ``device``: ``torch.bfloat16``, or None for float32.

    None counts as "auto" (the default of the decoding functions).
    """
    amp = "auto" if amp is None else check_amp(amp)
    device_type = torch.device(device).type
    if amp == "bf16" or (amp in (True, "auto") and device_type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device | str, amp: bool | str | None) -> AbstractContextManager:
    """``torch.autocast(device_type=device.type, dtype=torch.bfloat16)`` where :func:`amp_dtype` says bf16,
    else a context that changes nothing."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def check_compile(value: Any, name: str = "compile") -> bool | str:
    """A ``compile`` setting: True, False, or the name of a torch.compile backend; else ValueError."""
    if isinstance(value, bool) or (isinstance(value, str) and value.strip()):
        return value
    raise ValueError(f"{name} must be true, false or the name of a torch.compile backend, got {value!r}")


def compile_backend(value: bool | str) -> str | None:
    """The torch.compile backend of setting ``value``: None (do not compile), ``"inductor"`` (True) or the name given."""
    value = check_compile(value)
    if value is False:
        return None
    return "inductor" if value is True else value


def compile_model(model: torch.nn.Module, value: bool | str) -> torch.nn.Module:
    """``model`` compiled with the backend of setting ``value`` (:func:`compile_backend`), or ``model`` itself.

    The compiled module shares the model's parameters, so training it trains the model; the model
    (not the wrapper) is what checkpoints save.
    """
    backend = compile_backend(value)
    return model if backend is None else torch.compile(model, backend=backend)


def optimizer_kwargs(device: torch.device | str) -> dict[str, Any]:
    """Extra keyword arguments of torch's Adam / AdamW on ``device``: ``fused=True`` on CUDA, none elsewhere.

    Fused Adam exists on the CPU as well, but the CPU keeps the plain implementation, whose
    results every CPU run so far was produced with.
    """
    return {"fused": True} if torch.device(device).type == "cuda" else {}
