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
"""
from __future__ import annotations

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
from ._io import atomic_path, write_text

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
#: Parameters the runner adds to every profile: the output root and the trained-models folder.
RUNNER_PARAMETERS = ("OUT_DIR", "RUNS_DIR")
TIMING_COLUMNS = ("notebook", "seconds", "status")

#: Captions of the figures the notebooks write; other PNGs are shown under their file name.
FIGURE_CAPTIONS = {
    "gallery": "Sample images per class",
    "imagenette_gallery": "Sample Imagenette images per class",
    "split_bar": "Images per class and role",
    "bovw_vs_n": "BoVW baseline: P@10 and R@100 against N",
    "figure1_indexing": "Figure 1: indexing phase, training loss and sequence accuracy per epoch",
    "figure2_retrieval_train": "Figure 2: retrieval phase, training loss and sequence accuracy per epoch",
    "figure3_retrieval_val": "Figure 3: retrieval phase, validation loss and sequence accuracy per epoch",
    "metric_bars": "BoVW, zero-shot and fine-tuned DSI with 95% intervals, chance (dashed) and the paper (hollow)",
    "demo_example": "One query of the demo: top-K results per model, relevant ones in green",
    "ids_bars": "DSI by ID scheme (clustered, random, semantic, RQ, atomic) with 95% intervals and chance (dashed)",
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
    params = yaml.safe_load(path.read_text()) or {}
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


def load_trained(path: str | Path, profile: str = "smoke", device: str = "auto") -> tuple[Any, Any, dict]:
    """(model on ``device``, codec, meta) of a model the study trained; when missing, an error naming its notebook."""
    from .train import load_model, resolve_device

    path = Path(path)
    if not path.is_file():
        notebook = "03_indexing" if path.name == "zero_shot.pt" else "04_retrieval"
        raise FileNotFoundError(
            f"{path} does not exist: notebook {notebook} trains it; run "
            f"`vitdsi study --profile {profile} --start-at {notebook}`"
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
# The runner
# ------------------------------------------------------------------------------------------
def run_study(
    profile: str | dict[str, Any],
    *,
    notebooks: Iterable[str | Path] | None = None,
    start_at: str | None = None,
    out_root: str | Path | None = None,
    runs_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    kernel_name: str = "python3",
    progress: bool = True,
) -> pd.DataFrame:
    """Execute the study's notebooks with a profile's parameters; return wall times (notebook, seconds, status).

    ``profile`` is a bundled name, a YAML path or a dict of parameters; ``overrides`` replace
    single parameters. ``out_root`` defaults to ``reports/<profile>`` and ``runs_dir`` to
    ``data/runs/<profile>``. With ``start_at`` the notebooks before it are skipped (their
    outputs from an earlier run are used). Stops at the first failing notebook with StudyFailed.
    """
    params = dict(profile) if isinstance(profile, dict) else load_profile(profile)
    unknown = sorted(set(overrides or {}) - set(params))
    if unknown:  # most likely a typo, which would otherwise be ignored silently
        raise ValueError(f"overrides {unknown} name no parameter of the profile; it has {sorted(params)}")
    params.update(overrides or {})
    name = str(params.get("PROFILE", "custom"))
    out = Path(out_root) if out_root is not None else settings.reports_dir() / name
    runs = Path(runs_dir) if runs_dir is not None else settings.data_dir() / "runs" / name
    params.update(OUT_DIR=str(out.resolve()), RUNS_DIR=str(runs.resolve()))

    paths = [_resolve_notebook(n) for n in notebooks] if notebooks is not None else study_notebooks()
    first = _start_index(paths, start_at) if start_at else 0
    timings = _earlier_timings(out, paths[:first])
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    _say(progress, f"study '{name}': {len(paths) - first} notebook(s) -> {out}")
    study_start = time.perf_counter()
    for i, path in enumerate(paths[first:], start=first + 1):
        _say(progress, f"[{i}/{len(paths)}] {path.stem} ...")
        try:
            seconds = execute_notebook(path, out / "notebooks" / path.name, params,
                                       kernel_name=kernel_name, progress=progress)
        except StudyFailed as error:
            _say(progress, f"[{i}/{len(paths)}] {path.stem} FAILED\n{error}")
            _write_timings(out, timings + [{"notebook": path.stem, "seconds": float("nan"), "status": "failed"}])
            raise
        timings.append({"notebook": path.stem, "seconds": seconds, "status": "ok"})
        _say(progress, f"[{i}/{len(paths)}] {path.stem} done in {seconds:.1f} s")
    frame = _write_timings(out, timings)
    write_readme(out, params, frame)
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


def _relative(path: Any) -> str:
    """``path`` relative to the project root when it lies inside it (reports are committed)."""
    from .settings import project_root

    try:
        return str(Path(path).resolve().relative_to(project_root()))
    except (ValueError, TypeError):
        return str(path)


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


def write_readme(out: Path, params: dict[str, Any], timings: pd.DataFrame) -> Path:
    """Write ``<out>/README.md``: parameters, wall times, machine, Table 1 and the figures."""
    from .environment import describe_machine

    name = params.get("PROFILE", "custom")
    shown = {k: v for k, v in params.items() if k not in RUNNER_PARAMETERS}
    total = float(timings["seconds"].sum())  # NaN (a failed or never-timed notebook) counts as 0
    lines = [
        f"# The vitdsi study, profile `{name}`",
        "",
        f"Generated by `vitdsi study --profile {name}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
        "Executed notebooks are in [`notebooks/`](notebooks/), tables (CSV + Markdown) in "
        "[`tables/`](tables/), figures in [`figures/`](figures/). "
        f"Trained models: `{_relative(params.get('RUNS_DIR', ''))}`.",
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
