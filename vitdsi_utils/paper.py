"""The numbers the paper reported (its Table 1), kept as data so every report can show them beside ours.

Caveat carried into every report: the paper's "MAP@10" is the mean P@10 over 10 randomly drawn
queries and its "Recall@100" the mean R@100 over 10 queries; its decoder also padded short
result lists with nearby IDs. Compare them with our ``paper protocol`` rows like for like.
"""
from __future__ import annotations

import pandas as pd

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
