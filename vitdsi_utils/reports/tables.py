"""Result tables: long-form frames written as CSV (for machines) and Markdown (for people)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from vitdsi_utils.atomic import atomic_path
from vitdsi_utils.metrics import is_uninformative


def format_interval(value: float, low: float, high: float, digits: int = 3) -> str:
    """'0.412 [0.381, 0.446]', or just the value when there is no interval."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_number(value: float, digits: int = 3) -> str:
    """A float with fixed digits, '–' for a missing one."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


#: Marks a metric cell that carries no information (see :func:`metrics.is_uninformative`), and its footnote.
UNINFORMATIVE_MARK = "†"


UNINFORMATIVE_NOTE = (
    "† carries no information: a random ranking scores as well (chance >= 0.999), e.g. R@k or IA@k when k is at "
    "least the number of indexed images, so that every indexed image is returned. The CSV marks these rows in its "
    "column `uninformative`."
)


def uninformative(row: Mapping[str, Any]) -> bool:
    """Whether a result row is flagged ``uninformative`` (or, in tables written before the flag, has chance >= 0.999)."""
    flag = row.get("uninformative")
    if flag is not None and not (isinstance(flag, float) and math.isnan(flag)):
        return bool(flag)
    chance = row.get("chance")
    return chance is not None and is_uninformative(float(chance))


def metric_cell(row: Mapping[str, Any], digits: int = 3) -> str:
    """A result row's 'value [low, high]', with the mark † when the metric carries no information."""
    text = format_interval(row["value"], row["ci_low"], row["ci_high"], digits)
    return text + UNINFORMATIVE_MARK if text != "–" and uninformative(row) else text


def with_uninformative_note(markdown: str) -> str:
    """``markdown`` followed by the footnote of † when a cell of it carries the mark."""
    return f"{markdown}\n\n{UNINFORMATIVE_NOTE}" if UNINFORMATIVE_MARK in markdown else markdown


def write_csv(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``frame`` as CSV atomically (no index column); return the path."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def write_table(frame: pd.DataFrame, path_stem: str | os.PathLike, markdown: str | None = None) -> tuple[Path, Path]:
    """Write ``frame`` to ``<stem>.csv`` and a Markdown rendering (or ``markdown``) to ``<stem>.md``."""
    stem = Path(path_stem)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    text = (markdown if markdown is not None else frame.to_markdown(index=False)) + "\n"
    # both files are written before either is replaced, so a failure leaves the old pair intact
    with atomic_path(csv_path) as csv_tmp, atomic_path(md_path) as md_tmp:
        frame.to_csv(csv_tmp, index=False)
        md_tmp.write_text(text)
    return csv_path, md_path


#: Model names of the BoVW rows: word histograms (the paper's baseline) and VLAD over the same words.
BOVW_MODEL, VLAD_MODEL = "BoVW", "VLAD"


ZERO_SHOT = "DSI zero-shot"


FINE_TUNED = "DSI fine-tuned"


MULTITASK = "DSI multi-task"
