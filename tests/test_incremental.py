"""Incremental indexing: new IDs, replay sampling, and a tiny model that learns new IDs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitdsi_utils.model.decoding import beam_search
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.studies.incremental_setup import (
    INITIAL,
    SCRATCH,
    epoch_examples,
    finetune_name,
    finetune_tasks,
    incremental_codecs,
    replay_count,
    split_new,
)
from vitdsi_utils.training.config import TrainConfig
from vitdsi_utils.training.loop import fit
from vitdsi_utils.training.tasks import IndexingTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def walk(trie, tokens) -> int:
    """The trie node reached by ``tokens`` (-1 when it leaves the trie)."""
    node = 0
    for t in tokens:
        node = int(trie.next_node[node, t])
        if node < 0:
            return -1
    return node


def test_new_ids_are_valid_distinct_and_in_the_trie():
    old, full = incremental_codecs(80, 25)
    assert len(old) == 80 and len(full) == 105
    assert full.codes[:80] == old.codes  # old images keep their IDs
    new = full.codes[80:]
    assert not set(new) & set(old.codes) and len(set(new)) == 25
    assert old.max_length == full.max_length  # one decoder length for both
    for row, code in enumerate(full.codes):
        node = walk(full.trie, [*code, full.eos])
        assert node >= 0 and int(full.trie.row[node]) == row
        assert full.lookup(code) == row
    # the initial trie does not know the new IDs
    assert all(walk(old.trie, [*code, old.eos]) < 0 for code in new)


def test_capacity_sets_the_id_width():
    old, full = incremental_codecs(8, 4, capacity=1000)
    assert {len(c) for c in full.codes} == {3} and full.codes[8] == (0, 0, 8)
    # without a capacity, the width is that of the final number of IDs, for old IDs too
    old, full = incremental_codecs(8, 4)
    assert {len(c) for c in old.codes} == {2}
    with pytest.raises(ValueError, match="capacity"):
        incremental_codecs(8, 4, capacity=10)


def test_split_new_is_seeded_with_the_asked_fraction():
    old, new = split_new(100, 0.2, seed=0)
    assert len(new) == 20 and len(old) == 80
    assert sorted(np.concatenate([old, new])) == list(range(100))
    assert np.array_equal(new, split_new(100, 0.2, seed=0)[1])
    assert not np.array_equal(new, split_new(100, 0.2, seed=1)[1])
    with pytest.raises(ValueError):
        split_new(100, 1.0)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0, 3.0])
def test_replay_sampling_has_the_ratio_and_is_seeded(ratio):
    n_old, n_new = 40, 10
    epochs = epoch_examples(n_old, n_new, ratio, seed=0, epochs=2)
    for rows in epochs:
        assert sorted(rows[rows >= n_old]) == list(range(n_old, n_old + n_new))  # every new image once
        assert (rows < n_old).sum() == replay_count(n_new, ratio) == round(ratio * n_new)
    if ratio:
        # distinct old images within an epoch while the ratio asks for fewer than all of them,
        # resampled from one epoch to the next, and the same for the same seed
        assert len(set(epochs[0][epochs[0] < n_old])) == min(n_old, round(ratio * n_new))
        assert not np.array_equal(np.sort(epochs[0]), np.sort(epochs[1]))
    again = epoch_examples(n_old, n_new, ratio, seed=0, epochs=2)
    assert all(np.array_equal(a, b) for a, b in zip(epochs, again))


def test_tiny_model_learns_new_ids_with_replay():
    size = 16
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (24, size, size, 3), generator=g, dtype=torch.uint8)
    old_images, new_images = images[:16], images[16:]
    old_codec, codec = incremental_codecs(16, 8)
    torch.manual_seed(0)
    model = DSIModel(
        DSIConfig.from_codec(codec, image_size=size, patch_size=8, dim=64, mlp_dim=128, depth=1, heads=2, dropout=0.0)
    )
    config = TrainConfig(lr=3e-3, batch_size=8, epochs=80, target_accuracy=1.0, progress=False, device="cpu")
    fit(model, old_codec, [IndexingTask(old_images)], config=config, stop_on="indexing")
    _, rows = beam_search(model, old_images, old_codec, k=1)
    assert torch.equal(rows[:, 0], torch.arange(16))
    tasks, mix = finetune_tasks(old_images, new_images, ratio=2.0)
    fit(model, codec, tasks, config=config, mix_ratio=mix, stop_on="indexing")
    _, rows = beam_search(model, images, codec, k=1)
    assert torch.equal(rows[16:, 0], torch.arange(16, 24))  # every new image finds its new ID
    assert (rows[:16, 0] == torch.arange(16)).float().mean() >= 0.75  # replay keeps most old IDs


def test_cli_incremental_writes_every_strategy(tmp_path, run_recipe):
    import pandas as pd

    out = tmp_path / "inc"
    code = run_recipe(
        {
            "study": "incremental",
            "source": "digits",
            "size": 32,
            "ns": [80],
            "replay_ratios": [0, 1],
            "index": {"epochs": 2},
            "finetune_epochs": 2,
            "model": {"dim": 32, "mlp_dim": 64, "depth": 1, "heads": 2},
            "out_dir": str(out),
            "runs_dir": str(tmp_path / "runs"),
        }
    )
    assert code == 0
    results = pd.read_csv(out / "incremental_N80_random.csv")
    assert list(results["strategy"]) == [INITIAL, finetune_name(0), finetune_name(1), SCRATCH]
    assert (results["n_old"] + results["n_new"] == 20).all()  # N = 80 indexes 20 images
    assert results.loc[1:, "IA@1 new"].between(0, 1).all() and pd.isna(results.loc[0, "IA@1 new"])
    curves = pd.read_csv(out / "incremental_N80_random_curves.csv")
    assert set(curves["task"]) == {"old", "new"} and set(curves["replay_ratio"]) == {0, 1}
    assert (out / "incremental_N80_random.png").exists()


# ------------------------------------------------------------------------------------------
# The study of notebook 12 (incremental.run with a notebook profile's paths)
# ------------------------------------------------------------------------------------------
NOTEBOOK_PARAMS = {
    "PROFILE": "smoke",  # no spec key: left out
    "DATASET": "digits",
    "DATASET_ROOT": None,
    "DATASET_ANNOTATIONS": None,
    "DATASET_NAME": "my-digits",
    "SIZE": 32,
    "SEEDS": [0],
    "PATCH_SIZE": 16,
    "DIM": 32,
    "MLP_DIM": 64,
    "DEPTH": 1,
    "HEADS": 2,
    "DROPOUT": 0.1,
    "POS_ENCODING": "sinusoidal",
    "LR": 0.002,
    "BATCH_SIZE": 32,
    "WARMUP_STEPS": 0,
    "INDEX_EPOCHS": 2,
    "TARGET_ACCURACY": 0.99,
    "K": 10,
    "INC_N": 80,
    "INC_NEW_FRACTION": 0.2,
    "INC_REPLAY_RATIOS": [0, 1],
    "INC_FINETUNE_EPOCHS": 2,
    "OUT_DIR": None,
    "RUNS_DIR": None,
}


def test_notebook_12s_parameters_are_the_incremental_spec():
    from vitdsi_utils.studies.incremental import IncrementalSpec
    from vitdsi_utils.studies.specs import notebook_spec

    spec = notebook_spec(IncrementalSpec, {**NOTEBOOK_PARAMS, "SEEDS": [3], "POS_ENCODING": "learned"})
    assert (spec.source, spec.name, spec.size, spec.ns, spec.seed, spec.ids) == (
        "digits",
        "my-digits",
        32,
        (80,),
        3,
        "random",
    )
    assert (spec.k, spec.new_fraction, spec.replay_ratios, spec.finetune_epochs) == (10, 0.2, (0.0, 1.0), 2)
    assert spec.model.overrides() == dict(
        patch_size=16, dim=32, mlp_dim=64, depth=1, heads=2, dropout=0.1, pos_encoding="learned"
    )
    assert spec.index == TrainConfig(
        lr=0.002, batch_size=32, epochs=2, target_accuracy=0.99, warmup_steps=0, seed=3
    )  # notebook 12's index_config (which also turned progress off)


def test_every_parameter_of_notebook_12_is_a_profile_key_of_the_spec():
    import papermill

    from vitdsi_utils.runner.profiles import RUNNER_PARAMETERS
    from vitdsi_utils.runner.run import notebooks_dir
    from vitdsi_utils.runner.sources import read_notebook
    from vitdsi_utils.studies.incremental import IncrementalSpec

    declared = set(papermill.inspect_notebook(read_notebook(notebooks_dir() / "12_incremental.py")))
    assert declared - {"PROFILE", *RUNNER_PARAMETERS} == set(IncrementalSpec.PROFILE_KEYS)


def test_a_recipe_setting_the_profile_only_name_is_refused(tmp_path):
    from vitdsi_utils.runs import StudyPaths
    from vitdsi_utils.studies import incremental
    from vitdsi_utils.studies.specs import SpecError

    spec = incremental.IncrementalSpec(source="digits", size=32, ns=(80,), name="pets")
    with pytest.raises(SpecError, match="name: read by a notebook profile's study only"):
        incremental.run(spec, StudyPaths(tmp_path / "out", tmp_path / "runs"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_a_profiles_study_runs_one_database(tmp_path):
    from vitdsi_utils.runs import StudyPaths
    from vitdsi_utils.studies import incremental
    from vitdsi_utils.studies.specs import SpecError

    spec = incremental.IncrementalSpec(source="digits", size=32, ns=(80, 160))
    with pytest.raises(SpecError, match=r"ns: a notebook profile's incremental study runs one database \(INC_N\)"):
        incremental.run(spec, StudyPaths.create("mine", tmp_path / "out", tmp_path / "runs"))


def test_a_profiles_study_writes_its_tables_figure_and_run_folder(tmp_path):
    import pandas as pd

    from vitdsi_utils.runs import StudyPaths
    from vitdsi_utils.studies import incremental
    from vitdsi_utils.studies.specs import notebook_spec

    paths = StudyPaths.create("mine", tmp_path / "out", tmp_path / "runs")
    spec = notebook_spec(incremental.IncrementalSpec, NOTEBOOK_PARAMS)
    result = incremental.run(spec, paths)
    assert sorted(p.name for p in paths.tables.iterdir()) == [
        "incremental.csv",
        "incremental.md",
        "incremental_curves.csv",
    ]
    assert [p.name for p in paths.figures.iterdir()] == ["incremental.png"]
    assert sorted(p.name for p in paths.out.iterdir()) == ["figures", "tables"]  # nothing beside them
    run = paths.runs / "incremental-my-digits-32px-N80-random-seed0"  # the profile's run folder, its data's name
    assert {"initial.pt", "scratch.pt", "finetune-replay0.pt", "finetune-replay1.pt"} <= {p.name for p in run.iterdir()}
    results = pd.read_csv(paths.tables / "incremental.csv")
    assert list(results["strategy"]) == [INITIAL, finetune_name(0), finetune_name(1), SCRATCH]
    assert (paths.tables / "incremental.md").read_text().startswith("Incremental indexing: 16 images indexed first")
    curves = pd.read_csv(paths.tables / "incremental_curves.csv", dtype=str)
    assert set(curves["replay_ratio"]) == {"0", "1"}  # the profile's integers, written as notebook 12 wrote them
    assert list(result.results["strategy"]) == list(results["strategy"]) and len(result.curves) == len(curves)
