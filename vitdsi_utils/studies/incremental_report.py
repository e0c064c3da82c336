"""The incremental study's report: its table's Markdown and its figure (IA@1 per strategy, forgetting curves)."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vitdsi_utils.reports.plots import new_figure
from vitdsi_utils.training.config import TrainConfig


def incremental_markdown(results: pd.DataFrame, index_config: TrainConfig, finetune_epochs: int) -> str:
    """The results table with a sentence on how each model was trained."""
    r = results.iloc[0]
    head = (
        f"Incremental indexing: {int(r['n_old'])} images indexed first, then {int(r['n_new'])} new images with the "
        f"next consecutive IDs. Initial and from-scratch models: lr {index_config.lr:g}, until IA@1 >= "
        f"{index_config.target_accuracy} or {index_config.epochs} epochs. Fine-tuning: the same lr, until the new "
        f"images reach IA@1 >= {index_config.target_accuracy} or {finetune_epochs} epochs; replay r:1 adds r old "
        "images per new image, resampled each epoch. IA@1 by beam search over the trie of all IDs."
    )
    shown = results.drop(columns=["n_old", "n_new"]).round(3)
    return head + "\n\n" + shown.to_markdown(index=False)


def incremental_figure(results: pd.DataFrame, curves: pd.DataFrame, title: str | None = None) -> Figure:
    """Left: IA@1 of old and new images per strategy, with its seconds. Right: the forgetting curves."""

    fig, axes = new_figure(1, 2, (12, 4.3), gridspec_kw={"width_ratios": [1.1, 1]})
    ax = axes[0, 0]
    x = np.arange(len(results))
    ax.bar(x - 0.2, results["IA@1 old"], 0.4, label="old images", color="#1f4e9c")
    ax.bar(x + 0.2, results["IA@1 new"].fillna(0), 0.4, label="new images", color="#c25a0b")
    for i, r in results.reset_index(drop=True).iterrows():
        ax.text(
            i, 1.03, f"{r['seconds']:.0f} s" if r["seconds"] >= 10 else f"{r['seconds']:.1f} s", ha="center", fontsize=8
        )
    ax.set_xticks(x, [textwrap.fill(s, 13) for s in results["strategy"]], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("IA@1")
    ax.set_title("IA@1 after each strategy (training seconds above)")
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[0, 1]
    if len(curves):
        colors = dict(zip(curves["strategy"].unique(), ["#d62728", "#2ca02c", "#9467bd", "#8c564b", "#17becf"]))
        for (strategy, task), part in curves.groupby(["strategy", "task"], sort=False):
            ax.plot(
                part["epoch"],
                part["seq_acc"],
                ls="-" if task == "old" else "--",
                color=colors[strategy],
                label=f"{strategy}: {task}",
            )
        ax.legend(fontsize=7)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("sequence accuracy (greedy)")
    ax.set_title("Forgetting: old (solid) and new (dashed) images")
    ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig
