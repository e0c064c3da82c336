"""Issue 21: a trained artefact is reused only for the settings that made it.

Every setting that shapes an indexed, fine-tuned or multi-task DSI model, a dense or a
self-supervised encoder is changed in turn, and the old artefact must be refused with that
setting named (never reused, never overwritten); settings that do not shape it must not block
reuse. Then the epoch-cap rule (a model that reached its target serves a larger cap, a capped
one continues from its checkpoint), problem 1's reproduction before/after, old files, the run
folder lock, and the checks of impossible values.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vitdsi_utils import cli
from vitdsi_utils.baselines.dense import DenseConfig, DenseEncoder, DenseTrainConfig, train_dense
from vitdsi_utils.baselines.ssl import SSLConfig, SSLEncoder, train_ssl
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.locks import RunFolderBusy, run_folder_lock
from vitdsi_utils.model.vit import ViTConfig
from vitdsi_utils.phases import fine_tune, index_database
from vitdsi_utils.runner.profiles import load_profile
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies import dsi
from vitdsi_utils.studies.dsi import DSISpec, run_experiment
from vitdsi_utils.studies.incremental import incremental_study
from vitdsi_utils.studies.specs import ModelSpec
from vitdsi_utils.training.checkpoint import CheckpointError, load_checkpoint
from vitdsi_utils.training.config import STOP_RULE_FIELDS, TrainConfig
from vitdsi_utils.training.reuse import finished_verdict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(patch_size=16, dim=16, mlp_dim=32, depth=1, heads=2)


def index_config(**overrides) -> TrainConfig:
    """Two epochs of a tiny model on 20 images: the 0.99 target is out of reach, so the run stops at its cap."""
    return TrainConfig(
        **{
            "epochs": 2,
            "batch_size": 8,
            "lr": 2e-3,
            "target_accuracy": 0.99,
            "progress": False,
            "device": "cpu",
            **overrides,
        }
    )


def tune_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "batch_size": 16, "lr": 1e-3, "progress": False, "device": "cpu", **overrides})


@pytest.fixture(scope="module")
def db():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_database(load_images("digits", 32, progress=False), 80, id_scheme="random", seed=0)


@pytest.fixture(scope="module")
def trained(db, tmp_path_factory):
    """A run folder with an indexed (capped at 2 epochs) and a fine-tuned model; copy it before changing it."""
    folder = tmp_path_factory.mktemp("trained") / "run"
    zero = index_database(db, model_overrides=TINY, config=index_config(), run_dir=folder)
    fine_tune(db, zero.model, config=tune_config(), run_dir=folder, max_pairs_per_query=2)
    return folder, zero


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "run"))


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".pt", ".ckpt")}


# ------------------------------------------------------------------------------------------
# Which settings shape a model: one explicit list, every other field counts
# ------------------------------------------------------------------------------------------
def test_the_settings_that_do_not_shape_a_model_are_listed_in_one_place():
    assert TrainConfig.RUNTIME_FIELDS == {
        "device",
        "amp",
        "compile",
        "progress",
        "eval_every",
        "eval_batch_size",
        "checkpoint_every",
    }
    assert DenseTrainConfig.RUNTIME_FIELDS == {"device", "progress", "eval_batch_size", "checkpoint_every"}
    assert SSLConfig.RUNTIME_FIELDS == {"device", "progress", "checkpoint_every"}
    for config in (TrainConfig(), DenseTrainConfig(), SSLConfig()):
        fields = {f.name for f in dataclasses.fields(config)}
        assert set(config.recipe()) == fields - config.RUNTIME_FIELDS  # every other field shapes the model


def test_the_stop_rule_counts_only_where_it_decides_something():
    full = set(TrainConfig().recipe())
    assert full >= set(STOP_RULE_FIELDS)
    assert set(TrainConfig().recipe(stop_rule=False)) == full - set(STOP_RULE_FIELDS)  # fine-tuning: all epochs
    assert "stop_beam" not in TrainConfig(stop_metric="eval").recipe()
    assert not {"stop_beam", "stop_check_from", "stop_check_every"} & set(TrainConfig(stop_metric="train").recipe())
    assert set(TrainConfig(target_accuracy=None).recipe()) & set(STOP_RULE_FIELDS) == {"target_accuracy"}


#: A new value for every TrainConfig setting that shapes an indexed model (all but epochs, whose rule is below).
INDEX_CHANGES = {
    "lr": 1e-3,
    "batch_size": 4,
    "target_accuracy": 0.9,
    "stop_metric": "eval",
    "stop_beam": 10,
    "stop_check_from": 0.5,
    "stop_check_every": 1,
    "weight_decay": 0.01,
    "label_smoothing": 0.1,
    "seed": 1,
    "grad_clip": 0.5,
    "warmup_steps": 3,
}


def test_every_shaping_setting_is_tried():
    assert set(INDEX_CHANGES) | {"epochs"} == set(index_config().recipe())


@pytest.mark.parametrize("where", ["finished", "interrupted"])
@pytest.mark.parametrize("field, value", INDEX_CHANGES.items())
def test_an_indexed_model_is_not_reused_for_another_setting(db, trained, tmp_path, field, value, where):
    folder = copy_of(trained[0], tmp_path)
    for name in ("fine_tuned.pt", "retrieval.ckpt"):
        (folder / name).unlink()
    if where == "interrupted":  # only the checkpoint: fit's resume makes the same check
        (folder / "zero_shot.pt").unlink()
    before = contents(folder)
    saved = repr(getattr(index_config(), field))
    with pytest.raises(CheckpointError, match=rf"{field}: saved {saved}, requested {value!r}.*Delete"):
        index_database(db, model_overrides=TINY, config=index_config(**{field: value}), run_dir=folder)
    assert contents(folder) == before  # refused: nothing trained, nothing overwritten


@pytest.mark.parametrize(
    "field, value",
    [
        ("device", "auto"),
        ("amp", False),
        ("compile", True),
        ("progress", True),
        ("eval_every", 3),
        ("eval_batch_size", 7),
        ("checkpoint_every", 4),
    ],
)
def test_settings_that_do_not_shape_the_model_do_not_block_reuse(db, trained, tmp_path, field, value):
    folder = copy_of(trained[0], tmp_path)
    before = contents(folder)
    again = index_database(db, model_overrides=TINY, config=index_config(**{field: value}), run_dir=folder)
    assert again.loaded and again.epochs == trained[1].epochs
    assert all(
        torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), trained[1].model.state_dict().values())
    )
    assert contents(folder) == before


#: A new value for every setting of a fine-tuned model: its TrainConfig's recipe (no stop rule) and its options.
TUNE_CHANGES = [
    ("lr", dict(config=dict(lr=5e-4)), "lr: saved 0.001, requested 0.0005"),
    ("batch_size", dict(config=dict(batch_size=8)), "batch_size: saved 16, requested 8"),
    ("epochs", dict(config=dict(epochs=2)), "epochs: saved 1, requested 2"),
    ("weight_decay", dict(config=dict(weight_decay=0.1)), "weight_decay: saved 0.0, requested 0.1"),
    ("label_smoothing", dict(config=dict(label_smoothing=0.1)), "label_smoothing: saved 0.0, requested 0.1"),
    ("seed", dict(config=dict(seed=3)), "seed: saved 0, requested 3"),
    ("grad_clip", dict(config=dict(grad_clip=0.0)), "grad_clip: saved 1.0, requested 0.0"),
    ("warmup_steps", dict(config=dict(warmup_steps=5)), "warmup_steps: saved 0, requested 5"),
    ("max_pairs_per_query", dict(max_pairs_per_query=3), "max_pairs_per_query: saved 2, requested 3"),
    ("targets", dict(targets="same-class"), "targets: saved 'pairs', requested 'same-class'"),
    ("index_views", dict(index_views=1), "index_views: saved 0, requested 1"),
    ("consolidate", dict(consolidate=2), "consolidate: saved 0, requested 2"),
]


def test_every_fine_tuning_setting_is_tried():
    tried = {name for name, _, _ in TUNE_CHANGES}
    assert set(tune_config().recipe(stop_rule=False)) <= tried
    assert {"max_pairs_per_query", "targets", "index_views", "consolidate"} <= tried


@pytest.mark.parametrize("name, change, message", TUNE_CHANGES, ids=[c[0] for c in TUNE_CHANGES])
def test_a_fine_tuned_model_is_not_reused_for_another_setting(db, trained, tmp_path, name, change, message):
    folder = copy_of(trained[0], tmp_path)
    before = contents(folder)
    kwargs = {"max_pairs_per_query": 2, **change, "config": tune_config(**change.get("config", {}))}
    with pytest.raises(CheckpointError, match=rf"fine_tuned.pt was fine-tuned with other settings: .*{message}"):
        fine_tune(db, trained[1].model, run_dir=folder, **kwargs)
    assert contents(folder) == before


def test_a_fine_tuned_model_is_not_reused_for_another_indexed_model(db, trained, tmp_path):
    folder = copy_of(trained[0], tmp_path)
    other = index_database(db, model_overrides=TINY, config=index_config(seed=1))  # same shape, other weights
    with pytest.raises(CheckpointError, match="indexed model: it was trained from other weights"):
        fine_tune(db, other.model, config=tune_config(), run_dir=folder, max_pairs_per_query=2)
    (folder / "fine_tuned.pt").unlink()  # interrupted: its checkpoint is refused as well
    with pytest.raises(CheckpointError, match="data parent: saved '[0-9a-f]+', requested '[0-9a-f]+'"):
        fine_tune(db, other.model, config=tune_config(), run_dir=folder, max_pairs_per_query=2)


def test_stop_settings_do_not_block_a_fine_tuned_model_without_consolidation(db, trained, tmp_path):
    folder = copy_of(trained[0], tmp_path)
    again = fine_tune(
        db,
        trained[1].model,
        config=tune_config(target_accuracy=0.5, stop_metric="train"),
        run_dir=folder,
        max_pairs_per_query=2,
    )
    assert again.loaded


# ------------------------------------------------------------------------------------------
# Epoch caps: reached the target, or stopped at the cap
# ------------------------------------------------------------------------------------------
def weights_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_capped_model_continues_to_a_higher_cap_exactly_as_a_fresh_run(db, trained, tmp_path):
    folder = copy_of(trained[0], tmp_path)
    for name in ("fine_tuned.pt", "retrieval.ckpt"):
        (folder / name).unlink()
    assert trained[1].reached_target is False and trained[1].epoch_cap == 2
    longer = index_database(db, model_overrides=TINY, config=index_config(epochs=4), run_dir=folder)
    fresh = index_database(db, model_overrides=TINY, config=index_config(epochs=4), run_dir=tmp_path / "fresh")
    assert not longer.loaded and longer.epochs == fresh.epochs == 4 and longer.epoch_cap == 4
    assert weights_equal(longer.model, fresh.model)
    # the record on disk is the new run's
    meta = load_checkpoint(folder / "zero_shot.pt")
    assert meta["epoch"] == 4 and meta["train_config"]["epochs"] == 4 and meta["extra"]["reached_target"] is False
    # a lower cap than it ran would be another model
    with pytest.raises(
        CheckpointError,
        match=r"epochs: saved 4 \(it stopped there without reaching the target\), "
        "requested 3",
    ):
        index_database(db, model_overrides=TINY, config=index_config(epochs=3), run_dir=folder)


def test_a_capped_model_is_not_continued_under_the_models_fine_tuned_from_it(db, trained, tmp_path):
    folder = copy_of(trained[0], tmp_path)
    before = contents(folder)
    with pytest.raises(
        CheckpointError,
        match="continuing it to 4 epochs would change the indexed model that .*fine_tuned.pt.*were trained from",
    ):
        index_database(db, model_overrides=TINY, config=index_config(epochs=4), run_dir=folder)
    assert contents(folder) == before


def test_a_capped_model_without_its_checkpoint_is_refused_for_a_higher_cap(db, trained, tmp_path):
    folder = copy_of(trained[0], tmp_path)
    (folder / "indexing.ckpt").unlink()
    with pytest.raises(CheckpointError, match="requested 4, and there is no checkpoint to continue it from"):
        index_database(db, model_overrides=TINY, config=index_config(epochs=4), run_dir=folder)


@pytest.fixture(scope="module")
def reached(db, tmp_path_factory):
    """A model that memorises half of its 20 images before its cap of 60 epochs."""
    folder = tmp_path_factory.mktemp("reached") / "run"
    config = index_config(epochs=60, lr=3e-3, target_accuracy=0.5)
    result = index_database(db, model_overrides=TINY, config=config, run_dir=folder)
    assert result.reached_target and result.epochs < 60
    return folder, result, config


def test_a_model_that_reached_its_target_serves_any_cap_it_fits_under(db, reached, tmp_path):
    folder, result, config = reached
    folder = copy_of(folder, tmp_path)
    bigger = index_database(db, model_overrides=TINY, config=dataclasses.replace(config, epochs=500), run_dir=folder)
    assert bigger.loaded and bigger.reached_target and bigger.epochs == result.epochs
    assert bigger.epoch_cap == 60  # the table reports the cap it ran under, not the one asked for
    exact = index_database(
        db, model_overrides=TINY, config=dataclasses.replace(config, epochs=result.epochs), run_dir=folder
    )
    assert exact.loaded
    below = result.epochs - 1
    with pytest.raises(
        CheckpointError,
        match=f"epochs: it reached the target after {result.epochs} epochs, more than the {below} requested",
    ):
        index_database(db, model_overrides=TINY, config=dataclasses.replace(config, epochs=below), run_dir=folder)


def test_the_verdict_rules():
    saved = index_config(epochs=40).to_dict()
    asked = index_config(epochs=80)
    assert finished_verdict(saved, asked, epochs_run=37, reached=True).reusable
    assert finished_verdict(saved, asked, epochs_run=37, reached=None).reusable  # old file: stopped before its cap
    assert finished_verdict(saved, asked, epochs_run=40, reached=False, resumable=True).resume
    assert finished_verdict(saved, asked, epochs_run=40, reached=None, resumable=True).resume  # unknown at the cap
    assert finished_verdict(saved, asked, epochs_run=40, reached=False).differences
    assert finished_verdict(saved, index_config(epochs=40), epochs_run=40, reached=False).reusable
    with_lr = finished_verdict(saved, index_config(epochs=80, lr=1e-3), epochs_run=40, reached=False, resumable=True)
    assert (
        with_lr.differences
        == [
            "lr: saved 0.002, requested 0.001",
            "epochs: saved 40 (it stopped there without reaching the target), requested 80",
        ]
        and not with_lr.resume
    )
    # without a stop rule (fine-tuning) the epochs must match
    assert finished_verdict(saved, asked, epochs_run=40, reached=None, stop_rule=False).differences == [
        "epochs: saved 40, requested 80"
    ]
    assert finished_verdict(None, asked, epochs_run=1, reached=None).differences


def test_a_model_saved_before_the_target_was_recorded(db, trained, tmp_path):
    """Old files: reused for their own cap; for a higher one the checkpoint says whether the target was reached."""
    folder = copy_of(trained[0], tmp_path)
    for name in ("fine_tuned.pt", "retrieval.ckpt"):
        (folder / name).unlink()
    state = torch.load(folder / "zero_shot.pt", weights_only=True)
    del state["extra"]["reached_target"]
    torch.save(state, folder / "zero_shot.pt")
    assert index_database(db, model_overrides=TINY, config=index_config(), run_dir=folder).loaded
    longer = index_database(db, model_overrides=TINY, config=index_config(epochs=3), run_dir=folder)
    assert not longer.loaded and longer.epochs == 3


# ------------------------------------------------------------------------------------------
# Problem 1 before/after: index with E1 epochs, then ask for other settings
# ------------------------------------------------------------------------------------------
def test_problem_1_a_study_never_reports_an_old_model_as_the_new_settings(tmp_path):
    """Before: a run folder indexed with 1 epoch was handed back for 3, and the header said "or 3 epochs".

    After: the capped run continues to 3 epochs, the table and the header say so, and a request
    with another learning rate is refused with the difference named.
    """
    paths = StudyPaths(tmp_path / "out", tmp_path / "runs")

    def study(**index):
        spec = DSISpec(
            source="digits",
            size=32,
            ns=(80,),
            schemes=("random",),
            model=ModelSpec(**TINY),
            index=index_config(**index),
            fine_tune=None,
        )
        return dsi.run(spec, paths)[0]

    first = study(epochs=1)
    markdown = (tmp_path / "out" / "dsi_digits_32px.md").read_text()
    assert "or 1 epochs (0 of 1 runs reached the target)" in markdown
    assert set(first["epochs"]) == {1} and set(first["epoch_cap"]) == {1} and set(first["reached_target"]) == {False}
    second = study(epochs=3)
    markdown = (tmp_path / "out" / "dsi_digits_32px.md").read_text()
    assert "or 3 epochs (0 of 1 runs reached the target)" in markdown
    assert set(second["epochs"]) == {3} and set(second["epoch_cap"]) == {3}
    assert re.search(r"\| DSI zero-shot \|\s+80 \| random \|\s+0 \|\s+3 \|\s+3 \| no\s+\|", markdown)
    with pytest.raises(
        CheckpointError,
        match="zero_shot.pt was indexed with other settings: lr: saved 0.002, "
        "requested 0.001. Delete .*zero_shot.pt and .*indexing.ckpt or use "
        r"another run folder \(a recipe's runs_dir",
    ):
        study(epochs=3, lr=1e-3)


def error_lines(err: str) -> list[str]:
    """The lines of a command's stderr that report an error (progress bars write there too)."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line]


