"""The study as a sequence of notebooks: profiles of parameters, and a runner that executes them.

A *profile* (``vitdsi_utils/profiles/<name>.yaml``) holds the study's knobs as UPPER_CASE
keys: dataset, image size, database sizes N, ID schemes, seeds, model and training settings.
:func:`run_study` executes the notebooks ``notebooks/NN_*.py`` (py:percent sources, see
:mod:`vitdsi_utils.runner.sources`) in order with papermill, handing every
notebook the profile keys it declares in its ``parameters`` cell, plus ``OUT_DIR`` (where
tables and figures go) and ``RUNS_DIR`` (where trained models go, so later notebooks load
what earlier ones trained). Outputs::

    <out>/notebooks/NN_*.ipynb   executed copies
    <out>/tables/*.csv, *.md     result tables (Table 1 in table1.md)
    <out>/figures/*.png          Figures 1-3 and the others
    <out>/timings.csv            wall time per notebook
    <out>/README.md              parameters, timings, machine, Table 1 and the figures
    <out>/stamps/NN_*.json       one per notebook that finished: what its run depended on

A paired ``notebooks/NN_*.ipynb`` edited in JupyterLab without jupytext (newer than its
``.py``, other cells) is first synced into the ``.py`` by jupytext, and the runner says so.

A rerun skips every notebook whose stamp still matches (same notebook source, parameters,
package source and upstream stamps, executed copy and written files still there) and starts
at the first one that does not; see :func:`stale_reasons`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from vitdsi_utils import settings
from vitdsi_utils.runner.dry_run import make_dry_run
from vitdsi_utils.runner.profiles import DATASET_PARAMETERS, load_profile, notebook_parameters, resolve_dataset
from vitdsi_utils.runner.report import TIMING_COLUMNS, earlier_timings, write_readme, write_timings
from vitdsi_utils.runner.sources import SourceSyncError, orphan_twins, read_notebook, source_of, sync_from_twin, twin_of
from vitdsi_utils.runner.stamps import (
    _products,
    _snapshot,
    _stamp_seconds,
    executed_path,
    notebook_inputs,
    stale_reasons,
    stamp_path,
    write_stamp,
)


class StudyFailed(RuntimeError):
    """A notebook of the study raised; the message names the notebook, the cell and the error."""


# ------------------------------------------------------------------------------------------
# Notebooks
# ------------------------------------------------------------------------------------------
def notebooks_dir() -> Path:
    """The folder of the study's notebooks (``<repository>/notebooks``)."""
    return settings.project_root() / "notebooks"


def study_notebooks(folder: Path | None = None) -> list[Path]:
    """The study's notebooks, their py:percent sources ``NN_*.py``, in execution (sorted) order."""
    folder = folder or notebooks_dir()
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.py"))
    if not found:
        raise FileNotFoundError(f"no notebooks NN_*.py in {folder}; is this a checkout of the project?")
    return found


def _resolve_notebook(name: str | Path) -> Path:
    """A notebook's source from a path, a file name or a stem ('03_indexing').

    A path to an ``.ipynb`` with a ``.py`` beside it gives the ``.py``; a lone ``.ipynb`` is its own source.
    """
    path = Path(name)
    if path.suffix in (".py", ".ipynb") and path.is_file():
        return source_of(path)
    candidate = notebooks_dir() / f"{path.stem if path.suffix in ('.py', '.ipynb') else path.name}.py"
    if not candidate.is_file():
        raise FileNotFoundError(f"no notebook {name!r}; the study has {[p.stem for p in study_notebooks()]}")
    return candidate


def sync_sources(paths: list[Path], *, say=print) -> list[Path]:
    """Sync into each ``.py`` source an edit made in its paired ``.ipynb`` (see ``sync_from_twin``); return the synced.

    Raises StudyFailed when an edit cannot be synced, before any notebook runs.
    """
    synced = []
    for path in paths:
        try:
            if sync_from_twin(path):
                synced.append(path)
                say(
                    f"{twin_of(path).name} was edited after {path.name}: synced the edit into {path} "
                    "(jupytext --sync; `git diff` shows it)"
                )
        except SourceSyncError as error:
            raise StudyFailed(str(error)) from error
    return synced


