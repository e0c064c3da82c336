"""Two CI runs side by side: wall time, and where the test time went, file by file.

Each run is the log of ``.ci/run`` with pytest's per-test durations switched on, for example for
the commit before a change and the commit after it, in fresh clones, one after the other on one
machine::

    git clone . /tmp/ci-a && git -C /tmp/ci-a checkout OLD
    (cd /tmp/ci-a && CI=true PYTEST_ADDOPTS=--durations=0 bash .ci/run) > old.log 2>&1
    git clone . /tmp/ci-b
    (cd /tmp/ci-b && CI=true PYTEST_ADDOPTS=--durations=0 bash .ci/run) > new.log 2>&1
    .venv/bin/python scripts/compare_ci_times.py old.log new.log --out reports/benchmarks/ci_time.md

The table sums the durations pytest reports (setup, call and teardown; those under 5 ms are
hidden by pytest unless ``-vv`` and are left out of both runs) per test file, so a file that only one run has stands out. With
pytest-xdist the sum is CPU-side work spread over the workers, more than the wall time of the
tests; the header lines give both.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

#: A line of pytest's ``--durations`` report: "12.34s call     tests/test_x.py::test_y[param]".
DURATION = re.compile(r"^(\d+(?:\.\d+)?)s (setup|call|teardown)\s+(\S+?)::(\S+)")
SUMMARY = re.compile(r"(\d+) passed(?:, (\d+) skipped)?.* in (\d+(?:\.\d+)?)s")
STAMPS = {"environment": re.compile(r"environment ready in (\d+) s"), "total": re.compile(r"CI finished in (\d+) s")}


def read_log(path: Path) -> tuple[dict[str, float | None], pd.DataFrame]:
    """(header numbers, one row per reported duration) of one ``.ci/run`` log."""
    text = Path(path).read_text(errors="replace")
    header: dict[str, float | None] = {name: None for name in (*STAMPS, "tests", "passed", "skipped")}
    for name, pattern in STAMPS.items():
        found = pattern.findall(text)
        header[name] = float(found[-1]) if found else None
    summaries = SUMMARY.findall(text)
    if summaries:
        passed, skipped, seconds = summaries[-1]
        header.update(passed=int(passed), skipped=int(skipped or 0), tests=float(seconds))
    rows = [
        {"seconds": float(m[1]), "phase": m[2], "file": m[3], "test": m[4]}
        for m in map(DURATION.match, text.splitlines())
        if m and float(m[1]) >= 0.005  # pytest hides shorter ones unless -vv: count neither
    ]
    if not rows:
        raise SystemExit(f"{path}: no per-test durations; run pytest with --durations=0 (PYTEST_ADDOPTS)")
    return header, pd.DataFrame(rows)


def per_file(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """Seconds and test counts per file in both runs, largest change first."""
    frames = []
    for label, frame in (("first", first), ("second", second)):
        grouped = frame.groupby("file").agg(s=("seconds", "sum"), tests=("test", "nunique"))
        frames.append(grouped.add_prefix(f"{label}_"))
    table = pd.concat(frames, axis=1).fillna(0)
    table["change_s"] = table["second_s"] - table["first_s"]
    return table.sort_values("change_s", ascending=False)


def markdown(names: tuple[str, str], headers: tuple[dict, dict], table: pd.DataFrame) -> str:
    def number(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = [
        "| | " + " | ".join(names) + " |",
        "|---|---:|---:|",
        *(
            f"| {label} | " + " | ".join(number(h[key]) for h in headers) + " |"
            for key, label in (
                ("total", "CI wall time, s"),
                ("environment", "environment, s"),
                ("tests", "tests wall time, s"),
                ("passed", "tests passed"),
                ("skipped", "tests skipped"),
            )
        ),
        "| sum of test durations, s | " + " | ".join(number(table[f"{c}_s"].sum()) for c in ("first", "second")) + " |",
        "",
        f"| test file | {names[0]}, s | tests >= 5 ms | {names[1]}, s | tests >= 5 ms | change, s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for file, row in table.iterrows():
        only = " (only here)" if row["first_tests"] == 0 else (" (gone)" if row["second_tests"] == 0 else "")
        lines.append(
            f"| `{file}`{only} | {row['first_s']:.1f} | {int(row['first_tests'])} | {row['second_s']:.1f} | "
            f"{int(row['second_tests'])} | {row['change_s']:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("first", type=Path, help="log of the first run (.ci/run with --durations=0)")
    parser.add_argument("second", type=Path, help="log of the second run")
    parser.add_argument("--names", nargs=2, default=("first", "second"), help="column labels of the two runs")
    parser.add_argument("--out", type=Path, help="also write the tables here (Markdown)")
    args = parser.parse_args(argv)
    (h1, d1), (h2, d2) = read_log(args.first), read_log(args.second)
    text = markdown(tuple(args.names), (h1, h2), per_file(d1, d2))
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
