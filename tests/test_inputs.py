"""Issue 21: what a new user feeds in and what the toolkit says back.

Relevance from explicit label kinds, manifests that keep their format and name every unused file,
messages that are true and said once, metric cells that carry no information marked as such, and
the study on a folder of one's own images.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import textured_image
from PIL import Image

from vitdsi_utils import cli, metrics
from vitdsi_utils.bovw import BoVW, NoKeypointsWarning
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.data.relevance import label_relevance
from vitdsi_utils.evaluation import evaluate_bovw
from vitdsi_utils.model import vit
from vitdsi_utils.reports.paper import table1_markdown
from vitdsi_utils.reports.tables import UNINFORMATIVE_NOTE, metric_cell, write_table
from vitdsi_utils.studies.pretrain_report import indexing_epochs_summary


# ------------------------------------------------------------------------------------------
# Relevance: the caller says what the labels are
# ------------------------------------------------------------------------------------------
def test_label_lists_are_label_sets_when_the_caller_says_so():
    # read as a multi-hot matrix these would make everything relevant; as label sets only {0, 1} & {1, 5} meet
    assert label_relevance([[0, 1], [2, 3]], [[1, 5], [7, 8]], kind="sets").tolist() == [[True, False], [False, False]]


def test_label_lists_without_a_kind_are_refused_as_ambiguous():
    with pytest.raises(ValueError, match=r"say what the labels are: .*kind='class'.*kind='sets'.*kind='multi-hot'"):
        label_relevance([[0, 1], [2, 3]], [[1, 5], [7, 8]])
    with pytest.raises(ValueError, match="say what the labels are"):  # an integer matrix could be either
        label_relevance(np.array([[0, 1], [1, 0]]), np.array([[1, 1], [0, 1]]))


def test_label_lists_are_not_a_multi_hot_matrix():
    with pytest.raises(ValueError, match=r"kind='multi-hot' takes 0/1 .* hold 2; rows of label ids are kind='sets'"):
        label_relevance([[0, 1], [2, 3]], [[1, 5], [7, 8]], kind="multi-hot")
    with pytest.raises(ValueError, match="rows differ in length"):
        label_relevance([[0, 1], [1]], [[1, 0]], kind="multi-hot")


def test_label_sets_of_different_lengths_work():
    relevant = label_relevance([(0,), (1, 2), ()], [(0, 1), (2,), (3, 4, 5)], kind="sets")
    assert relevant.tolist() == [[True, False, False], [True, True, False], [False, False, False]]
    # without kind= they are refused with the choices, never numpy's "inhomogeneous shape"
    with pytest.raises(ValueError, match="say what the labels are"):
        label_relevance([(0,), (1, 2)], [(0, 1), (2,)])


def test_class_ids_against_label_sets_are_refused_not_silently_false():
    with pytest.raises(ValueError, match=r"say what the labels are"):
        label_relevance([0, 1], [{0}, {1}])
    with pytest.raises(ValueError, match=r"kind='class' .* database item 0 is \{0\}; label sets go with kind='sets'"):
        label_relevance([0, 1], [{0}, {1}], kind="class")
    with pytest.raises(ValueError, match=r"kind='sets' .* query item 0 is 0; class ids go with kind='class'"):
        label_relevance([0, 1], [{0}, {1}], kind="sets")
    assert label_relevance([{0}, {1}], [{0}, {1}], kind="sets").tolist() == [[True, False], [False, True]]
    assert label_relevance([0, 1], [0, 1], kind="class").tolist() == [[True, False], [False, True]]


def test_arrays_whose_dtype_says_the_kind_need_no_kind():
    assert label_relevance(np.array([0, 2]), np.array([2, 0, 1])).tolist() == [
        [False, True, False],
        [True, False, False],
    ]
    multi_hot = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
    assert label_relevance(multi_hot, multi_hot).tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match=r"different forms \(class and multi-hot\)"):
        label_relevance(np.array([0, 1]), multi_hot)
    with pytest.raises(ValueError, match="boolean .* is multi-hot; pass kind='multi-hot'"):
        label_relevance(multi_hot, multi_hot, kind="sets")
    with pytest.raises(ValueError, match="unknown relevance kind 'labels'"):
        label_relevance([0], [0], kind="labels")


def test_every_form_of_the_same_labels_gives_the_same_relevance():
    sets_q, sets_db = [{0, 2}, {1}], [{2}, {0, 1}, {3}]
    hot_q = np.array([[1, 0, 1, 0], [0, 1, 0, 0]])
    hot_db = np.array([[0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]])
    expected = label_relevance(sets_q, sets_db, kind="sets")
    np.testing.assert_array_equal(label_relevance(hot_q, hot_db, kind="multi-hot"), expected)
    np.testing.assert_array_equal(label_relevance(hot_q.astype(bool), hot_db.astype(bool)), expected)


# ------------------------------------------------------------------------------------------
# Manifests keep their format, and every unused file is named with its reason
# ------------------------------------------------------------------------------------------
def _bad_entries(root: Path) -> None:
    """One of each kind of file the folder source cannot use, beside the good images."""
    (root / "alpha" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # unreadable
    os.symlink(root / "nowhere.jpg", root / "alpha" / "dangling.jpg")  # a broken symbolic link
    (root / "beta" / "album.jpg").mkdir()  # a directory named like an image
    (root / "beta" / "notes.txt").write_text("shot on a sunny day")  # not an image extension
    Image.new("RGB", (40, 40)).save(root / "stray.png")  # an image outside any class folder
    (root / "gamma" / ".hidden.png").write_bytes(b"")  # hidden: ignored


def test_manifest_columns_stay_integers_after_a_skip(image_tree, tmp_path):
    _bad_entries(image_tree)
    with pytest.warns(UserWarning, match="skipped 5 unreadable"):
        image_set = load_images("folder", 32, root=image_tree, progress=False)
    path = build_database(image_set, 36, seed=0).save_manifest(tmp_path / "manifest.csv")
    text = path.read_text()
    table = pd.read_csv(path, keep_default_na=False)
    assert {c: str(table[c].dtype) for c in ("label", "row", "source_row")} == dict.fromkeys(
        ("label", "row", "source_row"), "int64"
    )
    assert ".0," not in text  # no 2.0 or -1.0 anywhere
    skipped = table[table["role"] == "skipped"].set_index("file")
    assert skipped.loc["alpha/broken.jpg", "label"] == 0 and skipped.loc["alpha/broken.jpg", "class"] == "alpha"
    assert (skipped["row"] == -1).all() and (skipped["source_row"] == -1).all()
    assert list(table.columns) == ["file", "class", "label", "role", "row", "id", "source_row", "reason"]


def test_broken_links_directories_and_other_unused_files_are_named_and_listed(image_tree, tmp_path):
    _bad_entries(image_tree)
    with pytest.warns(UserWarning) as record:
        image_set = load_images("folder", 32, root=image_tree, progress=False)
    messages = [str(w.message) for w in record if "unreadable" in str(w.message)]
    assert len(messages) == 1  # one warning for all of them
    message = messages[0]
    for name in (
        "alpha/broken.jpg",
        "alpha/dangling.jpg (broken symbolic link)",
        "beta/album.jpg (a directory, not an image file)",
        "beta/notes.txt (not an image file extension (.txt))",
        "stray.png (an image outside any class folder)",
        "alpha/alpha_wide.jpg (96 x 48 px)",
    ):
        assert name in message, name
    assert "dropped 3 image(s) whose aspect ratio (width / height) is outside [0.9, 1.1]" in message
    assert ".hidden.png" not in message
    assert image_set.skipped == [
        "alpha/broken.jpg",
        "alpha/dangling.jpg",
        "beta/album.jpg",
        "beta/notes.txt",
        "stray.png",
    ]
    with warnings.catch_warnings(record=True) as again:  # a notebook that loads the images twice says it once
        warnings.simplefilter("always")
        load_images("folder", 32, root=image_tree, progress=False)
    assert not [w for w in again if "unreadable" in str(w.message)]

    table = pd.read_csv(build_database(image_set, 36).save_manifest(tmp_path / "m.csv"), keep_default_na=False)
    reasons = table[~table["role"].isin(["index", "train", "val", "test"])].set_index("file")
    assert reasons.loc["alpha/dangling.jpg", "reason"] == "broken symbolic link"
    assert reasons.loc["beta/album.jpg", "reason"] == "a directory, not an image file"
    assert reasons.loc["stray.png", ["class", "label"]].tolist() == ["", -1]
    assert reasons.loc["gamma/gamma_wide.jpg", "role"] == "dropped"
    assert reasons.loc["gamma/gamma_wide.jpg", "reason"] == "96 x 48 px: aspect 2.00 is outside [0.9, 1.1]"
    assert len(reasons) == 5 + 3  # every unused file, and nothing else


def test_the_data_summary_counts_only_classes_that_have_images(image_tree, capsys):
    empty = image_tree / "delta"
    empty.mkdir()
    for i in range(4):
        (empty / f"broken_{i}.jpg").write_bytes(b"\xff\xd8 garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_set = load_images("folder", 32, root=image_tree, progress=False)
    line = image_set.summary()
    assert line.startswith(
        "36 usable tree images at 32 px in 3 classes (1 of the 4 class folders has no usable image: delta;"
    )
    assert "3 dropped by the aspect rule, 4 unreadable" in line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            cli.main(
                [
                    "data",
                    "--source",
                    "folder",
                    "--root",
                    str(image_tree),
                    "--size",
                    "32",
                    "--n",
                    "36",
                    "--out",
                    str(image_tree.parent / "out"),
                ]
            )
            == 0
        )
    assert "in 3 classes (1 of the 4 class folders has no usable image: delta" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# Messages that are true, each said once
# ------------------------------------------------------------------------------------------
def _zero_shot_rows(rows):
    return pd.DataFrame(
        [
            {
                "model": "DSI zero-shot",
                "init": init,
                "ids": "clustered",
                "metric": "IA@1",
                "value": ia,
                "epochs": epochs,
            }
            for init, ia, epochs in rows
        ]
    )


def test_the_pretrain_summary_never_calls_the_epoch_cap_the_epochs_to_the_target():
    text = indexing_epochs_summary(_zero_shot_rows([("scratch", 0.48, 40), ("ssl", 0.995, 12)]), 0.99, 40)
    assert text == (
        "indexing: from scratch: target IA@1 >= 0.99 not reached, IA@1 0.480 after 40 epochs (the cap); "
        "from the pretrained encoder: 12 epochs to IA@1 >= 0.99 (IA@1 0.995)"
    )
    early = indexing_epochs_summary(_zero_shot_rows([("ssl", 0.97, 25)]), 0.99, 40)
    assert "not reached, IA@1 0.970 after 25 epochs (stopped by the stop check before the cap of 40)" in early


def test_images_smaller_than_the_size_are_upscaled_with_one_warning(tmp_path):
    root = tmp_path / "small"
    rng = np.random.default_rng(0)
    for label, name in enumerate(["ants", "bees"]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(textured_image(rng, (28, 28), label)).save(root / name / f"{i}.png")
    Image.new("RGB", (3, 3), (0, 255, 0)).save(root / "bees" / "speck.png")
    with pytest.warns(UserWarning) as record:
        image_set = load_images("folder", 32, root=root, progress=False)
    messages = [str(w.message) for w in record if "upscaled" in str(w.message)]
    assert messages == [
        "11 of 11 images are smaller than 32 px and were upscaled, so they hold less detail than the image size "
        "suggests: smallest bees/speck.png (3 x 3 px), ants/0.png (28 x 28 px), ants/1.png (28 x 28 px), "
        "ants/2.png (28 x 28 px), ants/3.png (28 x 28 px) and 6 more; no supported size (32, 64, 160, 256 px) "
        "avoids it for all of them"
    ]
    assert len(image_set) == 11
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 48 px images at 32 px: nothing to say
        load_images("folder", 32, root=_textured_tree(tmp_path / "large", side=48), progress=False)


def _textured_tree(root: Path, classes=("ants", "bees", "wasps"), per_class: int = 8, side: int = 40) -> Path:
    rng = np.random.default_rng(1)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(textured_image(rng, (side, side), label)).save(root / name / f"{name}_{i}.png")
    return root


def test_a_patch_grid_of_few_tokens_is_warned_about_once(monkeypatch):
    monkeypatch.setattr(vit, "_WARNED_GRIDS", set())
    with pytest.warns(
        UserWarning,
        match=r"patch_size 16 at 32 px leaves 2 x 2 = 4 token\(s\) per image: .*"
        r"patch_size 8 gives 4 x 4 tokens at this size",
    ):
        vit.ViTConfig(image_size=32, patch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vit.DSIConfig(image_size=32, patch_size=16)  # said once
        vit.ViTConfig(image_size=64, patch_size=16)  # 4 x 4 tokens: fine
    with pytest.warns(
        UserWarning, match=r"patch_size 16 at 48 px leaves 3 x 3 = 9 token\(s\).*patch_size 12 gives 4 x 4"
    ):
        vit.ViTConfig(image_size=48, patch_size=16)


def test_bovw_says_once_that_images_have_no_keypoints_whatever_the_number_of_vocabularies(tmp_path):
    image_set = load_images("folder", 32, root=_textured_tree(tmp_path / "tree"), progress=False)
    image_set.images[::4] = 0  # flat images: no SIFT keypoint
    db = build_database(image_set, 24, seed=0)
    with pytest.warns(NoKeypointsWarning) as record:
        evaluate_bovw(db, n_words=5, vocabularies=3, progress=False)
    database = [w for w in record if "database images have no SIFT keypoints" in str(w.message)]
    assert len(database) == 1


def test_too_many_visual_words_for_a_small_database_says_which_setting_works(tmp_path):
    image_set = load_images("folder", 32, root=_textured_tree(tmp_path / "tree"), progress=False)
    index = build_database(image_set, 24, seed=0).split("index")[0]
    with pytest.raises(
        ValueError,
        match=r"n_words=200 visual words need at least 200 SIFT descriptors, but the 6 "
        r"database images have (\d+) .*Any n_words <= \1 works; n_words=(\d+) gives",
    ) as error:
        BoVW(200, progress=False).fit(index)
    suggested = int(re.search(r"BOVW_WORDS: (\d+)", str(error.value)).group(1))
    assert f"--set words=[{suggested}]" in str(error.value)
    assert BoVW(suggested, progress=False).fit(index).vocabulary_.shape == (suggested, 128)  # and it does work


# ------------------------------------------------------------------------------------------
# Metric cells that carry no information are marked
# ------------------------------------------------------------------------------------------
def _ranking(n_db: int, n_queries: int = 6, k: int = 100, seed: int = 0):
    rng = np.random.default_rng(seed)
    db_labels, query_labels = np.arange(n_db) % 3, np.arange(n_queries) % 3
    ranked = np.stack([rng.permutation(n_db)[:k] for _ in range(n_queries)])
    return ranked, label_relevance(query_labels, db_labels)


def test_recall_at_k_of_every_indexed_image_is_flagged_uninformative():
    ranked, relevant = _ranking(50)  # 50 indexed images, R@100 returns all of them
    table = metrics.evaluate_ranking(ranked, relevant).set_index("metric")
    assert table.at["R@100", "value"] == 1.0 and table.at["R@100", "chance"] == 1.0
    assert table["uninformative"].to_dict() == {
        "P@10": False,
        "R@100": True,
        "mAP@10": False,
        "paper MAP@10 (mean P@10, 10 queries)": False,
        "paper R@100 (10 queries)": True,
    }
    ranked, relevant = _ranking(300)
    assert not metrics.evaluate_ranking(ranked, relevant)["uninformative"].any()  # R@100 of 300: chance 1/3
    ia = metrics.evaluate_indexing(np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1]]), np.arange(3), ks=(1, 5))
    assert ia.set_index("metric")["uninformative"].to_dict() == {"IA@1": False, "IA@5": True}


def test_markdown_tables_mark_uninformative_cells_and_explain_the_mark(tmp_path):
    ranked, relevant = _ranking(50)
    results = metrics.evaluate_ranking(ranked, relevant).assign(model="BoVW", n=200, ids="-", seed=0)
    markdown = table1_markdown(results)
    row = next(line for line in markdown.splitlines() if line.startswith("| BoVW"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[10].startswith("1.000 [") and cells[10].endswith("]†")  # R@100
    assert not cells[9].endswith("†")  # P@10 is informative
    assert markdown.endswith(UNINFORMATIVE_NOTE) and "chance >= 0.999" in UNINFORMATIVE_NOTE
    csv, _ = write_table(results, tmp_path / "table1", markdown=markdown)
    written = pd.read_csv(csv).set_index("metric")
    assert written.at["R@100", "uninformative"] and not written.at["P@10", "uninformative"]
    # a table written before the flag existed is judged by its chance level
    old = results.drop(columns="uninformative").set_index("metric")
    assert metric_cell(old.loc["R@100"]).endswith("†") and not metric_cell(old.loc["P@10"]).endswith("†")
    ranked, relevant = _ranking(300)
    informative = metrics.evaluate_ranking(ranked, relevant).assign(model="BoVW", n=1200, ids="-", seed=0)
    assert "†" not in table1_markdown(informative)


# ------------------------------------------------------------------------------------------
# The study on any source: a folder with its root, COCO with its files
# ------------------------------------------------------------------------------------------
def test_cli_study_passes_the_folder_and_its_root(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("vitdsi_utils.cli.run_study", lambda profile, **kwargs: calls.append(kwargs["overrides"]))
    assert cli.main(["study", "--dataset", "folder", "--root", str(tmp_path), "--dataset-name", "pets", "--quiet"]) == 0
    assert cli.main(["study", "--dataset", "coco", "--root", "imgs", "--annotations", "a.json", "--quiet"]) == 0
    assert calls == [
        {"DATASET": "folder", "DATASET_ROOT": str(tmp_path), "DATASET_NAME": "pets"},
        {"DATASET": "coco", "DATASET_ROOT": "imgs", "DATASET_ANNOTATIONS": "a.json"},
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "folder"], "the folder source needs its images: --root PATH on the command line (DATASET_ROOT"),
        (
            ["--dataset", "folder", "--root", "/no/such/folder"],
            "the image folder /no/such/folder (--root, DATASET_ROOT) does not exist",
        ),
        (["--root", "/tmp"], "the digits source is bundled with scikit-learn and reads no files; drop --root"),
        (
            ["--dataset", "folder", "--root", "/tmp", "--annotations", "x.json"],
            "--annotations (DATASET_ANNOTATIONS) belongs to the coco source",
        ),
        (["--dataset", "coco"], "COCO images are not available"),
    ],
)
def test_a_study_whose_data_cannot_be_read_stops_before_any_notebook(argv, message, monkeypatch, tmp_path, capsys):
    for name in ("VITDSI_COCO_IMAGES", "VITDSI_COCO_ANNOTATIONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VITDSI_REPORTS_DIR", str(tmp_path / "reports"))
    assert cli.main(["study", "--profile", "smoke", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitdsi study: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())  # nothing ran


def test_dataset_names_come_from_the_folder_and_never_say_imagenette(tmp_path):
    from vitdsi_utils.data.images import dataset_name

    assert dataset_name("folder", tmp_path / "my pets") == "my-pets"
    assert dataset_name("folder", tmp_path / "imagenette") == "folder-imagenette"
    assert dataset_name("folder", tmp_path / "x", "Garden birds") == "Garden-birds"
    assert dataset_name("coco") == "coco" and dataset_name("digits", None, None) == "digits"
    with pytest.raises(ValueError, match="has no letter or digit"):
        dataset_name("folder", tmp_path, "///")


def write_folder_fixture(root: Path, classes=("ants", "bees", "moths", "wasps"), per_class: int = 60) -> Path:
    """A small ImageFolder tree of tiny generated images (PNG and JPEG), with one unreadable file."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(textured_image(rng, (40, 40), label)).save(root / name / f"{name}_{i:03d}{suffix}")
    (root / classes[0] / "broken.jpg").write_bytes(b"\xff\xd8 not a picture")
    return root


