"""Constrained beam search against the exhaustive ranking, validity, padding, determinism; the incremental
decoder against the full decoder and the previous beam search (issue 17)."""

from __future__ import annotations

import pytest
import torch

from vitdsi_utils.ids.codec import IDCodec, decimal_codes, make_codec
from vitdsi_utils.ids.schemes import atomic_codec
from vitdsi_utils.model.decoding import (
    beam_search,
    beam_search_reference,
    beam_widths,
    greedy_decode,
    queries_per_batch,
    rank_exhaustive,
    score_all_ids,
)
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.training.config import TrainConfig
from vitdsi_utils.training.loop import train_indexing

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


# -- incremental decoding (issue 17) against the full decoder and the previous beam search ----------
#: decoder variants: positions of the decoder, patch grid (P = 1, 4 or 16 image tokens), heads, depth
VARIANTS = {
    "sinusoidal-p8": dict(pos_encoding="sinusoidal", patch_size=8, heads=2, depth=2),
    "learned-p4": dict(pos_encoding="learned", patch_size=4, heads=4, depth=1),
    "conditional-p16": dict(pos_encoding="conditional", patch_size=16, heads=1, depth=3),
}
EXACT = 1e-5  # scores of the two beam searches agree to this (float32 sums of log-probabilities)


def variant_model(codec: IDCodec, variant: str, seed: int = 0) -> DSIModel:
    torch.manual_seed(seed)
    config = DSIConfig.from_codec(codec, **{**dict(image_size=SIZE, dim=32, mlp_dim=64), **VARIANTS[variant]})
    return DSIModel(config).eval()


@pytest.fixture(scope="module")
def trained():
    """A tiny DSI trained for a few seconds to memorise 37 images (peaked, realistic score distributions)."""
    codec = CODECS["decimal37x3"]
    model, images = tiny_model(codec, seed=3), random_images(37, seed=7)
    train_indexing(
        model,
        codec,
        images,
        config=TrainConfig(lr=3e-3, batch_size=16, epochs=40, target_accuracy=1.0, progress=False, device="cpu"),
    )
    return model.eval(), codec, images


def assert_same_search(a, b):
    """Same rows in the same order; finite scores within EXACT; -inf in the same places."""
    (sa, ra), (sb, rb) = a, b
    assert torch.equal(ra, rb)
    assert torch.equal(torch.isfinite(sa), torch.isfinite(sb))
    finite = torch.isfinite(sa)
    assert (sa[finite] - sb[finite]).abs().max() <= EXACT


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incremental_decoder_equals_full_decoder(variant):
    codec = CODECS["variable"]
    model, images = variant_model(codec, variant), random_images(3)
    inputs = codec.decoder_inputs(codec.targets([0, 2, 5]))  # (3, L): IDs of 1, 3 and 3 tokens, PAD after EOS
    with torch.inference_mode():
        memory = model.encode(images)
        full = model.decode(memory, inputs)  # (3, L, V)
        decoder = model.incremental_decoder(memory)
        steps = torch.stack([decoder.step(inputs[:, t : t + 1])[:, 0] for t in range(inputs.shape[1])], dim=1)
        assert (steps - full).abs().max() <= EXACT
        # beams: widen to 4 per query, then reorder at random; each beam's logits are those of its own prefix
        g = torch.Generator().manual_seed(0)
        decoder = model.incremental_decoder(memory, max_width=4)
        prefix = torch.full((3, 1, 1), codec.bos)  # (B, W, t+1)
        token = prefix[:, :, 0]
        for t in range(codec.max_length):
            logits = decoder.step(token)  # (B, W, V)
            B, W = token.shape
            want = model.decode(memory.repeat_interleave(W, dim=0), prefix.view(B * W, t + 1))[:, -1].view(B, W, -1)
            assert (logits - want).abs().max() <= EXACT
            parent = torch.randint(0, W, (B, 4), generator=g)
            token = torch.randint(0, codec.vocab_size, (B, 4), generator=g)
            decoder.reorder(parent)
            prefix = torch.cat([prefix.gather(1, parent[..., None].expand(-1, -1, t + 1)), token[..., None]], dim=2)


