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
# DATASET: imagenette | digits | coco (coco reads VITDSI_COCO_IMAGES and VITDSI_COCO_ANNOTATIONS).
PROFILE = "smoke"                     # cpu: "cpu"
DATASET = "digits"                    # cpu: "imagenette"
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
import pandas as pd

from vitdsi_utils.data.database import databases
from vitdsi_utils.data.images import load_images
from vitdsi_utils.phases import fine_tune, index_database
from vitdsi_utils.reports.plots import save_figure, training_curves
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.reports.tables import write_csv
from vitdsi_utils.training.config import TrainConfig, seed_everything

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
image_set = load_images(DATASET, SIZE, progress=False)

model_overrides = dict(patch_size=PATCH_SIZE, dim=DIM, mlp_dim=MLP_DIM, depth=DEPTH, heads=HEADS,
                       dropout=DROPOUT, pos_encoding=POS_ENCODING)


def index_config(seed: int) -> TrainConfig:
    return TrainConfig(lr=LR, batch_size=BATCH_SIZE, epochs=INDEX_EPOCHS, target_accuracy=TARGET_ACCURACY,
                       warmup_steps=WARMUP_STEPS, seed=seed, progress=False)


def retrieval_config(seed: int) -> TrainConfig:
    return TrainConfig(lr=LR, batch_size=BATCH_SIZE, epochs=RETRIEVAL_EPOCHS, seed=seed, progress=False)


# %%
histories = []
for db in databases(image_set, NS, ID_SCHEMES, SEEDS):
    n, scheme, seed = db.settings["n"], db.settings["id_scheme"], db.settings["seed"]
    run_dir = paths.run_dir(db)
    if not (run_dir / "zero_shot.pt").exists():
        print(f"N={n} {scheme} seed {seed}: no zero-shot model from 03_indexing in {run_dir}; training it now")
        seed_everything(seed)
    zero = index_database(db, model_overrides=model_overrides, config=index_config(seed), run_dir=run_dir)
    tuned = fine_tune(db, zero.model, config=retrieval_config(seed), run_dir=run_dir,
                                  max_pairs_per_query=MAX_PAIRS_PER_QUERY)
    history = tuned.history.to_frame().assign(n=n, ids=scheme, seed=seed)
    histories.append(history)
    last = history[history["epoch"] == history["epoch"].max()].set_index("split")
    print(f"N={n} {scheme:9s} seed {seed}: {tuned.epochs} epochs, {tuned.seconds:.0f} s; last epoch loss "
          f"train {last.at['train', 'loss']:.3f}, val {last.at['val', 'loss']:.3f}")
histories = pd.concat(histories, ignore_index=True)
write_csv(histories, paths.tables / "histories_retrieval.csv")

# %% [markdown]
# ## Figures 2 and 3: the retrieval phase
#
# Loss and sequence accuracy per epoch on the training pairs (Figure 2) and on the validation pairs
# (Figure 3). A query has many relevant IDs, so its pairs contradict one another: the accuracy of a
# single target sequence stays low even when the model ranks relevant IDs well. A validation loss
# that rises while the training loss falls means the model memorises the training queries.

# %%
fig = training_curves(histories, phase="retrieval", split="train", title="Figure 2: retrieval (train)")
save_figure(fig, paths.figures / "figure2_retrieval_train.png")
fig

# %%
fig = training_curves(histories, phase="retrieval", split="val", title="Figure 3: retrieval (validation)")
save_figure(fig, paths.figures / "figure3_retrieval_val.png")
fig
