"""Figures that are read, not only written: what a reader needs to tell the series apart."""

from __future__ import annotations

import pandas as pd

from vitdsi_utils.reports.plots import metric_vs_n


def _rows(model: str, ids: str, metric: str, values: list[float]) -> list[dict]:
    return [
        {
            "model": model,
            "ids": ids,
            "n": n,
            "seed": 0,
            "metric": metric,
            "value": v,
            "ci_low": v - 0.05,
            "ci_high": v + 0.05,
            "chance": 0.1,
        }
        for n, v in zip((512, 1024), values)
    ]


def test_metric_vs_n_legend_names_series_missing_from_the_first_panel():
    results = pd.DataFrame(
        _rows("DSI multi-task", "atomic", "IA@1", [0.95, 0.97])
        + _rows("DSI multi-task", "atomic", "P@10", [0.26, 0.32])
        + _rows("BoVW", "-", "P@10", [0.15, 0.18])  # BoVW has no IA@1, the first panel
    )
    fig = metric_vs_n(results, ("IA@1", "P@10"), title="t")
    legend = fig.axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["DSI multi-task, atomic", "BoVW"]
    assert fig.axes[1].get_legend() is None  # one legend for the figure
