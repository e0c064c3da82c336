"""Clusters of image embeddings: do the study's encoders group images by class? (seed 002)

Seed 002 clusters ViT and DINOv2 embeddings of a photo collection with k-means over a range of
k, reads the silhouette, Davies-Bouldin and sum-of-squares ("elbow") curves, and looks at the
largest clusters. Here the encoders are the ones the study trains (the DSI's encoder before and
after retrieval fine-tuning, and the dense contrastive encoder), the images carry class labels,
so beside those label-free scores we can also ask whether the clusters follow the classes
(purity, normalised mutual information).

Stages, each a plain function:

* :func:`embed` turns uint8 images into one vector per image with a ViT encoder of the toolkit
  (``model.ViTEncoder`` and its subclasses ``DSIModel`` and ``dense.DenseEncoder``): the output of
  the class token (models that have one), the mean of the patch tokens, or all patch tokens
  concatenated (seed 002's "concatenation");
* :func:`kmeans` and :func:`cluster_scores` cluster one array and score the clustering;
* :func:`sweep` does that over a range of k, :func:`elbow_k` picks the elbow of the
  sum-of-squares curve, and :func:`cluster_study` runs the sweep for several embeddings;
* :func:`metric_curves`, :func:`size_histograms` and :func:`cluster_gallery` draw the figures.

Definitions (X the embeddings, c(i) the cluster of image i, y(i) its class, n images):

* silhouette: mean over images of ``(b - a) / max(a, b)``, with a the mean distance to the other
  members of its cluster and b the smallest mean distance to the members of another cluster;
  in [-1, 1], higher is better;
* Davies-Bouldin: mean over clusters of ``max_{j != i} (S_i + S_j) / M_ij``, with S the mean
  distance of a cluster's members to its centre and M the distance between centres; >= 0,
  lower is better;
* inertia: the sum of squared distances of the images to their cluster's centre (k-means'
  objective); ``inertia_ratio`` divides it by its value for k = 1 (the total sum of squares),
  so curves of embeddings of different scales can share an axis;
* purity: ``1/n sum_clusters max_class |cluster ∩ class|``, the share of images whose cluster's
  majority class is their own; 1 when every cluster holds one class (it grows with k, so read it
  beside NMI);
* NMI: the mutual information of clusters and classes over the arithmetic mean of their
  entropies (scikit-learn's default); 1 when clusters and classes coincide. It is not 0 for
  independent labels: it grows with k and shrinks with n, so a small sample of images looks
  better than it is. AMI (adjusted mutual information) subtracts the value expected by chance:
  about 0 for independent labels, 1 when they coincide.
"""
from __future__ import annotations

import time
from numbers import Integral
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from sklearn.cluster import KMeans
from sklearn.metrics import (adjusted_mutual_info_score, davies_bouldin_score, normalized_mutual_info_score,
                             silhouette_score)

__all__ = [
    "POOLINGS",
    "available_poolings",
    "embed",
    "kmeans",
    "purity",
    "cluster_sizes",
    "cluster_scores",
    "subset_scores",
    "sweep",
    "elbow_k",
    "cluster_study",
    "study_encoders",
    "summary",
    "series_label",
    "clusters_markdown",
    "metric_curves",
    "size_histograms",
    "cluster_gallery",
]

#: How tokens become one vector per image: the class token's output, the mean of the patch
#: tokens (the class token left out), or every patch token concatenated in grid order.
POOLINGS = ("cls", "mean", "concat")
#: The metrics of a sweep, with whether higher is better.
METRICS = {"silhouette": True, "davies_bouldin": False, "inertia_ratio": False, "purity": True, "nmi": True}
METRIC_LABELS = {"silhouette": "silhouette (higher is better)", "davies_bouldin": "Davies-Bouldin (lower is better)",
                 "inertia_ratio": "sum of squares / total (elbow)", "purity": "purity vs classes",
                 "nmi": "NMI vs classes"}


# ------------------------------------------------------------------------------------------
# Embeddings
# ------------------------------------------------------------------------------------------
def available_poolings(model: torch.nn.Module) -> tuple[str, ...]:
    """The poolings ``model`` supports: 'cls' only where it has a class token (a dense encoder with pooling='cls')."""
    has_cls = getattr(model, "cls_token", None) is not None
    return tuple(p for p in POOLINGS if p != "cls" or has_cls)