def dsi_recipe(tmp_path: Path, *sets: str) -> list[str]:
    """``vitdsi run dsi`` (recipes/dsi.yaml) on 80 digits, random IDs, no fine-tuning, into ``tmp_path``."""
    settings = [
        "source=digits",
        "size=32",
        "ns=[80]",
        "schemes=[random]",
        "fine_tune=null",
        "index.warmup_steps=0",
        f"out_dir={tmp_path / 'out'}",
        f"runs_dir={tmp_path / 'runs'}",
        *sets,
    ]
    return ["run", "dsi", *(arg for item in settings for arg in ("--set", item))]


def test_problem_1_on_the_command_line(tmp_path, capsys):
    """Before: index with 0 epochs, ask for 30, get the 0-epoch model "done in 1 s" under a "30 epochs" header.

    After: 0 epochs and a target of 2 are refused before anything starts; a 1-epoch model is
    continued to 2 epochs when they are asked for, and refused for another learning rate.
    """
    for item, message in (
        ("index.epochs=0", "index.epochs: must be an integer >= 1, got 0"),
        ("index.target_accuracy=2", "index.target_accuracy: must lie in (0, 1], got 2"),
    ):
        assert cli.main(dsi_recipe(tmp_path, item)) == 2
        (error,) = error_lines(capsys.readouterr().err)
        assert error == f"vitdsi run: error: recipes/dsi.yaml: {message}"
    assert not (tmp_path / "runs").exists()
    assert cli.main(dsi_recipe(tmp_path, "index.epochs=1")) == 0
    capsys.readouterr()
    assert cli.main(dsi_recipe(tmp_path, "index.epochs=1", "index.lr=2e-3")) == 2
    (error,) = error_lines(capsys.readouterr().err)
    assert "zero_shot.pt was indexed with other settings: lr: saved 0.001, requested 0.002. Delete" in error
    assert cli.main(dsi_recipe(tmp_path, "index.epochs=2")) == 0
    captured = capsys.readouterr()
    assert "stopped at its cap of 1 epochs without reaching the target accuracy 0.99; continuing" in captured.err
    markdown = (tmp_path / "out" / "dsi_digits_32px.md").read_text()
    assert "or 2 epochs (0 of 1 runs reached the target)" in markdown


