"""The notebooks are their own source: py:percent files, paired by jupytext with the .ipynb that JupyterLab edits.

What is checked: every study notebook is a canonical py:percent file with one ``parameters``
cell; an edit made in the paired .ipynb reaches the .py and the run; a notebook saved under
``make lab``'s kernel ("vitdsi") runs where that kernel is not installed; the runner never
writes over a source.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbformat.v4 import new_code_cell, new_notebook

from vitdsi_utils.runner.profiles import RUNNER_PARAMETERS, known_profiles, load_profile, notebook_parameters
from vitdsi_utils.runner.run import StudyFailed, notebooks_dir, run_study, study_notebooks
from vitdsi_utils.runner.sources import cell_inputs, orphan_twins, read_notebook, sync_from_twin
from vitdsi_utils.runner.stamps import notebook_source_hash

ROOT = Path(__file__).resolve().parents[1]
#: The kernelspec a notebook saved from `make lab` carries (see the Makefile's `lab` target).
LAB_KERNEL = {"name": "vitdsi", "display_name": "vitdsi (.venv)", "language": "python"}


def parameters_cells(notebook) -> list:
    return [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]


# ------------------------------------------------------------------------------------------
# The committed sources (no kernel)
# ------------------------------------------------------------------------------------------
def test_every_notebook_source_is_canonical_py_percent_with_one_parameters_cell():
    config = jupytext.config.load_jupytext_config(str(notebooks_dir() / "01_data.py"))
    assert config is not None and config.formats == ["ipynb,py:percent"], "notebooks/jupytext.toml pairs them"
    sources = study_notebooks()
    assert [p.stem[:2] for p in sources] == [f"{i:02d}" for i in range(1, len(sources) + 1)]
    for path in sources:
        text = path.read_text()
        assert text.startswith("# %%"), f"{path.name}: no header (no kernel pinned), cells from the first line"
        notebook = jupytext.read(path, fmt="py:percent")
        # what JupyterLab writes when it saves the notebook: the file is already in that form
        assert jupytext.writes(notebook, fmt="py:percent", config=config) == text, f"{path.name} is not canonical"
        assert "kernelspec" not in notebook.metadata, path.name
        first_code = next(c for c in notebook.cells if c.cell_type == "code")
        assert parameters_cells(notebook) == [first_code], f"{path.name}: one parameters cell, the first code cell"
        assert {"PROFILE", "OUT_DIR"} <= set(notebook_parameters(path, {"PROFILE": 1, "OUT_DIR": 2})), path.name


def test_every_declared_parameter_comes_from_the_profiles_or_the_runner():
    """A parameter no profile has would keep the notebook's default in every run (a typo, most likely)."""
    import papermill

    keys = set.intersection(*(set(load_profile(name)) for name in known_profiles())) | set(RUNNER_PARAMETERS)
    for path in study_notebooks():
        declared = set(papermill.inspect_notebook(read_notebook(path)))
        assert declared and declared <= keys, f"{path.name} declares {sorted(declared - keys)}, which no profile has"


def test_the_ipynb_twins_are_not_committed():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "notebooks"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert not [f for f in tracked.stdout.split() if f.endswith(".ipynb")]
    ignored = subprocess.run(["git", "check-ignore", "-q", "notebooks/01_data.ipynb"], cwd=ROOT)
    assert ignored.returncode == 0, "notebooks/*.ipynb must be git-ignored: jupytext writes them"


def test_an_ipynb_without_source_is_named_but_not_run(tmp_path):
    (tmp_path / "01_kept.py").write_text('# %% tags=["parameters"]\nPROFILE = "x"\n')
    shutil.copy(tmp_path / "01_kept.py", tmp_path / "02_gone.ipynb")  # any content: only the name matters
    assert study_notebooks(tmp_path) == [tmp_path / "01_kept.py"]
    assert orphan_twins(tmp_path) == [tmp_path / "02_gone.ipynb"]


