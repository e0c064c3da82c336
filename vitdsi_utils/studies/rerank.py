"""The re-ranking study: how far re-scoring the first M candidates of each first stage moves its metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from vitdsi_utils.evaluation import retrieval_metrics
from vitdsi_utils.reports.plots import new_figure
from vitdsi_utils.reports.tables import format_number, metric_cell, with_uninformative_note
from vitdsi_utils.retrieval.rerank import Searcher, VectorScorer, cosine_scores, positive_int, rerank


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
    kind: str | None = None,
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
    encoding the queries with the scorer and re-ordering. ``kind`` says what the labels are
    (:func:`~vitdsi_utils.data.relevance.label_relevance`). Returns the long table of
    :func:`evaluation.retrieval_metrics` rows (mAP@10, P@10, R@100 and the paper protocol) with
    columns ``first_stage``, ``reranker``, ``depth``, ``candidates``, ``first_stage_ms``,
    ``rerank_ms`` and ``ms_per_query``.
    """

    n_queries, n_db = len(query_images), len(database_labels)
    if n_queries == 0:
        raise ValueError("the re-ranking study needs at least one query")
    depths = sorted({min(positive_int(m, "depth"), n_db) for m in depths})
    k = min(positive_int(k, "k"), n_db)
    frames = []

    def add(
        ranked: np.ndarray,
        first_stage: str,
        reranker: str,
        depth: int,
        candidates: int,
        first_s: float,
        rerank_s: float,
    ) -> None:
        table = retrieval_metrics(ranked, query_labels, database_labels, kind=kind, seed=seed)
        frames.append(
            table.assign(
                first_stage=first_stage,
                reranker=reranker,
                depth=depth,
                candidates=candidates,
                first_stage_ms=1000 * first_s / n_queries,
                rerank_ms=1000 * rerank_s / n_queries,
                ms_per_query=1000 * (first_s + rerank_s) / n_queries,
            )
        )

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
            (_, rows), seconds = _timed(lambda searcher=searcher, width=width: searcher.search(query_images, width))
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


def tradeoff_figure(study: pd.DataFrame, metric: str = "mAP@10", *, by: str | None = "n", title: str | None = None):
    """Quality (``metric`` with 95% intervals) against time per query (log scale), one panel per ``by``.

    Colour is the first stage (a line joins its points), marker shape the re-ranking depth M
    (a circle: the first stage alone); the re-scorer searching the whole database is a black
    star; the dotted line is chance. ``by`` makes one panel per value of that column (e.g.
    database size ``n``); None draws a single panel.
    """
    import matplotlib.pyplot as plt

    rows = study[study["metric"] == metric]
    if rows.empty:
        raise ValueError(f"the study has no {metric!r} rows; it has {sorted(study['metric'].unique())}")
    panels = sorted(rows[by].unique()) if by is not None and by in rows.columns else [None]
    series_names = [s for s in dict.fromkeys(_series(rows)) if s != "-"]
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(series_names)}
    depths = sorted(d for d in rows.loc[_series(rows) != "-", "depth"].unique() if d > 0)
    markers = {0: "o", **{d: m for d, m in zip(depths, "s^Dvp<>h")}}
    fig, axes = new_figure(1, len(panels), (4.4 * len(panels), 3.9))
    for ax, panel in zip(axes[0], panels):
        part = rows if panel is None else rows[rows[by] == panel]
        for series, line in part.groupby(_series(part), sort=False):
            line = line.sort_values("depth")
            if series == "-":
                ax.errorbar(
                    line["ms_per_query"],
                    line["value"],
                    yerr=[line["value"] - line["ci_low"], line["ci_high"] - line["value"]],
                    marker="*",
                    ms=12,
                    ls="",
                    capsize=3,
                    color="k",
                )
                continue
            ax.plot(line["ms_per_query"], line["value"], "-", color=colors[series], alpha=0.6, lw=1)
            for point in line.itertuples():
                ax.errorbar(
                    point.ms_per_query,
                    point.value,
                    yerr=[[point.value - point.ci_low], [point.ci_high - point.value]],
                    marker=markers.get(point.depth, "x"),
                    ms=5,
                    capsize=2,
                    elinewidth=0.8,
                    color=colors[series],
                )
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

        def cell(metric: str, row: pd.DataFrame = row) -> str:
            return metric_cell(row.loc[metric]) if metric in row.index else "–"

        name = f"{first['reranker']} alone" if first["first_stage"] == "-" else first["first_stage"]
        depth = "all" if first["first_stage"] == "-" else int(first["depth"])
        lines.append(
            f"| {first.get('n', '–')} | {name} | {first['_ids']} | {depth} | {cell('mAP@10')} | {cell('P@10')} "
            f"| {cell('R@100')} | {format_number(first['first_stage_ms'], 1)} | {format_number(first['rerank_ms'], 1)} "
            f"| {format_number(first['ms_per_query'], 1)} |"
        )
    return with_uninformative_note("\n".join(lines))
