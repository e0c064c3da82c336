# %% [markdown]
# # 11 · Scale: latency and indexing accuracy against N
#
# Target 5 of the study: index all 13,394 Imagenette images with IA@1 >= 0.95, and measure how the
# query latency of each method grows with the number of indexed images N. Here *every* image of a
# database is indexed (`index_all_database`); there is no query pool, because IA@1 only needs
# the indexed images themselves. The timed queries are horizontally flipped copies of indexed images.
#
# - **Latency**: for each N of `SCALE_NS`, top-`K` search for a batch of `SCALE_QUERIES` queries, one
#   warm-up call, then the median of `SCALE_REPEATS` timed calls, per query; beside it the time to
#   build the index. DSI: beam search (width `K`) constrained to the trie of the N IDs. BoVW: SIFT of
#   the queries, word histograms, cosine top-`K`. Dense: the ViT encoder and a flat FAISS index.
#   The DSI and the dense encoder are *untrained* models of the profile's size: how long a search takes
#   depends on N and on the model's size, not on what the weights learnt.
# - **IA@1**: a DSI trained to memorise N images (`SCALE_IA_NS`), at most `SCALE_INDEX_EPOCHS` epochs.
#   Training is what costs: on a CPU only small N are affordable; `make scale` and the `paper`
#   profile (GPU) go further.

# %% tags=["parameters"]
# Parameters: the smoke profile's values. `vitdsi study --profile NAME` replaces them with
# those of vitdsi_utils/profiles/NAME.yaml (smoke, cpu or paper).
# DATASET: imagenette | digits | folder | coco. DATASET_ROOT: the folder's ImageFolder tree (folder),
# a local Imagenette copy, or the COCO images (None: VITDSI_COCO_IMAGES); DATASET_ANNOTATIONS: COCO's
# instances file (None: VITDSI_COCO_ANNOTATIONS); DATASET_NAME: what the reports call the data
# (None: the folder's name for folder, else DATASET).
PROFILE = "smoke"            # cpu: "cpu"
DATASET = "digits"           # cpu: "imagenette"
DATASET_ROOT = None
DATASET_ANNOTATIONS = None
DATASET_NAME = None
SIZE = 32                    # cpu: 64
SEEDS = [0]
PATCH_SIZE = 16
DIM = 32                     # cpu: 128
MLP_DIM = 64                 # cpu: 256
DEPTH = 1                    # cpu: 6
HEADS = 2                    # cpu: 4
DROPOUT = 0.1
POS_ENCODING = "sinusoidal"
LR = 0.002                   # cpu: 0.001
BATCH_SIZE = 32
WARMUP_STEPS = 0             # cpu: 100
TARGET_ACCURACY = 0.99
BOVW_WORDS = 50              # cpu: 200
K = 100
SCALE_NS = [50, 200, 800]    # cpu: [512, 1024, 2048, 4096]
SCALE_IA_NS = [50]           # cpu: [512]
SCALE_INDEX_EPOCHS = 20      # cpu: 100
SCALE_QUERIES = 8            # cpu: 32
SCALE_REPEATS = 2            # cpu: 3
OUT_DIR = None               # tables/ and figures/ go here; None: reports/<PROFILE>
RUNS_DIR = None              # trained models, one folder per database; None: data/runs/<PROFILE>

# %%
from IPython.display import Markdown, display

from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies import scale
from vitdsi_utils.studies.specs import notebook_spec

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
spec = notebook_spec(scale.ScaleSpec, globals())  # this notebook's parameters as the study's settings

# %% [markdown]
# ## Latency and IA@1 against N
#
# An N of 0 stands for every usable image; an N beyond the data set is left out, with a note. A
# finished model is loaded from `RUNS_DIR` rather than trained again.

# %%
result = scale.run(spec, paths)
print("\n".join(result.notes))
result.latency.pivot_table(index="n", columns="method", values=["ms_per_query", "build_s"]).round(2)

# %% [markdown]
# ## IA@1 of a DSI trained on N images
#
# `reached` says whether IA@1 got to `TARGET_ACCURACY` within the epoch cap.

# %%
result.ia

# %%
display(Markdown(result.markdown))
result.figure

# %% [markdown]
# ## Reading the figure
#
# - **DSI**: the beam search runs one decoder pass per ID digit (plus EOS) on up to `K` hypotheses per
#   query, after one encoder pass that is the same for every N. Its cost grows with the number of
#   digits (log10 N), not with N itself, and within one ID length with how many prefixes the first
#   digits allow: while few exist the beam is narrower (the IDs of N = 1,024 start with 0 or 1).
# - **BoVW** and **dense**: an exhaustive scan, linear in N, but each query costs only one
#   matrix-vector product (and a sort for BoVW), so encoding the query (SIFT or the ViT encoder)
#   dominates at these N.
#   Their curves stay nearly flat.
# - **IA@1**: memorising more images takes more epochs, and each epoch costs time linear in N. The right
#   panel gives the epochs and the (wall-clock) minutes each N took.
