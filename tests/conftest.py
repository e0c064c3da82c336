"""Shared fixtures: small image trees and a COCO-format data set written on the fly, and an isolated data folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_IMAGENETTE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette-224"

#: Test files that run whole studies through their notebooks, longest first (about 550, 270, 250, 80
#: and 80 s of CPU on the project's machines). ``make test`` hands whole files to the pytest-xdist
#: workers in collection order (``--dist loadfile --no-loadscope-reorder``), and a worker takes its
#: next file once two of its tests remain; started first, these spread over the workers instead of
#: queueing behind one another at the end. A stale list only costs balance, never a test.
LONGEST_FILES = ("test_paper_dry_run.py", "test_study.py", "test_coco.py", "test_distributed.py", "test_inputs.py")


def pytest_collection_modifyitems(config, items):
    """The files of :data:`LONGEST_FILES` first, in that order; every other order is kept (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and OpenMP threads stall when other jobs share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_recipe(tmp_path):
    """``vitdsi run`` on a recipe written from a mapping (plus ``--set`` items); returns the exit status."""
    import itertools

    import yaml

    from vitdsi_utils import cli

    numbers = itertools.count()

    def run(values: dict, *sets: str) -> int:
        path = tmp_path / f"recipe-{next(numbers)}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return cli.main(["run", str(path), *(arg for item in sets for arg in ("--set", item))])

    return run


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path_factory, monkeypatch):
    """Caches and downloads of a test go to a temporary folder, never the project's data/."""
    monkeypatch.setenv("VITDSI_DATA_DIR", str(tmp_path_factory.mktemp("vitdsi-data")))


def textured_image(rng: np.random.Generator, size: tuple[int, int], kind: int) -> np.ndarray:
    """An RGB uint8 image with structure SIFT can find; ``kind`` picks one of a few textures."""
    height, width = size
    y, x = np.mgrid[0:height, 0:width]
    if kind % 3 == 0:
        base = ((x // 8 + y // 8) % 2) * 200
    elif kind % 3 == 1:
        base = (np.sin(x / 3.0) * np.cos(y / 5.0) > 0) * 220
    else:
        base = ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(size) / 3) ** 2) * 210
    noise = rng.integers(0, 40, size=(height, width))
    grey = np.clip(base + noise, 0, 255).astype(np.uint8)
    return np.stack([grey, np.roll(grey, 3, axis=1), 255 - grey], axis=-1)


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """An ImageFolder tree: 3 classes x 12 square JPEGs/PNGs of 48 px, one wide image per class."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    for label, name in enumerate(["alpha", "beta", "gamma"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(12):
            array = textured_image(rng, (48, 48), label)
            suffix = ".jpg" if i % 2 else ".png"
            Image.fromarray(array).save(folder / f"{name}_{i:02d}{suffix}")
        Image.fromarray(textured_image(rng, (48, 96), label)).save(folder / f"{name}_wide.jpg")
    return root


@pytest.fixture
def imagenette_dir() -> Path:
    """The shared Imagenette copy; tests that need it are skipped where it is absent."""
    env = os.environ.get("VITDSI_IMAGENETTE_DIR")
    path = Path(env) if env else SHARED_IMAGENETTE
    if not path.is_dir():
        pytest.skip("Imagenette images not available (set VITDSI_IMAGENETTE_DIR)")
    return path


#: The categories of the COCO-format fixture, deliberately out of id order and with gaps in the ids.
#: Sorted by id they become labels car=0, boat=1, cat=2, dog=3, toothbrush=4 (never annotated).
COCO_CATEGORIES = [
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
    {"id": 9, "name": "boat", "supercategory": "vehicle"},
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
]
COCO_IDS = {c["name"]: c["id"] for c in COCO_CATEGORIES}
#: The label sets the fixture cycles through: one, two or three categories per image.
COCO_COMBOS = [
    ("car",),
    ("boat",),
    ("cat",),
    ("dog",),
    ("cat", "dog"),
    ("car", "boat"),
    ("car", "cat", "dog"),
    ("boat", "dog"),
]


def write_coco_fixture(root: Path, repeats: int = 2, side: int = 40) -> dict:
    """Write a small COCO-format data set under ``root``; return its paths and what it holds.

    ``repeats`` copies of every combination in COCO_COMBOS (square images, texture by first
    category), plus images the loader must leave out: two without annotations, one wide image
    (aspect out of range) and one corrupt file. Returns ``{"images", "annotations", "labels"}``
    with ``labels`` mapping each usable file to its category names.
    """
    rng = np.random.default_rng(0)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    entries: list[tuple[str, tuple[str, ...]]] = []
    for r in range(repeats):
        for c, combo in enumerate(COCO_COMBOS):
            name = f"{r:03d}_{c}.png" if (r + c) % 2 else f"{r:03d}_{c}.jpg"
            kind = [e["name"] for e in COCO_CATEGORIES].index(combo[0])
            Image.fromarray(textured_image(rng, (side, side), kind)).save(images_dir / name)
            entries.append((name, combo))
    for name in ("empty_a.png", "empty_b.png"):  # files on disk, but no object annotated
        Image.fromarray(textured_image(rng, (side, side), 0)).save(images_dir / name)
    Image.fromarray(textured_image(rng, (side, 2 * side), 1)).save(images_dir / "wide.png")
    (images_dir / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    listed = entries + [("empty_a.png", ()), ("empty_b.png", ()), ("wide.png", ("dog",)), ("corrupt.jpg", ("cat",))]

    images, annotations = [], []
    for image_id, (name, combo) in enumerate(listed, start=100):
        images.append({"id": image_id, "file_name": name, "width": side, "height": side})
        for category in combo:
            # two instances of the first category: repeated objects must not repeat the label
            for _ in range(2 if category == combo[0] else 1):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": COCO_IDS[category],
                        "iscrowd": 0,
                        "bbox": [1, 1, 5, 5],
                        "area": 25.0,
                    }
                )
    annotation_file = root / "annotations" / "instances_fixture.json"
    annotation_file.parent.mkdir()
    annotation_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": COCO_CATEGORIES})
    )
    return {"images": images_dir, "annotations": annotation_file, "labels": dict(entries)}


@pytest.fixture
def coco_dir(tmp_path) -> dict:
    """A small COCO-format data set (see write_coco_fixture): 16 usable images, 4 left out."""
    return write_coco_fixture(tmp_path / "coco")
