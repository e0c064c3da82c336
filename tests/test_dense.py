"""Dense retrieval baseline and re-ranking: model, objective, batches, search backends, learning, checkpoints."""

from __future__ import annotations

import builtins
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from vitdsi_utils.baselines.contrastive import class_batches, contrastive_loss, dense_loss, entropy_loss
from vitdsi_utils.baselines.dense import (
    DENSE_MODEL,
    DenseConfig,
    DenseEncoder,
    DenseTrainConfig,
    load_dense,
    save_dense,
    train_dense,
)
from vitdsi_utils.baselines.index import FlatIPIndex
from vitdsi_utils.data.augment import augment
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.retrieval.rerank import VectorScorer, cosine_scores, rerank
from vitdsi_utils.retrieval.searchers import DenseRetriever
from vitdsi_utils.studies.dense import evaluate_dense, train_or_load
from vitdsi_utils.studies.rerank import rerank_study
from vitdsi_utils.training.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32
TINY_MODEL = dict(patch_size=16, dim=32, mlp_dim=64, depth=1, heads=2, dropout=0.0)
TINY = dict(image_size=SIZE, **TINY_MODEL)


def unit(*rows: tuple[float, ...]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def striped_images(labels: np.ndarray, seed: int = 0, size: int = SIZE, contrast: float = 90.0) -> np.ndarray:
    """uint8 images (n, size, size, 3): the class is the orientation of square-wave stripes (vertical,
    horizontal, diagonal) at a random phase; each image has its own random colour, a distractor
    that dominates an untrained encoder's embedding."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    images = []
    for label in labels:
        coordinate = (x, y, x + y)[label]
        stripes = np.sign(np.sin(coordinate * 2 * np.pi / 8 + rng.uniform(0, 2 * np.pi)))
        colour = rng.uniform(40, 215, size=3)
        image = colour + contrast * stripes[..., None] + rng.normal(0, 10, size=(size, size, 3))
        images.append(np.clip(image, 0, 255))
    return np.stack(images).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_model() -> DenseEncoder:
    torch.manual_seed(0)
    return DenseEncoder(DenseConfig(**TINY)).eval()


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_embeddings_are_unit_vectors_of_the_model_width(pooling):
    torch.manual_seed(0)
    model = DenseEncoder(DenseConfig(**TINY, pooling=pooling)).eval()
    images = torch.randint(0, 256, (5, SIZE, SIZE, 3), dtype=torch.uint8)
    with torch.no_grad():
        z = model(images)
    assert z.shape == (5, 32) and z.dtype == torch.float32
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(model.embed(images.numpy(), batch_size=2), z, atol=1e-6)  # batching changes nothing
    assert (model.cls_token is not None) == (pooling == "cls")


def test_mean_pooling_is_the_normalised_mean_of_the_encoder_tokens():
    torch.manual_seed(0)
    model = DenseEncoder(DenseConfig(**TINY, pooling="mean")).eval()
    images = torch.randint(0, 256, (3, SIZE, SIZE, 3), dtype=torch.uint8)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode(images).mean(dim=1), dim=1)
        assert torch.allclose(model(images), expected, atol=1e-6)


def test_embed_keeps_training_mode_and_rejects_other_inputs(tiny_model):
    tiny_model.train()
    tiny_model.embed(np.zeros((2, SIZE, SIZE, 3), dtype=np.uint8))
    assert tiny_model.training
    tiny_model.eval()
    with pytest.raises(TypeError, match="uint8"):
        tiny_model.embed(np.zeros((2, SIZE, SIZE, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(n, 32, 32, 3\)"):
        tiny_model.embed(np.zeros((2, 3, SIZE, SIZE), dtype=np.uint8))


def test_dense_encoder_shares_the_dsi_encoder_keys():
    """The encoder is the DSI's: its weights load into the dense model, only the heads differ."""
    dsi = DSIModel(DSIConfig(**TINY))
    assert (
        DenseEncoder(DenseConfig(**TINY, pooling="mean")).load_state_dict(dsi.state_dict(), strict=False).missing_keys
        == []
    )
    dense = DenseEncoder(DenseConfig(**TINY, pooling="cls"))
    result = dense.load_state_dict(dsi.state_dict(), strict=False)
    assert result.missing_keys == ["cls_token"]
    assert result.unexpected_keys and all(
        k.split(".")[0] in {"token_embed", "decoder", "head"} for k in result.unexpected_keys
    )
    assert torch.equal(dense.patch_embed.proj.weight, dsi.patch_embed.proj.weight)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown pooling"):
        DenseConfig(**TINY, pooling="gem")
    with pytest.raises(ValueError, match="patch sizes that work"):
        DenseConfig(**{**TINY, "patch_size": 5})
    with pytest.raises(ValueError, match="per_class"):
        DenseTrainConfig(per_class=1)
    with pytest.raises(ValueError, match="margin"):
        DenseTrainConfig(margin=1.5)
    assert DenseConfig.from_dict(DenseConfig(**TINY).to_dict()) == DenseConfig(**TINY)


# ------------------------------------------------------------------------------------------
# The objective, on cases worked out by hand
# ------------------------------------------------------------------------------------------
def test_contrastive_loss_known_answer():
    # z0 = z2 = (1, 0), z1 = (0, 1); labels 0, 0, 1. Similarities s01 = 0, s02 = 1, s12 = 0.
    z = unit((1, 0), (0, 1), (1, 0))
    labels = torch.tensor([0, 0, 1])
    # positives (0,1) and (1,0): 1 - 0 each -> 2; negatives (0,2), (2,0): max(0, 1 - 0.5) each -> 1;
    # (1,2), (2,1): max(0, 0 - 0.5) = 0. Divided by the batch size 3.
    assert contrastive_loss(z, labels, margin=0.5).item() == pytest.approx(3 / 3)
    # a margin of 1 lets every negative through: only the positives remain
    assert contrastive_loss(z, labels, margin=1.0).item() == pytest.approx(2 / 3)
    # self-pairs never count: one embedding per class gives no positive and, far apart, no loss
    assert contrastive_loss(unit((1, 0), (-1, 0)), torch.tensor([0, 1])).item() == pytest.approx(0.0)


def test_entropy_loss_known_answer():
    # three points on the circle at 0, 90 and 180 degrees: every nearest neighbour is sqrt(2) away
    z = unit((1, 0), (0, 1), (-1, 0))
    assert entropy_loss(z).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    # at 0, t and 180 degrees: the first two are 2 sin(t/2) apart, the third is 2 cos(t/2) from the second
    t = 0.3
    z = unit((1, 0), (math.cos(t), math.sin(t)), (-1, 0))
    expected = -(2 * math.log(2 * math.sin(t / 2)) + math.log(2 * math.cos(t / 2))) / 3
    assert entropy_loss(z).item() == pytest.approx(expected, abs=1e-5)


def test_entropy_loss_pushes_nearest_neighbours_apart_and_survives_duplicates():
    z = unit((1, 0), (math.cos(0.1), math.sin(0.1)), (-1, 0)).requires_grad_(True)
    entropy_loss(z).backward()
    step = torch.nn.functional.normalize(z.detach() - 0.01 * z.grad, dim=1)
    assert torch.cdist(step, step)[0, 1] > torch.cdist(z.detach(), z.detach())[0, 1]
    duplicates = unit((1, 0), (1, 0), (0, 1)).requires_grad_(True)
    loss = entropy_loss(duplicates)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(duplicates.grad).all()


def test_dense_loss_adds_the_weighted_regulariser():
    z, labels = unit((1, 0), (0, 1), (1, 0)), torch.tensor([0, 0, 1])
    terms = dense_loss(z, labels, margin=0.5, entropy_weight=0.7)
    assert terms.contrastive.item() == pytest.approx(contrastive_loss(z, labels, 0.5).item())
    assert terms.entropy.item() == pytest.approx(entropy_loss(z).item())
    assert terms.total.item() == pytest.approx(terms.contrastive.item() + 0.7 * terms.entropy.item())
    assert dense_loss(z, labels, entropy_weight=0.0).total.item() == pytest.approx(terms.contrastive.item())


# ------------------------------------------------------------------------------------------
# Batches and augmentation
# ------------------------------------------------------------------------------------------
def test_class_batches_always_hold_positives_and_never_repeat_an_image():
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 9 + [3] * 1)
    batches = class_batches(labels, batch_size=8, per_class=2, generator=torch.Generator().manual_seed(0))
    seen = torch.cat(batches)
    assert len(seen) == len(set(seen.tolist()))  # each image at most once per epoch
    assert len(seen) == 6 + 4 + 8  # every class loses count % 2; the single image of class 3 sits out
    for batch in batches:
        assert len(batch) <= 8
        counts = torch.bincount(labels[batch])
        assert ((counts == 0) | (counts >= 2)).all()  # nobody is alone with its class