# ------------------------------------------------------------------------------------------
# The multi-task model consolidates from its own checkpoint
# ------------------------------------------------------------------------------------------
def test_multitask_and_fine_tuned_models_consolidate_separately(db, tmp_path):
    result = run_experiment(
        db,
        model_overrides=TINY,
        index_config=index_config(epochs=1),
        retrieval_config=tune_config(target_accuracy=1.0),
        multitask=True,
        max_pairs_per_query=2,
        consolidate=1,
        run_dir=tmp_path,
        k=10,
    )
    assert (tmp_path / "consolidate.ckpt").exists() and (tmp_path / "multitask_consolidate.ckpt").exists()
    # before, the multi-task run resumed the fine-tuned model's finished consolidation and came back as it
    assert not weights_equal(result.fine_tuned.model, result.multitask.model)


# ------------------------------------------------------------------------------------------
# Dense and self-supervised encoders, the incremental study
# ------------------------------------------------------------------------------------------
DENSE_CHANGES = {
    "batch_size": 12,
    "per_class": 3,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "margin": 0.2,
    "entropy_weight": 0.0,
    "flip": False,
    "min_crop": 0.8,
    "grad_clip": 0.0,
    "seed": 1,
}


def dense_setup():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 6)
    images = rng.integers(0, 256, (18, 32, 32, 3), dtype=np.uint8)
    config = DenseTrainConfig(epochs=1, batch_size=8, progress=False, device="cpu")
    return images, labels, config


