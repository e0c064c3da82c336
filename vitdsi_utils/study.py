"""The study as a sequence of notebooks: profiles of parameters, and a runner that executes them.

A *profile* (``vitdsi_utils/profiles/<name>.yaml``) holds the study's knobs as UPPER_CASE
keys: dataset, image size, database sizes N, ID schemes, seeds, model and training settings.
:func:`run_study` executes ``notebooks/NN_*.ipynb`` in order with papermill, handing every
notebook the profile keys it declares in its ``parameters`` cell, plus ``OUT_DIR`` (where
tables and figures go) and ``RUNS_DIR`` (where trained models go, so later notebooks load
what earlier ones trained). Outputs::

    <out>/notebooks/NN_*.ipynb   executed copies
    <out>/tables/*.csv, *.md     result tables (Table 1 in table1.md)
    <out>/figures/*.png          Figures 1-3 and the others
    <out>/timings.csv            wall time per notebook
    <out>/README.md              parameters, timings, machine, Table 1 and the figures
    <out>/stamps/NN_*.json       one per notebook that finished: what its run depended on

A rerun skips every notebook whose stamp still matches (same notebook source, parameters,
package source and upstream stamps, executed copy and written files still there) and starts
at the first one that does not; see :func:`stale_reasons`.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
import yaml

from . import settings
from ._io import atomic_path, write_json, write_text

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
#: Parameters the runner adds to every profile: the output root and the trained-models folder.
RUNNER_PARAMETERS = ("OUT_DIR", "RUNS_DIR")
TIMING_COLUMNS = ("notebook", "seconds", "status")

#: Captions of the figures the notebooks write; other PNGs are shown under their file name.
FIGURE_CAPTIONS = {
    "gallery": "Sample images per class",
    "imagenette_gallery": "Sample Imagenette images per class",
    "split_bar": "Images per class and role",
    "bovw_vs_n": "BoVW and VLAD baselines: P@10 and R@100 against N",
    "figure1_indexing": "Figure 1: indexing phase, training loss and sequence accuracy per epoch",
    "figure2_retrieval_train": "Figure 2: retrieval phase, training loss and sequence accuracy per epoch",
    "figure3_retrieval_val": "Figure 3: retrieval phase, validation loss and sequence accuracy per epoch",
    "metric_bars": "BoVW, zero-shot and fine-tuned DSI with 95% intervals, chance (dashed) and the paper (hollow)",
    "demo_example": "One query of the demo: top-K results per model, relevant ones in green",
    "ids_bars": "DSI by ID scheme (clustered, random, semantic, RQ, atomic) with 95% intervals and chance (dashed)",
    "clusters_metrics": "k-means of the encoders' embeddings: silhouette, Davies-Bouldin, elbow, purity and NMI against k",
    "clusters_sizes": "Cluster sizes at k = the number of classes, per embedding",
    "clusters_gallery_best": "The largest clusters of the embedding with the highest NMI",
    "clusters_gallery_worst": "The largest clusters of the embedding with the lowest NMI",
    "dense_training": "Dense encoder: contrastive loss, entropy regulariser and total objective per epoch",
    "dense_validation": "Dense encoder: validation mAP@10 and P@10 per epoch",
    "dense_vs_n": "Dense search, BoVW and DSI: mAP@10, P@10 and R@100 against N",
    "rerank_tradeoff": "Re-ranking: mAP@10 against time per query, per first stage and candidate depth M",
    "dense_init_vs_n": "DSI from the dense encoder (multi-task) beside BoVW, dense search and the fine-tuned DSI, against N",
    "ablations": "Ablations: fine-tuned mAP@10, IA@1 before and after fine-tuning, and indexing epochs per setting",
    "scale": "Scale: query latency against N (DSI beam search, BoVW, dense search) and DSI IA@1",
    "incremental": "Incremental indexing: IA@1 on old and new images per strategy (training seconds above), and forgetting along the fine-tuning epochs",
    "pretrain": "Self-supervised pretraining: InfoNCE loss per epoch and indexing speed from each initialisation",
}


class StudyFailed(RuntimeError):
    """A notebook of the study raised; the message names the notebook, the cell and the error."""


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


# ------------------------------------------------------------------------------------------
# Helpers the notebooks share: where outputs go, the grid of databases, loading trained models
# ------------------------------------------------------------------------------------------
@dataclass
class StudyPaths:
    """Where a profile's outputs go: ``out`` (tables/, figures/) and ``runs`` (one folder of models per database)."""

    out: Path
    runs: Path

    @classmethod
    def create(
        cls, profile: str, out_dir: str | Path | None = None, runs_dir: str | Path | None = None
    ) -> "StudyPaths":
        """The notebooks' OUT_DIR / RUNS_DIR, or ``reports/<profile>`` / ``data/runs/<profile>``.

        tables/ and figures/ are created; run folders appear when a model is saved.
        """
        paths = cls(
            Path(out_dir) if out_dir else settings.reports_dir() / profile,
            Path(runs_dir) if runs_dir else settings.data_dir() / "runs" / profile,
        )
        for folder in (paths.tables, paths.figures):
            folder.mkdir(parents=True, exist_ok=True)
        return paths

    @property
    def tables(self) -> Path:
        return self.out / "tables"

    @property
    def figures(self) -> Path:
        return self.out / "figures"

    def run_dir(self, db: Any) -> Path:
        """The folder of ``db``'s trained models (``zero_shot.pt``, ``fine_tuned.pt``)."""
        from .experiments import run_name

        return self.runs / run_name(db)


