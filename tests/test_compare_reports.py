"""scripts/compare_reports.py: timing columns are ignored, moved metrics are named with their intervals."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_reports.py"
spec = importlib.util.spec_from_file_location("compare_reports", SCRIPT)
compare_reports = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_reports)

ROWS = pd.DataFrame(
    {
        "model": ["BoVW", "DSI zero-shot"],
        "n": [512, 512],
        "metric": ["mAP@10", "mAP@10"],
        "value": [0.10, 0.20],
        "ci_low": [0.05, 0.15],
        "ci_high": [0.15, 0.25],
        "fit_s": [1.0, 2.0],
    }
)


def report(root: Path, frame: pd.DataFrame, name: str = "table1.csv") -> Path:
    (root / "tables").mkdir(parents=True)
    frame.to_csv(root / "tables" / name, index=False)
    return root


def test_identical_tables_pass_whatever_their_timings(tmp_path, capsys):
    a = report(tmp_path / "a", ROWS)
    b = report(tmp_path / "b", ROWS.assign(fit_s=[9.0, 9.0]))
    assert compare_reports.main([str(a), str(b)]) == 0
    assert "1 of 1 tables identical" in capsys.readouterr().out


def test_a_moved_metric_is_named_with_both_intervals(tmp_path, capsys):
    a = report(tmp_path / "a", ROWS)
    inside = ROWS.copy()
    inside.loc[1, "value"] = 0.21
    b = report(tmp_path / "b", inside)
    assert compare_reports.main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "model=DSI zero-shot, n=512, metric=mAP@10" in out
    assert "each value inside the other interval" in out

    outside = ROWS.copy()
    outside.loc[0, ["value", "ci_low", "ci_high"]] = [0.5, 0.45, 0.55]
    c = report(tmp_path / "c", outside)
    assert compare_reports.main([str(a), str(c)]) == 1
    assert "OUTSIDE the other interval" in capsys.readouterr().out


def test_missing_tables_and_folders_are_reported(tmp_path, capsys):
    a = report(tmp_path / "a", ROWS)
    b = report(tmp_path / "b", ROWS, name="other.csv")
    assert compare_reports.main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "table1.csv: only in first" in out and "other.csv: only in second" in out
    assert compare_reports.main([str(a), str(tmp_path / "nowhere")]) == 2


@pytest.mark.parametrize("column", ["fit_s", "search_ms_per_query", "seconds", "train_s", "s_per_epoch"])
def test_timing_columns_are_recognised(column):
    assert compare_reports.timing_columns(pd.DataFrame(columns=[column, "value", "n_s_queries"])) == [column]
