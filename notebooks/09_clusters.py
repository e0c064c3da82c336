# %% [markdown]
# # 09 · Embedding clusters: do the encoders group images by class?
#
# Seed 002 clusters ViT and DINOv2 embeddings of a photo collection with k-means, for a range of k. It
# reads the silhouette, Davies-Bouldin and sum-of-squares curves to choose k, and it looks at the
# largest clusters. Here the same is done with the encoders this study trained, on the images of one
# database (`CLUSTER_N`):
#
# - the DSI's encoder after indexing (zero-shot, notebook 03) and after retrieval fine-tuning
#   (notebook 04), for each ID scheme;
# - the dense contrastive encoder (notebook 07);
# - two untrained references: 8x8 average-pooled pixels and tf-idf BoVW histograms.
#
# An image becomes one vector in one of three ways: the output of the class token (only the dense
# encoder can have one, when `DENSE_POOLING` is `cls`); the mean of the patch tokens; or all patch
# tokens concatenated. With `CLUSTER_NORMALISE` every vector is scaled to unit length first, so
# k-means groups images by cosine similarity, the similarity used for retrieval.
#
# Unlike the photos of seed 002, these images have classes. So beside the label-free scores we can
# ask whether the clusters follow the classes. *Purity* is the share of images whose cluster's
# majority class is their own. *NMI* is the normalised mutual information of clusters and classes:
# 1 when they coincide, near 0 when they are independent. *AMI* is the same corrected for chance, which
# matters for small sets of images.

# %% tags=["parameters"]
# Parameters: the smoke profile's values. `vitdsi study --profile NAME` replaces them with
# those of vitdsi_utils/profiles/NAME.yaml (smoke, cpu or paper).
# DATASET: imagenette | digits | coco (coco reads VITDSI_COCO_IMAGES and VITDSI_COCO_ANNOTATIONS).
PROFILE = "smoke"                             # cpu: "cpu"
DATASET = "digits"                            # cpu: "imagenette"
SIZE = 32                                     # cpu: 64
NS = [200]                                    # cpu: [512, 1024]
ID_SCHEMES = ["clustered", "random"]
SEEDS = [0]
BOVW_WORDS = 50                               # cpu: 200
CLUSTER_N = None
CLUSTER_ROLE = "all"
CLUSTER_POOLINGS = ["cls", "mean", "concat"]
CLUSTER_NORMALISE = True
CLUSTER_BASELINES = ["pixels", "bovw"]
CLUSTER_KS = [2, 4, 6, 10, 15]                # cpu: [2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 40, 50]
CLUSTER_N_INIT = 1                            # cpu: 3
CLUSTER_GALLERY_K = None
CLUSTER_GALLERY_CLUSTERS = 3                  # cpu: 4
CLUSTER_GALLERY_IMAGES = 6                    # cpu: 8
OUT_DIR = None                                # tables/ and figures/ go here; None: reports/<PROFILE>
RUNS_DIR = None                               # trained models, one folder per database; None: data/runs/<PROFILE>

# %%
import time

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from vitdsi_utils import clusters
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies.clusters import cluster_gallery, cluster_study, clusters_markdown, metric_curves, series_label, size_histograms, study_encoders, summary
from vitdsi_utils.ids.schemes import bovw_embeddings, pixel_embeddings
from vitdsi_utils.reports.tables import write_table

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
image_set = load_images(DATASET, SIZE, progress=False)
n, seed = CLUSTER_N or max(NS), SEEDS[0]
if n not in NS:
    raise ValueError(f"CLUSTER_N = {n} is not one of NS = {NS}: encoders are trained only for the databases of NS")
dbs = {scheme: build_database(image_set, n, id_scheme=scheme, seed=seed) for scheme in ID_SCHEMES}
db = dbs[ID_SCHEMES[0]]  # every scheme draws the same images in the same roles
if CLUSTER_ROLE == "all":
    images, classes = db.images, db.manifest["label"].to_numpy()
else:
    images, classes = db.split(CLUSTER_ROLE)
