"""Retrieval metrics: precision, recall, mAP and indexing accuracy at k, their chance levels,
bootstrap confidence intervals, and the (non-standard) protocol of the original paper.

Conventions
-----------
A model answers query ``q`` with a ranked list of distinct database row indices. A batch of
answers is an int array ``ranked`` of shape ``(Q, K)``; ``-1`` means "no result at this rank",
so a model that returns fewer than ``K`` results pads the *end* of its row with ``-1``. Padded
ranks count as non-relevant, and ``P@k`` still divides by ``k``: returning nothing is not
rewarded. Relevance is a boolean matrix ``relevant`` of shape ``(Q, n_db)``. ``label_relevance``
builds it from labels: the same class for single-label data (ImageNet), at least one shared label
for multi-label data (COCO: a database image is relevant when it shows an object category the
query shows). R@k and AP@k divide by ``|R|``, the number of relevant items of *that* relevance.

With ``L`` the ranked list of a query, ``R`` its relevant set and ``rel(i)`` whether rank ``i``
(1-based) is relevant:

* ``P@k  = |L[:k] ∩ R| / k``
* ``R@k  = |L[:k] ∩ R| / |R|``
* ``AP@k = sum_{i<=k} P@i * rel(i) / min(|R|, k)``, and ``mAP@k`` is its mean over queries
* ``IA@k`` (indexing accuracy): every indexed image is used as a query, and scores 1 if its
  own row index appears in ``L[:k]``.

A query without any relevant item has no meaningful recall or AP: ``R@k`` and ``AP@k`` are NaN
for it. Aggregates (``evaluate_ranking``) drop those queries and say how many were dropped.
``P@k`` of such a query is simply 0.

Everything is vectorised over queries; the only Python loops run over the short list of ``k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import numpy as np
import pandas as pd

#: Columns of the tables returned by ``evaluate_ranking`` and ``evaluate_indexing``.
#: ``n_queries`` counts the queries that entered the value; ``n_ignored`` those left out
#: because the metric is undefined for them (no relevant item); ``uninformative`` marks a metric
#: that a random ranking scores as well (see :func:`is_uninformative`).
RESULT_COLUMNS = ("metric", "value", "ci_low", "ci_high", "chance", "n_queries", "n_ignored", "uninformative")


#: A metric whose chance level reaches this carries no information about the ranking: e.g. R@k or
#: IA@k with k at least the number of indexed images (every indexed image is returned).
UNINFORMATIVE_CHANCE = 0.999


def is_uninformative(chance: float) -> bool:
    """Whether a metric with this chance level says nothing about a ranking (a random one scores >= 0.999)."""
    return bool(chance is not None and not np.isnan(chance) and chance >= UNINFORMATIVE_CHANCE)


PAD = -1  #: marks "no result at this rank" in a ranking


def _check_k(k: Any) -> int:
    # bool is an Integral in Python, and k=True is almost certainly a bug
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _check_ranked(ranked: np.ndarray, n_db: int | None = None) -> np.ndarray:
    """Validate a (Q, K) ranking; return it as an int array. Errors name the first bad query."""
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be 2-D (queries, ranks), got shape {ranked.shape}")
    if ranked.size == 0:
        return ranked.astype(np.int64)
    if not np.issubdtype(ranked.dtype, np.integer):
        raise ValueError(f"ranked must hold integer row indices, got dtype {ranked.dtype}")

    bad = ranked < PAD
    if n_db is not None:
        bad |= ranked >= n_db
    if bad.any():
        q = int(np.flatnonzero(bad.any(axis=1))[0])
        value = int(ranked[q][bad[q]][0])
        upper = "n_db" if n_db is None else n_db
        raise ValueError(f"ranked: query {q} has index {value} outside [-1, {upper})")

    # A real index after a -1 would make "rank" ambiguous (is rank 3 the third result or the
    # third slot?), and it usually means a bug in the decoder that produced the ranking.
    pad = ranked == PAD
    gap = pad[:, :-1] & ~pad[:, 1:]
    if gap.any():
        q = int(np.flatnonzero(gap.any(axis=1))[0])
        raise ValueError(f"ranked: query {q} has a result after a -1; results must be left-packed")

    # Sorting each row puts duplicates next to each other; -1 padding may repeat freely.
    srt = np.sort(ranked, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] != PAD)
    if dup.any():
        q = int(np.flatnonzero(dup.any(axis=1))[0])
        value = int(srt[q, 1:][dup[q]][0])
        raise ValueError(f"ranked: query {q} returns index {value} more than once")
    return ranked


def _check_hits(hits: np.ndarray) -> np.ndarray:
    hits = np.asarray(hits)
    if hits.ndim != 2:
        raise ValueError(f"hits must be 2-D (queries, ranks), got shape {hits.shape}")
    if hits.dtype != bool:
        raise ValueError(f"hits must be a boolean array, got dtype {hits.dtype}")
    return hits


def _check_n_relevant(n_relevant: Any, hits: np.ndarray | None = None) -> np.ndarray:
    n_rel = np.asarray(n_relevant)
    if hits is not None:
        n_rel = np.broadcast_to(n_rel, (hits.shape[0],))
    else:
        n_rel = np.atleast_1d(n_rel)
    if n_rel.ndim != 1:
        raise ValueError(f"n_relevant must be a scalar or 1-D, got shape {n_rel.shape}")
    if n_rel.size and (np.any(n_rel < 0) or np.any(n_rel != np.round(n_rel))):
        raise ValueError("n_relevant must hold non-negative integers")
    # More hits than relevant items means n_relevant and hits disagree (wrong order, wrong
    # relevance matrix); better to fail than to report a recall above 1.
    if hits is not None and hits.size and np.any(hits.sum(axis=1) > n_rel):
        q = int(np.flatnonzero(hits.sum(axis=1) > n_rel)[0])
        raise ValueError(f"query {q} has more hits than relevant items ({int(n_rel[q])})")
    return n_rel.astype(np.float64)


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without a RuntimeWarning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def relevance_matrix(ranked: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Return hits (Q, K) bool: whether ``ranked[q, i]`` is relevant to query q (False for -1)."""
    relevant = np.asarray(relevant)
    if relevant.ndim != 2 or relevant.dtype != bool:
        raise ValueError(f"relevant must be a 2-D boolean (queries, n_db) array, got {relevant.dtype} {relevant.shape}")
    ranked = _check_ranked(ranked, n_db=relevant.shape[1])
    if ranked.shape[0] != relevant.shape[0]:
        raise ValueError(f"ranked has {ranked.shape[0]} queries but relevant has {relevant.shape[0]} rows")
    if ranked.shape[1] == 0 or relevant.shape[1] == 0:
        return np.zeros(ranked.shape, dtype=bool)
    # -1 would index the last column, so look up a dummy column and mask it out afterwards
    looked_up = np.take_along_axis(relevant, np.maximum(ranked, 0), axis=1)
    return looked_up & (ranked != PAD)


