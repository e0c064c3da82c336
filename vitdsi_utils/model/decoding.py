"""Turn a trained DSI model into a ranked list of database rows per query image.

* :func:`beam_search` - constrained beam search over the prefix trie of the existing IDs,
  batched over queries and beams (the paper's retrieval), decoding incrementally: each query is
  encoded once, each decoder layer projects its cross-attention keys and values once for all
  beams, and the prefix's self-attention is cached (``model.kv_cache.IncrementalDecoder``).
  :func:`beam_search_reference` is the earlier implementation (the same results, slower), kept
  for tests and benchmarks.
* :func:`score_all_ids` / :func:`rank_exhaustive` - the exact log-probability of every ID by
  teacher forcing: the upper bound a beam search can reach, and its test oracle.
* :func:`greedy_decode` - free decoding without the trie, to measure how often the model on its
  own writes a token sequence that is not an ID (incremental, like the beam search).

Scores are sequence log-probabilities: the sum of the log-probabilities of the content tokens
and EOS (PAD after EOS costs nothing). Results come back on the CPU.

Under a process group (:mod:`vitdsi_utils.distributed`) :func:`beam_search` is a collective
call: every process passes the same queries, decodes its share of the query batches and gets
every process's lists back, identical to what one process computes (each batch is the one a
single process would decode).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vitdsi_utils import distributed
from vitdsi_utils.devices import amp_dtype, autocast
from vitdsi_utils.ids.codec import IDCodec, PrefixTrie
from vitdsi_utils.model.vit import DSIModel

NEG_INF = float("-inf")


def _resolve(model: DSIModel, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else model.device


def beam_widths(trie: PrefixTrie, steps: int, beam_size: int) -> list[int]:
    """Live hypotheses after t = 0..steps tokens: min(beam_size, distinct trie states at depth t).

    A path in a trie is determined by its end node, and a finished ID only loops on PAD, so
    after t tokens there are at most (nodes at depth t) + (terminal nodes above depth t)
    distinct valid hypotheses. Sizing each step by that bound keeps early steps narrow
    (1, 10, 100 ... for decimal IDs) without changing the result.
    """
    depth = trie.depth.cpu()
    terminal = trie.row.cpu() >= 0
    widths = []
    for t in range(steps + 1):
        states = int((depth == t).sum()) + int((terminal & (depth < t)).sum())
        widths.append(max(1, min(beam_size, states)))
    return widths


def _extend(
    scores: torch.Tensor, nodes: torch.Tensor, logits: torch.Tensor, codec: IDCodec, trie: PrefixTrie, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One beam step: score every (beam, token) extension allowed by the trie and keep the best ``width``.

    scores, nodes (B, W) and the beams' next-token logits (B, W, V) -> the new beams'
    (scores, trie nodes, parent beam in 0..W-1, token the decoder reads next), each (B, width).
    """
    B, W, V = logits.shape
    logp = logits.float().log_softmax(dim=-1)  # (B, W, V)
    child = trie.next_node[nodes]  # (B, W, V), -1 where the token leaves the trie
    finished = (trie.row[nodes] >= 0)[..., None]  # (B, W, 1): terminal nodes only allow PAD
    logp = torch.where(finished, torch.zeros_like(logp), logp).masked_fill(child < 0, NEG_INF)
    candidates = (scores[..., None] + logp).view(B, W * V)  # (B, W*V)
    scores, flat = candidates.topk(width, dim=1)  # (B, W'), sorted descending
    # a pick with score -inf is a dead placeholder (fewer valid hypotheses than beams); park it at the root
    nodes = child.view(B, W * V).gather(1, flat).clamp_min(0)  # (B, W')
    token = flat % V
    # the decoder was trained to read PAD, not EOS, after an ID ends (codec.decoder_inputs)
    token = token.masked_fill(token == codec.eos, codec.pad)
    return scores, nodes, flat // V, token


def _finish(scores: torch.Tensor, nodes: torch.Tensor, trie: PrefixTrie) -> tuple[torch.Tensor, torch.Tensor]:
    """Final beams (B, W) -> (scores, database rows), rows -1 for dead placeholders."""
    rows = trie.row[nodes]  # (B, W)
    alive = torch.isfinite(scores)
    if bool((rows[alive] < 0).any()):
        raise RuntimeError("beam search ended on an unfinished ID; codec.max_length is too short")
    return scores, rows.masked_fill(~alive, -1)


