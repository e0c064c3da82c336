"""The ablation study's presentation: a table per variant, its report and its figure (see :mod:`.ablations`).

:func:`summary_table` puts each variant's zero-shot and fine-tuned metrics on one row,
:func:`ablations_markdown` writes it with the settings, :func:`ablation_figure` draws IA@1 and
mAP@10 per variant, and :func:`describe` says in sentences what each factor changed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vitdsi_utils.reports.plots import new_figure
from vitdsi_utils.reports.tables import metric_cell, with_uninformative_note

#: The stages a variant is scored at.
ZERO_SHOT, FINE_TUNED = "zero-shot", "fine-tuned"

#: Metrics shown in the summary and the figure (all from :func:`evaluation.evaluate_dsi`).
SUMMARY_METRICS = ("IA@1", "mAP@10", "P@10", "R@100")


def summary_table(long: pd.DataFrame, *, intervals: bool = True) -> pd.DataFrame:
    """One row per variant: epochs and seconds to memorise, zero-shot IA@1, fine-tuned metrics.

    With ``intervals`` the metric cells are text 'value [low, high]'; without, plain numbers.
    """
    rows = []
    for name, group in long.groupby("variant", sort=False):
        first = group.iloc[0]
        row: dict[str, Any] = {
            "variant": name,
            "factor": first["factor"],
            "level": first["level"],
            "indexed": int(first["n_index"]),
            "epochs to memorise": int(first["index_epochs"]),
            "s to memorise": round(float(first["index_s"]), 1),
        }
        cells = [(ZERO_SHOT, "IA@1")] + [(FINE_TUNED, m) for m in SUMMARY_METRICS]
        for stage, metric in cells:
            hit = group[(group["stage"] == stage) & (group["metric"] == metric)]
            column = f"{'zero-shot' if stage == ZERO_SHOT else 'tuned'} {metric}"
            if hit.empty:
                row[column] = "–" if intervals else np.nan
                continue
            h = hit.iloc[0]
            row[column] = metric_cell(h) if intervals else float(h["value"])
        row["fine-tune s"] = round(float(first["tune_s"]), 1)
        rows.append(row)
    return pd.DataFrame(rows)


def ablations_markdown(long: pd.DataFrame, settings: str = "") -> str:
    """The summary as Markdown, after a paragraph of ``settings`` and the reading notes."""
    chance = long[(long["metric"] == "P@10")]["chance"]
    note = (
        "One factor changed at a time from the default (first row). `epochs / s to memorise`: the indexing "
        "run until its stop rule (or its epoch cap); `zero-shot IA@1`: share of indexed images whose top-1 "
        "is their own ID, before fine-tuning; `tuned`: after fine-tuning, metrics over all test queries. "
        "Brackets: bootstrap 95% intervals." + (f" Chance P@10 is {float(chance.iloc[0]):.3f}." if len(chance) else "")
    )
    table = summary_table(long).drop(columns=["factor", "level"]).to_markdown(index=False)
    return with_uninformative_note("\n\n".join(p for p in (settings, note, table) if p))


def ablation_figure(long: pd.DataFrame, title: str | None = None, index_cap: int | None = None) -> Figure:
    """Three panels per variant: fine-tuned mAP@10 with its interval; IA@1 zero-shot and fine-tuned; epochs to memorise.

    The default's values are dashed lines, so a variant reads as a shift from it. With
    ``index_cap`` (the indexing epoch cap), bars of runs that hit it are hatched: those never
    reached the target.
    """

    names = list(dict.fromkeys(long["variant"]))
    y = np.arange(len(names))[::-1]  # first variant at the top
    fig, axes = new_figure(
        1, 3, (12, 0.42 * len(names) + 1.6), sharey=True, gridspec_kw={"width_ratios": [1.3, 1.0, 0.8]}
    )
    ax_map, ax_ia, ax_ep = axes.ravel()

    def values(stage: str, metric: str) -> pd.DataFrame:
        frame = long[(long["stage"] == stage) & (long["metric"] == metric)].set_index("variant")
        return frame.reindex(names)

    tuned_map = values(FINE_TUNED, "mAP@10")
    err = np.vstack([tuned_map["value"] - tuned_map["ci_low"], tuned_map["ci_high"] - tuned_map["value"]])
    colors = ["black" if n == "default" else "tab:blue" for n in names]
    ax_map.errorbar(tuned_map["value"], y, xerr=np.nan_to_num(err), fmt="none", ecolor="grey", capsize=3)
    ax_map.scatter(tuned_map["value"], y, c=colors, zorder=3)
    ax_map.axvline(tuned_map["value"].iloc[0], color="black", ls="--", lw=0.8)
    ax_map.set_xlabel("fine-tuned mAP@10 (95% interval)")
    ax_map.set_yticks(y)
    ax_map.set_yticklabels(names)

    for stage, marker, color in ((ZERO_SHOT, "o", "tab:green"), (FINE_TUNED, "s", "tab:red")):
        ia = values(stage, "IA@1")
        ax_ia.scatter(ia["value"], y, marker=marker, color=color, label=stage, zorder=3)
        ax_ia.axvline(ia["value"].iloc[0], color=color, ls="--", lw=0.8)
    ax_ia.set_xlabel("IA@1")
    ax_ia.set_xlim(-0.03, 1.03)
    ax_ia.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)

    epochs = long.groupby("variant", sort=False)["index_epochs"].first().reindex(names)
    bars = ax_ep.barh(y, epochs.to_numpy(), color=colors, alpha=0.7)
    if index_cap is not None:
        for bar, value in zip(bars, epochs.to_numpy()):
            if value >= index_cap:
                bar.set_hatch("//")
        ax_ep.axvline(index_cap, color="grey", ls=":", lw=0.8)
        ax_ep.set_title(f"hatched: hit the cap of {index_cap}", fontsize=8)
    ax_ep.axvline(epochs.iloc[0], color="black", ls="--", lw=0.8)
    ax_ep.set_xlabel("epochs to memorise")
    for ax in (ax_map, ax_ia, ax_ep):
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def describe(long: pd.DataFrame) -> list[str]:
    """One sentence per variant: its fine-tuned mAP@10 against the default's, and whether the intervals overlap."""
    tuned = long[(long["stage"] == FINE_TUNED) & (long["metric"] == "mAP@10")].set_index("variant")
    if "default" not in tuned.index:
        return []
    base = tuned.loc["default"]
    lines = []
    for name, row in tuned.drop(index="default").iterrows():
        overlap = row["ci_low"] <= base["ci_high"] and base["ci_low"] <= row["ci_high"]
        lines.append(
            f"{name}: mAP@10 {row['value']:.3f} vs default {base['value']:.3f} "
            f"({row['value'] - base['value']:+.3f}; intervals {'overlap' if overlap else 'do not overlap'})"
        )
    return lines
