"""The scale study's figure and report: latency and IA@1 against N, and what they say.

:func:`scale_figure` draws latency per query against N (log-log, one line per method) beside IA@1
against N; :func:`scale_markdown` writes the report around the two tables (see :mod:`.scale`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from vitdsi_utils.reports.plots import new_figure
from vitdsi_utils.retrieval.latency import METHODS


def _plain_log_ticks(ax: Any, ns: Sequence[int], y: bool = True) -> None:
    """Ticks at the measured N (plain numbers) and plain numbers on a log y axis."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

    ax.xaxis.set_major_locator(FixedLocator(list(ns)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.tick_params(axis="x", labelrotation=30)
    if y:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


_COLORS = {METHODS[0]: "#1f4e9c", METHODS[1]: "#7f7f7f", METHODS[2]: "#c25a0b"}


def latency_column(latency: pd.DataFrame) -> str:
    """The column the figure plots: CPU milliseconds per query when every run was on the CPU, else wall milliseconds."""
    on_cpu = "device" in latency and set(latency["device"].astype(str)) == {"cpu"}
    return "cpu_ms_per_query" if on_cpu and "cpu_ms_per_query" in latency else "ms_per_query"


def scale_figure(latency: pd.DataFrame, ia: pd.DataFrame | None = None, title: str | None = None) -> Figure:
    """Left: milliseconds per query against N, log-log, one line per method (CPU time on the CPU, see
    :func:`latency_column`). Right: DSI IA@1 against N."""

    column = latency_column(latency)
    ks = sorted(latency["k"].unique()) if "k" in latency else [100]
    fig, axes = new_figure(1, 2, (11, 4.2))
    ax = axes[0, 0]
    for (method, k), part in latency.assign(k=latency.get("k", ks[0])).groupby(["method", "k"], sort=False):
        part = part.sort_values("n")
        # with several list lengths: the longest solid, shorter ones dashed
        ax.plot(
            part["n"],
            part[column],
            marker="o",
            color=_COLORS.get(method),
            ls="-" if k == ks[-1] else "--",
            label=method if len(ks) == 1 else f"{method}, top-{k}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax, sorted(latency["n"].unique()))
    ax.set_xlabel("indexed images N")
    top = f"top-{ks[0]}" if len(ks) == 1 else "/".join(f"top-{k}" for k in ks)
    ax.set_ylabel(("CPU " if column.startswith("cpu") else "") + f"ms per query ({top}, batched)")
    ax.set_title("Latency per query")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax = axes[0, 1]
    if ia is not None and len(ia):
        part = ia.sort_values("n")
        ax.plot(part["n"], part["IA@1"], marker="o", color=_COLORS[METHODS[0]], label="DSI (random IDs)")
        for _, r in part.iterrows():
            ax.annotate(
                f"{r['IA@1']:.3f}\n{int(r['epochs'])} ep\n{r['train_s'] / 60:.0f} min",
                (r["n"], r["IA@1"]),
                textcoords="offset points",
                xytext=(0, -34),
                ha="center",
                fontsize=7,
            )
        ax.axhline(0.95, color="k", ls=":", lw=1, label="target 0.95")
        ax.set_xscale("log")
        ax.set_xlim(min(part["n"].min(), latency["n"].min()) / 1.3, max(part["n"].max(), latency["n"].max()) * 1.3)
        _plain_log_ticks(ax, sorted(set(latency["n"]) | set(part["n"])), y=False)
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no DSI trained", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("indexed images N")
    ax.set_ylabel("IA@1")
    ax.set_title("Indexing accuracy of a DSI trained on N images")
    ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def scale_markdown(latency: pd.DataFrame, ia: pd.DataFrame | None, settings: dict[str, Any]) -> str:
    """The latency tables (ms per query and build seconds, method by N; one table per list length k),
    the DSI-to-dense ratio at the largest N, and the IA@1 table, with their settings."""
    columns = [m for m in METHODS if m in set(latency["method"])]
    latency = latency.assign(k=latency["k"] if "k" in latency else settings.get("k"))
    ks = sorted(latency["k"].unique())
    on_cpu = "cpu_ms_per_query" in latency
    shown_k = " and ".join(f"top-{k}" for k in ks)
    parts = [
        f"Scale study, {settings.get('source', 'imagenette')} at {settings.get('size')} px on {settings.get('device')}: "
        f"{shown_k} search for a batch of {settings.get('queries')} queries (median of "
        f"{settings.get('repeats')} repeats after one warm-up call), milliseconds per query (CPU time of the process "
        "and wall time), and the build time (DSI: codec and trie; BoVW: SIFT, k-means and histograms; dense: embedding the database and "
        "the flat index). DSI and dense encoder are untrained models of the study's size: latency does not "
        "depend on the weights. The DSI beam is k wide (incremental beam search, `decoding.beam_search`).",
    ]
    for k in ks:
        part = latency[latency["k"] == k]
        lat = part.pivot_table(index="n", columns="method", values="ms_per_query").reindex(columns=columns)
        build = part.pivot_table(index="n", columns="method", values="build_s").reindex(columns=columns)
        if on_cpu:
            cpu = part.pivot_table(index="n", columns="method", values="cpu_ms_per_query").reindex(columns=columns)
            table = (
                cpu.round(2).astype(str)
                + " ms CPU ("
                + lat.round(2).astype(str)
                + " ms wall; "
                + build.round(1).astype(str)
                + " s)"
            )
        else:
            table = lat.round(2).astype(str) + " ms (" + build.round(1).astype(str) + " s)"
        if len(ks) > 1:
            parts.append(f"Top-{k}:")
        parts.append(table.reset_index().to_markdown(index=False))
        ratio = _dsi_ratio(part, latency_column(latency))
        if ratio:
            parts.append(ratio)
    if ia is not None and len(ia):
        columns = [
            "n",
            "IA@1",
            "ia_beam",
            "target",
            "reached",
            "epochs",
            "max_epochs",
            "batch_size",
            "lr",
            "stop_rule",
            "train_s",
            "s_per_epoch",
            "size",
            "ids",
        ]
        shown = ia[[c for c in columns if c in ia]]  # tables written before a column existed lack it
        parts += [
            "DSI trained to memorise N images (indexing until IA@1 >= target or the epoch cap):",
            shown.round(3).to_markdown(index=False),
        ]
    return "\n\n".join(parts)


def _dsi_ratio(latency: pd.DataFrame, column: str) -> str | None:
    """'At N = 13394, top-100: DSI beam search 9.1 ms per query, 14x dense search and 4x BoVW' (None without a DSI row)."""
    n = latency["n"].max()
    at = latency[latency["n"] == n].set_index("method")[column]
    if METHODS[0] not in at:
        return None
    others = [
        f"{at[METHODS[0]] / at[m]:.1f}x {name}"
        for m, name in ((METHODS[2], "dense search"), (METHODS[1], "BoVW"))
        if m in at
    ]
    unit = "CPU ms" if column.startswith("cpu") else "ms"
    return (
        f"At N = {n}, top-{latency['k'].iloc[0]}: DSI beam search {at[METHODS[0]]:.2f} {unit} per query"
        + (", " + " and ".join(others) if others else "")
        + "."
    )
