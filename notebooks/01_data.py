# %% [markdown]
# # 01 · Data: images, databases, splits and IDs
#
# This notebook loads the images of the profile's dataset, shows what they look like, and draws the
# databases of the study. A database of N images is balanced over the classes; in each class a
# quarter of the images is *indexed* (the model memorises them) and the rest is a pool of queries,
# split 0.8 / 0.1 / 0.1 into train, validation and test queries. The indexed images get IDs by one
# of two schemes: *random* (shuffled) or *clustered* (same-class images get consecutive numbers).
# The manifests written here list every image, its role and its ID.
#
# With `DATASET = "coco"` every image carries the *set* of object categories annotated in it, and a
# database image is relevant to a query when the two share at least one category. Where the study
# needs one class per image (balancing, clustered IDs, galleries) it uses the image's *primary*
# category: the rarest of its categories in the whole data set.

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
IMAGENETTE_PREVIEW = True             # cpu: False
GALLERY_PER_CLASS = 6
OUT_DIR = None                        # tables/ and figures/ go here; None: reports/<PROFILE>

# %%
from IPython.display import display

from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies import data
from vitdsi_utils.studies.specs import notebook_spec

paths = StudyPaths.create(PROFILE, OUT_DIR)
spec = notebook_spec(data.DataSpec, globals())  # this notebook's parameters as the study's settings
print(f"profile {PROFILE}: tables -> {paths.tables}, figures -> {paths.figures}")
result = data.run(spec, paths)

# %% [markdown]
# ## The images
#
# Every image is centre-cropped to a square and resized to `SIZE` pixels; images whose aspect ratio
# is outside [0.9, 1.1] are dropped, as in the paper. The count per class bounds the largest
# balanced database.

# %%
print(result.images.summary())
result.counts.T

# %% [markdown]
# For multi-label data: how many categories an image shows. `primary` above counts the images whose
# rarest category is that one (what the databases balance over); `showing` counts every image in which
# the category appears.

# %%
if result.per_image is not None:
    display(result.per_image)
else:
    print(f"{result.images.name} is single-label: one class per image, relevance means the same class.")

# %%
result.figures["gallery"]

# %% [markdown]
# When the profile's dataset is not Imagenette (the smoke profile uses the bundled digits), a few
# Imagenette images are shown here too, so the smoke run also checks that the real images can be read.
# Only a handful of files is decoded.

# %%
if "imagenette_gallery" in result.figures:
    display(result.figures["imagenette_gallery"])
elif result.lines["preview"]:
    print(result.lines["preview"])

# %% [markdown]
# ## Databases and query splits
#
# One database per N (the draw depends only on the seed, so both ID schemes see the same images in
# the same roles). The table gives the images per role; the figure shows how the smallest database
# splits over the classes (primary categories for multi-label data, which are balanced as far as
# the data allows: a rare category gives all its images, the others share the rest evenly).

# %%
result.roles

# %%
if result.categories is not None:
    print(result.lines["relevance"])
    display(result.categories)

# %%
result.figures["split_bar"]

# %% [markdown]
# ## The two ID schemes
#
# The first indexed rows of the smallest database under each scheme: with *clustered* IDs the
# classes come in blocks, so the first digits of an ID already say a lot about the class; with
# *random* IDs they say nothing, and the model has to memorise every ID on its own.

# %%
result.first_ids

# %% [markdown]
# ## Manifests
#
# One CSV per database of the grid (N × ID scheme × seed): file, class, role, database row, ID.
# Later notebooks rebuild the same databases from the same seed; the manifests let anyone check that.

# %%
print(result.lines["manifests"])
