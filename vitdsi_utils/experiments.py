"""One DSI experiment = one database (N, ID scheme, seed): index it, evaluate zero-shot,
fine-tune on retrieval pairs, evaluate again. Checkpoints and histories land in a run folder,
so a notebook can pick up where the previous one stopped.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from .data import Database
from .evaluation import attach_paper, evaluate_dsi
from .ids import IDCodec
from .model import DSIConfig, DSIModel
from .semantic_ids import codec_for
from .train import (
    AugmentedViews,
    CheckpointError,
    History,
    IndexingTask,
    RetrievalPairs,
    SameClassTargets,
    TrainConfig,
    load_model,
    seed_everything,
    fit,
    train_indexing,
    train_retrieval,
)

ZERO_SHOT = "DSI zero-shot"
FINE_TUNED = "DSI fine-tuned"
MULTITASK = "DSI multi-task"

#: Retrieval targets of fine-tuning: fixed (query, relevant ID) pairs, or one relevant ID per query redrawn each epoch.
TARGET_MODES = ("pairs", "same-class")


def _seconds_before(checkpoint: Path | None) -> float:
    """Training seconds already spent in an unfinished run's checkpoint (0 without one), so the time of a
    run resumed over several sessions counts every session, not the last one only."""
    if checkpoint is None or not checkpoint.exists():
        return 0.0
    from .train import load_checkpoint

    return float(sum(row.get("seconds", 0.0) for row in load_checkpoint(checkpoint)["history"]))


def run_name(db: Database, ids: str | None = None) -> str:
    """A folder name that identifies the database: source, size, N, ID scheme and seed.

    ``ids`` names the ID scheme when the codec is not the database's own dense one (e.g.
    ``IDAssignment.tag``, such as ``semantic-bovw-k10-c10``); default: the database's scheme.
    """
    s = db.settings
    return f"{s['source']}-{s['size']}px-N{s['n']}-{ids or s['id_scheme']}-seed{s['seed']}"


def database_codec(db: Database, codec: IDCodec | None = None) -> IDCodec:
    """``codec`` checked against ``db`` (one ID per indexed image), or the database's own dense codec."""
    if codec is None:
        return codec_for(db)
    if len(codec) != db.n_index:
        raise ValueError(
            f"the codec has {len(codec)} IDs but the database indexes {db.n_index} images; build it for this "
            "database with semantic_ids.codec_for(db, scheme)"
        )
    return codec


def model_config(db: Database, codec: IDCodec, **model_overrides: Any) -> DSIConfig:
    """The configuration of a DSI model for ``db``'s images and ``codec``'s vocabulary (paper defaults otherwise)."""
    return DSIConfig.from_codec(codec, image_size=db.settings["size"], **model_overrides)


#: An encoder initialisation: (source, path), source one of ``pretrain.INIT_SOURCES``.
EncoderInitSpec = tuple[str, "str | Path"]


def new_model(
    db: Database, codec: IDCodec, *, encoder_init: EncoderInitSpec | None = None, **model_overrides: Any
) -> DSIModel:
    """A fresh DSI model sized for ``db``'s images and ``codec``'s vocabulary (paper defaults otherwise).

    ``encoder_init=(source, path)`` copies its encoder from a pretrained checkpoint
    (:func:`vitdsi_utils.pretrain.init_encoder`: "ssl", "dense", "dsi" or "torchvision").
    """
    model = DSIModel(model_config(db, codec, **model_overrides))
    if encoder_init is not None:
        from .pretrain import init_encoder

        init_encoder(model, *encoder_init)
    return model


def encoder_init_tag(encoder_init: EncoderInitSpec | None) -> str | None:
    """``"<source>:<hash of the file>"`` for an encoder initialisation (None: random init)."""
    if encoder_init is None:
        return None
    from .pretrain import INIT_SOURCES, EncoderInit

    source, path = encoder_init
    if source not in INIT_SOURCES:
        raise ValueError(f"unknown encoder source {source!r}; choose one of {INIT_SOURCES}")
    if not Path(path).is_file():
        from .pretrain import _resolve_torchvision_file

        if source != "torchvision":
            raise FileNotFoundError(f"{path} does not exist: the {source} checkpoint to initialise the encoder from")
        path = _resolve_torchvision_file(path)
    return EncoderInit(source, str(path), []).tag()


