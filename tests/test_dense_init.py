"""The DSI started from the dense encoder and trained multi-task (dense_init.py), on digits at 32 px."""

import warnings

import numpy as np
import pytest
import torch

from vitdsi_utils.baselines.dense import DenseConfig, DenseEncoder, save_dense
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.phases import index_database
from vitdsi_utils.studies.dense_init import dense_init_codec, run_dense_init
from vitdsi_utils.studies.dense_init_report import INIT_MULTITASK, INIT_ZERO_SHOT
from vitdsi_utils.training.config import TrainConfig

SHAPE = dict(patch_size=16, dim=32, mlp_dim=64, depth=1, heads=2)


@pytest.fixture(scope="module")
def images():
    return load_images("digits", 32, progress=False)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return DenseEncoder(DenseConfig(image_size=32, pooling="mean", **SHAPE)).eval()


@pytest.fixture(scope="module")
def encoder_path(encoder, tmp_path_factory):
    return save_dense(tmp_path_factory.mktemp("dense") / "dense.pt", encoder, None, [], epoch=0)


def test_init_runs_before_indexing_and_not_when_the_run_is_loaded(tmp_path, images, encoder, one_torch_thread):
    db = build_database(images, 120, id_scheme="clustered", seed=0)
    seen = []

    def init(model):
        model.load_encoder(encoder)
        seen.append({k: v.clone() for k, v in model.encoder_state_dict().items()})

    config = TrainConfig(epochs=1, seed=0, progress=False)
    first = index_database(db, model_overrides=SHAPE, config=config, run_dir=tmp_path, init=init)
    assert len(seen) == 1
    assert all(torch.equal(v, encoder.encoder_state_dict()[k]) for k, v in seen[0].items())
    # training moved the encoder away from where it started
    assert any(not torch.equal(v, first.model.encoder_state_dict()[k]) for k, v in seen[0].items())
    index_database(db, model_overrides=SHAPE, config=config, run_dir=tmp_path, init=init)  # loads zero_shot.pt
    assert len(seen) == 1


def test_semantic_ids_come_from_the_encoder_and_are_distinct(images, encoder):
    db = build_database(images, 120, id_scheme="clustered", seed=0)
    codec, facts = dense_init_codec(db, "semantic", encoder, k=3, c=4)
    assert len(codec) == db.n_index and len(set(codec.codes)) == db.n_index
    assert facts["tag"] == "semantic-dense-k3-c4"
    same, _ = dense_init_codec(db, "semantic", encoder, k=3, c=4)
    assert same.codes == codec.codes  # seeded
    with pytest.raises(ValueError, match="unknown ID scheme 'rq'"):
        dense_init_codec(db, "rq", encoder)


def test_run_dense_init_scores_both_models_under_their_names(tmp_path, images, encoder_path, one_torch_thread):
    db = build_database(images, 120, id_scheme="random", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_dense_init(
            db,
            encoder_path,
            run_dir=tmp_path,
            model_overrides=SHAPE,
            index_config=TrainConfig(epochs=2, seed=0, progress=False),
            multitask_config=TrainConfig(epochs=1, seed=0, progress=False),
            mix_ratio=1.0,
            max_pairs_per_query=2,
            k=10,
        )
    table = run.experiment.table
    assert set(table["model"]) == {INIT_ZERO_SHOT, INIT_MULTITASK}
    assert set(table["ids"]) == {"random"} and run.ids == "random"
    ia = table[(table["metric"] == "IA@1")]
    assert len(ia) == 2 and np.all((ia["value"] >= 0) & (ia["value"] <= 1))
    assert (tmp_path / "zero_shot.pt").exists() and (tmp_path / "multitask.pt").exists()
    # the run folder records the encoder it started from: another one is refused
    other = save_dense(
        tmp_path / "other.pt", DenseEncoder(DenseConfig(image_size=32, pooling="mean", **SHAPE)), None, [], epoch=0
    )
    with pytest.raises(ValueError, match="encoder_init"):
        run_dense_init(
            db,
            other,
            run_dir=tmp_path,
            model_overrides=SHAPE,
            index_config=TrainConfig(epochs=2, seed=0, progress=False),
        )
    # the multi-task options reach the fine-tuning: the finished model was trained on fixed pairs, so
    # asking for same-class targets in the same folder is refused with the option named
    from vitdsi_utils.training.checkpoint import CheckpointError

    with warnings.catch_warnings(), pytest.raises(CheckpointError, match="targets"):
        warnings.simplefilter("ignore")
        run_dense_init(
            db,
            encoder_path,
            run_dir=tmp_path,
            model_overrides=SHAPE,
            index_config=TrainConfig(epochs=2, seed=0, progress=False),
            multitask_config=TrainConfig(epochs=1, seed=0, progress=False),
            mix_ratio=1.0,
            max_pairs_per_query=2,
            k=10,
            targets="same-class",
        )


def test_an_encoder_of_another_shape_is_refused(tmp_path, images):
    db = build_database(images, 120, id_scheme="clustered", seed=0)
    other = save_dense(
        tmp_path / "wide.pt",
        DenseEncoder(DenseConfig(image_size=32, pooling="mean", **{**SHAPE, "dim": 64})),
        None,
        [],
        epoch=0,
    )
    with pytest.raises(ValueError, match="dim: 64 in .* 32 in the model"):
        run_dense_init(db, other, model_overrides=SHAPE, index_config=TrainConfig(epochs=1, progress=False))


def test_targets_without_dense_init_models_name_the_multitask_ones_and_skip_target_4():
    """paper-cpu's 14 may train no clustered dense-init DSI: targets 2 and 3 still come from 05/08's rows."""
    import pandas as pd

    from vitdsi_utils.reports.tables import MULTITASK
    from vitdsi_utils.studies.dense_init_report import target_lines, target_markdowns, target_tables

    rows = []
    for n in (512, 1024):
        rows += [("BoVW", "-", n, "mAP@10", 0.08, 0.05, 0.10), ("BoVW", "-", n, "P@10", 0.15, 0.12, 0.19)]
        rows += [("DSI zero-shot", ids, n, "IA@1", 0.99, 0.98, 1.0) for ids in ("clustered", "random")]
        rows += [
            (MULTITASK, "atomic", n, "IA@1", 0.98, 0.96, 0.99),
            (MULTITASK, "atomic", n, "mAP@10", 0.30, 0.20, 0.40),
            (MULTITASK, "atomic", n, "P@10", 0.35, 0.25, 0.45),
            (INIT_MULTITASK, "random", n, "IA@1", 0.90, 0.85, 0.95),
        ]
    results = pd.DataFrame(rows, columns=["model", "ids", "n", "metric", "value", "ci_low", "ci_high"]).assign(seed=0)
    targets = target_tables(results)
    assert len(targets["target4"]) == 0  # no clustered dense-init rows to compare with
    lines = target_lines(targets)
    assert "Target 2: met by the paper's DSI." in lines
    assert f"Target 3: met by {MULTITASK} (atomic)" in lines
    assert any(line.startswith(f"  {MULTITASK} (atomic) N=512: IA@1 0.980") for line in lines)
    assert "Target 4: no scheme to compare" in lines
    assert "no dense-init DSI with clustered IDs" in target_markdowns(targets)[-1]
