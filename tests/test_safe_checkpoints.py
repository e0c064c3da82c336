"""Safe loading: a checkpoint of another run names what differs; files that would run code are refused unread."""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from vitdsi_utils import settings
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.demo import QueryDemo
from vitdsi_utils.ids.codec import IDCodec, make_codec
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.phases import index_database
from vitdsi_utils.training.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from vitdsi_utils.training.config import TrainConfig
from vitdsi_utils.training.loop import fit, train_indexing

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 16
BASE = dict(image_size=SIZE, patch_size=8, dim=32, mlp_dim=32, depth=1, heads=2, dropout=0.1)
TINY = dict(patch_size=16, dim=16, mlp_dim=32, depth=1, heads=2)


def quiet(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "batch_size": 8, "progress": False, "device": "cpu", **overrides})


def images_of(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, SIZE, SIZE, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def model_for(codec: IDCodec, **overrides) -> DSIModel:
    torch.manual_seed(0)
    return DSIModel(DSIConfig.from_codec(codec, **{**BASE, **overrides}))


@pytest.fixture
def interrupted(tmp_path):
    """A checkpoint of one finished indexing epoch (of two) for 24 IDs and the BASE model."""
    codec = make_codec(24)
    path = tmp_path / "indexing.ckpt"
    train_indexing(model_for(codec), codec, images_of(24), config=quiet(target_accuracy=None), checkpoint_path=path)
    return path, codec


# ------------------------------------------------------------------------------------------
# Another model configuration, another ID set, another database
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, saved",
    [
        ("dim", 16, 32),
        ("depth", 2, 1),
        ("patch_size", 4, 8),
        ("pos_encoding", "learned", "'sinusoidal'"),
        ("dropout", 0.0, 0.1),
        ("heads", 4, 2),
    ],
)
def test_resuming_with_another_model_config_names_the_field(interrupted, field, value, saved):
    path, codec = interrupted
    model = model_for(codec, **{field: value})
    shown = repr(value)
    with pytest.raises(CheckpointError, match=rf"model {field}: saved {saved}, requested {shown}.*Delete it"):
        train_indexing(model, codec, images_of(24), config=quiet(epochs=2), checkpoint_path=path)


def test_resuming_with_other_ids_names_the_difference(interrupted):
    path, codec = interrupted
    more = make_codec(30)  # same vocabulary and length, six more IDs
    with pytest.raises(CheckpointError, match="IDs: saved 24 IDs, requested 30"):
        train_indexing(model_for(more), more, images_of(30), config=quiet(epochs=2), checkpoint_path=path)
    shuffled = IDCodec(list(reversed(codec.codes)))
    with pytest.raises(CheckpointError, match=r"IDs: row 0 has ID \(0, 0\) saved, \(2, 3\) requested"):
        train_indexing(model_for(shuffled), shuffled, images_of(24), config=quiet(epochs=2), checkpoint_path=path)


def test_resuming_another_phase_is_refused(interrupted):
    path, codec = interrupted
    with pytest.raises(CheckpointError, match="holds phase 'indexing', not 'retrieval'"):
        fit(
            model_for(codec),
            codec,
            [("retrieval", images_of(24), torch.arange(24))],
            config=quiet(epochs=2),
            checkpoint_path=path,
            stop_on=None,
            phase="retrieval",
        )


def test_a_matching_checkpoint_still_resumes(interrupted):
    path, codec = interrupted
    history = train_indexing(
        model_for(codec), codec, images_of(24), config=quiet(epochs=2, target_accuracy=None), checkpoint_path=path
    )
    assert [row["epoch"] for row in history] == [1, 2]


@pytest.fixture(scope="module")
def digits():
    return load_images("digits", 32, progress=False)


