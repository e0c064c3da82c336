"""Clusters of image embeddings: do the study's encoders group images by class? ("Down Memory Lane")

"Vision Transformers Down Memory Lane" (``docs/protocol.md``) clusters ViT and DINOv2 embeddings of a photo collection with k-means over a range of
k, reads the silhouette, Davies-Bouldin and sum-of-squares ("elbow") curves, and looks at the
largest clusters. Here the encoders are the ones the study trains (the DSI's encoder before and
after retrieval fine-tuning, and the dense contrastive encoder), the images carry class labels,
so beside those label-free scores we can also ask whether the clusters follow the classes
(purity, normalised mutual information).

Stages, each a plain function:

* :func:`embed` turns uint8 images into one vector per image with a ViT encoder of the toolkit
  (``model.vit.ViTEncoder`` and its subclasses ``DSIModel`` and ``baselines.dense.DenseEncoder``): the output of
  the class token (models that have one), the mean of the patch tokens, or all patch tokens
  concatenated (that text's "concatenation");
* :func:`kmeans` and :func:`cluster_scores` cluster one array and score the clustering;
* :func:`sweep` does that over a range of k and :func:`elbow_k` picks the elbow of the
  sum-of-squares curve; the study over several encoders, and its figures, are
  :mod:`vitdsi_utils.studies.clusters`.

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
from collections.abc import Sequence
from numbers import Integral
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import (
    adjusted_mutual_info_score,
    davies_bouldin_score,
    normalized_mutual_info_score,
    silhouette_score,
)

#: How tokens become one vector per image: the class token's output, the mean of the patch
#: tokens (the class token left out), or every patch token concatenated in grid order.
POOLINGS = ("cls", "mean", "concat")


#: The metrics of a sweep, with whether higher is better.
METRICS = {"silhouette": True, "davies_bouldin": False, "inertia_ratio": False, "purity": True, "nmi": True}


METRIC_LABELS = {
    "silhouette": "silhouette (higher is better)",
    "davies_bouldin": "Davies-Bouldin (lower is better)",
    "inertia_ratio": "sum of squares / total (elbow)",
    "purity": "purity vs classes",
    "nmi": "NMI vs classes",
}


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

    ``model`` is any :class:`~vitdsi_utils.model.vit.ViTEncoder` (a ``DSIModel``, a ``DenseEncoder``).
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
        raise ValueError(
            f"{type(model).__name__} has no class token, so pooling='cls' is impossible; "
            f"use one of {available_poolings(model)}"
        )
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
        raise ValueError(
            f"k={k} clusters of {n} embeddings: k must lie in [2, n - 1] = [2, {n - 1}] for the "
            "silhouette to be defined; use a smaller k or more images"
        )
    return int(k)


def kmeans(x: Any, k: int, *, n_init: int = 1, random_state: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means (scikit-learn, k-means++ seeding): (labels (n,) int64, centres (k, d) float64, inertia).

    Raises ValueError when k is outside [2, n - 1] or the embeddings have fewer than k distinct rows.
    """
    x = _check_embeddings(x)
    k = _check_k(k, len(x))
    distinct = len(np.unique(x, axis=0))
    if distinct < k:
        raise ValueError(
            f"only {distinct} distinct embeddings among {len(x)}, fewer than k={k} clusters; use k <= {distinct}"
        )
    model = KMeans(n_clusters=k, n_init=n_init, random_state=random_state).fit(x)
    return model.labels_.astype(np.int64), model.cluster_centers_, float(model.inertia_)


def purity(classes: Any, clusters: Any) -> float:
    """Share of images whose cluster's majority class is their own (float in (0, 1])."""
    classes, clusters = np.asarray(classes), np.asarray(clusters)
    if classes.shape != clusters.shape or classes.ndim != 1 or len(classes) == 0:
        raise ValueError(
            f"classes and clusters must be two (n,) arrays of the same length, got {classes.shape} and {clusters.shape}"
        )
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
        raise ValueError(
            f"clusters, classes and mask must have the same shape, got {clusters.shape}, "
            f"{classes.shape} and {mask.shape}"
        )
    if not mask.any():
        raise ValueError("the mask selects no image")
    return {
        "n": int(mask.sum()),
        "purity": purity(classes[mask], clusters[mask]),
        "nmi": float(normalized_mutual_info_score(classes[mask], clusters[mask])),
        "ami": float(adjusted_mutual_info_score(classes[mask], clusters[mask])),
    }


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
        rows.append(
            {"k": k, **cluster_scores(x, clusters, classes, inertia=inertia), "seconds": time.perf_counter() - start}
        )
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