@pytest.mark.notebook
@pytest.mark.slow
def test_smoke_study_runs_on_a_folder_and_labels_it_by_the_folder(tmp_path, monkeypatch):
    """`vitdsi study --dataset folder --root PATH` end to end, through Table 1 and the demo (01-06).

    The later notebooks read the data the same way (``load_images(DATASET, SIZE, root=DATASET_ROOT,
    ...)``); running all 14 here would triple the time for no new path (the COCO study runs them all).
    """
    from vitdsi_utils.runner import run

    every = run.study_notebooks()
    monkeypatch.setattr(run, "study_notebooks", lambda folder=None: every[:6])
    root = write_folder_fixture(tmp_path / "bugs")  # 240 usable images: N = 200 fits
    monkeypatch.setenv("VITDSI_REPORTS_DIR", str(tmp_path / "reports"))
    monkeypatch.chdir(tmp_path)  # a relative --root reaches the notebooks as an absolute path
    assert cli.main(["study", "--profile", "smoke", "--dataset", "folder", "--root", "bugs", "--quiet"]) == 0

    out = tmp_path / "reports" / "smoke-bugs"
    timings = pd.read_csv(out / "timings.csv")
    assert timings["notebook"].tolist() == [p.stem for p in every[:6]] and (timings["status"] == "ok").all()
    table1 = pd.read_csv(out / "tables" / "table1.csv")
    assert set(table1["source"]) == {"folder"} and table1["paper"].isna().all()  # the paper measured ImageNet
    assert {"BoVW", "DSI zero-shot", "DSI fine-tuned"} <= set(table1["model"]) and "uninformative" in table1
    readme = (out / "README.md").read_text()
    assert readme.startswith("# The vitdsi study, profile `smoke`, data `bugs`")
    assert f"vitdsi study --profile smoke --dataset folder --root {root}" in readme
    for path in [out / "README.md", *(out / "tables").glob("*.md")]:
        assert "imagenette" not in path.read_text().lower().replace("imagenette_preview", ""), path.name
    assert (out / "tables" / "table1.md").read_text().startswith("bugs at 32 px")
    manifest = pd.read_csv(out / "tables" / "manifest_bugs-32px-N200-clustered-seed0.csv", keep_default_na=False)
    assert manifest.loc[manifest["role"] == "skipped", "file"].tolist() == ["ants/broken.jpg"]
    assert str(manifest["source_row"].dtype) == "int64"
    assert "240 usable bugs images at 32 px in 4 classes" in (out / "notebooks" / "01_data.ipynb").read_text()
    assert not (out / "figures" / "imagenette_gallery.png").exists()
