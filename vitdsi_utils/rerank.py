"""Two-stage retrieval: a fast first stage proposes candidates, a stronger scorer re-orders the best M.

The set-up of LightningDOT (seed 004 of the study): embeddings of the database are computed
offline, a cheap search returns a candidate list, and a slower, better model re-scores only
the first ``M`` candidates instead of the whole database. Here the first stage is any
searcher of the toolkit (BoVW, DSI beam search, dense search: anything with
``search(images, k) -> (scores, rows)``), and the re-scorer compares vectors: the dense
encoder's cosine similarity (or BoVW's histograms, the other way round).

:func:`rerank` is the operation itself. :func:`rerank_study` measures it: for every first
stage and every depth ``M`` it scores the re-ranked lists with the study's metrics (mAP@10,
P@10, R@100 with intervals and chance) and the time per query of both stages together.
:func:`tradeoff_figure` draws quality against time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd

PAD = -1  #: "no candidate at this rank", as in metrics

__all__ = ["rerank", "cosine_scores", "VectorScorer", "rerank_study", "rerank_markdown", "summary", "tradeoff_figure", "Searcher"]


class Searcher(Protocol):
    """A first stage: top-k database rows (and scores) for uint8 query images (Q, S, S, 3)."""

    def search(self, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ...


def _check_candidates(candidates: np.ndarray) -> np.ndarray:
    candidates = np.asarray(candidates)
    if candidates.ndim != 2 or not np.issubdtype(candidates.dtype, np.integer):
        raise ValueError(f"candidates must be a 2-D integer array (queries, ranks), got {candidates.dtype} "
                         f"{candidates.shape}")
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
    depth = width if depth is None else min(_positive(depth, "depth"), width)
    k = width if k is None else min(_positive(k, "k"), width)
    head_rows, head_scores = candidates[:, :depth], scores[:, :depth]
    # empty ranks sort last: -inf for the sort, NaN for the caller
    key = np.where(head_rows == PAD, -np.inf, head_scores)
    order = np.argsort(-key, axis=1, kind="stable")  # stable: ties keep the first stage's order
    rows = np.concatenate([np.take_along_axis(head_rows, order, axis=1), candidates[:, depth:]], axis=1)
    out_scores = np.full((n_queries, width), np.nan)
    out_scores[:, :depth] = np.where(np.take_along_axis(head_rows, order, axis=1) == PAD, np.nan,
                                     np.take_along_axis(head_scores, order, axis=1))
    # an empty rank inside the head moved to the head's end; close the gap before the tail
    rows, out_scores = _left_pack(rows, out_scores)
    return out_scores[:, :k], rows[:, :k]


def _left_pack(rows: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move the -1 entries of each row to its end, keeping the order of the others."""
    order = np.argsort(rows == PAD, axis=1, kind="stable")
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