def test_the_demo_gets_an_ipynb_written_from_the_source(tmp_path):
    spec = importlib.util.spec_from_file_location("demo_screenshot", ROOT / "scripts" / "demo_screenshot.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up while the class is built
    spec.loader.exec_module(script)
    before = sorted(notebooks_dir().iterdir())
    params = script.demo_parameters("smoke", tmp_path / "runs", tmp_path / "out")
    path = script.write_demo_notebook(params, tmp_path)
    assert sorted(notebooks_dir().iterdir()) == before  # nothing written beside the sources
    assert path == tmp_path / "06_demo.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    injected = [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and str((tmp_path / "runs").resolve()) in injected[0].source


# ------------------------------------------------------------------------------------------
# A folder of tiny notebooks paired like notebooks/
# ------------------------------------------------------------------------------------------
CELL = "from pathlib import Path\nPath(OUT_DIR, NAME + '.txt').write_text(MESSAGE)"


def paired_folder(root: Path) -> Path:
    """A notebooks folder with the study's jupytext.toml and one source: a parameters cell and one cell."""
    folder = root / "notebooks"
    folder.mkdir()
    shutil.copy(notebooks_dir() / "jupytext.toml", folder / "jupytext.toml")
    (folder / "01_tiny.py").write_text(
        f'# %% tags=["parameters"]\nNAME = "tiny"\nMESSAGE = "as committed"\nOUT_DIR = None\n\n# %%\n{CELL}\n'
    )
    return folder


def save_in_lab(twin: Path, source: Path, edit: callable) -> None:
    """The paired .ipynb as JupyterLab saves it after ``edit``, without jupytext: newer than the .py, kernel "vitdsi"."""
    notebook = read_notebook(source)
    notebook.metadata["kernelspec"] = dict(LAB_KERNEL)
    edit(notebook)
    nbformat.write(notebook, twin)
    os.utime(source, (twin.stat().st_mtime - 10,) * 2)  # the .py was written before


def test_an_unpaired_newer_ipynb_stops_the_runner_before_anything_runs(tmp_path):
    folder = paired_folder(tmp_path)
    (folder / "jupytext.toml").unlink()  # nothing pairs the two files: jupytext will not sync them
    source, twin = folder / "01_tiny.py", folder / "01_tiny.ipynb"
    save_in_lab(twin, source, lambda nb: nb.cells.append(new_code_cell("x = 1")))
    before = source.read_text()
    with pytest.raises(StudyFailed, match="jupytext did not sync"):
        run_study({"PROFILE": "custom"}, notebooks=[source], out_root=tmp_path / "report", progress=False)
    assert source.read_text() == before and not (tmp_path / "report" / "notebooks" / "01_tiny.ipynb").exists()


@pytest.mark.notebook
def test_an_edit_in_jupyterlab_reaches_the_source_and_the_executed_copy(tmp_path, capsys):
    folder = paired_folder(tmp_path)
    source, twin = folder / "01_tiny.py", folder / "01_tiny.ipynb"
    out = tmp_path / "report"

    def run(**kwargs):
        return run_study({"PROFILE": "custom"}, notebooks=[source], out_root=out, **kwargs)["status"].tolist()

    def edit(notebook):  # a new default, a changed cell and a new cell
        notebook.cells[0].source = notebook.cells[0].source.replace("as committed", "edited in lab")
        notebook.cells[1].source += "\nprint('the edit ran')"
        notebook.cells.append(new_code_cell("Path(OUT_DIR, 'new_cell.txt').write_text('new cell')"))

    save_in_lab(twin, source, edit)
    hash_before = notebook_source_hash(source)
    assert run() == ["ok"]
    printed = capsys.readouterr().out
    assert "01_tiny.ipynb was edited after 01_tiny.py: synced the edit into" in printed

    # the source holds the edit, in py:percent with its parameters tag and no kernel
    text = source.read_text()
    assert "print('the edit ran')" in text and "new_cell.txt" in text and 'MESSAGE = "edited in lab"' in text
    assert text.startswith('# %% tags=["parameters"]') and "vitdsi" not in text
    assert notebook_source_hash(source) != hash_before
    # the executed copy ran the edit; the profile did not set MESSAGE, so the edited default was used
    executed = nbformat.read(out / "notebooks" / "01_tiny.ipynb", as_version=4)
    assert "print('the edit ran')" in executed.cells[-2].source  # after papermill's injected cell
    assert any("the edit ran" in o.get("text", "") for o in executed.cells[-2].outputs)
    assert (out / "tiny.txt").read_text() == "edited in lab" and (out / "new_cell.txt").exists()
    assert executed.metadata["papermill"]["input_path"] == str(source)

    # the runner wrote no generated content over either source file
    assert cell_inputs(nbformat.read(twin, as_version=4)) == cell_inputs(jupytext.read(source))
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nbformat.read(twin, as_version=4).cells)
    assert set(p.name for p in folder.iterdir()) == {"jupytext.toml", "01_tiny.py", "01_tiny.ipynb"}

    # nothing more to sync: the next run is up to date; an edit of the .py itself makes it stale
    assert run(progress=False) == ["up to date"] and "synced" not in capsys.readouterr().out
    source.write_text(source.read_text().replace("edited in lab", "edited in the .py"))
    assert sync_from_twin(source) is False  # the .py is newer: it is the source as it stands
    assert run() == ["ok"] and "01_tiny.py was edited" in capsys.readouterr().out
    assert (out / "tiny.txt").read_text() == "edited in the .py"