k_reference = CLUSTER_GALLERY_K or len(np.unique(classes))
ks = sorted(set(CLUSTER_KS) | {k_reference})
print(f"N={n} seed {seed}: {len(images)} images ({CLUSTER_ROLE}) in {len(np.unique(classes))} classes; "
      f"k in {ks}; reference k = {k_reference}")

# %% [markdown]
# ## Embeddings
#
# One row per embedding: its width and the time it took (every image, one pass of the encoder).

# %%
encoders = study_encoders(paths, dbs, PROFILE, dataset=DATASET)
embeddings, rows = {}, []
for name, model in encoders.items():
    for pooling in CLUSTER_POOLINGS:
        if pooling not in clusters.available_poolings(model):
            continue
        start = time.perf_counter()
        embeddings[(name, pooling)] = clusters.embed(model, images, pooling=pooling, normalise=CLUSTER_NORMALISE)
        rows.append((name, pooling, embeddings[(name, pooling)].shape[1], time.perf_counter() - start))
references = {"pixels": ("pixels (untrained)", lambda: pixel_embeddings(images, side=8)),
              "bovw": ("BoVW tf-idf (untrained)", lambda: bovw_embeddings(images, n_words=BOVW_WORDS, seed=seed))}
for key in CLUSTER_BASELINES:
    name, make = references[key]
    start = time.perf_counter()
    embeddings[(name, "-")] = make()
    rows.append((name, "-", embeddings[(name, "-")].shape[1], time.perf_counter() - start))
missing = sorted({p for p in CLUSTER_POOLINGS} - {pooling for _, pooling in embeddings})
if missing:
    print(f"No encoder offers pooling {missing} (a class token exists only in a dense encoder with DENSE_POOLING = cls).")
pd.DataFrame(rows, columns=["encoder", "pooling", "dim", "seconds"]).round(2)

# %% [markdown]
# ## k-means over k
#
# For every embedding and every k: k-means (`CLUSTER_N_INIT` restarts), then the scores. The star on
# each line marks its elbow: the k farthest below the straight line joining the two ends of the
# sum-of-squares curve, both axes scaled to [0, 1]. Silhouette and Davies-Bouldin use distances only;
# purity and NMI compare with the classes. Purity rises with k by construction (many small clusters
# are each nearly pure), so read it beside NMI.

# %%
start = time.perf_counter()
table, labels = cluster_study(embeddings, classes, ks, n_init=CLUSTER_N_INIT, random_state=seed,
                                       progress=False)
print(f"{len(table)} clusterings in {time.perf_counter() - start:.1f} s")
note = (f"k-means of {len(images)} {DATASET} images at {SIZE} px (database N = {n}, seed {seed}, role {CLUSTER_ROLE}), "
        f"{CLUSTER_N_INIT} restart(s) per k, embeddings {'L2-normalised' if CLUSTER_NORMALISE else 'as they come'}, "
        f"profile `{PROFILE}`.")
write_table(table, paths.tables / "clusters", markdown=clusters_markdown(table, k_reference, note=note))
chosen = summary(table, k_reference)
write_table(chosen, paths.tables / "clusters_summary")
chosen.round(3)

# %% [markdown]
# ### On images no encoder was trained on
#
# The DSI and dense encoders were trained on the indexed images and the train queries. The clusters
# above are found on all images, so part of their agreement with the classes may come from images
# the encoder has seen with their labels. The table counts purity, NMI and AMI at the reference k
# again, over the validation and test queries only (the same clusters). On a small subset NMI and
# purity rise by chance alone; AMI is corrected for chance, so compare AMI across the two columns.

# %%
roles = db.manifest["role"].to_numpy() if CLUSTER_ROLE == "all" else np.full(len(classes), CLUSTER_ROLE)
unseen = np.isin(roles, ["val", "test"])
rows = []
for encoder, pooling in embeddings:
    found = labels[(encoder, pooling, k_reference)]
    every, held_out = clusters.subset_scores(found, classes, np.ones(len(found), bool)), None
    if unseen.any():
        held_out = clusters.subset_scores(found, classes, unseen)
    rows.append({"encoder": encoder, "pooling": pooling, "k": k_reference, "purity": every["purity"], "nmi": every["nmi"],
                 "ami": every["ami"], "n_unseen": held_out["n"] if held_out else 0,
                 **{f"{m}_unseen": held_out[m] if held_out else np.nan for m in ("purity", "nmi", "ami")}})
