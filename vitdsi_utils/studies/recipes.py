"""Recipes: YAML files that name a study and its settings, run by ``vitdsi run recipes/<name>.yaml``.

A recipe is a mapping::

    # what it runs and where it writes (the first comment line is what `vitdsi recipes` lists)
    study: dsi                  # one of STUDIES
    out_dir: reports/dsi        # tables and figures (default: reports/<study's folder>)
    runs_dir: data/runs/dsi     # trained models (default: data/runs/<study's folder>)
    size: 64                    # ... and the keys of the study's spec (e.g. studies.dsi.DSISpec)
    index: {epochs: 400, lr: 1e-3}

* ``runs:`` (a list of mappings) makes several runs of one file: each entry is laid over the
  file's other keys, so shared settings are written once (``make bovw``'s three runs);
* ``extends: other.yaml`` (relative to the file) starts from another recipe and changes some keys
  (mappings merge key by key; lists and other values replace);
* ``--set key=value`` (dotted keys for sections, YAML values: ``--set index.epochs=10``,
  ``--set ns=[512]``) changes every run of the file, after the two above; ``--set 'runs=[{...}]'``
  replaces the file's list of runs (``--set 'runs=[{}]'``: one run of the shared keys).

Relative paths in a recipe are read from the working directory (the project root, for ``make``).
:func:`load_recipe` builds and checks every run's spec before anything runs; :func:`run_recipe` runs them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from vitdsi_utils import settings
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies import ablations, bovw, dense, dense_init, dsi, incremental, pretrain, scale
from vitdsi_utils.studies.specs import (
    SpecError,
    build_spec,
    deep_merge,
    load_yaml,
    parse_set,
    refuse_profile_only,
    set_value,
    spec_to_dict,
)


@dataclass(frozen=True)
class Study:
    """A study a recipe can name: its module (``run``, ``console_summary``, the spec class) and default folders."""

    module: ModuleType
    spec: type
    out: str  # default output folder under reports/
    runs: str | None  # default model folder under data/runs/ (None: the study trains nothing)

    def run(self, spec: Any, paths: StudyPaths) -> Any:
        return self.module.run(spec, paths)

    def summary(self, spec: Any, result: Any) -> str:
        return self.module.console_summary(spec, result)


#: The studies of ``vitdsi run``, by the name a recipe's ``study:`` gives.
STUDIES: dict[str, Study] = {
    "bovw": Study(bovw, bovw.BoVWSpec, "bovw", None),
    "dsi": Study(dsi, dsi.DSISpec, "dsi", "dsi"),
    "ablations": Study(ablations, ablations.AblationsSpec, "ablations", "dsi"),
    "dense": Study(dense, dense.DenseSpec, "dense", "dense"),
    "dense-init": Study(dense_init, dense_init.DenseInitSpec, "dsi_dense_init", "dsi_dense_init"),
    "pretrain": Study(pretrain, pretrain.PretrainSpec, "pretrain", "pretrain"),
    "scale": Study(scale, scale.ScaleSpec, "scale", "scale"),
    "incremental": Study(incremental, incremental.IncrementalSpec, "incremental", "incremental"),
}


#: Keys of a run that are not the spec's.
RUN_KEYS = ("study", "out_dir", "runs_dir")


#: Keys only the top of a recipe file may hold.
FILE_KEYS = ("runs", "extends")


def recipes_dir() -> Path:
    """The project's recipes folder."""
    return settings.project_root() / "recipes"


@dataclass(frozen=True)
class RecipeRun:
    """One run of a recipe: the study, its checked spec and the folders it writes to."""

    study: str
    spec: Any
    paths: StudyPaths
    label: str  # where it came from, for messages: "recipes/bovw.yaml, run 2 of 3"

    def as_dict(self) -> dict[str, Any]:
        """The run as a recipe mapping (what ``--dry-run`` prints; :func:`build_run` reads it back)."""
        folders = {"out_dir": str(self.paths.out)}
        if STUDIES[self.study].runs is not None:
            folders["runs_dir"] = str(self.paths.runs)
        return {"study": self.study, **folders, **spec_to_dict(self.spec)}