def quick_database(digits, scheme: str, seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_database(digits, 80, id_scheme=scheme, seed=seed)


def test_a_finished_model_of_another_id_scheme_or_config_is_not_reused(digits, tmp_path):
    clustered, random = quick_database(digits, "clustered"), quick_database(digits, "random")
    index_database(clustered, model_overrides=TINY, config=quiet(), run_dir=tmp_path)
    assert (tmp_path / "zero_shot.pt").exists()
    with pytest.raises(CheckpointError, match="data id_scheme: saved 'clustered', requested 'random'"):
        index_database(random, model_overrides=TINY, config=quiet(), run_dir=tmp_path)
    with pytest.raises(CheckpointError, match="data seed: saved 0, requested 1"):
        index_database(
            quick_database(digits, "clustered", seed=1), model_overrides=TINY, config=quiet(), run_dir=tmp_path
        )
    with pytest.raises(CheckpointError, match="model dim: saved 16, requested 32"):
        index_database(clustered, model_overrides={**TINY, "dim": 32}, config=quiet(), run_dir=tmp_path)
    # the same settings load the finished model
    assert index_database(clustered, model_overrides=TINY, config=quiet(), run_dir=tmp_path).epochs == 1


def test_an_interrupted_run_of_another_id_scheme_is_not_resumed(digits, tmp_path):
    clustered, random = quick_database(digits, "clustered"), quick_database(digits, "random")
    index_database(clustered, model_overrides=TINY, config=quiet(), run_dir=tmp_path)
    (tmp_path / "zero_shot.pt").unlink()  # as if killed after its last checkpoint
    with pytest.raises(CheckpointError, match=r"indexing.ckpt was written for another database.*id_scheme"):
        index_database(random, model_overrides=TINY, config=quiet(epochs=2), run_dir=tmp_path)


def test_the_demo_refuses_a_model_of_another_database(digits, tmp_path):
    clustered, random = quick_database(digits, "clustered"), quick_database(digits, "random")
    index_database(clustered, model_overrides=TINY, config=quiet(), run_dir=tmp_path)
    with (
        warnings.catch_warnings(),
        pytest.raises(CheckpointError, match="id_scheme: saved 'clustered', requested 'random'"),
    ):
        warnings.simplefilter("ignore")
        QueryDemo.from_run_dir(tmp_path, random, bovw_words=20)


def test_load_model_checks_what_it_is_asked_to(interrupted):
    path, codec = interrupted
    model, loaded_codec, _ = load_model(path, expect_config={"image_size": SIZE}, expect_codec=codec)
    assert loaded_codec.codes == codec.codes
    with pytest.raises(CheckpointError, match="model image_size: saved 16, requested 32"):
        load_model(path, expect_config={"image_size": 32})


# ------------------------------------------------------------------------------------------
# Files that are not plain data
# ------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this object makes a folder: a harmless stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the plain pickle file
def test_a_checkpoint_holding_a_pickled_object_is_refused_and_nothing_runs(interrupted, tmp_path):
    path, codec = interrupted
    state = torch.load(path, weights_only=True)

    # the file is a real exploit: an unrestricted unpickler runs the payload
    proof = tmp_path / "proof"
    torch.save({**state, "extra": {"payload": Payload(str(proof))}}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert proof.is_dir()

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({**state, "extra": {"payload": Payload(str(marker))}}, evil)
    with pytest.raises(CheckpointError, match="refused to load .*evil.pt.*could run arbitrary code"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(evil)
    with pytest.raises(CheckpointError, match="refused"):  # nor does a resume read it
        train_indexing(model_for(codec), codec, images_of(24), config=quiet(epochs=2), checkpoint_path=evil)
    with (tmp_path / "plain.pkl").open("wb") as file:
        pickle.dump({"format": 1, "payload": Payload(str(marker))}, file)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "plain.pkl")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a readable checkpoint"),
        (b"hello, I am a text file", "not a readable checkpoint"),
        ("half", "not a readable checkpoint"),
    ],
)
def test_damaged_checkpoints_say_delete_and_train_again(interrupted, tmp_path, content, message):
    path, _ = interrupted
    whole = path.read_bytes()
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(whole[: len(whole) // 2] if content == "half" else content)
    with pytest.raises(CheckpointError, match=f"{message}.*Delete it and train again"):
        load_checkpoint(damaged)


def test_foreign_plain_data_is_not_taken_for_a_checkpoint(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'list'"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"format": 1, "model": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"lacks the checkpoint entries \['optimizer'"):
        load_checkpoint(tmp_path / "partial.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_only_plain_data_is_written(tmp_path):
    codec = make_codec(12)
    model = model_for(codec)
    # NumPy numbers (e.g. a seed drawn with NumPy) are stored as Python numbers, so the file loads
    extra = {"seed": np.int64(3), "score": np.float32(0.5), "where": tmp_path}
    path = save_checkpoint(
        tmp_path / "ok.pt", model, None, model.config, {"seed": np.int64(3)}, 1, [], codec, extra=extra
    )
    state = load_checkpoint(path)
    assert state["extra"] == {"seed": 3, "score": 0.5, "where": str(tmp_path)} and type(state["extra"]["seed"]) is int
    # anything else fails when written, not hours later when read
    with pytest.raises(TypeError, match=r"checkpoint entry extra\['payload'\] is a Payload"):
        save_checkpoint(
            tmp_path / "bad.pt",
            model,
            None,
            model.config,
            None,
            1,
            [],
            codec,
            extra={"payload": Payload(str(tmp_path / "x"))},
        )
    assert not (tmp_path / "bad.pt").exists()


def test_an_image_cache_holding_pickled_objects_is_not_unpickled(image_tree, tmp_path):
    load_images("folder", 32, root=image_tree, progress=False)
    (cache,) = (settings.data_dir() / "cache").iterdir()
    marker = tmp_path / "ran"
    array = np.empty(1, dtype=object)
    array[0] = Payload(str(marker))
    np.save(cache / "images.npy", array, allow_pickle=True)
    with pytest.warns(UserWarning, match="ignoring the damaged image cache"):
        image_set = load_images("folder", 32, root=image_tree, progress=False)
    assert len(image_set) == 36 and not marker.exists()


def test_a_resumed_run_counts_the_seconds_of_every_session(digits, tmp_path, monkeypatch):
    db = quick_database(digits, "random")
    index_database(db, model_overrides=TINY, config=quiet(epochs=1, target_accuracy=None), run_dir=tmp_path)
    (tmp_path / "zero_shot.pt").unlink()  # as if killed after epoch 1's checkpoint
    state = load_checkpoint(tmp_path / "indexing.ckpt")
    state["history"][0]["seconds"] = 1000.0  # an earlier session's long epoch
    torch.save(state, tmp_path / "indexing.ckpt")
    resumed = index_database(db, model_overrides=TINY, config=quiet(epochs=2, target_accuracy=None), run_dir=tmp_path)
    assert resumed.epochs == 2
    assert 1000.0 < resumed.seconds < 1000.0 + 60  # the first session's 1000 s plus this one's, not this one's alone
    again = index_database(db, model_overrides=TINY, config=quiet(epochs=2, target_accuracy=None), run_dir=tmp_path)
    assert again.seconds == pytest.approx(resumed.seconds)  # the finished model keeps its total
