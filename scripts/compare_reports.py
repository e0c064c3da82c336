"""Compare the result tables of two report folders, timing columns aside.

A refactor proves itself by tables that do not move. This script reads every ``tables/*.csv`` of
two report folders (for example ``reports/cpu`` before and after a change), drops the columns
that measure time, and compares the rest cell by cell:

    python scripts/compare_reports.py reports/cpu /tmp/clone/reports/cpu

For a table with ``value``, ``ci_low`` and ``ci_high`` columns (one metric per row), every row
whose value moved is printed with both intervals, and with whether each value lies inside the
other run's interval. The exit status is 0 when every table is identical, 1 when a table differs
or exists on one side only, and 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

#: Columns that measure wall time or speed: they differ between any two runs.
TIMING = re.compile(r"(^|_)(s|ms|seconds|secs|time|wall|latency|ms_per_query|s_per_epoch|per_second|throughput)$")
INTERVAL = ("value", "ci_low", "ci_high")


def timing_columns(frame: pd.DataFrame) -> list[str]:
    """The columns of ``frame`` that hold timings (by name)."""
    return [c for c in frame.columns if TIMING.search(str(c))]


def _same(a: pd.Series, b: pd.Series, atol: float) -> np.ndarray:
    """Element-wise equality that counts NaN == NaN, with an absolute tolerance for numbers."""
    if pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b):
        x, y = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
        return (np.isnan(x) & np.isnan(y)) | (np.abs(x - y) <= atol)
    return (a.isna() & b.isna()).to_numpy() | (a.astype(str) == b.astype(str)).to_numpy()


def compare_table(a: pd.DataFrame, b: pd.DataFrame, atol: float = 0.0) -> list[str]:
    """Differences between two tables as readable lines; empty when they agree."""
    a = a.drop(columns=timing_columns(a))
    b = b.drop(columns=timing_columns(b))
    lines: list[str] = []
    if list(a.columns) != list(b.columns):
        only_a = sorted(set(a.columns) - set(b.columns))
        only_b = sorted(set(b.columns) - set(a.columns))
        lines.append(f"columns differ: only in first {only_a}, only in second {only_b}")
        common = [c for c in a.columns if c in b.columns]
        a, b = a[common], b[common]
    if len(a) != len(b):
        return [*lines, f"row count differs: {len(a)} against {len(b)}"]
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    moved = np.zeros(len(a), dtype=bool)
    for column in a.columns:
        diff = ~_same(a[column], b[column], atol)
        if diff.any():
            moved |= diff
            lines.append(f"column {column!r}: {int(diff.sum())} of {len(a)} rows differ")
    if moved.any() and all(c in a.columns for c in INTERVAL):
        keys = [c for c in ("model", "ids", "n", "seed", "metric", "variant") if c in a.columns]
        for i in np.flatnonzero(moved):
            ra, rb = a.loc[i], b.loc[i]
            inside_b = _inside(ra["value"], rb["ci_low"], rb["ci_high"])
            inside_a = _inside(rb["value"], ra["ci_low"], ra["ci_high"])
            label = ", ".join(f"{k}={ra[k]}" for k in keys)
            lines.append(
                f"  {label}: {_fmt(ra)} -> {_fmt(rb)}; "
                f"{'each value inside the other interval' if inside_a and inside_b else 'OUTSIDE the other interval'}"
            )
    return lines


def _inside(value: float, low: float, high: float) -> bool:
    """Whether ``value`` lies in [low, high] (False when any of them is missing)."""
    try:
        return float(low) <= float(value) <= float(high)
    except (TypeError, ValueError):
        return False


def _fmt(row: pd.Series) -> str:
    return f"{float(row['value']):.4f} [{float(row['ci_low']):.4f}, {float(row['ci_high']):.4f}]"


def compare_folders(first: Path, second: Path, atol: float = 0.0) -> tuple[bool, list[str]]:
    """(identical, report lines) for the ``tables/*.csv`` of two report folders."""
    ta, tb = first / "tables", second / "tables"
    for folder in (ta, tb):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder; pass report folders that hold tables/")
    names_a = {p.name for p in ta.glob("*.csv")}
    names_b = {p.name for p in tb.glob("*.csv")}
    lines: list[str] = []
    identical = True
    for name in sorted(names_a | names_b):
        if name not in names_a or name not in names_b:
            identical = False
            lines.append(f"{name}: only in {'first' if name in names_a else 'second'}")
            continue
        diffs = compare_table(pd.read_csv(ta / name), pd.read_csv(tb / name), atol)
        if diffs:
            identical = False
            lines.append(f"{name}: differs")
            lines.extend(f"  {d}" for d in diffs)
        else:
            lines.append(f"{name}: identical")
    return identical, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="a report folder (holding tables/)")
    parser.add_argument("second", type=Path, help="the report folder to compare it with")
    parser.add_argument("--atol", type=float, default=0.0, help="absolute tolerance for numbers (default 0: exact)")
    args = parser.parse_args(argv)
    try:
        identical, lines = compare_folders(args.first, args.second, args.atol)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    n_tables = sum(1 for line in lines if not line.startswith(" "))
    n_same = sum(1 for line in lines if line.endswith(": identical"))
    print(f"\n{n_same} of {n_tables} tables identical (timing columns aside)")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