def dense_model() -> DenseEncoder:
    torch.manual_seed(0)
    return DenseEncoder(DenseConfig(image_size=32, **TINY))


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    images, labels, config = dense_setup()
    path = tmp_path_factory.mktemp("dense") / "dense.pt"
    train_dense(dense_model(), images, labels, config=config, checkpoint_path=path)
    return path


def test_every_dense_setting_is_tried():
    assert set(DENSE_CHANGES) | {"epochs"} == set(DenseTrainConfig().recipe())


@pytest.mark.parametrize("field, value", DENSE_CHANGES.items())
def test_a_dense_encoder_is_not_reused_for_another_setting(dense_checkpoint, tmp_path, field, value):
    images, labels, config = dense_setup()
    path = Path(shutil.copy(dense_checkpoint, tmp_path / "dense.pt"))
    with pytest.raises(CheckpointError, match=rf"{field}: saved .*, requested {value!r}"):
        train_dense(
            dense_model(), images, labels, config=dataclasses.replace(config, **{field: value}), checkpoint_path=path
        )


def test_a_dense_encoder_continues_to_more_epochs_and_ignores_runtime_settings(dense_checkpoint, tmp_path):
    images, labels, config = dense_setup()
    path = Path(shutil.copy(dense_checkpoint, tmp_path / "dense.pt"))
    quiet = dataclasses.replace(config, eval_batch_size=3, checkpoint_every=9, progress=True)
    assert len(train_dense(dense_model(), images, labels, config=quiet, checkpoint_path=path)) == 1  # reused
    assert (
        len(
            train_dense(
                dense_model(), images, labels, config=dataclasses.replace(config, epochs=2), checkpoint_path=path
            )
        )
        == 2
    )


