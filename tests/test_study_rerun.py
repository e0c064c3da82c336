"""The runner's up-to-date checks: stamps, what makes a notebook stale, and reruns that skip finished work."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_output

from vitdsi_utils import cli
from vitdsi_utils.runner.run import run_study, sync_sources
from vitdsi_utils.runner.sources import read_notebook
from vitdsi_utils.runner.stamps import (
    PACKAGE_DIR,
    executed_path,
    notebook_inputs,
    stale_reasons,
    stamp_path,
    write_stamp,
)

PARAMETERS = 'PROFILE = "x"\nLR = 0.1\nOUT_DIR = None\nRUNS_DIR = None'


def write_notebook(path: Path, *cells: str) -> Path:
    """A py:percent notebook source: a tagged parameters cell declaring PROFILE, LR, OUT_DIR and RUNS_DIR, then ``cells``."""
    path.write_text(f'# %% tags=["parameters"]\n{PARAMETERS}\n' + "".join(f"\n# %%\n{cell}\n" for cell in cells))
    return path


# ------------------------------------------------------------------------------------------
# Staleness of one stamped notebook (no kernel: the run is faked by writing its outputs)
# ------------------------------------------------------------------------------------------
class Stamped:
    """Two notebooks 'a' -> 'b' of a series, both stamped as if they had just run."""

    def __init__(self, root: Path):
        self.root = root
        self.out, self.runs = root / "report", root / "runs"
        self.package = root / "pkg" / "vitdsi_utils"
        shutil.copytree(PACKAGE_DIR, self.package, ignore=shutil.ignore_patterns("__pycache__"))
        self.params = {"PROFILE": "x", "LR": 0.1, "SIZE": 32, "OUT_DIR": str(self.out), "RUNS_DIR": str(self.runs)}
        self.a = write_notebook(root / "01_a.py", "print(1)")
        self.b = write_notebook(root / "02_b.py", "print(2)")
        for path in (self.a, self.b):
            self.fake_run(path)

    def inputs(self, path: Path) -> dict:
        upstream = [self.a] if path == self.b else []
        return notebook_inputs(path, self.params, upstream, self.out, kernel_name="python3", package_dir=self.package)

    def fake_run(self, path: Path) -> None:
        """What a successful run leaves: the executed copy, a model in RUNS_DIR, the stamp."""
        (self.out / "notebooks").mkdir(parents=True, exist_ok=True)
        nbformat.write(read_notebook(path), executed_path(self.out, path))
        (self.runs / path.stem).mkdir(parents=True, exist_ok=True)
        (self.runs / path.stem / "model.pt").write_bytes(b"weights")
        write_stamp(
            self.out,
            path,
            self.inputs(path),
            seconds=1.5,
            products={"OUT_DIR": [], "RUNS_DIR": [f"{path.stem}/model.pt"]},
        )

    def reasons(self, path: Path) -> list[str]:
        return stale_reasons(path, self.out, self.inputs(path), self.runs)


@pytest.fixture
def stamped(tmp_path) -> Stamped:
    return Stamped(tmp_path)


def test_a_notebook_just_stamped_is_up_to_date(stamped):
    assert stamped.reasons(stamped.a) == [] and stamped.reasons(stamped.b) == []
    stamp = json.loads(stamp_path(stamped.out, stamped.b).read_text())
    assert stamp["parameters"] == {
        "PROFILE": "x",
        "LR": 0.1,
        "OUT_DIR": str(stamped.out),
        "RUNS_DIR": str(stamped.runs),
    }  # only what the notebook declares
    assert stamp["upstream"][0][0] == "01_a" and stamp["seconds"] == 1.5


def edit_cell(s: Stamped) -> None:
    s.a.write_text(s.a.read_text().replace("print(1)", "print(10)"))


def edit_tags(s: Stamped) -> None:
    s.a.write_text(s.a.read_text().replace("# %%\nprint(1)", '# %% tags=["skip-execution"]\nprint(1)'))


def change_declared_parameter(s: Stamped) -> None:
    s.params["LR"] = 0.2


def edit_package(s: Stamped) -> None:
    path = s.package / "metrics.py"
    path.write_text(path.read_text() + "\n# changed\n")


def add_package_module(s: Stamped) -> None:
    (s.package / "new_module.py").write_text("X = 1\n")


def delete_executed_copy(s: Stamped) -> None:
    executed_path(s.out, s.a).unlink()


def change_executed_copy(s: Stamped) -> None:
    copy = executed_path(s.out, s.a)
    copy.write_text(copy.read_text().replace("print(1)", "print(99)"))


def delete_product(s: Stamped) -> None:
    (s.runs / "01_a" / "model.pt").unlink()


def delete_stamp(s: Stamped) -> None:
    stamp_path(s.out, s.a).unlink()


def corrupt_stamp(s: Stamped) -> None:
    stamp_path(s.out, s.a).write_text("{not json")


@pytest.mark.parametrize(
    "change, reason",
    [
        (edit_cell, "01_a.py was edited"),
        (edit_tags, "01_a.py was edited"),
        (change_declared_parameter, "parameter LR: 0.1 -> 0.2"),
        (edit_package, "package source changed: vitdsi_utils/metrics.py"),
        (add_package_module, "package source changed: vitdsi_utils/new_module.py"),
        (delete_executed_copy, "executed copy"),
        (change_executed_copy, "changed after its run"),
        (delete_product, "files it wrote are missing: RUNS_DIR/01_a/model.pt"),
        (delete_stamp, "no stamp"),
        (corrupt_stamp, "unreadable"),
    ],
)
def test_what_makes_a_notebook_stale(stamped, change, reason):
    change(stamped)
    reasons = stamped.reasons(stamped.a)
    assert any(reason in r for r in reasons), reasons


def test_a_rerun_or_missing_upstream_stamp_makes_the_next_notebook_stale(stamped):
    stamped.fake_run(stamped.a)  # same inputs, but a new run: its stamp differs
    assert stamped.reasons(stamped.a) == []
    assert stamped.reasons(stamped.b) == ["upstream 01_a ran again after it"]
    stamp_path(stamped.out, stamped.a).unlink()
    assert stamped.reasons(stamped.b) == ["upstream 01_a has no stamp (it failed or has not run)"]


def test_outputs_kernel_and_undeclared_parameters_do_not_make_a_notebook_stale(stamped):
    (stamped.root / "jupytext.toml").write_text('formats = "ipynb,py:percent"\n')
    twin = stamped.a.with_suffix(".ipynb")  # the paired copy, as after running 01_a in `make lab` and saving
    notebook = read_notebook(stamped.a)
    notebook.cells[1].outputs = [new_output("stream", name="stdout", text="1\n")]
    notebook.cells[1].execution_count = 3
    notebook.metadata["kernelspec"] = {"name": "vitdsi", "display_name": "vitdsi (.venv)", "language": "python"}
    nbformat.write(notebook, twin)
    os.utime(twin, (stamped.a.stat().st_mtime + 10,) * 2)  # saved after the source
    source = stamped.a.read_text()
    assert sync_sources([stamped.a]) == [] and stamped.a.read_text() == source  # same cells: nothing to sync
    stamped.params["SIZE"] = 64  # 01_a does not declare SIZE: it never sees it
    assert stamped.reasons(stamped.a) == []


def test_cli_passes_force_to_the_runner(monkeypatch):
    seen = {}
    monkeypatch.setattr("vitdsi_utils.cli.run_study", lambda *args, **kwargs: seen.update(kwargs))
    assert cli.main(["study", "--profile", "smoke", "--force", "--quiet"]) == 0
    assert seen["force"] is True and seen["start_at"] is None
    assert cli.main(["study", "--profile", "smoke", "--quiet"]) == 0
    assert seen["force"] is False


# ------------------------------------------------------------------------------------------
# A series of three one-cell notebooks executed by papermill
# ------------------------------------------------------------------------------------------
# each notebook appends its name to a log outside the report (so it is nobody's product),
# and writes a table into OUT_DIR and a "model" into RUNS_DIR
RECORD = (
    "from pathlib import Path\n"
    "Path({log!r}).open('a').write('{name}\\n')\n"
    "Path(OUT_DIR, '{name}.csv').write_text('{name}')\n"
    "Path(RUNS_DIR).mkdir(parents=True, exist_ok=True)\n"
    "Path(RUNS_DIR, '{name}.pt').write_text('{name}')"
)


@pytest.mark.notebook
def test_reruns_skip_up_to_date_notebooks_and_restart_at_the_first_stale_one(tmp_path, capsys):
    names = ["01_one", "02_two", "03_three"]
    log = tmp_path / "ran.txt"
    record = {name: RECORD.format(log=str(log), name=name) for name in names}
    series = [write_notebook(tmp_path / f"{name}.py", record[name]) for name in names]
    out, runs = tmp_path / "report", tmp_path / "runs"

    def run(**kwargs) -> pd.DataFrame:
        return run_study({"PROFILE": "custom"}, notebooks=series, out_root=out, runs_dir=runs, **kwargs)

    def executed() -> list[str]:
        """The notebooks that ran since the last call."""
        lines = log.read_text().split() if log.exists() else []
        log.unlink(missing_ok=True)
        return lines

    def stamped() -> list[str]:
        return [name for name in names if stamp_path(out, Path(name)).exists()]

    assert run()["status"].tolist() == ["ok"] * 3 and executed() == names and stamped() == names
    products = json.loads(stamp_path(out, series[1]).read_text())["products"]
    assert products == {"OUT_DIR": ["02_two.csv"], "RUNS_DIR": ["02_two.pt"]}
    timings_before = (out / "timings.csv").read_text()
    capsys.readouterr()

    # a second run: nothing is stale, nothing runs, the report stays as it was
    assert run()["status"].tolist() == ["up to date"] * 3 and executed() == []
    printed = capsys.readouterr().out
    assert printed.count("up to date, skipped") == 3 and "nothing ran" in printed
    assert (out / "timings.csv").read_text() == timings_before

    # editing notebook 2 reruns 2 and 3, and says why 2 is stale
    write_notebook(series[1], record["02_two"], "x = 2")
    assert run()["status"].tolist() == ["up to date", "ok", "ok"]
    assert executed() == names[1:]
    printed = capsys.readouterr().out
    assert "[2/3] 02_two: stale (the notebook 02_two.py was edited)" in printed
    assert "[3/3] 03_three: running (a notebook before it ran)" in printed

    # a failure in notebook 2 leaves 1 stamped, 2 and 3 unstamped; the next run starts at 2
    write_notebook(series[1], "raise RuntimeError('broken on purpose')")
    with pytest.raises(Exception, match="broken on purpose"):
        run(progress=False)
    assert stamped() == ["01_one"]
    assert pd.read_csv(out / "timings.csv")["status"].tolist() == ["up to date", "failed"]
    write_notebook(series[1], record["02_two"])
    assert run(progress=False)["status"].tolist() == ["up to date", "ok", "ok"]
    assert executed() == names[1:] and stamped() == names

    # a model that notebook 3 wrote is deleted: 3 runs again; --start-at and --force run regardless
    (runs / "03_three.pt").unlink()
    assert run(progress=False)["status"].tolist() == ["up to date", "up to date", "ok"]
    assert executed() == ["03_three"]
    assert run(progress=False, start_at="02")["status"].tolist() == ["earlier run", "ok", "ok"]
    assert executed() == names[1:]
    assert run(progress=False, force=True)["status"].tolist() == ["ok"] * 3
    assert executed() == names
