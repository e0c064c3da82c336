"""Incremental indexing: adding new images (new IDs) to a DSI that has already memorised a database.

A DSI stores its index in its weights, so adding images means training. This module compares
three ways of doing it on one database whose indexed images are split into an *initial* set
and a *new* batch (:func:`~vitdsi_utils.studies.incremental_setup.split_new`, e.g. 80 / 20):

* **fine-tune without replay**: the trained model sees only the new images; it learns their IDs
  and forgets old ones (catastrophic forgetting);
* **fine-tune with replay**: every epoch adds ``ratio`` old images per new image, resampled each
  epoch (``fit``'s ``mix_ratio``), to remind the model of the old IDs;
* **retrain from scratch** on all images: the reference, and the cost a DSI pays without updates.

IDs. The initial images keep IDs 0..n_old-1 and the new batch gets the *next* consecutive
numbers n_old..n-1 (:func:`~vitdsi_utils.studies.incremental_setup.incremental_codecs`). Every ID has the same number of digits, chosen
for a ``capacity`` (default: the final n), so the decoder length does not change and the
initial model can be fine-tuned on the full ID set; the trie of the full codec holds the old and
the new IDs. With *clustered* IDs the old images stay grouped by class but the new ones form a
block of their own after all old IDs (grouped by class among themselves): appending cannot put a
new image beside its class without renumbering old images, whose IDs the model has memorised.

Results per strategy: IA@1 of the old and of the new images (beam search over the full trie),
the seconds and epochs it took, and, along the fine-tuning epochs, the teacher-forced sequence
accuracy (greedy decoding) of old and new images: the forgetting curve.

:func:`run` runs an :class:`IncrementalSpec` (one database per N; a notebook profile's study, notebook 12:
one database into the profile's report); :func:`incremental_study` is one database.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from vitdsi_utils.data.database import Database, build_database
from vitdsi_utils.data.images import SIZES, load_images
from vitdsi_utils.devices import resolve_device
from vitdsi_utils.ids.codec import ID_SCHEMES, IDCodec
from vitdsi_utils.locks import run_folder_lock
from vitdsi_utils.model.decoding import indexing_accuracy
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.reports.tables import write_csv, write_table
from vitdsi_utils.runs import StudyPaths, run_name
from vitdsi_utils.studies.incremental_report import incremental_figure, incremental_markdown
from vitdsi_utils.studies.incremental_setup import (
    INITIAL,
    SCRATCH,
    finetune_name,
    finetune_tasks,
    incremental_codecs,
    replay_count,
    split_new,
)
from vitdsi_utils.studies.specs import (
    ImageSourceSpec,
    ModelSpec,
    SpecError,
    check_choices,
    full_model,
    no_pooling,
    refuse_profile_only,
    spec_images,
)
from vitdsi_utils.training.checkpoint import CheckpointError, load_model, save_checkpoint
from vitdsi_utils.training.config import TrainConfig, seed_everything
from vitdsi_utils.training.history import History
from vitdsi_utils.training.loop import fit
from vitdsi_utils.training.reuse import REUSE_HINT, finished_verdict, weights_digest
from vitdsi_utils.training.tasks import IndexingTask


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
def _cached(
    path: Path | None, codec: IDCodec, config: DSIConfig, data: dict, train: TrainConfig, mix_ratio: float | None = None
):
    """The model saved at ``path`` when it was trained for these settings (None when there is none);
    CheckpointError naming every difference otherwise (the rules of :mod:`vitdsi_utils.training.reuse`;
    these runs keep no checkpoint to continue from, so a capped run is not extended)."""
    if path is None or not path.exists():
        return None
    model, _, meta = load_model(
        path, map_location=resolve_device(train.device), expect_config=config, expect_codec=codec, expect_data=data
    )
    extra = meta["extra"]
    found = finished_verdict(
        meta.get("train_config"), train, epochs_run=int(meta["epoch"]), reached=extra.get("reached_target")
    ).differences
    if extra.get("mix_ratio", mix_ratio) != mix_ratio:
        found.append(f"mix_ratio: saved {extra.get('mix_ratio')!r}, requested {mix_ratio!r}")
    if found:
        raise CheckpointError(
            f"{path} was trained with other settings: " + "; ".join(found) + ". " + REUSE_HINT.format(files=path)
        )
    return model, meta["history"], float(extra.get("seconds", 0.0)), int(meta["epoch"])


def _train(
    name: str,
    model: DSIModel,
    codec: IDCodec,
    tasks: list,
    *,
    config: TrainConfig,
    path: Path | None,
    data: dict,
    mix_ratio: float | None = None,
    val: list | None = None,
) -> tuple[DSIModel, History, float, int]:
    """Train (or load from ``path``) ``model`` on ``tasks`` until the "indexing" task reaches the target."""
    cached = _cached(path, codec, model.config, data, config, mix_ratio)
    if cached is not None:
        return cached
    start = time.perf_counter()
    history = fit(model, codec, tasks, val=val, config=config, mix_ratio=mix_ratio, stop_on="indexing", phase=name)
    seconds = time.perf_counter() - start
    epochs = int(history.to_frame()["epoch"].max()) if len(history) else 0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            path,
            model,
            None,
            model.config,
            config,
            epochs,
            history,
            codec,
            extra={"seconds": seconds, "data": data, "reached_target": history.reached_target, "mix_ratio": mix_ratio},
        )
    return model, history, seconds, epochs


def incremental_study(
    db: Database,
    *,
    index_config: TrainConfig,
    finetune_epochs: int = 60,
    replay_ratios: Sequence[float] = (0.0, 1.0, 4.0),
    new_fraction: float = 0.2,
    capacity: int | None = None,
    model_overrides: dict | None = None,
    beam_size: int = 100,
    out_dir: str | Path | None = None,
    runs_dir: str | Path | None = None,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, Figure]:
    """Initial indexing, then each fine-tuning strategy and a retraining from scratch; (results, curves, figure).

    ``index_config`` trains the initial model and the one from scratch (until IA@1 of their images
    reaches its target, at most its epochs); fine-tuning uses the same settings with at most
    ``finetune_epochs`` epochs, stopping once the *new* images reach the target, and no warm-up.
    With ``out_dir`` the tables (``incremental.csv/.md``, ``incremental_curves.csv``) and the figure
    (``incremental.png``) are written; with ``runs_dir`` finished models are saved and reused when they
    were trained for these settings (the fine-tuned ones from this initial model), and refused with
    every difference named otherwise. The run folder is locked meanwhile (:mod:`vitdsi_utils.locks`).
    """
    lock = nullcontext() if runs_dir is None else run_folder_lock(Path(runs_dir) / run_name(db, study="incremental"))
    with lock:
        return _incremental_study(
            db,
            index_config=index_config,
            finetune_epochs=finetune_epochs,
            replay_ratios=replay_ratios,
            new_fraction=new_fraction,
            capacity=capacity,
            model_overrides=model_overrides,
            beam_size=beam_size,
            out_dir=out_dir,
            runs_dir=runs_dir,
            seed=seed,
        )


def _incremental_study(
    db: Database,
    *,
    index_config: TrainConfig,
    finetune_epochs: int,
    replay_ratios: Sequence[float],
    new_fraction: float,
    capacity: int | None,
    model_overrides: dict | None,
    beam_size: int,
    out_dir: str | Path | None,
    runs_dir: str | Path | None,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame, Figure]:
    old_rows, new_rows = split_new(db.n_index, new_fraction, seed)
    index_images = torch.from_numpy(db.split("index")[0])
    old_images, new_images = index_images[old_rows], index_images[new_rows]
    n_old, n_new = len(old_rows), len(new_rows)
    old_codec, codec = incremental_codecs(n_old, n_new, capacity)
    overrides = {**(model_overrides or {}), "image_size": db.settings["size"]}
    config = DSIConfig.from_codec(codec, **overrides)
    fingerprint = {**db.fingerprint(), "new_fraction": new_fraction, "split_seed": seed}
    run = Path(runs_dir) / run_name(db, study="incremental") if runs_dir is not None else None

    def path(stem: str) -> Path | None:
        return run / f"{stem}.pt" if run is not None else None

    rows, curves = [], []
    all_images = torch.cat([old_images, new_images])

    def record(
        strategy: str,
        model: DSIModel,
        seconds: float,
        epochs: int,
        ratio: float | None,
        per_epoch: int,
        with_new: bool = True,
    ) -> None:
        ia_old = indexing_accuracy(model, codec if with_new else old_codec, old_images, beam_size=beam_size)
        ia_new = (
            indexing_accuracy(model, codec, new_images, torch.arange(n_old, n_old + n_new), beam_size=beam_size)
            if with_new
            else np.nan
        )
        rows.append(
            {
                "strategy": strategy,
                "replay_ratio": ratio,
                "IA@1 old": ia_old,
                "IA@1 new": ia_new,
                "IA@1 all": (ia_old * n_old + ia_new * n_new) / (n_old + n_new) if with_new else np.nan,
                "epochs": epochs,
                "seconds": seconds,
                "examples_per_epoch": per_epoch,
                "n_old": n_old,
                "n_new": n_new,
            }
        )

    # 1. the initial model: old images, old IDs
    seed_everything(index_config.seed)
    initial = DSIModel(config)
    initial, _, seconds, epochs = _train(
        "indexing",
        initial,
        old_codec,
        [IndexingTask(old_images)],
        config=index_config,
        path=path("initial"),
        data=fingerprint,
    )
    record(INITIAL, initial, seconds, epochs, None, n_old, with_new=False)

    # 2. fine-tuning, with each replay ratio
    tune_config = TrainConfig.from_dict({**index_config.to_dict(), "epochs": finetune_epochs, "warmup_steps": 0})
    val = [("old", old_images, torch.arange(n_old)), ("new", new_images, torch.arange(n_old, n_old + n_new))]
    tuned_from = {**fingerprint, "parent": weights_digest(initial)}  # a changed initial model refuses them
    for ratio in replay_ratios:
        tasks, mix = finetune_tasks(old_images, new_images, ratio)
        name = finetune_name(ratio)
        model, history, seconds, epochs = _train(
            f"finetune-replay{ratio:g}",
            copy.deepcopy(initial),
            codec,
            tasks,
            config=tune_config,
            path=path(f"finetune-replay{ratio:g}"),
            data=tuned_from,
            mix_ratio=mix,
            val=val,
        )
        record(name, model, seconds, epochs, ratio, n_new + replay_count(n_new, ratio))
        frame = history.to_frame()
        frame = frame[(frame["split"] == "val") & frame["task"].isin(["old", "new"])]
        curves.append(frame.assign(strategy=name, replay_ratio=ratio))

    # 3. retraining from scratch on every image
    seed_everything(index_config.seed)
    scratch = DSIModel(config)
    scratch, _, seconds, epochs = _train(
        "indexing",
        scratch,
        codec,
        [IndexingTask(all_images)],
        config=index_config,
        path=path("scratch"),
        data=fingerprint,
    )
    record(SCRATCH, scratch, seconds, epochs, None, n_old + n_new)

    results = pd.DataFrame(rows).assign(n=db.settings["n"], size=db.settings["size"], ids=db.settings["id_scheme"])
    curves_frame = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    dataset = db.settings.get("dataset") or db.settings["source"]
    fig = incremental_figure(
        results,
        curves_frame,
        title=f"{dataset} at {db.settings['size']} px: "
        f"{n_old} images, then {n_new} new ({db.settings['id_scheme']} IDs)",
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"incremental_N{db.settings['n']}_{db.settings['id_scheme']}"
        write_table(results, out / stem, markdown=incremental_markdown(results, index_config, finetune_epochs))
        write_csv(curves_frame, out / f"{stem}_curves.csv")
        save_figure(fig, out / f"{stem}.png")
    return results, curves_frame, fig


# ------------------------------------------------------------------------------------------
# The study as a spec
# ------------------------------------------------------------------------------------------
@dataclass
class IncrementalSpec(ImageSourceSpec):
    """Settings of the incremental-indexing study (recipe ``study: incremental``), one database per N.

    ``index`` trains the initial model and the one retrained from scratch; fine-tuning takes the same
    settings with at most ``finetune_epochs`` epochs and no warm-up, once per replay ratio.
    """

    size: int = field(default=64, metadata={"choices": SIZES})
    ns: tuple[int, ...] = (1024,)
    seed: int = 0  # the database draw
    ids: str = field(default="random", metadata={"choices": ID_SCHEMES})
    new_fraction: float = 0.2  # share of the indexed images added later
    replay_ratios: tuple[float, ...] = (0.0, 1.0, 4.0)  # old images replayed per new image and epoch
    finetune_epochs: int = 40
    k: int = 100  # beam width of IA@1
    model: ModelSpec = field(default_factory=full_model)
    index: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=200, lr=1e-3, warmup_steps=100, target_accuracy=0.99)
    )

    #: notebook profile keys (12_incremental) -> spec keys
    PROFILE_KEYS = {
        **ImageSourceSpec.PROFILE_KEYS,
        "SIZE": "size",
        "INC_N": "ns",
        "SEEDS": ("seed[0]", "index.seed[0]"),
        "INC_NEW_FRACTION": "new_fraction",
        "INC_REPLAY_RATIOS": "replay_ratios",
        "INC_FINETUNE_EPOCHS": "finetune_epochs",
        **ModelSpec.PROFILE_KEYS,
        "LR": "index.lr",
        "BATCH_SIZE": "index.batch_size",
        "WARMUP_STEPS": "index.warmup_steps",
        "INDEX_EPOCHS": "index.epochs",
        "TARGET_ACCURACY": "index.target_accuracy",
        "K": "k",
    }

    def __post_init__(self) -> None:
        check_choices(self)
        no_pooling(self)


class IncrementalResult(NamedTuple):
    """What a notebook profile's :func:`run` returns: one row per strategy, the forgetting curves, the figure."""

    results: pd.DataFrame
    curves: pd.DataFrame
    figure: Figure
    markdown: str


