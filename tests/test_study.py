"""The study runner: profiles, parameter hand-over, failure handling, and the smoke study end to end."""

from __future__ import annotations

import json
import re

import nbformat
import pandas as pd
import pytest

from vitdsi_utils import cli
from vitdsi_utils.runner.profiles import known_profiles, load_profile, notebook_parameters
from vitdsi_utils.runner.run import StudyFailed, run_study, select_notebooks, study_notebooks
from vitdsi_utils.studies.targets import baseline_verdicts

METRIC_COLUMNS = ("value", "ci_low", "ci_high", "chance")
FIGURES = (
    "figure1_indexing",
    "figure2_retrieval_train",
    "figure3_retrieval_val",
    "metric_bars",
    "ids_bars",
    "clusters_metrics",
    "clusters_sizes",
    "clusters_gallery_best",
    "clusters_gallery_worst",
    "ablations",
)


def write_notebook(path, *cells: str, parameters: str = 'PROFILE = "x"\nOUT_DIR = None'):
    """A py:percent notebook source whose first cell is the tagged parameters cell, then ``cells``."""
    path.write_text(f'# %% tags=["parameters"]\n{parameters}\n' + "".join(f"\n# %%\n{cell}\n" for cell in cells))
    return path


# ------------------------------------------------------------------------------------------
# Profiles and parameters (no kernel)
# ------------------------------------------------------------------------------------------
def test_bundled_profiles_share_their_keys():
    assert {"smoke", "cpu", "paper", "paper-cpu"} <= set(known_profiles())
    keys = {name: set(load_profile(name)) for name in known_profiles()}
    assert all(names == keys["smoke"] for names in keys.values()), keys


def test_paper_cpu_profile_is_the_paper_at_160_px_with_a_cpu_budget():
    paper, ours = load_profile("paper"), load_profile("paper-cpu")
    same = ("SIZE", "NS", "ID_SCHEMES", "PATCH_SIZE", "DIM", "MLP_DIM", "DEPTH", "HEADS", "DROPOUT", "POS_ENCODING")
    assert {key: ours[key] for key in same} == {key: paper[key] for key in same}
    assert ours["SEEDS"] == [0] and ours["BOVW_WORDS"] == 200 and ours["TARGET_ACCURACY"] == 0.99
    assert ours["RETRIEVAL_EPOCHS"] < paper["RETRIEVAL_EPOCHS"] and ours["MAX_PAIRS_PER_QUERY"] is not None
    # the best 64 px recipe beside the paper's models, on the same databases
    assert (ours["IDS_NS"], ours["IDS_SCHEMES"], ours["IDS_TARGETS"]) == (ours["NS"], ["atomic"], "same-class")
    assert ours["IDS_MULTITASK_EPOCHS"] and not ours["IDS_FINE_TUNE"]
    run, left_out = select_notebooks(study_notebooks(), ours["NOTEBOOKS"])
    assert [p.stem[:2] for p in left_out] == ["09", "10", "11", "12", "13"]
    assert [p.stem[:2] for p in run] == ["01", "02", "03", "04", "05", "06", "07", "08", "14"]


def test_notebooks_are_chosen_by_name_or_number(tmp_path):
    paths = [tmp_path / f"{stem}.py" for stem in ("01_data", "02_bovw", "10_ablations", "11_scale")]
    assert select_notebooks(paths, None) == (paths, [])
    run, left_out = select_notebooks(paths, ["11_scale", "01", 2])  # YAML reads an unquoted 02 as 2
    assert run == [paths[0], paths[1], paths[3]] and left_out == [paths[2]]
    with pytest.raises(ValueError, match=r"'1' names 2 notebooks"):
        select_notebooks(paths, ["1"])
    with pytest.raises(ValueError, match=r"'99' names no notebook; the study has \['01_data'"):
        select_notebooks(paths, ["99"])
    with pytest.raises(ValueError, match="lists no notebook"):
        select_notebooks(paths, [])
    with pytest.raises(ValueError, match="a list of notebook names"):
        select_notebooks(paths, "01_data")