@pytest.mark.notebook
def test_a_notebook_saved_under_the_lab_kernel_runs_where_that_kernel_is_missing(tmp_path, monkeypatch):
    # CI has no "vitdsi" kernel; on a machine where `make lab` installed it, hide it from this process
    lookup = KernelSpecManager.get_kernel_spec

    def without_lab_kernel(self, kernel_name, *args, **kwargs):
        if kernel_name == LAB_KERNEL["name"]:
            raise NoSuchKernel(kernel_name)
        return lookup(self, kernel_name, *args, **kwargs)

    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", without_lab_kernel)
    folder = paired_folder(tmp_path)
    source, twin = folder / "01_tiny.py", folder / "01_tiny.ipynb"
    # the paired copy as `make lab` saves it: its metadata names the "vitdsi (.venv)" kernel
    save_in_lab(twin, source, lambda nb: nb.cells.append(new_code_cell("print('saved in lab')")))
    # a lone notebook saved from `make lab` (no .py beside it), passed by path
    lone = new_notebook(
        cells=[nbformat.read(twin, as_version=4).cells[0], new_code_cell(CELL.replace("NAME", "'lone'"))]
    )
    lone.cells[0].id = "lone-params"
    lone.metadata["kernelspec"] = dict(LAB_KERNEL)
    nbformat.write(lone, folder / "02_lone.ipynb")

    import papermill

    with pytest.raises(NoSuchKernel):  # what papermill alone makes of such a notebook
        papermill.execute_notebook(str(folder / "02_lone.ipynb"), str(tmp_path / "plain.ipynb"), progress_bar=False)

    out = tmp_path / "report"
    timings = run_study({"PROFILE": "custom"}, notebooks=[twin, folder / "02_lone.ipynb"], out_root=out, progress=False)
    assert timings["status"].tolist() == ["ok", "ok"]
    assert "vitdsi" not in source.read_text()  # the .py pins no kernel
    for name in ("01_tiny", "02_lone"):
        executed = nbformat.read(out / "notebooks" / f"{name}.ipynb", as_version=4)
        assert executed.metadata["kernelspec"]["name"] == "python3", name
    assert (out / "tiny.txt").exists() and (out / "lone.txt").exists()
    assert nbformat.read(folder / "02_lone.ipynb", as_version=4).metadata["kernelspec"] == LAB_KERNEL  # only read


def test_every_study_notebook_is_a_story_over_its_studys_run():
    """Parameters, spec, ``run(spec, paths)``, then showing what it returned: no function, class or training loop
    copied from the package, and at most about 80 code lines (the demo, notebook 06, builds a widget instead)."""
    for path in study_notebooks():
        notebook = jupytext.read(path, fmt="py:percent")
        code = [c for c in notebook.cells if c.cell_type == "code"]
        lines = [
            line
            for cell in code
            for line in cell.source.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        assert len(lines) <= 80, f"{path.name}: {len(lines)} code lines"
        body = "\n".join(cell.source for cell in code[1:])  # the parameters cell aside
        assert not re.search(r"^\s*(def|class|while)\b", body, flags=re.M), f"{path.name} defines or loops"
        if path.stem == "06_demo":
            continue
        assert "notebook_spec(" in body and re.search(r"\b\w+\.run\(spec, paths\)", body), path.name
