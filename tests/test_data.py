import io
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vitdsi_utils import settings
from vitdsi_utils.data.database import apportion, build_database, max_balanced_size
from vitdsi_utils.data.files import load_image
from vitdsi_utils.data.images import ImageSet, load_images


# ---------------------------------------------------------------- preprocessing of one image
def _save(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    "mode, fmt",
    [("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("LA", "PNG"), ("1", "PNG")],
)
def test_every_colour_mode_becomes_rgb_uint8(tmp_path, mode, fmt):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    image = (
        base.convert(mode)
        if mode != "I;16"
        else Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16))
    )
    path = _save(tmp_path / f"x.{fmt.lower()}", image, format=fmt)
    out = load_image(path, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_sixteen_bit_png_is_rescaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    path = _save(tmp_path / "deep.png", Image.fromarray(ramp))
    out = load_image(path, 64)
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    assert 100 < out[0, 32, 0] < 160  # the middle of the ramp stays mid-grey


def test_transparent_pixels_composite_on_white(tmp_path):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)  # fully transparent black
    path = _save(tmp_path / "clear.png", Image.fromarray(rgba, mode="RGBA"))
    assert (load_image(path, 32) == 255).all()


def test_centre_crop_and_aspect_filter(tmp_path):
    array = np.zeros((100, 104, 3), dtype=np.uint8)
    array[:, :2] = 255  # a border that the centre crop removes
    path = _save(tmp_path / "near_square.png", Image.fromarray(array))
    out = load_image(path, 32)
    assert out.shape == (32, 32, 3) and out.max() == 0
    wide = _save(tmp_path / "wide.png", Image.fromarray(np.zeros((50, 100, 3), dtype=np.uint8)))
    assert load_image(wide, 32) is None
    assert load_image(wide, 32, aspect_range=(0.4, 2.5)).shape == (32, 32, 3)


def test_exif_rotation_is_applied(tmp_path):
    array = np.zeros((60, 64, 3), dtype=np.uint8)
    array[:, :32] = 255  # left half white
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    out = load_image(path, 32)
    # displayed upright, the white half is on top
    assert out[:8].mean() > 200 and out[-8:].mean() < 50


# ---------------------------------------------------------------- sources
def test_folder_source_skips_bad_files_with_one_warning(image_tree):
    (image_tree / "alpha" / "empty.jpg").write_bytes(b"")
    (image_tree / "alpha" / "notes.png").write_text("not an image at all")
    good = io.BytesIO()
    Image.fromarray(np.full((48, 48, 3), 90, dtype=np.uint8)).save(good, format="JPEG")
    (image_tree / "beta" / "truncated.jpg").write_bytes(good.getvalue()[:200])
    with pytest.warns(UserWarning, match="skipped 3 unreadable") as record:
        image_set = load_images("folder", 32, root=image_tree, progress=False)
    assert len([w for w in record if "unreadable" in str(w.message)]) == 1
    assert sorted(image_set.skipped) == ["alpha/empty.jpg", "alpha/notes.png", "beta/truncated.jpg"]
    assert len(image_set) == 36 and image_set.dropped_aspect == 3
    assert image_set.images.shape == (36, 32, 32, 3)
    assert image_set.classes == ["alpha", "beta", "gamma"]
    assert np.bincount(image_set.labels).tolist() == [12, 12, 12]


def test_cache_is_reused_and_keyed_by_settings(image_tree, monkeypatch):
    first = load_images("folder", 32, root=image_tree, progress=False)
    calls = []
    real_load_image = load_image
    monkeypatch.setattr(
        "vitdsi_utils.data.decode.load_image", lambda *a, **k: calls.append(a) or real_load_image(*a, **k)
    )
    second = load_images("folder", 32, root=image_tree, progress=False)
    assert calls == [], "decoded again despite the cache"
    assert np.array_equal(first.images, second.images) and first.files == second.files
    load_images("folder", 64, root=image_tree, progress=False)  # another size is another cache
    assert len(calls) == 39
    cache_root = settings.data_dir() / "cache"
    assert len(list(cache_root.glob("folder-*px-*"))) == 2
    assert not [p for p in cache_root.iterdir() if p.name.endswith(".tmp")], "a temporary folder was left behind"


