"""Ablations of the ViT DSI: one factor at a time away from a default, each variant indexed, fine-tuned, scored.

A *grid* is a list of :class:`Variant`: the default first, then, per factor, each of its other
levels with everything else left at the default (the factors and why: ``docs/methods.md``).
Factors (:data:`FACTORS`):

- ``pos``: positional encoding of the encoder: sinusoidal (default), learned, conditional (PEG);
- ``patch``: patch side 8 / 16 (default) / 32 px;
- ``dropout``: 0 / 0.1 (default) / 0.2;
- ``index-share``: share of each class in the indexed database: 25% (default, the paper) or 50%;
- ``mix``: the multi-task model (indexing examples in every fine-tuning epoch) at mix ratios
  1, 2 and 4 retrieval examples per indexed image, against plain fine-tuning;
- ``options``: plain fine-tuning plus one option of issue 5: augmented views of the indexed
  images as extra queries, same-class targets redrawn every epoch, label smoothing 0.1.

The first four change the indexed model, so each needs an indexing run of its own; the last
two reuse the default's indexed model and only fine-tune. :func:`run_ablations` runs a grid
and returns one long table (a row per variant, stage and metric, with bootstrap intervals);
:mod:`.ablations_report` presents it (a summary table, the report, the figure).
:func:`run` does all of it for an :class:`AblationsSpec` and writes the table and the figure.

Models go to ``runs_dir/<run name>/`` as in the DSI study (:mod:`vitdsi_utils.studies.dsi`), so the
default variant *is* the model of ``recipes/dsi.yaml`` (or notebooks 03/04) when the settings agree,
and is loaded rather than trained again; the other variants live in ``ablations/<tag>/`` below it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import ImageSet, dataset_name, load_images
from vitdsi_utils.evaluation import evaluate_dsi
from vitdsi_utils.ids.codec import ID_SCHEMES
from vitdsi_utils.ids.schemes import codec_for
from vitdsi_utils.model.vit import DSIConfig
from vitdsi_utils.phases import fine_tune, index_database
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.reports.tables import write_table
from vitdsi_utils.runs import StudyPaths, run_name
from vitdsi_utils.studies.ablations_report import (
    FINE_TUNED,
    ZERO_SHOT,
    ablation_figure,
    ablations_markdown,
    summary_table,
)
from vitdsi_utils.studies.specs import (
    ImageSourceSpec,
    ModelSpec,
    SpecError,
    check_choices,
    dsi_model,
    no_pooling,
    refuse_profile_only,
)
from vitdsi_utils.training.config import TrainConfig

#: factor -> its levels: (label, Variant fields). The level equal to the default is marked by DEFAULT_LEVELS.
FACTORS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "pos": [
        ("sinusoidal", {"model": {"pos_encoding": "sinusoidal"}}),
        ("learned", {"model": {"pos_encoding": "learned"}}),
        ("conditional", {"model": {"pos_encoding": "conditional"}}),
    ],
    "patch": [
        ("8", {"model": {"patch_size": 8}}),
        ("16", {"model": {"patch_size": 16}}),
        ("32", {"model": {"patch_size": 32}}),
    ],
    "dropout": [
        ("0", {"model": {"dropout": 0.0}}),
        ("0.1", {"model": {"dropout": 0.1}}),
        ("0.2", {"model": {"dropout": 0.2}}),
    ],
    "index-share": [("25%", {"index_fraction": 0.25}), ("50%", {"index_fraction": 0.5})],
    "mix": [
        ("multi-task 1", {"multitask": True, "mix_ratio": 1.0}),
        ("multi-task 2", {"multitask": True, "mix_ratio": 2.0}),
        ("multi-task 4", {"multitask": True, "mix_ratio": 4.0}),
    ],
    "options": [
        ("index views", {"index_views": 1}),
        ("same-class targets", {"targets": "same-class"}),
        ("label smoothing 0.1", {"label_smoothing": 0.1}),
    ],
}


@dataclass(frozen=True)
class Variant:
    """One setting of the grid: the default's, with one factor changed (``factor``/``level`` name it)."""

    factor: str = "default"
    level: str = "default"
    model: dict[str, Any] = field(default_factory=dict)  # DSIConfig overrides on top of the base model
    index_fraction: float = 0.25  # share of each class that is indexed
    multitask: bool = False  # fine-tune with the indexing examples in every epoch
    mix_ratio: float | None = None  # with multitask: retrieval examples per indexed image and epoch
    targets: str = "pairs"  # "pairs" | "same-class" (see phases.fine_tune)
    index_views: int = 0  # augmented views of each indexed image per fine-tuning epoch
    label_smoothing: float = 0.0  # of the fine-tuning loss

    @property
    def name(self) -> str:
        return "default" if self.factor == "default" else f"{self.factor}: {self.level}"

    def index_tag(self, base_model: dict[str, Any]) -> str:
        """A folder name for the indexed model: the model settings and the indexed share that differ from the base."""
        changed = {k: v for k, v in self.model.items() if base_model.get(k, _DEFAULT_MODEL.get(k)) != v}
        parts = [f"{k}{v}" for k, v in sorted(changed.items())]
        if self.index_fraction != 0.25:
            parts.append(f"index{self.index_fraction:g}")
        return "-".join(parts)

    def fine_tune_tag(self) -> str:
        """A folder name for the fine-tuned model ('' for plain fine-tuning)."""
        parts = []
        if self.multitask:
            parts.append(f"multitask{self.mix_ratio:g}" if self.mix_ratio is not None else "multitask")
        if self.targets != "pairs":
            parts.append(self.targets)
        if self.index_views:
            parts.append(f"views{self.index_views}")
        if self.label_smoothing:
            parts.append(f"ls{self.label_smoothing:g}")
        return "-".join(parts)


