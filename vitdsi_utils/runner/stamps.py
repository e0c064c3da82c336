"""Stamps: what a notebook's run depended on, so a rerun skips what is up to date and says why the rest is stale."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vitdsi_utils.atomic import write_json
from vitdsi_utils.runner.profiles import notebook_parameters
from vitdsi_utils.runner.sources import cell_inputs, read_notebook

# ------------------------------------------------------------------------------------------
# Up-to-date checks: one stamp per notebook that finished
# ------------------------------------------------------------------------------------------
#: Bump when the stamp's content changes meaning: every older stamp then counts as stale.
STAMP_VERSION = 2  # 2: notebooks run from their py:percent sources, whose cells and tags are hashed


#: The package whose source every notebook runs (``vitdsi_utils``); its ``*.py`` files are hashed.
PACKAGE_DIR = Path(__file__).resolve().parents[1]


#: Files in OUT_DIR that the runner writes itself; they are nobody's product.
RUNNER_FILES = ("notebooks", "stamps", "timings.csv", "README.md")


def stamps_dir(out: Path) -> Path:
    """Where the stamps of a report go: ``<out>/stamps/``."""
    return Path(out) / "stamps"


def stamp_path(out: Path, notebook: Path) -> Path:
    """The stamp of ``notebook`` in the report ``out``: ``<out>/stamps/<stem>.json``."""
    return stamps_dir(out) / f"{Path(notebook).stem}.json"


def executed_path(out: Path, notebook: Path) -> Path:
    """The executed copy of ``notebook`` (``NN_name.py`` or ``.ipynb``) in the report ``out``: ``<out>/notebooks/NN_name.ipynb``."""
    return Path(out) / "notebooks" / f"{Path(notebook).stem}.ipynb"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str | None:
    """The SHA-256 of a file's bytes, or None when it does not exist."""
    try:
        return _sha256(Path(path).read_bytes())
    except FileNotFoundError:
        return None


def notebook_source_hash(path: Path) -> str:
    """A hash of what running ``path`` depends on: the cells of its source (type, source and tags).

    ``path`` is what the runner executes: a py:percent source (or a lone ``.ipynb``). Outputs,
    execution counts, the kernel a notebook names and editor metadata are left out, so opening,
    running and saving the notebook in JupyterLab does not make it stale; changing a cell does.
    The kernel the runner uses is an input of its own (``kernel_name``).
    """
    content = {"cells": cell_inputs(read_notebook(path))}
    return _sha256(json.dumps(content, sort_keys=True).encode())


def package_hashes(package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """SHA-256 of every ``*.py`` file of the package, keyed by its path from the package's parent."""
    package_dir = Path(package_dir)
    return {
        str(p.relative_to(package_dir.parent)): _sha256(p.read_bytes())
        for p in sorted(package_dir.rglob("*.py"))
        if "__pycache__" not in p.parts
    }


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
    executed = executed_path(out, path)
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
    missing = [
        f"{root}/{rel}"
        for root, files in stamp.get("products", {}).items()
        for rel in files
        if not (roots[root] / rel).exists()
    ]
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
        "executed_sha256": _file_sha256(executed_path(out, path)),
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
