"""Write the study's notebooks (01_data ... 09_clusters) from the cells below, without outputs.

Run ``.venv/bin/python notebooks/_build_notebooks.py`` after editing a cell here or a profile:
the ``parameters`` cell of every notebook is generated from ``vitdsi_utils/profiles/smoke.yaml``
(its values) and ``cpu.yaml`` (shown in comments), so the notebooks and the profiles agree.
"""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from vitdsi_utils.runner.profiles import load_profile

HERE = Path(__file__).resolve().parent
#: The kernel every notebook names: "python3", the Python that runs Jupyter (the project's .venv).
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
SMOKE, CPU = load_profile("smoke"), load_profile("cpu")

DATA = ["PROFILE", "DATASET", "SIZE", "NS", "ID_SCHEMES", "SEEDS"]
MODEL = ["PATCH_SIZE", "DIM", "MLP_DIM", "DEPTH", "HEADS", "DROPOUT", "POS_ENCODING"]
INDEXING = ["LR", "BATCH_SIZE", "WARMUP_STEPS", "INDEX_EPOCHS", "TARGET_ACCURACY"]
RETRIEVAL = ["RETRIEVAL_EPOCHS", "MAX_PAIRS_PER_QUERY"]
RUNNER_NOTES = {
    "OUT_DIR": "tables/ and figures/ go here; None: reports/<PROFILE>",
    "RUNS_DIR": "trained models, one folder per database; None: data/runs/<PROFILE>",
}


def literal(value: object) -> str:
    """A Python literal of a YAML value, strings in double quotes."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    return repr(value)


def parameters_cell(keys: list[str], runner: tuple[str, ...] = ("OUT_DIR",)) -> nbformat.NotebookNode:
    """The papermill ``parameters`` cell: smoke values, the cpu value in a comment where it differs."""
    lines = ["# Parameters: the smoke profile's values. `vitdsi study --profile NAME` replaces them with",
             "# those of vitdsi_utils/profiles/NAME.yaml (smoke, cpu or paper)."]
    if "DATASET" in keys:
        lines.append("# DATASET: imagenette | digits | coco (coco reads VITDSI_COCO_IMAGES and VITDSI_COCO_ANNOTATIONS).")
    width = max(len(f"{k} = {literal(SMOKE[k])}") for k in keys) + 2
    for key in keys:
        assignment = f"{key} = {literal(SMOKE[key])}"
        note = f"# cpu: {literal(CPU[key])}" if CPU.get(key) != SMOKE[key] else ""
        lines.append(f"{assignment:<{width}}{note}".rstrip())
    for key in runner:
        lines.append(f"{key + ' = None':<{width}}# {RUNNER_NOTES[key]}")
    cell = new_code_cell("\n".join(lines))
    cell.metadata["tags"] = ["parameters"]
    return cell


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip())


def code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(text.strip())


MODEL_OVERRIDES = """
model_overrides = dict(patch_size=PATCH_SIZE, dim=DIM, mlp_dim=MLP_DIM, depth=DEPTH, heads=HEADS,
                       dropout=DROPOUT, pos_encoding=POS_ENCODING)


def index_config(seed: int) -> TrainConfig:
    return TrainConfig(lr=LR, batch_size=BATCH_SIZE, epochs=INDEX_EPOCHS, target_accuracy=TARGET_ACCURACY,
                       warmup_steps=WARMUP_STEPS, seed=seed, progress=False)
"""

RETRIEVAL_CONFIG = """

def retrieval_config(seed: int) -> TrainConfig:
    return TrainConfig(lr=LR, batch_size=BATCH_SIZE, epochs=RETRIEVAL_EPOCHS, seed=seed, progress=False)
"""

# ------------------------------------------------------------------------------------------
NB_DATA = [
    md("""
# 01 · Data: images, databases, splits and IDs

This notebook loads the images of the profile's dataset, shows what they look like, and draws the
databases of the study. A database of N images is balanced over the classes; in each class a
quarter of the images is *indexed* (the model memorises them) and the rest is a pool of queries,
split 0.8 / 0.1 / 0.1 into train, validation and test queries. The indexed images get IDs by one
of two schemes: *random* (shuffled) or *clustered* (same-class images get consecutive numbers).
The manifests written here list every image, its role and its ID.

With `DATASET = "coco"` every image carries the *set* of object categories annotated in it, and a
database image is relevant to a query when the two share at least one category. Where the study
needs one class per image (balancing, clustered IDs, galleries) it uses the image's *primary*
category: the rarest of its categories in the whole data set.
"""),
    parameters_cell(DATA + ["IMAGENETTE_PREVIEW", "GALLERY_PER_CLASS"]),
    code("""
import pandas as pd
from IPython.display import display

from vitdsi_utils import settings
from vitdsi_utils.data.database import build_database, databases
from vitdsi_utils.data.images import load_images, sample_image_folder
from vitdsi_utils.reports.plots import class_gallery, readable_class, save_figure, split_bar
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.runs import run_name

paths = StudyPaths.create(PROFILE, OUT_DIR)
print(f"profile {PROFILE}: tables -> {paths.tables}, figures -> {paths.figures}")
"""),
    md("""
## The images

Every image is centre-cropped to a square and resized to `SIZE` pixels; images whose aspect ratio
is outside [0.9, 1.1] are dropped, as in the paper. The count per class bounds the largest
balanced database.
"""),
    code("""
image_set = load_images(DATASET, SIZE, progress=False)
print(f"{len(image_set)} usable {DATASET} images at {SIZE} px in {len(image_set.classes)} classes; "
      f"{image_set.dropped_aspect} dropped by the aspect rule, {len(image_set.skipped)} unreadable"
      + (f", {len(image_set.unannotated)} left out for having no annotation" if image_set.is_multilabel else ""))
counts = image_set.class_counts().rename(index=readable_class).rename("images").to_frame()
if image_set.is_multilabel:
    counts = counts.rename(columns={"images": "primary"}).assign(showing=image_set.category_counts().to_numpy())
counts.T
"""),
    md("""
For multi-label data: how many categories an image shows. `primary` above counts the images whose
rarest category is that one (what the databases balance over); `showing` counts every image in which
the category appears.
"""),
    code("""
if image_set.is_multilabel:
    per_image = pd.Series(image_set.label_matrix.sum(axis=1)).value_counts().sort_index()
    display(per_image.rename_axis("categories per image").rename("images").to_frame().T)
else:
    print(f"{DATASET} is single-label: one class per image, relevance means the same class.")
"""),
    code("""
fig = class_gallery(image_set.images, image_set.labels, image_set.classes, per_class=GALLERY_PER_CLASS,
                          max_classes=20, title=f"{DATASET} at {SIZE} px"
                          + (" (rows: primary category)" if image_set.is_multilabel else ""))
save_figure(fig, paths.figures / "gallery.png")
fig
"""),
    md("""
When the profile's dataset is not Imagenette (the smoke profile uses the bundled digits), a few
Imagenette images are shown here too, so the smoke run also checks that the real images can be read.
Only a handful of files is decoded.
"""),
    code("""
if IMAGENETTE_PREVIEW and DATASET != "imagenette":
    folder = settings.imagenette_dir()
    if folder is None or not folder.is_dir():
        print(f"Imagenette preview skipped: set {settings.IMAGENETTE_ENV} to a local Imagenette copy to see it.")
    else:
        images, labels, classes = sample_image_folder(folder, SIZE, per_class=GALLERY_PER_CLASS)
        fig = class_gallery(images, labels, classes, per_class=GALLERY_PER_CLASS,
                                  title=f"Imagenette at {SIZE} px (a sample)")
        save_figure(fig, paths.figures / "imagenette_gallery.png")
        display(fig)
"""),
    md("""
## Databases and query splits

One database per N (the draw depends only on the seed, so both ID schemes see the same images in
the same roles). The table gives the images per role; the figure shows how the smallest database
splits over the classes (primary categories for multi-label data, which are balanced as far as
the data allows: a rare category gives all its images, the others share the rest evenly).
"""),
    code("""
first = {n: build_database(image_set, n, id_scheme=ID_SCHEMES[0], seed=SEEDS[0]) for n in NS}
pd.DataFrame({f"N={n}": db.counts().sum() for n, db in first.items()}).T
"""),
    code("""
db = first[NS[0]]
if db.is_multilabel:
    relevant = db.relevance("test")
    print(f"N={NS[0]}: a test query has {relevant.sum(axis=1).mean():.1f} relevant indexed images on average "
          f"(min {relevant.sum(axis=1).min()}, max {relevant.sum(axis=1).max()}) of {db.n_index}; "
          "images showing each category, per role:")
    display(db.category_counts().rename(index=readable_class).T)
"""),
    code("""
fig = split_bar(first[NS[0]])
save_figure(fig, paths.figures / "split_bar.png")
fig
"""),
    md("""
## The two ID schemes

The first indexed rows of the smallest database under each scheme: with *clustered* IDs the
classes come in blocks, so the first digits of an ID already say a lot about the class; with
*random* IDs they say nothing, and the model has to memorise every ID on its own.
"""),
    code("""
n, seed = NS[0], SEEDS[0]
by_scheme = {scheme: build_database(image_set, n, id_scheme=scheme, seed=seed)
             for scheme in ("random", "clustered")}
first_ids = pd.DataFrame({"id": by_scheme["random"].manifest["id"].head(12)})
for scheme, db in by_scheme.items():
    first_ids[f"{scheme} IDs: class"] = db.manifest["class"].head(12).map(readable_class)
first_ids
"""),
    md("""
## Manifests

One CSV per database of the grid (N × ID scheme × seed): file, class, role, database row, ID.
Later notebooks rebuild the same databases from the same seed; the manifests let anyone check that.
"""),
    code("""
for db in databases(image_set, NS, ID_SCHEMES, SEEDS):
    path = db.save_manifest(paths.tables / f"manifest_{run_name(db)}.csv")
    print(f"{path.name}: {db.n_index} indexed, {len(db.manifest) - db.n_index} queries")
