"""The clusters study (notebook 09): k-means over the trained encoders' embeddings, scored against the classes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from vitdsi_utils.baselines.dense import load_dense
from vitdsi_utils.clusters import METRIC_LABELS, METRICS, cluster_sizes, elbow_k, sweep
from vitdsi_utils.devices import resolve_device
from vitdsi_utils.reports.plots import IRRELEVANT_COLOR, RELEVANT_COLOR, new_figure, readable_class, show_image
from vitdsi_utils.runs import load_trained


def cluster_study(
    embeddings: Mapping[tuple[str, str], np.ndarray],
    classes: Any,
    ks: Sequence[int],
    *,
    n_init: int = 1,
    random_state: int = 0,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[tuple[str, str, int], np.ndarray]]:
    """:func:`sweep` for every (encoder, pooling) -> embeddings: (long table with columns encoder, pooling, k, ...; labels)."""
    from tqdm.auto import tqdm

    frames, labels = [], {}
    for (encoder, pooling), x in tqdm(embeddings.items(), desc="k-means", disable=not progress):
        table, by_k = sweep(x, ks, classes, n_init=n_init, random_state=random_state)
        frames.append(table.assign(encoder=encoder, pooling=pooling, dim=np.asarray(x).shape[1]))
        labels.update({(encoder, pooling, k): clusters for k, clusters in by_k.items()})
    columns = ["encoder", "pooling", "dim", "k"]
    table = pd.concat(frames, ignore_index=True)
    return table[columns + [c for c in table.columns if c not in columns]], labels


def summary(table: pd.DataFrame, k_reference: int) -> pd.DataFrame:
    """Per (encoder, pooling): the elbow k, the k of best silhouette and of best Davies-Bouldin, and the scores at ``k_reference``."""
    rows = []
    for (encoder, pooling), group in table.groupby(["encoder", "pooling"], sort=False):
        at = group.set_index("k")
        row = {
            "encoder": encoder,
            "pooling": pooling,
            "dim": int(group["dim"].iloc[0]),
            "elbow_k": elbow_k(group["k"], group["inertia"]) if len(group) >= 3 else np.nan,
            "best_silhouette_k": int(at["silhouette"].idxmax()),
            "best_davies_bouldin_k": int(at["davies_bouldin"].idxmin()),
        }
        if k_reference in at.index:
            row.update({f"{m}@k{k_reference}": at.at[k_reference, m] for m in METRICS if m in at.columns})
        rows.append(row)
    return pd.DataFrame(rows)


def clusters_markdown(table: pd.DataFrame, k_reference: int, note: str = "") -> str:
    """The sweep as Markdown: the summary per embedding, then every (encoder, pooling, k) row."""
    wide = summary(table, k_reference)
    shown = table.drop(columns=["seconds"]).round(4)
    return "\n\n".join(
        part
        for part in [
            note,
            f"### Per embedding: chosen k and the scores at k = {k_reference}",
            wide.round(3).to_markdown(index=False),
            "### Every k",
            shown.to_markdown(index=False),
        ]
        if part
    )


def study_encoders(
    paths: Any, dbs: Mapping[str, Any], profile: str, dataset: str | None = None, device: str = "auto"
) -> dict[str, torch.nn.Module]:
    """The encoders the study trained for these databases: {name: model in eval mode on ``device``}
    ("auto": CUDA when there is one).

    ``dbs`` maps an ID scheme to its database; for each, the zero-shot (notebook 03) and fine-tuned
    (notebook 04) DSI are loaded from ``paths.run_dir(db)``; the dense encoder (notebook 07, one per
    database, saved beside the first scheme's DSI models) is added as 'Dense'. A missing model is an
    error that names the notebook which trains it.
    """

    encoders: dict[str, torch.nn.Module] = {}
    for scheme, db in dbs.items():
        for name, file in (("DSI zero-shot", "zero_shot.pt"), ("DSI fine-tuned", "fine_tuned.pt")):
            model, _, _ = load_trained(paths.run_dir(db) / file, profile, device=device, dataset=dataset)
            encoders[f"{name} ({scheme})"] = model.eval()
    first = next(iter(dbs.values()))
    dense_path = paths.run_dir(first) / "dense.pt"
    if not dense_path.is_file():
        raise FileNotFoundError(
            f"{dense_path} does not exist: notebook 07_dense trains it; run `vitdsi study "
            f"--profile {profile}{f' --dataset {dataset}' if dataset else ''} --start-at 07_dense`"
        )
    encoders["Dense"], _ = load_dense(dense_path, map_location=resolve_device(device))
    return encoders


# ------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------
def series_label(encoder: str, pooling: str) -> str:
    """'Dense · cls', or just the encoder's name for a reference without pooling ('-')."""
    return encoder if pooling == "-" else f"{encoder} · {pooling}"


def metric_curves(table: pd.DataFrame, metrics: Sequence[str] = tuple(METRICS), title: str | None = None) -> Figure:
    """One panel per metric against k, one line per (encoder, pooling); a star marks each line's elbow k.

    Colour says the encoder, line style the pooling (solid: cls, dashed: mean, dotted: concat,
    dash-dot: an untrained reference).
    """

    metrics = [m for m in metrics if m in table.columns]
    fig, axes = new_figure(1, len(metrics), (3.6 * len(metrics), 3.4))
    styles = {"cls": "-", "mean": "--", "concat": ":", "-": "-."}
    colors = {encoder: f"C{i % 10}" for i, encoder in enumerate(table["encoder"].unique())}  # one per encoder
    for (encoder, pooling), group in table.groupby(["encoder", "pooling"], sort=False):
        group = group.sort_values("k")
        color = colors[encoder]
        elbow = elbow_k(group["k"], group["inertia"]) if len(group) >= 3 else None
        for ax, metric in zip(axes[0], metrics):
            ax.plot(
                group["k"],
                group[metric],
                styles.get(pooling, "-"),
                marker="o",
                markersize=3,
                color=color,
                label=series_label(encoder, pooling),
            )
            if elbow is not None:
                at = group[group["k"] == elbow]
                ax.plot(at["k"], at[metric], "*", markersize=11, color=color, markeredgecolor="k", markeredgewidth=0.5)
    for ax, metric in zip(axes[0], metrics):
        ax.set_xlabel("k (clusters)")
        ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # outside the panels, on the right: save_figure and the notebook both crop to what is drawn
    fig.legend(
        handles,
        labels,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=7,
        title="encoder · pooling (star: elbow k)",
        title_fontsize=7,
    )
    return fig


def size_histograms(sizes: Mapping[str, np.ndarray], title: str | None = None, columns: int = 4) -> Figure:
    """One panel per clustering: a histogram of its cluster sizes, the dashed line at equal sizes (n / k)."""

    from matplotlib.ticker import MaxNLocator

    rows = -(-len(sizes) // columns)
    fig, axes = new_figure(rows, columns, (3.0 * columns, 2.4 * rows))
    largest = max(int(np.max(s)) for s in sizes.values())
    bins = np.linspace(0, largest + 1, min(25, largest + 2))
    for ax, (label, s) in zip(axes.flat, sizes.items()):
        ax.hist(s, bins=bins, color="C0", alpha=0.8)
        ax.axvline(np.sum(s) / len(s), color="k", linestyle="--", linewidth=1)
        ax.set_title(f"{label}\n(k = {len(s)}, largest {int(np.max(s))})", fontsize=7)
        ax.set_xlim(0, largest + 1)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("images in the cluster", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(sizes) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("clusters", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def cluster_gallery(
    images: np.ndarray,
    clusters: Any,
    classes: Any,
    class_names: Sequence[str],
    *,
    n_clusters: int = 4,
    per_cluster: int = 8,
    seed: int = 0,
    title: str | None = None,
) -> Figure:
    """The ``n_clusters`` largest clusters, one row each: ``per_cluster`` random members as thumbnails.

    A row is labelled with the cluster's size and its majority class; a thumbnail is framed in
    green when its class is the majority class of its cluster, in red otherwise.
    """

    clusters, classes = np.asarray(clusters), np.asarray(classes)
    if len(images) != len(clusters) or len(clusters) != len(classes):
        raise ValueError(f"images ({len(images)}), clusters ({len(clusters)}) and classes ({len(classes)}) must align")
    sizes = cluster_sizes(clusters)
    largest = np.argsort(-sizes, kind="stable")[:n_clusters]
    rng = np.random.default_rng(seed)
    fig, axes = new_figure(len(largest), per_cluster, (0.85 * per_cluster + 1.8, 0.95 * len(largest) + 0.4))
    for r, cluster in enumerate(largest):
        members = np.flatnonzero(clusters == cluster)
        majority = np.bincount(classes[members]).argmax()
        share = np.mean(classes[members] == majority)
        picked = rng.choice(members, size=min(per_cluster, len(members)), replace=False)
        for c in range(per_cluster):
            ax = axes[r, c]
            if c < len(picked):
                i = picked[c]
                show_image(ax, images[i], border=RELEVANT_COLOR if classes[i] == majority else IRRELEVANT_COLOR)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(
            f"{len(members)} images\n{share:.0%} {readable_class(class_names[majority])}",
            rotation=0,
            ha="right",
            va="center",
            fontsize=7,
        )
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
