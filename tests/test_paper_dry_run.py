"""The paper profile made runnable: its dry run keeps every grid dimension and runs every notebook end to end.

The fast tests check the dry run's parameters and image subset without a kernel; the slow one runs
``vitdsi study --profile paper --dry-run`` through papermill on a subset of the Imagenette images.
"""

from __future__ import annotations

import pandas as pd
import pytest

from vitdsi_utils import cli
from vitdsi_utils.data.files import list_image_files
from vitdsi_utils.runner.dry_run import (
    DRY_EPOCHS,
    N_DIVISOR,
    dry_run_images,
    dry_run_parameters,
    largest_n,
    per_class_cap,
    scaled_n,
)
from vitdsi_utils.runner.profiles import known_profiles, load_profile
from vitdsi_utils.runner.run import run_study, study_notebooks

#: Keys that span the grid: the dry run must leave every one as the profile has it.
GRID_KEYS = (
    "SIZE",
    "ID_SCHEMES",
    "SEEDS",
    "PATCH_SIZE",
    "POS_ENCODING",
    "LR",
    "TARGET_ACCURACY",
    "MAX_PAIRS_PER_QUERY",
    "K",
    "IDS_SCHEMES",
    "INIT_SCHEMES",
    "RERANK_DEPTHS",
    "CLUSTER_POOLINGS",
    "CLUSTER_BASELINES",
    "CLUSTER_KS",
    "ABLATION_SCHEME",
    "ABLATION_FACTORS",
    "INC_REPLAY_RATIOS",
    "PRETRAIN_SEMANTIC_IDS",
    "IDS_FINE_TUNE",
    "IDS_TARGETS",
    "NOTEBOOKS",
)


# ------------------------------------------------------------------------------------------
# The dry run's parameters (no kernel)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["paper", "paper-cpu", "cpu"])
def test_the_dry_run_keeps_every_grid_dimension(name):
    profile = load_profile(name)
    dry, changes = dry_run_parameters(profile)
    assert set(dry) == set(profile)
    for key in GRID_KEYS:
        assert dry[key] == profile[key], key
    for key in ("NS", "IDS_NS", "SCALE_NS", "SCALE_IA_NS", "INC_REPLAY_RATIOS"):
        assert len(dry[key]) == len(profile[key]) == len(set(dry[key])), key  # as many distinct values
    assert (0 in dry["SCALE_NS"]) == (0 in profile["SCALE_NS"])  # "every usable image" stays
    for key in DRY_EPOCHS:
        assert dry[key] == (None if profile[key] is None else 1), key
    assert all(line.split(":")[0] in profile for line in changes)


def test_the_paper_grid_scaled():
    dry, changes = dry_run_parameters(load_profile("paper"))
    assert dry["NS"] == [40, 64, 128] and dry["SEEDS"] == [0, 1, 2]  # 512 / 16 = 32 is below 4 per class
    assert dry["SCALE_NS"] == [40, 64, 128, 256, 512, 0]
    assert (dry["ABLATION_N"], dry["INC_N"], dry["PRETRAIN_N"]) == (40, 128, 40)
    assert (dry["DIM"], dry["DEPTH"], dry["HEADS"], dry["SSL_IMAGES"]) == (32, 1, 4, 64)
    assert "NS: [512, 1024, 2048] -> [40, 64, 128]" in changes
    assert largest_n(dry) == 512 and per_class_cap(dry) == 60  # 52 per class, a tenth more, 2 more


def test_scaled_n_keeps_a_balanced_database_possible():
    assert scaled_n(2048) == 2048 // N_DIVISOR
    assert scaled_n(1024) == 64 and scaled_n(512) == 40  # never below 4 images per class
    assert scaled_n(64, n_classes=3) == 12
    assert scaled_n(0) == 0 and scaled_n(None) is None


def test_dry_run_images_link_the_first_images_of_each_class(image_tree, monkeypatch, tmp_path):
    monkeypatch.setenv("VITDSI_DATA_DIR", str(tmp_path / "data"))
    params = {"DATASET": "folder", "DATASET_ROOT": str(image_tree)}
    tree = dry_run_images(params, per_class=5)
    files, classes, labels = list_image_files(tree)
    assert classes == ["alpha", "beta", "gamma"] and [labels.count(i) for i in range(3)] == [5, 5, 5]
    original, _, _ = list_image_files(image_tree)
    firsts = sorted(f for f in original if f.startswith("alpha/"))[:5]
    assert sorted(f"alpha/{(tree / f).resolve().name}" for f in files[:5]) == firsts
    assert all((tree / f).is_symlink() for f in files)
    assert dry_run_images(params, per_class=5) == tree  # written once, then reused


