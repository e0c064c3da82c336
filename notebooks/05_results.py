# %% [markdown]
# # 05 · Results: Table 1
#
# Every model is scored on the same test queries: BoVW (from notebook 02), the zero-shot DSI
# (notebook 03) and the fine-tuned DSI (notebook 04), for every N and ID scheme. The DSI ranked
# lists come from beam search constrained to the IDs that exist, so each list holds `K` distinct,
# valid IDs. IA@1 and IA@5 use every indexed image as a query for its own ID.
#
# Values are over all test queries with bootstrap 95% intervals; `chance` is a random ranking; the
# paper's numbers stand beside ours (its MAP@10 and R@100 used 10 random queries, which our
# `protocol` columns repeat).

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
K = 100
OUT_DIR = None                        # tables/ and figures/ go here; None: reports/<PROFILE>
RUNS_DIR = None                       # trained models, one folder per database; None: data/runs/<PROFILE>

# %%
from IPython.display import Markdown, display

from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies import results
from vitdsi_utils.studies.specs import notebook_spec

paths = StudyPaths.create(PROFILE, OUT_DIR, RUNS_DIR)
spec = notebook_spec(results.ResultsSpec, globals())  # this notebook's parameters as the study's settings

# %% [markdown]
# ## Table 1
#
# One line per trained model: the search time per test query (beam search over all test queries).

# %%
result = results.run(spec, paths)
display(Markdown(result.markdown))

# %%
result.figures["metric_bars"]

# %% [markdown]
# ## What the numbers say
#
# Computed from the table above, not written in advance: a DSI variant *beats* BoVW on a metric only
# when its 95% interval lies wholly above BoVW's at the same N; overlapping intervals decide nothing.

# %%
print("\n".join(results.verdict_lines(result.table1)))
