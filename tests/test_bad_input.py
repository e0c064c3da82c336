"""Bad input everywhere a researcher's own files and settings enter: each gives a right result or a clear error.

Covers the data pipeline (one file, a folder, the database draw), the BoVW baseline, the DSI
model, the demo's upload and search path, and writes interrupted half-way (no partial cache,
manifest, checkpoint, table or figure is ever left, and the previous file survives).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import textured_image
from PIL import Image, ImageOps

from vitdsi_utils import cli, settings
from vitdsi_utils.atomic import atomic_dir, write_json, write_text
from vitdsi_utils.bovw import BoVW
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.files import load_image
from vitdsi_utils.data.images import ImageSet, load_images
from vitdsi_utils.demo import QueryDemo
from vitdsi_utils.ids.codec import dense_id_order, make_codec
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.phases import new_model
from vitdsi_utils.reports.plots import new_figure, save_figure
from vitdsi_utils.reports.tables import write_table
from vitdsi_utils.retrieval.searchers import BoVWSearcher, DSISearcher
from vitdsi_utils.runner.profiles import load_profile
from vitdsi_utils.training.checkpoint import load_checkpoint, save_checkpoint
from vitdsi_utils.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
TINY = dict(patch_size=16, dim=16, mlp_dim=32, depth=1, heads=2)


# ------------------------------------------------------------------------------------------
# Bad files, written on the fly
# ------------------------------------------------------------------------------------------
def jpeg_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def quadrants(height: int, width: int) -> np.ndarray:
    """Top-left red, top-right green, bottom half blue: any rotation or flip shows."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[: height // 2, : width // 2] = RED
    array[: height // 2, width // 2 :] = GREEN
    array[height // 2 :] = BLUE
    return array


def exif_rotated_jpeg(path: Path, array: np.ndarray, orientation: int) -> Path:
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)
    return path


#: name -> (writer of the file, what load_image must give: "error" or a check of the array)
def _truncated(path: Path) -> None:
    path.write_bytes(jpeg_bytes(textured_image(np.random.default_rng(0), (48, 48), 0))[:300])


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _text_as_png(path: Path) -> None:
    path.write_text("these are my notes, not a picture\n")


def _html_as_jpg(path: Path) -> None:
    path.write_text("<!doctype html><html><body>404 Not Found</body></html>")


def _pdf_as_jpeg(path: Path) -> None:
    path.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n")


UNREADABLE = {
    "truncated.jpg": _truncated,
    "zero_bytes.jpg": _zero_bytes,
    "text.png": _text_as_png,
    "page.jpg": _html_as_jpg,
    "document.jpeg": _pdf_as_jpeg,
}


def test_a_decompression_bomb_is_skipped_with_the_reason(image_tree, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # a 200 x 200 image now counts as a decompression bomb
    Image.new("RGB", (200, 200)).save(image_tree / "alpha" / "huge.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.warns(
            UserWarning, match=r"skipped 1 .*alpha/huge.png \(too many pixels \(over 10,000\); downscale it first\)"
        ):
            image_set = load_images("folder", 32, root=image_tree, progress=False)
    assert len(image_set) == 36


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_file_raises_an_oserror_type_error(tmp_path, name):
    path = tmp_path / name
    UNREADABLE[name](path)
    with pytest.raises(OSError):  # PIL's UnidentifiedImageError is an OSError too
        load_image(path, 32)


def test_folder_source_skips_every_unreadable_file_and_names_the_reason(image_tree):
    for name, write in UNREADABLE.items():
        write(image_tree / "alpha" / name)
    with pytest.warns(UserWarning, match=f"skipped {len(UNREADABLE)} unreadable") as record:
        image_set = load_images("folder", 32, root=image_tree, progress=False)
    message = " ".join(str(w.message) for w in record if "unreadable" in str(w.message))
    assert "alpha/zero_bytes.jpg (not an image file" in message and "truncated" in message
    assert "/tmp" not in message.split("under", 1)[1].split(":", 1)[1]  # reasons hold no temporary paths
    assert "role 'skipped'" in message  # says where to find them
    assert sorted(image_set.skipped) == sorted(f"alpha/{n}" for n in UNREADABLE)
    assert len(image_set) == 36  # every good image is still there
    db = build_database(image_set, 36, seed=0)
    assert db.n_index == 9 and not set(db.manifest["file"]) & set(image_set.skipped)


def test_a_real_image_under_the_wrong_extension_is_read_by_its_content(tmp_path):
    path = tmp_path / "actually_a_png.jpg"
    Image.fromarray(quadrants(40, 40)).save(path, format="PNG")
    out = load_image(path, 32)
    assert tuple(out[0, 0]) == RED and tuple(out[-1, -1]) == BLUE


@pytest.mark.parametrize("side", [1, 4, 7])
def test_images_smaller_than_a_patch_are_upsampled(tmp_path, side):
    path = tmp_path / f"tiny_{side}.png"
    Image.new("RGB", (side, side), GREEN).save(path)
    out = load_image(path, 32)
    assert out.shape == (32, 32, 3) and (out == np.array(GREEN, dtype=np.uint8)).all()


@pytest.fixture(scope="module")
def big_photo(tmp_path_factory) -> Path:
    """A 6000 x 4000 JPEG: grey in the centre square, red bands left and right."""
    array = np.full((4000, 6000, 3), 128, dtype=np.uint8)
    array[:, :1000] = RED
    array[:, 5000:] = RED
    path = tmp_path_factory.mktemp("big") / "panorama.jpg"
    Image.fromarray(array).save(path, quality=85)
    return path


def test_a_very_large_image_outside_the_aspect_range_is_rejected_without_decoding(big_photo, monkeypatch):
    def must_not_decode(image):
        raise AssertionError("the aspect check should have rejected the image from its header")

    monkeypatch.setattr(ImageOps, "exif_transpose", must_not_decode)
    assert load_image(big_photo, 64) is None


def test_a_very_large_image_is_centre_cropped_when_any_aspect_is_allowed(big_photo):
    out = load_image(big_photo, 64, aspect_range=(1e-6, 1e6))
    assert out.shape == (64, 64, 3)
    assert np.abs(out.astype(int) - 128).max() <= 6  # the red bands lie outside the centre square


def test_sixteen_bit_palette_and_cmyk_images_keep_their_colours(tmp_path):
    deep = np.full((40, 40), 65535, dtype=np.uint16)
    deep[20:] = 32896  # 128 * 257: mid-grey in 16 bits
    Image.fromarray(deep).save(tmp_path / "deep.png")
    out = load_image(tmp_path / "deep.png", 32)
    assert (out[:14] == 255).all() and (np.abs(out[18:].astype(int) - 128) <= 1).all()

    Image.fromarray(quadrants(40, 40)).convert("P", palette=Image.Palette.ADAPTIVE, colors=3).save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png", 32)
    assert tuple(out[0, 0]) == RED and tuple(out[0, -1]) == GREEN and tuple(out[-1, 0]) == BLUE

    palette = Image.fromarray(quadrants(40, 40)).convert("P", palette=Image.Palette.ADAPTIVE, colors=3)
    clear = palette.getpixel((0, 39))  # the blue entry becomes transparent
    palette.save(tmp_path / "clear.png", transparency=clear)
    out = load_image(tmp_path / "clear.png", 32)
    assert tuple(out[-1, 0]) == WHITE and tuple(out[0, 0]) == RED

    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # CMYK red
    out = load_image(tmp_path / "cmyk.jpg", 32)
    assert np.abs(out.reshape(-1, 3).astype(int) - np.array(RED)).max() <= 8


@pytest.mark.parametrize(
    "orientation, top_left, bottom_right",
    [(1, RED, BLUE), (3, BLUE, RED), (6, BLUE, GREEN), (8, GREEN, BLUE)],
)
def test_exif_rotated_photos_are_shown_upright(tmp_path, orientation, top_left, bottom_right):
    path = exif_rotated_jpeg(tmp_path / "photo.jpg", quadrants(64, 64), orientation)
    out = load_image(path, 32)
    assert np.abs(out[2, 2].astype(int) - top_left).max() <= 20
    assert np.abs(out[-3, -3].astype(int) - bottom_right).max() <= 20


def test_the_aspect_check_sees_the_rotated_shape(tmp_path):
    # stored 111 wide x 100 high (1.11: out of range); shown rotated it is 100 x 111 (0.90: in range)
    stored = textured_image(np.random.default_rng(1), (100, 111), 0)
    assert load_image(exif_rotated_jpeg(tmp_path / "plain.jpg", stored, 1), 32) is None
    assert load_image(exif_rotated_jpeg(tmp_path / "turned.jpg", stored, 6), 32).shape == (32, 32, 3)
    # and the other way round: in range as stored (0.90), out of range once turned (1.11)
    upright = np.ascontiguousarray(stored.transpose(1, 0, 2))
    assert load_image(exif_rotated_jpeg(tmp_path / "plain2.jpg", upright, 1), 32).shape == (32, 32, 3)
    assert load_image(exif_rotated_jpeg(tmp_path / "turned2.jpg", upright, 8), 32) is None


def test_every_odd_format_goes_through_the_folder_pipeline(tmp_path):
    root = tmp_path / "photos"
    rng = np.random.default_rng(2)
    for label, name in enumerate(["cats", "dogs"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(6):
            array = textured_image(rng, (40, 40), label)
            Image.fromarray(array).save(folder / f"plain_{i}.jpg")
        Image.fromarray(array).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
        Image.fromarray(array).convert("CMYK").save(folder / "print.jpg")
        Image.fromarray(array[..., 0].astype(np.uint16) * 257).save(folder / "deep.png")
        exif_rotated_jpeg(folder / "rotated.jpg", array, 6)
    image_set = load_images("folder", 32, root=root, progress=False)
    assert len(image_set) == 20 and image_set.skipped == [] and image_set.images.dtype == np.uint8


def test_file_names_that_are_not_utf8_are_kept_byte_for_byte(image_tree, tmp_path):
    raw = os.fsencode(image_tree / "beta") + b"/caf\xe9_\xff.png"  # Latin-1 bytes, as old cameras write them
    try:
        Image.fromarray(textured_image(np.random.default_rng(3), (48, 48), 1)).save(os.fsdecode(raw), format="PNG")
    except (OSError, ValueError):
        pytest.skip("this file system accepts only UTF-8 file names")
    first = load_images("folder", 32, root=image_tree, progress=False)
    second = load_images("folder", 32, root=image_tree, progress=False)  # from the cache
    name = os.fsdecode(b"beta/caf\xe9_\xff.png")
    assert name in first.files and first.files == second.files
    db = build_database(first, 37, seed=0)  # every image, the Latin-1 one included
    assert len(db.fingerprint()["indexed_images_sha1"]) == 16
    path = db.save_manifest(tmp_path / "manifest.csv")
    assert b"beta/caf\xe9_\xff.png" in path.read_bytes()  # the manifest names the file as it is on disk
    table = pd.read_csv(path, encoding_errors="surrogateescape", keep_default_na=False)
    assert (image_tree / table.loc[table["file"] == name, "file"].item()).is_file()


def test_a_class_folder_name_that_is_not_utf8_is_refused_with_the_fix(image_tree):
    folder = os.fsencode(image_tree) + b"/caf\xe9"
    try:
        os.mkdir(folder)
    except (OSError, ValueError):
        pytest.skip("this file system accepts only UTF-8 file names")
    Image.new("RGB", (32, 32)).save(os.fsdecode(folder + b"/0.png"))
    with pytest.raises(ValueError, match=r"class folder .*caf\\xe9.* not valid UTF-8; rename it"):
        load_images("folder", 32, root=image_tree, progress=False)


# ------------------------------------------------------------------------------------------
# Odd folders and impossible requests
# ------------------------------------------------------------------------------------------
def test_empty_class_folder_is_ignored_and_the_rest_still_builds(image_tree):
    (image_tree / "delta").mkdir()
    with pytest.warns(UserWarning, match="ignoring class folders with no images: delta"):
        image_set = load_images("folder", 32, root=image_tree, progress=False)
    db = build_database(image_set, 36)
    assert set(db.manifest["class"]) == {"alpha", "beta", "gamma"}


def test_a_class_whose_every_file_is_unreadable_is_left_out_with_a_warning(image_tree):
    bad = image_tree / "delta"
    bad.mkdir()
    for i in range(3):
        (bad / f"broken_{i}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_set = load_images("folder", 32, root=image_tree, progress=False)
    assert "delta" in image_set.classes  # the label slot stays, so labels are stable across sizes
    with pytest.warns(UserWarning, match="delta have no usable images"):
        db = build_database(image_set, 36)
    assert "delta" not in set(db.manifest["class"])


def test_a_folder_with_one_class_is_refused_with_the_reason(tmp_path):
    folder = tmp_path / "only" / "cats"
    folder.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(textured_image(np.random.default_rng(i), (32, 32), 0)).save(folder / f"{i}.png")
    image_set = load_images("folder", 32, root=tmp_path / "only", progress=False)
    with pytest.raises(ValueError, match="1 class\\(es\\).*at least 2 classes"):
        build_database(image_set, 8)


def test_classes_with_too_few_images_are_named(tmp_path):
    rng = np.random.default_rng(0)
    for name, count in (("many", 20), ("few", 3)):
        folder = tmp_path / "tree" / name
        folder.mkdir(parents=True)
        for i in range(count):
            Image.fromarray(textured_image(rng, (32, 32), i)).save(folder / f"{i}.png")
    image_set = load_images("folder", 32, root=tmp_path / "tree", progress=False)
    with pytest.raises(ValueError, match="at least 4 usable images per class, but few has fewer"):
        build_database(image_set, 8)


@pytest.fixture(scope="module")
def digits():
    return load_images("digits", 32, progress=False)


@pytest.mark.parametrize(
    "n, message",
    [
        (100_000, r"N=100000 is not possible: .* between 40 and 1749"),
        (0, "N=0 is not possible"),
        (-8, "N=-8 is not possible"),
        (400.5, "N must be a whole number of images, got 400.5"),
        ("400", "N must be a whole number of images, got '400'"),
        (True, "N must be a whole number"),
    ],
)
def test_impossible_database_sizes(digits, n, message):
    with pytest.raises(ValueError, match=message):
        build_database(digits, n)


def test_numpy_integer_n_is_fine_and_a_tiny_n_warns_about_missing_test_queries(digits):
    assert build_database(digits, np.int64(400)).settings["n"] == 400
    two_classes = ImageSet(
        np.zeros((12, 2, 2, 3), np.uint8), np.repeat([0, 1], 6), ["a", "b"], [f"f{i}" for i in range(12)], "x"
    )
    with pytest.warns(UserWarning, match=r"N=8 leaves no test queries .* use N >= 9"):
        db = build_database(two_classes, 8)
    assert (db.manifest["role"] == "test").sum() == 0


def test_unknown_names_are_refused_with_the_choices(digits):
    with pytest.raises(ValueError, match=r"unknown ID scheme 'semantic'; choose one of \('random', 'clustered'\)"):
        build_database(digits, 400, id_scheme="semantic")
    with pytest.raises(ValueError, match="unknown ID scheme 'atomic'"):
        dense_id_order(np.zeros(5), "atomic")
    with pytest.raises(ValueError, match=r"unknown dataset source 'cifar'; choose one of"):
        load_images("cifar", 32)
    with pytest.raises(ValueError, match=r"unknown profile 'huge'; choose one of \[.*'smoke'\]"):
        load_profile("huge")


def test_a_broken_profile_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("PROFILE: mine\nSIZE: [32\n")
    with pytest.raises(ValueError, match="mine.yaml is not valid YAML"):
        load_profile(path)
    path.write_text("PROFILE: mine\nsize: 32\n")
    with pytest.raises(ValueError, match="UPPER_CASE"):
        load_profile(path)


def test_cli_prints_the_error_without_a_traceback(tmp_path, capsys, image_tree):
    assert cli.main(["data", "--source", "folder", "--root", str(image_tree), "--size", "32", "--n", "5000"]) == 2
    err = capsys.readouterr().err
    assert "N=5000 is not possible" in err and "Traceback" not in err
    assert cli.main(["data", "--source", "folder", "--root", str(tmp_path / "nowhere"), "--size", "32"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=8, patch_size=16), "patch_size 16 is larger than image_size 8"),
        (dict(image_size=64, patch_size=24), r"not divisible by patch_size 24.*\[1, 2, 4, 8, 16, 32, 64\]"),
        (dict(image_size="64"), r"image_size must be a positive integer, got '64'"),
        (dict(image_size=64.5), "image_size must be a positive integer, got 64.5"),
        (dict(dim=True), "dim must be a positive integer"),
        (dict(dropout="0.1"), "dropout must be a number"),
    ],
)
def test_model_config_errors_say_what_works(overrides, message):
    with pytest.raises(ValueError, match=message):
        DSIConfig(**{"image_size": 32, "patch_size": 16, **overrides})


def test_numpy_values_in_a_model_config_become_plain_numbers():
    config = DSIConfig(image_size=np.int64(32), patch_size=np.int32(16), dropout=np.float32(0.25))
    assert type(config.image_size) is int and type(config.dropout) is float


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(lr="1e-3"),
            r"lr must be a number, got '1e-3' \(str\); in a YAML profile write numbers like 1e-3 as 1.0e-3",
        ),
        (dict(lr=0), "lr must be > 0, got 0"),
        (dict(lr=-1e-3), "lr must be > 0, got -0.001"),
        (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (dict(epochs=2.5), r"epochs must be an integer >= 1, got 2.5 \(float\)"),
        (dict(epochs=0), "epochs must be an integer >= 1, got 0$"),
        (dict(target_accuracy=2), r"target_accuracy must lie in \(0, 1\], got 2"),
        (dict(target_accuracy=0.0), r"target_accuracy must lie in \(0, 1\], got 0"),
        (dict(target_accuracy=-0.5), r"target_accuracy must lie in \(0, 1\], got -0.5"),
        (dict(stop_check_from=-0.5), "stop_check_from must be >= 0, got -0.5"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(label_smoothing=1.0), r"label_smoothing must lie in \[0, 1\)"),
        (dict(target_accuracy=float("nan")), "target_accuracy must be a number"),
    ],
)
def test_training_settings_errors_say_what_is_expected(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


def test_cli_reports_a_patch_size_that_does_not_divide_the_images(capsys, tmp_path, run_recipe):
    code = run_recipe(
        {
            "study": "dsi",
            "source": "digits",
            "size": 32,
            "ns": [80],
            "model": {"patch_size": 24},
            "index": {"epochs": 1},
            "out_dir": str(tmp_path / "out"),
            "runs_dir": str(tmp_path / "runs"),
        }
    )
    err = capsys.readouterr().err
    assert code == 2 and "image_size 32 is not divisible by patch_size 24" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_the_model_refuses_images_of_another_size_or_layout():
    codec = make_codec(10)
    model = DSIModel(DSIConfig.from_codec(codec, image_size=32, **TINY))
    inputs = torch.zeros(1, codec.max_length, dtype=torch.long)
    with pytest.raises(ValueError, match=r"must have shape \(B, 32, 32, 3\).*got \(1, 64, 64, 3\)"):
        model(torch.zeros(1, 64, 64, 3, dtype=torch.uint8), inputs)
    with pytest.raises(TypeError, match="uint8"):
        model(torch.zeros(1, 32, 32, 3), inputs)


# ------------------------------------------------------------------------------------------
# BoVW
# ------------------------------------------------------------------------------------------
def test_bovw_on_images_too_small_for_sift_says_what_to_do():
    images = np.random.default_rng(0).integers(0, 255, (6, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="no SIFT keypoints at all .* use larger or more textured images"):
        BoVW(10, progress=False).fit(images)


def test_bovw_answers_odd_queries():
    rng = np.random.default_rng(0)
    database = np.stack([textured_image(rng, (64, 64), i) for i in range(12)])
    model = BoVW(10, progress=False, n_jobs=1).fit(database)
    with pytest.warns(UserWarning, match="no SIFT keypoints"):
        scores, rows = model.search(np.zeros((1, 2, 2, 3), dtype=np.uint8), 5)  # smaller than any keypoint
    assert (scores == 0).all() and rows.tolist() == [[0, 1, 2, 3, 4]]  # documented: index order, score 0
    big = textured_image(rng, (1200, 1800), 1)[None]  # far larger than the database images
    scores, rows = model.search(big, 5)
    assert len(set(rows[0].tolist())) == 5 and np.isfinite(scores).all()
    scores, rows = model.search(np.zeros((0, 64, 64, 3), dtype=np.uint8), 5)
    assert rows.shape == (0, 5)
    with pytest.raises(ValueError, match="looks like a single RGB image; pass image\\[None\\]"):
        model.search(database[0], 5)
    with pytest.raises(TypeError, match="must be uint8"):
        model.search(database.astype(np.float32), 5)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        model.search(database[:1], 0)


# ------------------------------------------------------------------------------------------
# The demo's search path: uploads
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(digits):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        db = build_database(digits, 200, id_scheme="clustered", seed=0)
        bovw = BoVW(30, random_state=0, progress=False).fit(db.split("index")[0])
    codec = make_codec(db.n_index)
    torch.manual_seed(0)
    return QueryDemo(db, {"BoVW": BoVWSearcher(bovw), "DSI": DSISearcher(new_model(db, codec, **TINY), codec)}, k=5)


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_an_unreadable_upload_is_refused_with_a_clear_message(demo, tmp_path, name):
    UNREADABLE[name](tmp_path / name)
    with pytest.raises(ValueError, match=f"could not read '{name}' as an image .*upload a JPEG or PNG") as error:
        demo.use_upload((tmp_path / name).read_bytes(), name)
    assert "/tmp" not in str(error.value)  # no temporary path in what the user reads


def _upload_files(tmp_path: Path, big_photo: Path) -> dict[str, Path]:
    Image.new("RGB", (3, 3), GREEN).save(tmp_path / "tiny.png")
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(quadrants(40, 40)).convert("P", palette=Image.Palette.ADAPTIVE, colors=3).save(tmp_path / "p.png")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    exif_rotated_jpeg(tmp_path / "rotated.jpg", quadrants(64, 64), 6)
    return {p.name: p for p in tmp_path.iterdir()} | {"panorama.jpg": big_photo}


def test_odd_uploads_are_searched_by_every_model(demo, tmp_path, big_photo):
    for name, path in _upload_files(tmp_path, big_photo).items():
        demo.use_upload(path.read_bytes(), name)
        assert demo.query_image.shape == (32, 32, 3) and demo.query_image.dtype == np.uint8, name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flat uploads have no SIFT keypoints
            results = demo.run()
        for model, (rows, _, _) in results.items():
            assert len(rows) == 5 and len(set(rows.tolist())) == 5, (name, model)
        assert "uploaded: " + name in demo.last_html
    # the rotated photo is shown upright: turned a quarter clockwise, the stored bottom (blue) is on
    # the left and the stored top-left (red) at the top right
    demo.use_upload((tmp_path / "rotated.jpg").read_bytes(), "rotated.jpg")
    assert demo.query_image[16, 2, 2] > 200 and demo.query_image[2, -3, 0] > 200


def test_an_upload_without_an_extension_is_read_by_its_content(demo):
    demo.use_upload(jpeg_bytes(quadrants(40, 40)), "photo")
    assert np.abs(demo.query_image[2, 2].astype(int) - RED).max() <= 20


# ------------------------------------------------------------------------------------------
# Writes that fail half-way leave the previous file and no partial one
# ------------------------------------------------------------------------------------------
NO_SPACE = OSError(28, "No space left on device")


def half_then_fail(exception: BaseException = NO_SPACE):
    """A writer (obj, target, ...) that writes half of a real file to ``target``, then raises."""

    def write(*args, **kwargs):
        target = next(a for a in args if isinstance(a, (str, os.PathLike)))
        Path(target).write_bytes(b"\x00" * 512)  # the first bytes made it to disk ...
        raise exception  # ... then the disk filled up, or the user pressed Ctrl-C

    return write


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exception", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch, exception):
    codec = make_codec(12)
    model = DSIModel(DSIConfig.from_codec(codec, image_size=16, patch_size=8, dim=16, mlp_dim=16, depth=1, heads=2))
    path = save_checkpoint(tmp_path / "model.pt", model, None, model.config, None, 3, [], codec)
    before = path.read_bytes()
    with monkeypatch.context() as patch, pytest.raises(type(exception)):
        patch.setattr(torch, "save", half_then_fail(exception))
        save_checkpoint(path, model, None, model.config, None, 4, [], codec)
    assert path.read_bytes() == before and load_checkpoint(path)["epoch"] == 3
    assert leftovers(tmp_path) == []


def test_manifest_write_failure_keeps_the_previous_manifest(tmp_path, monkeypatch, digits):
    db = build_database(digits, 400)
    path = db.save_manifest(tmp_path / "manifest.csv")
    before = path.read_text()
    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space left"):
        patch.setattr(pd.DataFrame, "to_csv", half_then_fail())
        db.save_manifest(path)
    assert path.read_text() == before and leftovers(tmp_path) == []


def test_cache_write_failure_leaves_no_cache_and_the_next_run_decodes_again(image_tree, monkeypatch):
    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space left"):
        patch.setattr(np, "save", half_then_fail())
        load_images("folder", 32, root=image_tree, progress=False)
    cache_root = settings.data_dir() / "cache"
    assert list(cache_root.iterdir()) == []  # neither a cache nor a temporary folder
    image_set = load_images("folder", 32, root=image_tree, progress=False)
    assert len(image_set) == 36 and len(list(cache_root.iterdir())) == 1


def test_a_damaged_cache_is_decoded_again_not_trusted(image_tree):
    first = load_images("folder", 32, root=image_tree, progress=False)
    (cache,) = (settings.data_dir() / "cache").iterdir()
    (cache / "images.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.warns(UserWarning, match="ignoring the damaged image cache"):
        second = load_images("folder", 32, root=image_tree, progress=False)
    assert np.array_equal(first.images, second.images)
    third = load_images("folder", 32, root=image_tree, progress=False)  # the rewritten cache is read quietly
    assert np.array_equal(first.images, third.images)


def test_table_and_report_write_failures_keep_the_previous_files(tmp_path, monkeypatch):
    frame = pd.DataFrame({"metric": ["P@10"], "value": [0.5]})
    csv_path, md_path = write_table(frame, tmp_path / "table1")
    before = csv_path.read_text(), md_path.read_text()
    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", half_then_fail())
        with pytest.raises(OSError):  # the Markdown fails after the CSV was written: neither is replaced
            write_table(frame.assign(value=0.9), tmp_path / "table1")
        with pytest.raises(OSError):
            write_json(tmp_path / "table1.csv", {"half": "written"})
    assert (csv_path.read_text(), md_path.read_text()) == before and leftovers(tmp_path) == []


def test_figure_write_failure_keeps_the_previous_figure(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    fig, axes = new_figure(1, 1, (2, 2))
    path = save_figure(fig, tmp_path / "figure1.png")
    before = path.read_bytes()
    with monkeypatch.context() as patch, pytest.raises(OSError):
        patch.setattr(type(fig), "savefig", lambda self, target, **kw: half_then_fail()(target))
        save_figure(fig, path)
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_folder_write_failure_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "cache-entry"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("new, half")
            raise RuntimeError("crash while filling the folder")
    assert (target / "a.txt").read_text() == "old" and leftovers(tmp_path) == []
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"] and leftovers(tmp_path) == []


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    old_mask = os.umask(0o022)
    try:
        file_mode = stat.S_IMODE(write_text(tmp_path / "report.md", "x").stat().st_mode)
        with atomic_dir(tmp_path / "folder"):
            pass
        folder_mode = stat.S_IMODE((tmp_path / "folder").stat().st_mode)
    finally:
        os.umask(old_mask)
    # mkstemp/mkdtemp alone would give 0o600 / 0o700: unreadable to colleagues on a shared machine
    assert (file_mode, folder_mode) == (0o644, 0o755)
