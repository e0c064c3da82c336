"""Scale study: query latency and indexing accuracy against the number of indexed images N.

The study's target 5 asks to index all 13,394 Imagenette images and to measure how each
retrieval method's cost grows with N. The tables are :mod:`~vitdsi_utils.studies.scale_tables`'
(latency of DSI beam search, BoVW and dense search against N, on databases that index every image
they draw, queried with flipped copies of indexed images; IA@1 of a DSI trained on N); this module
runs a :class:`ScaleSpec` (:func:`run`) and writes them with their figure
(:func:`~vitdsi_utils.studies.scale_report.scale_figure`: latency and IA@1 against N).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from matplotlib.figure import Figure

from vitdsi_utils.data.images import SIZES, ImageSet, load_images
from vitdsi_utils.devices import resolve_device
from vitdsi_utils.ids.codec import ID_SCHEMES
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.reports.tables import write_csv, write_table
from vitdsi_utils.retrieval.latency import as_ks
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies.scale_report import scale_figure, scale_markdown
from vitdsi_utils.studies.scale_tables import ia_table, latency_table, reusable_latency
from vitdsi_utils.studies.specs import (
    ImageSourceSpec,
    ModelSpec,
    check_choices,
    full_model,
    no_pooling,
    refuse_profile_only,
    spec_images,
)
from vitdsi_utils.training.config import TrainConfig


def _scale_study(
    image_set: ImageSet,
    ns: Sequence[int],
    ia_ns: Sequence[int],
    *,
    index_config: Any,
    out_dir: str | Path,
    runs_dir: str | Path | None = None,
    model_overrides: dict | None = None,
    n_queries: int = 64,
    batch_size: int = 64,
    k: int | Sequence[int] = 100,
    repeats: int = 3,
    bovw_words: int = 200,
    device: str = "auto",
    amp: bool | str = False,
    id_scheme: str = "random",
    seed: int = 0,
    reuse_latency: bool = False,
    keep_ia: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame, Figure]:
    """Latency for every N of ``ns`` and IA@1 for every N of ``ia_ns``; writes ``scale_latency``,
    ``scale_ia`` (CSV + Markdown), ``scale.md`` and ``scale.png`` into ``out_dir``.

    ``k`` is one list length or several (latency rows for each; IA@1 is measured with a beam of
    the largest). With ``reuse_latency`` an existing ``scale_latency.csv`` in ``out_dir`` is kept
    when it holds every (N, method, k) at the same query batch, repeats, device and image size (see
    :func:`reusable_latency`), so adding a trained N does not time every search again. With
    ``keep_ia`` nothing is trained: the IA@1 table already in ``out_dir`` (``scale_ia.csv``, if
    any) is kept as it is and drawn beside the new latency, and ``ia_ns`` is ignored. ``device`` and ``amp``
    run the timed searches (see :func:`latency_table`).
    """
    device = str(resolve_device(device))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if keep_ia:
        ia = pd.read_csv(out / "scale_ia.csv") if (out / "scale_ia.csv").exists() else pd.DataFrame()
        histories = pd.DataFrame()
    else:
        ia, histories = ia_table(
            image_set,
            ia_ns,
            index_config=index_config,
            model_overrides=model_overrides,
            runs_dir=runs_dir,
            id_scheme=id_scheme,
            seed=seed,
            beam_size=max(as_ks(k)),
        )
    latency = (
        reusable_latency(
            out / "scale_latency.csv",
            ns,
            k=k,
            n_queries=n_queries,
            batch_size=batch_size,
            repeats=repeats,
            device=device,
            size=image_set.size,
        )
        if reuse_latency
        else None
    )
    if latency is not None:
        print(f"reusing the latency table {out / 'scale_latency.csv'} (same N, methods and settings)")
    else:
        latency = latency_table(
            image_set,
            ns,
            n_queries=n_queries,
            batch_size=batch_size,
            k=k,
            repeats=repeats,
            model_overrides=model_overrides,
            bovw_words=bovw_words,
            device=device,
            amp=amp,
            id_scheme=id_scheme,
            seed=seed,
        )
    settings = {
        "source": image_set.name,
        "size": image_set.size,
        "device": device,
        "k": k,
        "queries": n_queries,
        "repeats": repeats,
    }
    write_table(latency, out / "scale_latency")
    if not keep_ia:
        write_table(ia, out / "scale_ia")
    if len(histories):
        write_csv(histories, out / "scale_histories.csv")
    (out / "scale.md").write_text(scale_markdown(latency, ia, settings) + "\n")
    fig = scale_figure(latency, ia, title=f"{image_set.source} at {image_set.size} px, {device}")
    save_figure(fig, out / "scale.png")
    return latency, ia, fig


# ------------------------------------------------------------------------------------------
# The study as a spec
# ------------------------------------------------------------------------------------------
@dataclass
class ScaleSpec(ImageSourceSpec):
    """Settings of the scale study (recipe ``study: scale``). An N of 0 stands for every usable image.

    Latency is timed for every N of ``ns`` (untrained models of the ``model`` size) and list length in ``k``,
    IA@1 of a DSI trained (``index``) on every N of ``ia_ns`` (none: latency only; beam: the largest ``k``).
    ``index.device`` and ``index.amp`` also run the timed searches. ``reuse_latency`` keeps a latency table
    already in the output folder when it covers every N at these settings; ``keep_ia`` trains nothing and
    keeps the IA@1 table already there (``ia_ns`` is then ignored).
    """

    size: int = field(default=64, metadata={"choices": SIZES})
    ns: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 0)
    ia_ns: tuple[int, ...] = (512,)
    seed: int = 0
    ids: str = field(default="random", metadata={"choices": ID_SCHEMES})
    model: ModelSpec = field(default_factory=full_model)
    index: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=100, lr=1e-3, warmup_steps=100, target_accuracy=0.99)
    )
    queries: int = 64  # queries in the timed batch
    query_batch: int = 64  # queries decoded together by the beam search
    repeats: int = 3  # timed repeats (the median is reported)
    k: tuple[int, ...] = (100,)  # results per query (and the DSI beam width); several: latency for each
    words: int = 200  # BoVW visual words
    reuse_latency: bool = False
    keep_ia: bool = False

    #: notebook profile keys (11_scale) -> spec keys
    PROFILE_KEYS = {
        **ImageSourceSpec.PROFILE_KEYS,
        "SIZE": "size",
        "SCALE_NS": "ns",
        "SCALE_IA_NS": "ia_ns",
        "SEEDS": ("seed[0]", "index.seed[0]"),
        **ModelSpec.PROFILE_KEYS,
        "LR": "index.lr",
        "BATCH_SIZE": "index.batch_size",
        "WARMUP_STEPS": "index.warmup_steps",
        "SCALE_INDEX_EPOCHS": "index.epochs",
        "TARGET_ACCURACY": "index.target_accuracy",
        "SCALE_QUERIES": ("queries", "query_batch"),
        "SCALE_REPEATS": "repeats",
        "K": "k",
        "BOVW_WORDS": "words",
    }

    def __post_init__(self) -> None:
        check_choices(self)
        no_pooling(self)


class ScaleResult(NamedTuple):
    """What :func:`run` returns: the latency and IA@1 tables, their figure and Markdown, and what was left out."""

    latency: pd.DataFrame
    ia: pd.DataFrame
    figure: Figure
    markdown: str
    notes: list[str]


def run(spec: ScaleSpec, paths: StudyPaths) -> ScaleResult:
    """The scale study of ``spec``: tables and figure to ``paths.out``, trained DSIs to ``paths.runs``.

    A recipe's run writes ``scale_latency``, ``scale_ia``, ``scale_histories.csv``, ``scale.md`` and
    ``scale.png`` into ``paths.out`` (see :func:`_scale_study`). A notebook profile's run (notebook 11)
    writes ``tables/scale_latency``, ``tables/scale_ia`` and ``figures/scale.png`` of the profile's
    report, and leaves out (with a note) every N beyond the usable images instead of failing.
    """
    profile = paths.profile
    if profile is None:
        refuse_profile_only(spec)
        image_set = load_images(spec.source, spec.size, root=spec.root, annotations=spec.annotations)
    else:
        image_set = spec_images(spec)
    ns = [n if n > 0 else len(image_set) for n in spec.ns]  # 0 means every usable image
    ia_ns = [n if n > 0 else len(image_set) for n in spec.ia_ns]
    config = spec.index
    if profile is None:
        latency, ia, fig = _scale_study(
            image_set,
            ns,
            ia_ns,
            index_config=config,
            out_dir=paths.out,
            runs_dir=paths.runs,
            model_overrides=spec.model.overrides(),
            n_queries=spec.queries,
            batch_size=spec.query_batch,
            k=list(spec.k),
            repeats=spec.repeats,
            bovw_words=spec.words,
            device=config.device,
            amp=config.amp,
            id_scheme=spec.ids,
            seed=spec.seed,
            reuse_latency=spec.reuse_latency,
            keep_ia=spec.keep_ia,
        )
        return ScaleResult(latency, ia, fig, console_summary(spec, (latency, ia)), [])
    notes = []
    too_big = sorted({n for n in ns + ia_ns if n > len(image_set)})
    if too_big:
        notes.append(f"{image_set.name} at {spec.size} px has {len(image_set)} usable images; left out N = {too_big}")
    ns, ia_ns = [n for n in ns if n <= len(image_set)], [n for n in ia_ns if n <= len(image_set)]
    device = str(resolve_device(config.device))
    notes.append(f"{len(image_set)} images; latency at N = {ns} on {device}; IA@1 at N = {ia_ns}")
    model = spec.model.overrides()
    latency = latency_table(
        image_set,
        ns,
        n_queries=spec.queries,
        batch_size=spec.query_batch,
        k=list(spec.k),
        repeats=spec.repeats,
        model_overrides=model,
        bovw_words=spec.words,
        device=device,
        amp=config.amp,
        id_scheme=spec.ids,
        seed=spec.seed,
        progress=False,
    )
    write_table(latency, paths.tables / "scale_latency")
    ia, _ = ia_table(
        image_set,
        ia_ns,
        index_config=replace(config, progress=False),
        model_overrides=model,
        runs_dir=paths.runs,
        id_scheme=spec.ids,
        seed=spec.seed,
        beam_size=max(spec.k),
    )
    write_table(ia, paths.tables / "scale_ia")
    settings = {"source": image_set.name, "size": spec.size, "device": device, "k": list(spec.k)}
    markdown = scale_markdown(latency, ia, {**settings, "queries": spec.queries, "repeats": spec.repeats})
    fig = scale_figure(latency, ia, title=f"{image_set.name} at {spec.size} px, profile {profile}, {device}")
    save_figure(fig, paths.figures / "scale.png")
    return ScaleResult(latency, ia, fig, markdown, notes)


def console_summary(spec: ScaleSpec, result: tuple[pd.DataFrame, pd.DataFrame] | ScaleResult) -> str:
    """The latency and IA@1 tables."""
    return scale_markdown(
        result[0],
        result[1],
        {
            "source": spec.source,
            "size": spec.size,
            "device": spec.index.device,
            "k": list(spec.k),
            "queries": spec.queries,
            "repeats": spec.repeats,
        },
    )