def test_class_batches_are_seeded():
    labels = torch.arange(40) % 4
    first = class_batches(labels, 8, 2, torch.Generator().manual_seed(1))
    again = class_batches(labels, 8, 2, torch.Generator().manual_seed(1))
    other = class_batches(labels, 8, 2, torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    with pytest.raises(ValueError, match="no class has 3"):
        class_batches(torch.tensor([0, 0, 1, 1]), 6, 3, torch.Generator())


def test_augment_flips_and_crops_whole_batches():
    images = torch.randint(0, 256, (6, SIZE, SIZE, 3), dtype=torch.uint8)
    same = augment(images, torch.Generator().manual_seed(0), flip=False, min_crop=1.0)
    assert torch.equal(same, images)
    flipped = augment(images, torch.Generator().manual_seed(0), flip=True, min_crop=1.0)
    for original, out in zip(images, flipped):
        assert torch.equal(out, original) or torch.equal(out, original.flip(1))
    cropped = augment(images, torch.Generator().manual_seed(0), flip=False, min_crop=0.5)
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8
    assert not torch.equal(cropped, images)


# ------------------------------------------------------------------------------------------
# Search: FAISS and the torch fallback
# ------------------------------------------------------------------------------------------
def random_unit_vectors(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_faiss_and_torch_give_the_same_ranking():
    pytest.importorskip("faiss")
    database, queries = random_unit_vectors(300), random_unit_vectors(40, seed=1)
    d_faiss, i_faiss = FlatIPIndex(database, backend="faiss").search(queries, 50)
    d_torch, i_torch = FlatIPIndex(database, backend="torch").search(queries, 50)
    assert np.array_equal(i_faiss, i_torch)
    np.testing.assert_allclose(d_faiss, d_torch, atol=1e-5)
    exact = np.argsort(-(queries @ database.T), axis=1, kind="stable")[:, :50]
    assert np.array_equal(i_torch, exact)
    assert (np.diff(d_torch, axis=1) <= 0).all()


def hide_faiss(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "faiss" or name.startswith("faiss."):
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_without_faiss_auto_falls_back_to_torch_with_a_warning(monkeypatch):
    hide_faiss(monkeypatch)
    database, queries = random_unit_vectors(50), random_unit_vectors(3, seed=1)
    with pytest.warns(UserWarning, match="pip install faiss-cpu"):
        index = FlatIPIndex(database, backend="auto")
    assert index.backend == "torch"
    _, rows = index.search(queries, 5)
    assert np.array_equal(rows, np.argsort(-(queries @ database.T), axis=1, kind="stable")[:, :5])
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        FlatIPIndex(database, backend="faiss")


def test_search_caps_k_and_checks_its_inputs():
    index = FlatIPIndex(random_unit_vectors(7), backend="torch")
    scores, rows = index.search(random_unit_vectors(2, seed=3), 100)
    assert rows.shape == scores.shape == (2, 7) and sorted(rows[0]) == list(range(7))
    with pytest.raises(ValueError, match="k must be"):
        index.search(random_unit_vectors(2), 0)
    with pytest.raises(ValueError, match=r"\(Q, 16\)"):
        index.search(np.zeros((2, 5), dtype=np.float32), 3)
    with pytest.raises(ValueError, match="unknown backend"):
        FlatIPIndex(random_unit_vectors(3), backend="annoy")


# ------------------------------------------------------------------------------------------
# Learning
# ------------------------------------------------------------------------------------------
def test_a_tiny_model_learns_to_separate_three_classes():
    train_labels = np.repeat(np.arange(3), 32)
    db_labels, query_labels = np.repeat(np.arange(3), 8), np.repeat(np.arange(3), 6)
    # a class token learns this task in fewer epochs than mean pooling, which keeps the test short
    model_config = DenseConfig(**{**TINY, "patch_size": 8, "pooling": "cls"})
    config = DenseTrainConfig(epochs=12, batch_size=32, lr=5e-3, warmup_steps=0, progress=False, seed=0)
    torch.manual_seed(0)
    untrained = DenseRetriever.from_model(DenseEncoder(model_config), backend="torch")
    queries, database = striped_images(query_labels, seed=2), striped_images(db_labels, seed=1)

    def precision_at_5(r: DenseRetriever) -> float:
        _, rows = r.index(database).search(queries, 5)
        return float((db_labels[rows] == query_labels[:, None]).mean())

    retriever = DenseRetriever(model_config, config, backend="torch").fit(striped_images(train_labels), train_labels)
    history = retriever.history_.to_frame()
    assert list(history["epoch"]) == list(range(1, 13))
    assert history["loss"].iloc[-3:].mean() < history["loss"].iloc[:3].mean()
    assert precision_at_5(untrained) < 0.6  # the colours fool an untrained encoder (chance: 1/3)
    assert precision_at_5(retriever) >= 0.8


def test_training_is_reproducible_from_the_seed():
    labels = np.repeat(np.arange(3), 6)
    images = striped_images(labels)
    config = DenseTrainConfig(epochs=2, batch_size=8, min_crop=0.7, progress=False, seed=5)
    runs = [DenseRetriever(DenseConfig(**TINY), config).fit(images, labels) for _ in range(2)]
    for a, b in zip(runs[0].model_.state_dict().values(), runs[1].model_.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# Checkpoints and loading errors
# ------------------------------------------------------------------------------------------
def test_checkpoint_roundtrip_resume_and_reuse(tmp_path):
    labels = np.repeat(np.arange(3), 6)
    images = striped_images(labels)
    path = tmp_path / "dense.pt"
    torch.manual_seed(0)
    model = DenseEncoder(DenseConfig(**TINY))
    history = train_dense(
        model, images, labels, config=DenseTrainConfig(epochs=2, batch_size=8, progress=False), checkpoint_path=path
    )
    loaded, meta = load_dense(path)
    assert meta["epoch"] == 2 and len(meta["history"]) == len(history) == 2
    assert torch.allclose(loaded.embed(images), model.embed(images), atol=1e-6)
    # asking for 4 epochs continues from epoch 2; asking again loads the finished model and trains nothing
    longer = DenseRetriever(DenseConfig(**TINY), DenseTrainConfig(epochs=4, batch_size=8, progress=False))
    longer.fit(images, labels, checkpoint_path=path)
    assert list(longer.history_.to_frame()["epoch"]) == [1, 2, 3, 4] and not longer.loaded_
    again = DenseRetriever(DenseConfig(**TINY), DenseTrainConfig(epochs=4, batch_size=8, progress=False))
    again.fit(images, labels, checkpoint_path=path)
    assert again.loaded_
    assert torch.equal(again.model_.patch_embed.proj.weight, longer.model_.patch_embed.proj.weight)
    # other settings or other images are refused rather than silently mixed
    with pytest.raises(CheckpointError, match="other settings: lr: saved 0.0005, requested 0.01. Delete"):
        DenseRetriever(DenseConfig(**TINY), DenseTrainConfig(epochs=4, batch_size=8, lr=1e-2, progress=False)).fit(
            images, labels, checkpoint_path=path
        )
    with pytest.raises(CheckpointError, match="training images: other images or labels"):
        DenseRetriever(DenseConfig(**TINY), DenseTrainConfig(epochs=4, batch_size=8, progress=False)).fit(
            images, labels[::-1].copy(), checkpoint_path=path
        )
    with pytest.raises(CheckpointError, match="epochs: it holds 4 epochs, more than the 3 requested"):
        DenseRetriever(DenseConfig(**TINY), DenseTrainConfig(epochs=3, batch_size=8, progress=False)).fit(
            images, labels, checkpoint_path=path
        )


def test_loading_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="train a dense encoder first"):
        load_dense(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_dense(garbage)
    from vitdsi_utils.ids.codec import make_codec
    from vitdsi_utils.training.checkpoint import save_checkpoint

    dsi_config = DSIConfig(**TINY)
    save_checkpoint(tmp_path / "dsi.pt", DSIModel(dsi_config), None, dsi_config, None, 0, [], make_codec(10))
    with pytest.raises(ValueError, match="a DSI checkpoint"):
        load_dense(tmp_path / "dsi.pt")
    model = DenseEncoder(DenseConfig(**TINY))
    save_dense(tmp_path / "ok.pt", model, None, [], epoch=0)
    state = torch.load(tmp_path / "ok.pt", weights_only=True)
    torch.save({**state, "format": 99}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="unknown checkpoint format 99"):
        load_dense(tmp_path / "future.pt")
    torch.save({**state, "config": {**state["config"], "dim": 64, "mlp_dim": 128}}, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="do not fit the stored configuration"):
        load_dense(tmp_path / "mismatch.pt")


def test_retriever_says_what_is_missing():
    retriever = DenseRetriever(DenseConfig(**TINY))
    with pytest.raises(RuntimeError, match="call fit"):
        retriever.transform(np.zeros((1, SIZE, SIZE, 3), dtype=np.uint8))
    ready = DenseRetriever.from_model(DenseEncoder(DenseConfig(**TINY)))
    with pytest.raises(RuntimeError, match="index\\(database_images\\)"):
        ready.search(np.zeros((1, SIZE, SIZE, 3), dtype=np.uint8), 3)


# ------------------------------------------------------------------------------------------
# One database, end to end
# ------------------------------------------------------------------------------------------
def test_train_or_load_and_evaluate_on_digits(tmp_path):
    from vitdsi_utils.data.database import build_database
    from vitdsi_utils.data.images import load_images

    db = build_database(load_images("digits", SIZE, progress=False), 120, seed=0)
    config = DenseTrainConfig(epochs=2, batch_size=16, progress=False)
    first = train_or_load(db, model_overrides=TINY_MODEL, train_config=config, run_dir=tmp_path)
    second = train_or_load(db, model_overrides=TINY_MODEL, train_config=config, run_dir=tmp_path)
    assert not first.loaded_ and second.loaded_
    assert len(first.database_vectors) == db.n_index
    history = first.history_.to_frame()
    assert {"train", "val"} == set(history["split"]) and history["map@10"].notna().any()
    table, timings = evaluate_dense(second, db, seed=0)
    assert set(table["model"]) == {DENSE_MODEL} and {"mAP@10", "P@10", "R@100"} <= set(table["metric"])
    assert ((table["value"] >= 0) & (table["value"] <= 1)).all()
    assert timings["n_index"] == db.n_index and timings["search_ms_per_query"] > 0


# ------------------------------------------------------------------------------------------
# Re-ranking
# ------------------------------------------------------------------------------------------
def test_rerank_returns_a_permutation_of_the_candidates():
    rng = np.random.default_rng(0)
    candidates = np.stack([rng.permutation(30)[:12] for _ in range(5)])
    scores = rng.normal(size=candidates.shape)
    for depth in (1, 5, 12):
        new_scores, rows = rerank(candidates, scores, depth=depth)
        for before, after in zip(candidates, rows):
            assert sorted(before) == sorted(after)
        assert np.array_equal(rows[:, depth:], candidates[:, depth:])  # the tail keeps its order
        head = new_scores[:, :depth]
        assert (np.diff(head, axis=1) <= 0).all() and np.isnan(new_scores[:, depth:]).all()
    _, cut = rerank(candidates, scores, depth=5, k=3)
    assert cut.shape == (5, 3)


def test_rerank_with_a_perfect_scorer_gives_the_ideal_order():
    db_labels = np.repeat(np.arange(4), 10)
    query_labels = np.array([0, 1, 2, 3, 1])
    rng = np.random.default_rng(1)
    candidates = np.stack([rng.permutation(40) for _ in query_labels])  # M = K = every row
    perfect = (db_labels[candidates] == query_labels[:, None]).astype(float)
    _, rows = rerank(candidates, perfect)
    relevant = db_labels[rows] == query_labels[:, None]
    assert relevant[:, :10].all() and not relevant[:, 10:].any()
    # ties (all relevant rows score 1) keep the first stage's order
    for before, after, q in zip(candidates, rows, query_labels):
        assert list(after[:10]) == [r for r in before if db_labels[r] == q]


def test_rerank_keeps_empty_ranks_last_and_checks_shapes():
    candidates = np.array([[3, 1, 2, -1, -1]])
    _, rows = rerank(candidates, np.array([[0.1, 0.9, 0.5, np.nan, np.nan]]), depth=5)
    assert rows.tolist() == [[1, 2, 3, -1, -1]]
    with pytest.raises(ValueError, match="shape of candidates"):
        rerank(candidates, np.zeros((1, 4)))
    with pytest.raises(ValueError, match="depth"):
        rerank(candidates, np.zeros((1, 5)), depth=0)


def test_cosine_scores_gather_the_candidates_vectors():
    database = random_unit_vectors(10, d=4)
    queries = random_unit_vectors(2, d=4, seed=1)
    candidates = np.array([[4, 0, -1], [9, 9 - 1, 2]])
    scores = cosine_scores(candidates, queries, database)
    assert scores[0, 0] == pytest.approx(float(queries[0] @ database[4]), abs=1e-6)
    assert scores[1, 1] == pytest.approx(float(queries[1] @ database[8]), abs=1e-6)
    assert scores[0, 2] == -np.inf


class FixedSearcher:
    """A first stage that returns the database rows in a fixed (poor) order for every query."""

    def __init__(self, n_db: int):
        self.order = np.arange(n_db)[::-1].copy()

    def search(self, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.tile(self.order[:k], (len(images), 1))
        return np.zeros(rows.shape, dtype=np.float32), rows


def test_rerank_study_measures_every_depth_and_improves_a_poor_first_stage():
    db_labels = np.repeat(np.arange(4), 25)  # 100 rows, 25 per class
    query_labels = np.array([0, 1, 2, 3, 0, 2])
    queries = np.zeros((len(query_labels), 4, 4, 3), dtype=np.uint8)
    queries[:, 0, 0, 0] = query_labels  # the class hides in one pixel; the oracle scorer reads it
    one_hot = np.eye(4, dtype=np.float32)
    oracle = VectorScorer("oracle", lambda images: one_hot[images[:, 0, 0, 0]], one_hot[db_labels])
    study = rerank_study(
        {"fixed": FixedSearcher(100)}, oracle, queries, query_labels, db_labels, depths=(10, 50, 100), k=20, seed=0
    )
    p10 = study[study["metric"] == "P@10"].set_index(["first_stage", "depth"])["value"]
    assert set(p10.index) == {("-", 100), ("fixed", 0), ("fixed", 10), ("fixed", 50), ("fixed", 100)}
    assert p10[("-", 100)] == 1.0 and p10[("fixed", 100)] == 1.0  # the oracle over everything is perfect
    assert p10[("fixed", 0)] <= p10[("fixed", 10)] <= p10[("fixed", 50)]
    assert (study["ms_per_query"] >= study["first_stage_ms"]).all()
    assert (study.loc[study["depth"] > 0, "rerank_ms"] > 0).all()
    assert {"mAP@10", "P@10", "R@100"} <= set(study["metric"])


# ------------------------------------------------------------------------------------------
# The study: first stages from run folders, the command line
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_db():
    from vitdsi_utils.data.database import build_database
    from vitdsi_utils.data.images import load_images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # digits at 32 px: a few images without SIFT keypoints
        return build_database(load_images("digits", SIZE, progress=False), 120, id_scheme="clustered", seed=0)


def save_untrained_dsi(path, n_ids: int) -> None:
    from vitdsi_utils.ids.codec import make_codec
    from vitdsi_utils.training.checkpoint import save_checkpoint

    codec = make_codec(n_ids)
    config = DSIConfig.from_codec(codec, **TINY)
    save_checkpoint(path, DSIModel(config), None, config, None, 0, [], codec)


def test_dsi_first_stages_come_from_the_run_folder_and_are_re_ranked(tmp_path, digits_db):
    from vitdsi_utils.studies.dense import first_stages, rerank_database

    save_untrained_dsi(tmp_path / "fine_tuned.pt", digits_db.n_index)
    stages = first_stages(digits_db, dsi_run_dir=tmp_path)
    assert list(stages) == ["DSI fine-tuned"]
    retriever = DenseRetriever.from_model(DenseEncoder(DenseConfig(**TINY)), backend="torch")
    study = rerank_database(digits_db, retriever, stages, depths=(10,), k=20)
    assert set(zip(study["first_stage"], study["ids"])) == {("-", "-"), ("DSI fine-tuned", "clustered")}
    assert set(study["depth"]) == {0, 10, digits_db.n_index}
    save_untrained_dsi(tmp_path / "zero_shot.pt", digits_db.n_index + 7)  # another database's IDs
    with pytest.raises(ValueError, match="trained on another database"):
        first_stages(digits_db, dsi_run_dir=tmp_path)


def test_cli_dense_writes_tables_and_the_tradeoff_figure(tmp_path, run_recipe):
    out = tmp_path / "dense"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = run_recipe(
            {
                "study": "dense",
                "source": "digits",
                "size": 32,
                "ns": [120],
                "train": {"epochs": 1, "batch_size": 16},
                "model": {"patch_size": 16, "dim": 32, "mlp_dim": 64, "depth": 1, "heads": 2},
                "words": 20,
                "depths": [10],
                "dsi_runs": str(tmp_path / "no-dsi"),
                "out_dir": str(out),
                "runs_dir": str(tmp_path / "runs"),
            }
        )
    assert code == 0
    results = pd.read_csv(out / "dense_digits_32px.csv")
    assert set(results["model"]) == {"BoVW", DENSE_MODEL}
    assert "| Dense (contrastive ViT) | 120 | - | 0 |" in (out / "dense_digits_32px.md").read_text()
    reranking = pd.read_csv(out / "rerank_digits_32px.csv")
    assert set(reranking["first_stage"]) == {"-", "BoVW"} and set(reranking["depth"]) == {0, 10, 30}
    assert "| 120 | BoVW | - | 10 |" in (out / "rerank_digits_32px.md").read_text()
    assert (out / "rerank_digits_32px.png").stat().st_size > 1000
    assert len(pd.read_csv(out / "histories_dense_digits_32px.csv")) == 2  # one train and one val row
    assert (tmp_path / "runs" / "digits-32px-N120-seed0" / "dense.pt").is_file()
