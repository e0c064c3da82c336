"""Semantic (hierarchical k-means), residual-quantised and atomic IDs; codec_for; reuse guards; the 08 tables."""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import pytest
import torch

from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.ids.codec import IDCodec, make_codec
from vitdsi_utils.ids.schemes import (
    assign_ids,
    atomic_codec,
    codec_for,
    collision_rate,
    hierarchical_kmeans_codes,
    pixel_embeddings,
    residual_quantise,
    resolve_collisions,
    sibling_agreement,
)
from vitdsi_utils.model.decoding import beam_search, greedy_decode, invalid_id_rates, parse_decoded, rank_exhaustive
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.phases import fine_tune, index_database
from vitdsi_utils.runs import run_name
from vitdsi_utils.studies.ids import ids_markdown
from vitdsi_utils.studies.targets import gap_markdown, gap_table
from vitdsi_utils.training.config import TrainConfig
from vitdsi_utils.training.loop import train_indexing

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 16
TINY = dict(patch_size=16, depth=1, dim=32, mlp_dim=64, heads=2, dropout=0.0)


def blobs(sizes: list[int], dim: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs: (points (sum(sizes), dim), blob of each point)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[: len(sizes)] * 100.0
    points = np.concatenate([c + rng.normal(size=(s, dim)) for c, s in zip(centres, sizes)])
    return points, np.repeat(np.arange(len(sizes)), sizes)


def random_images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)


def tiny_model(codec: IDCodec, seed: int = 0, **overrides) -> DSIModel:
    torch.manual_seed(seed)
    values = dict(image_size=SIZE, patch_size=8, dim=32, mlp_dim=64, depth=1, heads=2, dropout=0.0)
    return DSIModel(DSIConfig.from_codec(codec, **{**values, **overrides}))


@pytest.fixture(scope="module")
def digits_dbs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = load_images("digits", 32, progress=False)
    return {scheme: build_database(images, 80, id_scheme=scheme) for scheme in ("random", "clustered")}


# -- hierarchical k-means ---------------------------------------------------------------------
def test_hierarchical_codes_distinct_prefixed_by_cluster_and_leaves_small():
    points, blob = blobs([14, 9, 7])
    k, c = 3, 4
    codes = hierarchical_kmeans_codes(points, k=k, c=c, seed=0)
    assert len(set(codes)) == len(codes) == len(points)
    # the top-level split finds the blobs: the first token partitions the items exactly as they do
    first = defaultdict(set)
    for code, b in zip(codes, blob):
        first[code[0]].add(int(b))
    assert sorted(map(sorted, first.values())) == [[0], [1], [2]]
    # leaves: at most c members, numbered 0..m-1; inner tokens are cluster numbers below k
    leaves = defaultdict(list)
    for code in codes:
        leaves[code[:-1]].append(code[-1])
        assert all(0 <= t < k for t in code[:-1])
    assert all(sorted(last) == list(range(len(last))) and len(last) <= c for last in leaves.values())
    assert max(len(code) for code in codes) >= 3  # 14 > c twice over: the recursion went two levels down
    assert codes == hierarchical_kmeans_codes(points, k=k, c=c, seed=0)  # seeded


def test_hierarchical_codes_terminate_on_identical_points_and_keep_small_sets_flat():
    codes = hierarchical_kmeans_codes(np.ones((25, 3)), k=2, c=3)
    assert len(set(codes)) == 25
    assert max(Counter(code[:-1] for code in codes).values()) <= 3
    assert hierarchical_kmeans_codes(np.random.default_rng(0).normal(size=(4, 2)), k=3, c=4) == [(0,), (1,), (2,), (3,)]
    with pytest.raises(ValueError, match="branching factor"):
        hierarchical_kmeans_codes(np.ones((5, 2)), k=1)
    with pytest.raises(ValueError, match="2-D"):
        hierarchical_kmeans_codes(np.ones(5))