unseen_table = pd.DataFrame(rows)
write_table(unseen_table, paths.tables / "clusters_unseen")
unseen_table.round(3)

# %%
fig = metric_curves(table, title=f"k-means of the embeddings ({DATASET}, {SIZE} px, {len(images)} images)")
save_figure(fig, paths.figures / "clusters_metrics.png")
fig

# %% [markdown]
# ## Cluster sizes at the reference k
#
# At k = the number of classes (or `CLUSTER_GALLERY_K`): how many images each cluster holds. The
# dashed line is the size of equal clusters. An encoder that follows the classes gives sizes near it,
# because the database is balanced. One or two giant clusters mean that most images look alike to
# the encoder.

# %%
sizes = {series_label(encoder, pooling): clusters.cluster_sizes(labels[(encoder, pooling, k_reference)],
                                                                          k_reference)
         for encoder, pooling in embeddings}
fig = size_histograms(sizes, title=f"Cluster sizes at k = {k_reference}")
save_figure(fig, paths.figures / "clusters_sizes.png")
fig

# %% [markdown]
# ## The largest clusters
#
# The embeddings with the highest and the lowest NMI at the reference k. Each row is one of the
# largest clusters: random members, framed in green when they belong to the cluster's majority class
# and in red otherwise.

# %%
at_k = table[table["k"] == k_reference].sort_values("nmi", ascending=False)
picks = {"best": at_k.iloc[0], "worst": at_k.iloc[-1]}
figures = []
for tag, row in picks.items():
    label = series_label(row["encoder"], row["pooling"])
    fig = cluster_gallery(images, labels[(row["encoder"], row["pooling"], k_reference)], classes, db.classes,
                                   n_clusters=CLUSTER_GALLERY_CLUSTERS, per_cluster=CLUSTER_GALLERY_IMAGES, seed=seed,
                                   title=f"{tag} NMI at k = {k_reference}: {label} (NMI {row['nmi']:.2f})")
    save_figure(fig, paths.figures / f"clusters_gallery_{tag}.png")
    figures.append(fig)
figures[0]

# %%
figures[1]

# %% [markdown]
# ## What the numbers say
#
# Computed from the table, not written in advance.

# %%
ref = table[table["k"] == k_reference].set_index(["encoder", "pooling"])
for (encoder, pooling), row in ref.sort_values("nmi", ascending=False).iterrows():
    best = chosen[(chosen["encoder"] == encoder) & (chosen["pooling"] == pooling)].iloc[0]
    print(f"{series_label(encoder, pooling):42s} k={k_reference}: NMI {row['nmi']:.3f}, purity "
          f"{row['purity']:.3f}, silhouette {row['silhouette']:.3f}, DB {row['davies_bouldin']:.2f}; "
          f"elbow k {best['elbow_k']}, best-silhouette k {best['best_silhouette_k']}")
for scheme in ID_SCHEMES:
    pairs = [(p, ref.loc[(f"DSI zero-shot ({scheme})", p), "nmi"], ref.loc[(f"DSI fine-tuned ({scheme})", p), "nmi"])
             for p in ("mean", "concat", "cls") if (f"DSI zero-shot ({scheme})", p) in ref.index]
    for pooling, zero, tuned in pairs:
        print(f"DSI {scheme} IDs, {pooling} pooling: NMI {zero:.3f} after indexing -> {tuned:.3f} after fine-tuning")
for row in unseen_table.sort_values("nmi", ascending=False).itertuples():
    print(f"{series_label(row.encoder, row.pooling):42s} NMI {row.nmi:.3f} / AMI {row.ami:.3f} on all images, "
          f"{row.nmi_unseen:.3f} / {row.ami_unseen:.3f} on the {row.n_unseen} val/test queries")
silhouette_best = ref["silhouette"].idxmax()
print(f"Highest silhouette at k={k_reference}: {series_label(*silhouette_best)}; highest NMI: "
      f"{series_label(*ref['nmi'].idxmax())}.")
