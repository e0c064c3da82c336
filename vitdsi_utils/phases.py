"""The DSI's training phases on one database: indexing, then retrieval fine-tuning, each trained or loaded.

A finished phase is loaded from its run folder instead of trained again, and an interrupted one
resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vitdsi_utils.baselines.init import INIT_SOURCES, EncoderInit, init_encoder, resolve_torchvision_file
from vitdsi_utils.data.database import Database
from vitdsi_utils.ids.codec import IDCodec
from vitdsi_utils.ids.schemes import codec_for
from vitdsi_utils.locks import run_folder_lock
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.runs import (
    DESCENDANT_FILES,
    INDEXING_CHECKPOINT,
    ZERO_SHOT_FILE,
    PhaseResult,
    load_phase,
    phase_files,
    save_phase,
    seconds_before,
)
from vitdsi_utils.training.checkpoint import CheckpointError, load_checkpoint
from vitdsi_utils.training.config import TrainConfig, seed_everything
from vitdsi_utils.training.loop import fit, train_indexing, train_retrieval
from vitdsi_utils.training.reuse import REUSE_HINT, differences, finished_verdict, weights_digest
from vitdsi_utils.training.tasks import AugmentedViews, IndexingTask, RetrievalPairs, SameClassTargets

#: Retrieval targets of fine-tuning: fixed (query, relevant ID) pairs, or one relevant ID per query redrawn each epoch.
TARGET_MODES = ("pairs", "same-class")


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


#: An encoder initialisation: (source, path), source one of ``baselines.init.INIT_SOURCES``.
EncoderInitSpec = tuple[str, "str | Path"]


def new_model(
    db: Database, codec: IDCodec, *, encoder_init: EncoderInitSpec | None = None, **model_overrides: Any
) -> DSIModel:
    """A fresh DSI model sized for ``db``'s images and ``codec``'s vocabulary (paper defaults otherwise).

    ``encoder_init=(source, path)`` copies its encoder from a pretrained checkpoint
    (:func:`vitdsi_utils.baselines.init.init_encoder`: "ssl", "dense", "dsi" or "torchvision").
    """
    model = DSIModel(model_config(db, codec, **model_overrides))
    if encoder_init is not None:
        init_encoder(model, *encoder_init)
    return model


def encoder_init_tag(encoder_init: EncoderInitSpec | None) -> str | None:
    """``"<source>:<hash of the file>"`` for an encoder initialisation (None: random init)."""
    if encoder_init is None:
        return None

    source, path = encoder_init
    if source not in INIT_SOURCES:
        raise ValueError(f"unknown encoder source {source!r}; choose one of {INIT_SOURCES}")
    if not Path(path).is_file():
        if source != "torchvision":
            raise FileNotFoundError(f"{path} does not exist: the {source} checkpoint to initialise the encoder from")
        path = resolve_torchvision_file(path)
    return EncoderInit(source, str(path), []).tag()


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
    dense IDs (``ids.schemes.codec_for(db)``). With ``run_dir``, a finished model is loaded
    from ``zero_shot.pt`` instead of retrained, and an interrupted one resumes from
    ``indexing.ckpt``. Either must have been written for this database, these IDs, this
    model configuration and these training settings (``config``'s recipe), or a
    :class:`~vitdsi_utils.training.checkpoint.CheckpointError` names every difference. The epoch
    cap follows the rule of :mod:`vitdsi_utils.training.reuse`: a model that reached the target
    is reused under any cap at least its epochs; one that stopped at its cap short of the target
    continues from ``indexing.ckpt`` when the cap is raised (refused while models fine-tuned from
    it are in the folder). The run folder is locked while this runs (:mod:`vitdsi_utils.locks`).
    The result says whether the target was reached, and ``loaded`` whether it was trained here.

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
    config = config or TrainConfig()
    if run_dir is None:
        return _index(db, wanted, codec, config, fingerprint, init, encoder_init, None)
    with run_folder_lock(run_dir):
        final = Path(run_dir) / ZERO_SHOT_FILE
        if final.exists():
            loaded = _reuse_index(final, Path(run_dir), codec, wanted, fingerprint, config)
            if loaded is not None:
                return loaded
        return _index(db, wanted, codec, config, fingerprint, init, encoder_init, Path(run_dir))


def _reuse_index(
    final: Path, run_dir: Path, codec: IDCodec, wanted: DSIConfig, fingerprint: dict, config: TrainConfig
) -> PhaseResult | None:
    """The finished indexed model at ``final`` when it was trained for these settings; None when its run
    continues to a higher epoch cap; CheckpointError naming every difference otherwise."""
    result, meta = load_phase(final, codec, wanted, fingerprint, config.device)
    checkpoint = run_dir / INDEXING_CHECKPOINT
    reached = meta["extra"].get("reached_target")
    if reached is None and checkpoint.exists():  # saved before this was recorded: its checkpoint knows
        state = load_checkpoint(checkpoint)
        if int(state["epoch"]) == int(meta["epoch"]):
            reached = bool(state["extra"].get("stopped"))
    verdict = finished_verdict(
        meta.get("train_config"), config, epochs_run=int(meta["epoch"]), reached=reached, resumable=checkpoint.exists()
    )
    if verdict.differences:
        raise CheckpointError(
            f"{final} was indexed with other settings: "
            + "; ".join(verdict.differences)
            + ". "
            + REUSE_HINT.format(files=f"{final} and {checkpoint}")
        )
    if not verdict.resume:
        result.reached_target = reached
        return result
    cap = (meta.get("train_config") or {}).get("epochs")
    descendants = [str(run_dir / name) for name in DESCENDANT_FILES if (run_dir / name).exists()]
    if descendants:
        raise CheckpointError(
            f"{final} stopped at its cap of {cap} epochs without reaching the target; continuing it to "
            f"{config.epochs} epochs would change the indexed model that {', '.join(descendants)} were trained "
            "from. Delete them to continue indexing here, or use another run folder (a recipe's runs_dir)"
        )
    print(
        f"{final} stopped at its cap of {cap} epochs without reaching the target accuracy "
        f"{config.target_accuracy}; continuing from {checkpoint} up to {config.epochs} epochs",
        file=sys.stderr,
    )
    return None


def _index(
    db: Database,
    wanted: DSIConfig,
    codec: IDCodec,
    config: TrainConfig,
    fingerprint: dict,
    init: Callable[[DSIModel], object] | None,
    encoder_init: EncoderInitSpec | None,
    run_dir: Path | None,
) -> PhaseResult:
    """Train (or resume) the indexing phase; with ``run_dir``, save ``zero_shot.pt`` there."""
    seed_everything(config.seed)  # the initial weights must be as reproducible as the training that follows
    model = DSIModel(wanted)
    if init is not None:
        init(model)  # a resumed run then overwrites these weights with its checkpoint's
    if encoder_init is not None:
        init_encoder(model, *encoder_init)
    index_images, _ = db.split("index")
    checkpoint = run_dir / INDEXING_CHECKPOINT if run_dir else None
    start = time.perf_counter() - seconds_before(checkpoint)
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
    reached = history.reached_target
    if run_dir is not None:
        save_phase(
            run_dir / ZERO_SHOT_FILE, model, codec, config, history, seconds, epochs, fingerprint, reached=reached
        )
    return PhaseResult(model, history, seconds, epochs, config.to_dict(), reached_target=reached)


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
    drawn at random among its relevant indexed images (:class:`~vitdsi_utils.training.tasks.SameClassTargets`;
    ``max_pairs_per_query`` then does not apply). ``index_views=k`` adds k randomly flipped and
    cropped views (crop side >= ``view_min_crop``) of every indexed image per epoch as extra
    queries whose target is that image's own ID (:class:`~vitdsi_utils.training.tasks.AugmentedViews`).
    Label smoothing is ``config.label_smoothing``.

    ``consolidate=E`` appends up to E epochs of indexing alone (phase "consolidate"), stopped as
    soon as the indexed images' beam-search IA@1 reaches ``config.target_accuracy``: retrieval
    training moves some indexed images off their IDs, and this puts them back, so the model
    keeps its index by a stop rule rather than by luck. Its epochs count in the result's epochs.

    ``codec`` must be the one ``zero_shot`` was indexed with (default: the database's dense IDs).
    A finished model in ``run_dir`` is loaded only if it was trained with the same options
    (targets, views, pairs, mix ratio, consolidation), the same training settings (``config``'s
    recipe: epochs, lr, batch size, seed, label smoothing, ...; the stop rule's settings too with
    ``consolidate``) and from the same indexed model (a digest of ``zero_shot``'s weights);
    otherwise :class:`~vitdsi_utils.training.checkpoint.CheckpointError` names every difference.
    Interrupted runs resume from their checkpoints under the same checks. The run folder is
    locked while this runs (:mod:`vitdsi_utils.locks`).
    """
    if targets not in TARGET_MODES:
        raise ValueError(f"targets must be one of {TARGET_MODES}, got {targets!r}")
    if isinstance(index_views, bool) or not isinstance(index_views, int) or index_views < 0:
        raise ValueError(
            f"index_views must be an integer >= 0 (views of each indexed image per epoch), got {index_views!r}"
        )
    if isinstance(consolidate, bool) or not isinstance(consolidate, int) or consolidate < 0:
        raise ValueError(
            f"consolidate must be an integer >= 0 (most indexing epochs after fine-tuning), got {consolidate!r}"
        )
    codec = database_codec(db, codec)
    zero_shot.check_codec(codec)
    config = config or TrainConfig(epochs=75)
    options = fine_tune_options(
        config,
        max_pairs_per_query=max_pairs_per_query,
        multitask=multitask,
        mix_ratio=mix_ratio,
        targets=targets,
        index_views=index_views,
        view_min_crop=view_min_crop,
        consolidate=consolidate,
    )
    # the model it starts from: a folder whose indexed model changed refuses what was fine-tuned from the old one
    fingerprint = {**db.fingerprint(), "parent": weights_digest(zero_shot)}
    if run_dir is None:
        return _fine_tune(db, zero_shot, codec, config, options, fingerprint, None)
    with run_folder_lock(run_dir):
        final = Path(run_dir) / phase_files(multitask)[0]
        if final.exists():
            return _reuse_fine_tuned(final, codec, zero_shot.config, fingerprint, config, options)
        return _fine_tune(db, zero_shot, codec, config, options, fingerprint, Path(run_dir))