def test_paper_profile_follows_the_paper():
    paper = load_profile("paper")
    assert (paper["SIZE"], paper["NS"], paper["SEEDS"]) == (160, [512, 1024, 2048], [0, 1, 2])
    training = (paper["LR"], paper["BATCH_SIZE"], paper["TARGET_ACCURACY"], paper["RETRIEVAL_EPOCHS"])
    assert training == (5e-4, 32, 0.98, 75)
    assert (paper["DIM"], paper["MLP_DIM"], paper["DEPTH"], paper["HEADS"], paper["PATCH_SIZE"]) == (128, 256, 6, 4, 16)
    assert paper["MAX_PAIRS_PER_QUERY"] is None and paper["BOVW_WORDS"] == 200


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown profile 'nope'.*smoke"):
        load_profile("nope")


def test_cli_reports_an_unknown_profile(capsys):
    assert cli.main(["study", "--profile", "nope"]) == 2
    assert "unknown profile" in capsys.readouterr().err


def test_cli_exits_1_when_the_study_fails(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise StudyFailed("03_indexing.ipynb failed in cell 4 with ValueError: bad")

    monkeypatch.setattr("vitdsi_utils.cli.run_study", fail)
    assert cli.main(["study", "--profile", "smoke", "--quiet"]) == 1
    assert "ValueError: bad" in capsys.readouterr().err


def test_only_declared_parameters_are_passed(tmp_path):
    path = write_notebook(tmp_path / "nb.py", "pass")
    given = {"PROFILE": "cpu", "NS": [512], "OUT_DIR": "/x"}
    assert notebook_parameters(path, given) == {"PROFILE": "cpu", "OUT_DIR": "/x"}


def test_baseline_verdicts_need_separated_intervals():
    rows = [
        ("BoVW", "-", 0.40, 0.35, 0.45),
        ("DSI fine-tuned", "clustered", 0.60, 0.50, 0.70),  # wholly above
        ("DSI fine-tuned", "random", 0.42, 0.30, 0.50),  # overlaps
        ("DSI zero-shot", "random", 0.10, 0.05, 0.20),  # wholly below
    ]
    results = pd.DataFrame(rows, columns=["model", "ids", "value", "ci_low", "ci_high"]).assign(
        metric="mAP@10", n=512, seed=0
    )
    verdicts = baseline_verdicts(results, "mAP@10").set_index(["model", "ids"])["verdict"]
    assert verdicts[("DSI fine-tuned", "clustered")] == "better"
    assert verdicts[("DSI fine-tuned", "random")] == "overlap"
    assert verdicts[("DSI zero-shot", "random")] == "worse"


# ------------------------------------------------------------------------------------------
# Notebooks executed by papermill
# ------------------------------------------------------------------------------------------
@pytest.mark.notebook
def test_runner_stops_at_the_first_failing_notebook(tmp_path):
    first = write_notebook(
        tmp_path / "01_fails.py",
        "from pathlib import Path\nPath(OUT_DIR, 'profile.txt').write_text(PROFILE)",
        "raise ZeroDivisionError('boom in the second cell')",
    )
    second = write_notebook(tmp_path / "02_never.py", "pass")
    out = tmp_path / "report"
    with pytest.raises(StudyFailed, match="ZeroDivisionError") as error:
        run_study({"PROFILE": "custom"}, notebooks=[first, second], out_root=out, progress=False)
    assert "boom in the second cell" in str(error.value) and "01_fails" in str(error.value)
    assert (out / "profile.txt").read_text() == "custom"  # the parameter reached the notebook
    copy = nbformat.read(out / "notebooks" / "01_fails.ipynb", as_version=4)  # the copy with the traceback
    assert copy.metadata["papermill"]["input_path"] == str(first)  # names the source, not papermill's scratch copy
    assert not (out / "notebooks" / "02_never.ipynb").exists()
    timings = pd.read_csv(out / "timings.csv")
    assert timings["status"].tolist() == ["failed"]


@pytest.mark.notebook
def test_a_profile_runs_only_the_notebooks_it_names(tmp_path, monkeypatch):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for stem in ("01_a", "02_b", "03_c"):
        write_notebook(
            folder / f"{stem}.py", f"from pathlib import Path\nPath(OUT_DIR, '{stem}.txt').write_text('ran')"
        )
    monkeypatch.setattr("vitdsi_utils.runner.run.notebooks_dir", lambda: folder)
    out = tmp_path / "report"
    profile = {"PROFILE": "x", "NOTEBOOKS": ["01", "03_c"]}
    timings = run_study(profile, out_root=out, runs_dir=tmp_path / "runs", progress=False)
    assert timings["status"].tolist() == ["ok", "not in profile", "ok"]
    assert sorted(p.name for p in out.glob("*.txt")) == ["01_a.txt", "03_c.txt"]
    assert not (out / "notebooks" / "02_b.ipynb").exists()
    stamp = json.loads((out / "stamps" / "03_c.json").read_text())
    assert [name for name, _ in stamp["upstream"]] == ["01_a"]  # the notebooks it ran after, not 02
    readme = (out / "README.md").read_text()
    assert "| [02_b](notebooks/02_b.ipynb) | – | not in profile |" in readme and "Not run: 02_b." in readme
    again = run_study(profile, out_root=out, runs_dir=tmp_path / "runs", progress=False)
    assert again["status"].tolist() == ["up to date", "not in profile", "up to date"]


@pytest.mark.notebook
@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path):
    out, runs = tmp_path / "report", tmp_path / "runs"
    timings = run_study("smoke", out_root=out, runs_dir=runs, progress=False)

    names = [p.stem for p in study_notebooks()]
    assert timings["notebook"].tolist() == names and (timings["status"] == "ok").all()
    for name in names:
        assert (out / "notebooks" / f"{name}.ipynb").exists()
    assert any(runs.glob("*/fine_tuned.pt"))  # models went to the runs folder we passed

    table1 = pd.read_csv(out / "tables" / "table1.csv")
    assert {"BoVW", "DSI zero-shot", "DSI fine-tuned"} <= set(table1["model"])
    values = table1[list(METRIC_COLUMNS)].to_numpy()
    assert ((values >= 0) & (values <= 1) | pd.isna(values)).all()
    ids = pd.read_csv(out / "tables" / "ids.csv")  # 08_ids: every scheme of the profile, both models
    assert set(ids["ids"]) == set(load_profile("smoke")["IDS_SCHEMES"])
    assert set(ids["model"]) == {"DSI zero-shot", "DSI fine-tuned"}
    assert (pd.read_csv(out / "tables" / "ids_runs.csv")["invalid_beam"] == 0).all()
    clusters = pd.read_csv(out / "tables" / "clusters.csv")  # 09_clusters: every trained encoder and reference
    assert {"DSI zero-shot (random)", "DSI fine-tuned (clustered)", "Dense", "pixels (untrained)"} <= set(
        clusters["encoder"]
    )
    assert clusters["silhouette"].between(-1, 1).all() and clusters["nmi"].between(0, 1).all()
    assert set(pd.read_csv(out / "tables" / "vlad.csv")["model"]) == {"VLAD"}  # 02_bovw's VLAD rows
    ablation = pd.read_csv(out / "tables" / "ablations.csv")  # 10_ablations: the default, then the profile's factors
    assert ablation["variant"].iloc[0] == "default"
    assert set(ablation["factor"]) == {"default", *load_profile("smoke")["ABLATION_FACTORS"]}
    assert set(ablation["stage"]) == {"zero-shot", "fine-tuned"} and ablation["value"].between(0, 1).all()
    for figure in FIGURES:
        path = out / "figures" / f"{figure}.png"
        assert path.exists() and path.stat().st_size > 1000, figure

    readme = (out / "README.md").read_text()
    table1_md = (out / "tables" / "table1.md").read_text()
    table_lines = [line for line in table1_md.splitlines() if line.startswith("| DSI")]
    assert table_lines and all(line in readme for line in table_lines)
    assert re.search(r"!\[metric_bars\]\(figures/metric_bars\.png\)", readme)
    uncaptioned = [p.stem for p in (out / "figures").glob("*.png") if f"### {p.stem}\n" in readme]
    assert not uncaptioned, f"add these figures to study.FIGURE_CAPTIONS: {uncaptioned}"
    assert (out / "timings.csv").exists()
