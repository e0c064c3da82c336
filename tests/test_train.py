"""Training loop: loss masking, pairs, memorisation, history, checkpoints and exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from vitdsi_utils.ids.codec import IDCodec, make_codec
from vitdsi_utils.model.decoding import beam_search
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.training.checkpoint import load_checkpoint, load_model, save_checkpoint
from vitdsi_utils.training.config import TrainConfig
from vitdsi_utils.training.history import HISTORY_COLUMNS, History
from vitdsi_utils.training.loop import (
    evaluate,
    fit,
    sequence_loss,
    token_losses,
    train_indexing,
    train_multitask,
    train_retrieval,
)
from vitdsi_utils.training.tasks import IndexingTask, RetrievalPairs, relevant_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SIZE = 16


def images_of(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)


def tiny_model(codec: IDCodec, seed: int = 0, **overrides) -> DSIModel:
    torch.manual_seed(seed)
    values = dict(image_size=SIZE, patch_size=8, dim=32, mlp_dim=64, depth=1, heads=2, dropout=0.1)
    return DSIModel(DSIConfig.from_codec(codec, **{**values, **overrides}))


def quiet(**overrides) -> TrainConfig:
    return TrainConfig(**{"progress": False, "device": "cpu", **overrides})


# -- loss and pairs --------------------------------------------------------------------------
def test_loss_ignores_pad():
    codec = IDCodec([(1,), (2, 3), (4, 5, 6)])  # targets: [1 EOS PAD PAD], [2 3 EOS PAD], [4 5 6 EOS]
    targets = codec.targets()
    torch.manual_seed(0)
    logits = torch.randn(3, codec.max_length, codec.vocab_size)
    per_token = token_losses(logits, targets, codec.pad)
    pad = targets == codec.pad
    assert pad.sum() == 3 and (per_token[pad] == 0).all() and (per_token[~pad] > 0).all()
    expected = torch.nn.functional.cross_entropy(logits[~pad], targets[~pad])
    assert torch.allclose(sequence_loss(logits, targets, codec.pad), expected)
    noisy = logits.clone()
    noisy[pad] = torch.randn(int(pad.sum()), codec.vocab_size) * 100  # whatever comes out at PAD is free
    assert torch.allclose(sequence_loss(noisy, targets, codec.pad), expected)


def test_relevant_pairs_known_answer():
    query_idx, rows = relevant_pairs([0, 1, 2], [1, 0, 1, 3])
    assert query_idx.tolist() == [0, 1, 1] and rows.tolist() == [1, 0, 2]
    # multi-hot labels (boolean: an integer matrix could also be rows of label ids): relevant when any label is shared
    q = torch.tensor([[1, 0, 1], [0, 1, 0]]).bool()
    d = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 1, 0]]).bool()
    query_idx, rows = relevant_pairs(q, d)
    assert list(zip(query_idx.tolist(), rows.tolist())) == [(0, 0), (0, 2), (1, 1), (1, 2)]


def test_relevant_pairs_cap_is_seeded_subset():
    q, d = torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 0, 0, 0, 1])
    full = set(zip(*[t.tolist() for t in relevant_pairs(q, d)]))
    capped = relevant_pairs(q, d, max_pairs_per_query=2, seed=3)
    assert capped[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert set(zip(*[t.tolist() for t in capped])) <= full
    assert all(torch.equal(a, b) for a, b in zip(capped, relevant_pairs(q, d, max_pairs_per_query=2, seed=3)))


# -- memorisation ----------------------------------------------------------------------------
def test_memorises_64_images():
    codec = make_codec(64)
    images = images_of(64, seed=1)
    model = tiny_model(codec, dim=64, mlp_dim=128, dropout=0.0)
    config = quiet(lr=3e-3, batch_size=16, epochs=60, target_accuracy=1.0, seed=0)
    history = train_indexing(model, codec, images, config=config)
    assert history[-1]["seq_acc"] == 1.0 and history[-1]["epoch"] < 60  # stopped on the target
    _, rows = beam_search(model, images, codec, k=1)
    assert torch.equal(rows[:, 0], torch.arange(64))  # IA@1 = 1.0


def test_stops_on_beam_search_ia_with_dropout():
    """With dropout the running accuracy lags; the stop rule re-scores the index the way it is evaluated."""
    codec = make_codec(32)
    images = images_of(32, seed=2)
    model = tiny_model(codec, dim=64, mlp_dim=128, dropout=0.3)
    config = quiet(lr=3e-3, batch_size=8, epochs=80, target_accuracy=1.0, stop_check_from=0.5)
    frame = train_indexing(model, codec, images, config=config).to_frame()
    checks = frame[frame.split == "train_eval"]
    assert len(checks) >= 1 and frame.iloc[-1]["split"] == "train_eval"  # the run ended on a check
    assert checks.iloc[-1]["seq_acc"] == 1.0 and checks.iloc[-1]["ia1"] == 1.0
    earlier = checks.iloc[:-1]  # each earlier check failed the teacher-forced test or the beam-search one
    assert ((earlier["seq_acc"] < 1.0) | (earlier["ia1"] < 1.0)).all()
    assert earlier.loc[earlier["seq_acc"] < 1.0, "ia1"].isna().all()  # beam search only behind the cheap check
    running = frame[frame.split == "train"].set_index("epoch")["seq_acc"]
    assert (running.loc[checks.epoch] >= 0.5).all()  # checks only once the running accuracy is close
    assert (running.loc[running.index < checks.epoch.min()] < 0.5).all()
    assert evaluate(model, codec, [IndexingTask(images)])["indexing"]["seq_acc"] == 1.0
    _, rows = beam_search(model, images, codec, k=1, beam_size=100)  # what the evaluation runs
    assert torch.equal(rows[:, 0], torch.arange(32))


def test_other_stop_metrics():
    codec = make_codec(32)
    images = images_of(32, seed=2)
    model = tiny_model(codec, dim=64, mlp_dim=128, dropout=0.3)
    config = quiet(lr=3e-3, batch_size=8, epochs=80, target_accuracy=1.0, stop_check_from=0.5, stop_metric="eval")
    frame = train_indexing(model, codec, images, config=config).to_frame()
    checks = frame[frame.split == "train_eval"]
    assert "ia1" not in frame.columns and checks.iloc[-1]["seq_acc"] == 1.0 and (checks.iloc[:-1]["seq_acc"] < 1).all()
    # the running accuracy with dropout, no re-scoring
    model = tiny_model(codec, dropout=0.3)
    frame = train_indexing(model, codec, images, config=quiet(epochs=2, stop_metric="train")).to_frame()
    assert set(frame.split) == {"train"}
    with pytest.raises(ValueError, match="stop_metric"):
        quiet(stop_metric="val")


def test_periodic_stop_checks_open_a_gate_that_dropout_keeps_shut():
    """stop_check_every re-scores every E epochs even when the running accuracy never reaches the gate."""
    codec = make_codec(32)
    images = images_of(32, seed=2)
    config = dict(lr=3e-3, batch_size=8, epochs=80, target_accuracy=1.0, stop_metric="eval", stop_check_from=2.0)
    model = tiny_model(codec, dim=64, mlp_dim=128, dropout=0.3)
    frame = train_indexing(model, codec, images, config=quiet(**config)).to_frame()
    assert "train_eval" not in set(frame.split) and frame.epoch.max() == 80  # gate never opens: every epoch runs
    model = tiny_model(codec, dim=64, mlp_dim=128, dropout=0.3)
    frame = train_indexing(model, codec, images, config=quiet(**config, stop_check_every=3)).to_frame()
    checks = frame[frame.split == "train_eval"]
    assert len(checks) >= 1 and (checks.epoch % 3 == 0).all()  # only the periodic checks
    assert checks.iloc[-1]["seq_acc"] == 1.0 and (checks.iloc[:-1]["seq_acc"] < 1.0).all()
    assert frame.epoch.max() == checks.epoch.max() < 80  # stopped on the first check that passed
    with pytest.raises(ValueError, match="stop_check_every"):
        quiet(stop_check_every=-1)


# -- tasks, history --------------------------------------------------------------------------
def test_multitask_mix_ratio_and_validation(tmp_path):
    codec = make_codec(20)
    index = IndexingTask(images_of(20))
    queries = images_of(6, seed=5)
    pairs = RetrievalPairs.from_labels(queries, [0, 1, 0, 1, 0, 1], [i % 2 for i in range(20)])
    assert len(pairs) == 60 and len(pairs.images) == 6  # every relevant row, query images stored once
    model = tiny_model(codec)
    history = train_multitask(model, codec, index, pairs, mix_ratio=0.5, val=[pairs], config=quiet(epochs=2))
    frame = history.to_frame()
    assert list(frame.columns[: len(HISTORY_COLUMNS)]) == list(HISTORY_COLUMNS)
    train = frame[frame.split == "train"].set_index(["epoch", "task"])
    assert train.loc[(1, "indexing"), "n_examples"] == 20 and train.loc[(1, "retrieval"), "n_examples"] == 10
    assert train.loc[(1, "all"), "n_examples"] == 30
    assert set(frame[frame.split == "val"].epoch) == {1, 2} and (frame.phase == "multitask").all()
    history.save_csv(tmp_path / "h.csv")
    history.save_json(tmp_path / "h.json")
    assert History.load_json(tmp_path / "h.json") == history
    assert json.loads((tmp_path / "h.json").read_text())[0]["phase"] == "multitask"
    # a later phase appends to the same history
    train_retrieval(model, codec, pairs, config=quiet(epochs=1), history=history)
    assert history[-1]["phase"] == "retrieval" and history.last("train", "retrieval", "retrieval")["epoch"] == 1


def test_fit_rejects_unknown_stop_task():
    codec = make_codec(10)
    with pytest.raises(ValueError, match="stop_on"):
        fit(tiny_model(codec), codec, [("retrieval", images_of(10), torch.arange(10))], config=quiet(epochs=1))
    with pytest.raises(ValueError, match="rows outside"):
        fit(tiny_model(codec), codec, [("indexing", images_of(2), torch.tensor([0, 10]))], config=quiet(epochs=1))


# -- checkpoints -----------------------------------------------------------------------------
def test_checkpoint_roundtrip(tmp_path):
    codec = make_codec(12)
    model = tiny_model(codec, pos_encoding="learned")
    history = train_indexing(model, codec, images_of(12), config=quiet(epochs=1))
    optimizer = torch.optim.Adam(model.parameters())
    path = save_checkpoint(tmp_path / "m.pt", model, optimizer, model.config, quiet(), 1, history, codec)
    raw = torch.load(path, weights_only=True)  # plain data only: loads without trusting pickles
    assert raw["config"] == model.config.to_dict() and raw["codec"]["codes"][11] == [1, 1]
    assert load_checkpoint(path)["epoch"] == 1
    loaded, loaded_codec, meta = load_model(path)
    assert loaded_codec.codes == codec.codes and loaded.config == model.config
    assert meta["history"] == history and meta["train_config"]["device"] == "cpu"
    model.eval()
    images, inputs = images_of(3), codec.decoder_inputs(codec.targets([0, 1, 2]))
    assert torch.equal(model(images, inputs), loaded(images, inputs))


def test_resume_matches_uninterrupted_run(tmp_path):
    codec = make_codec(24)
    images = images_of(24)
    config = dict(epochs=4, target_accuracy=None, batch_size=8, warmup_steps=3)  # never stops early

    straight = tiny_model(codec)
    straight_history = train_indexing(straight, codec, images, config=quiet(**config))

    path = tmp_path / "ckpt.pt"
    first = tiny_model(codec)
    train_indexing(first, codec, images, config=quiet(**{**config, "epochs": 2}), checkpoint_path=path)
    assert load_checkpoint(path)["epoch"] == 2
    resumed = tiny_model(codec, seed=99)  # different init: everything must come from the checkpoint
    resumed_history = train_indexing(resumed, codec, images, config=quiet(**config), checkpoint_path=path)

    assert [r["epoch"] for r in resumed_history] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed_history] == [r["loss"] for r in straight_history]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # a finished checkpoint resumes to a no-op
    again = train_indexing(resumed, codec, images, config=quiet(**config), checkpoint_path=path)
    assert len(again) == 4
