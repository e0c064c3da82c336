"""The phases of a profile's DSI study (notebooks 03-05) as studies: what they write, reuse and refuse."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from vitdsi_utils.runs import FINE_TUNED_FILE, ZERO_SHOT_FILE, StudyPaths
from vitdsi_utils.studies import indexing, results, retrieval
from vitdsi_utils.studies.dsi import DSISpec
from vitdsi_utils.studies.specs import SpecError, dsi_model
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
