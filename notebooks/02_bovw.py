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
# DATASET: imagenette | digits | coco (coco reads VITDSI_COCO_IMAGES and VITDSI_COCO_ANNOTATIONS).
PROFILE = "smoke"      # cpu: "cpu"
DATASET = "digits"     # cpu: "imagenette"
SIZE = 32              # cpu: 64
NS = [200]             # cpu: [512, 1024]
SEEDS = [0]
BOVW_WORDS = 50        # cpu: 200
BOVW_VOCABULARIES = 2  # cpu: 5
VLAD_WORDS = 8         # cpu: 64
OUT_DIR = None         # tables/ and figures/ go here; None: reports/<PROFILE>

# %%
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

# %%
bovw = bovw_study(DATASET, SIZE, NS, SEEDS, out_dir=None, n_words=BOVW_WORDS,
                             vocabularies=BOVW_VOCABULARIES, progress=False)
averaged = (f"metrics averaged per query over {BOVW_VOCABULARIES} k-means vocabularies" if BOVW_VOCABULARIES > 1
            else "one k-means vocabulary")
markdown = "\n\n".join([f"BoVW, {BOVW_WORDS} visual words ({averaged}), {DATASET} at {SIZE} px. " + TABLE1_NOTE,
                         table1_markdown(bovw)])
write_table(bovw, paths.tables / "bovw", markdown=markdown)
display(Markdown(markdown))

# %% [markdown]
# ## VLAD beside BoVW
#
# The same databases and queries. VLAD's rows are kept in their own table (`tables/vlad.*`), so that
# Table 1 in notebook 05 keeps the paper's baseline alone. `reports/bovw/` compares more VLAD settings
# at 64 px (`make vlad`).

# %%
vlad = bovw_study(DATASET, SIZE, NS, SEEDS, out_dir=None, n_words=VLAD_WORDS, encoding="vlad",
                             vocabularies=BOVW_VOCABULARIES, progress=False)
both = pd.concat([bovw, vlad], ignore_index=True)
vlad_markdown = "\n\n".join([f"BoVW ({BOVW_WORDS} words) and VLAD ({VLAD_WORDS} words x 128, power-normalised), "
                              f"{DATASET} at {SIZE} px. " + TABLE1_NOTE, table1_markdown(both)])
write_table(vlad, paths.tables / "vlad", markdown=vlad_markdown)
display(Markdown(vlad_markdown))
for row in baseline_verdicts(both, "mAP@10").itertuples():
    print(f"N={row.n}, seed {row.seed}: VLAD mAP@10 {row.value:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}] vs "
          f"BoVW {row.baseline_value:.3f} [{row.baseline_ci_low:.3f}, {row.baseline_ci_high:.3f}] -> {row.verdict}")

# %% [markdown]
# Precision at 10 and recall at 100 against the database size. With more indexed images there are
# more relevant ones to find (recall at a fixed cut-off falls) and more distractors (precision falls);
# the dotted lines show where a random ranking would be.

# %%
fig = metric_vs_n(both, ("P@10", "R@100"), title=f"BoVW ({BOVW_WORDS} words) and VLAD ({VLAD_WORDS} words)")
save_figure(fig, paths.figures / "bovw_vs_n.png")
fig

# %%
for row in bovw[bovw["metric"] == "P@10"].itertuples():
    lift = row.value / row.chance if row.chance else float("nan")
    print(f"N={row.n}, seed {row.seed}: P@10 = {row.value:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}], "
          f"{lift:.1f}x chance ({row.chance:.3f}); {row.search_ms_per_query:.1f} ms per query")
