# %% [markdown]
# # 02 · The Bag-of-Visual-Words baseline
#
# The classical baseline of the paper: grayscale SIFT descriptors of the indexed images, a k-means
# vocabulary of `BOVW_WORDS` visual words, one word histogram per image, and cosine similarity
# between a query's histogram and every indexed image's. Each test query gets a ranked list of
# `K` indexed images; a result is relevant when it has the query's class (for COCO: when it shows
# at least one object category that the query shows).
#
# One k-means fit can land a few points of P@10 above or below another on a small database, which
# is enough to flip a comparison of intervals. So every metric is averaged per query over
# `BOVW_VOCABULARIES` vocabularies (k-means seeds `seed`, `seed + 1`, ...) before its interval is
# drawn: the row is the baseline's expected quality, not one fit's luck.
#
# Every metric is computed over all test queries, with a bootstrap 95% interval and the level a
# random ranking would reach (`chance`). The `paper MAP@10` and `paper R@100` rows repeat the
# paper's own protocol (10 random queries), for a like-for-like comparison with its numbers.
#
# Beside it runs VLAD, a classical refinement that the paper did not try. It uses the same descriptors
# and a smaller vocabulary (`VLAD_WORDS` words). Per word, it sums the residuals of the descriptors to
# the word's centre, takes the signed square root of every value and L2-normalises the vector.

# %% tags=["parameters"]
# Parameters: the smoke profile's values. `vitdsi study --profile NAME` replaces them with
# those of vitdsi_utils/profiles/NAME.yaml (smoke, cpu or paper).
# DATASET: imagenette | digits | folder | coco. DATASET_ROOT: the folder's ImageFolder tree (folder),
# a local Imagenette copy, or the COCO images (None: VITDSI_COCO_IMAGES); DATASET_ANNOTATIONS: COCO's
# instances file (None: VITDSI_COCO_ANNOTATIONS); DATASET_NAME: what the reports call the data
# (None: the folder's name for folder, else DATASET).
PROFILE = "smoke"      # cpu: "cpu"
DATASET = "digits"     # cpu: "imagenette"
DATASET_ROOT = None
DATASET_ANNOTATIONS = None
DATASET_NAME = None
SIZE = 32              # cpu: 64
NS = [200]             # cpu: [512, 1024]
SEEDS = [0]
BOVW_WORDS = 50        # cpu: 200
BOVW_VOCABULARIES = 2  # cpu: 5
VLAD_WORDS = 8         # cpu: 64
OUT_DIR = None         # tables/ and figures/ go here; None: reports/<PROFILE>

# %%
from IPython.display import Markdown, display

from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies import bovw
from vitdsi_utils.studies.specs import notebook_spec

paths = StudyPaths.create(PROFILE, OUT_DIR)
spec = notebook_spec(bovw.BoVWSpec, globals())  # this notebook's parameters as the study's settings

# %%
result = bovw.run(spec, paths)
display(Markdown((paths.tables / "bovw.md").read_text()))

# %% [markdown]
# ## VLAD beside BoVW
#
# The same databases and queries. VLAD's rows are kept in their own table (`tables/vlad.*`), so that
# Table 1 in notebook 05 keeps the paper's baseline alone. `reports/bovw/` compares more VLAD settings
# at 64 px (`make vlad`).

# %%
display(Markdown((paths.tables / "vlad.md").read_text()))
print("\n".join(result.verdicts))

# %% [markdown]
# Precision at 10 and recall at 100 against the database size. With more indexed images there are
# more relevant ones to find (recall at a fixed cut-off falls) and more distractors (precision falls);
# the dotted lines show where a random ranking would be.

# %%
result.figure

# %%
print("\n".join(result.precision))