def precision_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """Return P@k per query, (Q,) float; ranks beyond hits.shape[1] count as misses."""
    hits = _check_hits(hits)
    k = _check_k(k)
    return hits[:, :k].sum(axis=1) / k


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Return R@k per query, (Q,) float; NaN for queries with no relevant item."""
    hits = _check_hits(hits)
    n_rel = _check_n_relevant(n_relevant, hits)
    k = _check_k(k)
    found = hits[:, :k].sum(axis=1).astype(np.float64)
    return np.divide(found, n_rel, out=np.full(found.shape, np.nan), where=n_rel > 0)


def average_precision_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Return AP@k per query, (Q,) float; NaN for queries with no relevant item."""
    hits = _check_hits(hits)
    n_rel = _check_n_relevant(n_relevant, hits)
    k = _check_k(k)
    top = hits[:, :k]
    ranks = np.arange(1, top.shape[1] + 1)
    precision_at_i = np.cumsum(top, axis=1) / ranks
    # P@i only counts at the ranks that are hits
    total = (precision_at_i * top).sum(axis=1)
    # min(|R|, k) rather than |R|: a perfect top-k list scores 1 even when |R| > k
    denom = np.minimum(n_rel, k)
    return np.divide(total, denom, out=np.full(total.shape, np.nan), where=n_rel > 0)


def indexing_accuracy_at_k(ranked: np.ndarray, targets: np.ndarray, k: int, *, n_db: int | None = None) -> np.ndarray:
    """Return IA@k per query, (Q,) float 0/1: whether ``targets[q]`` is among ``ranked[q, :k]``."""
    ranked = _check_ranked(ranked, n_db=n_db)
    k = _check_k(k)
    targets = np.asarray(targets)
    wrong_dtype = targets.size > 0 and not np.issubdtype(targets.dtype, np.integer)
    if targets.shape != (ranked.shape[0],) or wrong_dtype:
        raise ValueError(f"targets must be ({ranked.shape[0]},) ints, got {targets.dtype} {targets.shape}")
    if targets.size and (targets.min() < 0 or (n_db is not None and targets.max() >= n_db)):
        raise ValueError("targets must be database row indices in [0, n_db)")
    # -1 padding never equals a valid target, so no masking is needed
    return (ranked[:, :k] == targets[:, None]).any(axis=1).astype(np.float64)


