"""Result tables: long-form frames written as CSV (for machines) and Markdown (for people)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from vitdsi_utils.atomic import atomic_path


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