# ------------------------------------------------------------------------------------------
# Every notebook of the paper grid, end to end
# ------------------------------------------------------------------------------------------
def dry_run_environment(monkeypatch, tmp_path, imagenette_dir) -> None:
    """Images from the shared copy, reports and data in ``tmp_path``, one torch thread per notebook kernel
    (tiny models gain nothing from a second one, and OpenMP threads stall when other jobs share the cores)."""
    monkeypatch.setenv("VITDSI_IMAGENETTE_DIR", str(imagenette_dir))
    monkeypatch.setenv("VITDSI_REPORTS_DIR", str(tmp_path / "reports"))
    monkeypatch.setenv("VITDSI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernels inherit it


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.imagenette
def test_paper_dry_run_end_to_end(imagenette_dir, monkeypatch, tmp_path):
    dry_run_environment(monkeypatch, tmp_path, imagenette_dir)
    assert cli.main(["study", "--profile", "paper", "--dry-run", "--quiet"]) == 0
    out = tmp_path / "reports" / "paper-dry-run"
    dry, _ = dry_run_parameters(load_profile("paper"))

    timings = pd.read_csv(out / "timings.csv")
    assert timings["notebook"].tolist() == [p.stem for p in study_notebooks()]
    assert (timings["status"] == "ok").all()
    assert any((tmp_path / "data" / "runs" / "paper-dry-run").glob("*/fine_tuned.pt"))

    grid = {(n, ids, seed) for n in dry["NS"] for ids in dry["ID_SCHEMES"] for seed in dry["SEEDS"]}
    table1 = pd.read_csv(out / "tables" / "table1.csv")
    for model in ("DSI zero-shot", "DSI fine-tuned"):
        rows = table1[table1["model"] == model]
        assert set(zip(rows["n"], rows["ids"], rows["seed"])) == grid, model
    assert set(zip(*table1[table1["model"] == "BoVW"][["n", "seed"]].T.values)) == {
        (n, s) for n in dry["NS"] for s in dry["SEEDS"]
    }
    ids = pd.read_csv(out / "tables" / "ids.csv")
    assert set(ids["ids"]) == set(dry["IDS_SCHEMES"]) and set(ids["n"]) == set(dry["IDS_NS"])
    assert set(ids["model"]) == {"DSI zero-shot", "DSI fine-tuned", "DSI multi-task"}
    ablations = pd.read_csv(out / "tables" / "ablations.csv")
    assert set(ablations["factor"]) == {"default", *dry["ABLATION_FACTORS"]}
    scale = pd.read_csv(out / "tables" / "scale_latency.csv")
    assert len(set(scale["n"])) == len(dry["SCALE_NS"])  # 0 became the number of linked images
    incremental = pd.read_csv(out / "tables" / "incremental.csv")
    assert {0, 1, 4} <= set(incremental["replay_ratio"].dropna())
    dense_init = pd.read_csv(out / "tables" / "dense_init.csv")
    assert set(dense_init["seed"]) == set(dry["SEEDS"]) and set(dense_init["n"]) == set(dry["NS"])

    readme = (out / "README.md").read_text()
    assert "**Dry run**" in readme and "NS: [512, 1024, 2048] -> [40, 64, 128]" in readme
    assert "vitdsi study --profile paper --dry-run" in readme


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.imagenette
def test_paper_cpu_dry_run_end_to_end(imagenette_dir, monkeypatch, tmp_path):
    """The 160 px profile's own paths: a chosen set of notebooks, atomic multi-task models only, no dense-init DSI."""
    dry_run_environment(monkeypatch, tmp_path, imagenette_dir)
    assert cli.main(["study", "--profile", "paper-cpu", "--dry-run", "--quiet"]) == 0
    out = tmp_path / "reports" / "paper-cpu-dry-run"
    timings = pd.read_csv(out / "timings.csv").set_index("notebook")["status"]
    assert set(timings[timings == "not in profile"].index.str[:2]) == {"09", "10", "11", "12", "13"}
    assert (timings[timings != "not in profile"] == "ok").all()
    every = pd.read_csv(out / "tables" / "dense_init.csv")  # 14's table: every model on the same databases
    models = {"BoVW", "Dense (contrastive ViT)", "DSI zero-shot", "DSI fine-tuned", "DSI multi-task"}
    assert models <= set(every["model"])
    assert set(every.loc[every["model"] == "DSI multi-task", "ids"]) == {"atomic"}
    assert set(every.loc[every["model"] == "DSI multi-task", "n"]) == {40, 64, 128}
    assert not every["model"].str.contains("dense init").any()  # INIT_SCHEMES is empty: 14 only gathers
    target3 = pd.read_csv(out / "tables" / "target3.csv")
    assert "DSI multi-task" in set(target3["model"])
    readme = (out / "README.md").read_text()
    assert "## Every model of the study" in readme and "Not run: 09_clusters" in readme


def test_every_profile_is_known():
    assert {"smoke", "cpu", "paper", "paper-cpu"} <= set(known_profiles())


def test_run_study_refuses_notebooks_the_study_lacks(tmp_path):
    with pytest.raises(ValueError, match="NOTEBOOKS: '99' names no notebook"):
        run_study({"PROFILE": "x", "NOTEBOOKS": ["99"]}, out_root=tmp_path / "out", progress=False)
