# %% [markdown]
# # 06 · Demo: query the models
#
# Pick a test query from the strip (or upload your own image), tick the models, choose K and press
# **Run**: each model's top-K indexed images appear side by side, relevant ones (the query's class;
# for COCO, any shared object category) framed in green with a check mark, with the score and the
# time the model took for this query.
# BoVW is fitted here on the indexed images; the two DSI models are loaded from the study's run
# folder (`RUNS_DIR`), for the first database of the grid.

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
BOVW_WORDS = 50                       # cpu: 200
OUT_DIR = None                        # tables/ and figures/ go here; None: reports/<PROFILE>
RUNS_DIR = None                       # trained models, one folder per database; None: data/runs/<PROFILE>

# %%
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

# %% [markdown]
# ## One query, run from code
#
# The same search without clicking (this is what runs when the notebook is executed headless): the
# first test query, every model, K = 10. The figure is saved for the report.

# %%
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