@dataclass
class PhaseResult:
    """A trained model of one phase, with its history and the wall time it took."""

    model: DSIModel
    history: History
    seconds: float
    epochs: int
    config: dict[str, Any] = field(default_factory=dict)  # the TrainConfig it was trained with (plain values)


def index_database(
    db: Database,
    *,
    model_overrides: dict | None = None,
    config: TrainConfig | None = None,
    run_dir: str | Path | None = None,
    codec: IDCodec | None = None,
    init: Callable[[DSIModel], object] | None = None,
    encoder_init: EncoderInitSpec | None = None,
) -> PhaseResult:
    """Indexing phase: train a new model until it reproduces every indexed image's ID.

    ``codec`` holds the IDs (database row r gets ``codec.codes[r]``); default: the database's
    dense IDs (``semantic_ids.codec_for(db)``). With ``run_dir``, a finished model is loaded
    from ``zero_shot.pt`` instead of retrained, and an interrupted one resumes from
    ``indexing.ckpt``. Either must have been written for this database, these IDs and this
    model configuration, or a :class:`~vitdsi_utils.train.CheckpointError` names what differs.

    ``encoder_init=(source, path)`` starts the encoder from pretrained weights instead of
    random ones (see :func:`new_model`); the source and a hash of the file are recorded in the
    checkpoints, so a run folder of another initialisation is refused rather than reused.
    ``init`` is called on the new model before training, for an initialisation that is not a
    file (e.g. ``lambda m: m.load_encoder(encoder)``); such runs are recorded as "custom".
    """
    codec = database_codec(db, codec)
    wanted = model_config(db, codec, **(model_overrides or {}))
    fingerprint = db.fingerprint()
    # checkpoints written before this key existed do not record it, and are not checked against it
    # a callable ``init`` cannot be identified, so its runs are only told apart from random ones
    fingerprint["encoder_init"] = encoder_init_tag(encoder_init) or ("custom" if init is not None else "random")
    final = Path(run_dir) / "zero_shot.pt" if run_dir else None
    if final is not None and final.exists():
        return _load_final(final, codec, wanted, fingerprint)
    config = config or TrainConfig()
    seed_everything(config.seed)  # the initial weights must be as reproducible as the training that follows
    model = DSIModel(wanted)
    if init is not None:
        init(model)  # a resumed run then overwrites these weights with its checkpoint's
    if encoder_init is not None:
        from .pretrain import init_encoder

        init_encoder(model, *encoder_init)
    index_images, _ = db.split("index")
    checkpoint = Path(run_dir) / "indexing.ckpt" if run_dir else None
    start = time.perf_counter() - _seconds_before(checkpoint)
    history = train_indexing(
        model,
        codec,
        torch.from_numpy(index_images),
        config=config,
        checkpoint_path=checkpoint,
        data_info=fingerprint,
    )
    seconds = time.perf_counter() - start
    epochs = int(history.to_frame()["epoch"].max()) if len(history) else 0
    if final is not None:
        _save_final(final, model, codec, config, history, seconds, epochs, fingerprint)
    return PhaseResult(model, history, seconds, epochs, config.to_dict())