def databases(image_set: Any, ns: Iterable[int], schemes: Iterable[str], seeds: Iterable[int]) -> Iterator[Any]:
    """Every database of the grid, N by N: ``build_database(image_set, n, id_scheme, seed)``."""
    from .data import build_database

    for n in ns:
        for scheme in schemes:
            for seed in seeds:
                yield build_database(image_set, n, id_scheme=scheme, seed=seed)


def sample_image_folder(
    root: str | Path, size: int, per_class: int = 6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A few preprocessed images per class of an ImageFolder tree, without decoding the whole tree.

    Returns (images (n, size, size, 3) uint8, labels (n,), class names); images outside the
    aspect range are skipped, as in the study.
    """
    from .data import list_image_files, load_image

    files, classes, labels = list_image_files(root)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    images, kept = [], []
    for label in range(len(classes)):
        for i in rng.permutation(np.flatnonzero(labels == label)):
            try:
                image = load_image(Path(root) / files[i], size)
            except OSError:  # an unreadable file is left out here, as load_images leaves it out
                continue
            if image is not None:
                images.append(image)
                kept.append(label)
            if kept.count(label) == per_class:
                break
    return np.stack(images), np.asarray(kept), classes


def load_trained(
    path: str | Path, profile: str = "smoke", device: str = "auto", dataset: str | None = None
) -> tuple[Any, Any, dict]:
    """(model on ``device``, codec, meta) of a model the study trained; when missing, an error naming its notebook.

    ``dataset`` (the notebooks' DATASET) goes into the command the error suggests.
    """
    from .train import load_model, resolve_device

    path = Path(path)
    if not path.is_file():
        notebook = "03_indexing" if path.name == "zero_shot.pt" else "04_retrieval"
        raise FileNotFoundError(
            f"{path} does not exist: notebook {notebook} trains it; run "
            f"`vitdsi study --profile {profile}{f' --dataset {dataset}' if dataset else ''} --start-at {notebook}`"
        )
    return load_model(path, map_location=resolve_device(device))


def baseline_verdicts(results: pd.DataFrame, metric: str = "mAP@10", baseline: str = "BoVW") -> pd.DataFrame:
    """Every non-baseline model against the baseline on ``metric``, at the same N and seed.

    ``verdict`` is 'better' or 'worse' only when the two 95% intervals do not overlap, else
    'overlap'. Columns: n, seed, model, ids, value, ci_low, ci_high, baseline_value,
    baseline_ci_low, baseline_ci_high, verdict.
    """
    rows = results[results["metric"] == metric]
    base = rows[rows["model"] == baseline][["n", "seed", "value", "ci_low", "ci_high"]]
    base = base.rename(columns={c: f"baseline_{c}" for c in ("value", "ci_low", "ci_high")})
    ours = rows[rows["model"] != baseline][["n", "seed", "model", "ids", "value", "ci_low", "ci_high"]]
    merged = ours.merge(base, on=["n", "seed"], how="inner")
    verdict = np.where(merged["ci_low"] > merged["baseline_ci_high"], "better",
                       np.where(merged["ci_high"] < merged["baseline_ci_low"], "worse", "overlap"))
    return merged.assign(verdict=verdict).sort_values(["n", "seed", "model", "ids"]).reset_index(drop=True)


# ------------------------------------------------------------------------------------------
# Notebooks
# ------------------------------------------------------------------------------------------
def notebooks_dir() -> Path:
    """The folder of the study's notebooks (``<repository>/notebooks``)."""
    return settings.project_root() / "notebooks"


def study_notebooks(folder: Path | None = None) -> list[Path]:
    """The study's notebooks ``NN_*.ipynb`` in execution (sorted) order."""
    folder = folder or notebooks_dir()
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no notebooks NN_*.ipynb in {folder}; is this a checkout of the project?")
    return found


def _resolve_notebook(name: str | Path) -> Path:
    """A notebook path from a path, a file name or a stem ('03_indexing')."""
    path = Path(name)
    if path.suffix == ".ipynb" and path.is_file():
        return path
    candidate = notebooks_dir() / (path.name if path.suffix == ".ipynb" else f"{path.name}.ipynb")
    if not candidate.is_file():
        raise FileNotFoundError(f"no notebook {name!r}; the study has {[p.stem for p in study_notebooks()]}")
    return candidate


def _start_index(paths: list[Path], start_at: str) -> int:
    """Position of the first notebook whose stem starts with ``start_at`` ('03' or '03_indexing')."""
    stem = Path(start_at).stem
    for i, path in enumerate(paths):
        if path.stem == stem or path.stem.startswith(stem):
            return i
    raise ValueError(f"--start-at {start_at!r} names no notebook; choose one of {[p.stem for p in paths]}")


def notebook_parameters(path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``params`` that the notebook declares in its ``parameters`` cell."""
    import papermill

    declared = papermill.inspect_notebook(str(path))
    return {k: v for k, v in params.items() if k in declared}


class _Indented:
    """A file-like stream that prints what a notebook's cells print, indented under the runner's lines."""

    def write(self, text: str) -> None:
        text = text.rstrip("\n")
        if text:
            print("    " + text.replace("\n", "\n    "), flush=True)

    def flush(self) -> None:
        sys.stdout.flush()


def execute_notebook(path: Path, output: Path, params: dict[str, Any], *, kernel_name: str, progress: bool) -> float:
    """Execute one notebook into ``output``; return its wall time (s). Raises StudyFailed on an error.

    With ``progress`` the notebook's printed output is echoed live, so a cell that trains for
    minutes still shows one line per finished run.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    echo = _Indented() if progress else None
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(path),
            str(output),
            parameters=notebook_parameters(path, params),
            kernel_name=kernel_name,
            cwd=str(path.parent),
            progress_bar=False,  # a per-cell bar says little when one cell trains for minutes
            stdout_file=echo,
            stderr_file=echo,
            # the kernel's own log only says that it runs over local TCP and is stopped at the end;
            # a kernel that dies still fails the notebook
            extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
        )
    except PapermillExecutionError as error:
        raise StudyFailed(
            f"{path.name} failed with {error.ename}: {error.evalue}\n"
            f"the full traceback is in cell {error.cell_index} of the executed copy {output}"
        ) from error
    except Exception as error:  # a dead kernel or a missing kernelspec: no cell to blame
        raise StudyFailed(f"{path.name} could not run: {type(error).__name__}: {error}") from error
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------
# Up-to-date checks: one stamp per notebook that finished
# ------------------------------------------------------------------------------------------
#: Bump when the stamp's content changes meaning: every older stamp then counts as stale.
STAMP_VERSION = 1
#: The package whose source every notebook runs (``vitdsi_utils``); its ``*.py`` files are hashed.
PACKAGE_DIR = Path(__file__).resolve().parent
#: Files in OUT_DIR that the runner writes itself; they are nobody's product.
RUNNER_FILES = ("notebooks", "stamps", "timings.csv", "README.md")


def stamps_dir(out: Path) -> Path:
    """Where the stamps of a report go: ``<out>/stamps/``."""
    return Path(out) / "stamps"


def stamp_path(out: Path, notebook: Path) -> Path:
    """The stamp of ``notebook`` in the report ``out``: ``<out>/stamps/<stem>.json``."""
    return stamps_dir(out) / f"{Path(notebook).stem}.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str | None:
    """The SHA-256 of a file's bytes, or None when it does not exist."""
    try:
        return _sha256(Path(path).read_bytes())
    except FileNotFoundError:
        return None


def notebook_source_hash(path: Path) -> str:
    """A hash of what running ``path`` depends on: its cells (type and source) and its kernel.

    Outputs, execution counts and editor metadata are left out, so opening and saving the
    notebook in Jupyter does not make it stale; changing a cell does.
    """
    import nbformat

    notebook = nbformat.read(str(path), as_version=4)
    content = {
        "kernel": notebook.metadata.get("kernelspec", {}).get("name"),
        "cells": [(cell.cell_type, cell.source) for cell in notebook.cells],
    }
    return _sha256(json.dumps(content, sort_keys=True).encode())


def package_hashes(package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """SHA-256 of every ``*.py`` file of the package, keyed by its path from the package's parent."""
    package_dir = Path(package_dir)
    return {str(p.relative_to(package_dir.parent)): _sha256(p.read_bytes())
            for p in sorted(package_dir.rglob("*.py")) if "__pycache__" not in p.parts}


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths strings), so it compares with a stamp."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def notebook_inputs(
    path: Path,
    params: dict[str, Any],
    upstream: list[Path],
    out: Path,
    *,
    kernel_name: str,
    package_dir: Path = PACKAGE_DIR,
) -> dict[str, Any]:
    """Everything the executed copy of ``path`` depends on, as it stands now.

    That is: the notebook's source, the parameters it receives (the ones its ``parameters``
    cell declares, profile and overrides resolved, with OUT_DIR and RUNS_DIR), the package
    source, the kernel, and the stamps of the notebooks before it in the series (``upstream``),
    identified by a digest of each stamp file (None where it has none). A stamp stores these
    inputs; the notebook is up to date while they are unchanged.
    """
    return {
        "version": STAMP_VERSION,
        "notebook": path.stem,
        "source_sha256": notebook_source_hash(path),
        "kernel_name": kernel_name,
        "parameters": _as_json(notebook_parameters(path, params)),
        "package": package_hashes(package_dir),
        "upstream": [[p.stem, _file_sha256(stamp_path(out, p))] for p in upstream],
    }


_MISSING = object()  # a key that one side of a comparison lacks


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k, _MISSING) != new.get(k, _MISSING))