def _model_defaults() -> dict[str, Any]:

    return DSIConfig().to_dict()


_DEFAULT_MODEL = _model_defaults()


def ablation_grid(
    factors: Sequence[str] = tuple(FACTORS),
    *,
    base_model: dict[str, Any] | None = None,
    levels: dict[str, Sequence[str]] | None = None,
) -> list[Variant]:
    """The default variant, then every other level of each factor in ``factors`` (one factor at a time).

    ``base_model`` holds the default's model settings (e.g. the profile's patch size); a level
    equal to it is the default itself and is not repeated. ``levels`` keeps only the named
    levels of a factor, e.g. ``{"patch": ["32"]}``.
    """
    unknown = [f for f in factors if f not in FACTORS]
    if unknown:
        raise ValueError(f"unknown ablation factors {unknown}; choose among {list(FACTORS)}")
    base_model = dict(base_model or {})
    default = Variant(model=base_model)
    grid = [default]
    for factor in factors:
        wanted = None if levels is None or factor not in levels else [str(x) for x in levels[factor]]
        known = [label for label, _ in FACTORS[factor]]
        if wanted is not None and set(wanted) - set(known):
            raise ValueError(f"factor {factor!r} has levels {known}; got {wanted}")
        for label, settings in FACTORS[factor]:
            if wanted is not None and label not in wanted:
                continue
            settings = dict(settings)
            model = {**base_model, **settings.pop("model", {})}
            variant = Variant(factor=factor, level=label, model=model, **settings)
            if _same_setting(variant, default, base_model):
                continue  # this level is the default
            grid.append(variant)
    return grid


def _same_setting(a: Variant, b: Variant, base_model: dict[str, Any]) -> bool:
    return a.index_tag(base_model) == b.index_tag(base_model) and a.fine_tune_tag() == b.fine_tune_tag()