def run(
    spec: IncrementalSpec, paths: StudyPaths
) -> list[tuple[pd.DataFrame, pd.DataFrame, Figure]] | IncrementalResult:
    """The study of ``spec`` for every N: tables and figures to ``paths.out``, models to ``paths.runs``.

    With a notebook profile's paths (:meth:`StudyPaths.create`, notebook 12) it is that profile's study,
    one database: see :func:`_profile_study`.
    """
    if paths.profile is not None:
        return _profile_study(spec, paths)
    refuse_profile_only(spec)
    image_set = load_images(spec.source, spec.size, root=spec.root, annotations=spec.annotations)
    results = []
    for n in spec.ns:
        db = build_database(image_set, n, id_scheme=spec.ids, seed=spec.seed)
        results.append(
            incremental_study(
                db,
                index_config=spec.index,
                finetune_epochs=spec.finetune_epochs,
                replay_ratios=spec.replay_ratios,
                new_fraction=spec.new_fraction,
                model_overrides=spec.model.overrides(),
                beam_size=spec.k,
                out_dir=paths.out,
                runs_dir=paths.runs,
            )
        )
    return results


def _profile_study(spec: IncrementalSpec, paths: StudyPaths) -> IncrementalResult:
    """Notebook 12: the study of one database (its one N) into the profile's report and run folders.

    The database is drawn with ``spec.seed``, which also splits off the new images; training shows no
    progress bars. Models go to ``paths.runs`` (reused when trained for these settings); writes
    ``tables/incremental`` (CSV and Markdown), ``tables/incremental_curves.csv`` and ``figures/incremental.png``.
    """
    if len(spec.ns) != 1:
        raise SpecError(f"ns: a notebook profile's incremental study runs one database (INC_N), got {list(spec.ns)}")
    image_set = spec_images(spec)
    db = build_database(image_set, spec.ns[0], id_scheme=spec.ids, seed=spec.seed)
    config = replace(spec.index, progress=False)
    # whole ratios as the profile's integers (the spec holds floats): the curves table writes 1, not 1.0
    ratios = [int(r) if float(r).is_integer() else r for r in spec.replay_ratios]
    results, curves, figure = incremental_study(
        db,
        index_config=config,
        finetune_epochs=spec.finetune_epochs,
        replay_ratios=ratios,
        new_fraction=spec.new_fraction,
        model_overrides=spec.model.overrides(),
        beam_size=spec.k,
        runs_dir=paths.runs,
        seed=spec.seed,
    )
    markdown = incremental_markdown(results, config, spec.finetune_epochs)
    write_table(results, paths.tables / "incremental", markdown=markdown)
    write_csv(curves, paths.tables / "incremental_curves.csv")
    save_figure(figure, paths.figures / "incremental.png")
    return IncrementalResult(results, curves, figure, markdown)


def console_summary(spec: IncrementalSpec, result: list[tuple[pd.DataFrame, Any, Any]]) -> str:
    """Each database's results table."""
    return "\n".join(results.round(3).to_string(index=False) for results, _, _ in result)
