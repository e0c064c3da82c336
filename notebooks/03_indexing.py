# %% [markdown]
# # 03 · Indexing: the ViT memorises the database
#
# For every database of the grid a new sequence-to-sequence ViT learns to map each indexed image to
# its own ID, token by token, until its training sequence accuracy reaches `TARGET_ACCURACY` (or
# `INDEX_EPOCHS` epochs pass). The trained model is saved in the run folder (`RUNS_DIR`); a later
# run, and the next notebooks, load it instead of training again.
#
# The result is the *zero-shot* DSI: it has seen no query yet. Its indexing accuracy IA@1 (the
# share of indexed images whose own ID comes first in the beam search) says how well it memorised.

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
LR = 0.002                            # cpu: 0.001
BATCH_SIZE = 32
WARMUP_STEPS = 0                      # cpu: 100
INDEX_EPOCHS = 40                     # cpu: 400
TARGET_ACCURACY = 0.99
OUT_DIR = None                        # tables/ and figures/ go here; None: reports/<PROFILE>
RUNS_DIR = None                       # trained models, one folder per database; None: data/runs/<PROFILE>

# %%
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies import indexing
from vitdsi_utils.studies.dsi import DSISpec
from vitdsi_utils.studies.specs import notebook_spec

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
spec = notebook_spec(DSISpec, globals())  # this notebook's parameters as the study's settings

# %% [markdown]
# ## Training
#
# One line per database: epochs, wall time, the final training accuracy (re-measured without
# dropout, as the stopping rule does) and IA@1 with its 95% interval. `loaded` means the model came
# from an earlier run with the same settings; a model trained with other settings is refused, with
# the differences named, or (when only its epoch cap was lower) trained on.

# %%
result = indexing.run(spec, paths)
result.runs.drop(columns=["run", "run_dir"]).round(3)

# %% [markdown]
# ## Figure 1: the indexing phase
#
# Training loss and sequence accuracy per epoch, one curve per N and ID scheme (as the paper's
# Figure 1). Larger databases take more epochs to memorise.

# %%
result.figures["figure1_indexing"]

# %%
print(indexing.summary_line(spec, result.runs))
