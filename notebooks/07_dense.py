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
# Transformers for Image Retrieval" (seed 001). The indexed images are embedded once into a flat
# inner-product index (FAISS), and a query returns its nearest database rows.
#
# The encoder learns from the same labelled images the fine-tuned DSI sees: the train queries and,
# with `DENSE_TRAIN_ON_INDEX`, the indexed images. Validation queries are only monitored and test
# queries stay unseen. The dense model does not depend on the ID scheme, so it is trained once per
# database, on the database drawn for the first scheme. Every scheme draws the same images.
#
# The second half follows LightningDOT (seed 004). A fast first stage (BoVW, or the DSI's beam
# search) proposes candidates. The dense encoder re-scores the first M of them. We ask what the
# re-ranking buys in quality and what it costs in time per query.

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
import pandas as pd
from IPython.display import Markdown, display

from vitdsi_utils import evaluation
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.reports.paper import TABLE1_NOTE, attach_paper, table1_markdown
from vitdsi_utils.reports.plots import metric_vs_n, save_figure, training_curves
from vitdsi_utils.reports.targets import baseline_verdicts
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies.rerank import rerank_markdown, summary, tradeoff_figure
from vitdsi_utils.baselines.dense import DENSE_MODEL, DenseTrainConfig
from vitdsi_utils.baselines.index import faiss_available
from vitdsi_utils.studies.dense import evaluate_dense, first_stages, rerank_database, train_or_load
from vitdsi_utils.reports.tables import write_table

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
image_set = load_images(DATASET, SIZE, progress=False)
dense_overrides = dict(patch_size=PATCH_SIZE, dim=DIM, mlp_dim=MLP_DIM, depth=DEPTH, heads=HEADS,
                       dropout=DROPOUT, pos_encoding=POS_ENCODING, pooling=DENSE_POOLING)


def dense_config(seed: int) -> DenseTrainConfig:
    return DenseTrainConfig(epochs=DENSE_EPOCHS, lr=DENSE_LR, batch_size=DENSE_BATCH_SIZE, margin=DENSE_MARGIN,
                            entropy_weight=DENSE_ENTROPY_WEIGHT, seed=seed, progress=False)


print("search backend:", "FAISS IndexFlatIP" if faiss_available() else "torch (faiss-cpu is not installed)")

# %% [markdown]
# ## Training
#
# One encoder per database. The line gives the training time and the validation mAP@10 (val
# queries searched among the indexed images) after the last epoch and at its best. `loaded` means
# the encoder came from an earlier run (`dense.pt` in the run folder).

# %%
retrievers, histories = {}, []
for n in NS:
    for seed in SEEDS:
        db = build_database(image_set, n, id_scheme=ID_SCHEMES[0], seed=seed)
        retriever = train_or_load(db, model_overrides=dense_overrides, train_config=dense_config(seed),
                                  include_index=DENSE_TRAIN_ON_INDEX, run_dir=paths.run_dir(db))
        retrievers[(n, seed)] = (db, retriever)
        history = retriever.history_.to_frame().assign(n=n, ids="-", seed=seed)
        histories.append(history)
        val = history.loc[history["split"] == "val", "map@10"]
        print(f"N={n} seed {seed}: {DENSE_EPOCHS} epochs, {retriever.fit_seconds_:.0f} s of training; "
              f"val mAP@10 {val.iloc[-1]:.3f} (best {val.max():.3f})" + (" (loaded)" if retriever.loaded_ else ""))
histories = pd.concat(histories, ignore_index=True)
histories.to_csv(paths.tables / "histories_dense.csv", index=False)

# %%
fig = training_curves(histories, phase="dense", split="train", metrics=("loss", "contrastive", "entropy"),
                            title="Dense encoder: training objective per epoch")
save_figure(fig, paths.figures / "dense_training.png")
fig

# %%
fig = training_curves(histories, phase="dense", split="val", metrics=("map@10", "p@10"),
                            title="Dense encoder: validation queries per epoch")
save_figure(fig, paths.figures / "dense_validation.png")
fig

# %% [markdown]
# ## Dense beside BoVW and DSI
#
# Each test query returns its `K` nearest indexed images. The metrics and intervals are Table 1's.
# BoVW is fitted here again, because the re-ranking below needs the fitted model. The table shows
# BoVW and DSI as notebook 05 scored them (`tables/table1.csv`). When that table is missing, it
# shows the BoVW fitted here and no DSI rows.

