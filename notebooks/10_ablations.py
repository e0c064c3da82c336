# %% [markdown]
# # 10 · Ablations: what each design choice of the DSI is worth
#
# The paper fixed one ViT DSI and one way of fine-tuning it. Here the model is rebuilt with one
# choice changed at a time, everything else at the profile's default, and each variant is indexed,
# scored zero-shot, fine-tuned and scored again. The factors (`ABLATION_FACTORS` picks some):
#
# - **pos**: how the encoder knows where a patch sits: a fixed sinusoidal table (default), a learned
#   table, or a conditional encoding (a depth-wise convolution over the patch grid, CPVT's PEG);
# - **patch**: patch side 8 / 16 / 32 px: more, smaller tokens or fewer, larger ones;
# - **dropout**: 0 / 0.1 / 0.2;
# - **index-share**: 25% of each class indexed (the paper) or 50%: a larger database to memorise and
#   fewer train queries;
# - **mix**: the multi-task model, which keeps the indexing examples in every fine-tuning epoch, with
#   1, 2 or 4 retrieval examples per indexed image;
# - **options**: plain fine-tuning plus one extra: augmented views (random crop and flip) of the
#   indexed images as extra queries for their own ID; *same-class targets*, where each epoch gives
#   every train query one relevant ID drawn at random instead of fixed pairs; label smoothing 0.1.
#
# The default variant is the model of notebooks 03 and 04 (same database, same settings), so it is
# loaded from the run folder rather than trained again. The fuller grid at 64 px is
# `make ablations` (report in `reports/ablations/`).

# %% tags=["parameters"]
# Parameters: the smoke profile's values. `vitdsi study --profile NAME` replaces them with
# those of vitdsi_utils/profiles/NAME.yaml (smoke, cpu or paper).
# DATASET: imagenette | digits | folder | coco. DATASET_ROOT: the folder's ImageFolder tree (folder),
# a local Imagenette copy, or the COCO images (None: VITDSI_COCO_IMAGES); DATASET_ANNOTATIONS: COCO's
# instances file (None: VITDSI_COCO_ANNOTATIONS); DATASET_NAME: what the reports call the data
# (None: the folder's name for folder, else DATASET).
PROFILE = "smoke"                      # cpu: "cpu"
DATASET = "digits"                     # cpu: "imagenette"
DATASET_ROOT = None
DATASET_ANNOTATIONS = None
DATASET_NAME = None
SIZE = 32                              # cpu: 64
SEEDS = [0]
PATCH_SIZE = 16
DIM = 32                               # cpu: 128
MLP_DIM = 64                           # cpu: 256
DEPTH = 1                              # cpu: 6
HEADS = 2                              # cpu: 4
DROPOUT = 0.1
POS_ENCODING = "sinusoidal"
LR = 0.002                             # cpu: 0.001
BATCH_SIZE = 32
WARMUP_STEPS = 0                       # cpu: 100
INDEX_EPOCHS = 40                      # cpu: 400
TARGET_ACCURACY = 0.99
RETRIEVAL_EPOCHS = 3                   # cpu: 10
MAX_PAIRS_PER_QUERY = 4                # cpu: 5
K = 100
ABLATION_N = 200                       # cpu: 512
ABLATION_SCHEME = "clustered"
ABLATION_FACTORS = ["pos", "options"]  # cpu: ["options"]
OUT_DIR = None                         # tables/ and figures/ go here; None: reports/<PROFILE>
RUNS_DIR = None                        # trained models, one folder per database; None: data/runs/<PROFILE>

# %%
from IPython.display import Image, Markdown, display

from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies import ablations
from vitdsi_utils.studies.ablations_report import describe
from vitdsi_utils.studies.specs import notebook_spec

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
spec = notebook_spec(ablations.AblationsSpec, globals())  # this notebook's parameters as the study's settings

# %% [markdown]
# ## Running the grid
#
# Variants that only change the fine-tuning share the default's indexed model. Every model is saved
# in the run folder, so a rerun only scores them again.

# %%
long = ablations.run(spec, paths)
display(Markdown((paths.tables / "ablations.md").read_text()))

# %% [markdown]
# ## Each variant against the default
#
# Left: fine-tuned mAP@10 with its bootstrap interval; the dashed line is the default. Middle: how
# much of the memorised index survives, as IA@1 before (circles) and after (squares) fine-tuning.
# Right: the epochs the indexing run needed to memorise the database (hatched: it hit the epoch cap
# first). With a few dozen test queries the intervals are wide: a shift that stays inside the
# default's interval is no evidence of an effect.

# %%
display(Image(paths.figures / "ablations.png"))

# %%
print("\n".join(describe(long)))
