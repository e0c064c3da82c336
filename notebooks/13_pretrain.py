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

from vitdsi_utils.data.images import dataset_name
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.baselines.ssl import SSLConfig
from vitdsi_utils.studies.pretrain import pretrain_study
from vitdsi_utils.studies.pretrain_report import indexing_epochs_summary, pretrain_figure
from vitdsi_utils.reports.tables import write_csv, write_table
from vitdsi_utils.training.config import TrainConfig

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
DATASET_NAME = dataset_name(DATASET, DATASET_ROOT, DATASET_NAME)  # what the reports call the data
seed = SEEDS[0]

model_overrides = dict(patch_size=PATCH_SIZE, dim=DIM, mlp_dim=MLP_DIM, depth=DEPTH, heads=HEADS,
                       dropout=DROPOUT, pos_encoding=POS_ENCODING)


def index_config(seed: int) -> TrainConfig:
    return TrainConfig(lr=LR, batch_size=BATCH_SIZE, epochs=INDEX_EPOCHS, target_accuracy=TARGET_ACCURACY,
                       warmup_steps=WARMUP_STEPS, seed=seed, progress=False)


def retrieval_config(seed: int) -> TrainConfig:
    return TrainConfig(lr=LR, batch_size=BATCH_SIZE, epochs=RETRIEVAL_EPOCHS, seed=seed, progress=False)


# %% [markdown]
# ## Pretraining, then the DSI from the pretrained encoder
#
# The pretrained encoder is kept in `RUNS_DIR` (`ssl-...` folder), so a rerun loads it. The
# from-scratch DSI is notebook 03/04's model of the same database, loaded; the DSI from the
# pretrained encoder has its own run folder (`...-init-ssl`).

# %%
out = pretrain_study(
    DATASET, SIZE, PRETRAIN_N, seed, PRETRAIN_SCHEME, exclude_ns=NS, model_overrides=model_overrides,
    ssl_config=SSLConfig(epochs=SSL_EPOCHS, batch_size=SSL_BATCH_SIZE, seed=seed, progress=False),
    index_config=index_config(seed), retrieval_config=retrieval_config(seed),
    max_pairs_per_query=MAX_PAIRS_PER_QUERY, train_scratch=True, max_images=SSL_IMAGES,
    semantic_ids={"k": IDS_K, "c": IDS_C} if PRETRAIN_SEMANTIC_IDS else None, runs_dir=paths.runs,
    root=DATASET_ROOT, annotations=DATASET_ANNOTATIONS, progress=False,
)
write_table(out["results"], paths.tables / "pretrain", markdown=out["markdown"])
write_table(out["paired"], paths.tables / "pretrain_paired")
if len(out["id_facts"]):
    write_table(out["id_facts"], paths.tables / "pretrain_semantic_ids")
write_table(out["probes"], paths.tables / "pretrain_probes")
write_csv(out["ssl_history"], paths.tables / "pretrain_ssl_history.csv")
write_csv(out["histories"], paths.tables / "pretrain_histories.csv")
display(Markdown(out["markdown"]))

# %% [markdown]
# ## What the pretraining changed
#
# Left: the InfoNCE loss per pretraining epoch. Right: how fast each DSI memorises its indexed images
# (sequence accuracy per indexing epoch; the dots are the stop checks without dropout). The paired
# differences below compare the two DSIs query by query on the same test queries, which gives much
# narrower intervals than comparing the two rows' separate intervals.

# %%
fig = pretrain_figure(out["ssl_history"], out["histories"])
save_figure(fig, paths.figures / "pretrain.png")
results = out["results"]
print(indexing_epochs_summary(results, TARGET_ACCURACY, INDEX_EPOCHS))
for row in out["paired"].itertuples():
    verdict = ("better" if row.ci_low > 0 else "worse" if row.ci_high < 0 else "no difference the interval can tell")
    print(f"{row.model}, {row.metric}: pretrained minus scratch {row.diff:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}] "
          f"-> {verdict}")
fig

# %% [markdown]
# The probes in the table above say how much the pretraining taught the encoder before any DSI
# training: the class accuracy of a 10-nearest-neighbour vote and of a linear probe on its
# embeddings, and cosine retrieval mAP@10, for the random and the pretrained encoder.
# `make pretrain` runs a longer pretraining on every outside image (`reports/pretrain/`).
#
# The semantic-ID table (when `PRETRAIN_SEMANTIC_IDS` is on) asks the same question of the IDs:
# how often two images under the same parent prefix share a class, for k-means over the pretrained
# encoder's embeddings and over a random encoder's, against the share expected of random groups.
