"""The data of a profile's study (notebook 01): the images, the databases drawn from them, their manifests.

:func:`run` loads a :class:`DataSpec`'s images, draws every database of its grid (N x ID scheme x
seed) and writes what the later notebooks and a reader check against: one manifest per database
(``tables/manifest_<run name>.csv``: file, class, role, row, ID) and the figures ``gallery.png``,
``split_bar.png`` and, for the digits of the smoke profile, ``imagenette_gallery.png`` (a few real
images, so that a smoke run also proves they can be read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import pandas as pd
from matplotlib.figure import Figure

from vitdsi_utils import settings
from vitdsi_utils.data.database import build_database, databases
from vitdsi_utils.data.files import sample_image_folder
from vitdsi_utils.data.images import SIZES, ImageSet
from vitdsi_utils.ids.codec import ID_SCHEMES
from vitdsi_utils.reports.plots import class_gallery, readable_class, save_figure, split_bar
from vitdsi_utils.runs import StudyPaths, run_name
from vitdsi_utils.studies.specs import ImageSourceSpec, check_choices, require_profile, spec_images


@dataclass
class DataSpec(ImageSourceSpec):
    """Settings of notebook 01: the images, the grid of databases, and how much of them the figures show."""

    size: int = field(default=160, metadata={"choices": SIZES})
    ns: tuple[int, ...] = (512, 1024, 2048)
    schemes: tuple[str, ...] = field(default=("clustered", "random"), metadata={"choices": ID_SCHEMES})
    seeds: tuple[int, ...] = (0,)
    preview: bool = False  # with the digits: a gallery of a few Imagenette images too, when a local copy is set
    per_class: int = 6  # images per class in the galleries

    #: notebook profile keys (01_data) -> spec keys
    PROFILE_KEYS = {
        **ImageSourceSpec.PROFILE_KEYS,
        "SIZE": "size",
        "NS": "ns",
        "ID_SCHEMES": "schemes",
        "SEEDS": "seeds",
        "IMAGENETTE_PREVIEW": "preview",
        "GALLERY_PER_CLASS": "per_class",
    }

    def __post_init__(self) -> None:
        check_choices(self)


class DataResult(NamedTuple):
    """What :func:`run` returns: the images and the tables, figures and lines the notebook shows."""

    images: ImageSet
    counts: pd.DataFrame  # images per class (multi-label: per primary category, and showing each category)
    per_image: pd.DataFrame | None  # multi-label data: images by the number of categories they show
    roles: pd.DataFrame  # images per role, one row per N (the first scheme's databases of the first seed)
    categories: pd.DataFrame | None  # multi-label data: images showing each category, per role (smallest N)
    first_ids: pd.DataFrame  # the first indexed rows of the smallest database: their class under each scheme
    figures: dict[str, Figure]
    lines: dict[str, str]  # "preview", "relevance", "manifests": what the notebook prints


def run(spec: DataSpec, paths: StudyPaths) -> DataResult:
    """The images and databases of ``spec`` for ``paths``' profile: manifests to ``tables/``, figures to ``figures/``."""
    require_profile(paths, "01_data")
    image_set = spec_images(spec)
    name, size = image_set.name, spec.size
    counts = image_set.class_counts().rename(index=readable_class).rename("images").to_frame()
    per_image = None
    if image_set.is_multilabel:
        counts = counts.rename(columns={"images": "primary"}).assign(showing=image_set.category_counts().to_numpy())
        per_image = pd.Series(image_set.label_matrix.sum(axis=1)).value_counts().sort_index()
        per_image = per_image.rename_axis("categories per image").rename("images").to_frame().T
    title = f"{name} at {size} px" + (" (rows: primary category)" if image_set.is_multilabel else "")
    figures = {
        "gallery": class_gallery(
            image_set.images,
            image_set.labels,
            image_set.classes,
            per_class=spec.per_class,
            max_classes=20,
            title=title,
        )
    }
    lines = {"preview": "", "relevance": ""}
    if spec.preview and spec.source == "digits":
        folder = settings.imagenette_dir()
        if folder is None or not folder.is_dir():
            lines["preview"] = (
                f"Imagenette preview skipped: set {settings.IMAGENETTE_ENV} to a local Imagenette copy to see it."
            )
        else:
            images, labels, classes = sample_image_folder(folder, size, per_class=spec.per_class)
            figures["imagenette_gallery"] = class_gallery(
                images, labels, classes, per_class=spec.per_class, title=f"Imagenette at {size} px (a sample)"
            )

    first = {n: build_database(image_set, n, id_scheme=spec.schemes[0], seed=spec.seeds[0]) for n in spec.ns}
    roles = pd.DataFrame({f"N={n}": db.counts().sum() for n, db in first.items()}).T
    smallest = first[spec.ns[0]]
    categories = None
    if smallest.is_multilabel:
        relevant = smallest.relevance("test").sum(axis=1)
        lines["relevance"] = (
            f"N={spec.ns[0]}: a test query has {relevant.mean():.1f} relevant indexed images on average "
            f"(min {relevant.min()}, max {relevant.max()}) of {smallest.n_index}; images showing each category, per role:"
        )
        categories = smallest.category_counts().rename(index=readable_class).T
    figures["split_bar"] = split_bar(smallest)

    n, seed = spec.ns[0], spec.seeds[0]
    by_scheme = {
        scheme: build_database(image_set, n, id_scheme=scheme, seed=seed) for scheme in ("random", "clustered")
    }
    first_ids = pd.DataFrame({"id": by_scheme["random"].manifest["id"].head(12)})
    for scheme, db in by_scheme.items():
        first_ids[f"{scheme} IDs: class"] = db.manifest["class"].head(12).map(readable_class)

    manifests = []
    for db in databases(image_set, spec.ns, spec.schemes, spec.seeds):
        path = db.save_manifest(paths.tables / f"manifest_{run_name(db)}.csv")
        manifests.append(f"{path.name}: {db.n_index} indexed, {len(db.manifest) - db.n_index} queries")
    lines["manifests"] = "\n".join(manifests)
    for stem, fig in figures.items():
        save_figure(fig, paths.figures / f"{stem}.png")
    return DataResult(image_set, counts, per_image, roles, categories, first_ids, figures, lines)