def embed(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    pooling: str = "mean",
    batch_size: int = 256,
    normalise: bool = True,
) -> np.ndarray:
    """Embeddings (n, D) float32 of uint8 images (n, S, S, 3) by a toolkit ViT encoder; (n, P * D) for 'concat'.

    ``model`` is any :class:`~vitdsi_utils.model.ViTEncoder` (a ``DSIModel``, a ``DenseEncoder``).
    It runs in eval mode (no dropout) without gradients, ``batch_size`` images at a time on the
    model's device, and is put back in the mode it was in. ``pooling`` is one of
    :data:`POOLINGS`; 'cls' needs a class token (see :func:`available_poolings`). With
    ``normalise`` every row is scaled to unit L2 norm, so Euclidean k-means groups by cosine
    similarity, the similarity the retrieval models use.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    cls_token = getattr(model, "cls_token", None)
    if pooling == "cls" and cls_token is None:
        raise ValueError(f"{type(model).__name__} has no class token, so pooling='cls' is impossible; "
                         f"use one of {available_poolings(model)}")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise TypeError("images must be uint8 (n, S, S, 3), as the data module stores them")
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n_prefix = 0 if cls_token is None else cls_token.shape[1]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                tokens = model.encode(images[start : start + batch_size].to(device), prefix=cls_token)  # (B, T + P, D)
                if pooling == "cls":
                    pooled = tokens[:, 0]
                elif pooling == "mean":
                    pooled = tokens[:, n_prefix:].mean(dim=1)
                else:
                    pooled = tokens[:, n_prefix:].flatten(1)  # (B, P * D)
                out.append(pooled.float().cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("no images to embed")
    vectors = torch.cat(out)
    if normalise:
        vectors = torch.nn.functional.normalize(vectors, dim=1)
    return vectors.numpy()


# ------------------------------------------------------------------------------------------
# One clustering
# ------------------------------------------------------------------------------------------
def _check_embeddings(x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"embeddings must be a numeric (n, d) array, got shape {x.shape} and dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    return x.astype(np.float64, copy=False)


def _check_k(k: Any, n: int) -> int:
    """k as an int, 2 <= k < n (silhouette and Davies-Bouldin need at least two clusters and one shared one)."""
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 2 <= k < n:
        raise ValueError(f"k={k} clusters of {n} embeddings: k must lie in [2, n - 1] = [2, {n - 1}] for the "
                         "silhouette to be defined; use a smaller k or more images")
    return int(k)


def kmeans(x: Any, k: int, *, n_init: int = 1, random_state: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means (scikit-learn, k-means++ seeding): (labels (n,) int64, centres (k, d) float64, inertia).

    Raises ValueError when k is outside [2, n - 1] or the embeddings have fewer than k distinct rows.
    """
    x = _check_embeddings(x)
    k = _check_k(k, len(x))
    distinct = len(np.unique(x, axis=0))
    if distinct < k:
        raise ValueError(f"only {distinct} distinct embeddings among {len(x)}, fewer than k={k} clusters; use k <= {distinct}")
    model = KMeans(n_clusters=k, n_init=n_init, random_state=random_state).fit(x)
    return model.labels_.astype(np.int64), model.cluster_centers_, float(model.inertia_)


def purity(classes: Any, clusters: Any) -> float:
    """Share of images whose cluster's majority class is their own (float in (0, 1])."""
    classes, clusters = np.asarray(classes), np.asarray(clusters)
    if classes.shape != clusters.shape or classes.ndim != 1 or len(classes) == 0:
        raise ValueError(f"classes and clusters must be two (n,) arrays of the same length, got {classes.shape} "
                         f"and {clusters.shape}")
    table = pd.crosstab(clusters, classes).to_numpy()  # (clusters, classes) counts
    return float(table.max(axis=1).sum() / len(classes))


def cluster_sizes(clusters: Any, k: int | None = None) -> np.ndarray:
    """Members per cluster (k,) int64 for labels 0..k-1 (k: the largest label + 1 by default); they sum to n."""
    clusters = np.asarray(clusters, dtype=np.int64)
    return np.bincount(clusters, minlength=k or 0)


def cluster_scores(x: Any, clusters: Any, classes: Any = None, *, inertia: float | None = None) -> dict[str, float]:
    """Scores of one clustering: silhouette, davies_bouldin, inertia, inertia_ratio and, with ``classes``, purity, nmi and ami.

    ``inertia`` is computed from the cluster means when not given. ``inertia_ratio`` divides it
    by the total sum of squares around the overall mean (the inertia of k = 1).
    """
    x = _check_embeddings(x)
    clusters = np.asarray(clusters, dtype=np.int64)
    if clusters.shape != (len(x),):
        raise ValueError(f"clusters must be ({len(x)},), one label per embedding; got {clusters.shape}")
    k = len(np.unique(clusters))
    _check_k(k, len(x))
    if inertia is None:
        centres = np.stack([x[clusters == c].mean(axis=0) for c in np.unique(clusters)])
        inertia = float(((x - centres[np.searchsorted(np.unique(clusters), clusters)]) ** 2).sum())
    total = float(((x - x.mean(axis=0)) ** 2).sum())
    scores = {
        "silhouette": float(silhouette_score(x, clusters)),
        "davies_bouldin": float(davies_bouldin_score(x, clusters)),
        "inertia": inertia,
        "inertia_ratio": inertia / total if total > 0 else float("nan"),
        "largest_share": float(cluster_sizes(clusters).max() / len(x)),
    }
    if classes is not None:
        scores["purity"] = purity(classes, clusters)
        scores["nmi"] = float(normalized_mutual_info_score(classes, clusters))
        scores["ami"] = float(adjusted_mutual_info_score(classes, clusters))
    return scores