def fine_tune(
    db: Database,
    zero_shot: DSIModel,
    *,
    config: TrainConfig | None = None,
    run_dir: str | Path | None = None,
    max_pairs_per_query: int | None = None,
    multitask: bool = False,
    mix_ratio: float | None = None,
    codec: IDCodec | None = None,
    targets: str = "pairs",
    index_views: int = 0,
    view_min_crop: float = 0.7,
    consolidate: int = 0,
) -> PhaseResult:
    """Retrieval phase: a copy of the indexed model trained on (query, relevant ID) pairs.

    One pair per relevant indexed image of every train query (relevant: the same class, or a
    shared label for multi-label data), as in the reference implementation;
    ``max_pairs_per_query`` caps it with a seeded sample. The val queries give the validation
    curve. ``zero_shot`` is not changed.

    ``multitask=True`` keeps the indexing examples in every epoch beside the pairs, as the
    original DSI trains, so the model is reminded of each image's own ID while it learns
    retrieval (the paper fine-tuned on pairs alone and lost most of its indexing accuracy).
    ``mix_ratio`` then resamples the pairs to ``mix_ratio`` per indexed image and epoch (None:
    every pair once). The result is saved as ``multitask.pt`` rather than ``fine_tuned.pt``.

    ``targets="same-class"`` replaces the fixed pairs by one target per train query and epoch,
    drawn at random among its relevant indexed images (:class:`~vitdsi_utils.train.SameClassTargets`;
    ``max_pairs_per_query`` then does not apply). ``index_views=k`` adds k randomly flipped and
    cropped views (crop side >= ``view_min_crop``) of every indexed image per epoch as extra
    queries whose target is that image's own ID (:class:`~vitdsi_utils.train.AugmentedViews`).
    Label smoothing is ``config.label_smoothing``.

    ``consolidate=E`` appends up to E epochs of indexing alone (phase "consolidate"), stopped as
    soon as the indexed images' beam-search IA@1 reaches ``config.target_accuracy``: retrieval
    training moves some indexed images off their IDs, and this puts them back, so the model
    keeps its index by a stop rule rather than by luck. Its epochs count in the result's epochs.

    ``codec`` must be the one ``zero_shot`` was indexed with (default: the database's dense IDs).
    A finished model in ``run_dir`` is loaded only if it was trained with the same options
    (targets, views, label smoothing, epochs, pairs, mix ratio); otherwise
    :class:`~vitdsi_utils.train.CheckpointError` says what differs.
    """
    if targets not in TARGET_MODES:
        raise ValueError(f"targets must be one of {TARGET_MODES}, got {targets!r}")
    if isinstance(index_views, bool) or not isinstance(index_views, int) or index_views < 0:
        raise ValueError(f"index_views must be an integer >= 0 (views of each indexed image per epoch), got {index_views!r}")
    if isinstance(consolidate, bool) or not isinstance(consolidate, int) or consolidate < 0:
        raise ValueError(f"consolidate must be an integer >= 0 (most indexing epochs after fine-tuning), got {consolidate!r}")
    codec = database_codec(db, codec)
    zero_shot.check_codec(codec)
    fingerprint = db.fingerprint()
    config = config or TrainConfig(epochs=75)
    options = fine_tune_options(config, max_pairs_per_query=max_pairs_per_query, multitask=multitask,
                                mix_ratio=mix_ratio, targets=targets, index_views=index_views,
                                view_min_crop=view_min_crop, consolidate=consolidate)
    stem = "multitask" if multitask else "fine_tuned"
    final = Path(run_dir) / f"{stem}.pt" if run_dir else None
    if final is not None and final.exists():
        return _load_final(final, codec, zero_shot.config, fingerprint, options=options)
    index_labels = db.relevance_labels("index")
    train_images, _ = db.split("train")
    val_images, _ = db.split("val")
    train_labels, val_labels = db.relevance_labels("train"), db.relevance_labels("val")
    if targets == "same-class":
        pairs = SameClassTargets.from_labels(torch.from_numpy(train_images), train_labels, index_labels)
    else:
        pairs = RetrievalPairs.from_labels(
            torch.from_numpy(train_images), train_labels, index_labels, max_pairs_per_query=max_pairs_per_query
        )
    extra_tasks = []
    if index_views:
        extra_tasks.append(AugmentedViews(torch.from_numpy(db.split("index")[0]), views=index_views,
                                          min_crop=view_min_crop))
    val_pairs = RetrievalPairs.from_labels(
        torch.from_numpy(val_images), val_labels, index_labels, max_pairs_per_query=max_pairs_per_query
    )
    model = copy.deepcopy(zero_shot)
    checkpoint = Path(run_dir) / f"{'multitask' if multitask else 'retrieval'}.ckpt" if run_dir else None
    consolidation = Path(run_dir) / "consolidate.ckpt" if run_dir else None
    # a consolidation checkpoint's history holds the fine-tuning rows too
    start = time.perf_counter() - (_seconds_before(consolidation) or _seconds_before(checkpoint))
    if multitask:
        indexing = IndexingTask(torch.from_numpy(db.split("index")[0]))
        history = fit(
            model, codec, [indexing, pairs, *extra_tasks], mix_ratio=mix_ratio, val=[val_pairs], config=config,
            checkpoint_path=checkpoint, data_info=fingerprint, stop_on=None, phase="multitask",
        )
    elif extra_tasks:
        history = fit(
            model, codec, [pairs, *extra_tasks], val=[val_pairs], config=config, checkpoint_path=checkpoint,
            data_info=fingerprint, stop_on=None, phase="retrieval",
        )
    else:
        history = train_retrieval(
            model, codec, pairs, val=[val_pairs], config=config, checkpoint_path=checkpoint, data_info=fingerprint
        )
    if consolidate:
        history = train_indexing(
            model, codec, torch.from_numpy(db.split("index")[0]), config=dataclasses.replace(config, epochs=consolidate),
            history=history, checkpoint_path=consolidation,
            data_info=fingerprint, phase="consolidate",
        )
    seconds = time.perf_counter() - start
    frame = history.to_frame()
    epochs = int(frame.groupby("phase")["epoch"].max().sum()) if len(frame) else 0
    if final is not None:
        _save_final(final, model, codec, config, history, seconds, epochs, fingerprint, options=options)
    return PhaseResult(model, history, seconds, epochs, config.to_dict())