def _positive(value: Any, name: str) -> int:
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
        raise ValueError(f"query vectors {query_vectors.shape} must be (Q={len(candidates)}, "
                         f"D={database_vectors.shape[1]})")
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
    def from_dense(cls, retriever: Any, name: str = "dense") -> "VectorScorer":
        """Cosine similarity of a :class:`dense.DenseRetriever`'s embeddings (its database must be indexed)."""
        return cls(name, retriever.transform, retriever.database_vectors)

    @classmethod
    def from_bovw(cls, bovw: Any, name: str = "BoVW") -> "VectorScorer":
        """Cosine similarity of a fitted :class:`bovw.BoVW`'s word histograms."""
        return cls(name, bovw.transform, bovw.index_)

    def search(self, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exhaustive search with this scorer alone: (scores (Q, k'), rows (Q, k')), k' = min(k, n_db)."""
        vectors = np.asarray(self.encode(images), dtype=np.float32)
        similarity = vectors @ np.asarray(self.database, dtype=np.float32).T
        order = np.argsort(-similarity, axis=1, kind="stable")[:, : min(_positive(k, "k"), len(self.database))]
        return np.take_along_axis(similarity, order, axis=1), order


def _timed(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def rerank_study(
    first_stages: Mapping[str, Searcher],
    scorer: VectorScorer,
    query_images: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    *,
    depths: Sequence[int] = (10, 50, 100),
    k: int = 100,
    seed: int = 0,
    include_alone: bool = True,
) -> pd.DataFrame:
    """Quality and time per query of every first stage re-ranked by ``scorer`` to every depth M.

    For each first stage: its own top-``k`` lists (``depth`` 0), then for each M in ``depths``
    its top-``max(M, k)`` candidates with the first M re-ordered by the scorer, cut to ``k``.
    With ``include_alone`` one more row group scores the ``scorer`` alone over the whole
    database (``first_stage`` "-", ``depth`` = the database size). Time per query is the wall time of the whole batch of
    queries divided by their number: the first stage's search for that many candidates, plus
    encoding the queries with the scorer and re-ordering. Returns the long table of
    :func:`evaluation.retrieval_metrics` rows (mAP@10, P@10, R@100 and the paper protocol) with
    columns ``first_stage``, ``reranker``, ``depth``, ``candidates``, ``first_stage_ms``,
    ``rerank_ms`` and ``ms_per_query``.
    """
    from .evaluation import retrieval_metrics

    n_queries, n_db = len(query_images), len(database_labels)
    if n_queries == 0:
        raise ValueError("the re-ranking study needs at least one query")
    depths = sorted({min(_positive(m, "depth"), n_db) for m in depths})
    k = min(_positive(k, "k"), n_db)
    frames = []

    def add(ranked: np.ndarray, first_stage: str, reranker: str, depth: int, candidates: int,
            first_s: float, rerank_s: float) -> None:
        table = retrieval_metrics(ranked, query_labels, database_labels, seed=seed)
        frames.append(table.assign(
            first_stage=first_stage, reranker=reranker, depth=depth, candidates=candidates,
            first_stage_ms=1000 * first_s / n_queries, rerank_ms=1000 * rerank_s / n_queries,
            ms_per_query=1000 * (first_s + rerank_s) / n_queries,
        ))

    # one query through every model first, so that no timing below includes one-off start-up costs
    scorer.encode(query_images[:1])
    for searcher in first_stages.values():
        searcher.search(query_images[:1], k)
    if include_alone:
        (_, alone), alone_s = _timed(lambda: scorer.search(query_images, k))
        add(alone, "-", scorer.name, n_db, n_db, 0.0, alone_s)
    for name, searcher in first_stages.items():
        runs: dict[int, tuple[np.ndarray, float]] = {}
        for width in sorted({k} | {max(m, k) for m in depths}):
            (_, rows), seconds = _timed(lambda: searcher.search(query_images, width))
            runs[width] = (np.asarray(rows), seconds)
        rows, seconds = runs[k]
        add(rows[:, :k], name, "-", 0, k, seconds, 0.0)
        for m in depths:
            rows, seconds = runs[max(m, k)]

            def second_stage(rows=rows, m=m):
                head = rows[:, :m]
                scores = np.full(rows.shape, np.nan)
                scores[:, :m] = cosine_scores(head, scorer.encode(query_images), scorer.database)
                return rerank(rows, scores, depth=m, k=k)[1]

            ranked, rerank_s = _timed(second_stage)
            add(ranked, name, scorer.name, m, rows.shape[1], seconds, rerank_s)
    if not frames:
        raise ValueError("nothing to measure: no first stage, and include_alone=False")
    return pd.concat(frames, ignore_index=True)


def _series(study: pd.DataFrame) -> pd.Series:
    """A label per row: the first stage, with its ID scheme where it has one."""
    ids = study["ids"] if "ids" in study.columns else pd.Series("-", index=study.index)
    return study["first_stage"].where(ids == "-", study["first_stage"] + ", " + ids.astype(str) + " IDs")


def tradeoff_figure(
    study: pd.DataFrame, metric: str = "mAP@10", *, by: str | None = "n", title: str | None = None
):
    """Quality (``metric`` with 95% intervals) against time per query (log scale), one panel per ``by``.

    Colour is the first stage (a line joins its points), marker shape the re-ranking depth M
    (a circle: the first stage alone); the re-scorer searching the whole database is a black
    star; the dotted line is chance. ``by`` makes one panel per value of that column (e.g.
    database size ``n``); None draws a single panel.
    """
    import matplotlib.pyplot as plt

    from .plots import _new_figure

    rows = study[study["metric"] == metric]
    if rows.empty:
        raise ValueError(f"the study has no {metric!r} rows; it has {sorted(study['metric'].unique())}")
    panels = sorted(rows[by].unique()) if by is not None and by in rows.columns else [None]
    series_names = [s for s in dict.fromkeys(_series(rows)) if s != "-"]
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(series_names)}
    depths = sorted(d for d in rows.loc[_series(rows) != "-", "depth"].unique() if d > 0)
    markers = {0: "o", **{d: m for d, m in zip(depths, "s^Dvp<>h")}}
    fig, axes = _new_figure(1, len(panels), (4.4 * len(panels), 3.9))
    for ax, panel in zip(axes[0], panels):
        part = rows if panel is None else rows[rows[by] == panel]
        for series, line in part.groupby(_series(part), sort=False):
            line = line.sort_values("depth")
            if series == "-":
                ax.errorbar(line["ms_per_query"], line["value"],
                            yerr=[line["value"] - line["ci_low"], line["ci_high"] - line["value"]],
                            marker="*", ms=12, ls="", capsize=3, color="k")
                continue
            ax.plot(line["ms_per_query"], line["value"], "-", color=colors[series], alpha=0.6, lw=1)
            for point in line.itertuples():
                ax.errorbar(point.ms_per_query, point.value, yerr=[[point.value - point.ci_low],
                            [point.ci_high - point.value]], marker=markers.get(point.depth, "x"), ms=5,
                            capsize=2, elinewidth=0.8, color=colors[series])
        ax.axhline(part["chance"].iloc[0], color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("time per query (ms, batched)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3, which="both")
        if panel is not None:
            ax.set_title(f"{by} = {panel}")
    reranker = rows.loc[rows["reranker"] != "-", "reranker"]
    name = reranker.iloc[0] if len(reranker) else "re-scorer"
    handles = [plt.Line2D([], [], color=colors[s], lw=2) for s in series_names]
    labels = [f"{s} \u2192 {name}" for s in series_names]
    handles += [plt.Line2D([], [], color="k", marker="*", ms=10, ls=""), plt.Line2D([], [], color="k", ls=":")]
    labels += [f"{name} alone (whole database)", "chance"]
    handles += [plt.Line2D([], [], color="grey", marker=markers[d], ls="") for d in [0, *depths]]
    labels += ["first stage alone (M = 0)", *[f"M = {d}" for d in depths]]
    fig.legend(handles, labels, loc="lower center", ncols=3, fontsize=7, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title or f"Re-ranking: {metric} against time per query")
    fig.tight_layout(rect=(0, 0.05 + 0.035 * ((len(labels) + 2) // 3), 1, 1))
    return fig


def summary(study: pd.DataFrame, metrics: Iterable[str] = ("mAP@10", "P@10", "R@100")) -> pd.DataFrame:
    """One row per (first stage, re-ranker, depth[, n]): the metric values and ms per query, wide."""
    keys = [c for c in ("n", "ids", "first_stage", "reranker", "depth") if c in study.columns]
    rows = study[study["metric"].isin(list(metrics))]
    wide = rows.pivot_table(index=keys, columns="metric", values="value", sort=False)
    times = rows.groupby(keys, sort=False)[["first_stage_ms", "rerank_ms", "ms_per_query"]].first()
    table = wide.join(times).reset_index()
    order = [c for c in ("n", "ids", "first_stage", "depth") if c in table.columns]
    return table.sort_values(order, kind="stable").reset_index(drop=True)


def rerank_markdown(study: pd.DataFrame, source: str, size: int) -> str:
    """The re-ranking study as Markdown: one row per (N, first stage, M) with intervals and times."""
    from .tables import format_interval, format_number

    lines = [
        f"# Re-ranking on {source} at {size} px",
        "",
        "A first stage returns its top-100 candidates (its top-M when M > 100); the dense encoder re-scores "
        "the first M by cosine similarity and re-orders them, the rest keep their place. `M = 0` is the first "
        "stage alone; `dense alone` searches the whole database with the dense encoder. Values over all test "
        "queries with bootstrap 95% intervals. Time per query: wall time of the batch of test queries divided "
        "by their number (first stage + re-ranking, which includes embedding the queries). A DSI first stage is "
        "the model found in the run folder; its `M = 0` row is that model's own score.",
        "",
        "| N | first stage | IDs | M | mAP@10 | P@10 | R@100 | first stage ms | re-rank ms | total ms/query |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = [c for c in ("n", "seed") if c in study.columns]
    study = study.assign(_series=_series(study), _ids=study["ids"] if "ids" in study.columns else "-")
    groups = study.groupby(keys + ["_series", "depth"], sort=False)
    for _, group in groups:
        row = group.set_index("metric")
        first = group.iloc[0]

        def cell(metric: str) -> str:
            if metric not in row.index:
                return "–"
            return format_interval(row.at[metric, "value"], row.at[metric, "ci_low"], row.at[metric, "ci_high"])

        name = f"{first['reranker']} alone" if first["first_stage"] == "-" else first["first_stage"]
        depth = "all" if first["first_stage"] == "-" else int(first["depth"])
        lines.append(
            f"| {first.get('n', '–')} | {name} | {first['_ids']} | {depth} | {cell('mAP@10')} | {cell('P@10')} "
            f"| {cell('R@100')} | {format_number(first['first_stage_ms'], 1)} | {format_number(first['rerank_ms'], 1)} "
            f"| {format_number(first['ms_per_query'], 1)} |"
        )
    return "\n".join(lines)