"""),
]

# ------------------------------------------------------------------------------------------
NB_BOVW = [
    md("""
# 02 · The Bag-of-Visual-Words baseline

The classical baseline of the paper: grayscale SIFT descriptors of the indexed images, a k-means
vocabulary of `BOVW_WORDS` visual words, one word histogram per image, and cosine similarity
between a query's histogram and every indexed image's. Each test query gets a ranked list of
`K` indexed images; a result is relevant when it has the query's class (for COCO: when it shows
at least one object category that the query shows).

One k-means fit can land a few points of P@10 above or below another on a small database, which
is enough to flip a comparison of intervals. So every metric is averaged per query over
`BOVW_VOCABULARIES` vocabularies (k-means seeds `seed`, `seed + 1`, ...) before its interval is
drawn: the row is the baseline's expected quality, not one fit's luck.

Every metric is computed over all test queries, with a bootstrap 95% interval and the level a
random ranking would reach (`chance`). The `paper MAP@10` and `paper R@100` rows repeat the
paper's own protocol (10 random queries), for a like-for-like comparison with its numbers.

Beside it runs VLAD, a classical refinement that the paper did not try. It uses the same descriptors
and a smaller vocabulary (`VLAD_WORDS` words). Per word, it sums the residuals of the descriptors to
the word's centre, takes the signed square root of every value and L2-normalises the vector.
"""),
    parameters_cell(["PROFILE", "DATASET", "SIZE", "NS", "SEEDS", "BOVW_WORDS", "BOVW_VOCABULARIES", "VLAD_WORDS"]),
    code("""
import pandas as pd
from IPython.display import Markdown, display

from vitdsi_utils import evaluation
from vitdsi_utils.reports.paper import TABLE1_NOTE, table1_markdown
from vitdsi_utils.reports.plots import metric_vs_n, save_figure
from vitdsi_utils.reports.targets import baseline_verdicts
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies.bovw import bovw_study
from vitdsi_utils.reports.tables import write_table

paths = StudyPaths.create(PROFILE, OUT_DIR)
"""),
    code("""
bovw = bovw_study(DATASET, SIZE, NS, SEEDS, out_dir=None, n_words=BOVW_WORDS,
                             vocabularies=BOVW_VOCABULARIES, progress=False)
averaged = (f"metrics averaged per query over {BOVW_VOCABULARIES} k-means vocabularies" if BOVW_VOCABULARIES > 1
            else "one k-means vocabulary")
markdown = "\\n\\n".join([f"BoVW, {BOVW_WORDS} visual words ({averaged}), {DATASET} at {SIZE} px. " + TABLE1_NOTE,
                         table1_markdown(bovw)])
write_table(bovw, paths.tables / "bovw", markdown=markdown)
display(Markdown(markdown))
"""),
    md("""
## VLAD beside BoVW

The same databases and queries. VLAD's rows are kept in their own table (`tables/vlad.*`), so that
Table 1 in notebook 05 keeps the paper's baseline alone. `reports/bovw/` compares more VLAD settings
at 64 px (`make vlad`).
"""),
    code("""
vlad = bovw_study(DATASET, SIZE, NS, SEEDS, out_dir=None, n_words=VLAD_WORDS, encoding="vlad",
                             vocabularies=BOVW_VOCABULARIES, progress=False)
both = pd.concat([bovw, vlad], ignore_index=True)
vlad_markdown = "\\n\\n".join([f"BoVW ({BOVW_WORDS} words) and VLAD ({VLAD_WORDS} words x 128, power-normalised), "
                              f"{DATASET} at {SIZE} px. " + TABLE1_NOTE, table1_markdown(both)])
write_table(vlad, paths.tables / "vlad", markdown=vlad_markdown)
display(Markdown(vlad_markdown))
for row in baseline_verdicts(both, "mAP@10").itertuples():
    print(f"N={row.n}, seed {row.seed}: VLAD mAP@10 {row.value:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}] vs "
          f"BoVW {row.baseline_value:.3f} [{row.baseline_ci_low:.3f}, {row.baseline_ci_high:.3f}] -> {row.verdict}")
"""),
    md("""
Precision at 10 and recall at 100 against the database size. With more indexed images there are
more relevant ones to find (recall at a fixed cut-off falls) and more distractors (precision falls);
the dotted lines show where a random ranking would be.
"""),
    code("""
fig = metric_vs_n(both, ("P@10", "R@100"), title=f"BoVW ({BOVW_WORDS} words) and VLAD ({VLAD_WORDS} words)")
save_figure(fig, paths.figures / "bovw_vs_n.png")
fig
"""),
    code("""
for row in bovw[bovw["metric"] == "P@10"].itertuples():
    lift = row.value / row.chance if row.chance else float("nan")
    print(f"N={row.n}, seed {row.seed}: P@10 = {row.value:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}], "
          f"{lift:.1f}x chance ({row.chance:.3f}); {row.search_ms_per_query:.1f} ms per query")
"""),
]

# ------------------------------------------------------------------------------------------
NB_INDEXING = [
    md("""
# 03 · Indexing: the ViT memorises the database

For every database of the grid a new sequence-to-sequence ViT learns to map each indexed image to
its own ID, token by token, until its training sequence accuracy reaches `TARGET_ACCURACY` (or
`INDEX_EPOCHS` epochs pass). The trained model is saved in the run folder (`RUNS_DIR`); a later
run, and the next notebooks, load it instead of training again.

The result is the *zero-shot* DSI: it has seen no query yet. Its indexing accuracy IA@1 (the
share of indexed images whose own ID comes first in the beam search) says how well it memorised.
"""),
    parameters_cell(DATA + MODEL + INDEXING, runner=("OUT_DIR", "RUNS_DIR")),
    code("""
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
""" + MODEL_OVERRIDES),
    md("""
## Training

One line per database: epochs, wall time, the final training accuracy (re-measured without
dropout, as the stopping rule does) and IA@1 with its 95% interval. `loaded` means the model came from an earlier run.
"""),
    code("""
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
"""),
    md("""
## Figure 1: the indexing phase

Training loss and sequence accuracy per epoch, one curve per N and ID scheme (as the paper's
Figure 1). Larger databases take more epochs to memorise.
"""),
    code("""
fig = training_curves(histories, phase="indexing", split="train", metrics=("loss", "seq_acc"),
                            title="Figure 1: indexing (train)")
save_figure(fig, paths.figures / "figure1_indexing.png")
fig
"""),
    code("""
reached = runs["train_seq_acc"] >= TARGET_ACCURACY
print(f"{int(reached.sum())} of {len(runs)} runs reached the target train accuracy {TARGET_ACCURACY} "
      f"within {INDEX_EPOCHS} epochs; zero-shot IA@1 ranges {runs['ia1'].min():.3f}-{runs['ia1'].max():.3f}.")
"""),
]

# ------------------------------------------------------------------------------------------
NB_RETRIEVAL = [
    md("""
# 04 · Retrieval fine-tuning

The zero-shot model of notebook 03 (loaded from its run folder) is copied and trained for
`RETRIEVAL_EPOCHS` epochs on (query image, relevant ID) pairs: every training query is paired
with the IDs of the indexed images relevant to it: those of its class, or for COCO those sharing
one of its object categories (`MAX_PAIRS_PER_QUERY` of them, chosen with a seed, or all of them when
it is `None`, as in the paper). The validation queries give the validation
curve. The result is the *fine-tuned* DSI, saved beside the zero-shot model.
"""),
    parameters_cell(DATA + MODEL + INDEXING + RETRIEVAL, runner=("OUT_DIR", "RUNS_DIR")),
    code("""
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
""" + MODEL_OVERRIDES + RETRIEVAL_CONFIG),
    code("""
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
"""),
    md("""
## Figures 2 and 3: the retrieval phase

Loss and sequence accuracy per epoch on the training pairs (Figure 2) and on the validation pairs
(Figure 3). A query has many relevant IDs, so its pairs contradict one another: the accuracy of a
single target sequence stays low even when the model ranks relevant IDs well. A validation loss
that rises while the training loss falls means the model memorises the training queries.
"""),
    code("""
fig = training_curves(histories, phase="retrieval", split="train", title="Figure 2: retrieval (train)")
save_figure(fig, paths.figures / "figure2_retrieval_train.png")
fig
"""),
    code("""
fig = training_curves(histories, phase="retrieval", split="val", title="Figure 3: retrieval (validation)")
save_figure(fig, paths.figures / "figure3_retrieval_val.png")
fig
"""),
]

# ------------------------------------------------------------------------------------------
NB_RESULTS = [
    md("""
# 05 · Results: Table 1

Every model is scored on the same test queries: BoVW (from notebook 02), the zero-shot DSI
(notebook 03) and the fine-tuned DSI (notebook 04), for every N and ID scheme. The DSI ranked
lists come from beam search constrained to the IDs that exist, so each list holds `K` distinct,
valid IDs. IA@1 and IA@5 use every indexed image as a query for its own ID.

Values are over all test queries with bootstrap 95% intervals; `chance` is a random ranking; the
paper's numbers stand beside ours (its MAP@10 and R@100 used 10 random queries, which our
`protocol` columns repeat).
"""),
    parameters_cell(["PROFILE", "DATASET", "SIZE", "NS", "ID_SCHEMES", "SEEDS", "K"], runner=("OUT_DIR", "RUNS_DIR")),
    code("""
import pandas as pd
from IPython.display import Markdown, display

from vitdsi_utils import evaluation
from vitdsi_utils.data.database import databases
from vitdsi_utils.data.images import load_images
from vitdsi_utils.reports.paper import TABLE1_NOTE, attach_paper, table1_markdown
from vitdsi_utils.reports.plots import metric_bars, save_figure
from vitdsi_utils.reports.targets import baseline_verdicts
from vitdsi_utils.runs import StudyPaths, load_trained
from vitdsi_utils.reports.tables import FINE_TUNED, ZERO_SHOT
from vitdsi_utils.reports.tables import write_table

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
image_set = load_images(DATASET, SIZE, progress=False)
bovw_csv = paths.tables / "bovw.csv"
if not bovw_csv.exists():
    raise FileNotFoundError(f"{bovw_csv} is missing: run "
                            f"`vitdsi study --profile {PROFILE} --dataset {DATASET} --start-at 02_bovw`")
