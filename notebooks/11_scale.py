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
import torch
from IPython.display import Markdown, display

from vitdsi_utils.data.images import dataset_name, load_images
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies.scale import ia_table, latency_table
from vitdsi_utils.studies.scale_report import scale_figure, scale_markdown
from vitdsi_utils.reports.tables import write_table
from vitdsi_utils.training.config import TrainConfig

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
DATASET_NAME = dataset_name(DATASET, DATASET_ROOT, DATASET_NAME)  # what the reports call the data
image_set = load_images(DATASET, SIZE, root=DATASET_ROOT, annotations=DATASET_ANNOTATIONS, name=DATASET_NAME,
                        progress=False)
device = "cuda" if torch.cuda.is_available() else "cpu"
# 0 stands for every usable image; an N beyond the data set is left out with a note
ns = [n or len(image_set) for n in SCALE_NS]
ia_ns = [n or len(image_set) for n in SCALE_IA_NS]
too_big = sorted({n for n in ns + ia_ns if n > len(image_set)})
if too_big:
    print(f"{DATASET_NAME} at {SIZE} px has {len(image_set)} usable images; left out N = {too_big}")
ns, ia_ns = [n for n in ns if n <= len(image_set)], [n for n in ia_ns if n <= len(image_set)]
model_overrides = dict(patch_size=PATCH_SIZE, dim=DIM, mlp_dim=MLP_DIM, depth=DEPTH, heads=HEADS,
                       dropout=DROPOUT, pos_encoding=POS_ENCODING)
index_config = TrainConfig(lr=LR, batch_size=BATCH_SIZE, epochs=SCALE_INDEX_EPOCHS, target_accuracy=TARGET_ACCURACY,
                           warmup_steps=WARMUP_STEPS, seed=SEEDS[0], progress=False)
print(f"{len(image_set)} images; latency at N = {ns} on {device}; IA@1 at N = {ia_ns}")

# %% [markdown]
# ## Latency against N

# %%
latency = latency_table(image_set, ns, n_queries=SCALE_QUERIES, batch_size=SCALE_QUERIES, k=K,
                              repeats=SCALE_REPEATS, model_overrides=model_overrides, bovw_words=BOVW_WORDS,
                              device=device, seed=SEEDS[0])
write_table(latency, paths.tables / "scale_latency")
latency.pivot_table(index="n", columns="method", values=["ms_per_query", "build_s"]).round(2)

# %% [markdown]
# ## IA@1 of a DSI trained on N images
#
# A finished model is loaded from `RUNS_DIR` rather than trained again. `reached` says whether IA@1
# got to `TARGET_ACCURACY` within the epoch cap.

# %%
ia, ia_histories = ia_table(image_set, ia_ns, index_config=index_config, model_overrides=model_overrides,
                                  runs_dir=paths.runs, seed=SEEDS[0], beam_size=K)
write_table(ia, paths.tables / "scale_ia")
ia

# %%
settings = dict(source=DATASET_NAME, size=SIZE, device=device, k=K, queries=SCALE_QUERIES, repeats=SCALE_REPEATS)
display(Markdown(scale_markdown(latency, ia, settings)))
fig = scale_figure(latency, ia, title=f"{DATASET_NAME} at {SIZE} px, profile {PROFILE}, {device}")
save_figure(fig, paths.figures / "scale.png")
fig

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