def _matching(paths: list[Path], name: str) -> list[Path]:
    """The notebooks named by ``name``: a stem ('03_indexing'), a file name or a stem's start ('03')."""
    stem = Path(str(name)).stem
    exact = [p for p in paths if p.stem == stem]
    return exact or [p for p in paths if p.stem.startswith(stem)]


def select_notebooks(paths: list[Path], names: Iterable[str] | None) -> tuple[list[Path], list[Path]]:
    """(the notebooks a profile runs, those it leaves out), both in study order.

    ``names`` is the profile's ``NOTEBOOKS``: None runs every notebook; a list names the ones to
    run by stem or number ('03', '03_indexing'). A name that matches no notebook, or several, is
    refused with the study's notebooks listed.
    """
    if names is None:
        return list(paths), []
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise ValueError(f"NOTEBOOKS must be a list of notebook names (or null for all), got {names!r}")
    names = list(names)
    if not names:
        raise ValueError("NOTEBOOKS lists no notebook; give null to run them all")
    chosen: set[Path] = set()
    for name in names:
        # YAML reads an unquoted 03 as the number 3
        found = _matching(paths, f"{name:02d}" if isinstance(name, int) and not isinstance(name, bool) else str(name))
        if len(found) != 1:
            what = "no notebook" if not found else f"{len(found)} notebooks"
            raise ValueError(f"NOTEBOOKS: {name!r} names {what}; the study has {[p.stem for p in paths]}")
        chosen.add(found[0])
    return [p for p in paths if p in chosen], [p for p in paths if p not in chosen]