bovw = pd.read_csv(bovw_csv)
"""),
    code("""
frames = [bovw.drop(columns="paper")]
for db in databases(image_set, NS, ID_SCHEMES, SEEDS):
    run_dir, s = paths.run_dir(db), db.settings
    for name, file in ((ZERO_SHOT, "zero_shot.pt"), (FINE_TUNED, "fine_tuned.pt")):
        model, codec, meta = load_trained(run_dir / file, PROFILE, dataset=DATASET)
        table, timings = evaluation.evaluate_dsi(model, codec, db, k=K, seed=s["seed"])
        frames.append(table.assign(model=name, source=s["source"], size=s["size"], n=s["n"], ids=s["id_scheme"],
                                   seed=s["seed"], epochs=meta["epoch"], train_s=meta["extra"].get("seconds"),
                                   **timings))
        print(f"{name}, N={s['n']} {s['id_scheme']} seed {s['seed']}: "
              f"{timings['search_ms_per_query']:.1f} ms per query")
results = attach_paper(pd.concat(frames, ignore_index=True))
"""),
    md("""
## Table 1
"""),
    code("""
table1 = "\\n\\n".join([f"{DATASET} at {SIZE} px, profile `{PROFILE}`. " + TABLE1_NOTE,
                       table1_markdown(results)])
write_table(results, paths.tables / "table1", markdown=table1)
display(Markdown(table1))
"""),
    code("""
fig = metric_bars(results, ("IA@1", "mAP@10", "P@10", "R@100"))
save_figure(fig, paths.figures / "metric_bars.png")
fig
"""),
    md("""
## What the numbers say

Computed from the table above, not written in advance: a DSI variant *beats* BoVW on a metric only
when its 95% interval lies wholly above BoVW's at the same N; overlapping intervals decide nothing.
"""),
    code("""
def sentence(metric: str) -> None:
    verdicts = baseline_verdicts(results, metric)
    for row in verdicts.itertuples():
        print(f"  N={row.n} seed {row.seed}, {row.model} ({row.ids}): {row.value:.3f} "
              f"[{row.ci_low:.3f}, {row.ci_high:.3f}] vs BoVW {row.baseline_value:.3f} -> {row.verdict}")
    wins = verdicts.groupby("n")["verdict"].apply(lambda v: (v == "better").any())
    print(f"  {metric}: some DSI variant beats BoVW with non-overlapping intervals at "
          f"{int(wins.sum())} of {len(wins)} database sizes.")

for metric in ("mAP@10", "P@10"):
    print(metric)
    sentence(metric)

ia = results[(results["metric"] == "IA@1") & (results["model"] == ZERO_SHOT)]
print(f"Zero-shot IA@1: {ia['value'].min():.3f}-{ia['value'].max():.3f} (target of the project: >= 0.99 at every N).")
dsi = results[results["model"] != "BoVW"]
wide = dsi.pivot_table(index=["model", "n", "seed", "metric"], columns="ids", values="value")
if {"clustered", "random"} <= set(wide.columns):
    gap = (wide["clustered"] - wide["random"]).abs()
    print(f"Largest clustered-random gap over all DSI metrics: {gap.max():.3f} ({' / '.join(map(str, gap.idxmax()))}).")
"""),
]

# ------------------------------------------------------------------------------------------
NB_DEMO = [
    md("""
# 06 · Demo: query the models

Pick a test query from the strip (or upload your own image), tick the models, choose K and press
**Run**: each model's top-K indexed images appear side by side, relevant ones (the query's class;
for COCO, any shared object category) framed in green with a check mark, with the score and the
time the model took for this query.
BoVW is fitted here on the indexed images; the two DSI models are loaded from the study's run
folder (`RUNS_DIR`), for the first database of the grid.
"""),
    parameters_cell(["PROFILE", "DATASET", "SIZE", "NS", "ID_SCHEMES", "SEEDS", "BOVW_WORDS"],
                    runner=("OUT_DIR", "RUNS_DIR")),
    code("""
import pandas as pd

from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.demo import QueryDemo

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
image_set = load_images(DATASET, SIZE, progress=False)
db = build_database(image_set, NS[0], id_scheme=ID_SCHEMES[0], seed=SEEDS[0])
demo = QueryDemo.from_run_dir(paths.runs, db, bovw_words=BOVW_WORDS, profile=PROFILE, k=10)
demo
"""),
    md("""
## One query, run from code

The same search without clicking (this is what runs when the notebook is executed headless): the
first test query, every model, K = 10. The figure is saved for the report.
"""),
    code("""
demo.select_query(0)
results = demo.run()
summary = pd.DataFrame(
    [(name, len(rows), sum(bool(demo.is_relevant(r)) for r in rows), latency)
     for name, (rows, scores, latency) in results.items()],
    columns=["model", "K", "relevant", "latency_ms"],
)
fig = demo.result_figure()
save_figure(fig, paths.figures / "demo_example.png")
print(f"{demo.query_title}: " + "; ".join(f"{r.model} {r.relevant}/{r.K} relevant in {r.latency_ms:.1f} ms"
                                          for r in summary.itertuples()))
fig
"""),
]

# ------------------------------------------------------------------------------------------
# 07_dense: the dense retrieval baseline (seed 001) and re-ranking (seed 004)
DENSE = ["DENSE_EPOCHS", "DENSE_LR", "DENSE_BATCH_SIZE", "DENSE_MARGIN", "DENSE_ENTROPY_WEIGHT", "DENSE_POOLING",
         "DENSE_TRAIN_ON_INDEX", "RERANK_DEPTHS"]

NB_DENSE = [
    md("""
# 07 · A dense baseline, and re-ranking

The DSI is compared with *index-then-retrieve* systems. BoVW (notebook 02) is the classical one;
this notebook adds a learned one. A ViT encoder of the DSI's size maps an image to one
unit-length vector: the mean of its patch tokens (`DENSE_POOLING: mean`) or a class token (`cls`). It is trained on labelled images with a contrastive loss: images
of the same class are pulled together, images of different classes are pushed apart while their
cosine similarity exceeds a margin (`DENSE_MARGIN`). A differential-entropy term (weight
`DENSE_ENTROPY_WEIGHT`) pushes every embedding away from its nearest neighbour in the batch, so
the vectors spread over the sphere instead of collapsing. This is the recipe of "Training Vision
Transformers for Image Retrieval" (seed 001). The indexed images are embedded once into a flat
inner-product index (FAISS), and a query returns its nearest database rows.

The encoder learns from the same labelled images the fine-tuned DSI sees: the train queries and,
with `DENSE_TRAIN_ON_INDEX`, the indexed images. Validation queries are only monitored and test
queries stay unseen. The dense model does not depend on the ID scheme, so it is trained once per
database, on the database drawn for the first scheme. Every scheme draws the same images.

The second half follows LightningDOT (seed 004). A fast first stage (BoVW, or the DSI's beam
search) proposes candidates. The dense encoder re-scores the first M of them. We ask what the
re-ranking buys in quality and what it costs in time per query.
"""),
    parameters_cell(DATA + MODEL + ["BOVW_WORDS", "BOVW_VOCABULARIES", "K"] + DENSE, runner=("OUT_DIR", "RUNS_DIR")),
    code("""
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
"""),
    md("""
## Training

One encoder per database. The line gives the training time and the validation mAP@10 (val
queries searched among the indexed images) after the last epoch and at its best. `loaded` means
the encoder came from an earlier run (`dense.pt` in the run folder).
"""),
    code("""
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
"""),
    code("""
fig = training_curves(histories, phase="dense", split="train", metrics=("loss", "contrastive", "entropy"),
                            title="Dense encoder: training objective per epoch")
save_figure(fig, paths.figures / "dense_training.png")
fig
"""),
    code("""
fig = training_curves(histories, phase="dense", split="val", metrics=("map@10", "p@10"),
                            title="Dense encoder: validation queries per epoch")
save_figure(fig, paths.figures / "dense_validation.png")
fig
"""),
    md("""
## Dense beside BoVW and DSI

Each test query returns its `K` nearest indexed images. The metrics and intervals are Table 1's.
BoVW is fitted here again, because the re-ranking below needs the fitted model. The table shows
BoVW and DSI as notebook 05 scored them (`tables/table1.csv`). When that table is missing, it
shows the BoVW fitted here and no DSI rows.
"""),
    code("""
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
markdown = "\\n\\n".join([f"{DATASET} at {SIZE} px, profile `{PROFILE}`. " + TABLE1_NOTE,
                         table1_markdown(results)])
write_table(results, paths.tables / "dense", markdown=markdown)
display(Markdown(markdown))
"""),
    code("""
fig = metric_vs_n(results, ("mAP@10", "P@10", "R@100"), title="Dense, BoVW and DSI against N")
save_figure(fig, paths.figures / "dense_vs_n.png")
fig
"""),
    md("""
Computed from the table, not written in advance. The dense model is *better* or *worse* than
another model only when their 95% intervals do not overlap.
"""),
    code("""
for metric in ("mAP@10", "P@10"):
    print(metric)
    for row in baseline_verdicts(results, metric, baseline=DENSE_MODEL).itertuples():
        side = {"better": "worse", "worse": "better"}.get(row.verdict, "overlaps")  # from the dense model's side
        name = row.model if row.ids == "-" else f"{row.model} ({row.ids})"
        print(f"  N={row.n} seed {row.seed}: dense {row.baseline_value:.3f} [{row.baseline_ci_low:.3f}, "
              f"{row.baseline_ci_high:.3f}] vs {name} {row.value:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}] "
              f"-> dense {side}")
