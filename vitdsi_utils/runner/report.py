"""The study's report: ``<out>/README.md`` with parameters, wall times, machine, Table 1 and the figures."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from vitdsi_utils import settings
from vitdsi_utils.atomic import atomic_path, write_text
from vitdsi_utils.environment import describe_machine, machine_info
from vitdsi_utils.runner.profiles import RUNNER_PARAMETERS

TIMING_COLUMNS = ("notebook", "seconds", "status")


#: Captions of the figures the notebooks write; other PNGs are shown under their file name.
FIGURE_CAPTIONS = {
    "gallery": "Sample images per class",
    "imagenette_gallery": "Sample Imagenette images per class",
    "split_bar": "Images per class and role",
    "bovw_vs_n": "BoVW and VLAD baselines: P@10 and R@100 against N",
    "figure1_indexing": "Figure 1: indexing phase, training loss and sequence accuracy per epoch",
    "figure2_retrieval_train": "Figure 2: retrieval phase, training loss and sequence accuracy per epoch",
    "figure3_retrieval_val": "Figure 3: retrieval phase, validation loss and sequence accuracy per epoch",
    "metric_bars": "BoVW, zero-shot and fine-tuned DSI with 95% intervals, chance (dashed) and the paper (hollow)",
    "demo_example": "One query of the demo: top-K results per model, relevant ones in green",
    "ids_bars": "DSI by ID scheme (clustered, random, semantic, RQ, atomic) with 95% intervals and chance (dashed)",
    "clusters_metrics": "k-means of the encoders' embeddings: silhouette, Davies-Bouldin, elbow, purity and NMI against k",
    "clusters_sizes": "Cluster sizes at k = the number of classes, per embedding",
    "clusters_gallery_best": "The largest clusters of the embedding with the highest NMI",
    "clusters_gallery_worst": "The largest clusters of the embedding with the lowest NMI",
    "dense_training": "Dense encoder: contrastive loss, entropy regulariser and total objective per epoch",
    "dense_validation": "Dense encoder: validation mAP@10 and P@10 per epoch",
    "dense_vs_n": "Dense search, BoVW and DSI: mAP@10, P@10 and R@100 against N",
    "rerank_tradeoff": "Re-ranking: mAP@10 against time per query, per first stage and candidate depth M",
    "dense_init_vs_n": "DSI from the dense encoder (multi-task) beside BoVW, dense search and the fine-tuned DSI, against N",
    "ablations": "Ablations: fine-tuned mAP@10, IA@1 before and after fine-tuning, and indexing epochs per setting",
    "scale": "Scale: query latency against N (DSI beam search, BoVW, dense search) and DSI IA@1",
    "incremental": "Incremental indexing: IA@1 on old and new images per strategy (training seconds above), and forgetting along the fine-tuning epochs",
    "pretrain": "Self-supervised pretraining: InfoNCE loss per epoch and indexing speed from each initialisation",
}


def earlier_timings(out: Path, skipped: list[Path]) -> list[dict]:
    """Timing rows of the skipped notebooks, from the last run's timings.csv where there is one."""
    if not skipped:
        return []
    path = out / "timings.csv"
    earlier = pd.read_csv(path).set_index("notebook") if path.exists() else pd.DataFrame()
    rows = []
    for nb in skipped:
        seconds = float(earlier.at[nb.stem, "seconds"]) if nb.stem in earlier.index else float("nan")
        rows.append({"notebook": nb.stem, "seconds": seconds, "status": "earlier run"})
    return rows


def write_timings(out: Path, rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(TIMING_COLUMNS))
    with atomic_path(out / "timings.csv") as tmp:
        frame.to_csv(tmp, index=False)
    return frame


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the results and the notebooks."""

    info = {k: str(v) for k, v in machine_info().items() if k not in ("platform", "processor", "cpu_count", "device")}
    for package in ("pandas", "matplotlib", "papermill", "ipywidgets", "vitdsi"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return info


def _demote_headings(markdown: str) -> str:
    """Push every Markdown heading one level down, so an embedded file nests under ours."""
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.MULTILINE)


def _training_time_lines(out: Path) -> list[str]:
    """A sentence with the training time the models' histories record (models may be reused from earlier runs)."""
    seconds = 0.0
    for name in ("histories_indexing.csv", "histories_retrieval.csv"):
        path = out / "tables" / name
        if path.exists():
            frame = pd.read_csv(path)
            seconds += float(frame.loc[frame["split"] == "train", "seconds"].sum())
    if not seconds:
        return []
    return [
        f"Training time recorded in the models' histories: {seconds / 60:.1f} min (both phases, all runs). "
        "Notebooks 03 and 04 load a model that a run folder already holds instead of training it again "
        "(their output says `loaded`), so the wall times above include this training only when it "
        "happened during this run.",
        "",
    ]


