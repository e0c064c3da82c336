"""Constrained beam search against the exhaustive ranking, validity, padding, determinism."""
from __future__ import annotations

import pytest
import torch

from vitdsi_utils.ids.codec import IDCodec, decimal_codes, make_codec
from vitdsi_utils.model.decoding import beam_search, beam_widths, rank_exhaustive, score_all_ids
from vitdsi_utils.model.vit import DSIConfig, DSIModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SIZE = 16


def tiny_model(codec: IDCodec, seed: int = 0) -> DSIModel:
    torch.manual_seed(seed)
    config = DSIConfig.from_codec(codec, image_size=SIZE, patch_size=8, dim=32, mlp_dim=64, depth=2, heads=2)
    return DSIModel(config)


def random_images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)


# 37 three-digit IDs 000..036: the first digit is always 0 and the last one is cut short after
# 03, so an unconstrained decoder would wander off the trie; variable-length IDs exercise
# finished hypotheses riding along on PAD.
CODECS = {
    "decimal37x3": IDCodec(decimal_codes(37, n_digits=3)),
    "variable": IDCodec([(1,), (2, 3), (2, 4, 5), (7,), (2, 3, 1), (0, 0, 0), (9, 9)]),
}


@pytest.fixture(scope="module", params=list(CODECS))
def setup(request):
    codec = CODECS[request.param]
    return tiny_model(codec), codec, random_images(12)


def test_matches_exhaustive_when_beam_covers_all_ids(setup):
    model, codec, images = setup
    n = len(codec)
    scores, rows = beam_search(model, images, codec, k=n, beam_size=n, batch_size=5)
    ex_scores, ex_rows = rank_exhaustive(model, images, codec, n)
    assert torch.equal(rows, ex_rows)
    assert torch.allclose(scores, ex_scores, atol=1e-4)
    # every ID shows up exactly once per query
    assert torch.equal(rows.sort(dim=1).values, torch.arange(n).expand(len(images), n))


def test_rows_valid_distinct_and_scored(setup):
    model, codec, images = setup
    k = min(5, len(codec))
    scores, rows = beam_search(model, images, codec, k=k)
    assert scores.shape == rows.shape == (len(images), k)
    assert scores.dtype == torch.float32 and rows.dtype == torch.int64
    assert ((rows >= 0) & (rows < len(codec))).all()
    assert all(len(set(r.tolist())) == k for r in rows)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    # the scores are the true sequence log-probabilities of the returned IDs
    exact = score_all_ids(model, images, codec).gather(1, rows)
    assert torch.allclose(scores, exact, atol=1e-4)


def test_k_beyond_number_of_ids_pads_with_nothing(setup):
    model, codec, images = setup
    n = len(codec)
    scores, rows = beam_search(model, images, codec, k=n + 9)
    assert (rows[:, n:] == -1).all() and torch.isneginf(scores[:, n:]).all()
    assert torch.isfinite(scores[:, :n]).all()
    assert torch.equal(rows[:, :n].sort(dim=1).values, torch.arange(n).expand(len(images), n))
    ex_scores, ex_rows = rank_exhaustive(model, images, codec, n + 9)
    assert torch.equal(ex_rows, rows) and torch.isneginf(ex_scores[:, n:]).all()


def test_deterministic_and_batch_invariant():
    codec = CODECS["decimal37x3"]
    model, images = tiny_model(codec), random_images(10)
    a = beam_search(model, images, codec, k=8, batch_size=4)
    b = beam_search(model, images, codec, k=8, batch_size=4)
    c = beam_search(model, images, codec, k=8, batch_size=10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[1], c[1]) and torch.allclose(a[0], c[0], atol=1e-5)


def test_wider_beam_never_scores_worse():
    codec = make_codec(300)
    model, images = tiny_model(codec), random_images(4)
    narrow, _ = beam_search(model, images, codec, k=5, beam_size=5)
    wide, _ = beam_search(model, images, codec, k=5, beam_size=300)
    assert (wide[:, 0] >= narrow[:, 0] - 1e-5).all()  # the wide beam holds the exact best ID


def test_large_k_and_mode_restored():
    codec = make_codec(300)
    model, images = tiny_model(codec).train(), random_images(3)
    scores, rows = beam_search(model, images, codec, k=128)
    assert model.training  # beam search switches to eval and back
    assert rows.shape == (3, 128) and ((rows >= 0) & (rows < 300)).all()
    assert all(len(set(r.tolist())) == 128 for r in rows)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_argument_errors():
    codec = CODECS["decimal37x3"]
    model, images = tiny_model(codec), random_images(2)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, images, codec, k=10, beam_size=5)
    with pytest.raises(ValueError, match="vocab_size"):
        beam_search(model, images, IDCodec([(1, 2)], base=16), k=1)


def test_beam_widths_follow_the_trie():
    codec = CODECS["decimal37x3"]
    assert beam_widths(codec.trie, codec.max_length, 100) == [1, 1, 4, 37, 37]
    assert beam_widths(codec.trie, codec.max_length, 10) == [1, 1, 4, 10, 10]