"""),
    md("""
## Re-ranking: a fast first stage, the dense encoder on its top M

For each database, BoVW's top-`K` list and (where notebooks 03/04 left them in the run folder)
the DSI's beam-search lists are re-scored by the dense encoder. The first M candidates are
re-ordered by cosine similarity and the rest keep their place. `M = 0` is the first stage alone.
The star is the dense search over the whole database. A time per query is the batch's wall time
divided by the number of queries. The re-ranking time includes embedding the query, which costs
as much as a full dense search at these database sizes.
"""),
    code("""
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
"""),
    code("""
fig = tradeoff_figure(reranking, "mAP@10")
save_figure(fig, paths.figures / "rerank_tradeoff.png")
fig
"""),
    code("""
wide = summary(reranking)  # the mean over seeds where there are several
for n, group in wide.groupby("n"):
    alone = group[group["first_stage"] == "-"].iloc[0]
    print(f"N={n}: dense alone mAP@10 {alone['mAP@10']:.3f} in {alone['ms_per_query']:.1f} ms per query")
    for (stage, ids), rows in group[group["first_stage"] != "-"].groupby(["first_stage", "ids"], sort=False):
        base, best = rows[rows["depth"] == 0].iloc[0], rows[rows["depth"] > 0].sort_values("mAP@10").iloc[-1]
        print(f"  {stage}{'' if ids == '-' else f' ({ids} IDs)'}: mAP@10 {base['mAP@10']:.3f} alone -> "
              f"{best['mAP@10']:.3f} re-ranked at M={int(best['depth'])} "
              f"({base['ms_per_query']:.1f} -> {best['ms_per_query']:.1f} ms per query)")
"""),
]

NOTEBOOKS = {
    "01_data.ipynb": NB_DATA,
    "02_bovw.ipynb": NB_BOVW,
    "03_indexing.ipynb": NB_INDEXING,
    "04_retrieval.ipynb": NB_RETRIEVAL,
    "05_results.ipynb": NB_RESULTS,
    "06_demo.ipynb": NB_DEMO,
    "07_dense.ipynb": NB_DENSE,
}

# ------------------------------------------------------------------------------------------
# 08_ids: ID schemes (semantic, residual-quantised, atomic IDs against the paper's dense ones)
IDS = ["IDS_NS", "IDS_SCHEMES", "IDS_K", "IDS_C", "IDS_RQ_LEVELS", "IDS_RQ_CODEBOOK"]
NB_IDS = [
    md("""
# 08 · ID schemes: semantic, residual-quantised and atomic IDs

The paper numbered the indexed images in decimal, either shuffled (*random*) or grouped by class
(*clustered*), and found random IDs much worse; clustered IDs use the class labels, which a real
index does not have. This notebook trains the same DSI with three schemes that need no labels:

- **semantic**: hierarchical k-means over image embeddings, as in the original DSI. The images are
  split into `IDS_K` clusters, a cluster of more than `IDS_C` images is split again, and the members
  of a small cluster are numbered 0..c-1. Similar images share a prefix.
- **rq**: residual quantisation. `IDS_RQ_LEVELS` k-means codebooks of `IDS_RQ_CODEBOOK` codewords; each
  level quantises what the previous levels left. The code is the tuple of codeword numbers.
  Images that get the same code (a *collision*) each get one more digit, their rank in the group.
- **atomic**: one output token per image: the decoder chooses among all indexed images in one step.

The embeddings are the images' BoVW histograms (`BOVW_WORDS` words, tf-idf, L2-normalised), the
only encoder that needs no training. Every model is trained with the profile's settings (those of
notebooks 03 and 04, whose random and clustered models are loaded here, not retrained).
"""),
    parameters_cell(["PROFILE", "DATASET", "SIZE", "SEEDS"] + MODEL + INDEXING + RETRIEVAL + ["BOVW_WORDS", "K"] + IDS,
                    runner=("OUT_DIR", "RUNS_DIR")),
    code("""
import pandas as pd
from IPython.display import Markdown, display

from vitdsi_utils.data.images import load_images
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.reports.targets import gap_markdown, gap_table
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies.ids import compare_id_schemes, describe_gaps, id_scheme_bars, ids_markdown
from vitdsi_utils.reports.tables import write_table
from vitdsi_utils.training.config import TrainConfig

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
image_set = load_images(DATASET, SIZE, progress=False)
id_params = dict(k=IDS_K, c=IDS_C, levels=IDS_RQ_LEVELS, codebook_size=IDS_RQ_CODEBOOK, bovw_words=BOVW_WORDS)
""" + MODEL_OVERRIDES + RETRIEVAL_CONFIG),
    md("""
## Training and scoring

One line per database and scheme: the IDs (how many tokens, how many raw RQ codes collided), the
indexing run and its zero-shot IA@1, and the fine-tuning time. `loaded` means the models came from
an earlier run.
"""),
    code("""
results, runs, histories = compare_id_schemes(
    image_set, IDS_NS, IDS_SCHEMES, SEEDS, runs_dir=paths.runs, index_config=index_config,
    retrieval_config=retrieval_config, model_overrides=model_overrides, max_pairs_per_query=MAX_PAIRS_PER_QUERY,
    k=K, id_params=id_params)
histories.to_csv(paths.tables / "histories_ids.csv", index=False)
"""),
    md("""
## The comparison

Metrics over all test queries (IA: all indexed images) with bootstrap 95% intervals. Beside them,
facts about the IDs: their length in tokens, the decoder's vocabulary (content tokens + BOS/EOS/PAD),
the share of images whose raw RQ code collided with another's, and the *sibling class agreement*:
how often two IDs that differ only in their last token belong to the same class (chance in
brackets), which says how much class information the ID's prefix carries.

*Invalid IDs*: the share of decoded outputs that are not the ID of an indexed image. The beam
search walks the trie of existing IDs, so its rate is 0 by construction (measured anyway); free
greedy decoding without the trie shows how often the model on its own would leave the ID set.
"""),
    code("""
markdown = "\\n\\n".join([
    f"DSI by ID scheme, {DATASET} at {SIZE} px, profile `{PROFILE}`; semantic and RQ IDs from BoVW embeddings "
    f"({BOVW_WORDS} words, tf-idf); k = {IDS_K}, c = {IDS_C}; RQ {IDS_RQ_LEVELS} levels x {IDS_RQ_CODEBOOK} codewords.",
    ids_markdown(results, runs, IDS_SCHEMES)])
write_table(results, paths.tables / "ids", markdown=markdown)
write_table(runs, paths.tables / "ids_runs")
display(Markdown(markdown))
"""),
    code("""
fig = id_scheme_bars(results, schemes=IDS_SCHEMES)
save_figure(fig, paths.figures / "ids_bars.png")
fig
"""),
    md("""
## Distance to clustered IDs (target 4)

The study's target 4 asks for a label-free scheme within 0.03 of clustered IDs on every metric.
Each scheme minus clustered, per model and N (point estimates; with this many test queries the
intervals above are several times wider than 0.03, so a small gap is not evidence of a tie).
"""),
    code("""
if "clustered" in IDS_SCHEMES:
    gaps = gap_table(results, reference="clustered")
    write_table(gaps, paths.tables / "ids_gaps", markdown=gap_markdown(gaps))
    display(Markdown(gap_markdown(gaps)))
    print("\\n".join(describe_gaps(gaps)))
else:
    print("IDS_SCHEMES has no clustered run to compare with.")
"""),
]
NOTEBOOKS["08_ids.ipynb"] = NB_IDS

# ------------------------------------------------------------------------------------------
# 09_clusters: k-means over the trained encoders' embeddings (seed 002)
CLUSTERS = ["CLUSTER_N", "CLUSTER_ROLE", "CLUSTER_POOLINGS", "CLUSTER_NORMALISE", "CLUSTER_BASELINES", "CLUSTER_KS",
            "CLUSTER_N_INIT", "CLUSTER_GALLERY_K", "CLUSTER_GALLERY_CLUSTERS", "CLUSTER_GALLERY_IMAGES"]
NB_CLUSTERS = [
    md("""
# 09 · Embedding clusters: do the encoders group images by class?

Seed 002 clusters ViT and DINOv2 embeddings of a photo collection with k-means, for a range of k. It
reads the silhouette, Davies-Bouldin and sum-of-squares curves to choose k, and it looks at the
largest clusters. Here the same is done with the encoders this study trained, on the images of one
database (`CLUSTER_N`):

- the DSI's encoder after indexing (zero-shot, notebook 03) and after retrieval fine-tuning
  (notebook 04), for each ID scheme;
- the dense contrastive encoder (notebook 07);
- two untrained references: 8x8 average-pooled pixels and tf-idf BoVW histograms.

An image becomes one vector in one of three ways: the output of the class token (only the dense
encoder can have one, when `DENSE_POOLING` is `cls`); the mean of the patch tokens; or all patch
tokens concatenated. With `CLUSTER_NORMALISE` every vector is scaled to unit length first, so
k-means groups images by cosine similarity, the similarity used for retrieval.

Unlike the photos of seed 002, these images have classes. So beside the label-free scores we can
ask whether the clusters follow the classes. *Purity* is the share of images whose cluster's
majority class is their own. *NMI* is the normalised mutual information of clusters and classes:
1 when they coincide, near 0 when they are independent. *AMI* is the same corrected for chance, which
matters for small sets of images.
"""),
    parameters_cell(["PROFILE", "DATASET", "SIZE", "NS", "ID_SCHEMES", "SEEDS", "BOVW_WORDS"] + CLUSTERS,
                    runner=("OUT_DIR", "RUNS_DIR")),
    code("""
