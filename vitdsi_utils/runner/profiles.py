"""Study profiles: ``vitdsi_utils/profiles/<name>.yaml``, the notebooks' UPPER_CASE parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vitdsi_utils.data.images import check_dataset, dataset_name
from vitdsi_utils.runner.sources import read_notebook
from vitdsi_utils.studies.recipes import STUDIES
from vitdsi_utils.studies.specs import SpecError, spec_from_profile

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"


#: Parameters the runner adds to every profile: the output root and the trained-models folder.
RUNNER_PARAMETERS = ("OUT_DIR", "RUNS_DIR")


#: Where a profile's ``DATASET`` is read from and what reports call it; None (the default of a profile
#: that leaves them out): the environment's folders, and the folder's name or the source.
DATASET_PARAMETERS = ("DATASET_ROOT", "DATASET_ANNOTATIONS", "DATASET_NAME")


def check_profile_values(params: dict[str, Any], where: str | Path = "the profile") -> None:
    """ValueError (one line naming the key) for the first profile value a study's settings refuse.

    Every study's spec is built from the profile (:func:`~vitdsi_utils.studies.specs.spec_from_profile`),
    so each value goes through the check of the config it sets (``TrainConfig``, ``DenseTrainConfig``,
    ``SSLConfig``, the model configuration): a bad value fails when the profile is read, before any
    notebook runs.
    """
    for study in STUDIES.values():
        try:
            spec_from_profile(study.spec, params, ignore_unknown=True)
        except SpecError as error:
            # a profile is read as YAML 1.1, where 1e-3 is text even without quotes
            message = str(error).replace(
                "; write the number without quotes", "; in a profile write numbers like 1e-3 as 1.0e-3 or 0.001"
            )
            raise ValueError(f"{where}: {message}") from None


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
        raise ValueError(
            f"profile {path} is not valid YAML: {error}; fix the file (see the bundled profiles)"
        ) from error
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a mapping of UPPER_CASE parameters, got {type(params).__name__}")
    lower = sorted(k for k in params if not str(k).isupper())
    if lower:
        raise ValueError(f"{path}: parameter names must be UPPER_CASE (notebook knobs), got {lower}")
    params.setdefault("PROFILE", path.stem)
    check_profile_values(params, path)
    return params


def resolve_dataset(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with its data set checked and pinned down, before any notebook runs.

    ``DATASET_ROOT`` and ``DATASET_ANNOTATIONS`` become absolute paths (the notebooks run in
    ``notebooks/``), and ``DATASET_NAME`` the name every report uses (:func:`dataset_name`: the
    given name, else a folder's own name, else the source). A source that cannot be read so (a
    ``folder`` without its root, a path that does not exist, COCO without its files) raises the
    error :func:`check_dataset` gives. A profile without ``DATASET`` is left as it is.
    """
    params = dict(params)
    if "DATASET" not in params:
        return params
    for key in DATASET_PARAMETERS:
        params.setdefault(key, None)
    root, annotations = check_dataset(params["DATASET"], params["DATASET_ROOT"], params["DATASET_ANNOTATIONS"])
    name = dataset_name(params["DATASET"], root, params["DATASET_NAME"])
    params.update(DATASET_ROOT=root, DATASET_ANNOTATIONS=annotations, DATASET_NAME=name)
    return params


def notebook_parameters(path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``params`` that the notebook (a py:percent source or an ``.ipynb``) declares in its ``parameters`` cell."""
    import papermill

    declared = papermill.inspect_notebook(read_notebook(path))
    return {k: v for k, v in params.items() if k in declared}