def run_ablations(
    image_set: ImageSet,
    variants: Sequence[Variant],
    *,
    n: int,
    index_config: TrainConfig,
    retrieval_config: TrainConfig,
    seed: int = 0,
    scheme: str = "clustered",
    base_model: dict[str, Any] | None = None,
    max_pairs_per_query: int | None = None,
    view_min_crop: float = 0.7,
    runs_dir: str | Path | None = None,
    k: int = 100,
    progress: bool = True,
    on_variant: Callable[[pd.DataFrame], None] | None = None,
) -> pd.DataFrame:
    """Index, score zero-shot, fine-tune and score every variant; one long table.

    Columns: variant, factor, level, stage (zero-shot | fine-tuned), metric, value, ci_low,
    ci_high, chance, index_epochs, index_epoch_cap, index_reached_target, index_s (to memorise:
    until ``index_config.target_accuracy`` or its epoch cap; read from the model), tune_epochs,
    tune_s, n_index. Variants that share an indexed model (the fine-tuning factors) index once.
    With ``runs_dir`` every model is saved and a finished one is loaded (see the module
    docstring); without it nothing is written. ``on_variant`` is called with the table so far
    after every variant (e.g. to write it, so a long grid shows its progress).
    """
    base_model = dict(base_model or {})
    default_db = build_database(image_set, n, id_scheme=scheme, seed=seed)
    root = Path(runs_dir) / run_name(default_db) if runs_dir is not None else None
    indexed: dict[str, tuple[Any, Any, pd.DataFrame]] = {}  # index tag -> (db, PhaseResult, zero-shot table)
    frames = []
    bar = tqdm(variants, desc="ablations", disable=not progress)
    for variant in bar:
        bar.set_postfix_str(variant.name)
        tag = variant.index_tag(base_model)
        if tag not in indexed:
            db = (
                default_db
                if variant.index_fraction == 0.25
                else build_database(image_set, n, id_scheme=scheme, seed=seed, index_fraction=variant.index_fraction)
            )
            run_dir = None if root is None else (root if not tag else root / "ablations" / tag)
            zero = index_database(db, model_overrides=dict(variant.model), config=index_config, run_dir=run_dir)
            table, _ = evaluate_dsi(zero.model, _codec(db), db, k=k, seed=seed)
            indexed[tag] = (db, zero, table)
        db, zero, zero_table = indexed[tag]
        ft_tag = variant.fine_tune_tag()
        index_dir = None if root is None else (root if not tag else root / "ablations" / tag)
        tune_dir = None if index_dir is None else (index_dir if not ft_tag else index_dir / "ablations" / ft_tag)
        config = dataclasses.replace(retrieval_config, label_smoothing=variant.label_smoothing)
        tuned = fine_tune(
            db,
            zero.model,
            config=config,
            run_dir=tune_dir,
            max_pairs_per_query=max_pairs_per_query,
            multitask=variant.multitask,
            mix_ratio=variant.mix_ratio,
            targets=variant.targets,
            index_views=variant.index_views,
            view_min_crop=view_min_crop,
        )
        tuned_table, _ = evaluate_dsi(tuned.model, _codec(db), db, k=k, seed=seed)
        # as trained: a model reused from its run folder reports its own cap and whether it reached the target
        common = dict(
            variant=variant.name,
            factor=variant.factor,
            level=variant.level,
            index_epochs=zero.epochs,
            index_epoch_cap=zero.epoch_cap,
            index_reached_target=zero.reached_target,
            index_s=zero.seconds,
            tune_epochs=tuned.epochs,
            tune_s=tuned.seconds,
            n_index=db.n_index,
        )
        frames.append(zero_table.assign(stage=ZERO_SHOT, **common))
        frames.append(tuned_table.assign(stage=FINE_TUNED, **common))
        if on_variant is not None:
            on_variant(ordered_by_scheme(pd.concat(frames, ignore_index=True)))
    bar.close()
    return ordered_by_scheme(pd.concat(frames, ignore_index=True))


def ordered_by_scheme(long: pd.DataFrame) -> pd.DataFrame:
    first = ["variant", "factor", "level", "stage", "metric", "value", "ci_low", "ci_high", "chance"]
    return long[[c for c in first if c in long.columns] + [c for c in long.columns if c not in first]]


