# %% [markdown]
# # 12 · Incremental indexing: adding new images to a trained DSI
#
# A DSI's index lives in its weights, so adding images means training. The indexed images of one
# database are split into an initial set and a new batch (`INC_NEW_FRACTION`). A DSI memorises the
# initial set; the new images then get the *next* consecutive IDs (same number of digits, so the
# decoder and its length stay the same, and the trie of all IDs holds both) and are added by
#
# - fine-tuning on the new images alone (replay 0): the model learns them and forgets old IDs;
# - fine-tuning with replay: each epoch also shows `r` old images per new image (resampled every
#   epoch), for each `r` of `INC_REPLAY_RATIOS`;
# - retraining a new model from scratch on all images: the reference.
#
# IDs are random here. With clustered IDs the new images would form a block after all old IDs
# rather than join their class's block, since that would renumber images the model has memorised.

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
INDEX_EPOCHS = 40            # cpu: 400
TARGET_ACCURACY = 0.99
K = 100
INC_N = 200                  # cpu: 512
INC_NEW_FRACTION = 0.2
INC_REPLAY_RATIOS = [0, 1]
INC_FINETUNE_EPOCHS = 10     # cpu: 40
OUT_DIR = None               # tables/ and figures/ go here; None: reports/<PROFILE>
RUNS_DIR = None              # trained models, one folder per database; None: data/runs/<PROFILE>

# %%
from IPython.display import Markdown, display

from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies import incremental
from vitdsi_utils.studies.specs import notebook_spec

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
spec = notebook_spec(incremental.IncrementalSpec, globals())  # this notebook's parameters as the study's settings

# %% [markdown]
# ## Initial model, fine-tuning strategies, retraining
#
# IA@1 by beam search (width `K`) over the trie of all IDs; the initial model is scored on the old
# images with the old IDs. `seconds` is the training time of each step (for fine-tuning: on top of
# the initial model's). Finished models are loaded from `RUNS_DIR`.

# %%
result = incremental.run(spec, paths)
display(Markdown(result.markdown))

# %% [markdown]
# ## Forgetting along the fine-tuning epochs
#
# Right: the sequence accuracy (greedy decoding, teacher-forced, no dropout) of the old images
# (solid) and of the new ones (dashed) after each fine-tuning epoch, per replay ratio. Without replay
# the old images' accuracy falls while the new ones are learnt; replay holds it up, at the price of
# more examples per epoch.

# %%
result.figure
