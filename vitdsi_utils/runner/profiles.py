"""Study profiles: ``vitdsi_utils/profiles/<name>.yaml``, the notebooks' UPPER_CASE parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vitdsi_utils.baselines.dense import DenseTrainConfig
from vitdsi_utils.baselines.ssl import SSLConfig
from vitdsi_utils.training.config import TrainConfig

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"


#: Parameters the runner adds to every profile: the output root and the trained-models folder.
RUNNER_PARAMETERS = ("OUT_DIR", "RUNS_DIR")


#: Profile parameters that become training settings: (config class, field). :func:`load_profile`
#: checks each with that config's own rule, so a bad value fails when the profile is read, before
#: any notebook runs (and the notebooks' configs check again).
TRAINING_PARAMETERS: dict[str, tuple[type, str]] = {
    "LR": (TrainConfig, "lr"), "BATCH_SIZE": (TrainConfig, "batch_size"), "WARMUP_STEPS": (TrainConfig, "warmup_steps"),
    "TARGET_ACCURACY": (TrainConfig, "target_accuracy"),
    **{key: (TrainConfig, "epochs") for key in ("INDEX_EPOCHS", "RETRIEVAL_EPOCHS", "SCALE_INDEX_EPOCHS",
                                                "INC_FINETUNE_EPOCHS", "INIT_EPOCHS")},
    "DENSE_EPOCHS": (DenseTrainConfig, "epochs"), "DENSE_LR": (DenseTrainConfig, "lr"),
    "DENSE_BATCH_SIZE": (DenseTrainConfig, "batch_size"), "DENSE_MARGIN": (DenseTrainConfig, "margin"),
    "DENSE_ENTROPY_WEIGHT": (DenseTrainConfig, "entropy_weight"),
    "SSL_EPOCHS": (SSLConfig, "epochs"), "SSL_BATCH_SIZE": (SSLConfig, "batch_size"),
}


def check_training_parameters(params: dict[str, Any], where: str | Path = "the profile") -> None:
    """ValueError (one line naming the parameter) for the first :data:`TRAINING_PARAMETERS` value its config refuses."""
    for key, (config, field) in TRAINING_PARAMETERS.items():
        if key in params:
            try:
                config(**{field: params[key]})
            except (ValueError, TypeError) as error:
                raise ValueError(f"{where}: {key}: {error}") from None


# ------------------------------------------------------------------------------------------
# Profiles
# ------------------------------------------------------------------------------------------
def known_profiles() -> list[str]:
    """Names of the bundled profiles (the YAML files in ``vitdsi_utils/profiles``)."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name: str | Path) -> dict[str, Any]:
    """The parameters of a profile: a bundled name (smoke, cpu, paper) or a path to a YAML file."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown profile {str(name)!r}; choose one of {known_profiles()} or pass a YAML file path")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"profile {path} is not valid YAML: {error}; fix the file (see the bundled profiles)") from error
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a mapping of UPPER_CASE parameters, got {type(params).__name__}")
    lower = sorted(k for k in params if not str(k).isupper())
    if lower:
        raise ValueError(f"{path}: parameter names must be UPPER_CASE (notebook knobs), got {lower}")
    params.setdefault("PROFILE", path.stem)
    check_training_parameters(params, path)
    return params


def notebook_parameters(path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``params`` that the notebook declares in its ``parameters`` cell."""
    import papermill

    declared = papermill.inspect_notebook(str(path))
    return {k: v for k, v in params.items() if k in declared}