def _start_index(paths: list[Path], start_at: str) -> int:
    """Position of the first notebook whose stem starts with ``start_at`` ('03' or '03_indexing')."""
    stem = Path(start_at).stem
    for i, path in enumerate(paths):
        if path.stem == stem or path.stem.startswith(stem):
            return i
    raise ValueError(f"--start-at {start_at!r} names no notebook; choose one of {[p.stem for p in paths]}")


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

    ``path`` is the notebook's source (py:percent, or a lone ``.ipynb``). It runs in
    ``kernel_name`` whatever kernel the source names, from ``path``'s folder; the source is only
    read. With ``progress`` the notebook's printed output is echoed live, so a cell that trains
    for minutes still shows one line per finished run.
    """
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    echo = _Indented() if progress else None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vitdsi-notebook-") as staging:
        # papermill reads .ipynb: the source, as it runs, goes to a scratch copy, never beside the source
        staged = Path(staging) / f"{path.stem}.ipynb"
        nbformat.write(read_notebook(path, kernel_name=kernel_name), str(staged))
        try:
            papermill.execute_notebook(
                str(staged),
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
        finally:
            _record_source(output, path, staged)
    return time.perf_counter() - start


def _record_source(output: Path, source: Path, staged: Path) -> None:
    """Name the notebook's source, not the scratch copy papermill read, as the executed copy's input."""
    import nbformat

    try:
        notebook = nbformat.read(str(output), as_version=4)
    except Exception:  # none, or cut short by an interruption: leave it as it is
        return
    if notebook.metadata.get("papermill", {}).get("input_path") != str(staged):
        return  # not written by this run (it stopped before papermill wrote anything)
    notebook.metadata.setdefault("papermill", {})["input_path"] = str(source)
    nbformat.write(notebook, str(output))


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
    dry_run: bool = False,
) -> pd.DataFrame:
    """Execute the study's notebooks with a profile's parameters; return wall times (notebook, seconds, status).

    ``profile`` is a bundled name, a YAML path or a dict of parameters; ``overrides`` replace
    single parameters. ``out_root`` defaults to ``reports/<profile>`` and ``runs_dir`` to
    ``data/runs/<profile>``; when ``overrides`` change the profile's data set (``DATASET``,
    ``DATASET_ROOT``, ``DATASET_ANNOTATIONS`` or ``DATASET_NAME``: e.g. ``coco``, or ``folder`` with
    its root), to ``reports/<profile>-<name>`` and ``data/runs/<profile>-<name>``, with ``<name>``
    the data set's name (``DATASET_NAME``, else a folder's own name, else the source), so the
    profile's own report is kept. The data set is checked before the first notebook runs
    (:func:`~vitdsi_utils.runner.profiles.resolve_dataset`).

    The notebooks run from their py:percent sources (``notebooks`` names sources, ``.ipynb``
    twins or stems), each in ``kernel_name`` whatever kernel it names; a paired ``.ipynb``
    edited after its ``.py`` is first synced into the ``.py`` (the runner prints so). The
    executed copies go to ``<out>/notebooks/NN_name.ipynb``; the sources are only read.

    A notebook whose executed copy is up to date (see :func:`stale_reasons`) is skipped, and
    the run starts at the first one that is not: a rerun after a failure or an interruption
    picks up where it stopped. Each notebook that finishes gets a stamp in ``<out>/stamps/``;
    a notebook about to run loses its stamp, and so do the ones after it, so a failure leaves
    only the notebooks before it stamped. Since a stamp records the stamps before it, a rerun
    notebook makes every later one stale. ``force`` reruns every notebook. With ``start_at``
    the notebooks before it are skipped unchecked (their outputs from an earlier run are used)
    and the named one and all after it run. Stops at the first failing notebook with StudyFailed.

    Status per notebook: ``ok`` (ran now), ``up to date`` (skipped; seconds of its last run),
    ``earlier run`` (before ``start_at``), ``failed`` or ``not in profile``. A profile's
    ``NOTEBOOKS`` (a list of names such as ``03`` or ``03_indexing``; null: all) picks the notebooks
    it runs; the others are listed as ``not in profile`` in timings.csv and the README, and a
    notebook that runs counts only the chosen ones before it as its upstream. ``notebooks``, when
    given, replaces that choice. When every notebook is up to date nothing runs and timings.csv and
    README.md are left as they are.

    ``dry_run`` runs the profile's grid with tiny epochs, model and budgets on scaled-down
    databases (:mod:`vitdsi_utils.runner.dry_run`), into ``reports/<profile>-dry-run`` and
    ``data/runs/<profile>-dry-run``; its README lists every parameter it changed.
    """
    params = dict(profile) if isinstance(profile, dict) else load_profile(profile)
    if "DATASET" in params:  # profiles written before these keys existed read their data as before
        for key in DATASET_PARAMETERS:
            params.setdefault(key, None)
    unknown = sorted(set(overrides or {}) - set(params))
    if unknown:  # most likely a typo, which would otherwise be ignored silently
        raise ValueError(f"overrides {unknown} name no parameter of the profile; it has {sorted(params)}")
    dataset_keys = ("DATASET", *DATASET_PARAMETERS)
    profile_dataset = {k: params.get(k) for k in dataset_keys}
    params.update(overrides or {})
    changed = [k for k in dataset_keys if params.get(k) != profile_dataset[k]]
    params = resolve_dataset(params)  # fails here, before any notebook, when the data cannot be read
    name = str(params.get("PROFILE", "custom"))
    command = f"vitdsi study --profile {name}" + (" --dry-run" if dry_run else "")
    folder = name
    if changed:  # another data set than the profile's: its own report and runs folders
        options = {
            "DATASET": "--dataset",
            "DATASET_ROOT": "--root",
            "DATASET_ANNOTATIONS": "--annotations",
            "DATASET_NAME": "--dataset-name",
        }
        shown = [k for k in dataset_keys if k in changed or (k == "DATASET" and changed)]
        command += "".join(f" {options[k]} {params[k]}" for k in shown if params.get(k) is not None)
        folder = f"{name}-{params['DATASET_NAME']}"
    dry_changes: list[str] = []
    if dry_run:  # its own folders, and a subset of the images linked in data/dry-run/
        folder = f"{name}-dry-run" + folder[len(name) :]
        params, dry_changes = make_dry_run(params)
        params = resolve_dataset(params)
    out = Path(out_root) if out_root is not None else settings.reports_dir() / folder
    runs = Path(runs_dir) if runs_dir is not None else settings.data_dir() / "runs" / folder
    params.update(OUT_DIR=str(out.resolve()), RUNS_DIR=str(runs.resolve()))

    if notebooks is not None:
        paths, left_out = [_resolve_notebook(n) for n in notebooks], []
    else:
        paths, left_out = select_notebooks(study_notebooks(), params.get("NOTEBOOKS"))
    first = _start_index(paths, start_at) if start_at else 0
    _say(progress, f"study '{name}'{' (dry run)' if dry_run else ''}: {len(paths) - first} notebook(s) -> {out}")
    if left_out:
        _say(progress, f"not in the profile (NOTEBOOKS), not run: {', '.join(p.stem for p in left_out)}")
    if dry_run:
        _say(progress, "dry run: " + "; ".join(dry_changes))
    if notebooks is None:
        for orphan in orphan_twins(notebooks_dir()):
            _say(
                progress,
                f"note: {orphan} has no source {orphan.stem}.py, so it is not part of the study "
                "(left over from a renamed notebook? delete it, or `jupytext --sync` it to make it one)",
            )
    try:  # an edit made in JupyterLab reaches the source before anything is hashed or run
        sync_sources(paths)
    except StudyFailed as error:
        _say(progress, f"study '{name}' stopped before running any notebook:\n{error}")
        raise
    timings = earlier_timings(out, paths[:first])
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
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
            seconds = execute_notebook(
                path, executed_path(out, path), params, kernel_name=kernel_name, progress=progress
            )
        except StudyFailed as error:
            _say(progress, f"{label} FAILED\n{error}")
            failed = {"notebook": path.stem, "seconds": float("nan"), "status": "failed"}
            write_timings(out, _in_study_order(timings + [failed], left_out))
            raise
        write_stamp(out, path, inputs, seconds=seconds, products=_products(before, _snapshot(out, runs)))
        timings.append({"notebook": path.stem, "seconds": seconds, "status": "ok"})
        _say(progress, f"{label} done in {seconds:.1f} s")
    timings = _in_study_order(timings, left_out)
    frame = pd.DataFrame(timings, columns=list(TIMING_COLUMNS))
    if not ran:
        _say(
            progress,
            f"study '{name}': every notebook is up to date, nothing ran (--force reruns them); "
            f"report: {out / 'README.md'}",
        )
        return frame
    frame = write_timings(out, timings)
    note = None
    if dry_run:
        note = (
            "**Dry run**: the profile's grid with tiny epochs, model and budgets on scaled-down databases "
            "(`vitdsi_utils/runner/dry_run.py`); its numbers mean nothing. Changed from the profile:\n\n"
            + "\n".join(f"- {change}" for change in dry_changes)
        )
    write_readme(out, params, frame, command=command, note=note)
    _say(progress, f"study '{name}' done in {time.perf_counter() - study_start:.1f} s; report: {out / 'README.md'}")
    return frame


def _in_study_order(timings: list[dict], left_out: list[Path]) -> list[dict]:
    """``timings`` with a ``not in profile`` row for each notebook the profile leaves out, all in study order."""
    if not left_out:
        return timings
    rows = timings + [{"notebook": p.stem, "seconds": float("nan"), "status": "not in profile"} for p in left_out]
    return sorted(rows, key=lambda row: row["notebook"])


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)