import time

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from vitdsi_utils import clusters
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies.clusters import cluster_gallery, cluster_study, clusters_markdown, metric_curves, series_label, size_histograms, study_encoders, summary
from vitdsi_utils.ids.schemes import bovw_embeddings, pixel_embeddings
from vitdsi_utils.reports.tables import write_table

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
image_set = load_images(DATASET, SIZE, progress=False)
n, seed = CLUSTER_N or max(NS), SEEDS[0]
if n not in NS:
    raise ValueError(f"CLUSTER_N = {n} is not one of NS = {NS}: encoders are trained only for the databases of NS")
dbs = {scheme: build_database(image_set, n, id_scheme=scheme, seed=seed) for scheme in ID_SCHEMES}
db = dbs[ID_SCHEMES[0]]  # every scheme draws the same images in the same roles
if CLUSTER_ROLE == "all":
    images, classes = db.images, db.manifest["label"].to_numpy()
else:
    images, classes = db.split(CLUSTER_ROLE)
k_reference = CLUSTER_GALLERY_K or len(np.unique(classes))
ks = sorted(set(CLUSTER_KS) | {k_reference})
print(f"N={n} seed {seed}: {len(images)} images ({CLUSTER_ROLE}) in {len(np.unique(classes))} classes; "
      f"k in {ks}; reference k = {k_reference}")
"""),
    md("""
## Embeddings

One row per embedding: its width and the time it took (every image, one pass of the encoder).
"""),
    code("""
encoders = study_encoders(paths, dbs, PROFILE, dataset=DATASET)
embeddings, rows = {}, []
for name, model in encoders.items():
    for pooling in CLUSTER_POOLINGS:
        if pooling not in clusters.available_poolings(model):
            continue
        start = time.perf_counter()
        embeddings[(name, pooling)] = clusters.embed(model, images, pooling=pooling, normalise=CLUSTER_NORMALISE)
        rows.append((name, pooling, embeddings[(name, pooling)].shape[1], time.perf_counter() - start))
references = {"pixels": ("pixels (untrained)", lambda: pixel_embeddings(images, side=8)),
              "bovw": ("BoVW tf-idf (untrained)", lambda: bovw_embeddings(images, n_words=BOVW_WORDS, seed=seed))}
for key in CLUSTER_BASELINES:
    name, make = references[key]
    start = time.perf_counter()
    embeddings[(name, "-")] = make()
    rows.append((name, "-", embeddings[(name, "-")].shape[1], time.perf_counter() - start))
missing = sorted({p for p in CLUSTER_POOLINGS} - {pooling for _, pooling in embeddings})
if missing:
    print(f"No encoder offers pooling {missing} (a class token exists only in a dense encoder with DENSE_POOLING = cls).")
pd.DataFrame(rows, columns=["encoder", "pooling", "dim", "seconds"]).round(2)
"""),
    md("""
## k-means over k

For every embedding and every k: k-means (`CLUSTER_N_INIT` restarts), then the scores. The star on
each line marks its elbow: the k farthest below the straight line joining the two ends of the
sum-of-squares curve, both axes scaled to [0, 1]. Silhouette and Davies-Bouldin use distances only;
purity and NMI compare with the classes. Purity rises with k by construction (many small clusters
are each nearly pure), so read it beside NMI.
"""),
    code("""
start = time.perf_counter()
table, labels = cluster_study(embeddings, classes, ks, n_init=CLUSTER_N_INIT, random_state=seed,
                                       progress=False)
print(f"{len(table)} clusterings in {time.perf_counter() - start:.1f} s")
note = (f"k-means of {len(images)} {DATASET} images at {SIZE} px (database N = {n}, seed {seed}, role {CLUSTER_ROLE}), "
        f"{CLUSTER_N_INIT} restart(s) per k, embeddings {'L2-normalised' if CLUSTER_NORMALISE else 'as they come'}, "
        f"profile `{PROFILE}`.")
write_table(table, paths.tables / "clusters", markdown=clusters_markdown(table, k_reference, note=note))
chosen = summary(table, k_reference)
write_table(chosen, paths.tables / "clusters_summary")
chosen.round(3)
"""),
    md("""
### On images no encoder was trained on

The DSI and dense encoders were trained on the indexed images and the train queries. The clusters
above are found on all images, so part of their agreement with the classes may come from images
the encoder has seen with their labels. The table counts purity, NMI and AMI at the reference k
again, over the validation and test queries only (the same clusters). On a small subset NMI and
purity rise by chance alone; AMI is corrected for chance, so compare AMI across the two columns.
"""),
    code("""
roles = db.manifest["role"].to_numpy() if CLUSTER_ROLE == "all" else np.full(len(classes), CLUSTER_ROLE)
unseen = np.isin(roles, ["val", "test"])
rows = []
for encoder, pooling in embeddings:
    found = labels[(encoder, pooling, k_reference)]
    every, held_out = clusters.subset_scores(found, classes, np.ones(len(found), bool)), None
    if unseen.any():
        held_out = clusters.subset_scores(found, classes, unseen)
    rows.append({"encoder": encoder, "pooling": pooling, "k": k_reference, "purity": every["purity"], "nmi": every["nmi"],
                 "ami": every["ami"], "n_unseen": held_out["n"] if held_out else 0,
                 **{f"{m}_unseen": held_out[m] if held_out else np.nan for m in ("purity", "nmi", "ami")}})
unseen_table = pd.DataFrame(rows)
write_table(unseen_table, paths.tables / "clusters_unseen")
unseen_table.round(3)
"""),
    code("""
fig = metric_curves(table, title=f"k-means of the embeddings ({DATASET}, {SIZE} px, {len(images)} images)")
save_figure(fig, paths.figures / "clusters_metrics.png")
fig
"""),
    md("""
## Cluster sizes at the reference k

At k = the number of classes (or `CLUSTER_GALLERY_K`): how many images each cluster holds. The
dashed line is the size of equal clusters. An encoder that follows the classes gives sizes near it,
because the database is balanced. One or two giant clusters mean that most images look alike to
the encoder.
"""),
    code("""
sizes = {series_label(encoder, pooling): clusters.cluster_sizes(labels[(encoder, pooling, k_reference)],
                                                                          k_reference)
         for encoder, pooling in embeddings}
fig = size_histograms(sizes, title=f"Cluster sizes at k = {k_reference}")
save_figure(fig, paths.figures / "clusters_sizes.png")
fig
"""),
    md("""
## The largest clusters

The embeddings with the highest and the lowest NMI at the reference k. Each row is one of the
largest clusters: random members, framed in green when they belong to the cluster's majority class
and in red otherwise.
"""),
    code("""
at_k = table[table["k"] == k_reference].sort_values("nmi", ascending=False)
picks = {"best": at_k.iloc[0], "worst": at_k.iloc[-1]}
figures = []
for tag, row in picks.items():
    label = series_label(row["encoder"], row["pooling"])
    fig = cluster_gallery(images, labels[(row["encoder"], row["pooling"], k_reference)], classes, db.classes,
                                   n_clusters=CLUSTER_GALLERY_CLUSTERS, per_cluster=CLUSTER_GALLERY_IMAGES, seed=seed,
                                   title=f"{tag} NMI at k = {k_reference}: {label} (NMI {row['nmi']:.2f})")
    save_figure(fig, paths.figures / f"clusters_gallery_{tag}.png")
    figures.append(fig)
figures[0]
"""),
    code("""
figures[1]
"""),
    md("""
## What the numbers say

Computed from the table, not written in advance.
"""),
    code("""
ref = table[table["k"] == k_reference].set_index(["encoder", "pooling"])
for (encoder, pooling), row in ref.sort_values("nmi", ascending=False).iterrows():
    best = chosen[(chosen["encoder"] == encoder) & (chosen["pooling"] == pooling)].iloc[0]
    print(f"{series_label(encoder, pooling):42s} k={k_reference}: NMI {row['nmi']:.3f}, purity "
          f"{row['purity']:.3f}, silhouette {row['silhouette']:.3f}, DB {row['davies_bouldin']:.2f}; "
          f"elbow k {best['elbow_k']}, best-silhouette k {best['best_silhouette_k']}")
for scheme in ID_SCHEMES:
    pairs = [(p, ref.loc[(f"DSI zero-shot ({scheme})", p), "nmi"], ref.loc[(f"DSI fine-tuned ({scheme})", p), "nmi"])
             for p in ("mean", "concat", "cls") if (f"DSI zero-shot ({scheme})", p) in ref.index]
    for pooling, zero, tuned in pairs:
        print(f"DSI {scheme} IDs, {pooling} pooling: NMI {zero:.3f} after indexing -> {tuned:.3f} after fine-tuning")
for row in unseen_table.sort_values("nmi", ascending=False).itertuples():
    print(f"{series_label(row.encoder, row.pooling):42s} NMI {row.nmi:.3f} / AMI {row.ami:.3f} on all images, "
          f"{row.nmi_unseen:.3f} / {row.ami_unseen:.3f} on the {row.n_unseen} val/test queries")
silhouette_best = ref["silhouette"].idxmax()
print(f"Highest silhouette at k={k_reference}: {series_label(*silhouette_best)}; highest NMI: "
      f"{series_label(*ref['nmi'].idxmax())}.")
"""),
]
NOTEBOOKS["09_clusters.ipynb"] = NB_CLUSTERS


# ------------------------------------------------------------------------------------------
# 14_dense_init: the DSI started from the dense encoder, multi-task; the project's targets
INIT = ["INIT_SCHEMES", "INIT_MIX_RATIO", "INIT_EPOCHS", "IDS_K", "IDS_C"]
NB_INIT = [
    md("""
# 14 · A DSI that starts from the dense encoder, and the project's targets

The paper's DSI never beat BoVW, and fine-tuning erased its index. The studies before this one
each found a piece of the answer: the dense encoder (07) learns which images are alike, multi-task
training (03/04 with `--multitask`) keeps the index while the model learns retrieval, and
label-free IDs can be derived from embeddings (08). This notebook puts them together:

1. the DSI's encoder starts from notebook 07's contrastive encoder, trained on the same labelled
   images the fine-tuned DSI sees (train queries and indexed images), so the data budget is the paper's;
