"""scripts/compare_ci_times.py: the header numbers and per-file sums of two CI logs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_ci_times.py"
spec = importlib.util.spec_from_file_location("compare_ci_times", SCRIPT)
compare_ci_times = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_ci_times)

OLD = """environment ready in 170 s
.venv/bin/python -m pytest -q
============================== slowest durations ===============================
236.56s call     tests/test_study.py::test_smoke_study_end_to_end
2.50s setup    tests/test_study.py::test_smoke_study_end_to_end
1.00s call     tests/test_bovw.py::test_fit[histogram]
0.50s call     tests/test_bovw.py::test_fit[vlad]

(3 durations < 0.005s hidden.  Use -vv to show these durations.)
483 passed, 38 warnings in 646.22s (0:10:46)
CI finished in 820 s
"""

NEW = """environment ready in 171 s
============================= slowest durations ==============================
200.00s call     tests/test_study.py::test_smoke_study_end_to_end
3.00s call     tests/test_bovw.py::test_fit[histogram]
0.001s call     tests/test_bovw.py::test_tiny
90.00s call     tests/test_paper_dry_run.py::test_paper_dry_run_end_to_end
850 passed, 2 skipped, 1 warning in 835.60s (0:13:55)
CI finished in 1009 s
"""


def logs(tmp_path):
    (tmp_path / "old.log").write_text(OLD)
    (tmp_path / "new.log").write_text(NEW)
    return tmp_path / "old.log", tmp_path / "new.log"


def test_headers_and_per_file_sums(tmp_path):
    old, new = logs(tmp_path)
    header, durations = compare_ci_times.read_log(old)
    assert header == {"environment": 170, "total": 820, "tests": 646.22, "passed": 483, "skipped": 0}
    assert compare_ci_times.read_log(new)[0]["skipped"] == 2
    table = compare_ci_times.per_file(durations, compare_ci_times.read_log(new)[1])
    study = table.loc["tests/test_study.py"]
    assert study["first_s"] == pytest.approx(239.06) and study["second_s"] == pytest.approx(200.0)
    assert study["first_tests"] == study["second_tests"] == 1  # setup and call of one test
    assert table.loc["tests/test_bovw.py", "second_tests"] == 1  # the 1 ms line counts in neither run
    assert table.index[0] == "tests/test_paper_dry_run.py"  # the largest increase first


def test_markdown_marks_files_only_one_run_has(tmp_path, capsys):
    old, new = logs(tmp_path)
    out = tmp_path / "ci.md"
    assert compare_ci_times.main([str(old), str(new), "--names", "before", "after", "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    assert "| CI wall time, s | 820 | 1,009 |" in text
    assert "| `tests/test_paper_dry_run.py` (only here) | 0.0 | 0 | 90.0 | 1 | +90.0 |" in text


def test_a_log_without_durations_says_how_to_get_them(tmp_path):
    path = tmp_path / "plain.log"
    path.write_text("483 passed in 646.22s\n")
    with pytest.raises(SystemExit, match="--durations=0"):
        compare_ci_times.read_log(path)
