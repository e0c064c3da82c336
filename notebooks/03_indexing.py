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
OUT_DIR = None                        # tables/ and figures/ go here; None: reports/<PROFILE>
RUNS_DIR = None                       # trained models, one folder per database; None: data/runs/<PROFILE>

# %%
import numpy as np
import pandas as pd
import torch

from vitdsi_utils import metrics, settings
from vitdsi_utils.data.database import databases
from vitdsi_utils.data.images import load_images
from vitdsi_utils.phases import index_database
from vitdsi_utils.reports.plots import save_figure, training_curves
from vitdsi_utils.runs import StudyPaths, run_name
from vitdsi_utils.model.decoding import beam_search
from vitdsi_utils.ids.schemes import codec_for
from vitdsi_utils.reports.tables import write_csv, write_table
from vitdsi_utils.training.config import TrainConfig, seed_everything

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
image_set = load_images(DATASET, SIZE, progress=False)

model_overrides = dict(patch_size=PATCH_SIZE, dim=DIM, mlp_dim=MLP_DIM, depth=DEPTH, heads=HEADS,
                       dropout=DROPOUT, pos_encoding=POS_ENCODING)


def index_config(seed: int) -> TrainConfig:
    return TrainConfig(lr=LR, batch_size=BATCH_SIZE, epochs=INDEX_EPOCHS, target_accuracy=TARGET_ACCURACY,
                       warmup_steps=WARMUP_STEPS, seed=seed, progress=False)


# %% [markdown]
# ## Training
#
# One line per database: epochs, wall time, the final training accuracy (re-measured without
# dropout, as the stopping rule does) and IA@1 with its 95% interval. `loaded` means the model came from an earlier run.

# %%
runs, histories = [], []
for db in databases(image_set, NS, ID_SCHEMES, SEEDS):
    n, scheme, seed = db.settings["n"], db.settings["id_scheme"], db.settings["seed"]
    run_dir = paths.run_dir(db)
    loaded = (run_dir / "zero_shot.pt").exists()
    seed_everything(seed)  # the new model's initial weights come from torch's global generator
    zero = index_database(db, model_overrides=model_overrides, config=index_config(seed), run_dir=run_dir)
    codec = codec_for(db)  # the database's dense IDs, as the model was indexed with
    _, own = beam_search(zero.model, torch.from_numpy(db.split("index")[0]), codec, k=5)  # as 05_results does
    ia = metrics.evaluate_indexing(own.numpy(), np.arange(db.n_index), ks=(1,), n_db=len(codec)).iloc[0]
    # the accuracy the stopping rule saw: eval mode (no dropout) when it was checked, else the running one
    train_acc = (zero.history.last("train_eval") or zero.history.last("train"))["seq_acc"]
    runs.append(dict(run=run_name(db), n=n, ids=scheme, seed=seed, epochs=zero.epochs,
                     seconds=zero.seconds, train_seq_acc=train_acc, ia1=ia.value, ia1_low=ia.ci_low,
                     ia1_high=ia.ci_high, loaded=loaded, run_dir=settings.portable_path(run_dir)))
    histories.append(zero.history.to_frame().assign(n=n, ids=scheme, seed=seed))
    print(f"N={n} {scheme:9s} seed {seed}: {zero.epochs} epochs, {zero.seconds:.0f} s, train acc {train_acc:.3f}, "
          f"IA@1 {ia.value:.3f} [{ia.ci_low:.3f}, {ia.ci_high:.3f}]" + (" (loaded)" if loaded else ""))
runs = pd.DataFrame(runs)
histories = pd.concat(histories, ignore_index=True)
write_table(runs, paths.tables / "indexing_runs")  # the demo finds the run folders here
write_csv(histories, paths.tables / "histories_indexing.csv")
runs.drop(columns=["run", "run_dir"]).round(3)

# %% [markdown]
# ## Figure 1: the indexing phase
#
# Training loss and sequence accuracy per epoch, one curve per N and ID scheme (as the paper's
# Figure 1). Larger databases take more epochs to memorise.

# %%
fig = training_curves(histories, phase="indexing", split="train", metrics=("loss", "seq_acc"),
                            title="Figure 1: indexing (train)")
save_figure(fig, paths.figures / "figure1_indexing.png")
fig

# %%
reached = runs["train_seq_acc"] >= TARGET_ACCURACY
print(f"{int(reached.sum())} of {len(runs)} runs reached the target train accuracy {TARGET_ACCURACY} "
      f"within {INDEX_EPOCHS} epochs; zero-shot IA@1 ranges {runs['ia1'].min():.3f}-{runs['ia1'].max():.3f}.")
