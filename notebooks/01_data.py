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
import pandas as pd
from IPython.display import display

from vitdsi_utils import settings
from vitdsi_utils.data.database import build_database, databases
from vitdsi_utils.data.files import sample_image_folder
from vitdsi_utils.data.images import dataset_name, load_images
from vitdsi_utils.reports.plots import class_gallery, readable_class, save_figure, split_bar
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.runs import run_name

paths = StudyPaths.create(PROFILE, OUT_DIR)
DATASET_NAME = dataset_name(DATASET, DATASET_ROOT, DATASET_NAME)  # what the reports call the data
print(f"profile {PROFILE}: tables -> {paths.tables}, figures -> {paths.figures}")

# %% [markdown]
# ## The images
#
# Every image is centre-cropped to a square and resized to `SIZE` pixels; images whose aspect ratio
# is outside [0.9, 1.1] are dropped, as in the paper. The count per class bounds the largest
# balanced database.

# %%
image_set = load_images(DATASET, SIZE, root=DATASET_ROOT, annotations=DATASET_ANNOTATIONS, name=DATASET_NAME,
                        progress=False)
print(image_set.summary())
counts = image_set.class_counts().rename(index=readable_class).rename("images").to_frame()
if image_set.is_multilabel:
    counts = counts.rename(columns={"images": "primary"}).assign(showing=image_set.category_counts().to_numpy())
counts.T

# %% [markdown]
# For multi-label data: how many categories an image shows. `primary` above counts the images whose
# rarest category is that one (what the databases balance over); `showing` counts every image in which
# the category appears.

# %%
if image_set.is_multilabel:
    per_image = pd.Series(image_set.label_matrix.sum(axis=1)).value_counts().sort_index()
    display(per_image.rename_axis("categories per image").rename("images").to_frame().T)
else:
    print(f"{DATASET_NAME} is single-label: one class per image, relevance means the same class.")

# %%
fig = class_gallery(image_set.images, image_set.labels, image_set.classes, per_class=GALLERY_PER_CLASS,
                          max_classes=20, title=f"{DATASET_NAME} at {SIZE} px"
                          + (" (rows: primary category)" if image_set.is_multilabel else ""))
save_figure(fig, paths.figures / "gallery.png")
fig

# %% [markdown]
# When the profile's dataset is not Imagenette (the smoke profile uses the bundled digits), a few
# Imagenette images are shown here too, so the smoke run also checks that the real images can be read.
# Only a handful of files is decoded.

# %%
if IMAGENETTE_PREVIEW and DATASET == "digits":
    folder = settings.imagenette_dir()
    if folder is None or not folder.is_dir():
        print(f"Imagenette preview skipped: set {settings.IMAGENETTE_ENV} to a local Imagenette copy to see it.")
    else:
        images, labels, classes = sample_image_folder(folder, SIZE, per_class=GALLERY_PER_CLASS)
        fig = class_gallery(images, labels, classes, per_class=GALLERY_PER_CLASS,
                                  title=f"Imagenette at {SIZE} px (a sample)")
        save_figure(fig, paths.figures / "imagenette_gallery.png")
        display(fig)

# %% [markdown]
# ## Databases and query splits
#
# One database per N (the draw depends only on the seed, so both ID schemes see the same images in
# the same roles). The table gives the images per role; the figure shows how the smallest database
# splits over the classes (primary categories for multi-label data, which are balanced as far as
# the data allows: a rare category gives all its images, the others share the rest evenly).

# %%
first = {n: build_database(image_set, n, id_scheme=ID_SCHEMES[0], seed=SEEDS[0]) for n in NS}
pd.DataFrame({f"N={n}": db.counts().sum() for n, db in first.items()}).T

# %%
db = first[NS[0]]
if db.is_multilabel:
    relevant = db.relevance("test")
    print(f"N={NS[0]}: a test query has {relevant.sum(axis=1).mean():.1f} relevant indexed images on average "
          f"(min {relevant.sum(axis=1).min()}, max {relevant.sum(axis=1).max()}) of {db.n_index}; "
          "images showing each category, per role:")
    display(db.category_counts().rename(index=readable_class).T)

# %%
fig = split_bar(first[NS[0]])
save_figure(fig, paths.figures / "split_bar.png")
fig

# %% [markdown]
# ## The two ID schemes
#
# The first indexed rows of the smallest database under each scheme: with *clustered* IDs the
# classes come in blocks, so the first digits of an ID already say a lot about the class; with
# *random* IDs they say nothing, and the model has to memorise every ID on its own.

# %%
n, seed = NS[0], SEEDS[0]
by_scheme = {scheme: build_database(image_set, n, id_scheme=scheme, seed=seed)
             for scheme in ("random", "clustered")}
first_ids = pd.DataFrame({"id": by_scheme["random"].manifest["id"].head(12)})
for scheme, db in by_scheme.items():
    first_ids[f"{scheme} IDs: class"] = db.manifest["class"].head(12).map(readable_class)
first_ids

# %% [markdown]
# ## Manifests
#
# One CSV per database of the grid (N × ID scheme × seed): file, class, role, database row, ID.
# Later notebooks rebuild the same databases from the same seed; the manifests let anyone check that.

# %%
for db in databases(image_set, NS, ID_SCHEMES, SEEDS):
    path = db.save_manifest(paths.tables / f"manifest_{run_name(db)}.csv")
    print(f"{path.name}: {db.n_index} indexed, {len(db.manifest) - db.n_index} queries")