SSL_CHANGES = {
    "epochs": 2,
    "batch_size": 4,
    "lr": 1e-4,
    "weight_decay": 0.0,
    "warmup_steps": 1,
    "temperature": 0.5,
    "proj_hidden": 16,
    "proj_dim": 8,
    "min_scale": 0.5,
    "max_ratio": 1.0,
    "jitter": 0.0,
    "jitter_p": 0.5,
    "gray_p": 0.0,
    "grad_clip": 0.0,
    "seed": 1,
}


def ssl_setup():
    images = torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return images, SSLConfig(epochs=1, batch_size=6, progress=False, device="cpu", warmup_steps=0)


def ssl_model() -> SSLEncoder:
    torch.manual_seed(0)
    return SSLEncoder(ViTConfig(image_size=32, **TINY))


@pytest.fixture(scope="module")
def ssl_checkpoint(tmp_path_factory):
    images, config = ssl_setup()
    path = tmp_path_factory.mktemp("ssl") / "ssl.pt"
    train_ssl(ssl_model(), images, config=config, checkpoint_path=path)
    return path


def test_every_ssl_setting_is_tried():
    assert set(SSL_CHANGES) == set(SSLConfig().recipe())


@pytest.mark.parametrize("field, value", SSL_CHANGES.items())
def test_an_ssl_encoder_is_not_reused_for_another_setting(ssl_checkpoint, tmp_path, field, value):
    images, config = ssl_setup()
    path = Path(shutil.copy(ssl_checkpoint, tmp_path / "ssl.pt"))
    with pytest.raises(CheckpointError, match=rf"{field}: saved .*, requested {value!r}"):
        train_ssl(ssl_model(), images, config=dataclasses.replace(config, **{field: value}), checkpoint_path=path)
    quiet = dataclasses.replace(config, checkpoint_every=3, progress=True)
    assert len(train_ssl(ssl_model(), images, config=quiet, checkpoint_path=path)) == 1  # runtime settings: reused