# -- residual quantisation and collisions -----------------------------------------------------
def test_collisions_resolved_by_a_rank_digit():
    raw = [(0, 1), (0, 1), (2, 3), (0, 1), (4, 4)]
    assert collision_rate(raw) == pytest.approx(3 / 5)  # three items share (0, 1)
    assert resolve_collisions(raw) == [(0, 1, 0), (0, 1, 1), (2, 3), (0, 1, 2), (4, 4)]
    assert collision_rate([(1,), (2,)]) == 0.0
    with pytest.raises(ValueError, match="one length"):
        resolve_collisions([(1,), (1, 2)])


def test_rq_on_duplicates_collides_and_the_codes_become_distinct():
    points, _ = blobs([1, 1, 1, 1])
    x = points[[0, 0, 0, 1, 2, 3]]  # one point three times, three others once
    rq = residual_quantise(x, levels=1, codebook_size=4, seed=0)
    raw = [tuple(r) for r in rq.codes.tolist()]
    assert raw[0] == raw[1] == raw[2] and len(set(raw[3:])) == 3 and raw[0] not in raw[3:]
    assert collision_rate(raw) == pytest.approx(0.5)
    codes = resolve_collisions(raw)
    assert len(set(codes)) == 6 and [len(c) for c in codes] == [2, 2, 2, 1, 1, 1]
    np.testing.assert_allclose(rq.reconstruct(), x, atol=1e-9)  # four points, four codewords: exact