2. indexing trains the whole model until it reproduces every ID (the profile's stop rule);
3. fine-tuning mixes retrieval pairs with the indexing examples (`INIT_MIX_RATIO` pairs per
   indexed image and epoch, `INIT_EPOCHS` epochs).

It runs with the paper's *clustered* and *random* IDs and with *semantic* IDs from hierarchical
k-means over the dense embeddings (`IDS_K` branches, leaves of `IDS_C`), which use no labels.
The last section checks the targets of `STUDY.md` on every model of the study.
"""),
    parameters_cell(DATA + MODEL + INDEXING + ["MAX_PAIRS_PER_QUERY", "BOVW_WORDS", "K"] + DENSE[:-1] + INIT,
                    runner=("OUT_DIR", "RUNS_DIR")),
    code("""
import pandas as pd
from IPython.display import Markdown, display

from vitdsi_utils import evaluation
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.reports.paper import attach_paper, table1_markdown
from vitdsi_utils.reports.plots import metric_vs_n, save_figure
from vitdsi_utils.reports.targets import beats_baseline, summarise, zero_shot_memorisation
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.baselines.dense import DENSE_MODEL, DenseTrainConfig
from vitdsi_utils.studies.dense import train_or_load
from vitdsi_utils.studies.dense_init import INIT_MULTITASK, INIT_ZERO_SHOT, run_dense_init
from vitdsi_utils.runs import run_name
from vitdsi_utils.reports.targets import gap_markdown, gap_table
from vitdsi_utils.reports.tables import write_table
from vitdsi_utils.training.config import TrainConfig

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
image_set = load_images(DATASET, SIZE, progress=False)
""" + MODEL_OVERRIDES + """

def multitask_config(seed: int) -> TrainConfig:
    return TrainConfig(lr=LR, batch_size=BATCH_SIZE, epochs=INIT_EPOCHS, seed=seed, progress=False)


def dense_config(seed: int) -> DenseTrainConfig:
    return DenseTrainConfig(epochs=DENSE_EPOCHS, lr=DENSE_LR, batch_size=DENSE_BATCH_SIZE, margin=DENSE_MARGIN,
                            entropy_weight=DENSE_ENTROPY_WEIGHT, seed=seed, progress=False)
"""),
    md("""
## Training

The dense encoder of each database is the one notebook 07 trained (`dense.pt` in the run folder
of the first ID scheme); it is trained here only when that file is missing. One line per
database and ID scheme: indexing epochs and seconds, then the multi-task phase. `loaded` means
the models came from an earlier run.
"""),
    code("""
frames, histories, id_facts = [], [], []
for n in NS:
    for seed in SEEDS:
        first = build_database(image_set, n, id_scheme=ID_SCHEMES[0], seed=seed)
        retriever = train_or_load(first, model_overrides={**model_overrides, "pooling": DENSE_POOLING},
                                  train_config=dense_config(seed), include_index=DENSE_TRAIN_ON_INDEX,
                                  run_dir=paths.run_dir(first))
        for scheme in INIT_SCHEMES:
            own = scheme if scheme in ("clustered", "random") else ID_SCHEMES[0]
            db = build_database(image_set, n, id_scheme=own, seed=seed)
            run = run_dense_init(db, paths.run_dir(first) / "dense.pt", scheme=scheme,
                                 run_dir=paths.runs / run_name(db, f"{scheme}-dense-init"),
                                 model_overrides=model_overrides, index_config=index_config(seed),
                                 multitask_config=multitask_config(seed), mix_ratio=INIT_MIX_RATIO,
                                 max_pairs_per_query=MAX_PAIRS_PER_QUERY, k=K, id_params=dict(k=IDS_K, c=IDS_C))
            ex = run.experiment
            frames.append(ex.table)
            id_facts.append({"n": n, "seed": seed, **run.id_facts})
            for phase in (ex.zero_shot, ex.multitask):
                histories.append(phase.history.to_frame().assign(n=n, ids=scheme, seed=seed))
            print(f"N={n} {scheme} seed {seed}: indexed in {ex.zero_shot.epochs} epochs ({ex.zero_shot.seconds:.0f} s), "
                  f"multi-task {ex.multitask.epochs} epochs ({ex.multitask.seconds:.0f} s)")
ours = pd.concat(frames, ignore_index=True)
histories = pd.concat(histories, ignore_index=True)
histories.to_csv(paths.tables / "histories_dense_init.csv", index=False)
write_table(pd.DataFrame(id_facts), paths.tables / "dense_init_ids")
"""),
    md("""
## Every model of the study

The rows of notebooks 05 (BoVW, DSI zero-shot and fine-tuned), 07 (dense search) and 08 (other ID
schemes) where their tables exist, and this notebook's two models. Metrics over all test queries
(IA: all indexed images), bootstrap 95% intervals.
"""),
    code("""
earlier = []
for name in ("table1", "dense", "ids"):
    csv = paths.tables / f"{name}.csv"
    if csv.exists():
        earlier.append(pd.read_csv(csv))
    else:
        print(f"{csv.name} is missing (an earlier notebook writes it); its rows are left out")
results = pd.concat(earlier + [ours], ignore_index=True)
results = results[results["n"].isin(NS) & results["seed"].isin(SEEDS)]
results = results.drop(columns=[c for c in ("paper",) if c in results.columns])
results = results.drop_duplicates(subset=["model", "ids", "n", "seed", "metric"], keep="last")
results = attach_paper(results)
write_table(results, paths.tables / "dense_init", markdown=table1_markdown(results))
display(Markdown(table1_markdown(results[results["model"].isin([INIT_ZERO_SHOT, INIT_MULTITASK])])))
"""),
    code("""
shown = results[results["model"].isin(["BoVW", DENSE_MODEL, "DSI fine-tuned", INIT_MULTITASK])
                & results["ids"].isin(["-", "clustered", "random", "semantic"])]
fig = metric_vs_n(shown, ("IA@1", "mAP@10", "P@10"), title="BoVW, dense search, DSI, and the dense-init DSI")
save_figure(fig, paths.figures / "dense_init_vs_n.png")
fig
"""),
    md("""
## The targets

Computed from the tables above, never written in advance.

- **Target 2**: zero-shot IA@1 >= 0.99 at every N, for random and clustered IDs.
- **Target 3**: a DSI variant with IA@1 >= 0.95 whose 95% intervals of mAP@10 *and* P@10 lie
  wholly above BoVW's, at every N. Overlapping intervals do not count.
- **Target 4**: a scheme without labels within 0.03 of clustered IDs on every metric (point
  estimates; the intervals are far wider than 0.03 at these query counts). As written, the target
  is two-sided, so a scheme that *beats* clustered IDs by more than 0.03 fails it; the last column
  gives the one-sided reading (no metric more than 0.03 below clustered), and both verdicts are
  printed.
"""),
    code("""
t2 = zero_shot_memorisation(results)
t2 = pd.concat([t2.assign(model="DSI zero-shot"),
                zero_shot_memorisation(results, model=INIT_ZERO_SHOT).assign(model=INIT_ZERO_SHOT)])
display(Markdown(summarise(t2[t2["ids"].isin(["clustered", "random"])]).to_markdown(index=False)))
t3 = beats_baseline(results)
t3 = t3[t3["model"] != DENSE_MODEL]
write_table(t3, paths.tables / "target3")
display(Markdown(summarise(t3).to_markdown(index=False)))
t4 = gap_table(results[results["model"].isin([INIT_ZERO_SHOT, INIT_MULTITASK])], reference="clustered")
write_table(t4, paths.tables / "target4", markdown=gap_markdown(t4))
display(Markdown(gap_markdown(t4)))
"""),
    code("""
met3 = summarise(t3)
met3 = met3[met3["met_everywhere"]]
best = t3[t3["model"] == INIT_MULTITASK]
print("Target 2:", "met" if t2[t2["ids"].isin(["clustered", "random"]) & (t2["model"] == "DSI zero-shot")]["met"].all()
      else "not met", "by the paper's DSI.")
print("Target 3:", "met by " + ", ".join(f"{r.model} ({r.ids})" for r in met3.itertuples()) if len(met3)
      else "not met by any DSI variant at every N.")
for r in best.to_dict("records"):
    print(f"  {r['model']} ({r['ids']}) N={r['n']}: IA@1 {r['IA@1']:.3f}; "
          f"mAP@10 low end {r['mAP@10 low']:.3f} vs BoVW high end {r['BoVW mAP@10 high']:.3f}; "
          f"P@10 low end {r['P@10 low']:.3f} vs BoVW high end {r['BoVW P@10 high']:.3f} -> "
          f"{'met' if r['met'] else 'not met'}")
t4_ok = summarise(t4, column="within_target")
print("Target 4:", "met by " + ", ".join(f"{r.model} ({r.ids})" for r in t4_ok[t4_ok["met_everywhere"]].itertuples())
      if t4_ok["met_everywhere"].any() else
      f"not met; the smallest largest-gap is {t4['max_abs_gap'].min():.3f}" if len(t4) else "no scheme to compare")
if len(t4):
    one_sided = summarise(t4, column="not_worse")
    print("Target 4, one-sided (no metric more than 0.03 below clustered at every N):",
          ", ".join(f"{r.model} ({r.ids})" for r in one_sided[one_sided["met_everywhere"]].itertuples()) or "none")
"""),
]
NOTEBOOKS["14_dense_init.ipynb"] = NB_INIT


# ------------------------------------------------------------------------------------------
# 10_ablations: one factor at a time (seed 003, study section 3.2.1)
ABLATION = ["ABLATION_N", "ABLATION_SCHEME", "ABLATION_FACTORS"]
NB_ABLATIONS = [
    md("""
# 10 · Ablations: what each design choice of the DSI is worth

The paper fixed one ViT DSI and one way of fine-tuning it. Here the model is rebuilt with one
choice changed at a time, everything else at the profile's default, and each variant is indexed,
scored zero-shot, fine-tuned and scored again. The factors (`ABLATION_FACTORS` picks some):

- **pos**: how the encoder knows where a patch sits: a fixed sinusoidal table (default), a learned
  table, or a conditional encoding (a depth-wise convolution over the patch grid, CPVT's PEG);
- **patch**: patch side 8 / 16 / 32 px: more, smaller tokens or fewer, larger ones;
- **dropout**: 0 / 0.1 / 0.2;
- **index-share**: 25% of each class indexed (the paper) or 50%: a larger database to memorise and
  fewer train queries;
- **mix**: the multi-task model, which keeps the indexing examples in every fine-tuning epoch, with
  1, 2 or 4 retrieval examples per indexed image;
- **options**: plain fine-tuning plus one extra: augmented views (random crop and flip) of the
  indexed images as extra queries for their own ID; *same-class targets*, where each epoch gives
  every train query one relevant ID drawn at random instead of fixed pairs; label smoothing 0.1.

The default variant is the model of notebooks 03 and 04 (same database, same settings), so it is
loaded from the run folder rather than trained again. The fuller grid at 64 px is
`make ablations` (report in `reports/ablations/`).
"""),
    parameters_cell(["PROFILE", "DATASET", "SIZE", "SEEDS"] + MODEL + INDEXING + RETRIEVAL + ["K"] + ABLATION,
                    runner=("OUT_DIR", "RUNS_DIR")),
    code("""
from IPython.display import Markdown, display

from vitdsi_utils.data.images import load_images
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies.ablations import ablation_figure, ablation_grid, ablations_markdown, describe, run_ablations
from vitdsi_utils.reports.tables import write_table
from vitdsi_utils.training.config import TrainConfig

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
image_set = load_images(DATASET, SIZE, progress=False)
seed = SEEDS[0]
base_model = dict(patch_size=PATCH_SIZE, dim=DIM, mlp_dim=MLP_DIM, depth=DEPTH, heads=HEADS,
                  dropout=DROPOUT, pos_encoding=POS_ENCODING)
index_config = TrainConfig(lr=LR, batch_size=BATCH_SIZE, epochs=INDEX_EPOCHS, target_accuracy=TARGET_ACCURACY,
                           warmup_steps=WARMUP_STEPS, seed=seed, progress=False)
retrieval_config = TrainConfig(lr=LR, batch_size=BATCH_SIZE, epochs=RETRIEVAL_EPOCHS, seed=seed, progress=False)
grid = ablation_grid(ABLATION_FACTORS, base_model=base_model)
print(f"{len(grid)} variants:", ", ".join(v.name for v in grid))
"""),
    md("""
## Running the grid

Variants that only change the fine-tuning share the default's indexed model. Every model is saved
in the run folder, so a rerun only scores them again.
"""),
    code("""
long = run_ablations(
    image_set, grid, n=ABLATION_N, seed=seed, scheme=ABLATION_SCHEME, base_model=base_model,
    index_config=index_config, retrieval_config=retrieval_config, max_pairs_per_query=MAX_PAIRS_PER_QUERY,
    runs_dir=paths.runs, k=K)
settings = (f"DSI ablations, {DATASET} at {SIZE} px, N = {ABLATION_N}, {ABLATION_SCHEME} IDs, seed {seed}, "
            f"profile `{PROFILE}`: indexing until IA@1 >= {TARGET_ACCURACY} or {INDEX_EPOCHS} epochs, "
            f"fine-tuning {RETRIEVAL_EPOCHS} epochs.")
markdown = ablations_markdown(long, settings)
write_table(long, paths.tables / "ablations", markdown=markdown)
display(Markdown(markdown))
"""),
    md("""
## Each variant against the default

Left: fine-tuned mAP@10 with its bootstrap interval; the dashed line is the default. Middle: how
much of the memorised index survives, as IA@1 before (circles) and after (squares) fine-tuning.
Right: the epochs the indexing run needed to memorise the database (hatched: it hit the epoch cap
first). With a few dozen test queries the intervals are wide: a shift that stays inside the
default's interval is no evidence of an effect.
"""),
    code("""
fig = ablation_figure(long, title=f"DSI ablations, {DATASET} {SIZE} px, N = {ABLATION_N}",
                                index_cap=INDEX_EPOCHS)
save_figure(fig, paths.figures / "ablations.png")
fig
"""),
    code("""
print("\\n".join(describe(long)))
"""),
]
NOTEBOOKS["10_ablations.ipynb"] = NB_ABLATIONS

# ------------------------------------------------------------------------------------------
# 11_scale: latency and IA@1 against N (the study's target 5)
SCALE = ["SCALE_NS", "SCALE_IA_NS", "SCALE_INDEX_EPOCHS", "SCALE_QUERIES", "SCALE_REPEATS"]
NB_SCALE = [
    md("""
# 11 · Scale: latency and indexing accuracy against N

Target 5 of the study: index all 13,394 Imagenette images with IA@1 >= 0.95, and measure how the
query latency of each method grows with the number of indexed images N. Here *every* image of a
database is indexed (`index_all_database`); there is no query pool, because IA@1 only needs
the indexed images themselves. The timed queries are horizontally flipped copies of indexed images.

- **Latency**: for each N of `SCALE_NS`, top-`K` search for a batch of `SCALE_QUERIES` queries, one
  warm-up call, then the median of `SCALE_REPEATS` timed calls, per query; beside it the time to
  build the index. DSI: beam search (width `K`) constrained to the trie of the N IDs. BoVW: SIFT of
  the queries, word histograms, cosine top-`K`. Dense: the ViT encoder and a flat FAISS index.
  The DSI and the dense encoder are *untrained* models of the profile's size: how long a search takes
  depends on N and on the model's size, not on what the weights learnt.
- **IA@1**: a DSI trained to memorise N images (`SCALE_IA_NS`), at most `SCALE_INDEX_EPOCHS` epochs.
  Training is what costs: on a CPU only small N are affordable; `make scale` and the `paper`
  profile (GPU) go further.
"""),
    parameters_cell(["PROFILE", "DATASET", "SIZE", "SEEDS"] + MODEL + ["LR", "BATCH_SIZE", "WARMUP_STEPS",
                    "TARGET_ACCURACY", "BOVW_WORDS", "K"] + SCALE, runner=("OUT_DIR", "RUNS_DIR")),
    code("""
import torch
from IPython.display import Markdown, display

from vitdsi_utils.data.images import load_images
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies.scale import ia_table, index_all_database, latency_table, scale_figure, scale_markdown
from vitdsi_utils.reports.tables import write_table
from vitdsi_utils.training.config import TrainConfig

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
image_set = load_images(DATASET, SIZE, progress=False)
device = "cuda" if torch.cuda.is_available() else "cpu"
# 0 stands for every usable image; an N beyond the data set is left out with a note
ns = [n or len(image_set) for n in SCALE_NS]
ia_ns = [n or len(image_set) for n in SCALE_IA_NS]
too_big = sorted({n for n in ns + ia_ns if n > len(image_set)})
if too_big:
    print(f"{DATASET} at {SIZE} px has {len(image_set)} usable images; left out N = {too_big}")
ns, ia_ns = [n for n in ns if n <= len(image_set)], [n for n in ia_ns if n <= len(image_set)]
model_overrides = dict(patch_size=PATCH_SIZE, dim=DIM, mlp_dim=MLP_DIM, depth=DEPTH, heads=HEADS,
                       dropout=DROPOUT, pos_encoding=POS_ENCODING)
index_config = TrainConfig(lr=LR, batch_size=BATCH_SIZE, epochs=SCALE_INDEX_EPOCHS, target_accuracy=TARGET_ACCURACY,
                           warmup_steps=WARMUP_STEPS, seed=SEEDS[0], progress=False)
print(f"{len(image_set)} images; latency at N = {ns} on {device}; IA@1 at N = {ia_ns}")
"""),
    md("""
## Latency against N
"""),
    code("""
latency = latency_table(image_set, ns, n_queries=SCALE_QUERIES, batch_size=SCALE_QUERIES, k=K,
                              repeats=SCALE_REPEATS, model_overrides=model_overrides, bovw_words=BOVW_WORDS,
                              device=device, seed=SEEDS[0])
write_table(latency, paths.tables / "scale_latency")
latency.pivot_table(index="n", columns="method", values=["ms_per_query", "build_s"]).round(2)
"""),
    md("""
## IA@1 of a DSI trained on N images

A finished model is loaded from `RUNS_DIR` rather than trained again. `reached` says whether IA@1
got to `TARGET_ACCURACY` within the epoch cap.
"""),
    code("""
ia, ia_histories = ia_table(image_set, ia_ns, index_config=index_config, model_overrides=model_overrides,
                                  runs_dir=paths.runs, seed=SEEDS[0], beam_size=K)
write_table(ia, paths.tables / "scale_ia")
ia
"""),
    code("""
settings = dict(source=DATASET, size=SIZE, device=device, k=K, queries=SCALE_QUERIES, repeats=SCALE_REPEATS)
display(Markdown(scale_markdown(latency, ia, settings)))
fig = scale_figure(latency, ia, title=f"{DATASET} at {SIZE} px, profile {PROFILE}, {device}")
save_figure(fig, paths.figures / "scale.png")
fig
"""),
    md("""
## Reading the figure

- **DSI**: the beam search runs one decoder pass per ID digit (plus EOS) on up to `K` hypotheses per
  query, after one encoder pass that is the same for every N. Its cost grows with the number of
  digits (log10 N), not with N itself, and within one ID length with how many prefixes the first
  digits allow: while few exist the beam is narrower (the IDs of N = 1,024 start with 0 or 1).
- **BoVW** and **dense**: an exhaustive scan, linear in N, but each query costs only one
  matrix-vector product (and a sort for BoVW), so encoding the query (SIFT or the ViT encoder)
  dominates at these N.
  Their curves stay nearly flat.
- **IA@1**: memorising more images takes more epochs, and each epoch costs time linear in N. The right
  panel gives the epochs and the (wall-clock) minutes each N took.
"""),
]
NOTEBOOKS["11_scale.ipynb"] = NB_SCALE

# ------------------------------------------------------------------------------------------
# 12_incremental: adding images to a trained DSI
INC = ["INC_N", "INC_NEW_FRACTION", "INC_REPLAY_RATIOS", "INC_FINETUNE_EPOCHS"]
NB_INCREMENTAL = [
    md("""
# 12 · Incremental indexing: adding new images to a trained DSI

A DSI's index lives in its weights, so adding images means training. The indexed images of one
database are split into an initial set and a new batch (`INC_NEW_FRACTION`). A DSI memorises the
initial set; the new images then get the *next* consecutive IDs (same number of digits, so the
decoder and its length stay the same, and the trie of all IDs holds both) and are added by

- fine-tuning on the new images alone (replay 0): the model learns them and forgets old IDs;
- fine-tuning with replay: each epoch also shows `r` old images per new image (resampled every
  epoch), for each `r` of `INC_REPLAY_RATIOS`;
- retraining a new model from scratch on all images: the reference.

IDs are random here. With clustered IDs the new images would form a block after all old IDs
rather than join their class's block, since that would renumber images the model has memorised.
"""),
    parameters_cell(["PROFILE", "DATASET", "SIZE", "SEEDS"] + MODEL + INDEXING + ["K"] + INC,
                    runner=("OUT_DIR", "RUNS_DIR")),
    code("""
from IPython.display import Markdown, display

from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies.incremental import incremental_markdown, incremental_study
from vitdsi_utils.reports.tables import write_csv, write_table
from vitdsi_utils.training.config import TrainConfig

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
image_set = load_images(DATASET, SIZE, progress=False)
db = build_database(image_set, INC_N, id_scheme="random", seed=SEEDS[0])
""" + MODEL_OVERRIDES),
    md("""
## Initial model, fine-tuning strategies, retraining

IA@1 by beam search (width `K`) over the trie of all IDs; the initial model is scored on the old
images with the old IDs. `seconds` is the training time of each step (for fine-tuning: on top of
the initial model's). Finished models are loaded from `RUNS_DIR`.
"""),
    code("""
config = index_config(SEEDS[0])
results, curves, fig = incremental_study(
    db, index_config=config, finetune_epochs=INC_FINETUNE_EPOCHS, replay_ratios=INC_REPLAY_RATIOS,
    new_fraction=INC_NEW_FRACTION, model_overrides=model_overrides, beam_size=K, runs_dir=paths.runs,
    seed=SEEDS[0])
markdown = incremental_markdown(results, config, INC_FINETUNE_EPOCHS)
write_table(results, paths.tables / "incremental", markdown=markdown)
write_csv(curves, paths.tables / "incremental_curves.csv")
display(Markdown(markdown))
"""),
    md("""
## Forgetting along the fine-tuning epochs

Right: the sequence accuracy (greedy decoding, teacher-forced, no dropout) of the old images
(solid) and of the new ones (dashed) after each fine-tuning epoch, per replay ratio. Without replay
the old images' accuracy falls while the new ones are learnt; replay holds it up, at the price of
more examples per epoch.
"""),
    code("""
save_figure(fig, paths.figures / "incremental.png")
fig
"""),
]
NOTEBOOKS["12_incremental.ipynb"] = NB_INCREMENTAL


# ------------------------------------------------------------------------------------------
# 13_pretrain: the DSI's encoder pretrained without labels on images outside the databases
PRETRAIN = ["PRETRAIN_N", "PRETRAIN_SCHEME", "SSL_EPOCHS", "SSL_BATCH_SIZE", "SSL_IMAGES", "PRETRAIN_SEMANTIC_IDS",
            "IDS_K", "IDS_C"]
NB_PRETRAIN = [
    md("""
# 13 · A better start for the encoder: self-supervised pretraining

Notebook 03's DSI starts from random weights and has to learn what photos look like from the few
hundred images it memorises. Pretrained weights cannot be downloaded on the project's machines, so
the encoder learns from unlabelled images itself, in the style of SimCLR: two random views of every
image (crop, flip, colour jitter, grayscale), and an InfoNCE loss that asks each view to find its
partner among the other views of the batch. Labels are never read.

The images come from *outside* every database of this profile (`NS`), in any role (indexed, train,
val or test query), so the pretraining never sees an image that is later memorised or used as a
query. `SSL_IMAGES` of them (a seeded subset; all of them when it is `None`) are used for
`SSL_EPOCHS` epochs.

The DSI is then indexed and fine-tuned from the pretrained encoder with notebook 03/04's settings,
on the same database (`PRETRAIN_N`, `PRETRAIN_SCHEME` IDs), and compared with the model that
03/04 trained from scratch, which is loaded from `RUNS_DIR`. A user who has a torchvision ViT's
weights can start from those instead: `vitdsi dsi --encoder-init torchvision PATH`.

With `PRETRAIN_SEMANTIC_IDS`, a third DSI starts from the same pretrained encoder but gets
label-free IDs: semantic IDs (hierarchical k-means, branching `IDS_K`, leaf size `IDS_C`) over the
pretrained encoder's embeddings of the indexed images. Clustered IDs need every indexed image's
class; these need none, so they say what the pretraining alone can put into the IDs.
"""),
    parameters_cell(["PROFILE", "DATASET", "SIZE", "NS", "SEEDS"] + MODEL + INDEXING + RETRIEVAL + ["K"] + PRETRAIN,
                    runner=("OUT_DIR", "RUNS_DIR")),
    code("""
from IPython.display import Markdown, display

from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.baselines.ssl import SSLConfig
from vitdsi_utils.studies.pretrain import pretrain_figure, pretrain_study
from vitdsi_utils.reports.tables import write_csv, write_table
from vitdsi_utils.training.config import TrainConfig

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
seed = SEEDS[0]
""" + MODEL_OVERRIDES + RETRIEVAL_CONFIG),
    md("""
## Pretraining, then the DSI from the pretrained encoder

The pretrained encoder is kept in `RUNS_DIR` (`ssl-...` folder), so a rerun loads it. The
from-scratch DSI is notebook 03/04's model of the same database, loaded; the DSI from the
pretrained encoder has its own run folder (`...-init-ssl`).
"""),
    code("""
out = pretrain_study(
    DATASET, SIZE, PRETRAIN_N, seed, PRETRAIN_SCHEME, exclude_ns=NS, model_overrides=model_overrides,
    ssl_config=SSLConfig(epochs=SSL_EPOCHS, batch_size=SSL_BATCH_SIZE, seed=seed, progress=False),
    index_config=index_config(seed), retrieval_config=retrieval_config(seed),
    max_pairs_per_query=MAX_PAIRS_PER_QUERY, train_scratch=True, max_images=SSL_IMAGES,
    semantic_ids={"k": IDS_K, "c": IDS_C} if PRETRAIN_SEMANTIC_IDS else None, runs_dir=paths.runs, progress=False,
)
write_table(out["results"], paths.tables / "pretrain", markdown=out["markdown"])
write_table(out["paired"], paths.tables / "pretrain_paired")
if len(out["id_facts"]):
    write_table(out["id_facts"], paths.tables / "pretrain_semantic_ids")
write_table(out["probes"], paths.tables / "pretrain_probes")
write_csv(out["ssl_history"], paths.tables / "pretrain_ssl_history.csv")
write_csv(out["histories"], paths.tables / "pretrain_histories.csv")
display(Markdown(out["markdown"]))
"""),
    md("""
## What the pretraining changed

Left: the InfoNCE loss per pretraining epoch. Right: how fast each DSI memorises its indexed images
(sequence accuracy per indexing epoch; the dots are the stop checks without dropout). The paired
differences below compare the two DSIs query by query on the same test queries, which gives much
narrower intervals than comparing the two rows' separate intervals.
"""),
    code("""
fig = pretrain_figure(out["ssl_history"], out["histories"])
save_figure(fig, paths.figures / "pretrain.png")
results = out["results"]
epochs = results[results["model"] == "DSI zero-shot"].groupby("init")["epochs"].first()
print(f"indexing epochs to IA@1 >= {TARGET_ACCURACY}: from scratch {epochs.get('scratch')}, "
      f"from the pretrained encoder {epochs.get('ssl')}")
for row in out["paired"].itertuples():
    verdict = ("better" if row.ci_low > 0 else "worse" if row.ci_high < 0 else "no difference the interval can tell")
    print(f"{row.model}, {row.metric}: pretrained minus scratch {row.diff:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}] "
          f"-> {verdict}")
fig
"""),
    md("""
The probes in the table above say how much the pretraining taught the encoder before any DSI
training: the class accuracy of a 10-nearest-neighbour vote and of a linear probe on its
embeddings, and cosine retrieval mAP@10, for the random and the pretrained encoder.
`make pretrain` runs a longer pretraining on every outside image (`reports/pretrain/`).

The semantic-ID table (when `PRETRAIN_SEMANTIC_IDS` is on) asks the same question of the IDs:
how often two images under the same parent prefix share a class, for k-means over the pretrained
encoder's embeddings and over a random encoder's, against the share expected of random groups.
"""),
]
NOTEBOOKS["13_pretrain.ipynb"] = NB_PRETRAIN

def build(folder: Path = HERE) -> list[Path]:
    """Write every notebook (no outputs, no execution counts, kernel python3); return the paths."""
    written = []
    for name, cells in NOTEBOOKS.items():
        for i, cell in enumerate(cells):
            cell.id = f"{name[:2]}-{i:02d}"  # fixed ids: rebuilding an unchanged notebook changes no byte
        notebook = new_notebook(cells=cells)
        notebook.metadata["kernelspec"] = KERNELSPEC
        notebook.metadata["language_info"] = {"name": "python"}
        nbformat.validate(notebook)
        path = folder / name
        nbformat.write(notebook, path)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in build():
        print(f"wrote {path.relative_to(HERE.parent)}")
