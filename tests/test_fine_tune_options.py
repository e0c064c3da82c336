"""Fine-tuning options of issue 5: same-class targets redrawn every epoch, augmented views of the indexed images."""

from __future__ import annotations

import pytest
import torch

from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.ids.codec import make_codec
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.phases import fine_tune, index_database
from vitdsi_utils.studies.dense_init import DenseInitSpec
from vitdsi_utils.studies.dsi import DSISpec
from vitdsi_utils.studies.specs import build_spec
from vitdsi_utils.training.checkpoint import CheckpointError
from vitdsi_utils.training.config import TrainConfig
from vitdsi_utils.training.loop import epoch_counts, fit
from vitdsi_utils.training.tasks import (
    AugmentedViews,
    IndexingTask,
    Pool,
    RetrievalPairs,
    SameClassTargets,
    as_tasks,
    draw_relevant,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 16


def images_of(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)


def relevance(n_queries: int = 40, n_rows: int = 12, seed: int = 0) -> torch.Tensor:
    """Random class labels: query q is relevant to the rows of its class (4 classes, 3 rows each)."""
    g = torch.Generator().manual_seed(seed)
    query_class = torch.randint(0, 4, (n_queries,), generator=g)
    row_class = torch.arange(n_rows) % 4
    return query_class[:, None] == row_class[None, :]


def tiny_model(codec, seed: int = 0) -> DSIModel:
    torch.manual_seed(seed)
    return DSIModel(DSIConfig.from_codec(codec, image_size=SIZE, patch_size=8, dim=32, mlp_dim=64, depth=1, heads=2))


def quiet(**overrides) -> TrainConfig:
    return TrainConfig(**{"progress": False, "device": "cpu", **overrides})


# -- the draw ---------------------------------------------------------------------------------
def test_draw_yields_only_relevant_rows():
    relevant = relevance()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        rows = draw_relevant(relevant, g)
        assert rows.shape == (len(relevant),)
        assert relevant[torch.arange(len(relevant)), rows].all()


def test_draw_changes_between_draws_and_covers_the_relevant_rows():
    relevant = relevance()
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([draw_relevant(relevant, g) for _ in range(300)])  # (300, Q)
    assert (draws[0] != draws[1]).any()
    # every query has 3 relevant rows; each is drawn about 100 times in 300 (uniform), never 0
    for q in range(len(relevant)):
        counts = torch.bincount(draws[:, q], minlength=relevant.shape[1])
        assert set(counts.nonzero().flatten().tolist()) == set(relevant[q].nonzero().flatten().tolist())
        assert counts[relevant[q]].min() > 60


def test_draw_is_reproducible_with_the_seed():
    relevant = relevance()
    a = draw_relevant(relevant, torch.Generator().manual_seed(5))
    b = draw_relevant(relevant, torch.Generator().manual_seed(5))
    c = draw_relevant(relevant, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_draw_refuses_a_query_without_relevant_rows():
    relevant = relevance()
    relevant[3] = False
    with pytest.raises(ValueError, match="no relevant row"):
        draw_relevant(relevant, torch.Generator().manual_seed(0))


def test_same_class_targets_leave_out_queries_without_relevant_rows():
    relevant = relevance(10)
    relevant[[2, 7]] = False
    task = SameClassTargets(images_of(10), relevant)
    assert len(task) == 8
    assert 2 not in task.query_idx.tolist() and 7 not in task.query_idx.tolist()


def test_pool_redraws_targets_each_epoch_among_relevant_rows():
    relevant = relevance()
    codec = make_codec(relevant.shape[1])
    task = SameClassTargets(images_of(len(relevant)), relevant)
    pool = Pool(as_tasks([task]), codec, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(3):
        pool.resample(g)
        rows = pool.rows.clone()
        assert relevant[pool.image_idx, rows].all()
        seen.append(rows)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


def test_fixed_pairs_are_never_redrawn():
    relevant = relevance()
    codec = make_codec(relevant.shape[1])
    pairs = RetrievalPairs(images_of(len(relevant)), relevant.float().argmax(1))
    pool = Pool(as_tasks([pairs]), codec, torch.device("cpu"))
    before = pool.rows.clone()
    pool.resample(torch.Generator().manual_seed(0))
    assert torch.equal(pool.rows, before)


def test_same_class_training_is_reproducible_with_the_seed():
    relevant = relevance(24)
    codec = make_codec(relevant.shape[1])
    images = images_of(24)
    weights = []
    for _ in range(2):
        model = tiny_model(codec)
        history = fit(model, codec, [SameClassTargets(images, relevant)], config=quiet(epochs=3, seed=3), stop_on=None)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert [r["n_examples"] for r in history if r["split"] == "train"] == [24, 24, 24]
    assert torch.equal(weights[0], weights[1])


# -- augmented views ----------------------------------------------------------------------------
def test_views_keep_the_target_id_and_change_the_image():
    codec = make_codec(8)
    images = images_of(8)
    views = AugmentedViews(images, views=3, flip=True, min_crop=0.6)
    assert len(views) == 24
    pool = Pool(as_tasks([views]), codec, torch.device("cpu"))
    ids = torch.arange(len(pool))
    batch, _, targets, _ = pool.batch(ids, torch.Generator().manual_seed(0))
    own = torch.arange(8).repeat(3)
    assert torch.equal(targets, codec.targets()[own])  # each view asks for its own image's ID
    assert batch.dtype == torch.uint8 and batch.shape == (24, SIZE, SIZE, 3)
    assert not torch.equal(batch, images[own])  # the views differ from the stored images
    plain, _, _, _ = pool.batch(ids)  # no generator: no augmentation (as in validation)
    assert torch.equal(plain, images[own])
    assert torch.equal(pool.images, images)  # augmenting never writes into the stored images


def test_flip_only_views_are_the_image_or_its_mirror():
    codec = make_codec(6)
    images = images_of(6)
    pool = Pool(as_tasks([AugmentedViews(images, views=4, flip=True, min_crop=1.0)]), codec, torch.device("cpu"))
    batch, _, _, _ = pool.batch(torch.arange(len(pool)), torch.Generator().manual_seed(1))
    source = images[torch.arange(6).repeat(4)]
    same = (batch == source).flatten(1).all(1)
    mirrored = (batch == source.flip(2)).flatten(1).all(1)
    assert (same | mirrored).all() and mirrored.any() and same.any()


def test_mix_ratio_leaves_the_views_count_alone():
    codec = make_codec(8)
    images = images_of(8)
    tasks = as_tasks(
        [IndexingTask(images), RetrievalPairs(images_of(20, 1), torch.arange(20) % 8), AugmentedViews(images, views=2)]
    )
    pool = Pool(tasks, codec, torch.device("cpu"))
    assert epoch_counts(pool, 4.0) == {"retrieval": 32}
    order = pool.epoch_order(torch.Generator().manual_seed(0), epoch_counts(pool, 4.0))
    assert torch.bincount(pool.task[order], minlength=3).tolist() == [8, 32, 16]


def test_view_settings_are_checked():
    with pytest.raises(ValueError, match="views"):
        AugmentedViews(images_of(4), views=0)
    with pytest.raises(ValueError, match="min_crop"):
        AugmentedViews(images_of(4), min_crop=0.0)


# -- fine_tune and the command line ----------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_db():
    return build_database(load_images("digits", 32, progress=False), 80, seed=0)


def test_fine_tune_options_run_and_are_checked_on_reload(digits_db, tmp_path):
    overrides = dict(dim=16, mlp_dim=32, depth=1, heads=2)
    zero = index_database(digits_db, model_overrides=overrides, config=quiet(epochs=1))
    config = quiet(epochs=2, label_smoothing=0.1)
    tuned = fine_tune(digits_db, zero.model, config=config, run_dir=tmp_path, targets="same-class", index_views=1)
    frame = tuned.history.to_frame()
    train = frame[frame["split"] == "train"]
    assert set(train["task"]) == {"retrieval", "views", "all"}
    n_queries = len(digits_db.split("train")[0])
    assert train[train["task"] == "retrieval"]["n_examples"].tolist() == [n_queries, n_queries]
    assert train[train["task"] == "views"]["n_examples"].tolist() == [digits_db.n_index] * 2
    again = fine_tune(digits_db, zero.model, config=config, run_dir=tmp_path, targets="same-class", index_views=1)
    assert again.epochs == tuned.epochs  # loaded, not retrained
    with pytest.raises(CheckpointError, match="targets"):
        fine_tune(digits_db, zero.model, config=config, run_dir=tmp_path, index_views=1)
    with pytest.raises(CheckpointError, match="label_smoothing"):
        fine_tune(digits_db, zero.model, config=quiet(epochs=2), run_dir=tmp_path, targets="same-class", index_views=1)
    with pytest.raises(ValueError, match="targets must be one of"):
        fine_tune(digits_db, zero.model, config=config, targets="class")


def test_dsi_spec_exposes_the_options():
    spec = build_spec(
        DSISpec,
        {"targets": "same-class", "index_views": 2, "view_min_crop": 0.5, "fine_tune": {"label_smoothing": 0.1}},
    )
    assert (spec.targets, spec.index_views, spec.view_min_crop, spec.fine_tune.label_smoothing) == (
        "same-class",
        2,
        0.5,
        0.1,
    )
    assert spec.fine_tune.epochs == 75  # the rest of the section keeps the study's default
    plain = build_spec(DSISpec, {})
    assert (plain.targets, plain.index_views, plain.fine_tune.label_smoothing) == ("pairs", 0, 0.0)
    with pytest.raises(ValueError, match="targets: 'class' is not one of pairs, same-class"):
        build_spec(DSISpec, {"targets": "class"})


def test_consolidation_indexes_until_the_target_then_stops(digits_db, tmp_path):
    """consolidate=E: indexing alone after fine-tuning, at most E epochs, stopped by the IA@1 rule."""
    from vitdsi_utils.ids.schemes import codec_for
    from vitdsi_utils.model.decoding import indexing_accuracy

    overrides = dict(dim=16, mlp_dim=32, depth=1, heads=2)
    zero = index_database(digits_db, model_overrides=overrides, config=quiet(epochs=1))
    # an unreachable target: every one of the E epochs runs, after the fine-tuning epochs
    capped = fine_tune(
        digits_db, zero.model, config=quiet(epochs=2, target_accuracy=1.0), multitask=True, mix_ratio=1.0, consolidate=3
    )
    frame = capped.history.to_frame()
    consolidation = frame[(frame["phase"] == "consolidate") & (frame["split"] == "train")]
    assert consolidation["epoch"].tolist() == [1, 2, 3]
    assert set(consolidation["task"]) == {"indexing"}
    assert capped.epochs == 2 + 3
    # a target already met (a model that has memorised half its images, asked for 1 in 20 of them): the rule
    # stops after the first epoch, and the IA@1 it read is the model's
    indexed = index_database(
        digits_db, model_overrides=overrides, config=quiet(epochs=60, lr=3e-3, batch_size=8, target_accuracy=0.5)
    )
    assert indexed.reached_target
    easy = fine_tune(
        digits_db, indexed.model, config=quiet(epochs=1, lr=1e-4, target_accuracy=0.05), consolidate=5, run_dir=tmp_path
    )
    frame = easy.history.to_frame()
    checks = frame[(frame["phase"] == "consolidate") & (frame["split"] == "train_eval")]
    assert frame[frame["phase"] == "consolidate"]["epoch"].max() == 1 and len(checks) == 1
    index_images = digits_db.split("index")[0]
    measured = indexing_accuracy(easy.model, codec_for(digits_db), index_images, beam_size=100)
    assert checks["ia1"].iloc[0] == pytest.approx(measured)
    # the option is recorded: the same folder refuses a request without consolidation
    with pytest.raises(CheckpointError, match="consolidate"):
        fine_tune(digits_db, indexed.model, config=quiet(epochs=1, lr=1e-4, target_accuracy=0.05), run_dir=tmp_path)
    with pytest.raises(ValueError, match="consolidate must be"):
        fine_tune(digits_db, zero.model, config=quiet(epochs=1), consolidate=-1)


def test_consolidate_reaches_both_studies():
    assert build_spec(DSISpec, {"consolidate": 7}).consolidate == 7
    assert build_spec(DenseInitSpec, {"consolidate": 20}).consolidate == 20
    assert build_spec(DenseInitSpec, {}).consolidate == 0