def test_the_incremental_study_refuses_models_of_other_settings(db, tmp_path):
    kwargs = dict(
        finetune_epochs=1, replay_ratios=(0.0,), new_fraction=0.2, model_overrides=TINY, beam_size=5, runs_dir=tmp_path
    )
    incremental_study(db, index_config=index_config(epochs=1), **kwargs)
    incremental_study(db, index_config=index_config(epochs=1, eval_batch_size=5), **kwargs)  # runtime: reused
    with pytest.raises(
        CheckpointError, match="initial.pt was trained with other settings: lr: saved 0.002, requested 0.001"
    ):
        incremental_study(db, index_config=index_config(epochs=1, lr=1e-3), **kwargs)


# ------------------------------------------------------------------------------------------
# Two runs in one folder
# ------------------------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from vitdsi_utils.locks import run_folder_lock
    folder, held, release = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    with run_folder_lock(folder):
        held.write_text("held")
        deadline = time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
""")


def test_a_second_process_is_refused_or_waits_for_the_run_folder(tmp_path, capsys):
    folder, held, release = tmp_path / "run", tmp_path / "held", tmp_path / "release"
    env_path = str(Path(__file__).resolve().parents[1])
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(held), str(release)],
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )
    try:
        deadline = time.monotonic() + 60
        while not held.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.02)
        with pytest.raises(RunFolderBusy, match=rf"run is in use by another run \(pid {holder.pid} on "):
            with run_folder_lock(folder, timeout=0):
                pass
        with pytest.raises(RunFolderBusy, match=r"still in use by another run .* after waiting 0.2 s for its lock"):
            with run_folder_lock(folder, timeout=0.2):
                pass
        assert "waiting for" in capsys.readouterr().err
        threading.Timer(0.5, release.write_text, args=("go",)).start()
        start = time.monotonic()
        with run_folder_lock(folder, timeout=30):  # waits until the holder is done
            assert holder.poll() is not None or time.monotonic() - start >= 0.4
    finally:
        release.write_text("go")
        holder.wait(timeout=30)
    assert holder.returncode == 0


def test_the_lock_is_reentrant_in_a_thread_and_contended_between_threads(tmp_path):
    folder = tmp_path / "run"
    inside, results = threading.Event(), []

    def other():
        inside.wait()
        try:
            with run_folder_lock(folder, timeout=0):
                results.append("got it")
        except RunFolderBusy:
            results.append("busy")

    thread = threading.Thread(target=other)
    thread.start()
    with run_folder_lock(folder):
        with run_folder_lock(folder, timeout=0):  # the same thread again: no deadlock
            inside.set()
            thread.join()
    assert results == ["busy"]
    with run_folder_lock(folder, timeout=0):  # released
        pass


def test_two_runs_on_one_folder_train_once(db, tmp_path):
    """Two threads index the same folder at once: one trains, the other waits and loads its model."""
    folder, results = tmp_path / "run", []

    def run():
        results.append(index_database(db, model_overrides=TINY, config=index_config(), run_dir=folder))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.loaded for r in results) == [False, True]
    assert weights_equal(results[0].model, results[1].model)


def test_the_command_line_reports_a_busy_run_folder_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VITDSI_LOCK_TIMEOUT", "0")
    folder = tmp_path / "runs" / "digits-32px-N80-random-seed0"
    with run_folder_lock(folder):
        done = []
        thread = threading.Thread(target=lambda: done.append(cli.main(dsi_recipe(tmp_path, "index.epochs=1"))))
        thread.start()
        thread.join()
    (error,) = error_lines(capsys.readouterr().err)
    assert done == [2] and "is in use by another run" in error
    assert not (folder / "zero_shot.pt").exists()


def test_the_lock_timeout_setting_is_checked(monkeypatch):
    from vitdsi_utils import settings

    monkeypatch.setenv("VITDSI_LOCK_TIMEOUT", "2.5")
    assert settings.lock_timeout() == 2.5
    monkeypatch.setenv("VITDSI_LOCK_TIMEOUT", "")
    assert settings.lock_timeout() is None
    monkeypatch.setenv("VITDSI_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="VITDSI_LOCK_TIMEOUT must be a number of seconds >= 0"):
        settings.lock_timeout()


# ------------------------------------------------------------------------------------------
# Impossible values
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, overrides, message",
    [
        (TrainConfig, dict(target_accuracy=1.5), r"target_accuracy must lie in \(0, 1\], got 1.5"),
        (TrainConfig, dict(epochs=0), "epochs must be an integer >= 1, got 0"),
        (TrainConfig, dict(lr=-1.0), "lr must be > 0, got -1"),
        (TrainConfig, dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (TrainConfig, dict(eval_every=0), "eval_every must be an integer >= 1, got 0"),
        (DenseTrainConfig, dict(epochs=0), "epochs must be an integer >= 1, got 0"),
        (DenseTrainConfig, dict(lr=0.0), "lr must be > 0, got 0"),
        (DenseTrainConfig, dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (DenseTrainConfig, dict(lr="1e-3"), "lr must be a number, got '1e-3' .*1.0e-3"),
        (DenseTrainConfig, dict(min_crop=1.5), r"min_crop \(a fraction of the image side\) must lie in \(0, 1\]"),
        (DenseTrainConfig, dict(margin=2.0), r"margin \(a cosine similarity\) must lie in \[-1, 1\], got 2"),
        (SSLConfig, dict(epochs=0), "epochs must be an integer >= 1, got 0"),
        (SSLConfig, dict(batch_size=1), "batch_size must be an integer >= 2, got 1"),
        (SSLConfig, dict(temperature=0.0), "temperature must be > 0, got 0"),
        (SSLConfig, dict(lr=-1e-3), "lr must be > 0, got -0.001"),
        (SSLConfig, dict(gray_p=1.5), r"gray_p \(a probability\) must lie in \[0, 1\], got 1.5"),
    ],
)
def test_configs_refuse_impossible_values(config, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)


@pytest.mark.parametrize(
    "recipe, item, message",
    [
        ("dsi", "index.target_accuracy=2", "index.target_accuracy: must lie in (0, 1], got 2"),
        ("dsi", "index.target_accuracy=0", "index.target_accuracy: must lie in (0, 1], got 0"),
        ("dsi", "index.epochs=0", "index.epochs: must be an integer >= 1, got 0"),
        ("dsi", "fine_tune.epochs=0", "fine_tune.epochs: must be an integer >= 1, got 0"),
        ("dsi", "index.lr=0", "index.lr: must be > 0, got 0"),
        ("dsi", "index.lr=-0.1", "index.lr: must be > 0, got -0.1"),
        ("dsi", "index.batch_size=0", "index.batch_size: must be an integer >= 1, got 0"),
        ("dsi", "fine_tune.label_smoothing=1", "fine_tune.label_smoothing: must lie in [0, 1), got 1"),
        ("dsi", "max_pairs_per_query=0", "max_pairs_per_query: must be an integer >= 1, got 0"),
        ("dsi", "consolidate=-1", "consolidate: must be an integer >= 0, got -1"),
        ("ablations", "index.target_accuracy=1.01", "index.target_accuracy: must lie in (0, 1], got 1.01"),
        ("dense", "train.epochs=0", "train.epochs: must be an integer >= 1, got 0"),
        ("dense", "train.batch_size=0", "train.batch_size: must be an integer >= 1, got 0"),
        ("dsi-dense-init", "dense.lr=0", "dense.lr: must be > 0, got 0"),
        ("pretrain", "ssl.epochs=0", "ssl.epochs: must be an integer >= 1, got 0"),
        ("scale", "index.batch_size=0", "index.batch_size: must be an integer >= 1, got 0"),
        ("incremental", "finetune_epochs=0", "finetune_epochs: must be an integer >= 1, got 0"),
        ("incremental", "new_fraction=1", "new_fraction: must lie in (0, 1), got 1"),
    ],
)
def test_the_command_line_refuses_impossible_values_in_one_line(recipe, item, message, capsys):
    assert cli.main(["run", recipe, "--set", item]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err == f"vitdsi run: error: recipes/{recipe}.yaml: {message}\n"


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("vitdsi run: error: the following arguments are required: recipe")


@pytest.mark.parametrize(
    "line, message",
    [
        ("TARGET_ACCURACY: 2", r"profile key TARGET_ACCURACY \(index.target_accuracy: must lie in \(0, 1\], got 2\)"),
        ("INDEX_EPOCHS: 0", r"profile key INDEX_EPOCHS \(index.epochs: must be an integer >= 1, got 0\)"),
        ("LR: 0", r"profile key LR \(index.lr: must be > 0, got 0\)"),
        (
            "LR: 1e-3",
            r"profile key LR \(index.lr: expected a number, got '1e-3' \(str\); in a profile write numbers "
            "like 1e-3 as 1.0e-3",
        ),
        ("DENSE_EPOCHS: 0", r"profile key DENSE_EPOCHS \(train.epochs: must be an integer >= 1, got 0\)"),
        ("SSL_BATCH_SIZE: 1", r"profile key SSL_BATCH_SIZE \(ssl.batch_size: must be an integer >= 2, got 1\)"),
        ("INC_FINETUNE_EPOCHS: 0", r"profile key INC_FINETUNE_EPOCHS \(finetune_epochs: must be an integer >= 1"),
    ],
)
def test_a_profile_with_impossible_values_is_refused_when_read(tmp_path, line, message):
    path = tmp_path / "mine.yaml"
    path.write_text(f"DATASET: digits\n{line}\n")
    with pytest.raises(ValueError, match=rf"mine.yaml: {message}"):
        load_profile(path)