def merge_results(new: pd.DataFrame, path: str | Path, settings: dict[str, Any]) -> pd.DataFrame:
    """``new`` plus the rows of the table at ``path`` for other variants run with the same ``settings``.

    Lets a grid run in parts (e.g. two processes with different factors) into one table; rows
    written with other settings (another N, budget, ...) are dropped, never mixed in. ``new``
    gets the ``settings`` as columns.
    """
    new = new.assign(**{k: str(v) for k, v in settings.items()})
    path = Path(path)
    if not path.exists():
        return new
    old = pd.read_csv(path)
    same = np.ones(len(old), dtype=bool)
    for key, value in settings.items():
        same &= old[key].astype(str).to_numpy() == str(value) if key in old.columns else False
    kept = old[same & ~old["variant"].isin(set(new["variant"]))]
    merged = pd.concat([kept, new], ignore_index=True) if len(kept) else new
    order = {name: i for i, name in enumerate(_grid_order())}
    rank = merged["variant"].map(lambda v: order.get(v, len(order)))
    return ordered_by_scheme(merged.iloc[np.argsort(rank.to_numpy(), kind="stable")].reset_index(drop=True))


def _grid_order() -> list[str]:
    return [v.name for v in ablation_grid()]


def _codec(db):

    return codec_for(db)


# ------------------------------------------------------------------------------------------
# The study as a spec
# ------------------------------------------------------------------------------------------
@dataclass
class AblationsSpec(ImageSourceSpec):
    """Settings of the ablation study (recipe ``study: ablations``): the grid and the default it varies.

    ``factors`` are varied one at a time from the default (``model``, ``index``, ``fine_tune``);
    ``levels`` keeps only the named levels of a factor, e.g. ``{patch: ["32"]}`` (levels: see
    :data:`FACTORS`). ``seed`` draws the database; each training section has its own seed.
    """

    size: int = 64
    n: int = 512
    seed: int = 0
    scheme: str = field(default="clustered", metadata={"choices": ID_SCHEMES})
    factors: tuple[str, ...] = field(default=tuple(FACTORS), metadata={"choices": tuple(FACTORS)})
    levels: dict[str, tuple[str | int | float, ...]] | None = None
    model: ModelSpec = field(default_factory=dsi_model)
    index: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=150, target_accuracy=0.99, lr=1e-3, warmup_steps=100)
    )
    fine_tune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=1e-3))
    max_pairs_per_query: int | None = 5
    view_min_crop: float = 0.7  # crop side fraction of the index views
    k: int = 100  # the length of the ranked lists scored

    #: notebook profile keys (10_ablations) -> spec keys
    PROFILE_KEYS = {
        **ImageSourceSpec.PROFILE_KEYS,
        "K": "k",
        "SIZE": "size",
        "ABLATION_N": "n",
        "ABLATION_SCHEME": "scheme",
        "ABLATION_FACTORS": "factors",
        "SEEDS": ("seed[0]", "index.seed[0]", "fine_tune.seed[0]"),
        **ModelSpec.PROFILE_KEYS,
        "LR": ("index.lr", "fine_tune.lr"),
        "BATCH_SIZE": ("index.batch_size", "fine_tune.batch_size"),
        "WARMUP_STEPS": "index.warmup_steps",
        "INDEX_EPOCHS": "index.epochs",
        "TARGET_ACCURACY": "index.target_accuracy",
        "RETRIEVAL_EPOCHS": "fine_tune.epochs",
        "MAX_PAIRS_PER_QUERY": "max_pairs_per_query",
    }

    def __post_init__(self) -> None:
        check_choices(self)
        no_pooling(self)
        if self.levels is not None:
            self.levels = {str(k): tuple(str(v) for v in vs) for k, vs in self.levels.items()}
        try:
            ablation_grid(self.factors, base_model=self.model.overrides(), levels=self.levels or {})
        except ValueError as error:
            raise SpecError(f"levels: {error}") from None