def _fine_tune(
    db: Database,
    zero_shot: DSIModel,
    codec: IDCodec,
    config: TrainConfig,
    options: dict[str, Any],
    fingerprint: dict[str, Any],
    run_dir: Path | None,
) -> PhaseResult:
    """Train (or resume) a fine-tuning run with ``options`` (see :func:`fine_tune`); save it in ``run_dir``."""
    multitask, targets, consolidate = options["multitask"], options["targets"], options["consolidate"]
    index_views, mix_ratio = options["index_views"], options["mix_ratio"]
    max_pairs_per_query = options["max_pairs_per_query"]
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
        extra_tasks.append(
            AugmentedViews(torch.from_numpy(db.split("index")[0]), views=index_views, min_crop=options["view_min_crop"])
        )
    val_pairs = RetrievalPairs.from_labels(
        torch.from_numpy(val_images), val_labels, index_labels, max_pairs_per_query=max_pairs_per_query
    )
    model = copy.deepcopy(zero_shot)
    final_file, checkpoint_file, consolidation_file = phase_files(multitask)
    checkpoint = run_dir / checkpoint_file if run_dir else None
    # each model consolidates from its own checkpoint (the fine-tuned one keeps the name it always had)
    consolidation = run_dir / consolidation_file if run_dir else None
    # a consolidation checkpoint's history holds the fine-tuning rows too
    start = time.perf_counter() - (seconds_before(consolidation) or seconds_before(checkpoint))
    data_info = {**fingerprint, **options}  # resuming a checkpoint of other options is refused, naming them
    if multitask:
        indexing = IndexingTask(torch.from_numpy(db.split("index")[0]))
        history = fit(
            model,
            codec,
            [indexing, pairs, *extra_tasks],
            mix_ratio=mix_ratio,
            val=[val_pairs],
            config=config,
            checkpoint_path=checkpoint,
            data_info=data_info,
            stop_on=None,
            phase="multitask",
        )
    elif extra_tasks:
        history = fit(
            model,
            codec,
            [pairs, *extra_tasks],
            val=[val_pairs],
            config=config,
            checkpoint_path=checkpoint,
            data_info=data_info,
            stop_on=None,
            phase="retrieval",
        )
    else:
        history = train_retrieval(
            model, codec, pairs, val=[val_pairs], config=config, checkpoint_path=checkpoint, data_info=data_info
        )
    reached = None
    if consolidate:
        # it continues the model fine-tuning just left: a checkpoint of another fine-tuned model is refused
        history = train_indexing(
            model,
            codec,
            torch.from_numpy(db.split("index")[0]),
            config=dataclasses.replace(config, epochs=consolidate),
            history=history,
            checkpoint_path=consolidation,
            data_info={**data_info, "parent": weights_digest(model)},
            phase="consolidate",
        )
        reached = history.reached_target
    seconds = time.perf_counter() - start
    frame = history.to_frame()
    epochs = int(frame.groupby("phase")["epoch"].max().sum()) if len(frame) else 0
    if run_dir is not None:
        save_phase(
            run_dir / final_file,
            model,
            codec,
            config,
            history,
            seconds,
            epochs,
            fingerprint,
            options=options,
            reached=reached,
        )
    return PhaseResult(model, history, seconds, epochs, config.to_dict(), reached_target=reached)