def fine_tune_options(
    config: TrainConfig,
    *,
    max_pairs_per_query: int | None = None,
    multitask: bool = False,
    mix_ratio: float | None = None,
    targets: str = "pairs",
    index_views: int = 0,
    view_min_crop: float = 0.7,
    consolidate: int = 0,
) -> dict[str, Any]:
    """The settings that make one fine-tuned model differ from another (stored beside it, checked on load)."""
    return {
        "consolidate": int(consolidate), "target_accuracy": config.target_accuracy if consolidate else None,
        "epochs": config.epochs, "lr": config.lr, "label_smoothing": config.label_smoothing,
        "max_pairs_per_query": None if targets == "same-class" else max_pairs_per_query,
        "multitask": bool(multitask), "mix_ratio": mix_ratio if multitask else None, "targets": targets,
        "index_views": int(index_views), "view_min_crop": float(view_min_crop) if index_views else None,
    }


def _load_final(
    path: Path, codec: IDCodec, config: DSIConfig, fingerprint: dict, options: dict[str, Any] | None = None
) -> PhaseResult:
    """A finished phase from ``path``; CheckpointError if it was trained for another model, database or options.

    A model saved before options were recorded is checked against the defaults of the options
    added since (fixed pairs, no views).
    """
    model, _, meta = load_model(path, expect_config=config, expect_codec=codec, expect_data=fingerprint)
    if options is not None:
        saved = meta["extra"].get("options")
        if saved is None:  # written before options were recorded: only the plain settings existed then
            trained = meta.get("train_config") or {}
            saved = {"targets": "pairs", "index_views": 0, "label_smoothing": 0.0,
                     **{k: trained[k] for k in ("epochs", "lr", "label_smoothing") if k in trained}}
        saved = {"consolidate": 0, "target_accuracy": None, **saved}  # saved before consolidation existed
        differ = [f"{k}: saved {saved[k]!r}, requested {v!r}" for k, v in options.items() if k in saved and saved[k] != v]
        if differ:
            raise CheckpointError(
                f"{path} was fine-tuned with other options ({'; '.join(differ)}). Delete it or use another "
                "run folder to train with these options"
            )
    return PhaseResult(model, meta["history"], float(meta["extra"].get("seconds", 0.0)), int(meta["epoch"]),
                       dict(meta.get("train_config") or {}))


def _save_final(
    path: Path,
    model: DSIModel,
    codec: IDCodec,
    config: TrainConfig,
    history: History,
    seconds: float,
    epochs: int,
    fingerprint: dict,
    options: dict[str, Any] | None = None,
) -> None:
    from .train import save_checkpoint

    extra = {"seconds": seconds, "data": fingerprint, **({"options": options} if options is not None else {})}
    save_checkpoint(path, model, None, model.config, config, epochs, history, codec, extra=extra)


@dataclass
class DSIExperiment:
    """Both phases of one database, their histories and the result table."""

    db: Database
    zero_shot: PhaseResult
    fine_tuned: PhaseResult | None
    multitask: PhaseResult | None = None
    table: pd.DataFrame = field(default_factory=pd.DataFrame)


