# %% [markdown]
# # 09 · Embedding clusters: do the encoders group images by class?
#
# "Vision Transformers Down Memory Lane" clusters ViT and DINOv2 embeddings of a photo collection with k-means, for a range of k. It
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
# Unlike the photos of that text, these images have classes. So beside the label-free scores we can
# ask whether the clusters follow the classes. *Purity* is the share of images whose cluster's
# majority class is their own. *NMI* is the normalised mutual information of clusters and classes:
# 1 when they coincide, near 0 when they are independent. *AMI* is the same corrected for chance, which
# matters for small sets of images.

# %% tags=["parameters"]
# Parameters: the smoke profile's values. `vitdsi study --profile NAME` replaces them with
# those of vitdsi_utils/profiles/NAME.yaml (smoke, cpu or paper).
# DATASET: imagenette | digits | folder | coco. DATASET_ROOT: the folder's ImageFolder tree (folder),
# a local Imagenette copy, or the COCO images (None: VITDSI_COCO_IMAGES); DATASET_ANNOTATIONS: COCO's
# instances file (None: VITDSI_COCO_ANNOTATIONS); DATASET_NAME: what the reports call the data
# (None: the folder's name for folder, else DATASET).
PROFILE = "smoke"                             # cpu: "cpu"
DATASET = "digits"                            # cpu: "imagenette"
DATASET_ROOT = None
DATASET_ANNOTATIONS = None
DATASET_NAME = None
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
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies import clusters
from vitdsi_utils.studies.specs import notebook_spec

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
spec = notebook_spec(clusters.ClustersSpec, globals())  # this notebook's parameters as the study's settings
result = clusters.run(spec, paths)

# %% [markdown]
# ## Embeddings
#
# One row per embedding: its width and the time it took (every image, one pass of the encoder).

# %%
result.embeddings.round(2)

# %% [markdown]
# ## k-means over k
#
# For every embedding and every k: k-means (`CLUSTER_N_INIT` restarts), then the scores. The star on
# each line marks its elbow: the k farthest below the straight line joining the two ends of the
# sum-of-squares curve, both axes scaled to [0, 1]. Silhouette and Davies-Bouldin use distances only;
# purity and NMI compare with the classes. Purity rises with k by construction (many small clusters
# are each nearly pure), so read it beside NMI.

# %%
result.summary.round(3)

# %% [markdown]
# ### On images no encoder was trained on
#
# The DSI and dense encoders were trained on the indexed images and the train queries. The clusters
# above are found on all images, so part of their agreement with the classes may come from images
# the encoder has seen with their labels. The table counts purity, NMI and AMI at the reference k
# again, over the validation and test queries only (the same clusters). On a small subset NMI and
# purity rise by chance alone; AMI is corrected for chance, so compare AMI across the two columns.

# %%
result.unseen.round(3)

# %%
result.figures["clusters_metrics"]

# %% [markdown]
# ## Cluster sizes at the reference k
#
# At k = the number of classes (or `CLUSTER_GALLERY_K`): how many images each cluster holds. The
# dashed line is the size of equal clusters. An encoder that follows the classes gives sizes near it,
# because the database is balanced. One or two giant clusters mean that most images look alike to
# the encoder.

# %%
result.figures["clusters_sizes"]

# %% [markdown]
# ## The largest clusters
#
# The embeddings with the highest and the lowest NMI at the reference k. Each row is one of the
# largest clusters: random members, framed in green when they belong to the cluster's majority class
# and in red otherwise.

# %%
result.figures["clusters_gallery_best"]

# %%
result.figures["clusters_gallery_worst"]

# %% [markdown]
# ## What the numbers say
#
# Computed from the table, not written in advance.

# %%
print("\n".join(clusters.describe(result, spec.schemes)))
