"""Same seed, same settings, same machine: identical metric tables on CPU; another seed gives other numbers."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest

from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.evaluation import evaluate_bovw
from vitdsi_utils.studies.dsi import run_experiment
from vitdsi_utils.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(patch_size=16, dim=32, mlp_dim=64, depth=1, heads=2, dropout=0.1)
TIMING_COLUMNS = ["indexing_eval_s", "search_s", "search_ms_per_query", "train_s"]


@pytest.fixture(scope="module")
def db():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_database(load_images("digits", 32, progress=False), 80, id_scheme="clustered", seed=0)


def experiment(db, seed: int):
    """Index (4 epochs), fine-tune (2 epochs) and evaluate a tiny DSI; training seeded with ``seed``."""
    index = TrainConfig(epochs=4, batch_size=8, lr=2e-3, target_accuracy=None, seed=seed, device="cpu", progress=False)
    retrieval = TrainConfig(epochs=2, batch_size=16, lr=1e-3, seed=seed, device="cpu", progress=False)
    return run_experiment(db, model_overrides=TINY, index_config=index, retrieval_config=retrieval, k=10)


def test_index_finetune_evaluate_is_identical_for_the_same_seed_and_differs_for_another(db):
    first, second, other = experiment(db, seed=0), experiment(db, seed=0), experiment(db, seed=1)
    table = first.table.drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(table, second.table.drop(columns=TIMING_COLUMNS))  # bit for bit, CIs included
    for phase in ("zero_shot", "fine_tuned"):
        a, b = (getattr(run, phase).history.to_frame().drop(columns="seconds") for run in (first, second))
        pd.testing.assert_frame_equal(a, b)
    assert not table.equals(other.table.drop(columns=TIMING_COLUMNS))
    losses = [run.zero_shot.history.to_frame()["loss"].tolist() for run in (first, other)]
    assert losses[0] != losses[1]


def test_bovw_evaluation_is_identical_for_the_same_seed(db):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few 32 px digits have no SIFT keypoints
        runs = [evaluate_bovw(db, n_words=20, seed=seed, progress=False).table for seed in (0, 0, 1)]
    pd.testing.assert_frame_equal(runs[0], runs[1])
    assert not runs[0].equals(runs[2])  # another k-means seed, another vocabulary
