"""The test suite's own order (tests/conftest.py): the files that run whole studies start first."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import conftest

TESTS = Path(__file__).resolve().parent


def test_every_longest_file_exists():
    missing = [name for name in conftest.LONGEST_FILES if not (TESTS / name).is_file()]
    assert not missing, f"tests/conftest.py LONGEST_FILES names files that are gone: {missing}"


def test_longest_files_go_first_and_every_other_order_is_kept():
    def item(file: str, test: str) -> SimpleNamespace:
        return SimpleNamespace(path=TESTS / file, name=test)

    items = [
        item("test_bovw.py", "a"),
        item("test_coco.py", "b"),
        item("test_bovw.py", "c"),
        item("test_paper_dry_run.py", "d"),
        item("test_paper_dry_run.py", "e"),
        item("test_data.py", "f"),
    ]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.name for i in items] == ["d", "e", "b", "a", "c", "f"]
