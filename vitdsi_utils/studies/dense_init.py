"""DSI whose encoder starts from the dense retrieval encoder, trained multi-task.

The paper's DSI learns its encoder from scratch while memorising IDs, and then loses the
index when it is fine-tuned for retrieval. This variant combines three things the other
studies found to help:

1. the encoder starts from the dense baseline's contrastive encoder (``baselines/dense.py``),
   trained on the same labelled images the fine-tuned DSI sees (train queries and indexed
   images), so nothing outside the paper's data budget is used;
2. indexing then trains the whole model (encoder included) to memorise the IDs;
3. retrieval fine-tuning keeps the indexing examples in every epoch (multi-task, as the
   original DSI), so the index is not forgotten.

The ID scheme is free: the paper's ``random`` and ``clustered`` IDs, or label-free
``semantic`` IDs from hierarchical k-means over the dense encoder's embeddings of the indexed
images (:func:`vitdsi_utils.ids.schemes.assign_ids`).

:func:`run_dense_init` trains and scores one database; :func:`run` runs the grid of a
:class:`DenseInitSpec` beside BoVW and the dense model, and writes the table and target verdicts
(:mod:`.dense_init_report`). Notebook 14 and ``vitdsi run recipes/dsi-dense-init.yaml`` both
call it; a profile's paths (the notebook's) give the notebook's tables, figure and verdicts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from matplotlib.figure import Figure

from vitdsi_utils.baselines.dense import DENSE_MODEL, DenseEncoder, DenseTrainConfig, load_dense
from vitdsi_utils.data.database import Database, build_database
from vitdsi_utils.data.images import SIZES, load_images
from vitdsi_utils.evaluation import evaluate_bovw
from vitdsi_utils.ids.codec import ID_SCHEMES, IDCodec
from vitdsi_utils.ids.schemes import assign_ids
from vitdsi_utils.phases import TARGET_MODES
from vitdsi_utils.reports.paper import attach_paper, table1_markdown
from vitdsi_utils.reports.plots import metric_vs_n, save_figure
from vitdsi_utils.reports.tables import MULTITASK, ZERO_SHOT, write_table
from vitdsi_utils.runs import DENSE_FILE, StudyPaths, database_name, run_name
from vitdsi_utils.settings import data_dir
from vitdsi_utils.studies.dense import evaluate_dense, train_or_load
from vitdsi_utils.studies.dense_init_report import (
    INIT_MULTITASK,
    INIT_ZERO_SHOT,
    target_tables,
    write_recipe_tables,
)
from vitdsi_utils.studies.dsi import DSIExperiment, run_experiment
from vitdsi_utils.studies.specs import (
    POOLINGS,
    ImageSourceSpec,
    ModelSpec,
    check_choices,
    dsi_model,
    no_pooling,
    refuse_profile_only,
    spec_images,
)
from vitdsi_utils.studies.targets import gap_markdown
from vitdsi_utils.training.config import TrainConfig

#: ID schemes this variant can use (``semantic``: k-means over the dense embeddings).
INIT_SCHEMES = ("clustered", "random", "semantic")


_RENAME = {ZERO_SHOT: INIT_ZERO_SHOT, MULTITASK: INIT_MULTITASK}


@dataclass
class DenseInitSpec(ImageSourceSpec):
    """Settings of the dense-init DSI study (recipe ``study: dense-init``).

    Per database the dense encoder (``dense``, ``pooling``) is trained, or loaded from ``dense_runs``
    (where the dense study keeps it; null: ``data/runs/dense``); every scheme's DSI starts from it,
    is indexed (``index``) and trained multi-task (``multitask``, ``mix_ratio``, ``targets``, ...).
    ``semantic_k`` and ``semantic_c`` shape the semantic IDs (k-means over the dense embeddings).
    """

    size: int = field(default=160, metadata={"choices": SIZES})
    ns: tuple[int, ...] = (512, 1024, 2048)
    schemes: tuple[str, ...] = field(default=INIT_SCHEMES, metadata={"choices": INIT_SCHEMES})
    # a profile's study only: the ID scheme of the database whose run folder holds the dense encoder (notebook
    # 07's first scheme), also the draw of the semantic IDs' database (a recipe: the first scheme's, clustered)
    dense_scheme: str = field(default="clustered", metadata={"choices": ID_SCHEMES})
    seeds: tuple[int, ...] = (0,)
    model: ModelSpec = field(default_factory=dsi_model)
    pooling: str = field(default="mean", metadata={"choices": POOLINGS})  # the dense encoder's
    dense: DenseTrainConfig = field(default_factory=lambda: DenseTrainConfig(epochs=90, lr=5e-4, batch_size=64))
    include_index: bool = True  # the dense encoder trains on the indexed images too (false: a profile's study only)
    index: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=400, target_accuracy=0.99, lr=1e-3, warmup_steps=100)
    )
    multitask: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=1e-3))
    mix_ratio: float | None = 2.0  # retrieval pairs per indexed image and epoch
    max_pairs_per_query: int | None = 5
    targets: str = field(default="pairs", metadata={"choices": TARGET_MODES})
    index_views: int = 0
    consolidate: int = 0
    semantic_k: int = 10  # semantic IDs: k-means branching factor
    semantic_c: int = 10  # semantic IDs: leaf size
    words: int = 200  # BoVW visual words
    vocabularies: int = 5
    k: int = 100  # length of the ranked lists
    dense_runs: str | None = None

    #: settings only a notebook profile's study reads (a recipe that sets them is refused)
    PROFILE_ONLY = ("annotations", "name", "dense_scheme", "include_index")

    #: notebook profile keys (14_dense_init) -> spec keys
    PROFILE_KEYS = {
        **ImageSourceSpec.PROFILE_KEYS,
        "SIZE": "size",
        "NS": "ns",
        "INIT_SCHEMES": "schemes",
        "ID_SCHEMES": "dense_scheme[0]",
        "SEEDS": ("seeds", "dense.seed[0]", "index.seed[0]", "multitask.seed[0]"),
        **ModelSpec.PROFILE_KEYS,
        "DENSE_POOLING": "pooling",
        "DENSE_EPOCHS": "dense.epochs",
        "DENSE_LR": "dense.lr",
        "DENSE_BATCH_SIZE": "dense.batch_size",
        "DENSE_MARGIN": "dense.margin",
        "DENSE_ENTROPY_WEIGHT": "dense.entropy_weight",
        "DENSE_TRAIN_ON_INDEX": "include_index",
        "LR": ("index.lr", "multitask.lr"),
        "BATCH_SIZE": ("index.batch_size", "multitask.batch_size"),
        "WARMUP_STEPS": "index.warmup_steps",
        "INDEX_EPOCHS": "index.epochs",
        "TARGET_ACCURACY": "index.target_accuracy",
        "INIT_EPOCHS": "multitask.epochs",
        "INIT_MIX_RATIO": "mix_ratio",
        "MAX_PAIRS_PER_QUERY": "max_pairs_per_query",
        "IDS_K": "semantic_k",
        "IDS_C": "semantic_c",
        "BOVW_WORDS": "words",
        "BOVW_VOCABULARIES": "vocabularies",
        "K": "k",
    }

    def __post_init__(self) -> None:
        check_choices(self)
        no_pooling(self)


class DenseInitResult(NamedTuple):
    """What :func:`run` returns: the result rows and training histories, and (a profile's study) its
    figure by file stem and the target tables of :func:`target_tables`."""

    results: pd.DataFrame
    histories: pd.DataFrame
    figures: dict[str, Figure] = {}
    targets: dict[str, pd.DataFrame] = {}


def run(spec: DenseInitSpec, paths: StudyPaths) -> DenseInitResult:
    """The dense-init study of ``spec``: DSI checkpoints to ``paths.runs``, tables to ``paths.out``.

    With a profile's paths (:meth:`StudyPaths.create`, notebook 14) it is that profile's study: see
    :func:`_profile_study`. Otherwise (a recipe) :func:`_dense_init_study` writes its files into ``paths.out``.
    """
    if paths.profile is not None:
        return _profile_study(spec, paths)
    refuse_profile_only(spec)
    return DenseInitResult(
        *_dense_init_study(
            spec.source,
            spec.size,
            tuple(spec.ns),
            tuple(spec.schemes),
            tuple(spec.seeds),
            model_overrides=spec.model.overrides(),
            dense_config=spec.dense,
            dense_pooling=spec.pooling,
            index_config=spec.index,
            multitask_config=spec.multitask,
            mix_ratio=spec.mix_ratio,
            max_pairs_per_query=spec.max_pairs_per_query,
            bovw_words=spec.words,
            bovw_vocabularies=spec.vocabularies,
            k=spec.k,
            targets=spec.targets,
            index_views=spec.index_views,
            consolidate=spec.consolidate,
            id_params={"k": spec.semantic_k, "c": spec.semantic_c},
            dense_runs=Path(spec.dense_runs) if spec.dense_runs else data_dir() / "runs" / "dense",
            runs_dir=paths.runs,
            out_dir=paths.out,
            root=spec.root,
        )
    )


def console_summary(spec: DenseInitSpec, result: tuple[pd.DataFrame, Any]) -> str:
    """Headline metrics per model, N and ID scheme."""
    results = result[0]
    shown = results[results["metric"].isin(["IA@1", "mAP@10", "P@10", "R@100"])]
    return shown.pivot_table(index=["model", "n", "ids"], columns="metric", values="value").round(3).to_string()


@dataclass
class DenseInitRun:
    """One database's run: the experiment (models, histories, table) and the ID facts."""

    experiment: DSIExperiment
    ids: str
    codec: IDCodec
    id_facts: dict[str, Any]


def dense_init_codec(
    db: Database, scheme: str, encoder: DenseEncoder, *, k: int = 10, c: int = 10, seed: int | None = None
) -> tuple[IDCodec, dict[str, Any]]:
    """The IDs of ``db``'s indexed images under ``scheme``, and facts about them (tag, seconds, ...).

    ``clustered``/``random`` are the paper's IDs (``db`` must have been built with that scheme);
    ``semantic`` clusters ``encoder``'s embeddings of the indexed images (branching ``k``, leaf size ``c``).
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown ID scheme {scheme!r} for the dense-init DSI; choose one of {INIT_SCHEMES}")
    if scheme in ID_SCHEMES:
        assignment = assign_ids(db, scheme)
    else:
        embeddings = encoder.embed(db.split("index")[0]).numpy()
        assignment = assign_ids(db, scheme, embeddings=embeddings, embedding_name="dense", k=k, c=c, seed=seed)
    return assignment.codec, assignment.summary()


def run_dense_init(
    db: Database,
    encoder_path: str | Path,
    *,
    scheme: str | None = None,
    run_dir: str | Path | None = None,
    model_overrides: dict | None = None,
    index_config: TrainConfig | None = None,
    multitask_config: TrainConfig | None = None,
    mix_ratio: float | None = 2.0,
    max_pairs_per_query: int | None = None,
    k: int = 100,
    id_params: dict | None = None,
    targets: str = "pairs",
    index_views: int = 0,
    consolidate: int = 0,
) -> DenseInitRun:
    """Index ``db`` with a DSI whose encoder starts as the dense encoder saved at ``encoder_path``,
    then fine-tune it multi-task; score both models.

    ``encoder_path`` is a dense checkpoint (``dense.pt``, written by the dense study, notebook 07 or
    :func:`~vitdsi_utils.studies.dense.train_or_load`); it must have the DSI encoder's shape
    (``model_overrides``), or :func:`~vitdsi_utils.baselines.init.init_encoder` names what differs.
    ``scheme`` (default: the database's own) picks the IDs, see :func:`dense_init_codec`.
    ``run_dir`` keeps the models (``zero_shot.pt``, ``multitask.pt``) so a rerun only evaluates;
    give each scheme its own folder. The checkpoints record which encoder they started from, so
    a folder trained from another one is refused. The table's models are :data:`INIT_ZERO_SHOT`
    and :data:`INIT_MULTITASK`. ``targets``, ``index_views`` and ``consolidate`` are the multi-task
    phase's fine-tuning options (:func:`~vitdsi_utils.phases.fine_tune`), e.g. ``targets="same-class"``.
    """
    scheme = scheme or db.settings["id_scheme"]
    encoder, _ = load_dense(encoder_path)
    codec, facts = dense_init_codec(db, scheme, encoder, **(id_params or {}))
    experiment = run_experiment(
        db,
        model_overrides=model_overrides,
        index_config=index_config,
        fine_tune_phase=False,
        run_dir=run_dir,
        k=k,
        max_pairs_per_query=max_pairs_per_query,
        multitask=True,
        mix_ratio=mix_ratio,
        multitask_config=multitask_config,
        codec=codec,
        ids=scheme,
        encoder_init=("dense", encoder_path),
        targets=targets,
        index_views=index_views,
        consolidate=consolidate,
    )
    experiment.table["model"] = experiment.table["model"].replace(_RENAME)
    return DenseInitRun(experiment, scheme, codec, facts)


def _dense_init_study(
    source: str = "imagenette",
    size: int = 64,
    ns: Sequence[int] = (512, 1024),
    schemes: Sequence[str] = INIT_SCHEMES,
    seeds: Sequence[int] = (0,),
    *,
    model_overrides: dict | None = None,
    dense_config: DenseTrainConfig | None = None,
    dense_pooling: str = "mean",
    index_config: TrainConfig | None = None,
    multitask_config: TrainConfig | None = None,
    mix_ratio: float | None = 2.0,
    max_pairs_per_query: int | None = None,
    bovw_words: int = 200,
    bovw_vocabularies: int = 1,
    k: int = 100,
    id_params: dict | None = None,
    targets: str = "pairs",
    index_views: int = 0,
    consolidate: int = 0,
    dense_runs: str | Path = "data/runs/dense",
    runs_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    root: str | Path | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The dense-init DSI for every N, scheme and seed, beside BoVW and the dense model; (results, histories).

    The dense encoder of each database is trained once (or loaded from ``dense_runs/<database>/dense.pt``,
    where the dense study keeps it) on the database drawn for the first scheme.
    ``out_dir`` receives ``dsi_dense_init_<source>_<size>px.{csv,md}`` and ``histories_...csv``,
    rewritten after every run. ``bovw_vocabularies`` averages BoVW over that many k-means
    vocabularies (:func:`~vitdsi_utils.evaluation.evaluate_bovw`). ``targets``, ``index_views`` and
    ``consolidate`` go to :func:`run_dense_init`.
    """

    image_set = load_images(source, size, root=root, progress=progress)
    overrides = dict(model_overrides or {})
    results, histories, facts = [], [], []
    for n in ns:
        for seed in seeds:
            first = build_database(image_set, n, id_scheme=_draw_scheme(schemes[0]), seed=seed)
            dense_dir = Path(dense_runs) / database_name(first)  # the dense study's folder: its encoder is reused
            retriever = train_or_load(
                first,
                model_overrides={**overrides, "pooling": dense_pooling},
                train_config=dense_config,
                run_dir=dense_dir,
            )
            dense_rows, timings = evaluate_dense(retriever, first, k=k, seed=seed)
            results.append(
                dense_rows.assign(train_s=timings["train_s"], search_ms_per_query=timings["search_ms_per_query"])
            )
            results.append(
                evaluate_bovw(
                    first, n_words=bovw_words, k=k, seed=seed, vocabularies=bovw_vocabularies, progress=False
                ).rows(first)
            )
            for scheme in schemes:
                db = build_database(image_set, n, id_scheme=_draw_scheme(scheme), seed=seed)
                run_dir = Path(runs_dir) / run_name(db, f"{scheme}-dense-init") if runs_dir is not None else None
                start = time.perf_counter()
                run = run_dense_init(
                    db,
                    dense_dir / DENSE_FILE,
                    scheme=scheme,
                    run_dir=run_dir,
                    model_overrides=overrides,
                    index_config=index_config,
                    multitask_config=multitask_config,
                    mix_ratio=mix_ratio,
                    max_pairs_per_query=max_pairs_per_query,
                    k=k,
                    id_params=id_params,
                    targets=targets,
                    index_views=index_views,
                    consolidate=consolidate,
                )
                results.append(run.experiment.table)
                facts.append(
                    {"n": n, "seed": seed, "ids": scheme, **run.id_facts, "wall_s": time.perf_counter() - start}
                )
                for phase in (run.experiment.zero_shot, run.experiment.multitask):
                    if phase is not None and len(phase.history):
                        histories.append(phase.history.to_frame().assign(n=n, ids=scheme, seed=seed))
                if out_dir is not None:
                    frame = pd.concat(results, ignore_index=True)
                    write_recipe_tables(
                        frame,
                        pd.concat(histories, ignore_index=True) if histories else pd.DataFrame(),
                        pd.DataFrame(facts),
                        Path(out_dir),
                        source,
                        size,
                    )
    return pd.concat(results, ignore_index=True), (
        pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    )


def _draw_scheme(scheme: str) -> str:
    """The scheme a database is drawn with: its own for the paper's IDs, clustered for label-free ones."""
    return scheme if scheme in ID_SCHEMES else "clustered"


# ------------------------------------------------------------------------------------------
# A notebook profile's dense-init study (notebook 14) and the project's targets
# ------------------------------------------------------------------------------------------
def _profile_study(spec: DenseInitSpec, paths: StudyPaths) -> DenseInitResult:
    """Notebook 14's study, inside a profile's report (``paths`` from :meth:`StudyPaths.create`).

    It differs from :func:`_dense_init_study` (a recipe's) where a profile's study shares its folders
    with the other notebooks: each database seed also seeds the training; the dense encoder is notebook
    07's (``dense.pt`` in the run folder of the ``dense_scheme`` database, trained here only when it is
    missing), and the rows of BoVW, the DSI, the dense search and the other ID schemes are those of
    notebooks 05, 07 and 08 (``tables/table1.csv``, ``dense.csv``, ``ids.csv``, where they exist).
    Writes ``tables/`` histories_dense_init.csv, dense_init_ids, dense_init, target3 and target4 (CSV
    and Markdown) and ``figures/dense_init_vs_n.png``; prints a line per database and ID scheme trained.
    """
    image_set = spec_images(spec)
    overrides = spec.model.overrides()
    frames, histories, id_facts = [], [], []
    if not spec.schemes:
        print(
            "INIT_SCHEMES is empty: no DSI is started from the dense encoder; the tables below gather the "
            "models of notebooks 05, 07 and 08"
        )
    for n in spec.ns if spec.schemes else ():
        for seed in spec.seeds:
            first = build_database(image_set, n, id_scheme=spec.dense_scheme, seed=seed)
            train_or_load(
                first,
                model_overrides={**overrides, "pooling": spec.pooling},
                train_config=replace(spec.dense, seed=seed, progress=False),
                include_index=spec.include_index,
                run_dir=paths.run_dir(first),
            )
            for scheme in spec.schemes:
                own = scheme if scheme in ID_SCHEMES else spec.dense_scheme
                db = build_database(image_set, n, id_scheme=own, seed=seed)
                run = run_dense_init(
                    db,
                    paths.run_dir(first) / DENSE_FILE,
                    scheme=scheme,
                    run_dir=paths.runs / run_name(db, f"{scheme}-dense-init"),
                    model_overrides=overrides,
                    index_config=replace(spec.index, seed=seed, progress=False),
                    multitask_config=replace(spec.multitask, seed=seed, progress=False),
                    mix_ratio=spec.mix_ratio,
                    max_pairs_per_query=spec.max_pairs_per_query,
                    k=spec.k,
                    id_params={"k": spec.semantic_k, "c": spec.semantic_c},
                    targets=spec.targets,
                    index_views=spec.index_views,
                    consolidate=spec.consolidate,
                )
                ex = run.experiment
                frames.append(ex.table)
                id_facts.append({"n": n, "seed": seed, **run.id_facts})
                for phase in (ex.zero_shot, ex.multitask):
                    histories.append(phase.history.to_frame().assign(n=n, ids=scheme, seed=seed))
                print(
                    f"N={n} {scheme} seed {seed}: indexed in {ex.zero_shot.epochs} epochs "
                    f"({ex.zero_shot.seconds:.0f} s), multi-task {ex.multitask.epochs} epochs "
                    f"({ex.multitask.seconds:.0f} s)"
                )
    history_frame = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    if histories:
        history_frame.to_csv(paths.tables / "histories_dense_init.csv", index=False)
        write_table(pd.DataFrame(id_facts), paths.tables / "dense_init_ids")

    earlier = []
    for table in ("table1", "dense", "ids"):
        csv = paths.tables / f"{table}.csv"
        if csv.exists():
            earlier.append(pd.read_csv(csv))
        else:
            print(f"{csv.name} is missing (an earlier notebook writes it); its rows are left out")
    results = pd.concat([*earlier, *frames], ignore_index=True)
    results = results[results["n"].isin(spec.ns) & results["seed"].isin(spec.seeds)]
    results = results.drop(columns=[c for c in ("paper",) if c in results.columns])
    results = results.drop_duplicates(subset=["model", "ids", "n", "seed", "metric"], keep="last")
    results = attach_paper(results)
    write_table(results, paths.tables / "dense_init", markdown=table1_markdown(results))

    shown = results[  # the multi-task models of notebook 08 (its atomic IDs: the best 64 px recipe) and of this one
        results["model"].isin(["BoVW", DENSE_MODEL, "DSI fine-tuned", MULTITASK, INIT_MULTITASK])
        & results["ids"].isin(["-", "clustered", "random", "semantic", "atomic"])
    ]
    title = "BoVW, dense search and the DSI" + (", with the dense-init DSI" if frames else "")
    figures = {"dense_init_vs_n": metric_vs_n(shown, ("IA@1", "mAP@10", "P@10"), title=title)}
    save_figure(figures["dense_init_vs_n"], paths.figures / "dense_init_vs_n.png")
    targets = target_tables(results)
    write_table(targets["target3"], paths.tables / "target3")
    if len(targets["target4"]):
        write_table(targets["target4"], paths.tables / "target4", markdown=gap_markdown(targets["target4"]))
    return DenseInitResult(results, history_frame, figures, targets)
