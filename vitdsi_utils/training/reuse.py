"""When a trained artefact may be reused: the settings it records against the settings requested.

**The policy, the same for every artefact** (indexed, fine-tuned and multi-task DSI models,
checkpoints of interrupted runs, the incremental study's models, dense and self-supervised
encoders): a file is reused only when every setting that shaped it matches the request. The
settings that shape a model are its config's *recipe* (:meth:`PlainConfig.recipe
<vitdsi_utils.training.config.PlainConfig.recipe>`: every field but the config's
``RUNTIME_FIELDS``, such as the device, the progress bar or how often to checkpoint), plus the
model configuration, the IDs, the database, the encoder initialisation, the fine-tuning options
and, for a model trained from another one, that parent's weights. Anything else is refused with
a :class:`~vitdsi_utils.training.checkpoint.CheckpointError` that names every difference
(``lr: saved 0.001, requested 0.002``) and says what to do: delete the file, use another run
folder, or request the saved settings. Nothing is retrained over an existing model, and nothing
is reused silently.

**Epoch caps of a phase with a stop rule** (indexing: train until IA@1 reaches the target, at
most ``epochs`` epochs). The cap decides the model only when the run hit it:

* a model that *reached* the target after E epochs is what any cap >= E trains (training is
  seeded, and the learning rate does not depend on the cap), so it is reused for those caps and
  refused for a cap below E;
* a model that stopped at its cap *without* reaching the target is reused only for that same
  cap. For a higher cap the run continues from its checkpoint (``indexing.ckpt``) up to the new
  cap or the target, which is exactly what a fresh run with the higher cap would do. Without
  the checkpoint, or for a lower cap, it is refused.

A phase without a stop rule (fine-tuning) trains exactly ``epochs`` epochs, so its epochs must
match. A checkpoint of an interrupted run resumes under any cap at least as large as the epochs
it holds.

**Files written before this record existed.** Finished DSI models have always stored their
training settings; what older ones lack is whether indexing reached its target. For them, a
run that stopped before its cap reached it; one that ran to its cap is treated as not having
reached it (so it is reused for that cap only, and continued from its checkpoint for a higher
one). A fine-tuned model that records no parent weights is checked for everything else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from vitdsi_utils.training.config import TrainConfig

#: What to do about a refused file; ``{files}`` names it (and its checkpoint).
REUSE_HINT = (
    "Delete {files} or use another run folder (a recipe's runs_dir, vitdsi study --runs) to train for "
    "the settings requested, or request the saved ones"
)


def differences(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """``"<prefix><key>: saved <a>, requested <b>"`` for every key of both dicts whose values differ.

    A key only one side has is a setting the other side's recipe does not use (``stop_beam`` of
    a run stopped by another metric, say); the setting that made the difference is named instead.
    """
    return [
        f"{prefix}{k}: saved {saved[k]!r}, requested {value!r}"
        for k, value in wanted.items()
        if k in saved and saved[k] != value
    ]


@dataclass
class Verdict:
    """Whether a finished model may be used for the settings requested.

    ``differences``: one line per setting that rules it out (empty: usable). ``resume``: not
    usable as it is, but its run stopped at its epoch cap short of the target and the cap asked
    for is higher, so training continues from its checkpoint.
    """

    differences: list[str] = field(default_factory=list)
    resume: bool = False

    @property
    def reusable(self) -> bool:
        return not self.differences and not self.resume


def finished_verdict(
    saved_config: dict[str, Any] | None,
    wanted: TrainConfig,
    *,
    epochs_run: int,
    reached: bool | None,
    stop_rule: bool = True,
    capped: bool | None = None,
    resumable: bool = False,
) -> Verdict:
    """Compare a finished model's training settings with ``wanted`` (the rules in this module's docstring).

    ``saved_config``: the TrainConfig dict stored with it; ``epochs_run``: the epochs it trained;
    ``reached``: whether its stop rule fired (None: not recorded); ``stop_rule``: whether the phase
    stops at a target (indexing) or trains all its epochs (fine-tuning); ``capped``: whether
    ``epochs`` is the cap of that stop rule (default: ``stop_rule``; False when the rule belongs to a
    later part of the run, as consolidation after fine-tuning, so the epochs must match);
    ``resumable``: whether a checkpoint exists from which a capped run could continue.
    """
    if saved_config is None:
        return Verdict(["training settings: none recorded with it"])
    saved = TrainConfig.recipe_of(saved_config, stop_rule=stop_rule)
    want = wanted.recipe(stop_rule=stop_rule)
    cap, asked = saved.pop("epochs"), want.pop("epochs")
    found = differences(saved, want)
    capped = stop_rule if capped is None else capped
    early_stop = capped and stop_rule and want.get("target_accuracy") is not None
    if early_stop and reached is None and epochs_run < cap:
        reached = True  # stopped before its cap: only the stop rule does that
    if early_stop and reached:
        if epochs_run > asked:
            found.append(f"epochs: it reached the target after {epochs_run} epochs, more than the {asked} requested")
        return Verdict(found)
    if asked == cap:
        return Verdict(found)
    if asked > cap and resumable and not found:
        return Verdict(resume=True)
    line = f"epochs: saved {cap}"
    if early_stop:
        line += " (it stopped there without reaching the target)"
    line += f", requested {asked}"
    if early_stop and asked > cap and not found:
        line += ", and there is no checkpoint to continue it from"
    found.append(line)
    return Verdict(found)


def resume_differences(
    saved_config: dict[str, Any] | None, wanted: TrainConfig, *, epoch: int, stop_rule: bool
) -> list[str]:
    """Why a checkpoint of an interrupted (or finished) run at ``epoch`` cannot be continued with ``wanted``.

    Every recipe setting must match but the epoch cap, which must be at least ``epoch``.
    """
    if saved_config is None:
        return ["training settings: none recorded in it"]
    saved = TrainConfig.recipe_of(saved_config, stop_rule=stop_rule)
    want = wanted.recipe(stop_rule=stop_rule)
    saved.pop("epochs")
    asked = want.pop("epochs")
    found = differences(saved, want)
    if epoch > asked:
        found.append(f"epochs: it holds {epoch} epochs, more than the {asked} requested")
    return found


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of a model's weights: the identity of the model another one was trained from."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
