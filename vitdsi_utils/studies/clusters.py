"""The clusters study (notebook 09): k-means over the trained encoders' embeddings, scored against the classes.

:func:`run` runs a :class:`ClustersSpec` on the models a profile's study trained (notebooks 03, 04
and 07): it embeds one database's images with every encoder and pooling, sweeps k-means over k,
and writes the tables and figures notebook 09 shows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from vitdsi_utils import clusters
from vitdsi_utils.baselines.dense import load_dense
from vitdsi_utils.clusters import METRIC_LABELS, METRICS, cluster_sizes, elbow_k, sweep
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import SIZES
from vitdsi_utils.devices import resolve_device
from vitdsi_utils.ids.codec import ID_SCHEMES
from vitdsi_utils.ids.schemes import bovw_embeddings, pixel_embeddings
from vitdsi_utils.reports.plots import (
    IRRELEVANT_COLOR,
    RELEVANT_COLOR,
    new_figure,
    readable_class,
    save_figure,
    show_image,
)
from vitdsi_utils.reports.tables import write_table
from vitdsi_utils.runs import DENSE_FILE, DSI_MODEL_FILES, StudyPaths, load_trained
from vitdsi_utils.studies.specs import ImageSourceSpec, SpecError, check_choices, spec_images

#: Images a clustering can take: every image of the database, or one role's.
ROLES = ("all", "index", "train", "val", "test")


#: How an image becomes one vector (see :func:`vitdsi_utils.clusters.embed`).
CLUSTER_POOLINGS = ("cls", "mean", "concat")


#: Untrained reference embeddings: (row name, maker of the embeddings from the images, words, seed).
REFERENCES = {
    "pixels": ("pixels (untrained)", lambda images, words, seed: pixel_embeddings(images, side=8)),
    "bovw": ("BoVW tf-idf (untrained)", lambda images, words, seed: bovw_embeddings(images, n_words=words, seed=seed)),
}


@dataclass
class ClustersSpec(ImageSourceSpec):
    """Settings of the clusters study (notebook 09).

    The images of the database of size ``n`` (null: the largest of ``ns``, the databases the study
    trained) and ``seed``, the ``role`` ones, are embedded by the DSI models of every scheme of
    ``schemes`` and by the dense encoder, each with every pooling of ``poolings`` it offers, and by
    the untrained ``baselines``; k-means (``n_init`` restarts) runs for every k of ``ks`` and the
    reference k (``gallery_k``; null: the number of classes), whose largest clusters are shown.
    """

    size: int = field(default=64, metadata={"choices": SIZES})
    ns: tuple[int, ...] = (512, 1024)
    schemes: tuple[str, ...] = field(default=("clustered", "random"), metadata={"choices": ID_SCHEMES})
    seed: int = 0
    n: int | None = None
    role: str = field(default="all", metadata={"choices": ROLES})
    poolings: tuple[str, ...] = field(default=CLUSTER_POOLINGS, metadata={"choices": CLUSTER_POOLINGS})
    normalise: bool = True  # L2-normalise the embeddings first (k-means then groups by cosine similarity)
    baselines: tuple[str, ...] = field(default=("pixels", "bovw"), metadata={"choices": tuple(REFERENCES)})
    words: int = 200  # BoVW visual words of the bovw baseline
    ks: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 40, 50)
    n_init: int = 3
    gallery_k: int | None = None
    gallery_clusters: int = 4
    gallery_images: int = 8

    #: notebook profile keys (09_clusters) -> spec keys
    PROFILE_KEYS = {
        **ImageSourceSpec.PROFILE_KEYS,
        "SIZE": "size",
        "NS": "ns",
        "ID_SCHEMES": "schemes",
        "SEEDS": "seed[0]",
        "BOVW_WORDS": "words",
        "CLUSTER_N": "n",
        "CLUSTER_ROLE": "role",
        "CLUSTER_POOLINGS": "poolings",
        "CLUSTER_NORMALISE": "normalise",
        "CLUSTER_BASELINES": "baselines",
        "CLUSTER_KS": "ks",
        "CLUSTER_N_INIT": "n_init",
        "CLUSTER_GALLERY_K": "gallery_k",
        "CLUSTER_GALLERY_CLUSTERS": "gallery_clusters",
        "CLUSTER_GALLERY_IMAGES": "gallery_images",
    }

    def __post_init__(self) -> None:
        check_choices(self)
        n = self.n or max(self.ns)
        if n not in self.ns:
            raise SpecError(f"n: {n} is not one of ns = {list(self.ns)}: encoders are trained only for those databases")


class ClustersResult(NamedTuple):
    """What :func:`run` returns: the embeddings (width, seconds), the sweep, its summary per embedding,
    the scores on unseen images, the reference k and the figures by file stem."""

    embeddings: pd.DataFrame
    table: pd.DataFrame
    summary: pd.DataFrame
    unseen: pd.DataFrame
    k_reference: int
    figures: dict[str, Figure]


def run(spec: ClustersSpec, paths: StudyPaths) -> ClustersResult:
    """The clusters study of ``spec`` on the models in ``paths.runs`` (one run folder per database, as a
    profile's study keeps them); tables and figures to ``paths.tables`` and ``paths.figures``.

    Writes clusters, clusters_summary and clusters_unseen (CSV and Markdown) and the figures
    clusters_metrics, clusters_sizes, clusters_gallery_best and clusters_gallery_worst (PNG);
    prints what it clusters and how long the sweep took.
    """
    image_set = spec_images(spec)
    name = image_set.name
    n, seed = spec.n or max(spec.ns), spec.seed
    dbs = {scheme: build_database(image_set, n, id_scheme=scheme, seed=seed) for scheme in spec.schemes}
    db = dbs[spec.schemes[0]]  # every scheme draws the same images in the same roles
    if spec.role == "all":
        images, classes = db.images, db.manifest["label"].to_numpy()
    else:
        images, classes = db.split(spec.role)
    k_reference = spec.gallery_k or len(np.unique(classes))
    ks = sorted(set(spec.ks) | {k_reference})
    print(
        f"N={n} seed {seed}: {len(images)} images ({spec.role}) in {len(np.unique(classes))} classes; "
        f"k in {ks}; reference k = {k_reference}"
    )

    encoders = study_encoders(paths, dbs, paths.profile or "<profile>", dataset=spec.source)
    embeddings, rows = {}, []
    for encoder, model in encoders.items():
        for pooling in spec.poolings:
            if pooling not in clusters.available_poolings(model):
                continue
            start = time.perf_counter()
            embeddings[(encoder, pooling)] = clusters.embed(model, images, pooling=pooling, normalise=spec.normalise)
            rows.append((encoder, pooling, embeddings[(encoder, pooling)].shape[1], time.perf_counter() - start))
    for key in spec.baselines:
        encoder, make = REFERENCES[key]
        start = time.perf_counter()
        embeddings[(encoder, "-")] = make(images, spec.words, seed)
        rows.append((encoder, "-", embeddings[(encoder, "-")].shape[1], time.perf_counter() - start))
    missing = sorted(set(spec.poolings) - {pooling for _, pooling in embeddings})
    if missing:
        print(
            f"No encoder offers pooling {missing} (a class token exists only in a dense encoder with "
            "DENSE_POOLING = cls)."
        )

    start = time.perf_counter()
    table, labels = cluster_study(embeddings, classes, ks, n_init=spec.n_init, random_state=seed, progress=False)
    print(f"{len(table)} clusterings in {time.perf_counter() - start:.1f} s")
    note = (
        f"k-means of {len(images)} {name} images at {spec.size} px (database N = {n}, seed {seed}, role "
        f"{spec.role}), {spec.n_init} restart(s) per k, embeddings "
        f"{'L2-normalised' if spec.normalise else 'as they come'}, profile `{paths.profile}`."
    )
    write_table(table, paths.tables / "clusters", markdown=clusters_markdown(table, k_reference, note=note))
    chosen = summary(table, k_reference)
    write_table(chosen, paths.tables / "clusters_summary")
    roles = db.manifest["role"].to_numpy() if spec.role == "all" else np.full(len(classes), spec.role)
    unseen = unseen_scores(labels, classes, np.isin(roles, ["val", "test"]), k_reference)
    write_table(unseen, paths.tables / "clusters_unseen")

    figures = {
        "clusters_metrics": metric_curves(
            table, title=f"k-means of the embeddings ({name}, {spec.size} px, {len(images)} images)"
        ),
        "clusters_sizes": size_histograms(
            {series_label(e, p): cluster_sizes(labels[(e, p, k_reference)], k_reference) for e, p in embeddings},
            title=f"Cluster sizes at k = {k_reference}",
        ),
    }
    at_k = table[table["k"] == k_reference].sort_values("nmi", ascending=False)
    for tag, row in (("best", at_k.iloc[0]), ("worst", at_k.iloc[-1])):
        label = series_label(row["encoder"], row["pooling"])
        figures[f"clusters_gallery_{tag}"] = cluster_gallery(
            images,
            labels[(row["encoder"], row["pooling"], k_reference)],
            classes,
            db.classes,
            n_clusters=spec.gallery_clusters,
            per_cluster=spec.gallery_images,
            seed=seed,
            title=f"{tag} NMI at k = {k_reference}: {label} (NMI {row['nmi']:.2f})",
        )
    for stem, fig in figures.items():
        save_figure(fig, paths.figures / f"{stem}.png")
    widths = pd.DataFrame(rows, columns=["encoder", "pooling", "dim", "seconds"])
    return ClustersResult(widths, table, chosen, unseen, k_reference, figures)


def console_summary(spec: ClustersSpec, result: ClustersResult) -> str:
    """What the numbers say (:func:`describe`)."""
    return "\n".join(describe(result, spec.schemes))


def unseen_scores(
    labels: Mapping[tuple[str, str, int], np.ndarray], classes: Any, unseen: np.ndarray, k: int
) -> pd.DataFrame:
    """Purity, NMI and AMI of every embedding's clusters at ``k``, over all images and over the ``unseen`` ones only.

    One row per (encoder, pooling); the ``*_unseen`` columns are NaN (and ``n_unseen`` 0) when no image is unseen.
    """
    rows = []
    for (encoder, pooling, at), found in labels.items():
        if at != k:
            continue
        every = clusters.subset_scores(found, classes, np.ones(len(found), bool))
        held_out = clusters.subset_scores(found, classes, unseen) if unseen.any() else None
        rows.append(
            {
                "encoder": encoder,
                "pooling": pooling,
                "k": k,
                "purity": every["purity"],
                "nmi": every["nmi"],
                "ami": every["ami"],
                "n_unseen": held_out["n"] if held_out else 0,
                **{f"{m}_unseen": held_out[m] if held_out else np.nan for m in ("purity", "nmi", "ami")},
            }
        )
    return pd.DataFrame(rows)


def describe(result: ClustersResult, schemes: Sequence[str]) -> list[str]:
    """What the numbers say: every embedding at the reference k (with its chosen k), each scheme's DSI
    before and after fine-tuning, the scores on unseen images, and the embeddings that score highest."""
    k, chosen = result.k_reference, result.summary
    ref = result.table[result.table["k"] == k].set_index(["encoder", "pooling"])
    lines = []
    for (encoder, pooling), row in ref.sort_values("nmi", ascending=False).iterrows():
        best = chosen[(chosen["encoder"] == encoder) & (chosen["pooling"] == pooling)].iloc[0]
        lines.append(
            f"{series_label(encoder, pooling):42s} k={k}: NMI {row['nmi']:.3f}, purity "
            f"{row['purity']:.3f}, silhouette {row['silhouette']:.3f}, DB {row['davies_bouldin']:.2f}; "
            f"elbow k {best['elbow_k']}, best-silhouette k {best['best_silhouette_k']}"
        )
    for scheme in schemes:
        zero, tuned = f"DSI zero-shot ({scheme})", f"DSI fine-tuned ({scheme})"
        for pooling in ("mean", "concat", "cls"):
            if (zero, pooling) in ref.index:
                lines.append(
                    f"DSI {scheme} IDs, {pooling} pooling: NMI {ref.loc[(zero, pooling), 'nmi']:.3f} after indexing "
                    f"-> {ref.loc[(tuned, pooling), 'nmi']:.3f} after fine-tuning"
                )
    for row in result.unseen.sort_values("nmi", ascending=False).itertuples():
        lines.append(
            f"{series_label(row.encoder, row.pooling):42s} NMI {row.nmi:.3f} / AMI {row.ami:.3f} on all images, "
            f"{row.nmi_unseen:.3f} / {row.ami_unseen:.3f} on the {row.n_unseen} val/test queries"
        )
    lines.append(
        f"Highest silhouette at k={k}: {series_label(*ref['silhouette'].idxmax())}; highest NMI: "
        f"{series_label(*ref['nmi'].idxmax())}."
    )
    return lines


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
        for name, file in DSI_MODEL_FILES:
            model, _, _ = load_trained(paths.run_dir(db) / file, profile, device=device, dataset=dataset)
            encoders[f"{name} ({scheme})"] = model.eval()
    first = next(iter(dbs.values()))
    dense_path = paths.run_dir(first) / DENSE_FILE
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
