"""The study's figures. Every function returns a matplotlib Figure and never shows it.

Figures are closed in pyplot's registry as soon as they are built, so a notebook displays one
only when a cell returns it (no duplicates) and a long study does not accumulate open figures.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # without a display, matplotlib falls back to Agg by itself
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vitdsi_utils.atomic import atomic_path
from vitdsi_utils.data.database import Database
from vitdsi_utils.data.images import IMAGENETTE_CLASSES
from vitdsi_utils.reports.paper import PROTOCOL_MAP, PROTOCOL_RECALL

DPI = 120


RELEVANT_COLOR, IRRELEVANT_COLOR, UNKNOWN_COLOR = "#2ca02c", "#d62728", "#7f7f7f"


#: Bars of metric_bars, in order: (model, ID scheme) -> colour.
SERIES_COLORS = {
    ("BoVW", "-"): "#7f7f7f",
    ("VLAD", "-"): "#2ca02c",
    ("DSI zero-shot", "clustered"): "#1f4e9c",
    ("DSI zero-shot", "random"): "#7fa6e0",
    ("DSI fine-tuned", "clustered"): "#c25a0b",
    ("DSI fine-tuned", "random"): "#f2a766",
}


#: Our metric -> the result row whose ``paper`` column holds the paper's estimate of it. The
#: paper's "MAP@10" was a mean P@10 over 10 queries and its "R@100" a mean R@100 over 10 queries,
#: so they are drawn beside our P@10 and R@100 (over all queries), not beside our mAP@10.
PAPER_ESTIMATE_OF = {"IA@1": "IA@1", "IA@5": "IA@5", "P@10": PROTOCOL_MAP, "R@100": PROTOCOL_RECALL}


def new_figure(nrows: int, ncols: int, size: tuple[float, float], **kwargs: Any) -> tuple[Figure, np.ndarray]:
    """A figure with an (nrows, ncols) array of axes, already closed in pyplot (see the module docstring)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False, **kwargs)
    plt.close(fig)
    return fig, axes


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Write ``fig`` as PNG atomically (a reader never sees half a file); return the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def readable_class(name: str) -> str:
    """'n01440764' -> 'tench'; other class names unchanged."""
    return IMAGENETTE_CLASSES.get(name, name)


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
def show_image(ax, image: np.ndarray, title: str | None = None, border: str | None = None, fontsize: int = 7) -> None:
    ax.imshow(image, interpolation="nearest" if image.shape[0] <= 64 else "antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(border is not None)
        if border is not None:
            spine.set_edgecolor(border)
            spine.set_linewidth(3)
    if title:
        ax.set_title(title, fontsize=fontsize)


def class_gallery(
    source: Database | np.ndarray,
    labels: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    *,
    per_class: int = 6,
    seed: int = 0,
    title: str | None = None,
    max_classes: int | None = None,
) -> Figure:
    """A grid of ``per_class`` random images (columns) for every class (rows).

    ``source`` is a Database, or images (n, S, S, 3) uint8 with ``labels`` (n,) and ``classes``
    (for multi-label data: primary labels). ``max_classes`` keeps the rows of the classes with
    the most images (COCO has 80 categories), in label order.
    """
    if isinstance(source, Database):
        images, labels, classes = source.images, source.manifest["label"].to_numpy(), source.classes
    else:
        images = np.asarray(source)
        if labels is None or classes is None:
            raise ValueError("class_gallery(images, labels, classes): pass labels and class names with raw images")
    labels = np.asarray(labels)
    present = [c for c in range(len(classes)) if np.any(labels == c)]
    if max_classes is not None and len(present) > max_classes:
        sizes = np.bincount(labels, minlength=len(classes))
        present = sorted(sorted(present, key=lambda c: -sizes[c])[:max_classes])
    rng = np.random.default_rng(seed)
    fig, axes = new_figure(len(present), per_class, (0.9 * per_class + 1.2, 0.9 * len(present) + 0.4))
    for r, label in enumerate(present):
        members = np.flatnonzero(labels == label)
        picked = rng.choice(members, size=min(per_class, len(members)), replace=False)
        for c in range(per_class):
            ax = axes[r, c]
            if c < len(picked):
                show_image(ax, images[picked[c]])
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(readable_class(classes[label]), rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def split_bar(db: Database, title: str | None = None) -> Figure:
    """Horizontal stacked bars: images per class, split by role (index / train / val / test)."""
    counts = db.counts()  # (classes, roles)
    counts.index = [readable_class(c) for c in counts.index]
    fig, axes = new_figure(1, 1, (7, 0.35 * len(counts) + 1.2))
    ax = axes[0, 0]
    left = np.zeros(len(counts))
    for role, color in zip(counts.columns, ("#1f4e9c", "#f2a766", "#9bc995", "#c9a0dc")):
        ax.barh(counts.index, counts[role], left=left, color=color, label=role)
        left += counts[role].to_numpy()
    ax.invert_yaxis()  # first class on top, as in the table
    ax.set_xlabel("images")
    ax.legend(ncols=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize=8)
    s = db.settings
    ax.set_title(title or f"N = {s['n']}: {db.n_index} indexed, {len(db.manifest) - db.n_index} queries", pad=22)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------
# Training curves (the paper's Figures 1-3)
# ------------------------------------------------------------------------------------------
def _curve_rows(histories: pd.DataFrame, phase: str, split: str) -> pd.DataFrame:
    rows = histories[(histories["phase"] == phase) & (histories["split"] == split)]
    if rows.empty:
        have = sorted(set(zip(histories.get("phase", []), histories.get("split", []))))
        raise ValueError(f"no history rows for phase={phase!r}, split={split!r}; the histories hold {have}")
    if rows["task"].nunique() > 1:  # multi-task phases also log the combined "all" rows
        rows = rows[rows["task"] == "all"] if (rows["task"] == "all").any() else rows
    return rows


def training_curves(
    histories: pd.DataFrame,
    phase: str = "indexing",
    split: str = "train",
    metrics: Sequence[str] = ("loss", "seq_acc"),
    title: str | None = None,
) -> Figure:
    """One panel per metric against epoch, one curve per (N, ID scheme), averaged over seeds.

    ``histories`` is ``History.to_frame()`` of several runs with columns ``n`` and ``ids`` added.
    Where seeds stopped at different epochs, the last epochs average the seeds still running.
    """
    rows = _curve_rows(histories, phase, split)
    fig, axes = new_figure(1, len(metrics), (4.2 * len(metrics), 3.2))
    ns = sorted(rows["n"].unique())
    colors = {n: plt.cm.viridis(i / max(len(ns) - 1, 1) * 0.85) for i, n in enumerate(ns)}
    styles = {"clustered": "-", "random": "--"}
    for ax, metric in zip(axes[0], metrics):
        for (n, ids), group in rows.groupby(["n", "ids"], sort=True):
            curve = group.groupby("epoch")[metric].mean()  # mean over seeds
            ax.plot(curve.index, curve.to_numpy(), styles.get(ids, ":"), color=colors[n], label=f"N={n}, {ids}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        if metric.endswith("acc"):
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title or f"{phase} phase, {split}")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------
def _mean_over_seeds(results: pd.DataFrame) -> pd.DataFrame:
    columns = [c for c in ("value", "ci_low", "ci_high", "chance", "paper") if c in results.columns]
    return results.groupby(["model", "ids", "n", "metric"], as_index=False)[columns].mean()


def legend_entries(axes: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """(handles, labels) of every labelled series of ``axes``, each once, in order of first appearance:
    also the series a first panel lacks (BoVW has no IA@1)."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return list(entries.values()), list(entries)


def metric_vs_n(results: pd.DataFrame, metrics: Sequence[str] = ("P@10", "R@100"), title: str | None = None) -> Figure:
    """One panel per metric against N: a line per (model, IDs) with 95% intervals, chance dashed."""
    table = _mean_over_seeds(results)
    fig, axes = new_figure(1, len(metrics), (4.2 * len(metrics), 3.2))
    for ax, metric in zip(axes[0], metrics):
        rows = table[table["metric"] == metric]
        for (model, ids), group in rows.groupby(["model", "ids"], sort=False):
            group = group.sort_values("n")
            err = [group["value"] - group["ci_low"], group["ci_high"] - group["value"]]
            label = model if ids == "-" else f"{model}, {ids}"
            color = SERIES_COLORS.get((model, ids))
            ax.errorbar(group["n"], group["value"], yerr=err, marker="o", capsize=3, label=label, color=color)
            ax.plot(group["n"], group["chance"], ":", color=color or "k", alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(rows["n"].unique()), labels=[str(n) for n in sorted(rows["n"].unique())])
        ax.set_xlabel("N (database size)")
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    handles, labels = legend_entries(axes[0])
    axes[0, 0].legend(handles, labels, fontsize=8, title="dotted: chance", title_fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def metric_bars(
    results: pd.DataFrame,
    metrics: Sequence[str] = ("IA@1", "mAP@10", "P@10", "R@100"),
    title: str | None = None,
) -> Figure:
    """Bars of BoVW / zero-shot / fine-tuned per N and metric: 95% intervals, chance dashed, the paper hollow.

    ``results`` is the long result table (model, n, ids, metric, value, ci_low, ci_high,
    chance, paper). Seeds are averaged. The paper's MAP@10 (a 10-query mean P@10) is drawn on
    the P@10 panel and its R@100 on the R@100 panel (see ``PAPER_ESTIMATE_OF``).
    """
    table = _mean_over_seeds(results)
    series = [s for s in SERIES_COLORS if ((table["model"] == s[0]) & (table["ids"] == s[1])).any()]
    ns = sorted(table["n"].unique())
    width = 0.8 / max(len(series), 1)
    fig, axes = new_figure(1, len(metrics), (3.6 * len(metrics), 3.4))
    for ax, metric in zip(axes[0], metrics):
        rows = table[table["metric"] == metric].set_index(["model", "ids", "n"])
        paper_rows = table[table["metric"] == PAPER_ESTIMATE_OF.get(metric, "")].set_index(["model", "ids", "n"])
        for j, (model, ids) in enumerate(series):
            for i, n in enumerate(ns):
                if (model, ids, n) not in rows.index:
                    continue  # e.g. BoVW has no indexing accuracy
                r = rows.loc[(model, ids, n)]
                x = i - 0.4 + width * (j + 0.5)
                ax.bar(
                    x,
                    r["value"],
                    width,
                    color=SERIES_COLORS[(model, ids)],
                    label=(model if ids == "-" else f"{model}, {ids}") if i == 0 else None,
                    yerr=[[r["value"] - r["ci_low"]], [r["ci_high"] - r["value"]]],
                    error_kw={"capsize": 2, "elinewidth": 1},
                )
                ax.hlines(r["chance"], x - width / 2, x + width / 2, colors="k", linestyles="dashed", linewidth=1)
                if (model, ids, n) in paper_rows.index and pd.notna(paper_rows.loc[(model, ids, n)].get("paper")):
                    ax.plot(x, paper_rows.loc[(model, ids, n), "paper"], "o", mfc="none", mec="k", ms=6)
        ax.set_xticks(range(len(ns)), labels=[f"N={n}" for n in ns])
        ax.set_ylim(0, 1.05)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = legend_entries(axes[0])
    handles += [
        plt.Line2D([], [], color="k", ls="--", lw=1),
        plt.Line2D([], [], marker="o", mfc="none", mec="k", ls=""),
    ]
    labels += ["chance", "paper"]
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncols=min(len(labels), 4),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, -0.02),
    )
    fig.suptitle(title or "Retrieval and indexing metrics with 95% intervals")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


# ------------------------------------------------------------------------------------------
# The demo
# ------------------------------------------------------------------------------------------
def result_grid(
    query_image: np.ndarray,
    rows_per_model: dict[str, list[tuple[np.ndarray, float, bool | None]]],
    *,
    query_title: str = "query",
    notes: dict[str, str] | None = None,
) -> Figure:
    """The query on top, then one row per model of its top-K (image, score, is_relevant) results.

    Relevant results get a green border, the others red; ``is_relevant=None`` (an uploaded
    query, whose class is unknown) gets grey. ``notes`` adds a line under a model's name (e.g. latency).
    """
    k = max((len(r) for r in rows_per_model.values()), default=0)
    fig, axes = new_figure(1 + len(rows_per_model), k + 1, (1.15 * (k + 1) + 0.4, 1.35 * (1 + len(rows_per_model))))
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].axis("on")
    show_image(axes[0, 0], query_image, query_title, border="k", fontsize=8)
    for r, (name, results) in enumerate(rows_per_model.items(), start=1):
        label = name + (f"\n{notes[name]}" if notes and name in notes else "")
        axes[r, 0].text(0.95, 0.5, label, ha="right", va="center", fontsize=8, transform=axes[r, 0].transAxes)
        for c, (image, score, relevant) in enumerate(results, start=1):
            axes[r, c].axis("on")
            color = UNKNOWN_COLOR if relevant is None else RELEVANT_COLOR if relevant else IRRELEVANT_COLOR
            mark = "" if relevant is None else (" \u2713" if relevant else " \u2717")
            show_image(axes[r, c], image, f"#{c} {score:.2f}{mark}", border=color)
    fig.tight_layout()
    return fig