def _check_chance_args(n_relevant: Any, n_db: int, k: int) -> tuple[np.ndarray, int, int]:
    if isinstance(n_db, bool) or not isinstance(n_db, Integral) or n_db < 1:
        raise ValueError(f"n_db must be a positive integer, got {n_db!r}")
    k = _check_k(k)
    n_rel = _check_n_relevant(n_relevant)
    if n_rel.size and n_rel.max() > n_db:
        raise ValueError(f"n_relevant cannot exceed n_db = {n_db}")
    return n_rel, int(n_db), k


def chance_precision_at_k(n_relevant: np.ndarray | int, n_db: int, k: int) -> float:
    """Return the expected P@k of a random ranking, averaged over queries (float)."""
    n_rel, n, k = _check_chance_args(n_relevant, n_db, k)
    # only min(k, n) ranks can be filled, each relevant with probability r/n
    return _nanmean(n_rel * min(k, n) / (n * k))


def chance_recall_at_k(n_relevant: np.ndarray | int, n_db: int, k: int) -> float:
    """Return the expected R@k of a random ranking, averaged over queries with |R| > 0 (float)."""
    n_rel, n, k = _check_chance_args(n_relevant, n_db, k)
    per_query = np.where(n_rel > 0, min(k, n) / n, np.nan)
    return _nanmean(per_query)


def chance_average_precision_at_k(n_relevant: np.ndarray | int, n_db: int, k: int) -> float:
    """Return the expected AP@k of a random ranking, averaged over queries with |R| > 0 (float)."""
    n_rel, n, k = _check_chance_args(n_relevant, n_db, k)
    m = min(k, n)  # ranks that exist
    # E[P@i rel(i)] = (1/i) E[rel(i) * hits in top i]
    #               = (1/i) [r/n + (i-1) r(r-1) / (n(n-1))]
    # (rank i relevant, plus each of the i-1 ranks above it relevant given that).
    # Summing over i = 1..m: sum 1/i = H_m and sum (i-1)/i = m - H_m.
    harmonic = float(np.sum(1.0 / np.arange(1, m + 1)))
    pair = n_rel * (n_rel - 1) / (n * (n - 1)) if n > 1 else np.zeros_like(n_rel)
    expected_sum = n_rel / n * harmonic + pair * (m - harmonic)
    denom = np.minimum(n_rel, k)
    per_query = np.divide(expected_sum, denom, out=np.full(n_rel.shape, np.nan), where=n_rel > 0)
    return _nanmean(per_query)


def chance_indexing_accuracy_at_k(n_db: int, k: int) -> float:
    """Return the expected IA@k of a random ranking (float): min(k, n_db) / n_db."""
    _, n, k = _check_chance_args(0, n_db, k)
    return min(k, n) / n


