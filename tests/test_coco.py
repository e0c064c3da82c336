"""The COCO variant: label sets from COCO-format annotations, multi-label relevance everywhere.

Relevance for COCO: a database image is relevant to a query when the two share at least one
object category. The cases below are small enough to compute by hand.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_coco_fixture

from vitdsi_utils import metrics
from vitdsi_utils.cli import main
from vitdsi_utils.data.coco import read_coco_annotations
from vitdsi_utils.data.database import balanced_quota, build_database
from vitdsi_utils.data.files import load_image
from vitdsi_utils.data.images import ImageSet, label_matrix_from_sets, load_images, primary_labels
from vitdsi_utils.data.relevance import label_relevance
from vitdsi_utils.evaluation import evaluate_bovw, evaluate_dsi
from vitdsi_utils.reports.paper import attach_paper

CAR, BOAT, CAT, DOG, TOOTHBRUSH = range(5)  # labels of the fixture's categories, in COCO id order


def load_fixture(coco_dir: dict, size: int = 32) -> ImageSet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture's unreadable and unannotated files are checked elsewhere
        return load_images("coco", size, root=coco_dir["images"], annotations=coco_dir["annotations"], progress=False)


def multilabel_set(label_sets: list[tuple[int, ...]], classes: list[str]) -> ImageSet:
    """A synthetic multi-label ImageSet (tiny blank images): only the labels matter."""
    matrix = label_matrix_from_sets(label_sets, len(classes))
    return ImageSet(
        images=np.zeros((len(label_sets), 2, 2, 3), dtype=np.uint8),
        labels=primary_labels(matrix),
        classes=classes,
        files=[f"img{i:03d}.jpg" for i in range(len(label_sets))],
        source="synthetic-multilabel",
        label_matrix=matrix,
    )


@pytest.fixture(scope="module")
def skewed_db():
    """Four categories a, b, c, d; primary counts a 30, b 30, c 30, d 14 (see the quota test)."""
    sets = [(0,)] * 30 + [(1,)] * 30 + [(0, 2)] * 30 + [(2, 3)] * 4 + [(1, 3)] * 10
    image_set = multilabel_set(sets, ["a", "b", "c", "d"])
    return image_set, build_database(image_set, 100, id_scheme="clustered", seed=0)


# ---------------------------------------------------------------- reading COCO annotations
def test_coco_source_gives_label_sets_and_leaves_out_unannotated_images(coco_dir):
    with pytest.warns(UserWarning) as record:
        image_set = load_images(
            "coco", 32, root=coco_dir["images"], annotations=coco_dir["annotations"], progress=False
        )
    messages = [str(w.message) for w in record]
    assert any("left out 2 of 20 images of instances_fixture.json" in m for m in messages)
    assert any("skipped 1 unreadable" in m and "corrupt.jpg" in m for m in messages)

    assert image_set.is_multilabel and image_set.source == "coco"
    assert image_set.classes == ["car", "boat", "cat", "dog", "toothbrush"]  # by COCO id, not file order
    assert image_set.unannotated == ["empty_a.png", "empty_b.png"]
    assert image_set.skipped == ["corrupt.jpg"] and image_set.dropped_aspect == 1  # wide.png
    assert len(image_set) == 16 and image_set.images.shape == (16, 32, 32, 3)
    names = image_set.classes
    for i, file in enumerate(image_set.files):
        expected = set(coco_dir["labels"][file])
        assert {names[j] for j in np.flatnonzero(image_set.label_matrix[i])} == expected, file
    # images showing each category: car, boat, cat 6 each, dog 8, toothbrush never annotated
    assert image_set.category_counts().tolist() == [6, 6, 6, 8, 0]
    # primary = rarest category; car, boat and cat tie at 6, so the lower label wins
    primary = dict(zip(image_set.files, image_set.labels))
    assert primary["000_6.jpg"] == CAR  # car + cat + dog
    assert primary["001_7.jpg"] == BOAT  # boat + dog
    assert primary["000_4.jpg"] == CAT  # cat + dog
    assert image_set.class_counts().tolist() == [6, 4, 4, 2, 0]


def test_coco_paths_come_from_the_environment(coco_dir, monkeypatch):
    monkeypatch.delenv("VITDSI_COCO_IMAGES", raising=False)
    monkeypatch.delenv("VITDSI_COCO_ANNOTATIONS", raising=False)
    with pytest.raises(FileNotFoundError, match="VITDSI_COCO_IMAGES and VITDSI_COCO_ANNOTATIONS not set"):
        load_images("coco", 32)
    monkeypatch.setenv("VITDSI_COCO_IMAGES", str(coco_dir["images"]))
    with pytest.raises(FileNotFoundError, match="VITDSI_COCO_ANNOTATIONS not set"):
        load_images("coco", 32)
    monkeypatch.setenv("VITDSI_COCO_ANNOTATIONS", str(coco_dir["annotations"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(load_images("coco", 32, progress=False)) == 16
    # a folder that holds none of the annotated files is named as the likely mistake
    monkeypatch.setenv("VITDSI_COCO_IMAGES", str(coco_dir["annotations"].parent))
    with pytest.raises(FileNotFoundError, match="does VITDSI_COCO_IMAGES name the folder"):
        load_images("coco", 32)


def test_bad_annotation_files_are_named(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="no list 'categories'"):
        read_coco_annotations(path)
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg"}],
                "annotations": [{"id": 7, "image_id": 1, "category_id": 99}],
                "categories": [{"id": 1, "name": "person"}],
            }
        )
    )
    with pytest.raises(ValueError, match="annotation 7 refers to category id 99"):
        read_coco_annotations(path)
    path.write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_coco_annotations(path)


def test_coco_cache_skips_parsing_and_decoding_until_the_annotations_change(coco_dir, monkeypatch):
    first = load_fixture(coco_dir)
    decoded = []
    real_load_image = load_image
    monkeypatch.setattr(
        "vitdsi_utils.data.decode.load_image", lambda *a, **k: decoded.append(a) or real_load_image(*a, **k)
    )

    def no_parse(*args, **kwargs):
        raise AssertionError("the annotations were parsed again despite the cached summary")

    monkeypatch.setattr("vitdsi_utils.data.coco.parse_coco_annotations", no_parse)
    second = load_fixture(coco_dir)
    assert decoded == [] and second.files == first.files
    assert np.array_equal(second.label_matrix, first.label_matrix) and np.array_equal(second.images, first.images)

    # a dog is annotated in a car-only image: the new label set must be read
    monkeypatch.undo()
    annotations = json.loads(coco_dir["annotations"].read_text())
    image_id = next(i["id"] for i in annotations["images"] if i["file_name"] == "000_0.jpg")
    annotations["annotations"].append({"id": 10_000, "image_id": image_id, "category_id": 18})
    coco_dir["annotations"].write_text(json.dumps(annotations))
    third = load_fixture(coco_dir)
    row = third.files.index("000_0.jpg")
    assert np.flatnonzero(third.label_matrix[row]).tolist() == [CAR, DOG]


# ---------------------------------------------------------------- primary labels and the database
def test_primary_label_is_the_rarest_with_ties_to_the_lower_label():
    # frequencies: label 0 in 3 images, label 1 in 2, label 2 in 2
    matrix = label_matrix_from_sets([(0,), (0, 1), (0, 1, 2), (2,)], 3)
    assert primary_labels(matrix).tolist() == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="at least one label"):
        primary_labels(label_matrix_from_sets([(0,), ()], 2))


def test_balanced_quota_fills_rare_classes_and_shares_the_rest():
    assert balanced_quota([30, 30, 30, 14], 100).tolist() == [29, 29, 28, 14]
    assert balanced_quota([90, 60, 60, 30], 200).tolist() == [57, 57, 56, 30]
    # where equal shares fit, the plain balanced split: the first classes take the remainder
    assert balanced_quota([50, 40, 40], 100).tolist() == [34, 33, 33]
    with pytest.raises(ValueError, match="cannot draw 101"):
        balanced_quota([50, 50], 101)


def test_multilabel_database_balances_primary_categories_as_far_as_the_data_allows(skewed_db):
    image_set, db = skewed_db
    assert image_set.class_counts().tolist() == [30, 30, 30, 14]  # {a,c} -> c, {c,d} and {b,d} -> d
    assert db.is_multilabel and len(db.manifest) == 100 and db.n_index == 25
    assert db.counts().sum(axis=1).to_dict() == {"a": 29, "b": 29, "c": 28, "d": 14}
    assert db.manifest["source_row"].is_unique
    # the label columns of the manifest hold each image's whole set
    for row in db.manifest.itertuples():
        assert row.labels == ";".join(map(str, np.flatnonzero(image_set.label_matrix[row.source_row])))
        assert row.categories == ";".join(image_set.classes[int(j)] for j in row.labels.split(";"))
    # clustered IDs: indexed images grouped by primary category, in label order
    assert (np.diff(db.index_labels) >= 0).all()
    random_ids = build_database(image_set, 100, id_scheme="random", seed=0)
    key = ["source_row", "role"]
    assert set(map(tuple, db.manifest[key].values)) == set(map(tuple, random_ids.manifest[key].values))
    # a single-label source still refuses an unbalanced N
    single = ImageSet(image_set.images, image_set.labels, image_set.classes, image_set.files, "single")
    with pytest.raises(ValueError, match="between 16 and 59"):
        build_database(single, 100)


def test_relevance_is_a_shared_label_not_the_same_primary_label(skewed_db):
    _, db = skewed_db
    relevant = db.relevance("test")

    def sets(role):
        return [set(s.split(";")) for s in db.manifest.loc[db.manifest["role"] == role, "labels"]]

    expected = np.array([[bool(q & d) for d in sets("index")] for q in sets("test")])
    np.testing.assert_array_equal(relevant, expected)
    same_primary = db.split("test")[1][:, None] == db.index_labels[None, :]
    assert (relevant >= same_primary).all() and (relevant > same_primary).any()


def test_manifest_lists_unannotated_and_unreadable_images(coco_dir, tmp_path):
    db = build_database(load_fixture(coco_dir), 16, seed=0)
    table = pd.read_csv(db.save_manifest(tmp_path / "m.csv"), keep_default_na=False)
    assert sorted(table.loc[table["role"] == "unannotated", "file"]) == ["empty_a.png", "empty_b.png"]
    assert table.loc[table["role"] == "skipped", "file"].tolist() == ["corrupt.jpg"]
    listed = table[table["role"].isin(["index", "train", "val", "test"])]
    assert len(listed) == 16 and {"labels", "categories"} <= set(table.columns)
    row = listed.set_index("file").loc["000_6.jpg"]
    assert (row["labels"], row["categories"], row["class"]) == ("0;2;3", "car;cat;dog", "car")


# ---------------------------------------------------------------- metrics with label sets
def test_recall_and_ap_count_every_image_sharing_a_label():
    # database rows: {cat}, {dog}, {cat, dog}, {car}, {boat, car}; labels car=0, boat=1, cat=2, dog=3
    db_sets = label_matrix_from_sets([(CAT,), (DOG,), (CAT, DOG), (CAR,), (BOAT, CAR)], 4)
    query_sets = label_matrix_from_sets([(DOG, BOAT), (CAR,)], 4)
    relevant = label_relevance(query_sets, db_sets, kind="multi-hot")
    np.testing.assert_array_equal(relevant, [[0, 1, 1, 0, 1], [0, 0, 0, 1, 1]])
    ranked = np.array([[3, 2, 0, 4, 1], [4, 0, 3, 1, 2]])
    hits = metrics.relevance_matrix(ranked, relevant)
    n_relevant = relevant.sum(axis=1)
    np.testing.assert_allclose(metrics.recall_at_k(hits, n_relevant, 2), [1 / 3, 1 / 2])
    # AP@5: query 0 hits at ranks 2, 4, 5 of |R| = 3; query 1 at ranks 1, 3 of |R| = 2
    np.testing.assert_allclose(
        metrics.average_precision_at_k(hits, n_relevant, 5), [(1 / 2 + 2 / 4 + 3 / 5) / 3, (1 + 2 / 3) / 2]
    )
    table = metrics.evaluate_ranking(ranked, relevant, ks_precision=(2,), ks_recall=(2,), ks_map=(5,)).set_index(
        "metric"
    )
    assert table.at["R@2", "value"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert table.at["mAP@5", "value"] == pytest.approx(((1 / 2 + 2 / 4 + 3 / 5) / 3 + (1 + 2 / 3) / 2) / 2)
    assert table.at["P@2", "chance"] == pytest.approx((3 / 5 + 2 / 5) / 2)
    # the same answer from label sets given as Python sets
    as_sets = label_relevance(
        [frozenset({"dog", "boat"}), frozenset({"car"})],
        [
            frozenset({"cat"}),
            frozenset({"dog"}),
            frozenset({"cat", "dog"}),
            frozenset({"car"}),
            frozenset({"boat", "car"}),
        ],
        kind="sets",
    )
    np.testing.assert_array_equal(as_sets, relevant)
    with pytest.raises(ValueError, match="same number of columns"):
        label_relevance(query_sets, db_sets[:, :3], kind="multi-hot")


def test_bovw_and_dsi_are_scored_with_multilabel_relevance(tmp_path, one_torch_thread):
    from vitdsi_utils.ids.codec import make_codec
    from vitdsi_utils.model.decoding import beam_search
    from vitdsi_utils.phases import new_model

    db = build_database(load_fixture(write_coco_fixture(tmp_path / "coco", repeats=5)), 40, seed=0)
    assert (db.n_index, len(db.split("test")[0])) == (10, 3)
    relevant = db.relevance("test")
    expected_chance = relevant.sum(axis=1).mean() / db.n_index  # P@10 of a random ranking, k >= n_index

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few tiny images give no SIFT keypoints
        result = evaluate_bovw(db, n_words=8, progress=False)
        _, ranked = result.model.search(db.split("test")[0], 100)
    table = result.table.set_index("metric")
    hits = metrics.relevance_matrix(ranked, relevant)
    assert table.at["P@10", "value"] == pytest.approx(hits[:, :10].sum(axis=1).mean() / 10)
    assert table.at["P@10", "chance"] == pytest.approx(expected_chance)

    codec = make_codec(db.n_index)
    torch.manual_seed(0)
    model = new_model(db, codec, patch_size=16, dim=16, mlp_dim=32, depth=1, heads=2).eval()
    table, _ = evaluate_dsi(model, codec, db, k=db.n_index)
    table = table.set_index("metric")
    _, ranked = beam_search(model, torch.from_numpy(db.split("test")[0]), codec, k=db.n_index)
    hits = metrics.relevance_matrix(ranked.numpy(), relevant)
    ap = metrics.average_precision_at_k(hits, relevant.sum(axis=1), 10)
    assert table.at["mAP@10", "value"] == pytest.approx(np.nanmean(ap))
    assert table.at["P@10", "chance"] == pytest.approx(expected_chance)
    assert {"IA@1", "IA@5"} <= set(table.index)  # indexing accuracy does not involve labels


def test_paper_numbers_are_not_put_beside_coco_results():
    rows = pd.DataFrame(
        {
            "metric": ["paper R@100 (10 queries)"] * 2,
            "model": "BoVW",
            "n": 512,
            "ids": "-",
            "source": ["imagenette", "coco"],
            "value": [0.5, 0.5],
        }
    )
    merged = attach_paper(rows).set_index("source")
    assert merged.at["imagenette", "paper"] == 0.875 and np.isnan(merged.at["coco", "paper"])


# ---------------------------------------------------------------- fine-tuning pairs and the demo
def test_fine_tuning_pairs_follow_multilabel_relevance(skewed_db, one_torch_thread):
    from vitdsi_utils.ids.codec import make_codec
    from vitdsi_utils.phases import fine_tune, new_model
    from vitdsi_utils.training.config import TrainConfig
    from vitdsi_utils.training.tasks import RetrievalPairs, relevant_pairs

    _, db = skewed_db
    relevant = db.relevance("train")
    query_idx, rows = relevant_pairs(db.relevance_labels("train"), db.relevance_labels("index"))
    assert set(zip(query_idx.tolist(), rows.tolist())) == set(zip(*np.nonzero(relevant)))

    capped = RetrievalPairs.from_labels(
        torch.from_numpy(db.split("train")[0]),
        db.relevance_labels("train"),
        db.relevance_labels("index"),
        max_pairs_per_query=3,
        seed=1,
    )
    per_query = np.bincount(capped.query_idx.numpy(), minlength=len(relevant))
    np.testing.assert_array_equal(per_query, np.minimum(relevant.sum(axis=1), 3))
    assert relevant[capped.query_idx.numpy(), capped.rows.numpy()].all()

    # fine_tune trains on exactly these pairs (one epoch of a tiny model), more than the same primary label gives
    codec = make_codec(db.n_index)
    model = new_model(db, codec, patch_size=2, dim=16, mlp_dim=32, depth=1, heads=2)
    tuned = fine_tune(db, model, config=TrainConfig(epochs=1, progress=False))
    same_primary = db.split("train")[1][:, None] == db.index_labels[None, :]
    assert tuned.history.last("train")["n_examples"] == relevant.sum() > same_primary.sum()


def test_demo_marks_results_sharing_any_category(skewed_db):
    from vitdsi_utils.demo import QueryDemo

    class FirstRows:
        def search(self, images, k):
            return np.zeros((len(images), k)), np.tile(np.arange(k), (len(images), 1))

    _, db = skewed_db
    demo = QueryDemo(db, {"first rows": FirstRows()}, k=20, max_k=25)
    relevant = db.relevance("test")
    for i in range(len(relevant)):
        demo.select_query(i)
        assert [demo.is_relevant(r) for r in range(db.n_index)] == relevant[i].tolist()
    labels = db.manifest.loc[db.manifest["role"] == "test", "categories"].iloc[-1]
    assert demo.query_title == f"test query {len(relevant) - 1}: " + " + ".join(labels.split(";"))


@pytest.mark.filterwarnings("ignore:left out:UserWarning", "ignore:skipped 1 unreadable:UserWarning")
def test_cli_data_writes_coco_manifests(coco_dir, tmp_path, capsys):
    code = main(
        [
            "data",
            "--source",
            "coco",
            "--root",
            str(coco_dir["images"]),
            "--annotations",
            str(coco_dir["annotations"]),
            "--size",
            "32",
            "--n",
            "16",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert "2 left out for having no annotation" in capsys.readouterr().out
    manifest = pd.read_csv(tmp_path / "coco-32px-N16-seed0-clustered.csv", keep_default_na=False)
    assert (manifest["role"] == "unannotated").sum() == 2 and "categories" in manifest.columns


def test_cli_study_passes_the_dataset_override(monkeypatch):
    calls = []
    monkeypatch.setattr("vitdsi_utils.cli.run_study", lambda profile, **kwargs: calls.append((profile, kwargs)))
    assert main(["study", "--profile", "cpu", "--dataset", "coco", "--quiet"]) == 0
    assert calls[0][0] == "cpu" and calls[0][1]["overrides"] == {"DATASET": "coco"}
    with pytest.raises(SystemExit):  # argparse names the sources it knows
        main(["study", "--dataset", "cifar"])


# ---------------------------------------------------------------- the whole study on COCO
@pytest.mark.notebook
@pytest.mark.slow
def test_smoke_study_runs_on_coco(tmp_path, monkeypatch):
    from vitdsi_utils.runner.run import run_study, study_notebooks

    fixture = write_coco_fixture(tmp_path / "coco", repeats=30)  # 240 usable images: N = 200 fits
    monkeypatch.setenv("VITDSI_COCO_IMAGES", str(fixture["images"]))
    monkeypatch.setenv("VITDSI_COCO_ANNOTATIONS", str(fixture["annotations"]))
    monkeypatch.setenv("VITDSI_REPORTS_DIR", str(tmp_path / "reports"))
    timings = run_study("smoke", overrides={"DATASET": "coco", "IMAGENETTE_PREVIEW": False}, progress=False)

    out = tmp_path / "reports" / "smoke-coco"  # the profile's own report folder is left alone
    assert timings["notebook"].tolist() == [p.stem for p in study_notebooks()]
    assert (timings["status"] == "ok").all()
    table1 = pd.read_csv(out / "tables" / "table1.csv")
    assert set(table1["source"]) == {"coco"} and table1["paper"].isna().all()
    assert {"BoVW", "DSI zero-shot", "DSI fine-tuned"} <= set(table1["model"])
    assert table1["value"].dropna().between(0, 1).all()
    for figure in (
        "gallery",
        "split_bar",
        "bovw_vs_n",
        "figure1_indexing",
        "figure2_retrieval_train",
        "figure3_retrieval_val",
        "metric_bars",
        "demo_example",
    ):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000, figure
    manifest = pd.read_csv(out / "tables" / "manifest_coco-32px-N200-clustered-seed0.csv", keep_default_na=False)
    assert (manifest["role"] == "unannotated").sum() == 2 and (manifest["labels"].str.count(";") == 2).any()
    assert "left out for having no annotation" in (out / "notebooks" / "01_data.ipynb").read_text()
    assert "vitdsi study --profile smoke --dataset coco" in (out / "README.md").read_text()