def test_rq_levels_refine_the_residual():
    x = np.random.default_rng(3).normal(size=(200, 8))
    rq = residual_quantise(x, levels=3, codebook_size=8, seed=0)
    assert rq.codes.shape == (200, 3) and rq.codes.max() < 8
    assert rq.relative_error[0] > rq.relative_error[1] > rq.relative_error[2] > 0
    error = ((x - rq.reconstruct()) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert error == pytest.approx(rq.relative_error[-1])


# -- codec_for and the database plumbing --------------------------------------------------------
def test_codec_for_dense_schemes_is_the_old_codec(digits_dbs):
    for scheme, db in digits_dbs.items():
        codec = codec_for(db)
        old = make_codec(db.n_index)
        assert codec.codes == old.codes and codec.base == old.base == 10
        assert codec_for(db, scheme).codes == old.codes
    with pytest.raises(ValueError, match="built with random IDs"):
        codec_for(digits_dbs["random"], "clustered")
    with pytest.raises(ValueError, match="unknown ID scheme"):
        codec_for(digits_dbs["random"], "learned")


def test_assign_ids_for_every_scheme(digits_dbs):
    db = digits_dbs["random"]
    n = db.n_index
    x = pixel_embeddings(db.split("index")[0], side=8)
    semantic = assign_ids(db, "semantic", embeddings=x, embedding_name="pixels", k=4, c=5)
    assert semantic.tag == "semantic-pixels-k4-c5" and semantic.codec.base == 5 and semantic.collision_rate == 0
    rq = assign_ids(db, "rq", embeddings=x, levels=2, codebook_size=4)
    raw = [tuple(r) for r in residual_quantise(x, 2, 4, seed=db.settings["seed"]).codes.tolist()]
    assert rq.collision_rate == pytest.approx(collision_rate(raw)) and rq.collision_rate > 0  # 20 images, 16 codes
    assert rq.codec.codes == resolve_collisions(raw) and rq.codec.base >= 4
    bovw = assign_ids(db, "semantic", k=4, c=5, bovw_words=20)  # default embeddings: BoVW of the indexed images
    assert bovw.tag == "semantic-bovw-k4-c5"
    atomic = assign_ids(db, "atomic")
    assert atomic.codec.codes == [(r,) for r in range(n)] and atomic.codec.base == n
    for a in (semantic, rq, bovw, atomic):
        assert len(a.codec) == n and len(set(a.codec.codes)) == n
        assert a.summary()["max_length"] == max(len(c) for c in a.codec.codes)
    with pytest.raises(ValueError, match="one row per\\s+indexed image"):
        assign_ids(db, "semantic", embeddings=x[:-1])


def test_default_codec_gives_the_same_model_as_before(digits_dbs):
    db = digits_dbs["clustered"]
    config = TrainConfig(epochs=2, progress=False, device="cpu", seed=3)
    implicit = index_database(db, model_overrides=TINY, config=config)
    explicit = index_database(db, model_overrides=TINY, config=config, codec=codec_for(db))
    for a, b in zip(implicit.model.state_dict().values(), explicit.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_run_folder_refuses_a_model_of_other_ids(digits_dbs, tmp_path):
    db = digits_dbs["random"]
    x = pixel_embeddings(db.split("index")[0], side=8)
    semantic = assign_ids(db, "semantic", embeddings=x, k=4, c=5)
    config = TrainConfig(epochs=1, progress=False, device="cpu")
    zero = index_database(db, model_overrides=TINY, config=config, run_dir=tmp_path, codec=semantic.codec)
    assert zero.model.config.vocab_size == semantic.codec.vocab_size
    # the same codec loads the finished model; any other is refused, even with the same vocabulary
    again = index_database(db, model_overrides=TINY, config=config, run_dir=tmp_path, codec=semantic.codec)
    assert all(torch.equal(a, b) for a, b in zip(zero.model.state_dict().values(), again.model.state_dict().values()))
    reordered = IDCodec(semantic.codec.codes[::-1], base=semantic.codec.base)
    for other in (atomic_codec(db.n_index), reordered, codec_for(db)):
        with pytest.raises(ValueError, match=r"written for another database or model: .*\bIDs?\b"):
            index_database(db, model_overrides=TINY, config=config, run_dir=tmp_path, codec=other)
    with pytest.raises(ValueError, match="vocab_size"):  # a model cannot be fine-tuned for another vocabulary
        fine_tune(db, zero.model, config=config, codec=atomic_codec(db.n_index))
    with pytest.raises(ValueError, match="the codec has"):
        index_database(db, model_overrides=TINY, config=config, codec=make_codec(db.n_index + 1))
    assert run_name(db, semantic.tag).endswith("-semantic-given-k4-c5-seed0")  # embeddings passed in: "given"
    assert run_name(db) == run_name(db, "random")


# -- atomic IDs and decoding ----------------------------------------------------------------------
def test_atomic_codec_round_trip_and_beam_search():
    n = 24
    codec = atomic_codec(n)
    assert (codec.base, codec.vocab_size, codec.max_length) == (n, n + 3, 2)
    targets = codec.targets()
    assert targets.tolist() == [[r, codec.eos] for r in range(n)]
    assert all(codec.lookup(targets[r].tolist()) == r for r in range(n)) and codec.to_string(17) == "17"
    model, images = tiny_model(codec), random_images(6)
    scores, rows = beam_search(model, images, codec, k=n)
    assert torch.equal(rows.sort(dim=1).values, torch.arange(n).expand(6, n))  # every image once per query
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    # a beam as wide as the index is exact: the top 5 of the exhaustive scores
    ex_scores, ex_rows = rank_exhaustive(model, images, codec, 5)
    top_scores, top_rows = beam_search(model, images, codec, k=5, beam_size=n)
    assert torch.equal(top_rows, ex_rows) and torch.allclose(top_scores, ex_scores, atol=1e-4)
    # a narrower beam still returns distinct, valid IDs
    _, rows = beam_search(model, images, codec, k=5)
    assert ((rows >= 0) & (rows < n)).all() and all(len(set(r)) == 5 for r in rows.tolist())


def test_parse_decoded_accepts_only_ids():
    codec = IDCodec([(1,), (2, 3), (2, 4, 0)], base=5)  # EOS 6, PAD 7, BOS 5
    tokens = [
        [1, 6, 7, 7],  # (1,)
        [2, 4, 0, 6],  # (2, 4, 0)
        [2, 3, 6, 3],  # (2, 3); what follows EOS does not matter
        [2, 6, 7, 7],  # (2,) is a prefix, not an ID
        [2, 7, 3, 6],  # PAD inside an ID
        [2, 4, 0, 1],  # no EOS
    ]
    assert parse_decoded(codec, tokens).tolist() == [0, 2, 1, -1, -1, -1]


def test_trie_keeps_beam_search_on_ids_where_free_decoding_leaves_them():
    # 6 sparse three-token codes out of 16^3: an untrained free decoder almost never spells one
    codec = IDCodec([(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11), (12, 13, 14), (15, 0, 1)], base=16)
    model, images = tiny_model(codec, seed=2), random_images(20, seed=4)
    tokens = greedy_decode(model, images, codec)
    assert tokens.shape == (20, codec.max_length)
    rates = invalid_id_rates(model, codec, images, k=6)
    assert rates["beam"] == 0.0
    free_invalid = float((parse_decoded(codec, tokens.numpy()) < 0).mean())
    assert rates["greedy"] == pytest.approx(free_invalid) and free_invalid > 0.5


def test_tiny_model_memorises_semantic_ids():
    images = random_images(48, seed=5)
    codes = hierarchical_kmeans_codes(pixel_embeddings(images.numpy(), side=4), k=4, c=4, seed=0)
    codec = IDCodec(codes, base=4)
    assert codec.max_length >= 3  # a real hierarchy, not one flat level
    model = tiny_model(codec, dim=64, mlp_dim=128)
    config = TrainConfig(lr=3e-3, batch_size=16, epochs=80, target_accuracy=1.0, progress=False, device="cpu")
    history = train_indexing(model, codec, images, config=config)
    assert history[-1]["seq_acc"] == 1.0 and history[-1]["epoch"] < 80
    _, rows = beam_search(model, images, codec, k=1)
    assert torch.equal(rows[:, 0], torch.arange(48))  # IA@1 = 1


# -- diagnostics and the comparison tables -----------------------------------------------------
def test_sibling_agreement_known_answer():
    codec = IDCodec([(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)], base=3)
    agreement, chance = sibling_agreement(codec, [0, 0, 1, 1, 0])
    # siblings: {0,0} -> 1 of 1 pair; {1,1,0} -> 1 of 3 pairs; all items: 4 of 10 pairs
    assert agreement == pytest.approx(2 / 4) and chance == pytest.approx(4 / 10)
    assert sibling_agreement(IDCodec([(0,), (1,)], base=2), [0, 1]) == (0.0, 0.0)  # one group of two, mixed
    assert sibling_agreement(atomic_codec(4), [0, 0, 1, 1]) == pytest.approx((2 / 6, 2 / 6))


def test_gap_table_and_markdown():
    rows = []
    for model, ids, ia, p10 in [
        ("DSI zero-shot", "clustered", 1.0, 0.30),
        ("DSI zero-shot", "random", 0.98, 0.20),
        ("DSI zero-shot", "semantic", 0.99, 0.29),
        ("DSI zero-shot", "rq", 1.0, 0.38),
    ]:
        for metric, value in (("IA@1", ia), ("P@10", p10)):
            rows.append(
                dict(
                    model=model,
                    n=512,
                    seed=0,
                    ids=ids,
                    metric=metric,
                    value=value,
                    ci_low=value - 0.05,
                    ci_high=value + 0.05,
                    chance=0.1,
                )
            )
    results = pd.DataFrame(rows)
    gaps = gap_table(results, metrics=("IA@1", "P@10"))
    assert gaps["ids"].tolist() == ["random", "semantic", "rq"]
    assert gaps["P@10"].tolist() == pytest.approx([-0.10, -0.01, 0.08])
    # as written (|gap| <= 0.03) the better rq IDs fail; read one-sided (no metric 0.03 below) they pass
    assert gaps["within_target"].tolist() == [False, True, False]
    assert gaps["not_worse"].tolist() == [False, True, True]
    assert "| DSI zero-shot | 512 | 0 | rq | +0.000 | +0.080 | 0.080 | no | yes |" in gap_markdown(gaps)
    runs = pd.DataFrame(
        [
            dict(
                model="DSI zero-shot",
                n=512,
                seed=0,
                ids=ids,
                mean_length=2.0,
                max_length=3,
                vocab_size=13,
                collision_rate=0.0,
                sibling_agreement=0.5,
                sibling_chance=0.1,
                invalid_beam=0.0,
                invalid_greedy=0.25,
                train_s=10.0,
            )
            for ids in ("clustered", "random", "semantic")
        ]
    )
    text = ids_markdown(results, runs)
    assert "| DSI zero-shot | 512 | semantic | 0 | 0.990 [0.940, 1.040] |" in text
    assert "0.000 / 0.250" in text
    with pytest.raises(ValueError, match="no 'atomic' rows"):
        gap_table(results, reference="atomic")