def run_experiment(
    db: Database,
    *,
    model_overrides: dict | None = None,
    index_config: TrainConfig | None = None,
    retrieval_config: TrainConfig | None = None,
    fine_tune_phase: bool = True,
    run_dir: str | Path | None = None,
    k: int = 100,
    max_pairs_per_query: int | None = None,
    multitask: bool = False,
    mix_ratio: float | None = None,
    multitask_config: TrainConfig | None = None,
    codec: IDCodec | None = None,
    ids: str | None = None,
    init: Callable[[DSIModel], object] | None = None,
    encoder_init: EncoderInitSpec | None = None,
    targets: str = "pairs",
    index_views: int = 0,
    view_min_crop: float = 0.7,
    consolidate: int = 0,
) -> DSIExperiment:
    """Index, evaluate zero-shot, fine-tune, evaluate fine-tuned; the table has the paper's numbers beside ours.

    ``multitask`` adds a third model: the zero-shot one trained on pairs and indexing examples
    together (see :func:`fine_tune`), with ``mix_ratio`` and ``multitask_config`` (default:
    ``retrieval_config``). ``codec`` gives the IDs (default: the database's dense IDs, as the
    paper); ``ids`` names the scheme in the table's ``ids`` column (default: the database's
    scheme). Give every codec its own ``run_dir``: a folder holding models of other IDs is refused.
    ``init`` prepares the new model before indexing (see :func:`index_database`).
    ``encoder_init=(source, path)`` starts the encoder from pretrained weights
    (:func:`vitdsi_utils.pretrain.init_encoder`); give it its own ``run_dir`` too.
    ``targets``, ``index_views``, ``view_min_crop`` and ``consolidate`` are the fine-tuning options of
    :func:`fine_tune` (for both the fine-tuned and the multi-task model).
    """
    options = dict(targets=targets, index_views=index_views, view_min_crop=view_min_crop, consolidate=consolidate)
    codec = database_codec(db, codec)
    ids = ids or db.settings["id_scheme"]
    zero = index_database(db, model_overrides=model_overrides, config=index_config, run_dir=run_dir, codec=codec,
                          init=init, encoder_init=encoder_init)
    tables = [_result_rows(db, zero, codec, ZERO_SHOT, k, ids)]
    tuned = None
    if fine_tune_phase:
        tuned = fine_tune(
            db, zero.model, config=retrieval_config, run_dir=run_dir, max_pairs_per_query=max_pairs_per_query,
            codec=codec, **options,
        )
        tables.append(_result_rows(db, tuned, codec, FINE_TUNED, k, ids))
    mixed = None
    if multitask:
        mixed = fine_tune(
            db, zero.model, config=multitask_config or retrieval_config, run_dir=run_dir,
            max_pairs_per_query=max_pairs_per_query, multitask=True, mix_ratio=mix_ratio, codec=codec, **options,
        )
        tables.append(_result_rows(db, mixed, codec, MULTITASK, k, ids))
    table = attach_paper(pd.concat(tables, ignore_index=True))
    return DSIExperiment(db, zero, tuned, multitask=mixed, table=table)


def _result_rows(db: Database, phase: PhaseResult, codec: IDCodec, model_name: str, k: int, ids: str) -> pd.DataFrame:
    table, timings = evaluate_dsi(phase.model, codec, db, k=k, seed=db.settings["seed"])
    s = db.settings
    return table.assign(
        model=model_name,
        source=s["source"],
        size=s["size"],
        n=s["n"],
        ids=ids,
        seed=s["seed"],
        epochs=phase.epochs,
        train_s=phase.seconds,
        **timings,
    )


