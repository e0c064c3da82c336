"""Two-stage retrieval: a fast first stage proposes candidates, a stronger scorer re-orders the best M.

The set-up of LightningDOT (listed in ``docs/protocol.md``): embeddings of the database are computed
offline, a cheap search returns a candidate list, and a slower, better model re-scores only
the first ``M`` candidates instead of the whole database. Here the first stage is any
searcher of the toolkit (BoVW, DSI beam search, dense search: anything with
``search(images, k) -> (scores, rows)``), and the re-scorer compares vectors: the dense
encoder's cosine similarity (or BoVW's histograms, the other way round).

:func:`rerank` is the operation itself; :mod:`vitdsi_utils.studies.rerank` measures it for every
first stage and depth ``M`` (metrics with intervals and chance, and the time per query).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Protocol

import numpy as np

PAD = -1  #: "no candidate at this rank", as in metrics


class Searcher(Protocol):
    """A first stage: top-k database rows (and scores) for uint8 query images (Q, S, S, 3)."""

    def search(self, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def _check_candidates(candidates: np.ndarray) -> np.ndarray:
    candidates = np.asarray(candidates)
    if candidates.ndim != 2 or not np.issubdtype(candidates.dtype, np.integer):
        raise ValueError(
            f"candidates must be a 2-D integer array (queries, ranks), got {candidates.dtype} {candidates.shape}"
        )
    if candidates.size and candidates.min() < PAD:
        raise ValueError("candidates hold database rows >= 0, or -1 for an empty rank")
    return candidates.astype(np.int64, copy=False)


def rerank(
    candidates: np.ndarray, scores: np.ndarray, depth: int | None = None, k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Re-order the first ``depth`` candidates of each query by ``scores`` (higher first); keep the rest.

    ``candidates`` (Q, C) are ranked first-stage lists of database rows (``-1`` marks an empty
    rank); ``scores`` (Q, C) are the re-scorer's scores of those same entries. The first
    ``depth`` entries (default: all C) are sorted by descending score, ties kept in
    first-stage order; the entries after them follow unchanged, so the result is a
    permutation of each candidate list, and empty ranks stay last. The list is cut to ``k``
    (default C). Returns (scores (Q, k), rows (Q, k)): the re-scorer's score of a re-ranked
    entry, NaN for the unchanged tail and for empty ranks.
    """
    candidates = _check_candidates(candidates)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != candidates.shape:
        raise ValueError(f"scores {scores.shape} must have the shape of candidates {candidates.shape}")
    n_queries, width = candidates.shape
    depth = width if depth is None else min(positive_int(depth, "depth"), width)
    k = width if k is None else min(positive_int(k, "k"), width)
    head_rows, head_scores = candidates[:, :depth], scores[:, :depth]
    # empty ranks sort last: -inf for the sort, NaN for the caller
    key = np.where(head_rows == PAD, -np.inf, head_scores)
    order = np.argsort(-key, axis=1, kind="stable")  # stable: ties keep the first stage's order
    rows = np.concatenate([np.take_along_axis(head_rows, order, axis=1), candidates[:, depth:]], axis=1)
    out_scores = np.full((n_queries, width), np.nan)
    out_scores[:, :depth] = np.where(
        np.take_along_axis(head_rows, order, axis=1) == PAD, np.nan, np.take_along_axis(head_scores, order, axis=1)
    )
    # an empty rank inside the head moved to the head's end; close the gap before the tail
    rows, out_scores = _left_pack(rows, out_scores)
    return out_scores[:, :k], rows[:, :k]


def _left_pack(rows: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move the -1 entries of each row to its end, keeping the order of the others."""
    order = np.argsort(rows == PAD, axis=1, kind="stable")
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def cosine_scores(candidates: np.ndarray, query_vectors: np.ndarray, database_vectors: np.ndarray) -> np.ndarray:
    """Inner products (Q, C) of each query vector (Q, D) with its candidates' database vectors (n_db, D).

    With unit vectors this is the cosine similarity. Empty ranks (-1) score -inf.
    """
    candidates = _check_candidates(candidates)
    query_vectors = np.asarray(query_vectors, dtype=np.float32)
    database_vectors = np.asarray(database_vectors, dtype=np.float32)
    if query_vectors.shape != (len(candidates), database_vectors.shape[1]):
        raise ValueError(
            f"query vectors {query_vectors.shape} must be (Q={len(candidates)}, D={database_vectors.shape[1]})"
        )
    if candidates.size and candidates.max() >= len(database_vectors):
        raise ValueError(f"a candidate row exceeds the {len(database_vectors)} database vectors")
    gathered = database_vectors[np.maximum(candidates, 0)]  # (Q, C, D)
    scores = np.einsum("qcd,qd->qc", gathered, query_vectors).astype(np.float64)
    return np.where(candidates == PAD, -np.inf, scores)


@dataclass
class VectorScorer:
    """A re-scorer that compares vectors: ``encode`` maps query images to vectors, ``database`` holds the rows'.

    :meth:`from_dense` and :meth:`from_bovw` build one from a fitted model whose database is
    indexed; ``name`` labels it in tables.
    """

    name: str
    encode: Callable[[np.ndarray], np.ndarray]
    database: np.ndarray

    @classmethod
    def from_dense(cls, retriever: Any, name: str = "dense") -> VectorScorer:
        """Cosine similarity of a :class:`dense.DenseRetriever`'s embeddings (its database must be indexed)."""
        return cls(name, retriever.transform, retriever.database_vectors)

    @classmethod
    def from_bovw(cls, bovw: Any, name: str = "BoVW") -> VectorScorer:
        """Cosine similarity of a fitted :class:`bovw.BoVW`'s word histograms."""
        return cls(name, bovw.transform, bovw.index_)

    def search(self, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exhaustive search with this scorer alone: (scores (Q, k'), rows (Q, k')), k' = min(k, n_db)."""
        vectors = np.asarray(self.encode(images), dtype=np.float32)
        similarity = vectors @ np.asarray(self.database, dtype=np.float32).T
        order = np.argsort(-similarity, axis=1, kind="stable")[:, : min(positive_int(k, "k"), len(self.database))]
        return np.take_along_axis(similarity, order, axis=1), order
