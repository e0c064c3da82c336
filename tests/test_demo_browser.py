"""The demo in a real browser: Voilà serves 06_demo, headless Chromium picks a query, runs it, and screenshots it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.ids.codec import make_codec
from vitdsi_utils.phases import new_model
from vitdsi_utils.reports.plots import IRRELEVANT_COLOR, RELEVANT_COLOR
from vitdsi_utils.reports.tables import FINE_TUNED, ZERO_SHOT
from vitdsi_utils.runner.profiles import load_profile
from vitdsi_utils.runs import run_name
from vitdsi_utils.training.checkpoint import save_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo_screenshot.py"
TINY = dict(patch_size=16, dim=16, mlp_dim=32, depth=1, heads=2)


def load_script():
    spec = importlib.util.spec_from_file_location("demo_screenshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def untrained_runs(root: Path) -> Path:
    """A runs folder with untrained DSI models for the smoke profile's first database (as 06_demo loads it)."""
    smoke = load_profile("smoke")
    db = build_database(
        load_images(smoke["DATASET"], smoke["SIZE"], progress=False),
        smoke["NS"][0],
        id_scheme=smoke["ID_SCHEMES"][0],
        seed=smoke["SEEDS"][0],
    )
    codec = make_codec(db.n_index)
    for file in ("zero_shot.pt", "fine_tuned.pt"):
        model = new_model(db, codec, **TINY)  # untrained: the demo only needs distinct, valid IDs
        save_checkpoint(root / run_name(db) / file, model, None, model.config, None, 0, [], codec)
    return root


def colour_pixels(png: Path, colour: str) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.asarray(Image.open(png).convert("RGB")) == rgb).all(axis=-1).sum())


def test_missing_models_say_what_to_run(script, tmp_path):
    params = script.demo_parameters("smoke", tmp_path / "runs", tmp_path / "out")
    with pytest.raises(script.DemoShotError, match=r"vitdsi study --profile smoke"):
        script.ensure_models("smoke", tmp_path / "runs", params, build=False)


@pytest.mark.browser
@pytest.mark.notebook
@pytest.mark.slow
def test_a_query_picked_in_chromium_shows_every_models_results(script, tmp_path):
    if not Path(script.CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {script.CHROMIUM} (apt-get install -y chromium)")
    for package in ("playwright", "voila"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"the {package} package is not installed (pip install -r requirements.txt)")

    png = tmp_path / "shot.png"
    shot = script.demo_screenshot(
        "smoke", runs=untrained_runs(tmp_path / "runs"), out=png, query=3, build=False, timeout=120
    )

    # the result grid is the one of the query chosen in the browser (the page opens on query 0)
    assert shot.query_title.startswith("test query 3: ")
    assert shot.hits == {"BoVW": 10, ZERO_SHOT: 10, FINE_TUNED: 10}
    assert all(0 <= shot.relevant[m] <= 10 for m in shot.hits)
    # the PNG shows them: each thumbnail is framed green (relevant) or red (not), 3 px around 72 px
    width, height = Image.open(png).size
    assert width == script.VIEWPORT["width"] and height >= script.VIEWPORT["height"]
    framed = colour_pixels(png, RELEVANT_COLOR) + colour_pixels(png, IRRELEVANT_COLOR)
    assert framed >= 30 * 450, f"only {framed} frame pixels: the thumbnails are not on the screenshot"
    assert not png.with_name("shot_failed.png").exists()
