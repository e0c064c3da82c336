# %% [markdown]
# # 04 · Retrieval fine-tuning
#
# The zero-shot model of notebook 03 (loaded from its run folder) is copied and trained for
# `RETRIEVAL_EPOCHS` epochs on (query image, relevant ID) pairs: every training query is paired
# with the IDs of the indexed images relevant to it: those of its class, or for COCO those sharing
# one of its object categories (`MAX_PAIRS_PER_QUERY` of them, chosen with a seed, or all of them when
# it is `None`, as in the paper). The validation queries give the validation
# curve. The result is the *fine-tuned* DSI, saved beside the zero-shot model.

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
RETRIEVAL_EPOCHS = 3                  # cpu: 10
MAX_PAIRS_PER_QUERY = 4               # cpu: 5
OUT_DIR = None                        # tables/ and figures/ go here; None: reports/<PROFILE>
RUNS_DIR = None                       # trained models, one folder per database; None: data/runs/<PROFILE>

# %%
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies import retrieval
from vitdsi_utils.studies.dsi import DSISpec
from vitdsi_utils.studies.specs import notebook_spec

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
spec = notebook_spec(DSISpec, globals())  # this notebook's parameters as the study's settings

# %% [markdown]
# ## Training
#
# One line per database: epochs, wall time and the loss of the last epoch on the training and
# validation pairs. `loaded` means the fine-tuned model came from an earlier run with the same settings.

# %%
result = retrieval.run(spec, paths)

# %% [markdown]
# ## Figures 2 and 3: the retrieval phase
#
# Loss and sequence accuracy per epoch on the training pairs (Figure 2) and on the validation pairs
# (Figure 3). A query has many relevant IDs, so its pairs contradict one another: the accuracy of a
# single target sequence stays low even when the model ranks relevant IDs well. A validation loss
# that rises while the training loss falls means the model memorises the training queries.

# %%
result.figures["figure2_retrieval_train"]

# %%
result.figures["figure3_retrieval_val"]
