"""COCO-format object annotations -> the category set of every image (no pycocotools needed).

A COCO ``instances_*.json`` file holds three lists: ``images`` (``id``, ``file_name``, ...),
``categories`` (``id``, ``name``, ...) and ``annotations`` (one object instance each, with
``image_id`` and ``category_id``). The study only needs to know *which* categories appear in
an image: an image's label set is the set of categories of its annotations (crowd annotations
included: they mark objects that are there too). Images without any annotation have no label
set; :func:`read_coco_annotations` lists them apart so the caller can leave them out and say so.

Parsing the train2017 file (about 450 MB, mostly segmentation polygons) takes a while, so the
summary is cached as a small JSON keyed by the file's path, size and modification time.
:func:`coco_paths` finds the images and the instances file (arguments, else environment variables).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from vitdsi_utils import settings
from vitdsi_utils.atomic import write_json

_SUMMARY_VERSION = 1  # bump when the summary's content changes, so old summaries are not reused


@dataclass(frozen=True)
class CocoAnnotations:
    """What the study reads from a COCO instances file.

    ``categories[j]`` is the name of label ``j``; labels follow increasing COCO category id
    (``category_ids[j]``), so they do not depend on the order of the file. ``files[i]`` (sorted)
    has the label set ``label_sets[i]``, a sorted tuple of labels, never empty.
    ``unannotated`` lists the images that have no annotation at all.
    """

    categories: list[str]
    category_ids: list[int]
    files: list[str]
    label_sets: list[tuple[int, ...]]
    unannotated: list[str]

    def digest(self) -> str:
        """A short hash of the content: changes whenever a file, a category or a label set changes."""
        text = json.dumps([self.categories, self.category_ids, self.files, self.label_sets], separators=(",", ":"))
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def _required(data: dict, key: str, path: Path) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        raise ValueError(
            f"{path} is not a COCO instances file: it has no list {key!r} (expected the keys 'images', "
            "'annotations' and 'categories', as in annotations/instances_train2017.json)"
        )
    return value


def parse_coco_annotations(data: dict, path: str | os.PathLike = "<annotations>") -> CocoAnnotations:
    """Build a :class:`CocoAnnotations` from the parsed JSON of a COCO instances file.

    Raises ValueError, naming ``path`` and the offending entry, when the file is not a COCO
    instances file, when two images share a file name or an id, or when an annotation points
    at an image or category the file does not define.
    """
    path = Path(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a COCO instances file: its top level is not a JSON object")
    images, annotations, categories = (_required(data, key, path) for key in ("images", "annotations", "categories"))

    by_id = sorted(categories, key=lambda c: int(c["id"]))
    category_ids = [int(c["id"]) for c in by_id]
    if len(set(category_ids)) != len(category_ids):
        raise ValueError(f"{path}: two categories share an id")
    label_of = {cid: j for j, cid in enumerate(category_ids)}

    file_of: dict[int, str] = {}
    for image in images:
        image_id, name = int(image["id"]), str(image["file_name"])
        if image_id in file_of:
            raise ValueError(f"{path}: image id {image_id} appears twice")
        file_of[image_id] = name
    if len(set(file_of.values())) != len(file_of):
        raise ValueError(f"{path}: two images share a file_name")

    labels_of: dict[int, set[int]] = {}
    for annotation in annotations:
        image_id, category_id = int(annotation["image_id"]), int(annotation["category_id"])
        if image_id not in file_of:
            raise ValueError(
                f"{path}: annotation {annotation.get('id')} refers to image id {image_id}, which is not listed"
            )
        if category_id not in label_of:
            raise ValueError(
                f"{path}: annotation {annotation.get('id')} refers to category id {category_id}, which is not listed"
            )
        labels_of.setdefault(image_id, set()).add(label_of[category_id])

    annotated = sorted((file_of[i], tuple(sorted(labels))) for i, labels in labels_of.items())
    return CocoAnnotations(
        categories=[str(c["name"]) for c in by_id],
        category_ids=category_ids,
        files=[name for name, _ in annotated],
        label_sets=[labels for _, labels in annotated],
        unannotated=sorted(name for i, name in file_of.items() if i not in labels_of),
    )


def read_coco_annotations(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> CocoAnnotations:
    """Read a COCO instances file (see :func:`parse_coco_annotations`); reuse a cached summary from ``cache_dir``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotations file {path} does not exist")
    summary = None
    if cache_dir is not None:
        stat = path.stat()
        key = hashlib.sha1(
            json.dumps([_SUMMARY_VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns]).encode()
        ).hexdigest()[:16]
        summary = Path(cache_dir) / f"coco-annotations-{key}.json"
        if summary.is_file():
            stored = json.loads(summary.read_text())
            stored["label_sets"] = [tuple(labels) for labels in stored["label_sets"]]
            return CocoAnnotations(**stored)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); is it a COCO instances file?") from error
    parsed = parse_coco_annotations(data, path)
    if summary is not None:
        write_json(summary, asdict(parsed))
    return parsed


def missing_coco_message(reason: str) -> str:
    """Why the COCO images cannot be read, and the two ways to name them."""
    return (
        f"COCO images are not available ({reason}). Set {settings.COCO_IMAGES_ENV} to the images folder "
        f"(e.g. .../coco/train2017) and {settings.COCO_ANNOTATIONS_ENV} to its instances file (e.g. "
        ".../coco/annotations/instances_train2017.json), or give both: --root and --annotations on the command line, "
        "DATASET_ROOT and DATASET_ANNOTATIONS in a study profile, root= and annotations= in load_images. "
        "Nothing is downloaded: get COCO from https://cocodataset.org first."
    )


def coco_paths(
    root: str | os.PathLike | None = None, annotations: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """(images folder, instances JSON) of the ``coco`` source: the arguments, else the environment variables."""
    images_dir = Path(root).expanduser() if root is not None else settings.coco_images_dir()
    annotations_file = Path(annotations).expanduser() if annotations is not None else settings.coco_annotations_file()
    missing = [
        name
        for name, value in ((settings.COCO_IMAGES_ENV, images_dir), (settings.COCO_ANNOTATIONS_ENV, annotations_file))
        if value is None
    ]
    if missing:
        raise FileNotFoundError(missing_coco_message(f"{' and '.join(missing)} not set"))
    if not images_dir.is_dir():
        raise FileNotFoundError(missing_coco_message(f"images folder {images_dir} does not exist"))
    if not annotations_file.is_file():
        raise FileNotFoundError(missing_coco_message(f"annotations file {annotations_file} does not exist"))
    return images_dir, annotations_file
