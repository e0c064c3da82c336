"""The studies only a notebook profile runs (the DSI study's phases, notebooks 03-05, and the ID schemes of 08):
what they write, reuse and refuse."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from vitdsi_utils.runs import FINE_TUNED_FILE, ZERO_SHOT_FILE, StudyPaths
from vitdsi_utils.studies import ids, indexing, results, retrieval
from vitdsi_utils.studies.dsi import DSISpec
from vitdsi_utils.studies.specs import SpecError, dsi_model, notebook_spec
from vitdsi_utils.training.checkpoint import CheckpointError
from vitdsi_utils.training.config import TrainConfig


def tiny_spec(**values) -> DSISpec:
    defaults = dict(
        source="digits",
        size=32,
        ns=(200,),
        schemes=("clustered",),
        model=dsi_model(patch_size=8, dim=16, mlp_dim=32, depth=1, heads=2),
        index=TrainConfig(epochs=2, lr=2e-3, batch_size=32, target_accuracy=0.99),
        fine_tune=TrainConfig(epochs=1, lr=2e-3, batch_size=32),
        max_pairs_per_query=2,
    )
    return DSISpec(**{**defaults, **values})


@pytest.mark.parametrize("study", [indexing, retrieval])
def test_a_phase_needs_a_profiles_paths(study, tmp_path):
    with pytest.raises(SpecError, match="one phase of a notebook profile's study.*study: dsi"):
        study.run(tiny_spec(), StudyPaths(tmp_path / "out", tmp_path / "runs"))


def test_table1_needs_a_profile_and_names_the_notebook_that_writes_bovw(tmp_path):
    spec = results.ResultsSpec(source="digits", size=32, ns=(200,), schemes=("clustered",))
    with pytest.raises(SpecError, match="05_results is one phase"):
        results.run(spec, StudyPaths(tmp_path / "out", tmp_path / "runs"))
    with pytest.raises(FileNotFoundError, match="--profile mine --dataset digits --start-at 02_bovw"):
        results.run(spec, StudyPaths.create("mine", tmp_path / "out", tmp_path / "runs"))


def test_fine_tuning_without_its_settings_is_refused(tmp_path):
    paths = StudyPaths.create("mine", tmp_path / "out", tmp_path / "runs")
    with pytest.raises(SpecError, match="fine_tune: notebook 04 fine-tunes"):
        retrieval.run(tiny_spec(fine_tune=None), paths)


def test_indexing_then_fine_tuning_write_their_tables_and_reuse_only_what_matches(tmp_path, capsys):
    paths = StudyPaths.create("mine", tmp_path / "out", tmp_path / "runs")
    spec = tiny_spec()
    first = indexing.run(spec, paths)
    row = first.runs.iloc[0]
    assert (row["epochs"], row["epoch_cap"], bool(row["loaded"])) == (2, 2, False)
    assert 0 <= row["ia1_low"] <= row["ia1"] <= row["ia1_high"] <= 1
    assert (paths.runs / row["run"] / ZERO_SHOT_FILE).is_file()
    listed = pd.read_csv(paths.tables / "indexing_runs.csv")
    assert listed["run"].tolist() == [row["run"]]  # the demo finds the run folders here
    assert (paths.figures / "figure1_indexing.png").stat().st_size > 1000
    assert "0 of 1 runs reached the target train accuracy 0.99 within 2 epochs" in indexing.summary_line(
        spec, first.runs
    )

    again = indexing.run(spec, paths)  # same settings: the model is loaded, not trained
    assert bool(again.runs.iloc[0]["loaded"]) and "(loaded)" in capsys.readouterr().out

    tuned = retrieval.run(spec, paths)
    assert set(tuned.histories["split"]) >= {"train", "val"} and (paths.runs / row["run"] / FINE_TUNED_FILE).is_file()
    assert (paths.figures / "figure3_retrieval_val.png").stat().st_size > 1000
    capsys.readouterr()
    retrieval.run(spec, paths)
    assert "(loaded)" in capsys.readouterr().out

    changed = replace(spec, fine_tune=replace(spec.fine_tune, lr=1e-3))  # another setting: never reused silently
    with pytest.raises(CheckpointError, match="fine-tuned with other settings: .*lr"):
        retrieval.run(changed, paths)


# ------------------------------------------------------------------------------------------
# Notebook 08: every ID scheme on the same databases
# ------------------------------------------------------------------------------------------
def tiny_ids_spec(**values) -> ids.IdsSpec:
    defaults = dict(
        source="digits",
        size=32,
        ns=(120,),
        schemes=("clustered", "atomic"),
        model=dsi_model(dim=16, mlp_dim=32, depth=1, heads=2),
        index=TrainConfig(epochs=1, lr=2e-3, batch_size=32, target_accuracy=0.99),
        fine_tune=TrainConfig(epochs=1, lr=2e-3, batch_size=32),
        max_pairs_per_query=2,
        k=20,
    )
    return ids.IdsSpec(**{**defaults, **values})


def test_the_id_scheme_study_needs_a_profiles_paths(tmp_path):
    with pytest.raises(SpecError, match="08_ids is one phase of a notebook profile's study"):
        ids.run(tiny_ids_spec(), StudyPaths(tmp_path / "out", tmp_path / "runs"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_notebook_08s_parameters_become_the_settings_it_trained_with():
    from vitdsi_utils.runner.profiles import load_profile

    smoke = load_profile("smoke")
    spec = notebook_spec(ids.IdsSpec, {**smoke, "OUT_DIR": None, "RUNS_DIR": None, "SEEDS": [0, 3]})
    assert (spec.source, spec.name, spec.size, spec.ns, spec.seeds, spec.k) == ("digits", None, 32, (200,), (0, 3), 100)
    assert spec.schemes == ("clustered", "random", "semantic", "rq", "atomic")
    assert (spec.semantic_k, spec.semantic_c, spec.rq_levels, spec.rq_codebook, spec.bovw_words) == (5, 5, 2, 8, 50)
    assert spec.model.overrides() == dict(
        patch_size=16, dim=32, mlp_dim=64, depth=1, heads=2, dropout=0.1, pos_encoding="sinusoidal"
    )
    assert (spec.fine_tune_phase, spec.multitask_epochs, spec.max_pairs_per_query) == (True, None, 4)
    # the per-seed settings notebook 08 built by hand before it called ids.run
    assert spec.index_config(3) == TrainConfig(
        lr=0.002, batch_size=32, epochs=40, target_accuracy=0.99, warmup_steps=0, seed=3, progress=False
    )
    assert spec.retrieval_config(3) == TrainConfig(lr=0.002, batch_size=32, epochs=3, seed=3, progress=False)

    paper = notebook_spec(ids.IdsSpec, load_profile("paper-cpu"))  # atomic IDs, multi-task only
    assert (paper.schemes, paper.fine_tune_phase, paper.multitask_epochs) == (("atomic",), False, 20)
    assert (paper.mix_ratio, paper.targets, paper.size, paper.ns) == (2.0, "same-class", 160, (512, 1024, 2048))
    assert paper.multitask_config(0) == TrainConfig(lr=0.001, batch_size=32, epochs=20, seed=0, progress=False)
    with pytest.raises(SpecError, match=r"profile key IDS_TARGETS \(targets: 'fixed' is not one of pairs, same-class"):
        notebook_spec(ids.IdsSpec, {**smoke, "IDS_TARGETS": "fixed"})


def test_the_id_scheme_study_writes_notebook_08s_tables_and_figure(tmp_path, capsys):
    paths = StudyPaths.create("mine", tmp_path / "out", tmp_path / "runs")
    result = ids.run(tiny_ids_spec(multitask_epochs=1, targets="same-class"), paths)
    for name in (
        "histories_ids.csv",
        "ids.csv",
        "ids.md",
        "ids_runs.csv",
        "ids_runs.md",
        "ids_gaps.csv",
        "ids_gaps.md",
    ):
        assert (paths.tables / name).is_file(), name
    assert (paths.figures / "ids_bars.png").stat().st_size > 1000
    text = (paths.tables / "ids.md").read_text()
    assert (
        text.startswith("DSI by ID scheme, digits at 32 px, profile `mine`;") and text == result.markdown["ids"] + "\n"
    )
    assert "Multi-task: 1 epochs, every indexed image beside 2 retrieval examples" in text
    assert set(result.tables["ids"]["model"]) == {"DSI zero-shot", "DSI fine-tuned", "DSI multi-task"}
    assert pd.read_csv(paths.tables / "ids_runs.csv")["ids"].tolist() == result.tables["ids_runs"]["ids"].tolist()
    assert set(result.tables["ids_gaps"]["ids"]) == {"atomic"} and set(result.figures) == {"ids_bars"}
    assert [line.split(":")[0] for line in result.lines] == [f"{m}, atomic" for m in result.tables["ids_gaps"]["model"]]
    assert "N=120 seed 0 atomic:" in capsys.readouterr().out  # one line per database and scheme

    alone = ids.run(tiny_ids_spec(schemes=("atomic",), multitask_epochs=1, targets="same-class"), paths)
    assert bool(alone.tables["ids_runs"]["loaded"].all())  # the same settings: every model loaded
    assert "ids_gaps" not in alone.markdown and alone.lines == ["IDS_SCHEMES has no clustered run to compare with."]


def test_the_data_notebook_draws_every_database_and_writes_its_manifest(tmp_path, monkeypatch):
    """Notebook 01: a manifest per database of the grid, the galleries and the split figure; a profile's paths only."""
    from vitdsi_utils.studies import data

    params = dict(
        DATASET="digits",
        SIZE=32,
        NS=[60, 90],
        ID_SCHEMES=["random", "clustered"],
        SEEDS=[1],
        IMAGENETTE_PREVIEW=True,
        GALLERY_PER_CLASS=2,
        OUT_DIR=None,
    )
    spec = notebook_spec(data.DataSpec, params)
    assert (spec.ns, spec.schemes, spec.seeds, spec.preview, spec.per_class) == (
        (60, 90),
        ("random", "clustered"),
        (1,),
        True,
        2,
    )
    with pytest.raises(SpecError, match="01_data is one phase"):
        data.run(spec, StudyPaths(tmp_path / "out", tmp_path / "runs"))
    monkeypatch.setenv("VITDSI_IMAGENETTE_DIR", str(tmp_path / "nowhere"))
    paths = StudyPaths.create("tiny", tmp_path / "out", tmp_path / "runs")
    result = data.run(spec, paths)
    manifests = sorted(p.name for p in paths.tables.glob("manifest_*.csv"))
    assert manifests == sorted(
        f"manifest_digits-32px-N{n}-{s}-seed1.csv" for n in (60, 90) for s in ("random", "clustered")
    )
    assert list(result.roles.index) == ["N=60", "N=90"] and result.roles.loc["N=60"].sum() == 60
    assert sorted(p.name for p in paths.figures.iterdir()) == ["gallery.png", "split_bar.png"]
    assert "preview skipped" in result.lines["preview"] and result.per_image is None
    assert len(result.first_ids) == 12 and result.lines["manifests"].count("indexed") == 4
