"""scripts/seed_average.py: one recipe, several training seeds, per-seed rows and the per-query seed average."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "seed_average.py"


def load_script():
    spec = importlib.util.spec_from_file_location("seed_average", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quick(runs, out) -> list[str]:
    """--set items: recipes/dsi-patch8.yaml on digits at 32 px, one epoch per phase, a small BoVW."""
    sets = [
        "source=digits",
        "size=32",
        "index.epochs=1",
        "multitask.epochs=1",
        "bovw_words=8",
        "bovw_vocabularies=2",
        f"runs_dir={runs}",
        f"out_dir={out}",
    ]
    return [arg for item in sets for arg in ("--set", item)]


def test_the_seeds_train_the_recipe_of_make_dsi_patch8():
    """The settings the script had written in before it read recipes/dsi-patch8.yaml."""
    from vitdsi_utils.training.config import TrainConfig

    script = load_script()
    spec = script.the_recipe("dsi-patch8", []).spec
    for seed in (0, 3):
        index_config, multitask_config = script.seed_configs(spec, seed)
        assert index_config == TrainConfig(
            epochs=400, target_accuracy=0.99, lr=1e-3, seed=seed, warmup_steps=100, stop_metric="ia"
        )
        assert multitask_config == TrainConfig(epochs=30, lr=1e-3, seed=seed)
    assert spec.model.overrides() == {"patch_size": 8, "dropout": 0.1, "pos_encoding": "sinusoidal"}
    assert (spec.max_pairs_per_query, spec.mix_ratio, spec.targets) == (5, 2.0, "same-class")
    assert (spec.bovw_words, spec.bovw_vocabularies, spec.seeds[0]) == (200, 5, 0)
    assert script.main(["--set", "multitask=null"]) == 2  # nothing to average


def test_seed_average_trains_each_seed_once_and_reports_the_average(tmp_path):
    script = load_script()
    common = ["--n", "100", *quick(tmp_path / "runs", tmp_path / "out")]
    assert script.main(common + ["--seeds", "1", "--no-report"]) == 0  # train only
    assert not (tmp_path / "out").exists()
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["digits-32px-N100-clustered-seed0-train1"]
    trained = tmp_path / "runs" / folders[0] / "multitask.pt"
    stamp = trained.stat().st_mtime_ns
    assert script.main(common + ["--seeds", "0", "1"]) == 0
    assert trained.stat().st_mtime_ns == stamp  # seed 1 loaded, not trained again
    long = pd.read_csv(tmp_path / "out" / "seeds_N100.csv")
    assert set(long["model"]) == {"DSI multi-task, seed 0", "DSI multi-task, seed 1", script.AVERAGE, "BoVW"}
    value = long.set_index(["model", "metric"])["value"]
    for metric in ("IA@1", "mAP@10", "P@10"):  # the average of the per-query means is the mean of the seeds' means
        expected = (value[("DSI multi-task, seed 0", metric)] + value[("DSI multi-task, seed 1", metric)]) / 2
        assert value[(script.AVERAGE, metric)] == pytest.approx(expected)
    text = (tmp_path / "out" / "seeds_N100.md").read_text()
    assert "2 training seeds" in text and "| DSI multi-task, seed average |" in text
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "digits-32px-N100-clustered-seed0",
        "digits-32px-N100-clustered-seed0-train1",
    ]


def test_seed_average_with_random_ids_uses_the_same_images_and_its_own_report(tmp_path):
    script = load_script()
    common = ["--n", "100", *quick(tmp_path / "runs", tmp_path / "out")]
    assert script.main(common + ["--seeds", "0", "--scheme", "random"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["digits-32px-N100-random-seed0"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["seeds_N100_random.csv", "seeds_N100_random.md"]
    long = pd.read_csv(tmp_path / "out" / "seeds_N100_random.csv")
    assert set(long["ids"]) == {"random"}
    text = (tmp_path / "out" / "seeds_N100_random.md").read_text()
    assert "random IDs" in text and "## Target 4" not in text  # no clustered report to compare with yet
    # with the clustered report beside it, a rerun (loading the model) adds target 4's differences
    assert script.main(common + ["--seeds", "0"]) == 0
    assert script.main(common + ["--seeds", "0", "--scheme", "random"]) == 0
    text = (tmp_path / "out" / "seeds_N100_random.md").read_text()
    gaps = [line.split("|") for line in text.split("## Target 4")[1].splitlines() if line.startswith("| DSI")]
    assert sorted(g[1].strip() for g in gaps) == ["DSI multi-task, seed 0", "DSI multi-task, seed average"]
    clustered = pd.read_csv(tmp_path / "out" / "seeds_N100.csv").set_index(["model", "metric"])["value"]
    ours = pd.read_csv(tmp_path / "out" / "seeds_N100_random.csv").set_index(["model", "metric"])["value"]
    average = next(g for g in gaps if "average" in g[1])
    expected = ours[(script.AVERAGE, "mAP@10")] - clustered[(script.AVERAGE, "mAP@10")]
    assert float(average[6]) == pytest.approx(expected, abs=5e-4)


def test_seed_average_with_atomic_ids_shares_the_folder_of_vitdsi_run(tmp_path):
    from vitdsi_utils.cli import main as vitdsi

    script = load_script()
    runs, out = tmp_path / "runs", tmp_path / "out"
    common = quick(runs, tmp_path / "dsi")
    assert (
        vitdsi(["run", "dsi-patch8", "--set", "schemes=[atomic]", "--set", "ns=[100]", "--set", "bovw=false", *common])
        == 0
    )
    trained = runs / "digits-32px-N100-atomic-seed0" / "multitask.pt"
    stamp = trained.stat().st_mtime_ns
    assert script.main(["--n", "100", *quick(runs, out), "--seeds", "0", "--scheme", "atomic"]) == 0
    assert trained.stat().st_mtime_ns == stamp  # the recipe's seed 0 is the model `vitdsi run` trained
    long = pd.read_csv(out / "seeds_N100_atomic.csv")
    assert set(long["ids"]) == {"atomic"}
    dsi = pd.read_csv(tmp_path / "dsi" / "dsi_digits_32px.csv")
    ours = long[long["model"] == "DSI multi-task, seed 0"].set_index("metric")["value"]
    theirs = dsi[dsi["model"] == "DSI multi-task"].set_index("metric")["value"]
    for metric in ("IA@1", "mAP@10", "P@10"):
        assert ours[metric] == pytest.approx(theirs[metric])