def dsi_study(
    source: str = "imagenette",
    size: int = 160,
    ns: tuple[int, ...] = (512, 1024, 2048),
    schemes: tuple[str, ...] = ("clustered", "random"),
    seeds: tuple[int, ...] = (0,),
    *,
    model_overrides: dict | None = None,
    index_config: TrainConfig | None = None,
    retrieval_config: TrainConfig | None = None,
    max_pairs_per_query: int | None = None,
    out_dir: str | Path | None = None,
    runs_dir: str | Path | None = None,
    root: str | Path | None = None,
    annotations: str | Path | None = None,
    progress: bool = True,
    fine_tune_phase: bool = True,
    multitask: bool = False,
    mix_ratio: float | None = None,
    multitask_config: TrainConfig | None = None,
    encoder_init: EncoderInitSpec | None = None,
    targets: str = "pairs",
    index_views: int = 0,
    view_min_crop: float = 0.7,
    consolidate: int = 0,
    bovw_vocabularies: int = 0,
    bovw_words: int = 200,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run :func:`run_experiment` for every N, ID scheme and seed; return (results, histories).

    ``out_dir`` receives ``dsi_<source>_<size>px.{csv,md}`` (Table 1 rows) and
    ``histories.csv`` (per-epoch curves of both phases, for Figures 1-3); ``runs_dir`` keeps
    the checkpoints, so an interrupted study resumes and a finished one is only re-evaluated.
    ``root`` and ``annotations`` locate the images as in :func:`data.load_images`.
    ``encoder_init=(source, path)`` starts every model's encoder from those weights (run
    folders then end in ``-init-<source>``, and the table has an ``init`` column).
    ``root`` and ``annotations`` locate the images as in :func:`data.load_images`. ``targets``,
    ``index_views``, ``view_min_crop`` and ``consolidate`` are the fine-tuning options of :func:`fine_tune`.
    ``schemes`` may also name the codec schemes of :func:`~vitdsi_utils.semantic_ids.assign_ids`
    (``atomic``; ``semantic`` and ``rq`` over BoVW histograms of the indexed images, default settings),
    assigned to the indexed images of the random build.
    ``bovw_vocabularies > 0`` adds BoVW's rows for each database (``bovw_words`` words, metrics
    averaged per query over that many k-means vocabularies, :func:`evaluation.evaluate_bovw`), and
    the Markdown then gives target 3's verdict for every DSI row.
    """
    from .data import load_images
    from .evaluation import evaluate_bovw
    from .semantic_ids import CODEC_SCHEMES, database_with_ids

    unknown = [s for s in schemes if s not in CODEC_SCHEMES]
    if unknown:
        raise ValueError(f"unknown ID scheme(s) {unknown}; choose among {CODEC_SCHEMES}")
    image_set = load_images(source, size, root=root, annotations=annotations, progress=progress)
    results, histories = [], []
    for n in ns:
        for scheme in schemes:
            for seed in seeds:
                db, assignment = database_with_ids(image_set, n, scheme, seed=seed)
                if bovw_vocabularies and scheme == schemes[0]:  # the same images under every ID scheme
                    results.append(evaluate_bovw(db, n_words=bovw_words, seed=seed, vocabularies=bovw_vocabularies,
                                                 progress=False).rows(db))
                name = run_name(db, assignment.tag) + (f"-init-{encoder_init[0]}" if encoder_init is not None else "")
                run_dir = Path(runs_dir) / name if runs_dir is not None else None
                experiment = run_experiment(
                    db,
                    model_overrides=model_overrides,
                    index_config=index_config,
                    retrieval_config=retrieval_config,
                    run_dir=run_dir,
                    max_pairs_per_query=max_pairs_per_query,
                    fine_tune_phase=fine_tune_phase,
                    multitask=multitask,
                    mix_ratio=mix_ratio,
                    multitask_config=multitask_config,
                    encoder_init=encoder_init,
                    targets=targets,
                    index_views=index_views,
                    view_min_crop=view_min_crop,
                    consolidate=consolidate,
                    codec=assignment.codec,
                    ids=scheme,
                )
                if encoder_init is not None:
                    experiment.table["init"] = encoder_init[0]
                results.append(experiment.table)
                for phase in (experiment.zero_shot, experiment.fine_tuned, experiment.multitask):
                    if phase is not None and len(phase.history):
                        histories.append(phase.history.to_frame().assign(n=n, ids=scheme, seed=seed))
                # tables are rewritten after every run, so a long study shows its progress
                results_frame = pd.concat(results, ignore_index=True)
                history_frame = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
                if out_dir is not None:
                    _write_dsi_tables(results_frame, history_frame, Path(out_dir), source, size,
                                      model_overrides, index_config, retrieval_config, max_pairs_per_query,
                                      mix_ratio if multitask else False, multitask_config,
                                      fine_tune_note(targets, index_views, view_min_crop, retrieval_config),
                                      consolidate, fine_tune_phase)
    return results_frame, history_frame


def fine_tune_note(targets: str, index_views: int, view_min_crop: float, config: TrainConfig | None) -> str:
    """A sentence naming the fine-tuning options that differ from plain fine-tuning ('' when none do)."""
    parts = []
    if targets == "same-class":
        parts.append("instead of those fixed pairs, one target per train query and epoch, redrawn at random "
                     "among its relevant indexed images")
    if index_views:
        parts.append(f"{index_views} augmented view(s) of each indexed image per epoch as extra queries "
                     f"(flip, crops >= {view_min_crop:g} of the side)")
    if config is not None and config.label_smoothing:
        parts.append(f"label smoothing {config.label_smoothing:g}")
    return ("Fine-tuning options: " + "; ".join(parts) + ". ") if parts else ""


def _write_dsi_tables(
    results_frame: pd.DataFrame,
    history_frame: pd.DataFrame,
    out_dir: Path,
    source: str,
    size: int,
    model_overrides: dict | None,
    index_config: TrainConfig | None,
    retrieval_config: TrainConfig | None,
    max_pairs_per_query: int | None,
    mix_ratio: float | None | bool = False,
    multitask_config: TrainConfig | None = None,
    options_note: str = "",
    consolidate: int = 0,
    fine_tune_phase: bool = True,
) -> None:
    from .evaluation import TABLE1_NOTE, table1_markdown
    from .tables import write_table
    from .targets import target3_markdown, target4_markdown

    out_dir = Path(out_dir)
    overrides = ", ".join(f"{k}={v}" for k, v in (model_overrides or {}).items()) or "paper defaults"
    ic, rc = index_config or TrainConfig(), retrieval_config or TrainConfig(epochs=75)
    markdown = "\n".join([
        f"# ViT DSI on {source} at {size} px",
        "",
        f"Model: {overrides}. Indexing: lr {ic.lr}, batch {ic.batch_size}, until sequence accuracy on the "
        f"indexed images ({ic.stop_metric} mode) >= {ic.target_accuracy} or {ic.epochs} epochs. "
        + (f"Retrieval fine-tuning: {rc.epochs} epochs, lr {rc.lr}, " if fine_tune_phase else
           "No plain retrieval fine-tuning. Retrieval examples: ")
        + (f"at most {max_pairs_per_query} (query, relevant ID) pairs per query (seeded). "
           if max_pairs_per_query else "every (query, relevant ID) pair, as in the paper. ")
        + options_note
        + ("" if mix_ratio is False else
           f"Multi-task: {(multitask_config or rc).epochs} epochs, lr {(multitask_config or rc).lr}, every indexed "
           "image in each epoch beside "
           + ("every pair. " if mix_ratio is None else f"{mix_ratio:g} pairs per indexed image (resampled). "))
        + (f"Then up to {consolidate} epochs of indexing alone, until IA@1 is back at "
           f"{(multitask_config or rc).target_accuracy}. " if consolidate else "")
        + ("BoVW: averaged per query over its k-means vocabularies (see its rows). "
           if "BoVW" in set(results_frame["model"]) else "")
        + "Top-100 lists from beam search constrained to the trie of existing IDs (beam 100). " + TABLE1_NOTE,
        "",
        table1_markdown(results_frame),
        "",
        "Epochs and training time per run:",
        "",
        results_frame[results_frame["model"] != "BoVW"].groupby(["model", "n", "ids", "seed"])
        [["epochs", "train_s", "search_ms_per_query"]].first().round(1).reset_index().to_markdown(index=False),
    ])
    target3 = target3_markdown(results_frame) if "BoVW" in set(results_frame["model"]) else ""
    if target3:
        markdown += "\n\n" + target3
    target4 = target4_markdown(results_frame[results_frame["model"] != "BoVW"])
    if target4:
        markdown += "\n\n" + target4
    write_table(results_frame, out_dir / f"dsi_{source}_{size}px", markdown=markdown)
    if len(history_frame):
        write_table(history_frame, out_dir / f"histories_{source}_{size}px")