def bootstrap_ci(
    values: np.ndarray, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Return the (low, high) percentile bootstrap interval of the mean over queries; NaNs dropped."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    # one (B, Q) draw: each row is a resample of the queries with replacement
    idx = rng.integers(0, values.size, size=(n_resamples, values.size))
    means = values[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _draw_query_subsets(n_total: int, n_queries: int, n_draws: int, seed: int) -> np.ndarray:
    """Return (n_draws, m) query indices, each row m distinct queries, m = min(n_queries, n_total)."""
    m = min(n_queries, n_total)
    rng = np.random.default_rng(seed)
    keys = rng.random((n_draws, n_total))
    if m == n_total:
        return np.argsort(keys, axis=1)
    # the m smallest of n iid uniform keys are a uniform subset drawn without replacement
    return np.argpartition(keys, m - 1, axis=1)[:, :m]


def _row_nanmeans(values: np.ndarray) -> np.ndarray:
    valid = ~np.isnan(values)
    count = valid.sum(axis=1)
    total = np.where(valid, values, 0.0).sum(axis=1)
    return np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)


def _std_over_draws(means: np.ndarray) -> float:
    means = means[~np.isnan(means)]
    return float(means.std(ddof=1)) if means.size > 1 else float("nan")


def paper_protocol(
    hits: np.ndarray, n_relevant: np.ndarray, *, n_queries: int = 10, seed: int = 0, n_draws: int = 1000
) -> dict[str, float]:
    """Return the paper's small-sample "MAP@10" (mean P@10) and "Recall@100", with their spread.

    NOTE: the paper's "MAP@10" is *not* mean average precision. It is the mean P@10 over
    ``n_queries`` randomly drawn queries (10 in the paper), and its "Recall@100" is the mean
    R@100 over the same few queries. This function reproduces that protocol so that numbers can
    be compared with the paper; use ``average_precision_at_k`` / ``evaluate_ranking`` for mAP.

    Queries are drawn without replacement (all queries if fewer than ``n_queries`` exist).
    ``paper_map@10`` and ``paper_recall@100`` come from the first of ``n_draws`` seeded draws;
    the ``*_std`` entries are the standard deviation (ddof=1) of the same estimate across all
    ``n_draws`` draws, i.e. how much the paper's number moves with the choice of 10 queries.
    Queries without relevant items are skipped in the recall average of a draw. If ``hits`` has
    fewer than 100 columns, the missing ranks count as misses.

    Returns a dict with keys ``paper_map@10``, ``paper_recall@100``, ``paper_map@10_std``,
    ``paper_recall@100_std`` (floats).
    """
    return _paper_protocol(hits, n_relevant, n_queries=n_queries, seed=seed, n_draws=n_draws)[0]


def _paper_protocol(
    hits: np.ndarray, n_relevant: np.ndarray, *, n_queries: int, seed: int, n_draws: int
) -> tuple[dict[str, float], np.ndarray]:
    """``paper_protocol``'s dict, plus the query indices of the reported (first) draw.

    The dict also carries the 2.5 and 97.5 percentiles of each estimate over the draws
    (``*_p2.5`` / ``*_p97.5``): the range the paper's number could land in by query choice alone.
    """
    hits = _check_hits(hits)
    return _paper_protocol_of(
        precision_at_k(hits, 10), recall_at_k(hits, n_relevant, 100), n_queries=n_queries, seed=seed, n_draws=n_draws
    )


def _paper_protocol_of(
    p10: np.ndarray, r100: np.ndarray, *, n_queries: int, seed: int, n_draws: int
) -> tuple[dict[str, float], np.ndarray]:
    """:func:`_paper_protocol` from per-query P@10 and R@100 (NaN: no relevant item)."""
    if n_queries < 1 or n_draws < 1:
        raise ValueError("n_queries and n_draws must be positive")
    keys = ("paper_map@10", "paper_recall@100", "paper_map@10_std", "paper_recall@100_std")
    spread_keys = ("paper_map@10_p2.5", "paper_map@10_p97.5", "paper_recall@100_p2.5", "paper_recall@100_p97.5")
    if p10.shape[0] == 0:
        return dict.fromkeys(keys + spread_keys, float("nan")), np.array([], dtype=np.int64)
    idx = _draw_query_subsets(p10.shape[0], n_queries, n_draws, seed)
    p_means = p10[idx].mean(axis=1)
    r_means = _row_nanmeans(r100[idx])
    values = (p_means[0], r_means[0], _std_over_draws(p_means), _std_over_draws(r_means))
    result = dict(zip(keys, map(float, values)))
    finite_r = r_means[~np.isnan(r_means)]
    spread = (
        *np.percentile(p_means, [2.5, 97.5]),
        *(np.percentile(finite_r, [2.5, 97.5]) if finite_r.size else (np.nan, np.nan)),
    )
    result.update(zip(spread_keys, map(float, spread)))
    return result, idx[0]


def _summary_row(metric: str, per_query: np.ndarray, chance: float, n_resamples: int, seed: int) -> dict:
    n_valid = int(np.count_nonzero(~np.isnan(per_query)))
    low, high = bootstrap_ci(per_query, n_resamples=n_resamples, seed=seed)
    return {
        "metric": metric,
        "value": _nanmean(per_query),
        "ci_low": low,
        "ci_high": high,
        "chance": float(chance),
        "n_queries": n_valid,
        "n_ignored": int(per_query.size - n_valid),
        "uninformative": is_uninformative(chance),
    }


def evaluate_ranking(
    ranked: np.ndarray,
    relevant: np.ndarray,
    *,
    ks_precision: Sequence[int] = (10,),
    ks_recall: Sequence[int] = (100,),
    ks_map: Sequence[int] = (10,),
    n_resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Return a table, one row per metric (P@k, R@k, mAP@k, then the paper protocol), columns RESULT_COLUMNS.

    ``ranked`` is one ranking (Q, k) or a stack of V rankings (V, Q, k) of the same queries, for
    instance from V fits of a baseline with different random seeds. With a stack, every metric
    is first computed per ranking and then averaged per query over the V rankings, so the
    interval is over queries of the seed-averaged score: the ranker's expected quality, not the
    luck of one fit.

    ``value`` is the mean over queries (fractions in [0, 1]); ``ci_low``/``ci_high`` a 95%
    percentile bootstrap interval over queries; ``chance`` the expectation for a random
    ranking; ``n_queries`` the queries averaged and ``n_ignored`` those skipped because they
    have no relevant item (recall and mAP only). The two paper-protocol rows (see
    ``paper_protocol``: its "MAP@10" is mean P@10, not mAP) have NaN intervals and carry the
    chance level of the metric they are computed from.
    """
    relevant = np.asarray(relevant)
    ranked = np.asarray(ranked)
    if ranked.ndim == 3:
        if ranked.shape[0] == 0:
            raise ValueError("a stack of rankings (V, Q, k) needs at least one ranking")
        stack = [relevance_matrix(r, relevant) for r in ranked]
    else:
        stack = [relevance_matrix(ranked, relevant)]
    n_rel = relevant.sum(axis=1)
    n_db = relevant.shape[1]

    def per_query(metric: Any, *args: Any) -> np.ndarray:
        """The metric of every query, averaged over the rankings of the stack."""
        return np.mean([metric(hits, *args) for hits in stack], axis=0)

    # (name, per-query values, chance) for every requested metric
    specs = [(f"P@{k}", per_query(precision_at_k, k), chance_precision_at_k(n_rel, n_db, k)) for k in ks_precision]
    specs += [(f"R@{k}", per_query(recall_at_k, n_rel, k), chance_recall_at_k(n_rel, n_db, k)) for k in ks_recall]
    specs += [
        (f"mAP@{k}", per_query(average_precision_at_k, n_rel, k), chance_average_precision_at_k(n_rel, n_db, k))
        for k in ks_map
    ]
    rows = [_summary_row(name, values, chance, n_resamples, seed) for name, values, chance in specs]

    # The paper's protocol: report its first draw, and how many of the drawn queries entered it.
    # Its "interval" is the 2.5-97.5 percentile range over 1000 draws of 10 queries: where the
    # paper's number could have landed by the choice of queries alone (not a bootstrap CI).
    paper, drawn = _paper_protocol_of(
        per_query(precision_at_k, 10), per_query(recall_at_k, n_rel, 100), n_queries=10, seed=seed, n_draws=1000
    )
    n_recall_valid = int(np.count_nonzero(n_rel[drawn] > 0))
    rows.append(
        {
            "metric": "paper MAP@10 (mean P@10, 10 queries)",
            "value": paper["paper_map@10"],
            "ci_low": paper["paper_map@10_p2.5"],
            "ci_high": paper["paper_map@10_p97.5"],
            "chance": chance_precision_at_k(n_rel, n_db, 10),
            "n_queries": drawn.size,
            "n_ignored": 0,
        }
    )
    rows.append(
        {
            "metric": "paper R@100 (10 queries)",
            "value": paper["paper_recall@100"],
            "ci_low": paper["paper_recall@100_p2.5"],
            "ci_high": paper["paper_recall@100_p97.5"],
            "chance": chance_recall_at_k(n_rel, n_db, 100),
            "n_queries": n_recall_valid,
            "n_ignored": drawn.size - n_recall_valid,
        }
    )
    for row in rows[-2:]:
        row["uninformative"] = is_uninformative(row["chance"])
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def evaluate_indexing(
    ranked: np.ndarray,
    targets: np.ndarray,
    *,
    ks: Sequence[int] = (1, 5),
    n_resamples: int = 1000,
    seed: int = 0,
    n_db: int | None = None,
) -> pd.DataFrame:
    """Return a table with one row per IA@k (columns RESULT_COLUMNS).

    ``n_db`` is the size of the indexed database, used for range checks and the chance level;
    by default every indexed image is a query, so ``n_db`` is the number of queries.
    ``ranked`` is one ranking (n, k) or a stack (S, n, k) of several models' rankings of the same
    images; a stack is averaged per image over S before the bootstrap, as in :func:`evaluate_ranking`.
    """
    ranked = np.asarray(ranked)
    stack = ranked if ranked.ndim == 3 else ranked[None]
    if stack.shape[0] == 0:
        raise ValueError("a stack of rankings (S, n, k) needs at least one ranking")
    if n_db is None:
        n_db = stack.shape[1]
    rows = [
        _summary_row(
            f"IA@{k}",
            np.mean([indexing_accuracy_at_k(r, targets, k, n_db=n_db) for r in stack], axis=0),
            chance_indexing_accuracy_at_k(n_db, k),
            n_resamples,
            seed,
        )
        for k in ks
    ]
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