def _reuse_fine_tuned(
    final: Path, codec: IDCodec, config: DSIConfig, fingerprint: dict, train: TrainConfig, options: dict[str, Any]
) -> PhaseResult:
    """The finished fine-tuned (or multi-task) model at ``final``; CheckpointError naming every difference
    when it was trained for other settings, options or from another indexed model."""
    parent = fingerprint["parent"]
    result, meta = load_phase(
        final, codec, config, {k: v for k, v in fingerprint.items() if k != "parent"}, train.device
    )
    extra = meta["extra"]
    saved = extra.get("options")
    if saved is None:  # written before options were recorded: only the plain settings existed then
        saved = {"targets": "pairs", "index_views": 0}
    saved = {"consolidate": 0, **saved}  # saved before consolidation existed
    # the training settings among the options of older files are compared through train_config below
    saved = {k: v for k, v in saved.items() if k in options}
    found = differences(saved, {k: v for k, v in options.items() if k in saved})
    # all its epochs are trained (no cap); the stop rule's settings count when consolidation follows
    found += finished_verdict(
        meta.get("train_config"),
        train,
        epochs_run=int(meta["epoch"]),
        reached=extra.get("reached_target"),
        stop_rule=bool(options["consolidate"]),
        capped=False,
    ).differences
    saved_parent = extra.get("data", {}).get("parent")
    if saved_parent is not None and saved_parent != parent:
        found.append(
            f"indexed model: it was trained from other weights (digest {saved_parent}, this "
            f"folder's indexed model has {parent}): the indexed model changed since"
        )
    if found:
        raise CheckpointError(
            f"{final} was {'trained' if options['multitask'] else 'fine-tuned'} with other settings: "
            + "; ".join(found)
            + ". "
            + REUSE_HINT.format(files=final)
        )
    result.reached_target = extra.get("reached_target")
    return result


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
    """The options beside ``config`` that make one fine-tuned model differ from another (stored beside it,
    checked on load; ``config``'s own settings are checked through its recipe)."""
    return {
        "consolidate": int(consolidate),
        "max_pairs_per_query": None if targets == "same-class" else max_pairs_per_query,
        "multitask": bool(multitask),
        "mix_ratio": mix_ratio if multitask else None,
        "targets": targets,
        "index_views": int(index_views),
        "view_min_crop": float(view_min_crop) if index_views else None,
    }
