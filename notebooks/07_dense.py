# %% [markdown]
# # 07 · A dense baseline, and re-ranking
#
# The DSI is compared with *index-then-retrieve* systems. BoVW (notebook 02) is the classical one;
# this notebook adds a learned one. A ViT encoder of the DSI's size maps an image to one
# unit-length vector: the mean of its patch tokens (`DENSE_POOLING: mean`) or a class token (`cls`). It is trained on labelled images with a contrastive loss: images
# of the same class are pulled together, images of different classes are pushed apart while their
# cosine similarity exceeds a margin (`DENSE_MARGIN`). A differential-entropy term (weight
# `DENSE_ENTROPY_WEIGHT`) pushes every embedding away from its nearest neighbour in the batch, so
# the vectors spread over the sphere instead of collapsing. This is the recipe of "Training Vision
# Transformers for Image Retrieval" (El-Nouby et al., 2021). The indexed images are embedded once into a flat
# inner-product index (FAISS), and a query returns its nearest database rows.
#
# The encoder learns from the same labelled images the fine-tuned DSI sees: the train queries and,
# with `DENSE_TRAIN_ON_INDEX`, the indexed images. Validation queries are only monitored and test
# queries stay unseen. The dense model does not depend on the ID scheme, so it is trained once per
# database, on the database drawn for the first scheme. Every scheme draws the same images.
#
# The second half follows LightningDOT. A fast first stage (BoVW, or the DSI's beam
# search) proposes candidates. The dense encoder re-scores the first M of them. We ask what the
# re-ranking buys in quality and what it costs in time per query.

# %% tags=["parameters"]
# Parameters: the smoke profile's values. `vitdsi study --profile NAME` replaces them with
# those of vitdsi_utils/profiles/NAME.yaml (smoke, cpu or paper).
# DATASET: imagenette | digits | folder | coco. DATASET_ROOT: the folder's ImageFolder tree (folder),
# a local Imagenette copy, or the COCO images (None: VITDSI_COCO_IMAGES); DATASET_ANNOTATIONS: COCO's
# instances file (None: VITDSI_COCO_ANNOTATIONS); DATASET_NAME: what the reports call the data
# (None: the folder's name for folder, else DATASET).
PROFILE = "smoke"                     # cpu: "cpu"
DATASET = "digits"                    # cpu: "imagenette"
DATASET_ROOT = None
DATASET_ANNOTATIONS = None
DATASET_NAME = None
SIZE = 32                             # cpu: 64
NS = [200]                            # cpu: [512, 1024]
ID_SCHEMES = ["clustered", "random"]
SEEDS = [0]
PATCH_SIZE = 16
DIM = 32                              # cpu: 128
MLP_DIM = 64                          # cpu: 256
DEPTH = 1                             # cpu: 6
HEADS = 2                             # cpu: 4
DROPOUT = 0.1
POS_ENCODING = "sinusoidal"
BOVW_WORDS = 50                       # cpu: 200
BOVW_VOCABULARIES = 2                 # cpu: 5
K = 100
DENSE_EPOCHS = 5                      # cpu: 90
DENSE_LR = 0.002                      # cpu: 0.0005
DENSE_BATCH_SIZE = 32                 # cpu: 64
DENSE_MARGIN = 0.5
DENSE_ENTROPY_WEIGHT = 0.7
DENSE_POOLING = "mean"
DENSE_TRAIN_ON_INDEX = True
RERANK_DEPTHS = [10, 50, 100]
OUT_DIR = None                        # tables/ and figures/ go here; None: reports/<PROFILE>
RUNS_DIR = None                       # trained models, one folder per database; None: data/runs/<PROFILE>

# %%
from IPython.display import Markdown, display

from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies import dense, dense_report
from vitdsi_utils.studies.specs import notebook_spec

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
spec = notebook_spec(dense.DenseSpec, globals())  # this notebook's parameters as the study's settings

# %% [markdown]
# ## Training
#
# `dense.run` trains one encoder per database, then runs the two sections below. One line per
# database gives the training time and the validation mAP@10 (val queries searched among the
# indexed images) after the last epoch and at its best. `loaded` means the encoder came from an
# earlier run (`dense.pt` in the run folder).

# %%
result = dense.run(spec, paths)

# %%
result.figures["dense_training"]

# %%
result.figures["dense_validation"]

# %% [markdown]
# ## Dense beside BoVW and DSI
#
# Each test query returns its `K` nearest indexed images. The metrics and intervals are Table 1's.
# BoVW is fitted here again, because the re-ranking below needs the fitted model. The table shows
# BoVW and DSI as notebook 05 scored them (`tables/table1.csv`). When that table is missing, it
# shows the BoVW fitted here and no DSI rows.

# %%
display(Markdown((paths.tables / "dense.md").read_text()))

# %%
result.figures["dense_vs_n"]

# %% [markdown]
# Computed from the table, not written in advance. The dense model is *better* or *worse* than
# another model only when their 95% intervals do not overlap.

# %%
print("\n".join(dense_report.verdict_lines(result.results)))

# %% [markdown]
# ## Re-ranking: a fast first stage, the dense encoder on its top M
#
# For each database, BoVW's top-`K` list and (where notebooks 03/04 left them in the run folder)
# the DSI's beam-search lists are re-scored by the dense encoder. The first M candidates are
# re-ordered by cosine similarity and the rest keep their place. `M = 0` is the first stage alone.
# The star is the dense search over the whole database. A time per query is the batch's wall time
# divided by the number of queries. The re-ranking time includes embedding the query, which costs
# as much as a full dense search at these database sizes.

# %%
display(Markdown((paths.tables / "rerank.md").read_text()))

# %%
result.figures["rerank_tradeoff"]

# %%
print("\n".join(dense_report.rerank_lines(result.reranking)))
