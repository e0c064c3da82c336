# %% [markdown]
# # 13 · A better start for the encoder: self-supervised pretraining
#
# Notebook 03's DSI starts from random weights and has to learn what photos look like from the few
# hundred images it memorises. Pretrained weights cannot be downloaded on the project's machines, so
# the encoder learns from unlabelled images itself, in the style of SimCLR: two random views of every
# image (crop, flip, colour jitter, grayscale), and an InfoNCE loss that asks each view to find its
# partner among the other views of the batch. Labels are never read.
#
# The images come from *outside* every database of this profile (`NS`), in any role (indexed, train,
# val or test query), so the pretraining never sees an image that is later memorised or used as a
# query. `SSL_IMAGES` of them (a seeded subset; all of them when it is `None`) are used for
# `SSL_EPOCHS` epochs.
#
# The DSI is then indexed and fine-tuned from the pretrained encoder with notebook 03/04's settings,
# on the same database (`PRETRAIN_N`, `PRETRAIN_SCHEME` IDs), and compared with the model that
# 03/04 trained from scratch, which is loaded from `RUNS_DIR`. A user who has a torchvision ViT's
# weights can start from those instead: `encoder_init: torchvision` with `encoder_weights: PATH` in a DSI
# recipe (docs/recipes.md).
#
# With `PRETRAIN_SEMANTIC_IDS`, a third DSI starts from the same pretrained encoder but gets
# label-free IDs: semantic IDs (hierarchical k-means, branching `IDS_K`, leaf size `IDS_C`) over the
# pretrained encoder's embeddings of the indexed images. Clustered IDs need every indexed image's
# class; these need none, so they say what the pretraining alone can put into the IDs.

# %% tags=["parameters"]
# Parameters: the smoke profile's values. `vitdsi study --profile NAME` replaces them with
# those of vitdsi_utils/profiles/NAME.yaml (smoke, cpu or paper).
# DATASET: imagenette | digits | folder | coco. DATASET_ROOT: the folder's ImageFolder tree (folder),
# a local Imagenette copy, or the COCO images (None: VITDSI_COCO_IMAGES); DATASET_ANNOTATIONS: COCO's
# instances file (None: VITDSI_COCO_ANNOTATIONS); DATASET_NAME: what the reports call the data
# (None: the folder's name for folder, else DATASET).
PROFILE = "smoke"              # cpu: "cpu"
DATASET = "digits"             # cpu: "imagenette"
DATASET_ROOT = None
DATASET_ANNOTATIONS = None
DATASET_NAME = None
SIZE = 32                      # cpu: 64
NS = [200]                     # cpu: [512, 1024]
SEEDS = [0]
PATCH_SIZE = 16
DIM = 32                       # cpu: 128
MLP_DIM = 64                   # cpu: 256
DEPTH = 1                      # cpu: 6
HEADS = 2                      # cpu: 4
DROPOUT = 0.1
POS_ENCODING = "sinusoidal"
LR = 0.002                     # cpu: 0.001
BATCH_SIZE = 32
WARMUP_STEPS = 0               # cpu: 100
INDEX_EPOCHS = 40              # cpu: 400
TARGET_ACCURACY = 0.99
RETRIEVAL_EPOCHS = 3           # cpu: 10
MAX_PAIRS_PER_QUERY = 4        # cpu: 5
K = 100
PRETRAIN_N = 200               # cpu: 512
PRETRAIN_SCHEME = "clustered"
SSL_EPOCHS = 1                 # cpu: 3
SSL_BATCH_SIZE = 64            # cpu: 128
SSL_IMAGES = 300               # cpu: None
PRETRAIN_SEMANTIC_IDS = True
IDS_K = 5                      # cpu: 10
IDS_C = 5                      # cpu: 10
OUT_DIR = None                 # tables/ and figures/ go here; None: reports/<PROFILE>
RUNS_DIR = None                # trained models, one folder per database; None: data/runs/<PROFILE>

# %%
from IPython.display import Markdown, display

from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies import pretrain
from vitdsi_utils.studies.specs import notebook_spec

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
spec = notebook_spec(pretrain.PretrainSpec, globals())  # this notebook's parameters as the study's settings

# %% [markdown]
# ## Pretraining, then the DSI from the pretrained encoder
#
# The pretrained encoder is kept in `RUNS_DIR` (`ssl-...` folder), so a rerun loads it. The
# from-scratch DSI is notebook 03/04's model of the same database, loaded; the DSI from the
# pretrained encoder has its own run folder (`...-init-ssl`).

# %%
result = pretrain.run(spec, paths)
display(Markdown(result.markdown))

# %% [markdown]
# ## What the pretraining changed
#
# Left: the InfoNCE loss per pretraining epoch. Right: how fast each DSI memorises its indexed images
# (sequence accuracy per indexing epoch; the dots are the stop checks without dropout). The paired
# differences below compare the two DSIs query by query on the same test queries, which gives much
# narrower intervals than comparing the two rows' separate intervals.

# %%
print("\n".join(result.lines))
result.figures["pretrain"]

# %% [markdown]
# The probes in the table above say how much the pretraining taught the encoder before any DSI
# training: the class accuracy of a 10-nearest-neighbour vote and of a linear probe on its
# embeddings, and cosine retrieval mAP@10, for the random and the pretrained encoder.
# `make pretrain` runs a longer pretraining on every outside image (`reports/pretrain/`).
#
# The semantic-ID table (when `PRETRAIN_SEMANTIC_IDS` is on) asks the same question of the IDs:
# how often two images under the same parent prefix share a class, for k-means over the pretrained
# encoder's embeddings and over a random encoder's, against the share expected of random groups.
