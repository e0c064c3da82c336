"""Shared fixtures: small image trees written on the fly, and an isolated data folder."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_IMAGENETTE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette-224"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and OpenMP threads stall when other jobs share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