# %%
frames, bovw_models = [], {}
for (n, seed), (db, retriever) in retrievers.items():
    table, timings = evaluate_dense(retriever, db, k=K, seed=seed)
    frames.append(table.assign(**timings))
    bovw = evaluation.evaluate_bovw(db, n_words=BOVW_WORDS, k=K, seed=seed, vocabularies=BOVW_VOCABULARIES,
                                    progress=False)
    bovw_models[(n, seed)] = bovw.model
    frames.append(bovw.table.assign(model="BoVW", source=DATASET, size=SIZE, n=n, ids="-", seed=seed, **bovw.timings))
ours = pd.concat(frames, ignore_index=True)
table1_csv = paths.tables / "table1.csv"
if table1_csv.exists():
    earlier = pd.read_csv(table1_csv)
    earlier = earlier[earlier["n"].isin(NS) & earlier["seed"].isin(SEEDS)].drop(columns="paper")
    results = pd.concat([earlier, ours[ours["model"] == DENSE_MODEL]], ignore_index=True)
    print(f"BoVW and DSI rows from {table1_csv.name} (notebook 05)")
else:
    results = ours
    print(f"{table1_csv} is missing (notebook 05 writes it): BoVW as fitted here, no DSI rows")
results = attach_paper(results)
markdown = "\n\n".join([f"{DATASET} at {SIZE} px, profile `{PROFILE}`. " + TABLE1_NOTE,
                         table1_markdown(results)])
write_table(results, paths.tables / "dense", markdown=markdown)
display(Markdown(markdown))

# %%
fig = metric_vs_n(results, ("mAP@10", "P@10", "R@100"), title="Dense, BoVW and DSI against N")
save_figure(fig, paths.figures / "dense_vs_n.png")
fig

# %% [markdown]
# Computed from the table, not written in advance. The dense model is *better* or *worse* than
# another model only when their 95% intervals do not overlap.

# %%
for metric in ("mAP@10", "P@10"):
    print(metric)
    for row in baseline_verdicts(results, metric, baseline=DENSE_MODEL).itertuples():
        side = {"better": "worse", "worse": "better"}.get(row.verdict, "overlaps")  # from the dense model's side
        name = row.model if row.ids == "-" else f"{row.model} ({row.ids})"
        print(f"  N={row.n} seed {row.seed}: dense {row.baseline_value:.3f} [{row.baseline_ci_low:.3f}, "
              f"{row.baseline_ci_high:.3f}] vs {name} {row.value:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}] "
              f"-> dense {side}")

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
studies = []
for (n, seed), (first_db, retriever) in retrievers.items():
    for i, scheme in enumerate(ID_SCHEMES):
        db = first_db if i == 0 else build_database(image_set, n, id_scheme=scheme, seed=seed)
        stages = first_stages(db, bovw=bovw_models[(n, seed)] if i == 0 else None, dsi_run_dir=paths.run_dir(db))
        if not any(name.startswith("DSI") for name in stages):
            print(f"N={n} {scheme} seed {seed}: no DSI models in {paths.run_dir(db)} (notebooks 03/04 train them)")
        if stages or i == 0:
            studies.append(rerank_database(db, retriever, stages, depths=tuple(RERANK_DEPTHS), k=K,
                                           include_alone=i == 0))
reranking = pd.concat(studies, ignore_index=True)
rerank_md = rerank_markdown(reranking, DATASET, SIZE)
write_table(reranking, paths.tables / "rerank", markdown=rerank_md)
display(Markdown(rerank_md))

# %%
fig = tradeoff_figure(reranking, "mAP@10")
save_figure(fig, paths.figures / "rerank_tradeoff.png")
fig

# %%
wide = summary(reranking)  # the mean over seeds where there are several
for n, group in wide.groupby("n"):
    alone = group[group["first_stage"] == "-"].iloc[0]
    print(f"N={n}: dense alone mAP@10 {alone['mAP@10']:.3f} in {alone['ms_per_query']:.1f} ms per query")
    for (stage, ids), rows in group[group["first_stage"] != "-"].groupby(["first_stage", "ids"], sort=False):
        base, best = rows[rows["depth"] == 0].iloc[0], rows[rows["depth"] > 0].sort_values("mAP@10").iloc[-1]
        print(f"  {stage}{'' if ids == '-' else f' ({ids} IDs)'}: mAP@10 {base['mAP@10']:.3f} alone -> "
              f"{best['mAP@10']:.3f} re-ranked at M={int(best['depth'])} "
              f"({base['ms_per_query']:.1f} -> {best['ms_per_query']:.1f} ms per query)")
