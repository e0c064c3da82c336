"""Turn a trained DSI model into a ranked list of database rows per query image.

* :func:`beam_search` - constrained beam search over the prefix trie of the existing IDs,
  batched over queries and beams (the paper's retrieval).
* :func:`score_all_ids` / :func:`rank_exhaustive` - the exact log-probability of every ID by
  teacher forcing: the upper bound a beam search can reach, and its test oracle.
* :func:`greedy_decode` - free decoding without the trie, to measure how often the model on its
  own writes a token sequence that is not an ID.

Scores are sequence log-probabilities: the sum of the log-probabilities of the content tokens
and EOS (PAD after EOS costs nothing). Results come back on the CPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vitdsi_utils.ids.codec import IDCodec, PrefixTrie
from vitdsi_utils.model.vit import DSIModel

NEG_INF = float("-inf")


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


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


def _beam_batch(
    model: DSIModel, images: torch.Tensor, codec: IDCodec, trie: PrefixTrie, widths: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search for one query batch -> (scores, rows), each (B, widths[-1]), best first."""
    B, V = images.shape[0], codec.vocab_size
    memory = model.encode(images)  # (B, P, D)
    scores = torch.zeros(B, 1, device=images.device)  # (B, W): one live beam per query at the root
    nodes = torch.zeros(B, 1, dtype=torch.long, device=images.device)  # (B, W) trie node of each beam
    prefix = torch.full((B, 1, 1), codec.bos, dtype=torch.long, device=images.device)  # (B, W, t+1)
    for t in range(codec.max_length):
        W = scores.shape[1]
        mem = memory.repeat_interleave(W, dim=0) if W > 1 else memory  # (B*W, P, D)
        logits = model.decode(mem, prefix.view(B * W, t + 1))[:, -1]  # (B*W, V)
        logp = logits.float().log_softmax(dim=-1).view(B, W, V)
        child = trie.next_node[nodes]  # (B, W, V), -1 where the token leaves the trie
        finished = (trie.row[nodes] >= 0)[..., None]  # (B, W, 1): terminal nodes only allow PAD
        logp = torch.where(finished, torch.zeros_like(logp), logp).masked_fill(child < 0, NEG_INF)
        candidates = (scores[..., None] + logp).view(B, W * V)  # (B, W*V)
        scores, flat = candidates.topk(widths[t + 1], dim=1)  # (B, W'), sorted descending
        # a pick with score -inf is a dead placeholder (fewer valid hypotheses than beams); park it at the root
        nodes = child.view(B, W * V).gather(1, flat).clamp_min(0)  # (B, W')
        if t + 1 < codec.max_length:
            token = flat % V
            # the decoder was trained to read PAD, not EOS, after an ID ends (codec.decoder_inputs)
            token = token.masked_fill(token == codec.eos, codec.pad)
            parent = (flat // V)[..., None].expand(-1, -1, t + 1)  # (B, W', t+1)
            prefix = torch.cat([prefix.gather(1, parent), token[..., None]], dim=2)  # (B, W', t+2)
    rows = trie.row[nodes]  # (B, W)
    alive = torch.isfinite(scores)
    if bool((rows[alive] < 0).any()):
        raise RuntimeError("beam search ended on an unfinished ID; codec.max_length is too short")
    return scores, rows.masked_fill(~alive, -1)


@torch.inference_mode()
def beam_search(
    model: DSIModel,
    images: torch.Tensor,
    codec: IDCodec,
    *,
    k: int = 10,
    beam_size: int | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    amp: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k distinct valid IDs per query image: uint8 (Q, H, W, 3) -> (scores (Q, k) float32, rows (Q, k) int64).

    Scores are sequence log-probabilities, descending per query. Decoding is constrained by
    ``codec.trie``, so every row exists and none repeats. Where fewer than k IDs reach a finite
    score, the remaining entries are row -1 and score -inf. ``beam_size`` (default k, at least
    k) hypotheses are kept per step; ``batch_size`` queries are decoded together, which costs
    about ``batch_size * beam_size * P * D`` floats of repeated encoder memory. ``amp`` runs the
    model in bf16 on CUDA (faster, slightly different scores). ``progress`` shows a bar over the
    query batches (for long runs, e.g. IA@1 of a whole large database). Results are on the CPU.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    beam_size = k if beam_size is None else beam_size
    if beam_size < k:
        raise ValueError(f"beam_size ({beam_size}) must be at least k ({k})")
    model.check_codec(codec)
    images = torch.as_tensor(images)
    device = _resolve(model, device)
    trie = codec.trie.to(device)
    widths = beam_widths(trie, codec.max_length, beam_size)
    Q = images.shape[0]
    scores = torch.full((Q, k), NEG_INF, dtype=torch.float32)
    rows = torch.full((Q, k), -1, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with _autocast(device, amp):
            starts = range(0, Q, batch_size)
            for start in tqdm(starts, desc="beam search", unit="batch", disable=not progress or len(starts) < 2):
                batch = images[start : start + batch_size].to(device, non_blocking=True)
                s, r = _beam_batch(model, batch, codec, trie, widths)
                n = min(k, s.shape[1])
                scores[start : start + len(batch), :n] = s[:, :n].float().cpu()
                rows[start : start + len(batch), :n] = r[:, :n].cpu()
    finally:
        model.train(was_training)
    return scores, rows


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
    """
    if device is not None:
        model.to(device)
    images = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    rows = torch.arange(len(images)) if rows is None else torch.as_tensor(rows)
    _, found = beam_search(model, images, codec, k=1, beam_size=beam_size, batch_size=batch_size, device=device,
                           progress=progress)
    return float((found[:, 0] == rows).float().mean())


@torch.inference_mode()
def score_all_ids(
    model: DSIModel,
    images: torch.Tensor,
    codec: IDCodec,
    *,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
    amp: bool = False,
) -> torch.Tensor:
    """Exact log-probability of every ID for every query: uint8 (Q, H, W, 3) -> (Q, n_ids) float32 on CPU.

    Each query is encoded once; its memory is then paired with chunks of IDs, at most
    ``batch_size`` (query, ID) pairs per decoder pass, each scored in one teacher-forced pass.
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
        with _autocast(device, amp):
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
    training, the decoder reads PAD after an EOS. Results are on the CPU.
    """
    model.check_codec(codec)
    images = torch.as_tensor(images)
    device = _resolve(model, device)
    out = torch.empty(images.shape[0], codec.max_length, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], batch_size):
            memory = model.encode(images[start : start + batch_size].to(device))  # (B, P, D)
            prefix = torch.full((memory.shape[0], 1), codec.bos, dtype=torch.long, device=device)  # (B, 1)
            for t in range(codec.max_length):
                token = model.decode(memory, prefix)[:, -1].argmax(dim=-1)  # (B,)
                out[start : start + len(token), t] = token.cpu()
                fed = token.masked_fill(token == codec.eos, codec.pad)  # what the decoder reads after EOS
                prefix = torch.cat([prefix, fed[:, None]], dim=1)  # (B, t + 2)
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
