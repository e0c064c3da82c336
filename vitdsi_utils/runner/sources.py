"""The notebooks' sources: py:percent files, paired by jupytext with the ``.ipynb`` that JupyterLab edits.

A study notebook ``notebooks/NN_name.py`` is its own source, in jupytext's py:percent format
(``# %%`` cells, ``# %% tags=["parameters"]`` for papermill's parameters cell).
``notebooks/jupytext.toml`` pairs it with ``NN_name.ipynb`` (git-ignored): JupyterLab's jupytext
extension opens either file as a notebook and saves both. The runner executes the ``.py``:

- :func:`sync_from_twin` first takes over an edit made in the ``.ipynb`` without jupytext
  (the ``.ipynb`` is newer and holds other cells), with ``jupytext --sync``, so it is never lost;
- :func:`read_notebook` reads the source into an nbformat notebook with the kernel the runner
  uses, whatever kernel a notebook saved in JupyterLab names (``make lab`` names "vitdsi").

A lone ``.ipynb`` (no ``.py`` beside it) passed to the runner by path is its own source.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from typing import Any

#: The text format of the notebooks' sources.
SOURCE_FORMAT = "py:percent"


class SourceSyncError(RuntimeError):
    """A paired ``.ipynb`` holds an edit that could not be synced into its ``.py`` source."""


def source_of(path: str | Path) -> Path:
    """The source of a notebook: ``NN_name.py`` when it exists beside ``path``, else ``path`` itself."""
    path = Path(path)
    text = path.with_suffix(".py")
    return text if path.suffix in (".ipynb", ".py") and text.is_file() else path


def twin_of(source: Path) -> Path:
    """The ``.ipynb`` that jupytext pairs with a ``.py`` source (it may not exist)."""
    return Path(source).with_suffix(".ipynb")


def orphan_twins(folder: Path) -> list[Path]:
    """``NN_*.ipynb`` in ``folder`` without a ``NN_*.py`` source: left over from a renamed or deleted notebook."""
    return sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb") if not p.with_suffix(".py").is_file())


def _read_raw(path: Path) -> Any:
    """The notebook at ``path`` as it is stored: a py:percent source or an ``.ipynb``."""
    import jupytext
    import nbformat

    path = Path(path)
    if path.suffix == ".py":
        return jupytext.read(path, fmt=SOURCE_FORMAT)
    return nbformat.read(str(path), as_version=4)


def cell_inputs(notebook: Any) -> list[tuple[str, str, list[str]]]:
    """What a notebook runs: each cell's type, source and tags (no outputs, ids or editor state)."""
    return [(cell.cell_type, cell.source, list(cell.get("metadata", {}).get("tags", []))) for cell in notebook.cells]


def kernelspec(kernel_name: str) -> dict[str, str]:
    """The ``kernelspec`` metadata of ``kernel_name`` (a Python kernel named so when it is not installed)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:  # papermill says so when it starts the kernel
        return {"name": kernel_name, "display_name": kernel_name, "language": "python"}
    return {"name": kernel_name, "display_name": spec.display_name, "language": spec.language}


def read_notebook(path: str | Path, *, kernel_name: str = "python3") -> Any:
    """The notebook ``path`` (a py:percent source or a lone ``.ipynb``) as papermill should run it.

    The kernelspec is ``kernel_name``'s, whatever the file names (a notebook saved from
    ``make lab`` names "vitdsi", which CI does not have); jupytext's own metadata is dropped;
    cells get fixed ids (``01-00``, ``01-01``, ...) and no outputs, so executing an unchanged
    source twice gives the same cells.
    """
    path = Path(path)
    notebook = _read_raw(path)
    notebook.metadata.pop("jupytext", None)
    notebook.metadata["kernelspec"] = kernelspec(kernel_name)
    notebook.metadata.setdefault("language_info", {"name": notebook.metadata["kernelspec"]["language"]})
    notebook.nbformat, notebook.nbformat_minor = 4, max(int(notebook.get("nbformat_minor", 5)), 5)
    prefix = re.sub(r"[^A-Za-z0-9_-]", "", path.stem[:2]) or "cell"
    for i, cell in enumerate(notebook.cells):
        cell.id = f"{prefix}-{i:02d}"
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return notebook


def sync_from_twin(source: Path) -> bool:
    """Take over an edit of the paired ``.ipynb`` into the ``.py`` source; return whether there was one.

    There is one when the ``.ipynb`` is newer than the ``.py`` and runs other cells (it was
    saved without jupytext, or the ``.py`` was not written). ``jupytext --sync`` then writes
    the ``.py`` from the ``.ipynb``, as JupyterLab would have. Nothing is written otherwise: a
    ``.py`` newer than its ``.ipynb`` is the source as it stands (JupyterLab reads it the next
    time it opens the notebook). Raises SourceSyncError when jupytext does not sync the pair
    (no ``jupytext.toml`` pairs them), naming the ways out.
    """
    source = Path(source)
    twin = twin_of(source)
    if source.suffix != ".py" or not twin.is_file() or twin.stat().st_mtime <= source.stat().st_mtime:
        return False
    if cell_inputs(_read_raw(twin)) == cell_inputs(_read_raw(source)):
        return False  # saved later, but with the same cells (outputs, kernel): nothing to take over
    from jupytext.cli import jupytext as jupytext_cli

    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):
            jupytext_cli(["--sync", "--quiet", str(twin)])
    except (Exception, SystemExit) as error:
        raise SourceSyncError(f"jupytext could not sync {twin} into {source.name}: {error}") from error
    if cell_inputs(_read_raw(twin)) != cell_inputs(_read_raw(source)):
        said = " ".join(messages.getvalue().split())
        raise SourceSyncError(
            f"{twin} is newer than its source {source.name} and holds other cells, but jupytext did not sync "
            f"them{f' ({said})' if said else ''}: no jupytext.toml pairs ipynb with py:percent in {source.parent}. "
            f"Keep the edit with `jupytext --sync --set-formats ipynb,py:percent {twin}`, "
            f"or delete {twin.name} to run {source.name} as it is"
        )
    if twin.stat().st_mtime > source.stat().st_mtime:  # saved by a clock ahead of this one: else the next edit
        os.utime(twin, (source.stat().st_atime, source.stat().st_mtime))  # of the .py would count as older
    return True
