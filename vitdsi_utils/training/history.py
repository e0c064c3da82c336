"""The record of a training run: one row per epoch, split and task (loss, token and sequence accuracy, seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from vitdsi_utils.atomic import atomic_path, write_json

HISTORY_COLUMNS = ("phase", "epoch", "split", "task", "loss", "token_acc", "seq_acc", "seconds", "n_examples")


# ------------------------------------------------------------------------------------------
# History
# ------------------------------------------------------------------------------------------
class History(list):
    """Per-epoch metric rows (dicts with :data:`HISTORY_COLUMNS`), one per phase/epoch/split/task.

    ``stopped``: set by :func:`~vitdsi_utils.training.engine.run_training` to whether the run's
    objective ended it before its last epoch. ``reached_target``: set by
    :func:`~vitdsi_utils.training.loop.fit` to whether its phase stopped at the target accuracy
    (None: no stop rule, or a history not fresh from ``fit``).
    """

    stopped: bool = False
    reached_target: bool | None = None

    def to_frame(self) -> pd.DataFrame:
        """The rows as a DataFrame with the standard columns first."""
        frame = pd.DataFrame(list(self))
        if frame.empty:
            return pd.DataFrame(columns=list(HISTORY_COLUMNS))
        first = [c for c in HISTORY_COLUMNS if c in frame.columns]
        return frame[first + [c for c in frame.columns if c not in first]]

    def save_csv(self, path: str | os.PathLike) -> Path:
        """Write the rows as CSV atomically; return the path."""
        with atomic_path(path) as tmp:
            self.to_frame().to_csv(tmp, index=False)
        return Path(path)

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the rows as a JSON list atomically; return the path."""
        return write_json(path, list(self))

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> History:
        return cls(json.loads(Path(path).read_text()))

    def last(self, split: str = "train", task: str | None = None, phase: str | None = None) -> dict | None:
        """The latest row matching split (and task / phase when given), or None."""
        for row in reversed(self):
            if row["split"] == split and task in (None, row["task"]) and phase in (None, row["phase"]):
                return row
        return None