def _beam_batch(
    model: DSIModel, images: torch.Tensor, codec: IDCodec, trie: PrefixTrie, widths: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search for one query batch -> (scores, rows), each (B, widths[-1]), best first.

    Each query is encoded once; the incremental decoder projects its cross-attention keys and
    values once per layer for all its beams and caches the prefix's self-attention, so every
    step runs the decoder on the B*W new tokens only (see ``model.kv_cache.IncrementalDecoder``).
    """
    B = images.shape[0]
    decoder = model.incremental_decoder(model.encode(images), max(widths))  # encoder tokens (B, P, D) -> per-layer K/V
    scores = torch.zeros(B, 1, device=images.device)  # (B, W): one live beam per query at the root
    nodes = torch.zeros(B, 1, dtype=torch.long, device=images.device)  # (B, W) trie node of each beam
    token = torch.full((B, 1), codec.bos, dtype=torch.long, device=images.device)  # (B, W) last token read
    for t in range(codec.max_length):
        logits = decoder.step(token)  # (B, W, V)
        scores, nodes, parent, token = _extend(scores, nodes, logits, codec, trie, widths[t + 1])  # (B, W') each
        if t + 1 < codec.max_length:
            decoder.reorder(parent)
    return _finish(scores, nodes, trie)


def _beam_batch_reference(
    model: DSIModel, images: torch.Tensor, codec: IDCodec, trie: PrefixTrie, widths: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The beam search before issue 17, kept as the reference of tests and benchmarks: every step
    copies the encoder memory once per beam and re-runs ``model.decode`` over the whole prefix."""
    B = images.shape[0]
    memory = model.encode(images)  # (B, P, D)
    scores = torch.zeros(B, 1, device=images.device)  # (B, W)
    nodes = torch.zeros(B, 1, dtype=torch.long, device=images.device)  # (B, W)
    prefix = torch.full((B, 1, 1), codec.bos, dtype=torch.long, device=images.device)  # (B, W, t+1)
    for t in range(codec.max_length):
        W = scores.shape[1]
        mem = memory.repeat_interleave(W, dim=0) if W > 1 else memory  # (B*W, P, D)
        logits = model.decode(mem, prefix.view(B * W, t + 1))[:, -1].view(B, W, -1)  # (B, W, V)
        scores, nodes, parent, token = _extend(scores, nodes, logits, codec, trie, widths[t + 1])
        if t + 1 < codec.max_length:
            parent = parent[..., None].expand(-1, -1, t + 1)  # (B, W', t+1)
            prefix = torch.cat([prefix.gather(1, parent), token[..., None]], dim=2)  # (B, W', t+2)
    return _finish(scores, nodes, trie)


#: Memory a CPU beam-search batch may take (bytes): on a CPU, batches beyond a few dozen queries only lose cache locality.
CPU_BATCH_BYTES = 256 << 20
#: Share of the free GPU memory a CUDA beam-search batch may take.
CUDA_BATCH_SHARE = 0.5


def beam_bytes_per_query(model: DSIModel, codec: IDCodec, beam_size: int, amp: bool = False) -> int:
    """Rough peak memory (bytes) that one query takes in :func:`beam_search`: the encoder's
    activations, the cross-attention keys and values, the self-attention cache of its
    ``beam_size`` beams with the gathered prefix, and one step's activations of its beams.
    ``amp``: whether the model runs in bf16 (2-byte activations)."""
    c = model.config
    P, D, W, L, V, layers = c.num_patches, c.dim, beam_size, codec.max_length, codec.vocab_size, c.depth
    encoder = P * (6 * D + c.mlp_dim) + c.heads * P * P  # one block's activations at a time
    cross = layers * 2 * P * D  # keys and values of the image tokens
    cache = L * layers * 2 * W * D + 2 * L * 2 * W * D  # every position's keys and values; the gathered prefix
    step = W * (8 * D + c.mlp_dim + c.heads * P) + 6 * W * V  # projections, attention weights, logits and candidates
    element = 2 if amp else 4
    return element * (encoder + cross + cache + step) + 8 * 2 * W * V  # int64 trie lookups (B, W, V)


def queries_per_batch(
    model: DSIModel,
    codec: IDCodec,
    beam_size: int,
    device: torch.device,
    amp: bool = False,
    max_bytes: int | None = None,
) -> int:
    """Queries :func:`beam_search` decodes side by side (each with ``beam_size`` beams), sized by memory:
    ``max_bytes`` if given, else :data:`CUDA_BATCH_SHARE` of the free memory of a CUDA device or
    :data:`CPU_BATCH_BYTES` on the CPU. ``amp``: whether the model runs in bf16."""
    if max_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            max_bytes = int(free * CUDA_BATCH_SHARE)
        else:
            max_bytes = CPU_BATCH_BYTES
    return max(1, max_bytes // beam_bytes_per_query(model, codec, beam_size, amp))


def _search(
    batch_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    model: DSIModel,
    images: torch.Tensor,
    codec: IDCodec,
    *,
    k: int,
    beam_size: int | None,
    batch_size: int | None,
    device: torch.device | str | None,
    amp: bool | str | None,
    progress: bool,
    by_memory: bool = True,
    shard: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the arguments, cut the queries into batches and run ``batch_fn`` on each (see :func:`beam_search`);
    ``by_memory``: batches sized by :func:`queries_per_batch` (capped by ``batch_size``), else ``batch_size`` queries.
    ``shard``: under a process group, run this process's whole batches only and gather every process's results."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    beam_size = k if beam_size is None else beam_size
    if beam_size < k:
        raise ValueError(f"beam_size ({beam_size}) must be at least k ({k})")
    model.check_codec(codec)
    images = torch.as_tensor(images)
    device = _resolve(model, device)
    half = amp_dtype(device, amp) is not None  # bf16 activations (amp None: on CUDA only)
    trie = codec.trie.to(device)
    widths = beam_widths(trie, codec.max_length, beam_size)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    Q = images.shape[0]
    if by_memory:  # as many queries as memory allows, at most batch_size, in batches of equal size
        cap = queries_per_batch(model, codec, widths[-1], device, half)
        cap = min(cap, batch_size) if batch_size is not None else cap
        if shard:  # every process must cut the same batches, whatever memory each has free
            cap = distributed.min_over_ranks(cap)
        per_batch = math.ceil(Q / math.ceil(Q / cap)) if Q else 1
    else:
        per_batch = batch_size or 256
    # this process's whole batches (all of them in one process)
    share = distributed.shard_range(Q, per_batch) if shard else range(0, Q)
    first, size = share.start, len(share)
    scores = torch.full((size, k), NEG_INF, dtype=torch.float32)
    rows = torch.full((size, k), -1, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with autocast(device, amp):
            starts = range(first, share.stop, per_batch)
            show = progress and distributed.is_main() and len(starts) >= 2
            for start in tqdm(starts, desc="beam search", unit="batch", disable=not show):
                batch = images[start : min(start + per_batch, share.stop)].to(device, non_blocking=True)
                s, r = batch_fn(model, batch, codec, trie, widths)
                n = min(k, s.shape[1])
                scores[start - first : start - first + len(batch), :n] = s[:, :n].float().cpu()
                rows[start - first : start - first + len(batch), :n] = r[:, :n].cpu()
    finally:
        model.train(was_training)
    if shard:
        scores, rows = distributed.gather_rows(scores), distributed.gather_rows(rows)
    return scores, rows


@torch.inference_mode()
def beam_search(
    model: DSIModel,
    images: torch.Tensor,
    codec: IDCodec,
    *,
    k: int = 10,
    beam_size: int | None = None,
    batch_size: int | None = 256,
    device: torch.device | str | None = None,
    amp: bool | str | None = None,
    progress: bool = False,
    shard: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k distinct valid IDs per query image: uint8 (Q, H, W, 3) -> (scores (Q, k) float32, rows (Q, k) int64).

    Scores are sequence log-probabilities, descending per query. Decoding is constrained by
    ``codec.trie``, so every row exists and none repeats. Where fewer than k IDs reach a finite
    score, the remaining entries are row -1 and score -inf. ``beam_size`` (default k, at least
    k) hypotheses are kept per step.

    Each query is encoded once, each decoder layer projects the cross-attention keys and values
    of its image tokens once for all its beams, and the prefix's self-attention is cached, so
    a step decodes one new token per beam (``model.kv_cache.IncrementalDecoder``). All queries of a batch
    and their beams run as one batch: at most ``batch_size`` queries (None: no cap), fewer where
    memory demands it (:func:`queries_per_batch`; batches are cut to equal sizes). ``amp`` runs
    the model in bf16 autocast (faster on a GPU, slightly different scores): None (default), True
    or "auto" on CUDA only, "bf16" on any device (the CPU too), False never
    (:func:`vitdsi_utils.devices.autocast`); scores are summed in float32 either way. ``progress`` shows a bar over the query batches (for long runs,
    e.g. IA@1 of a whole large database). Results are on the CPU.

    Under a process group with ``shard=True`` (the default) this is a collective call: every
    process must call it with the same queries. The query batches are shared out (whole
    batches, sized alike on every process), and every process returns the lists of all
    queries, the same as one process would compute. ``shard=False`` decodes every query here
    (for a call only some processes make).
    """
    return _search(
        _beam_batch,
        model,
        images,
        codec,
        k=k,
        beam_size=beam_size,
        batch_size=batch_size,
        device=device,
        amp=amp,
        progress=progress,
        shard=shard,
    )


@torch.inference_mode()
def beam_search_reference(
    model: DSIModel,
    images: torch.Tensor,
    codec: IDCodec,
    *,
    k: int = 10,
    beam_size: int | None = None,
    batch_size: int | None = 256,
    device: torch.device | str | None = None,
    amp: bool | str | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`beam_search` as it was before issue 17 (the same results, several times slower): each step copies
    the encoder memory once per beam and re-runs the full decoder over the prefix. For tests and benchmarks.
    Batches hold ``batch_size`` queries (as before, not sized by memory)."""
    return _search(
        _beam_batch_reference,
        model,
        images,
        codec,
        k=k,
        beam_size=beam_size,
        batch_size=batch_size,
        device=device,
        amp=amp,
        progress=progress,
        by_memory=False,
    )


def indexing_accuracy(
    model: DSIModel,
    codec: IDCodec,
    images: Any,
    rows: Any = None,
    *,
    beam_size: int | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> float:
    """IA@1: the share of indexed ``images`` whose top-1 beam-search ID is their own.

    ``images`` are uint8 (N, H, W, 3), array or tensor; ``rows`` their rows in ``codec``
    (default ``0 .. N-1``). With ``device`` the model is moved there first (a model loaded from a
    checkpoint sits on the CPU). The beam search leaves the model's train/eval mode as it was.
    Under a process group it is a collective call, like :func:`beam_search`: every process gets the same value.
    """
    if device is not None:
        model.to(device)
    images = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    rows = torch.arange(len(images)) if rows is None else torch.as_tensor(rows)
    _, found = beam_search(
        model, images, codec, k=1, beam_size=beam_size, batch_size=batch_size, device=device, progress=progress
    )
    return float((found[:, 0] == rows).float().mean())


@torch.inference_mode()
def score_all_ids(
    model: DSIModel,
    images: torch.Tensor,
    codec: IDCodec,
    *,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
    amp: bool | str = False,
) -> torch.Tensor:
    """Exact log-probability of every ID for every query: uint8 (Q, H, W, 3) -> (Q, n_ids) float32 on CPU.

    Each query is encoded once; its memory is then paired with chunks of IDs, at most
    ``batch_size`` (query, ID) pairs per decoder pass, each scored in one teacher-forced pass.
    ``amp`` as in :func:`beam_search`, but off by default: this is the exact oracle.
    """
    model.check_codec(codec)
    images = torch.as_tensor(images)
    device = _resolve(model, device)
    targets = codec.targets().to(device)  # (n, L)
    inputs = codec.decoder_inputs(targets)  # (n, L)
    n = targets.shape[0]
    id_chunk = max(1, min(n, batch_size))
    query_chunk = max(1, batch_size // id_chunk)  # queries decoded side by side per pass
    encode_batch = max(query_chunk, 256)
    out = torch.empty(images.shape[0], n, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with autocast(device, amp):
            for q0 in range(0, images.shape[0], encode_batch):
                memory = model.encode(images[q0 : q0 + encode_batch].to(device, non_blocking=True))  # (b, P, D)
                for m0 in range(0, memory.shape[0], query_chunk):
                    mem = memory[m0 : m0 + query_chunk]  # (q, P, D)
                    q = mem.shape[0]
                    for i0 in range(0, n, id_chunk):
                        tgt, inp = targets[i0 : i0 + id_chunk], inputs[i0 : i0 + id_chunk]  # (c, L)
                        c = tgt.shape[0]
                        logits = model.decode(mem.repeat_interleave(c, dim=0), inp.repeat(q, 1))  # (q*c, L, V)
                        logp = logits.float().log_softmax(dim=-1)
                        tgt = tgt.repeat(q, 1)  # (q*c, L)
                        token_logp = logp.gather(2, tgt[..., None]).squeeze(2).masked_fill(tgt == codec.pad, 0.0)
                        out[q0 + m0 : q0 + m0 + q, i0 : i0 + c] = token_logp.sum(dim=1).view(q, c).cpu()
    finally:
        model.train(was_training)
    return out


def rank_exhaustive(
    model: DSIModel, images: torch.Tensor, codec: IDCodec, k: int, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of :func:`score_all_ids`: (scores (Q, k), rows (Q, k)), padded with -inf / -1 past n_ids."""
    all_scores = score_all_ids(model, images, codec, **kwargs)  # (Q, n)
    n = all_scores.shape[1]
    top, idx = all_scores.topk(min(k, n), dim=1)
    scores = torch.full((all_scores.shape[0], k), NEG_INF)
    rows = torch.full((all_scores.shape[0], k), -1, dtype=torch.long)
    scores[:, : top.shape[1]], rows[:, : top.shape[1]] = top, idx
    return scores, rows


@torch.inference_mode()
def greedy_decode(
    model: DSIModel,
    images: torch.Tensor,
    codec: IDCodec,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Unconstrained greedy decoding: the most likely token at every step, trie or not -> (Q, max_length) int64.

    The decoder may emit any token of the vocabulary, so the result need not be an ID (see
    ``parse_decoded``); it shows what the trie of :func:`beam_search` prevents. As in
    training, the decoder reads PAD after an EOS. Decoding is incremental, as in
    :func:`beam_search` (one beam per query). Results are on the CPU.
    """
    model.check_codec(codec)
    images = torch.as_tensor(images)
    device = _resolve(model, device)
    out = torch.empty(images.shape[0], codec.max_length, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], batch_size):
            decoder = model.incremental_decoder(model.encode(images[start : start + batch_size].to(device)))
            token = torch.full((decoder.B, 1), codec.bos, dtype=torch.long, device=device)  # (B, 1) last token read
            for t in range(codec.max_length):
                best = decoder.step(token)[:, 0].argmax(dim=-1)  # (B,)
                out[start : start + len(best), t] = best.cpu()
                token = best.masked_fill(best == codec.eos, codec.pad)[:, None]  # what the decoder reads after EOS
    finally:
        model.train(was_training)
    return out


def parse_decoded(codec: IDCodec, tokens: Any) -> np.ndarray:
    """Database rows (Q,) of decoded token sequences (Q, L); -1 where a sequence is not an ID.

    A sequence is an ID when its tokens up to the first EOS are content tokens (no BOS or PAD
    before EOS) that spell a code of ``codec``. A sequence without EOS is not an ID.
    """
    tokens = np.asarray(tokens)
    rows = np.full(len(tokens), -1, dtype=np.int64)
    for q, sequence in enumerate(tokens.tolist()):
        if codec.eos not in sequence:
            continue
        content = sequence[: sequence.index(codec.eos)]
        if all(t < codec.base for t in content):
            rows[q] = codec.lookup(content)
    return rows


def invalid_id_rates(
    model: DSIModel, codec: IDCodec, images: Any, *, k: int = 10, batch_size: int = 64
) -> dict[str, float]:
    """How often decoding yields a token sequence that is not an ID, for query images (Q, H, W, 3) uint8.

    ``beam``: the share of the top-``k`` entries of the trie-constrained beam search that reach
    a finite score and yet map to no database row. The trie allows only existing IDs, so this
    is 0 by construction; it is measured so that a broken trie would show. ``greedy``: the share
    of queries whose *unconstrained* greedy decoding is not an ID: what the trie prevents.
    """
    import torch

    images = torch.as_tensor(np.asarray(images))
    scores, rows = beam_search(model, images, codec, k=min(k, len(codec)), batch_size=batch_size)
    finite = torch.isfinite(scores)
    bad = finite & ((rows < 0) | (rows >= len(codec)))
    beam = float(bad.sum()) / max(int(finite.sum()), 1)
    free = parse_decoded(codec, greedy_decode(model, images, codec, batch_size=batch_size).numpy())
    return {"beam": beam, "greedy": float((free < 0).mean()) if len(free) else 0.0}
