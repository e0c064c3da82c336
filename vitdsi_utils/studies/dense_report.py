"""The dense study's report: its settings and Table-1 rows, and its verdicts in words (see :mod:`.dense`)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from vitdsi_utils.baselines.dense import DENSE_MODEL
from vitdsi_utils.reports.paper import TABLE1_NOTE, table1_markdown
from vitdsi_utils.studies.rerank import summary
from vitdsi_utils.studies.targets import baseline_verdicts


def dense_markdown(results: pd.DataFrame, histories: pd.DataFrame | None, settings: dict[str, Any]) -> str:
    """The report of a dense study: settings, Table-1 rows beside BoVW (and DSI), training time."""

    lines = [
        f"# Dense retrieval baseline on {settings['source']} at {settings['size']} px",
        "",
        f"Encoder: {settings['model']}. Training: {settings['training']}. "
        "The database's indexed images are embedded once into a flat inner-product index; a test "
        "query returns its top-100 by cosine similarity. BoVW is fitted on the same database. "
        + (f"DSI rows: {settings['dsi']}. " if settings.get("dsi") else "")
        + TABLE1_NOTE,
        "",
        table1_markdown(results),
    ]
    dense = results[results["model"] == DENSE_MODEL]
    if len(dense):
        lines += [
            "",
            "Training time and search cost per database:",
            "",
            dense.groupby(["n", "seed"])[["train_s", "search_ms_per_query"]]
            .first()
            .round(1)
            .reset_index()
            .to_markdown(index=False),
        ]
    if histories is not None and len(histories):
        val = histories[histories["split"] == "val"]
        if len(val):
            best = val.groupby("n")["map@10"].agg(["max", "last"]).round(3).reset_index()
            lines += [
                "",
                "Validation mAP@10 during training (val queries, best and last epoch):",
                "",
                best.rename(columns={"max": "best val mAP@10", "last": "last val mAP@10"}).to_markdown(index=False),
            ]
    return "\n".join(lines)


def verdict_lines(results: pd.DataFrame, metrics: tuple[str, ...] = ("mAP@10", "P@10")) -> list[str]:
    """The dense model against every other model of ``results``, per metric, N and seed: better or
    worse only when the 95% intervals do not overlap (:func:`~vitdsi_utils.studies.targets.baseline_verdicts`)."""
    lines = []
    for metric in metrics:
        lines.append(metric)
        for row in baseline_verdicts(results, metric, baseline=DENSE_MODEL).itertuples():
            side = {"better": "worse", "worse": "better"}.get(row.verdict, "overlaps")  # from the dense model's side
            model = row.model if row.ids == "-" else f"{row.model} ({row.ids})"
            lines.append(
                f"  N={row.n} seed {row.seed}: dense {row.baseline_value:.3f} [{row.baseline_ci_low:.3f}, "
                f"{row.baseline_ci_high:.3f}] vs {model} {row.value:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}] "
                f"-> dense {side}"
            )
    return lines


def rerank_lines(reranking: pd.DataFrame) -> list[str]:
    """Per N: the dense search alone, then each first stage alone and at its best re-ranking depth (mAP@10, ms per query)."""
    lines = []
    wide = summary(reranking)  # the mean over seeds where there are several
    for n, group in wide.groupby("n"):
        alone = group[group["first_stage"] == "-"].iloc[0]
        lines.append(f"N={n}: dense alone mAP@10 {alone['mAP@10']:.3f} in {alone['ms_per_query']:.1f} ms per query")
        for (stage, ids), rows in group[group["first_stage"] != "-"].groupby(["first_stage", "ids"], sort=False):
            base, best = rows[rows["depth"] == 0].iloc[0], rows[rows["depth"] > 0].sort_values("mAP@10").iloc[-1]
            lines.append(
                f"  {stage}{'' if ids == '-' else f' ({ids} IDs)'}: mAP@10 {base['mAP@10']:.3f} alone -> "
                f"{best['mAP@10']:.3f} re-ranked at M={int(best['depth'])} "
                f"({base['ms_per_query']:.1f} -> {best['ms_per_query']:.1f} ms per query)"
            )
    return lines
