"""The target checks of docs/protocol.md section 4 on hand-made result tables with known verdicts."""

import pandas as pd
import pytest

from vitdsi_utils.studies.targets import beats_baseline, gap_table, summarise, zero_shot_memorisation


def row(model, ids, n, metric, value, low=None, high=None, seed=0):
    return {
        "model": model,
        "ids": ids,
        "n": n,
        "seed": seed,
        "metric": metric,
        "value": value,
        "ci_low": value if low is None else low,
        "ci_high": value if high is None else high,
    }


def table(rows):
    return pd.DataFrame(rows)


def test_zero_shot_memorisation_threshold_is_inclusive():
    t = table(
        [
            row("DSI zero-shot", "clustered", 512, "IA@1", 0.99),
            row("DSI zero-shot", "random", 512, "IA@1", 0.9899),
            row("DSI fine-tuned", "random", 512, "IA@1", 1.0),
        ]
    )
    out = zero_shot_memorisation(t)
    assert list(out["ids"]) == ["clustered", "random"]  # only the zero-shot model
    assert list(out["met"]) == [True, False]


def bovw(n, map_, p10):
    return [row("BoVW", "-", n, "mAP@10", *map_), row("BoVW", "-", n, "P@10", *p10)]


def test_beats_baseline_needs_disjoint_intervals_on_both_metrics_and_ia():
    rows = bovw(512, (0.06, 0.04, 0.09), (0.14, 0.10, 0.18))
    # A: above on both, IA ok -> met
    rows += [
        row("A", "clustered", 512, "IA@1", 0.96),
        row("A", "clustered", 512, "mAP@10", 0.24, 0.10, 0.36),
        row("A", "clustered", 512, "P@10", 0.29, 0.181, 0.41),
    ]
    # B: P@10 interval touches the baseline's upper end -> overlap -> not met
    rows += [
        row("B", "clustered", 512, "IA@1", 0.99),
        row("B", "clustered", 512, "mAP@10", 0.3, 0.2, 0.4),
        row("B", "clustered", 512, "P@10", 0.3, 0.18, 0.4),
    ]
    # C: better on both but forgot the index
    rows += [
        row("C", "clustered", 512, "IA@1", 0.94),
        row("C", "clustered", 512, "mAP@10", 0.3, 0.2, 0.4),
        row("C", "clustered", 512, "P@10", 0.3, 0.2, 0.4),
    ]
    # D: worse
    rows += [
        row("D", "random", 512, "IA@1", 1.0),
        row("D", "random", 512, "mAP@10", 0.01, 0.0, 0.03),
        row("D", "random", 512, "P@10", 0.05, 0.02, 0.08),
    ]
    out = beats_baseline(table(rows)).set_index("model")
    assert out.loc["A", "met"] and not out.loc["B", "met"] and not out.loc["C", "met"] and not out.loc["D", "met"]
    assert out.loc["B", "P@10 verdict"] == "overlap" and out.loc["B", "mAP@10 verdict"] == "better"
    assert out.loc["D", "mAP@10 verdict"] == "worse"
    assert out.loc["A", "BoVW P@10 high"] == pytest.approx(0.18)


def test_beats_baseline_every_n_in_summary():
    rows = bovw(512, (0.06, 0.04, 0.09), (0.14, 0.10, 0.18)) + bovw(1024, (0.09, 0.06, 0.13), (0.17, 0.14, 0.21))
    for n, low in ((512, 0.2), (1024, 0.1)):  # at 1024 the P@10 interval reaches into BoVW's
        rows += [
            row("A", "clustered", n, "IA@1", 0.97),
            row("A", "clustered", n, "mAP@10", 0.3, 0.2, 0.4),
            row("A", "clustered", n, "P@10", 0.3, low, 0.4),
        ]
    per_db = beats_baseline(table(rows))
    summary = summarise(per_db)
    assert summary.loc[0, "n_databases"] == 2 and summary.loc[0, "met_at"] == 1
    assert not summary.loc[0, "met_everywhere"]
    assert summary.loc[0, "Ns"] == "512, 1024"


def test_summarise_reads_the_gap_table_of_target_4():

    rows = []
    for metric, ref, sem in (("IA@1", 1.0, 0.99), ("mAP@10", 0.25, 0.23)):
        rows += [
            row("DSI", "clustered", 512, metric, ref),
            row("DSI", "semantic", 512, metric, sem),
            row("DSI", "clustered", 1024, metric, ref),
            row("DSI", "semantic", 1024, metric, sem - 0.1),
        ]
    gaps = gap_table(table(rows), metrics=("IA@1", "mAP@10"))
    summary = summarise(gaps, column="within_target").iloc[0]
    assert summary["met_at"] == 1 and not summary["met_everywhere"]
    with pytest.raises(ValueError, match="no 'met' column"):
        summarise(gaps)


def test_missing_columns_and_repeated_rows_are_refused():
    with pytest.raises(ValueError, match="lacks the columns"):
        beats_baseline(pd.DataFrame({"model": ["A"], "metric": ["IA@1"], "value": [1.0]}))
    rows = [row("A", "clustered", 512, "IA@1", 1.0)] * 2
    with pytest.raises(ValueError, match="more than once"):
        zero_shot_memorisation(table([dict(r, model="DSI zero-shot") for r in rows]))
