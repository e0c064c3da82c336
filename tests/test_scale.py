"""The scale study: databases that index everything, query views, latency rows, the figure."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from vitdsi_utils.data.database import index_all_database, query_views
from vitdsi_utils.data.images import ImageSet
from vitdsi_utils.ids.codec import make_codec
from vitdsi_utils.model.decoding import indexing_accuracy
from vitdsi_utils.retrieval.latency import METHODS
from vitdsi_utils.studies.scale_report import scale_figure, scale_markdown
from vitdsi_utils.studies.scale_tables import geometric_ns, ia_table, latency_table, reusable_latency
from vitdsi_utils.training.checkpoint import CheckpointError
from vitdsi_utils.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32
TINY = dict(patch_size=16, dim=32, mlp_dim=64, depth=1, heads=2)


def synthetic_set(per_class: tuple[int, ...] = (30, 30, 25), seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(per_class)), per_class)
    images = rng.integers(0, 256, (len(labels), SIZE, SIZE, 3), dtype=np.uint8)
    return ImageSet(
        images=images,
        labels=labels,
        classes=[f"c{i}" for i in range(len(per_class))],
        files=[f"img{i}.png" for i in range(len(labels))],
        source="synthetic",
    )


def test_geometric_series_ends_at_the_whole_set():
    assert geometric_ns(512, 13_394) == [512, 1024, 2048, 4096, 8192, 13_394]
    assert geometric_ns(100, 100) == [100]
    with pytest.raises(ValueError):
        geometric_ns(100, 50)


def test_index_all_database_indexes_every_image():
    image_set = synthetic_set()
    db = index_all_database(image_set, len(image_set), id_scheme="random", seed=3)
    assert db.n_index == len(image_set) and set(db.manifest["role"]) == {"index"}
    assert sorted(db.manifest["source_row"]) == list(range(len(image_set)))  # each image once
    assert list(db.manifest["row"]) == list(range(len(image_set)))
    # images follow the manifest's rows
    assert np.array_equal(db.images, image_set.images[db.manifest["source_row"].to_numpy()])
    assert db.settings["index_fraction"] == 1.0


def test_index_all_database_balances_and_is_seeded():
    image_set = synthetic_set()
    db = index_all_database(image_set, 60, id_scheme="clustered", seed=0)
    assert db.manifest["label"].value_counts().sort_index().tolist() == [20, 20, 20]
    # clustered: classes in consecutive blocks
    assert list(db.manifest["label"]) == sorted(db.manifest["label"])
    again = index_all_database(image_set, 60, id_scheme="clustered", seed=0)
    other = index_all_database(image_set, 60, id_scheme="clustered", seed=1)
    assert again.manifest.equals(db.manifest)
    assert not other.manifest["source_row"].equals(db.manifest["source_row"])
    with pytest.raises(ValueError, match="n must lie"):
        index_all_database(image_set, len(image_set) + 1)


def test_query_views_are_flipped_indexed_images():
    db = index_all_database(synthetic_set(), 40, seed=0)
    queries = query_views(db, 8, seed=5)
    assert queries.shape == (8, SIZE, SIZE, 3) and queries.dtype == np.uint8
    unflipped = queries[:, :, ::-1]
    assert all(any(np.array_equal(q, im) for im in db.images) for q in unflipped)
    assert np.array_equal(queries, query_views(db, 8, seed=5))


def test_latency_table_has_a_row_per_n_and_method():
    image_set = synthetic_set()
    table = latency_table(
        image_set,
        [20, 60],
        n_queries=4,
        batch_size=4,
        k=10,
        repeats=1,
        model_overrides=TINY,
        bovw_words=8,
        progress=False,
    )
    assert len(table) == 6
    assert set(table["method"]) == set(METHODS)
    assert (table["ms_per_query"] > 0).all() and (table["cpu_ms_per_query"] > 0).all() and (table["build_s"] >= 0).all()
    fig = scale_figure(table, pd.DataFrame({"n": [20], "IA@1": [0.5], "epochs": [3], "train_s": [1.0]}))
    assert len(fig.axes) == 2 and fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"
    assert "DSI beam search" in scale_markdown(table, None, {"size": SIZE, "k": 10})


def test_ia_table_trains_and_reports_the_target(tmp_path):
    image_set = synthetic_set()
    config = TrainConfig(lr=3e-3, batch_size=8, epochs=2, target_accuracy=0.99, progress=False, device="cpu")
    ia, histories = ia_table(image_set, [12], index_config=config, model_overrides=TINY, runs_dir=tmp_path)
    row = ia.iloc[0]
    assert row["n"] == 12 and row["epochs"] == 2 and 0 <= row["IA@1"] <= 1
    assert row["reached"] == (row["IA@1"] >= 0.99)
    assert set(histories["n"]) == {12}
    # a second call loads the saved model instead of training again
    again, _ = ia_table(image_set, [12], index_config=config, model_overrides=TINY, runs_dir=tmp_path)
    assert again.iloc[0]["IA@1"] == row["IA@1"] and again.iloc[0]["train_s"] == pytest.approx(row["train_s"])


def test_indexing_accuracy_of_an_untrained_model_is_low():
    codec = make_codec(50)
    from vitdsi_utils.model.vit import DSIConfig, DSIModel

    torch.manual_seed(0)
    model = DSIModel(DSIConfig.from_codec(codec, image_size=SIZE, **TINY))
    images = synthetic_set().images[:50]
    assert indexing_accuracy(model, codec, images, beam_size=10) < 0.2


def test_cli_scale_latency_only(tmp_path, capsys, run_recipe):
    out = tmp_path / "scale"
    code = run_recipe(
        {
            "study": "scale",
            "source": "digits",
            "size": 32,
            "ns": [30, 60],
            "ia_ns": [],
            "model": {"dim": 32, "mlp_dim": 64, "depth": 1, "heads": 2},
            "queries": 4,
            "query_batch": 4,
            "repeats": 1,
            "k": 10,
            "words": 8,
            "out_dir": str(out),
            "runs_dir": str(tmp_path / "runs"),
        }
    )
    assert code == 0
    latency = pd.read_csv(out / "scale_latency.csv")
    assert sorted(set(latency["n"])) == [30, 60] and len(latency) == 6
    assert (out / "scale.png").stat().st_size > 0 and (out / "scale.md").exists()
    assert "scale study done" in capsys.readouterr().out


def test_latency_table_is_reused_only_for_the_same_settings(tmp_path):
    rows = [
        {
            "n": n,
            "method": m,
            "build_s": 1.0,
            "ms_per_query": 2.0,
            "k": 10,
            "queries": 4,
            "batch": 4,
            "repeats": 1,
            "device": "cpu",
            "size": SIZE,
            "cpu_ms_per_query": 1.5,
        }
        for n in (20, 60)
        for m in METHODS
    ]
    path = tmp_path / "scale_latency.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    same = dict(k=10, n_queries=4, batch_size=4, repeats=1, device="cpu", size=SIZE)
    assert len(reusable_latency(path, [20, 60], **same)) == 6
    assert len(reusable_latency(path, [60], **same)) == 3
    assert reusable_latency(path, [20, 100], **same) is None  # an N it lacks
    assert reusable_latency(path, [20], **{**same, "k": 100}) is None  # other settings
    assert reusable_latency(tmp_path / "missing.csv", [20], **same) is None


def test_ia_table_reports_the_trained_settings_and_keeps_a_remeasured_ia(tmp_path, monkeypatch):
    """A run stopped by the cheap "eval" rule gets IA@1 by beam search once; a rerun reads it back."""
    image_set = synthetic_set()
    config = TrainConfig(
        lr=3e-3, batch_size=8, epochs=2, target_accuracy=0.99, stop_metric="eval", progress=False, device="cpu"
    )
    ia, _ = ia_table(image_set, [12], index_config=config, model_overrides=TINY, runs_dir=tmp_path, beam_size=10)
    row = ia.iloc[0]
    assert (row["batch_size"], row["lr"], row["stop_rule"], row["ia_beam"]) == (8, 3e-3, "eval", 10)
    saved = list(tmp_path.glob("*/ia1_beam10.json"))
    assert len(saved) == 1
    calls = []
    monkeypatch.setattr("vitdsi_utils.studies.scale_tables.indexing_accuracy", lambda *a, **k: calls.append(1) or 0.5)
    # another requested batch size would be another model: the saved one is refused, not relabelled
    other = TrainConfig(
        lr=3e-3, batch_size=64, epochs=2, target_accuracy=0.99, stop_metric="eval", progress=False, device="cpu"
    )
    with pytest.raises(CheckpointError, match="batch_size: saved 8, requested 64"):
        ia_table(image_set, [12], index_config=other, model_overrides=TINY, runs_dir=tmp_path, beam_size=10)
    # settings that do not shape the model reuse it, and its IA@1 is not measured again
    same = dataclasses.replace(config, eval_batch_size=32, checkpoint_every=5)
    again, _ = ia_table(image_set, [12], index_config=same, model_overrides=TINY, runs_dir=tmp_path, beam_size=10)
    assert not calls and again.iloc[0]["IA@1"] == row["IA@1"] and again.iloc[0]["batch_size"] == 8
    # another beam width is a new measurement
    wider, _ = ia_table(image_set, [12], index_config=config, model_overrides=TINY, runs_dir=tmp_path, beam_size=20)
    assert calls == [1] and wider.iloc[0]["IA@1"] == 0.5 and wider.iloc[0]["ia_beam"] == 20


def test_scale_spec_passes_the_stop_rule():
    from vitdsi_utils.studies.scale import ScaleSpec
    from vitdsi_utils.studies.specs import build_spec

    config = build_spec(ScaleSpec, {"index": {"stop_metric": "eval", "batch_size": 128}}).index
    assert (config.stop_metric, config.batch_size) == ("eval", 128)
    assert (config.epochs, config.device, config.amp) == (100, "auto", True)  # the study's defaults stay
    assert build_spec(ScaleSpec, {}).index.stop_metric == "ia"


def test_latency_table_times_every_k_with_one_build(monkeypatch, tmp_path):
    """Top-10 and top-100 beside each other (issue 17): one build per (N, method), a row per k."""
    from vitdsi_utils.studies import scale_tables as scale_module

    image_set = synthetic_set()
    builds = []
    bovw_rows = scale_module.bovw_latency_rows
    monkeypatch.setattr(scale_module, "bovw_latency_rows", lambda *a, **kw: builds.append(1) or bovw_rows(*a, **kw))
    table = latency_table(
        image_set,
        [20, 60],
        n_queries=4,
        batch_size=4,
        k=[3, 10],
        repeats=1,
        model_overrides=TINY,
        bovw_words=8,
        progress=False,
    )
    assert len(table) == 12 and builds == [1, 1]
    assert sorted(set(zip(table["n"], table["method"], table["k"]))) == sorted(
        (n, m, k) for n in (20, 60) for m in METHODS for k in (3, 10)
    )
    fig = scale_figure(table)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "DSI beam search, top-3" in labels and "Dense (FAISS), top-10" in labels
    text = scale_markdown(table, None, {"size": SIZE})
    assert "Top-3:" in text and "Top-10:" in text and "At N = 60, top-10: DSI beam search" in text
    assert "x dense search" in text
    # a table with both list lengths is reusable for both, not for another set
    path = tmp_path / "scale_latency.csv"
    table.to_csv(path, index=False)
    same = dict(n_queries=4, batch_size=4, repeats=1, device="cpu", size=SIZE)
    assert len(reusable_latency(path, [20, 60], k=[3, 10], **same)) == 12
    assert reusable_latency(path, [20, 60], k=10, **same) is None
    assert reusable_latency(path, [20, 60], k=[10, 100], **same) is None


def test_cli_scale_keep_ia_redraws_the_figure_without_training(tmp_path, run_recipe):
    out = tmp_path / "scale"
    out.mkdir()
    ia = pd.DataFrame({"n": [30], "IA@1": [0.97], "epochs": [12], "train_s": [60.0], "reached": [True]})
    ia.to_csv(out / "scale_ia.csv", index=False)
    before = (out / "scale_ia.csv").read_text()
    code = run_recipe(
        {
            "study": "scale",
            "source": "digits",
            "size": 32,
            "ns": [30],
            "ia_ns": [30],
            "keep_ia": True,
            "model": {"dim": 32, "mlp_dim": 64, "depth": 1, "heads": 2},
            "queries": 4,
            "query_batch": 4,
            "repeats": 1,
            "k": [5, 10],
            "words": 8,
            "out_dir": str(out),
            "runs_dir": str(tmp_path / "runs"),
        }
    )
    assert code == 0 and not (tmp_path / "runs").exists()  # nothing trained
    assert (out / "scale_ia.csv").read_text() == before
    latency = pd.read_csv(out / "scale_latency.csv")
    assert sorted(set(latency["k"])) == [5, 10] and len(latency) == 6
    text = (out / "scale.md").read_text()
    assert "Top-5:" in text and "0.97" in text


def test_a_profiles_run_writes_its_report_files_and_leaves_out_an_n_beyond_the_images(tmp_path):
    """Notebook 11: tables/ and figures/ of the profile's report, the run folders of its runs, a note per N left out."""
    from vitdsi_utils.runs import StudyPaths
    from vitdsi_utils.studies import scale
    from vitdsi_utils.studies.specs import notebook_spec

    params = dict(
        DATASET="digits",
        DATASET_NAME="tiny-digits",
        SIZE=32,
        SEEDS=[0],
        PATCH_SIZE=16,
        DIM=32,
        MLP_DIM=64,
        DEPTH=1,
        HEADS=2,
        POS_ENCODING="learned",
        SCALE_NS=[30, 99_999],
        SCALE_IA_NS=[30],
        SCALE_INDEX_EPOCHS=1,
        SCALE_QUERIES=4,
        SCALE_REPEATS=1,
        K=10,
        BOVW_WORDS=8,
        OUT_DIR="ignored: not a spec key",
    )
    spec = notebook_spec(scale.ScaleSpec, params)
    assert spec.model.pos_encoding == "learned" and spec.name == "tiny-digits" and spec.query_batch == 4
    paths = StudyPaths.create("tiny", tmp_path / "out", tmp_path / "runs")
    result = scale.run(spec, paths)
    assert "left out N = [99999]" in result.notes[0]
    assert sorted(set(result.latency["n"])) == [30] and list(result.ia["n"]) == [30]
    for name in ("scale_latency.csv", "scale_latency.md", "scale_ia.csv", "scale_ia.md"):
        assert (paths.tables / name).is_file(), name
    assert (paths.figures / "scale.png").stat().st_size > 0
    assert not (paths.out / "scale.md").exists(), "a recipe's file, not the profile report's"
    assert [p.name for p in paths.runs.iterdir()] == ["scale-tiny-digits-32px-I30-random-seed0"]
    assert "tiny-digits at 32 px" in result.markdown


def test_a_recipe_may_not_set_the_profiles_dataset_name(tmp_path, run_recipe):
    code = run_recipe({"study": "scale", "source": "digits", "size": 32, "name": "x", "out_dir": str(tmp_path)})
    assert code == 2
