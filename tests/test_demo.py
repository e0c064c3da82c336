"""The query demo, driven without a browser: queries, K, models, rendering, uploads, loading."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vitdsi_utils.bovw import BoVW
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.demo import QueryDemo
from vitdsi_utils.ids.codec import make_codec
from vitdsi_utils.phases import new_model
from vitdsi_utils.retrieval.searchers import BoVWSearcher, DSISearcher
from vitdsi_utils.runs import run_name
from vitdsi_utils.training.checkpoint import save_checkpoint

HIT = re.compile(r'<figure class="vitdsi-hit" data-model="([^"]+)" data-row="(\d+)" data-relevant="(\w+)"')
TINY = dict(patch_size=16, dim=16, mlp_dim=32, depth=1, heads=2)


@pytest.fixture(scope="module")
def db():
    return build_database(load_images("digits", 32, progress=False), 200, id_scheme="clustered", seed=0)


@pytest.fixture(scope="module")
def searchers(db):
    codec = make_codec(db.n_index)
    model = new_model(db, codec, **TINY)  # untrained: the demo only needs valid, distinct IDs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few 32 px digits have no SIFT keypoints
        bovw = BoVW(30, random_state=0, progress=False).fit(db.split("index")[0])
    return {"BoVW": BoVWSearcher(bovw), "DSI": DSISearcher(model, codec)}


def hits(html: str) -> list[tuple[str, int, str]]:
    return [(model, int(row), relevant) for model, row, relevant in HIT.findall(html)]


def png_bytes(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_run_returns_k_distinct_rows_per_model_and_marks_relevance(db, searchers):
    demo = QueryDemo(db, searchers, k=10)
    demo.select_query(3)
    demo.set_k(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = demo.run()

    query_label = db.split("test")[1][3]
    index_labels = db.index_labels
    assert set(results) == {"BoVW", "DSI"}
    for rows, scores, latency_ms in results.values():
        assert len(rows) == 7 and len(set(rows.tolist())) == 7 and len(scores) == 7
        assert latency_ms > 0
    rendered = hits(demo.last_html)
    for name, (rows, _, _) in results.items():
        shown = [(row, relevant) for model, row, relevant in rendered if model == name]
        assert [row for row, _ in shown] == rows.tolist()  # K thumbnails, in rank order
        expected = ["true" if index_labels[row] == query_label else "false" for row, _ in shown]
        assert [relevant for _, relevant in shown] == expected
    assert demo.last_html.count("<img") == 1 + 2 * 7  # the query and K thumbnails per model
    assert len(demo.result_figure().axes) == 3 * 8


def test_model_selection_and_k_bounds(db, searchers):
    demo = QueryDemo(db, searchers, k=3)
    demo.set_models(["DSI"])
    assert list(demo.run()) == ["DSI"]
    with pytest.raises(ValueError, match="K must lie"):
        demo.set_k(0)
    with pytest.raises(ValueError, match="unknown model"):
        demo.set_models(["dense"])
    with pytest.raises(IndexError):
        demo.select_query(10_000)


def test_widgets_drive_the_same_logic(db, searchers):
    demo = QueryDemo(db, searchers, k=4)
    widget = demo.widget
    assert widget is demo.widget  # built once
    demo._k_slider.value = 5
    assert demo.k == 5
    demo._query_box.value = 2
    assert demo.query_label == db.split("test")[1][2]
    demo._checkboxes["BoVW"].value = False
    demo._run_button.click()
    assert list(demo.results) == ["DSI"]
    assert len(hits(demo._result_html.value)) == 5


def test_uploaded_image_is_preprocessed_and_has_unknown_relevance(db, searchers):
    demo = QueryDemo(db, searchers, k=4)
    demo.use_upload(png_bytes(60, 40), "holiday.png")  # not square: centre-cropped like the database
    assert demo.query_image.shape == (32, 32, 3) and demo.query_label is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        demo.run()
    assert {relevant for _, _, relevant in hits(demo.last_html)} == {"unknown"}
    with pytest.raises(ValueError, match="upload a JPEG or PNG"):
        demo.use_upload(b"not an image", "notes.txt")


def test_missing_run_dir_names_the_command(db, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vitdsi study --profile smoke"):
        QueryDemo.from_run_dir(tmp_path, db, bovw_words=30)


def test_from_run_dir_loads_the_trained_models(db, tmp_path):
    codec = make_codec(db.n_index)
    model = new_model(db, codec, **TINY)
    save_checkpoint(tmp_path / run_name(db) / "zero_shot.pt", model, None, model.config, None, 0, [], codec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        demo = QueryDemo.from_run_dir(tmp_path, db, bovw_words=30, k=3)
        results = demo.run()
    assert list(results) == ["BoVW", "DSI zero-shot"]


def test_report_listing_names_run_folders_relative_to_the_project(db, tmp_path, monkeypatch):
    """A report's indexing_runs.csv stays usable in another checkout: run_dir is project-relative."""
    from vitdsi_utils import settings
    from vitdsi_utils.runs import find_run_dir

    monkeypatch.setattr(settings, "project_root", lambda: tmp_path / "checkout")
    run = tmp_path / "checkout" / "data" / "runs" / "cpu" / run_name(db)
    run.mkdir(parents=True)
    (run / "zero_shot.pt").write_bytes(b"")
    assert settings.portable_path(run) == f"data/runs/cpu/{run_name(db)}"
    assert settings.portable_path(tmp_path / "elsewhere") == str((tmp_path / "elsewhere").resolve())
    report = tmp_path / "report"
    (report / "tables").mkdir(parents=True)
    pd.DataFrame({"run": [run_name(db)], "run_dir": [settings.portable_path(run)]}).to_csv(
        report / "tables" / "indexing_runs.csv", index=False
    )
    assert find_run_dir(report, db) == run
