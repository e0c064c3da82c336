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


def test_seed_average_trains_each_seed_once_and_reports_the_average(tmp_path):
    script = load_script()
    common = ["--source", "digits", "--size", "32", "--n", "100", "--index-epochs", "1", "--multitask-epochs", "1",
              "--words", "8", "--vocabularies", "2", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
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
        "digits-32px-N100-clustered-seed0", "digits-32px-N100-clustered-seed0-train1"]


def test_seed_average_with_random_ids_uses_the_same_images_and_its_own_report(tmp_path):
    script = load_script()
    common = ["--source", "digits", "--size", "32", "--n", "100", "--index-epochs", "1", "--multitask-epochs", "1",
              "--words", "8", "--vocabularies", "2", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
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


def test_seed_average_with_atomic_ids_shares_the_folder_of_vitdsi_dsi(tmp_path):
    from vitdsi_utils.cli import main as vitdsi

    script = load_script()
    runs, out = tmp_path / "runs", tmp_path / "out"
    common = ["--source", "digits", "--size", "32", "--n", "100", "--index-epochs", "1", "--multitask-epochs", "1",
              "--runs", str(runs)]
    assert vitdsi(["dsi", "--schemes", "atomic", "--patch", "8", "--lr", "1e-3", "--warmup-steps", "100",
                   "--target-accuracy", "0.99", "--max-pairs-per-query", "5", "--multitask", "--mix-ratio", "2",
                   "--targets", "same-class", "--no-fine-tune", "--out", str(tmp_path / "dsi"), *common]) == 0
    trained = runs / "digits-32px-N100-atomic-seed0" / "multitask.pt"
    stamp = trained.stat().st_mtime_ns
    assert script.main(common + ["--seeds", "0", "--scheme", "atomic", "--words", "8", "--vocabularies", "2",
                                 "--out", str(out)]) == 0
    assert trained.stat().st_mtime_ns == stamp  # the recipe's seed 0 is the model `vitdsi dsi` trained
    long = pd.read_csv(out / "seeds_N100_atomic.csv")
    assert set(long["ids"]) == {"atomic"}
    dsi = pd.read_csv(tmp_path / "dsi" / "dsi_digits_32px.csv")
    ours = long[long["model"] == "DSI multi-task, seed 0"].set_index("metric")["value"]
    theirs = dsi[dsi["model"] == "DSI multi-task"].set_index("metric")["value"]
    for metric in ("IA@1", "mAP@10", "P@10"):
        assert ours[metric] == pytest.approx(theirs[metric])