def subset_scores(clusters: Any, classes: Any, mask: Any) -> dict[str, float]:
    """Purity, NMI and AMI of a clustering counted over the images where ``mask`` is True only, and their number ``n``.

    The clusters stay those found on every image; only the agreement with the classes is counted
    on the subset, e.g. on images that no encoder was trained on.
    """
    clusters, classes, mask = np.asarray(clusters), np.asarray(classes), np.asarray(mask, dtype=bool)
    if not clusters.shape == classes.shape == mask.shape:
        raise ValueError(f"clusters, classes and mask must have the same shape, got {clusters.shape}, "
                         f"{classes.shape} and {mask.shape}")
    if not mask.any():
        raise ValueError("the mask selects no image")
    return {"n": int(mask.sum()), "purity": purity(classes[mask], clusters[mask]),
            "nmi": float(normalized_mutual_info_score(classes[mask], clusters[mask])),
            "ami": float(adjusted_mutual_info_score(classes[mask], clusters[mask]))}


# ------------------------------------------------------------------------------------------
# Over a range of k, over several embeddings
# ------------------------------------------------------------------------------------------
def sweep(
    x: Any, ks: Sequence[int], classes: Any = None, *, n_init: int = 1, random_state: int = 0
) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """k-means for every k of ``ks``: (one row of :func:`cluster_scores` per k with ``k`` and ``seconds``, labels by k)."""
    x = _check_embeddings(x)
    ks = [_check_k(k, len(x)) for k in ks]
    if not ks:
        raise ValueError("ks is empty: pass the numbers of clusters to try, e.g. [2, 5, 10, 20]")
    rows, labels = [], {}
    for k in sorted(set(ks)):
        start = time.perf_counter()
        clusters, _, inertia = kmeans(x, k, n_init=n_init, random_state=random_state)
        rows.append({"k": k, **cluster_scores(x, clusters, classes, inertia=inertia),
                     "seconds": time.perf_counter() - start})
        labels[k] = clusters
    return pd.DataFrame(rows), labels


def elbow_k(ks: Sequence[int], inertia: Sequence[float]) -> int:
    """The elbow of a decreasing sum-of-squares curve: the k farthest below the chord from its first to its last point.

    Both axes are scaled to [0, 1] first (the "kneedle" rule), so the answer does not depend on
    the units of k or of the inertia. Needs at least three points.
    """
    ks, inertia = np.asarray(ks, dtype=float), np.asarray(inertia, dtype=float)
    if ks.shape != inertia.shape or len(ks) < 3:
        raise ValueError("elbow_k needs at least three (k, inertia) points of equal count")
    order = np.argsort(ks)
    ks, inertia = ks[order], inertia[order]
    span_k, span_i = ks[-1] - ks[0], inertia[0] - inertia[-1]
    if span_k <= 0 or span_i <= 0:
        return int(ks[0])
    u, v = (ks - ks[0]) / span_k, (inertia - inertia[-1]) / span_i  # v falls from 1 to 0
    return int(ks[np.argmax((1 - u) - v)])  # distance below the chord v = 1 - u


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
        row = {"encoder": encoder, "pooling": pooling, "dim": int(group["dim"].iloc[0]),
               "elbow_k": elbow_k(group["k"], group["inertia"]) if len(group) >= 3 else np.nan,
               "best_silhouette_k": int(at["silhouette"].idxmax()),
               "best_davies_bouldin_k": int(at["davies_bouldin"].idxmin())}
        if k_reference in at.index:
            row.update({f"{m}@k{k_reference}": at.at[k_reference, m] for m in METRICS if m in at.columns})
        rows.append(row)
    return pd.DataFrame(rows)