def recipe_path(name: str | Path) -> Path:
    """A recipe file: ``name`` itself when it exists, else ``recipes/<name>[.yaml]`` of the project."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (recipes_dir() / path, recipes_dir() / f"{path}.yaml"):
        if candidate.is_file() and not path.is_absolute():
            return candidate
    known = ", ".join(name for name, _ in list_recipes()) or "none"
    raise SpecError(f"recipe {str(name)!r} does not exist; recipes in {recipes_dir()}: {known}")


def read_recipe(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a recipe file, with ``extends:`` resolved (the file's keys laid over the other's)."""
    if path.resolve() in _seen:
        raise SpecError(f"{path}: extends itself (through {' -> '.join(str(p) for p in _seen)})")
    if not path.is_file():
        raise SpecError(f"{path}: no such recipe file")
    try:
        values = load_yaml(path.read_text())
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError(f"{path}: not valid YAML{line}: {problem}") from None
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise SpecError(f"{path}: a recipe is a mapping of keys (study: ..., ...), got {type(values).__name__}")
    values = dict(values)
    base = values.pop("extends", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise SpecError(f"{path}: extends: expected the path of another recipe file, got {base!r}")
    parent = read_recipe(path.parent / base, (*_seen, path.resolve()))
    merged = deep_merge({k: v for k, v in parent.items() if k != "runs"}, values)
    if "runs" in parent and "runs" not in values:
        merged["runs"] = parent["runs"]
    return merged


def load_recipe(name: str | Path, sets: Iterable[str] = ()) -> list[RecipeRun]:
    """Every run of a recipe (a file, or a name in ``recipes/``) with the ``--set`` overrides, checked."""
    path = recipe_path(name)
    values = read_recipe(path)
    overrides = [parse_set(item) for item in sets]
    for key, value in overrides:
        if key == "runs":  # --set 'runs=[{...}]' replaces the file's list of runs
            values["runs"] = value
        elif key.split(".")[0] in FILE_KEYS:
            raise SpecError(f"--set {key}: only the whole list of runs can be set (--set 'runs=[{{...}}, ...]')")
    overrides = [(key, value) for key, value in overrides if key != "runs"]
    entries = values.pop("runs", None)
    if entries is None:
        entries = [{}]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, Mapping) for e in entries):
        raise SpecError(f"{path}: runs: expected a list of mappings (one per run), got {entries!r}")
    out = []
    where = str(name) if Path(name).is_file() else settings.portable_path(path)
    for i, entry in enumerate(entries, 1):
        label = where + (f", run {i} of {len(entries)}" if len(entries) > 1 else "")
        misplaced = [k for k in FILE_KEYS if k in entry]
        if misplaced:
            raise SpecError(f"{label}: {misplaced[0]} belongs at the top of the file, not in a run")
        merged = deep_merge(values, entry)
        for key, value in overrides:
            merged = set_value(merged, key, value)
        try:
            out.append(build_run(merged, label))
        except SpecError as error:
            raise SpecError(f"{label}: {error}") from None
    return out


def build_run(values: Mapping[str, Any], label: str = "") -> RecipeRun:
    """One run from its mapping: ``study``, ``out_dir``, ``runs_dir`` and the study's spec keys."""
    values = dict(values)
    name = values.pop("study", None)
    if name is None:
        raise SpecError("no study: name one with study: " + " | ".join(STUDIES))
    if name not in STUDIES:
        raise SpecError(f"study: unknown study {name!r}; allowed: {', '.join(STUDIES)}")
    study = STUDIES[name]
    folders = {}
    for key in ("out_dir", "runs_dir"):
        value = values.pop(key, None)
        if value is not None and not isinstance(value, str):
            raise SpecError(f"{key}: expected a folder path, got {value!r} ({type(value).__name__})")
        folders[key] = value
    try:
        spec = build_spec(study.spec, values)
    except SpecError as error:
        message = str(error)
        if message.startswith("unknown key ") and "; allowed: " in message:
            # the run keys are allowed too
            head, allowed = message.split("; allowed: ", 1)
            keys = sorted([*allowed.split(", "), *RUN_KEYS])
            raise SpecError(f"{head} for study {name}; allowed: {', '.join(keys)}") from None
        raise
    refuse_profile_only(spec)
    out = Path(folders["out_dir"]) if folders["out_dir"] else settings.reports_dir() / study.out
    runs = (
        Path(folders["runs_dir"]) if folders["runs_dir"] else settings.data_dir() / "runs" / (study.runs or study.out)
    )
    return RecipeRun(name, spec, StudyPaths(out, runs), label)


def run_recipe(runs: Iterable[RecipeRun], echo: Callable[[str], Any] = print) -> list[Any]:
    """Run every run in order; ``echo`` gets a line before each, its summary and its time after."""
    results = []
    for run in runs:
        study = STUDIES[run.study]
        where = f"tables in {run.paths.out}" + (f", models in {run.paths.runs}" if study.runs else "")
        echo(f"== {run.label}: {run.study} study -> {where}")
        start = time.perf_counter()
        result = study.run(run.spec, run.paths)
        echo(study.summary(run.spec, result))
        echo(f"{run.study} study done in {time.perf_counter() - start:.0f} s; {where}")
        results.append(result)
    return results


def list_recipes() -> list[tuple[str, str]]:
    """(name, first comment line) of every recipe in ``recipes/``."""
    out = []
    for path in sorted(recipes_dir().glob("*.yaml"), key=lambda p: p.stem):
        lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
        out.append((path.stem, lines[0] if lines else ""))
    return out


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line: the layout of the recipe files."""


_Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


def dump_runs(runs: Iterable[RecipeRun]) -> str:
    """The runs as YAML, one document per run (``vitdsi run --dry-run``)."""
    return "".join(
        f"# {run.label}\n"
        + yaml.dump(run.as_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
        + "---\n"
        for run in runs
    )
