"""The DSI study's report: its settings in words, Table 1, the epochs of every run and targets 3 and 4.

:func:`write_dsi_tables` writes the tables of a recipe's DSI study (:mod:`.dsi`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vitdsi_utils.reports.paper import TABLE1_NOTE, table1_markdown
from vitdsi_utils.reports.tables import ZERO_SHOT, write_table
from vitdsi_utils.studies.targets import target3_markdown, target4_markdown
from vitdsi_utils.training.config import TrainConfig


def fine_tune_note(targets: str, index_views: int, view_min_crop: float, config: TrainConfig | None) -> str:
    """A sentence naming the fine-tuning options that differ from plain fine-tuning ('' when none do)."""
    parts = []
    if targets == "same-class":
        parts.append(
            "instead of those fixed pairs, one target per train query and epoch, redrawn at random "
            "among its relevant indexed images"
        )
    if index_views:
        parts.append(
            f"{index_views} augmented view(s) of each indexed image per epoch as extra queries "
            f"(flip, crops >= {view_min_crop:g} of the side)"
        )
    if config is not None and config.label_smoothing:
        parts.append(f"label smoothing {config.label_smoothing:g}")
    return ("Fine-tuning options: " + "; ".join(parts) + ". ") if parts else ""


def index_caps(results: pd.DataFrame, config: TrainConfig) -> str:
    """The indexing epoch caps the zero-shot models of ``results`` were trained under, in words."""
    rows = results[results["model"] == ZERO_SHOT]
    caps = sorted({int(c) for c in rows["epoch_cap"].dropna()}) if "epoch_cap" in rows else []
    caps = caps or [config.epochs]
    if len(caps) == 1:
        text = f"{caps[0]} epochs"
    else:
        text = "a cap of " + ", ".join(str(c) for c in caps[:-1]) + f" or {caps[-1]} epochs (per run below)"
    if "reached_target" in rows and len(rows):
        per_run = rows.groupby(["n", "ids", "seed"])["reached_target"].first()
        text += f" ({int((per_run == True).sum())} of {len(per_run)} runs reached the target)"  # noqa: E712
    return text


def runs_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per trained model: epochs run, the cap it ran under, whether it reached its target, time."""
    columns = [c for c in ("epochs", "epoch_cap", "reached_target", "train_s", "search_ms_per_query") if c in results]
    table = results[results["model"] != "BoVW"].groupby(["model", "n", "ids", "seed"], dropna=False)[columns].first()
    table = table.reset_index()
    if "reached_target" in table:  # no stop rule (fine-tuning without consolidation): "-"
        table["reached_target"] = table["reached_target"].map({True: "yes", False: "no"}).fillna("-")
    return table.round(1)


def write_dsi_tables(
    results_frame: pd.DataFrame,
    history_frame: pd.DataFrame,
    out_dir: Path,
    source: str,
    size: int,
    model_overrides: dict | None,
    index_config: TrainConfig | None,
    retrieval_config: TrainConfig | None,
    max_pairs_per_query: int | None,
    mix_ratio: float | None | bool = False,
    multitask_config: TrainConfig | None = None,
    options_note: str = "",
    consolidate: int = 0,
    fine_tune_phase: bool = True,
) -> None:
    """``dsi_<source>_<size>px`` (CSV and Markdown: the settings in words, Table 1, epochs per run, targets 3
    and 4) and ``histories_<source>_<size>px`` in ``out_dir``."""
    out_dir = Path(out_dir)
    overrides = ", ".join(f"{k}={v}" for k, v in (model_overrides or {}).items()) or "paper defaults"
    ic, rc = index_config or TrainConfig(), retrieval_config or TrainConfig(epochs=75)
    markdown = "\n".join(
        [
            f"# ViT DSI on {source} at {size} px",
            "",
            f"Model: {overrides}. Indexing: lr {ic.lr}, batch {ic.batch_size}, until sequence accuracy on the "
            f"indexed images ({ic.stop_metric} mode) >= {ic.target_accuracy} or {index_caps(results_frame, ic)}. "
            + (
                f"Retrieval fine-tuning: {rc.epochs} epochs, lr {rc.lr}, "
                if fine_tune_phase
                else "No plain retrieval fine-tuning. Retrieval examples: "
            )
            + (
                f"at most {max_pairs_per_query} (query, relevant ID) pairs per query (seeded). "
                if max_pairs_per_query
                else "every (query, relevant ID) pair, as in the paper. "
            )
            + options_note
            + (
                ""
                if mix_ratio is False
                else f"Multi-task: {(multitask_config or rc).epochs} epochs, lr {(multitask_config or rc).lr}, every indexed "
                "image in each epoch beside "
                + ("every pair. " if mix_ratio is None else f"{mix_ratio:g} pairs per indexed image (resampled). ")
            )
            + (
                f"Then up to {consolidate} epochs of indexing alone, until IA@1 is back at "
                f"{(multitask_config or rc).target_accuracy}. "
                if consolidate
                else ""
            )
            + (
                "BoVW: averaged per query over its k-means vocabularies (see its rows). "
                if "BoVW" in set(results_frame["model"])
                else ""
            )
            + "Top-100 lists from beam search constrained to the trie of existing IDs (beam 100). "
            + TABLE1_NOTE,
            "",
            table1_markdown(results_frame),
            "",
            "Epochs and training time per run (as trained: `epoch_cap` is the cap the model was trained under, "
            "`reached_target` whether its stop rule fired before it; a model reused from its run folder keeps "
            "its own):",
            "",
            runs_table(results_frame).to_markdown(index=False),
        ]
    )
    target3 = target3_markdown(results_frame) if "BoVW" in set(results_frame["model"]) else ""
    if target3:
        markdown += "\n\n" + target3
    target4 = target4_markdown(results_frame[results_frame["model"] != "BoVW"])
    if target4:
        markdown += "\n\n" + target4
    write_table(results_frame, out_dir / f"dsi_{source}_{size}px", markdown=markdown)
    if len(history_frame):
        write_table(history_frame, out_dir / f"histories_{source}_{size}px")
