"""The numbers the paper reported (its Table 1), kept as data so every report can show them beside ours.

Caveat carried into every report: the paper's "MAP@10" is the mean P@10 over 10 randomly drawn
queries and its "Recall@100" the mean R@100 over 10 queries; its decoder also padded short
result lists with nearby IDs. Compare them with our ``paper protocol`` rows like for like.
"""

from __future__ import annotations

import pandas as pd

from vitdsi_utils.reports.tables import (
    BOVW_MODEL,
    VLAD_MODEL,
    format_number,
    metric_cell,
    with_uninformative_note,
)

NAN = float("nan")


#: (model, N, IDs, IA@1, IA@5, MAP@10, R@100) exactly as printed in the paper.
_TABLE1 = [
    ("BoVW", 512, "-", NAN, NAN, 0.58, 0.875),
    ("BoVW", 1024, "-", NAN, NAN, 0.50, 0.825),
    ("BoVW", 2048, "-", NAN, NAN, 0.42, 0.78),
    ("DSI fine-tuned", 512, "clustered", 0.415, 0.566, 0.32, 0.58),
    ("DSI fine-tuned", 512, "random", 0.402, 0.472, 0.21, 0.365),
    ("DSI fine-tuned", 1024, "clustered", 0.378, 0.404, 0.28, 0.38),
    ("DSI fine-tuned", 1024, "random", 0.266, 0.30, 0.18, 0.265),
    ("DSI fine-tuned", 2048, "clustered", 0.305, 0.333, 0.17, 0.22),
    ("DSI fine-tuned", 2048, "random", 0.233, 0.275, 0.07, 0.135),
    ("DSI zero-shot", 512, "clustered", 0.833, 0.962, 0.18, 0.275),
    ("DSI zero-shot", 512, "random", 0.794, 0.871, 0.10, 0.23),
    ("DSI zero-shot", 1024, "clustered", 0.763, 0.828, 0.12, 0.21),
    ("DSI zero-shot", 1024, "random", 0.725, 0.766, 0.07, 0.175),
    ("DSI zero-shot", 2048, "clustered", 0.678, 0.774, 0.10, 0.195),
    ("DSI zero-shot", 2048, "random", 0.533, 0.719, 0.06, 0.16),
]


def paper_table1() -> pd.DataFrame:
    """The paper's Table 1 in long form: columns model, n, ids, metric, paper."""
    wide = pd.DataFrame(_TABLE1, columns=["model", "n", "ids", "IA@1", "IA@5", "MAP@10", "R@100"])
    long = wide.melt(id_vars=["model", "n", "ids"], var_name="metric", value_name="paper")
    return long.dropna(subset=["paper"]).reset_index(drop=True)


def paper_value(model: str, n: int, ids: str, metric: str) -> float:
    """One number of the paper's Table 1 (NaN when the paper has none)."""
    table = paper_table1()
    hit = table[(table.model == model) & (table.n == n) & (table.ids == ids) & (table.metric == metric)]
    return float(hit["paper"].iloc[0]) if len(hit) else NAN


#: Our metric names -> the paper's column they are compared with. The paper's "MAP@10" and
#: "R@100" used its 10-query protocol, so they sit beside our paper-protocol rows; our
#: all-query mAP@10 and R@100 are shown next to them for what they are.
PAPER_METRIC = {
    "IA@1": "IA@1",
    "IA@5": "IA@5",
    "paper MAP@10 (mean P@10, 10 queries)": "MAP@10",  # = PROTOCOL_MAP
    "paper R@100 (10 queries)": "R@100",  # = PROTOCOL_RECALL
}


#: Sources the paper's Table 1 does not describe: its numbers are ImageNet's, so they are not put
#: beside results on these (the paper printed no COCO table; a folder holds one's own images).
NOT_IN_PAPER_TABLE1 = frozenset({"coco", "folder"})


def attach_paper(results: pd.DataFrame) -> pd.DataFrame:
    """Add a ``paper`` column: the paper's number for the same model, N, IDs and metric (else NaN).

    Rows whose ``source`` is in :data:`NOT_IN_PAPER_TABLE1` (COCO, a folder) get NaN: the paper's Table 1
    was measured on ImageNet. A ``paper`` column already there is replaced, so attaching twice is
    the same as attaching once.
    """
    paper = paper_table1().rename(columns={"metric": "paper_metric"})
    results = results.drop(columns="paper", errors="ignore")
    keyed = results.assign(paper_metric=results["metric"].map(PAPER_METRIC))
    merged = keyed.merge(paper, on=["model", "n", "ids", "paper_metric"], how="left")
    if "source" in merged.columns:
        merged.loc[merged["source"].isin(NOT_IN_PAPER_TABLE1), "paper"] = float("nan")
    return merged.drop(columns="paper_metric")


PROTOCOL_MAP, PROTOCOL_RECALL = "paper MAP@10 (mean P@10, 10 queries)", "paper R@100 (10 queries)"


TABLE1_NOTE = (
    "Our values are over **all test queries** (IA: all indexed images), with bootstrap 95% intervals in "
    "brackets; `chance` is the exact expectation of a random ranking. The paper's MAP@10 and R@100 were the "
    "mean P@10 and R@100 over 10 random queries; our `protocol` columns repeat that protocol (10 seeded "
    "queries), and their brackets give the 2.5-97.5% range of that estimate over 1000 draws of 10 queries: "
    "where the paper's number could land by the choice of queries alone."
)


def table1_markdown(results: pd.DataFrame) -> str:
    """Table 1 as Markdown: one row per (model, N, IDs, seed), ours with intervals beside the paper's numbers."""
    header = (
        "| model | N | IDs | seed | IA@1 | paper IA@1 | IA@5 | paper IA@5 | mAP@10 | P@10 | R@100 "
        "| protocol MAP@10 | paper MAP@10 | protocol R@100 | paper R@100 | chance P@10 | chance R@100 |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    order = {BOVW_MODEL: 0, VLAD_MODEL: 0.5, "DSI zero-shot": 1, "DSI fine-tuned": 2, "DSI multi-task": 3}
    keys = results[["model", "n", "ids", "seed"]].drop_duplicates()
    keys = keys.assign(_o=keys["model"].map(order).fillna(9)).sort_values(["_o", "n", "ids", "seed"])
    for model, n, ids, seed in keys[["model", "n", "ids", "seed"]].itertuples(index=False):
        group = results[(results.model == model) & (results.n == n) & (results.ids == ids) & (results.seed == seed)]
        row = group.set_index("metric")

        def cell(metric: str, row: pd.DataFrame = row) -> str:
            return metric_cell(row.loc[metric]) if metric in row.index else "–"

        def number(metric: str, column: str, row: pd.DataFrame = row) -> str:
            return format_number(row.at[metric, column]) if metric in row.index and column in row.columns else "–"

        lines.append(
            f"| {model} | {n} | {ids} | {seed} | {cell('IA@1')} | {number('IA@1', 'paper')} | {cell('IA@5')} "
            f"| {number('IA@5', 'paper')} | {cell('mAP@10')} | {cell('P@10')} | {cell('R@100')} "
            f"| {cell(PROTOCOL_MAP)} | {number(PROTOCOL_MAP, 'paper')} | {cell(PROTOCOL_RECALL)} "
            f"| {number(PROTOCOL_RECALL, 'paper')} | {number('P@10', 'chance')} | {number('R@100', 'chance')} |"
        )
    return with_uninformative_note("\n".join(lines))
