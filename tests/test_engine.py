"""The one training loop (training/engine.py) and the one checkpoint format (training/checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitdsi_utils.baselines.dense import DenseConfig, DenseEncoder, load_dense, save_dense
from vitdsi_utils.baselines.ssl import SSLEncoder, load_ssl, save_ssl
from vitdsi_utils.ids.codec import make_codec
from vitdsi_utils.model.vit import DSIConfig, DSIModel, ViTConfig
from vitdsi_utils.training.checkpoint import (
    KINDS,
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    write_checkpoint,
)
from vitdsi_utils.training.engine import Checkpointing, EpochEnd, linear_warmup, run_training

TINY = dict(image_size=16, patch_size=8, dim=16, mlp_dim=32, depth=1, heads=2, dropout=0.1)


class Regression:
    """A toy objective: fit y = 3x with noise drawn from the run's generator; stops once the loss is small."""

    def __init__(self, stop_below: float = 0.0):
        self.x = torch.linspace(-1, 1, 32).unsqueeze(1)
        self.stop_below, self.losses = stop_below, []

    def epoch_batches(self, generator):
        return list(torch.randperm(32, generator=generator).split(8))

    def loss(self, model, ids, generator):
        noise = 0.01 * torch.randn(len(ids), 1, generator=generator)
        loss = ((model(self.x[ids]) - 3 * self.x[ids] - noise) ** 2).mean()
        self.losses.append(float(loss.detach()))
        return loss

    def end_epoch(self, model, epoch, seconds):
        loss = sum(self.losses[-4:]) / 4
        return EpochEnd([{"epoch": epoch, "loss": loss}], {"loss": f"{loss:.3f}"}, stop=loss < self.stop_below)


def train(epochs: int, path: Path | None = None, stop_below: float = 0.0, lr_at=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = []

    def save(target, epoch, counters, generator):
        state = {
            "format": 2,
            "kind": "dsi",
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "history": list(history),
            "rng": rng_state(generator),
            "extra": counters,
        }
        torch.save(state, target)
        saved.append(epoch)

    history = []
    checkpoint = Checkpointing(path, lambda p: torch.load(p, weights_only=True), save, every=2) if path else None
    run_training(
        model,
        Regression(stop_below),
        optimizer,
        epochs=epochs,
        seed=3,
        lr_at=lr_at,
        history=history,
        checkpoint=checkpoint,
        progress=False,
    )
    return model, history, saved, optimizer


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight, straight_history, _, _ = train(6)
    train(4, tmp_path / "run.pt")  # interrupted after 4 of 6 epochs
    resumed, resumed_history, saved, _ = train(6, tmp_path / "run.pt")
    assert saved == [6]
    assert resumed_history == straight_history
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoints_every_k_epochs_and_after_the_last(tmp_path):
    _, _, saved, _ = train(5, tmp_path / "run.pt")
    assert saved == [2, 4, 5]


def test_the_objective_stops_the_run_and_a_finished_run_resumes_to_nothing(tmp_path):
    _, history, saved, _ = train(50, tmp_path / "run.pt", stop_below=0.5)
    assert len(history) < 50 and saved[-1] == len(history)
    _, again, saved_again, _ = train(50, tmp_path / "run.pt", stop_below=0.5)
    assert again == history and saved_again == []


def test_the_learning_rate_follows_the_schedule():
    schedule = linear_warmup(0.1, 10)
    assert schedule(0) == pytest.approx(0.01) and schedule(9) == pytest.approx(0.1) and schedule(50) == 0.1
    assert linear_warmup(0.1, 0) is None
    _, _, _, optimizer = train(1, lr_at=schedule)  # 4 steps: the last one ran at step index 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.04)


def kinds_on_disk(tmp_path):
    torch.manual_seed(0)
    codec = make_codec(10)
    dsi = DSIModel(DSIConfig.from_codec(codec, **TINY))
    paths = {
        "dsi": save_checkpoint(tmp_path / "dsi.pt", dsi, None, dsi.config, None, 1, [], codec),
        "dense-encoder": save_dense(tmp_path / "dense.pt", DenseEncoder(DenseConfig(**TINY)), None, [], epoch=1),
        "ssl-encoder": save_ssl(tmp_path / "ssl.pt", SSLEncoder(ViTConfig(**TINY), 16, 8), None, [], epoch=1),
    }
    return paths


def test_one_format_with_a_kind_for_every_model(tmp_path):
    paths = kinds_on_disk(tmp_path)
    for kind, path in paths.items():
        state = read_checkpoint(path)
        assert state["format"] == 2 and state["kind"] == kind
        for other in KINDS:
            if other != kind:
                with pytest.raises(CheckpointError, match=f"is {KINDS[kind]}, not {KINDS[other]}"):
                    read_checkpoint(path, other)
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        write_checkpoint(
            tmp_path / "x.pt",
            "lstm",
            model=torch.nn.Linear(1, 1),
            optimizer=None,
            config={},
            train_config=None,
            epoch=0,
            history=[],
            rng=None,
        )
    with pytest.raises(ValueError, match=r"holds the entries \['codec'\]"):
        write_checkpoint(
            tmp_path / "x.pt",
            "dsi",
            model=torch.nn.Linear(1, 1),
            optimizer=None,
            config={},
            train_config=None,
            epoch=0,
            history=[],
            rng=None,
        )


def test_checkpoints_of_the_first_format_still_load(tmp_path):
    paths = kinds_on_disk(tmp_path)
    for kind, path in paths.items():
        state = torch.load(path, weights_only=True)
        state["format"] = 1
        if kind == "dsi":
            del state["kind"]  # format 1 DSI files recorded no kind
        if kind == "ssl-encoder":
            state["ssl_config"] = state.pop("train_config")  # nor did SSL files name their settings so
        torch.save(state, path)
    assert load_checkpoint(paths["dsi"])["kind"] == "dsi"
    assert load_dense(paths["dense-encoder"])[1]["kind"] == "dense-encoder"
    assert "train_config" in load_ssl(paths["ssl-encoder"])[1]