def test_incremental_decoder_refuses_dropout_and_bad_shapes():
    codec = CODECS["variable"]
    model, images = variant_model(codec, "sinusoidal-p8"), random_images(2)
    memory = model.encode(images).detach()
    with pytest.raises(ValueError, match="eval"):
        model.train().incremental_decoder(memory)
    decoder = model.eval().incremental_decoder(memory, max_width=2)
    with pytest.raises(ValueError, match="step"):
        decoder.reorder(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        decoder.step(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("codec_name", ["decimal37x3", "variable", "atomic"])
def test_beam_search_equals_reference_on_random_models(variant, codec_name):
    codec = atomic_codec(30) if codec_name == "atomic" else CODECS[codec_name]
    model, images = variant_model(codec, variant), random_images(6)
    n = len(codec)
    for k, beam in [(1, None), (5, 5), (5, 12), (n, n), (n + 3, None)]:
        new = beam_search(model, images, codec, k=k, beam_size=beam, batch_size=4)
        assert_same_search(new, beam_search_reference(model, images, codec, k=k, beam_size=beam, batch_size=4))


def test_beam_search_equals_reference_on_a_trained_model(trained):
    model, codec, images = trained
    _, own = beam_search(model, images, codec, k=1)
    assert (own[:, 0] == torch.arange(len(images))).float().mean() > 0.5  # it did memorise
    for k, beam in [(1, None), (10, 10), (10, 37), (37, 37)]:
        new = beam_search(model, images, codec, k=k, beam_size=beam)
        assert_same_search(new, beam_search_reference(model, images, codec, k=k, beam_size=beam))


@pytest.mark.parametrize("kind", ["random", "trained"])
def test_top1_is_the_exhaustive_argmax_when_the_beam_covers_every_id(kind, trained):
    model, codec, images = (
        trained if kind == "trained" else (tiny_model(CODECS["variable"]).eval(), CODECS["variable"], random_images(9))
    )
    n = len(codec)
    scores, rows = beam_search(model, images, codec, k=1, beam_size=n)
    exact = score_all_ids(model, images, codec)  # (Q, n)
    assert torch.equal(rows[:, 0], exact.argmax(dim=1))
    assert (scores[:, 0] - exact.max(dim=1).values).abs().max() <= EXACT


def full_decoder_greedy(model: DSIModel, images: torch.Tensor, codec: IDCodec) -> torch.Tensor:
    """Greedy decoding by re-running the whole decoder over the prefix (what greedy_decode did before issue 17)."""
    with torch.inference_mode():
        memory = model.eval().encode(images)
        prefix = torch.full((len(images), 1), codec.bos)
        out = []
        for _ in range(codec.max_length):
            token = model.decode(memory, prefix)[:, -1].argmax(dim=-1)
            out.append(token)
            prefix = torch.cat([prefix, token.masked_fill(token == codec.eos, codec.pad)[:, None]], dim=1)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_decode_equals_the_full_decoder(variant, trained):
    codec = CODECS["variable"]
    model, images = variant_model(codec, variant), random_images(8)
    assert torch.equal(greedy_decode(model, images, codec, batch_size=3), full_decoder_greedy(model, images, codec))
    model, codec, images = trained
    tokens = greedy_decode(model, images, codec)
    assert torch.equal(tokens, full_decoder_greedy(model, images, codec))


def test_batches_are_sized_by_memory(monkeypatch):
    from vitdsi_utils.model import decoding

    codec = CODECS["decimal37x3"]
    model, images = tiny_model(codec).eval(), random_images(7)
    device = torch.device("cpu")
    per_query = decoding.beam_bytes_per_query(model, codec, 37)
    assert queries_per_batch(model, codec, 37, device, max_bytes=10 * per_query) == 10
    assert queries_per_batch(model, codec, 37, device, max_bytes=1) == 1
    whole = beam_search(model, images, codec, k=37, batch_size=None)
    monkeypatch.setattr(decoding, "CPU_BATCH_BYTES", 3 * per_query)  # 3 queries per batch at most: 3 batches
    calls = []
    batch_fn = decoding._beam_batch
    monkeypatch.setattr(decoding, "_beam_batch", lambda m, im, *a: calls.append(len(im)) or batch_fn(m, im, *a))
    assert_same_search(beam_search(model, images, codec, k=37, batch_size=None), whole)
    assert calls == [3, 3, 1] or calls == [3, 2, 2]
    calls.clear()
    beam_search(model, images, codec, k=37, batch_size=2)  # the caller's cap still holds
    assert max(calls) <= 2 and sum(calls) == 7
    with pytest.raises(ValueError, match="batch_size"):
        beam_search(model, images, codec, k=3, batch_size=0)


def test_amp_is_a_no_op_on_the_cpu():
    codec = CODECS["variable"]
    model, images = tiny_model(codec).eval(), random_images(4)
    a = beam_search(model, images, codec, k=5, amp=True)
    assert_same_search(a, beam_search(model, images, codec, k=5, amp=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_beam_search_matches_the_cpu():
    codec = make_codec(300)
    model, images = tiny_model(codec).eval(), random_images(16)
    cpu = beam_search(model, images, codec, k=20)
    gpu = beam_search(model.cuda(), images, codec, k=20, amp=False)
    model.cpu()
    assert torch.equal(cpu[1], gpu[1]) and torch.allclose(cpu[0], gpu[0], atol=1e-4)