def run(spec: AblationsSpec, paths: StudyPaths) -> pd.DataFrame:
    """The grid of ``spec``: models to ``paths.runs``, the table and the figure to ``paths.out``; the long table.

    A recipe's run writes ``ablations_<source>_<size>px_N<n>`` (CSV, Markdown, PNG) into ``paths.out``,
    merged with the rows of other parts of the same grid already there (:func:`merge_results`). A
    notebook profile's run (notebook 10) writes ``tables/ablations`` and ``figures/ablations.png`` of the
    profile's report, the grid's rows only. Both rewrite the table after every variant.
    """
    profile = paths.profile
    if profile is None:
        refuse_profile_only(spec)
    out, runs = Path(paths.out), Path(paths.runs)
    base = spec.model.overrides()
    grid = ablation_grid(spec.factors, base_model=base, levels=dict(spec.levels or {}))
    ic, rc = spec.index, spec.fine_tune
    name = dataset_name(spec.source, spec.root, spec.name)
    title = f"DSI ablations, {name} {spec.size} px, N = {spec.n}"
    if profile is not None:
        table_stem, figure_path = paths.tables / "ablations", paths.figures / "ablations.png"
        ic, rc = replace(ic, progress=False), replace(rc, progress=False)
        note = (
            f"DSI ablations, {name} at {spec.size} px, N = {spec.n}, {spec.scheme} IDs, seed {spec.seed}, "
            f"profile `{profile}`: indexing until IA@1 >= {ic.target_accuracy} or {ic.epochs} epochs, "
            f"fine-tuning {rc.epochs} epochs."
        )
    else:
        table_stem = out / f"ablations_{spec.source}_{spec.size}px_N{spec.n}"
        figure_path = table_stem.with_suffix(".png")
        note = (
            f"# ViT DSI ablations, {spec.source} at {spec.size} px, N = {spec.n}, {spec.scheme} IDs, seed {spec.seed}\n\n"
            f"Default: patch {spec.model.patch_size}, dropout {spec.model.dropout}, {spec.model.pos_encoding} "
            f"positions, 25% of each class indexed, plain fine-tuning. Indexing: lr {ic.lr}, warm-up {ic.warmup_steps} "
            f"steps, until IA@1 >= {ic.target_accuracy} ({ic.stop_metric} rule) or {ic.epochs} epochs. Fine-tuning: "
            f"{rc.epochs} epochs, lr {rc.lr}, at most {spec.max_pairs_per_query} pairs per query."
        )
    run_settings = {
        "source": spec.source,
        "size": spec.size,
        "n": spec.n,
        "seed": spec.seed,
        "scheme": spec.scheme,
        "index_epochs_cap": ic.epochs,
        "retrieval_epochs": rc.epochs,
        "max_pairs_per_query": spec.max_pairs_per_query,
        "lr": ic.lr,
    }

    def write(long: pd.DataFrame) -> pd.DataFrame:
        table = long if profile is not None else merge_results(long, table_stem.with_suffix(".csv"), run_settings)
        write_table(table, table_stem, markdown=ablations_markdown(table, note))
        save_figure(ablation_figure(table, index_cap=ic.epochs, title=title), figure_path)
        return table

    image_set = load_images(
        spec.source, spec.size, root=spec.root, annotations=spec.annotations, name=name, progress=profile is None
    )
    print(f"{len(grid)} variants: " + ", ".join(v.name for v in grid))
    long = run_ablations(
        image_set,
        grid,
        n=spec.n,
        seed=spec.seed,
        scheme=spec.scheme,
        base_model=base,
        index_config=ic,
        retrieval_config=rc,
        max_pairs_per_query=spec.max_pairs_per_query,
        view_min_crop=spec.view_min_crop,
        runs_dir=runs,
        k=spec.k,
        on_variant=write,
    )
    return write(long)


def console_summary(spec: AblationsSpec, merged: pd.DataFrame) -> str:
    """The summary table of :func:`run`, one row per variant."""
    return summary_table(merged).drop(columns=["factor", "level"]).to_string(index=False)