def _seconds(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:.1f}"


def _left_out_lines(timings: pd.DataFrame) -> list[str]:
    """A sentence naming the notebooks the profile does not run (its ``NOTEBOOKS``), when there are any."""
    left_out = timings.loc[timings["status"] == "not in profile", "notebook"].tolist()
    if not left_out:
        return []
    return [
        f"Not run: {', '.join(left_out)}. The profile's `NOTEBOOKS` lists the notebooks it runs; "
        "their reports are not part of this one.",
        "",
    ]


def write_readme(
    out: Path, params: dict[str, Any], timings: pd.DataFrame, command: str | None = None, note: str | None = None
) -> Path:
    """Write ``<out>/README.md``: parameters, wall times, machine, Table 1, every model's table and the figures.

    ``command`` is the command line that produced the report (default: ``vitdsi study --profile NAME``);
    ``note`` (Markdown) goes under the first paragraph (the dry run says what it changed there).
    """

    name = params.get("PROFILE", "custom")
    command = command or f"vitdsi study --profile {name}"
    shown = {k: v for k, v in params.items() if k not in RUNNER_PARAMETERS}
    total = float(timings["seconds"].sum())  # NaN (a failed or never-timed notebook) counts as 0
    dataset = params.get("DATASET_NAME") or params.get("DATASET")
    lines = [
        f"# The vitdsi study, profile `{name}`" + (f", data `{dataset}`" if dataset else ""),
        "",
        f"Generated by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
        "Executed notebooks are in [`notebooks/`](notebooks/), tables (CSV + Markdown) in "
        "[`tables/`](tables/), figures in [`figures/`](figures/). "
        f"Trained models: `{settings.portable_path(params.get('RUNS_DIR') or '')}`.",
        "",
        *([note, ""] if note else []),
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
        *[f"| `{k}` | `{v}` |" for k, v in shown.items()],
        "",
        "## Wall time per notebook",
        "",
        "| notebook | seconds | status |",
        "|---|---|---|",
        *[
            f"| [{r.notebook}](notebooks/{r.notebook}.ipynb) | {_seconds(r.seconds)} | {r.status} |"
            for r in timings.itertuples(index=False)
        ],
        f"| **total** | **{total:.1f}** | |",
        "",
        *_left_out_lines(timings),
        *_training_time_lines(out),
        "## Machine",
        "",
        describe_machine(),
        "",
        "| package | version |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in package_versions().items()],
        "",
        "## Table 1",
        "",
    ]
    table1 = out / "tables" / "table1.md"
    lines.append(
        _demote_headings(table1.read_text().strip())
        if table1.exists()
        else "_No Table 1: `05_results` did not run (see the timings above)._"
    )
    every_model = out / "tables" / "dense_init.md"
    if every_model.exists():  # 14_dense_init's table: Table 1's rows, dense search, other IDs and its own models
        lines += [
            "",
            "## Every model of the study",
            "",
            "The rows of Table 1 with those of dense search (07), the other ID schemes and the multi-task "
            "models (08) and the DSI started from the dense encoder (14), from `tables/dense_init.md`.",
            "",
            _demote_headings(every_model.read_text().strip()),
        ]
    lines += ["", "## Figures", ""]
    figures = sorted((out / "figures").glob("*.png"))
    for fig in figures:
        lines += [f"### {FIGURE_CAPTIONS.get(fig.stem, fig.stem)}", "", f"![{fig.stem}](figures/{fig.name})", ""]
    if not figures:
        lines.append("_No figures were written._")
    return write_text(out / "README.md", "\n".join(lines).rstrip() + "\n")
