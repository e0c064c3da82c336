"""Study profiles: ``vitdsi_utils/profiles/<name>.yaml``, the notebooks' UPPER_CASE parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vitdsi_utils.runner.sources import read_notebook

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"


#: Parameters the runner adds to every profile: the output root and the trained-models folder.
RUNNER_PARAMETERS = ("OUT_DIR", "RUNS_DIR")


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
    return params


def notebook_parameters(path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``params`` that the notebook (a py:percent source or an ``.ipynb``) declares in its ``parameters`` cell."""
    import papermill

    declared = papermill.inspect_notebook(read_notebook(path))
    return {k: v for k, v in params.items() if k in declared}