def _short(value: Any) -> str:
    text = json.dumps(value) if value is not _MISSING else "(absent)"
    return text if len(text) <= 40 else text[:37] + "..."


def _listed(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def stale_reasons(path: Path, out: Path, inputs: dict[str, Any], runs: Path) -> list[str]:
    """Why the executed copy of ``path`` in ``out`` is not up to date; an empty list when it is.

    ``inputs`` is :func:`notebook_inputs` now. The copy is up to date when its stamp exists,
    records the same inputs, the executed copy is the one the run wrote, and the files the run
    wrote into OUT_DIR and RUNS_DIR (its products) still exist.
    """
    stamp_file = stamp_path(out, path)
    if not stamp_file.is_file():
        return ["no stamp: it has not finished successfully with this report folder"]
    try:
        stamp = json.loads(stamp_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return [f"its stamp {stamp_file} is unreadable ({error})"]
    if stamp.get("version") != STAMP_VERSION:
        return [f"its stamp has format {stamp.get('version')}, this runner writes {STAMP_VERSION}"]

    reasons = []
    executed = out / "notebooks" / path.name
    digest = _file_sha256(executed)
    if digest is None:
        reasons.append(f"the executed copy {executed} is missing")
    elif digest != stamp.get("executed_sha256"):
        reasons.append(f"the executed copy {executed} was changed after its run")
    if stamp.get("source_sha256") != inputs["source_sha256"]:
        reasons.append(f"the notebook {path.name} was edited")
    if stamp.get("kernel_name") != inputs["kernel_name"]:
        reasons.append(f"kernel {stamp.get('kernel_name')!r} -> {inputs['kernel_name']!r}")
    old, new = stamp.get("parameters", {}), inputs["parameters"]
    for key in _changed_keys(old, new):
        reasons.append(f"parameter {key}: {_short(old.get(key, _MISSING))} -> {_short(new.get(key, _MISSING))}")
    changed = _changed_keys(stamp.get("package", {}), inputs["package"])
    if changed:
        reasons.append(f"package source changed: {_listed(changed)}")
    old_upstream = {name: digest for name, digest in stamp.get("upstream", [])}
    old_names, new_names = list(old_upstream), [name for name, _ in inputs["upstream"]]
    if old_names != new_names:
        reasons.append(f"the notebooks before it changed: {old_names} -> {new_names}")
    else:
        for name, now in inputs["upstream"]:
            if now is None:
                reasons.append(f"upstream {name} has no stamp (it failed or has not run)")
            elif old_upstream[name] != now:
                reasons.append(f"upstream {name} ran again after it")
    roots = {"OUT_DIR": out, "RUNS_DIR": runs}
    missing = [f"{root}/{rel}" for root, files in stamp.get("products", {}).items()
               for rel in files if not (roots[root] / rel).exists()]
    if missing:
        reasons.append(f"files it wrote are missing: {_listed(missing)}")
    return reasons


def _snapshot(out: Path, runs: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """(root, relative path) -> (size, mtime_ns) of the files under OUT_DIR (but the runner's) and RUNS_DIR."""
    found = {}
    for root, folder in (("OUT_DIR", out), ("RUNS_DIR", runs)):
        if not folder.is_dir():
            continue
        for file in folder.rglob("*"):
            rel = file.relative_to(folder)
            if root == "OUT_DIR" and rel.parts[0] in RUNNER_FILES:
                continue
            if file.is_file():
                info = file.stat()
                found[(root, rel.as_posix())] = (info.st_size, info.st_mtime_ns)
    return found


def _products(before: dict, after: dict) -> dict[str, list[str]]:
    """The files that appeared or changed between two snapshots, grouped by root."""
    products: dict[str, list[str]] = {"OUT_DIR": [], "RUNS_DIR": []}
    for (root, rel), state in sorted(after.items()):
        if before.get((root, rel)) != state:
            products[root].append(rel)
    return products


def write_stamp(
    out: Path, path: Path, inputs: dict[str, Any], *, seconds: float, products: dict[str, list[str]]
) -> Path:
    """Record that ``path`` ran successfully with ``inputs`` (written atomically: a stamp is whole or absent)."""
    stamp = {
        **inputs,
        "executed_sha256": _file_sha256(out / "notebooks" / path.name),
        "products": products,
        "seconds": seconds,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
    }
    return write_json(stamp_path(out, path), stamp)


def _stamp_seconds(out: Path, path: Path) -> float:
    try:
        return float(json.loads(stamp_path(out, path).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return float("nan")


# ------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------
def run_study(
    profile: str | dict[str, Any],
    *,
    notebooks: Iterable[str | Path] | None = None,
    start_at: str | None = None,
    force: bool = False,
    out_root: str | Path | None = None,
    runs_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    kernel_name: str = "python3",
    progress: bool = True,
) -> pd.DataFrame:
    """Execute the study's notebooks with a profile's parameters; return wall times (notebook, seconds, status).

    ``profile`` is a bundled name, a YAML path or a dict of parameters; ``overrides`` replace
    single parameters. ``out_root`` defaults to ``reports/<profile>`` and ``runs_dir`` to
    ``data/runs/<profile>``; when ``overrides`` change the profile's ``DATASET`` (e.g. to
    ``coco``), to ``reports/<profile>-<dataset>`` and ``data/runs/<profile>-<dataset>``, so the
    profile's own report is kept.

    A notebook whose executed copy is up to date (see :func:`stale_reasons`) is skipped, and
    the run starts at the first one that is not: a rerun after a failure or an interruption
    picks up where it stopped. Each notebook that finishes gets a stamp in ``<out>/stamps/``;
    a notebook about to run loses its stamp, and so do the ones after it, so a failure leaves
    only the notebooks before it stamped. Since a stamp records the stamps before it, a rerun
    notebook makes every later one stale. ``force`` reruns every notebook. With ``start_at``
    the notebooks before it are skipped unchecked (their outputs from an earlier run are used)
    and the named one and all after it run. Stops at the first failing notebook with StudyFailed.

    Status per notebook: ``ok`` (ran now), ``up to date`` (skipped; seconds of its last run),
    ``earlier run`` (before ``start_at``) or ``failed``. When every notebook is up to date
    nothing runs and timings.csv and README.md are left as they are.
    """
    params = dict(profile) if isinstance(profile, dict) else load_profile(profile)
    unknown = sorted(set(overrides or {}) - set(params))
    if unknown:  # most likely a typo, which would otherwise be ignored silently
        raise ValueError(f"overrides {unknown} name no parameter of the profile; it has {sorted(params)}")
    profile_dataset = params.get("DATASET")
    params.update(overrides or {})
    name = str(params.get("PROFILE", "custom"))
    command = f"vitdsi study --profile {name}"
    folder = name
    if params.get("DATASET") != profile_dataset:
        command += f" --dataset {params['DATASET']}"
        folder = f"{name}-{params['DATASET']}"
    out = Path(out_root) if out_root is not None else settings.reports_dir() / folder
    runs = Path(runs_dir) if runs_dir is not None else settings.data_dir() / "runs" / folder
    params.update(OUT_DIR=str(out.resolve()), RUNS_DIR=str(runs.resolve()))

    paths = [_resolve_notebook(n) for n in notebooks] if notebooks is not None else study_notebooks()
    first = _start_index(paths, start_at) if start_at else 0
    timings = _earlier_timings(out, paths[:first])
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    _say(progress, f"study '{name}': {len(paths) - first} notebook(s) -> {out}")
    study_start = time.perf_counter()
    ran = False
    for i, path in enumerate(paths[first:], start=first):
        label = f"[{i + 1}/{len(paths)}] {path.stem}"
        inputs = notebook_inputs(path, params, paths[:i], out, kernel_name=kernel_name)
        if not ran:  # once a notebook has run, every later one is stale: its upstream stamp changed
            if force or start_at:
                why = "--force" if force else f"--start-at {start_at}"
                _say(progress, f"{label}: running ({why}) ...")
            else:
                reasons = stale_reasons(path, out, inputs, runs)
                if not reasons:
                    seconds = _stamp_seconds(out, path)
                    timings.append({"notebook": path.stem, "seconds": seconds, "status": "up to date"})
                    _say(progress, f"{label}: up to date, skipped")
                    continue
                _say(progress, f"{label}: stale ({'; '.join(reasons)}); running ...")
        else:
            _say(progress, f"{label}: running (a notebook before it ran) ...")
        for later in paths[i:]:  # its stamp and the later ones describe outputs about to be replaced
            stamp_path(out, later).unlink(missing_ok=True)
        ran = True
        before = _snapshot(out, runs)
        try:
            seconds = execute_notebook(path, out / "notebooks" / path.name, params,
                                       kernel_name=kernel_name, progress=progress)
        except StudyFailed as error:
            _say(progress, f"{label} FAILED\n{error}")
            _write_timings(out, timings + [{"notebook": path.stem, "seconds": float("nan"), "status": "failed"}])
            raise
        write_stamp(out, path, inputs, seconds=seconds, products=_products(before, _snapshot(out, runs)))
        timings.append({"notebook": path.stem, "seconds": seconds, "status": "ok"})
        _say(progress, f"{label} done in {seconds:.1f} s")
    frame = pd.DataFrame(timings, columns=list(TIMING_COLUMNS))
    if not ran:
        _say(progress, f"study '{name}': every notebook is up to date, nothing ran (--force reruns them); "
                       f"report: {out / 'README.md'}")
        return frame
    frame = _write_timings(out, timings)
    write_readme(out, params, frame, command=command)
    _say(progress, f"study '{name}' done in {time.perf_counter() - study_start:.1f} s; report: {out / 'README.md'}")
    return frame


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def _earlier_timings(out: Path, skipped: list[Path]) -> list[dict]:
    """Timing rows of the skipped notebooks, from the last run's timings.csv where there is one."""
    if not skipped:
        return []
    path = out / "timings.csv"
    earlier = pd.read_csv(path).set_index("notebook") if path.exists() else pd.DataFrame()
    rows = []
    for nb in skipped:
        seconds = float(earlier.at[nb.stem, "seconds"]) if nb.stem in earlier.index else float("nan")
        rows.append({"notebook": nb.stem, "seconds": seconds, "status": "earlier run"})
    return rows


def _write_timings(out: Path, rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(TIMING_COLUMNS))
    with atomic_path(out / "timings.csv") as tmp:
        frame.to_csv(tmp, index=False)
    return frame


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the results and the notebooks."""
    from .environment import machine_info

    info = {k: str(v) for k, v in machine_info().items() if k not in ("platform", "processor", "cpu_count", "device")}
    for package in ("pandas", "matplotlib", "papermill", "ipywidgets", "vitdsi"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return info


def _demote_headings(markdown: str) -> str:
    """Push every Markdown heading one level down, so an embedded file nests under ours."""
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.MULTILINE)


def _training_time_lines(out: Path) -> list[str]:
    """A sentence with the training time the models' histories record (models may be reused from earlier runs)."""
    seconds = 0.0
    for name in ("histories_indexing.csv", "histories_retrieval.csv"):
        path = out / "tables" / name
        if path.exists():
            frame = pd.read_csv(path)
            seconds += float(frame.loc[frame["split"] == "train", "seconds"].sum())
    if not seconds:
        return []
    return [
        f"Training time recorded in the models' histories: {seconds / 60:.1f} min (both phases, all runs). "
        "Notebooks 03 and 04 load a model that a run folder already holds instead of training it again "
        "(their output says `loaded`), so the wall times above include this training only when it "
        "happened during this run.",
        "",
    ]


def write_readme(out: Path, params: dict[str, Any], timings: pd.DataFrame, command: str | None = None) -> Path:
    """Write ``<out>/README.md``: parameters, wall times, machine, Table 1 and the figures.

    ``command`` is the command line that produced the report (default: ``vitdsi study --profile NAME``).
    """
    from .environment import describe_machine

    name = params.get("PROFILE", "custom")
    command = command or f"vitdsi study --profile {name}"
    shown = {k: v for k, v in params.items() if k not in RUNNER_PARAMETERS}
    total = float(timings["seconds"].sum())  # NaN (a failed or never-timed notebook) counts as 0
    lines = [
        f"# The vitdsi study, profile `{name}`",
        "",
        f"Generated by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
        "Executed notebooks are in [`notebooks/`](notebooks/), tables (CSV + Markdown) in "
        "[`tables/`](tables/), figures in [`figures/`](figures/). "
        f"Trained models: `{settings.portable_path(params.get('RUNS_DIR') or '')}`.",
        "",
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
        *[f"| `{k}` | `{v}` |" for k, v in shown.items()],
        "",
        "## Wall time per notebook",
        "",
        "| notebook | seconds | status |",
        "|---|---|---|",
        *[f"| [{r.notebook}](notebooks/{r.notebook}.ipynb) | {r.seconds:.1f} | {r.status} |"
          for r in timings.itertuples(index=False)],
        f"| **total** | **{total:.1f}** | |",
        "",
        *_training_time_lines(out),
        "## Machine",
        "",
        describe_machine(),
        "",
        "| package | version |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in package_versions().items()],
        "",
        "## Table 1",
        "",
    ]
    table1 = out / "tables" / "table1.md"
    lines.append(_demote_headings(table1.read_text().strip()) if table1.exists()
                 else "_No Table 1: `05_results` did not run (see the timings above)._")
    lines += ["", "## Figures", ""]
    figures = sorted((out / "figures").glob("*.png"))
    for fig in figures:
        lines += [f"### {FIGURE_CAPTIONS.get(fig.stem, fig.stem)}", "", f"![{fig.stem}](figures/{fig.name})", ""]
    if not figures:
        lines.append("_No figures were written._")
    return write_text(out / "README.md", "\n".join(lines).rstrip() + "\n")