def test_changed_file_invalidates_cache(image_tree):
    first = load_images("folder", 32, root=image_tree, progress=False)
    Image.fromarray(np.zeros((48, 48, 3), dtype=np.uint8)).save(image_tree / "alpha" / "new.png")
    second = load_images("folder", 32, root=image_tree, progress=False)
    assert len(second) == len(first) + 1


def test_split_layout_pools_train_and_val(tmp_path):
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(folder / f"{split}.png")
    image_set = load_images("folder", 32, root=tmp_path, progress=False)
    assert image_set.classes == ["a", "b"]
    assert sorted(image_set.files) == ["train/a/train.png", "train/b/train.png", "val/a/val.png", "val/b/val.png"]


def test_empty_class_folder_is_ignored_with_a_warning(image_tree):
    (image_tree / "delta").mkdir()
    with pytest.warns(UserWarning, match="delta"):
        image_set = load_images("folder", 32, root=image_tree, progress=False)
    assert "delta" not in image_set.classes


def test_digits_source_needs_no_download():
    image_set = load_images("digits", 32, progress=False)
    assert image_set.images.shape == (1797, 32, 32, 3)
    assert image_set.classes == [str(d) for d in range(10)]
    assert image_set.images.max() > 200  # ink is bright


def test_clear_errors_for_bad_requests(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="choose one of"):
        load_images("cifar", 32)
    with pytest.raises(ValueError, match=r"choose one of \(32, 64, 160, 256\)"):
        load_images("digits", 100)
    with pytest.raises(ValueError, match="root="):
        load_images("folder", 32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images("folder", 32, root=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images under"):
        load_images("folder", 32, root=tmp_path / "empty")
    monkeypatch.setenv("VITDSI_IMAGENETTE_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="VITDSI_IMAGENETTE_DIR"):
        load_images("imagenette", 64)
    monkeypatch.delenv("VITDSI_IMAGENETTE_DIR")
    with pytest.raises(FileNotFoundError, match="download"):
        load_images("imagenette", 64, download=False)


# ---------------------------------------------------------------- database construction
def test_apportion_is_exact():
    assert apportion(512, [0.25, 0.75]).tolist() == [128, 384]
    assert apportion(10, [1, 1, 1]).tolist() == [4, 3, 3]
    assert apportion(7, [0.8, 0.1, 0.1]).sum() == 7


def test_max_balanced_size():
    assert max_balanced_size([10, 10, 10]) == 30
    assert max_balanced_size([5, 10, 10]) == 17  # two larger classes take one extra each


@pytest.mark.parametrize("n, n_index", [(512, 128), (1024, 256), (2048, 512), (1000, 250)])
def test_database_split_matches_the_study(n, n_index):
    image_set = ImageSet(
        images=np.zeros((3000, 2, 2, 3), dtype=np.uint8),
        labels=np.repeat(np.arange(10), 300),
        classes=[f"c{i}" for i in range(10)],
        files=[f"f{i}" for i in range(3000)],
        source="synthetic",
    )
    db = build_database(image_set, n, seed=1)
    counts = db.manifest["role"].value_counts()
    assert counts["index"] == n_index and counts.sum() == n
    pool = n - n_index
    assert abs(counts["train"] - 0.8 * pool) <= 1 and abs(counts["test"] - 0.1 * pool) <= 1
    per_class = db.counts().sum(axis=1)
    assert per_class.max() - per_class.min() <= 1  # balanced over classes
    per_class_index = db.counts()["index"]
    assert per_class_index.max() - per_class_index.min() <= 1
    assert db.manifest["source_row"].is_unique  # no image in two roles
    index = db.manifest[db.manifest["role"] == "index"]
    assert index["row"].tolist() == list(range(n_index))
    assert index["id"].str.len().nunique() == 1


def test_database_is_seeded_and_schemes_share_the_split():
    image_set = load_images("digits", 32, progress=False)
    a = build_database(image_set, 400, id_scheme="random", seed=5)
    b = build_database(image_set, 400, id_scheme="random", seed=5)
    c = build_database(image_set, 400, id_scheme="clustered", seed=5)
    d = build_database(image_set, 400, id_scheme="random", seed=6)
    pd.testing.assert_frame_equal(a.manifest, b.manifest)
    key = ["source_row", "role"]
    assert set(map(tuple, a.manifest[key].values)) == set(map(tuple, c.manifest[key].values))
    assert not a.manifest["source_row"].equals(d.manifest["source_row"])
    clustered_labels = c.index_labels
    assert (np.diff(clustered_labels) >= 0).all()  # consecutive IDs within a class
    assert (np.diff(a.index_labels) < 0).any()
    assert np.array_equal(a.images[0], image_set.images[a.manifest["source_row"][0]])


def test_database_errors_say_what_is_possible():
    image_set = load_images("digits", 32, progress=False)
    with pytest.raises(ValueError, match="between 40 and"):
        build_database(image_set, 5000)
    with pytest.raises(ValueError, match="unknown ID scheme"):
        build_database(image_set, 400, id_scheme="semantic-ish")
    one_class = ImageSet(np.zeros((50, 2, 2, 3), np.uint8), np.zeros(50, np.int64), ["only"], ["f"] * 50, "x")
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_database(one_class, 40)


def test_manifest_round_trip_with_skipped_rows(image_tree, tmp_path):
    (image_tree / "alpha" / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_set = load_images("folder", 32, root=image_tree, progress=False)
    db = build_database(image_set, 36, seed=0)
    path = db.save_manifest(tmp_path / "manifest.csv")
    table = pd.read_csv(path, keep_default_na=False)
    assert set(table.columns) >= {"file", "class", "role", "id"}
    assert (table["role"] == "skipped").sum() == 1
    assert table.loc[table["role"] == "skipped", "file"].item() == "alpha/broken.jpg"


@pytest.mark.imagenette
def test_imagenette_from_local_copy(imagenette_dir, monkeypatch):
    monkeypatch.setenv("VITDSI_IMAGENETTE_DIR", str(imagenette_dir))
    image_set = load_images("imagenette", 32, progress=False)
    assert len(image_set.classes) == 10 and len(image_set) > 13000
    db = build_database(image_set, 512, id_scheme="clustered")
    assert db.n_index == 128 and db.images.shape[1:] == (32, 32, 3)


def test_run_folder_names_say_data_set_size_n_ids_and_seed(image_tree):
    """runs.py names every run folder: a DSI's (with its IDs), a draw of images' (without), a study's own."""
    from vitdsi_utils.data.database import index_all_database
    from vitdsi_utils.runs import database_name, run_name

    image_set = load_images("folder", 32, root=image_tree, cache=False, progress=False)
    db = build_database(image_set, 24, id_scheme="clustered", seed=3)
    assert run_name(db) == "tree-32px-N24-clustered-seed3"  # the folder's own name, not "folder"
    assert run_name(db, "semantic-bovw-k4-c5") == "tree-32px-N24-semantic-bovw-k4-c5-seed3"
    assert database_name(db) == "tree-32px-N24-seed3"
    assert run_name(db, study="incremental") == "incremental-tree-32px-N24-clustered-seed3"
    every = index_all_database(image_set, 24, id_scheme="random", seed=3)  # no queries kept: I<n>
    assert run_name(every, study="scale") == "scale-tree-32px-I24-random-seed3"
    assert database_name(every) == "tree-32px-I24-seed3"