def clusters_markdown(table: pd.DataFrame, k_reference: int, note: str = "") -> str:
    """The sweep as Markdown: the summary per embedding, then every (encoder, pooling, k) row."""
    wide = summary(table, k_reference)
    shown = table.drop(columns=["seconds"]).round(4)
    return "\n\n".join(part for part in [
        note,
        f"### Per embedding: chosen k and the scores at k = {k_reference}",
        wide.round(3).to_markdown(index=False),
        "### Every k",
        shown.to_markdown(index=False),
    ] if part)


def study_encoders(paths: Any, dbs: Mapping[str, Any], profile: str, dataset: str | None = None,
                   device: str = "cpu") -> dict[str, torch.nn.Module]:
    """The encoders the study trained for these databases: {name: model in eval mode on ``device``}.

    ``dbs`` maps an ID scheme to its database; for each, the zero-shot (notebook 03) and fine-tuned
    (notebook 04) DSI are loaded from ``paths.run_dir(db)``; the dense encoder (notebook 07, one per
    database, saved beside the first scheme's DSI models) is added as 'Dense'. A missing model is an
    error that names the notebook which trains it.
    """
    from .dense import load_dense
    from .study import load_trained

    encoders: dict[str, torch.nn.Module] = {}
    for scheme, db in dbs.items():
        for name, file in (("DSI zero-shot", "zero_shot.pt"), ("DSI fine-tuned", "fine_tuned.pt")):
            model, _, _ = load_trained(paths.run_dir(db) / file, profile, device=device, dataset=dataset)
            encoders[f"{name} ({scheme})"] = model.eval()
    first = next(iter(dbs.values()))
    dense_path = paths.run_dir(first) / "dense.pt"
    if not dense_path.is_file():
        raise FileNotFoundError(f"{dense_path} does not exist: notebook 07_dense trains it; run `vitdsi study "
                                f"--profile {profile}{f' --dataset {dataset}' if dataset else ''} --start-at 07_dense`")
    encoders["Dense"], _ = load_dense(dense_path, map_location=device)
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
    from .plots import _new_figure

    metrics = [m for m in metrics if m in table.columns]
    fig, axes = _new_figure(1, len(metrics), (3.6 * len(metrics), 3.4))
    styles = {"cls": "-", "mean": "--", "concat": ":", "-": "-."}
    colors = {encoder: f"C{i % 10}" for i, encoder in enumerate(table["encoder"].unique())}  # one per encoder
    for (encoder, pooling), group in table.groupby(["encoder", "pooling"], sort=False):
        group = group.sort_values("k")
        color = colors[encoder]
        elbow = elbow_k(group["k"], group["inertia"]) if len(group) >= 3 else None
        for ax, metric in zip(axes[0], metrics):
            ax.plot(group["k"], group[metric], styles.get(pooling, "-"), marker="o", markersize=3, color=color,
                    label=series_label(encoder, pooling))
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
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
               title="encoder · pooling (star: elbow k)", title_fontsize=7)
    return fig


def size_histograms(sizes: Mapping[str, np.ndarray], title: str | None = None, columns: int = 4) -> Figure:
    """One panel per clustering: a histogram of its cluster sizes, the dashed line at equal sizes (n / k)."""
    from .plots import _new_figure

    from matplotlib.ticker import MaxNLocator

    rows = -(-len(sizes) // columns)
    fig, axes = _new_figure(rows, columns, (3.0 * columns, 2.4 * rows))
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
    for ax in axes.flat[len(sizes):]:
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
    from .plots import IRRELEVANT_COLOR, RELEVANT_COLOR, _new_figure, _show_image, readable_class

    clusters, classes = np.asarray(clusters), np.asarray(classes)
    if len(images) != len(clusters) or len(clusters) != len(classes):
        raise ValueError(f"images ({len(images)}), clusters ({len(clusters)}) and classes ({len(classes)}) must align")
    sizes = cluster_sizes(clusters)
    largest = np.argsort(-sizes, kind="stable")[:n_clusters]
    rng = np.random.default_rng(seed)
    fig, axes = _new_figure(len(largest), per_cluster, (0.85 * per_cluster + 1.8, 0.95 * len(largest) + 0.4))
    for r, cluster in enumerate(largest):
        members = np.flatnonzero(clusters == cluster)
        majority = np.bincount(classes[members]).argmax()
        share = np.mean(classes[members] == majority)
        picked = rng.choice(members, size=min(per_cluster, len(members)), replace=False)
        for c in range(per_cluster):
            ax = axes[r, c]
            if c < len(picked):
                i = picked[c]
                _show_image(ax, images[i], border=RELEVANT_COLOR if classes[i] == majority else IRRELEVANT_COLOR)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(f"{len(members)} images\n{share:.0%} {readable_class(class_names[majority])}",
                              rotation=0, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
