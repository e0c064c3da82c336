"""The indexing phase of a profile's DSI study (notebook 03): every database of the grid memorised.

:func:`run` trains (or loads) one zero-shot model per database of a :class:`~vitdsi_utils.studies.dsi.DSISpec`
into the profile's run folders, measures its indexing accuracy IA@1, and writes the runs table, the
training histories and Figure 1 into the profile's report. Notebook 04 fine-tunes these models.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from vitdsi_utils import metrics, settings
from vitdsi_utils.data.database import databases
from vitdsi_utils.ids.schemes import codec_for
from vitdsi_utils.model.decoding import beam_search
from vitdsi_utils.phases import index_database
from vitdsi_utils.reports.plots import save_figure, training_curves
from vitdsi_utils.reports.tables import write_csv, write_table
from vitdsi_utils.runs import StudyPaths, run_name
from vitdsi_utils.studies.dsi import DSISpec
from vitdsi_utils.studies.specs import require_profile, spec_images
from vitdsi_utils.training.config import seed_everything


class IndexingResult(NamedTuple):
    """What :func:`run` returns: one row per database (``runs``), the per-epoch histories, and Figure 1."""

    runs: pd.DataFrame
    histories: pd.DataFrame
    figures: dict[str, Figure]


def run(spec: DSISpec, paths: StudyPaths) -> IndexingResult:
    """Index every database of ``spec`` into ``paths.run_dir(db)``; one printed line per database.

    Each model starts from torch's global generator seeded with its database's seed, so a rerun
    draws the same initial weights. A model already in its run folder is loaded when it was trained
    with these settings (:func:`~vitdsi_utils.phases.index_database` refuses, or continues, one that
    was not). Writes ``tables/indexing_runs`` (CSV and Markdown; the demo finds the run folders
    there), ``tables/histories_indexing.csv`` and ``figures/figure1_indexing.png``.
    """
    require_profile(paths, "03_indexing")
    image_set = spec_images(spec)
    overrides = spec.model.overrides()
    rows, histories = [], []
    for db in databases(image_set, spec.ns, spec.schemes, spec.seeds):
        n, scheme, seed = db.settings["n"], db.settings["id_scheme"], db.settings["seed"]
        run_dir = paths.run_dir(db)
        seed_everything(seed)  # the new model's initial weights come from torch's global generator
        config = replace(spec.index, seed=seed, progress=False)
        zero = index_database(db, model_overrides=overrides, config=config, run_dir=run_dir)
        codec = codec_for(db)  # the database's dense IDs, as the model was indexed with
        _, own = beam_search(zero.model, torch.from_numpy(db.split("index")[0]), codec, k=5)  # as notebook 05 does
        ia = metrics.evaluate_indexing(own.numpy(), np.arange(db.n_index), ks=(1,), n_db=len(codec)).iloc[0]
        # the accuracy the stopping rule saw: eval mode (no dropout) when it was checked, else the running one
        train_acc = (zero.history.last("train_eval") or zero.history.last("train"))["seq_acc"]
        rows.append(
            dict(
                run=run_name(db),
                n=n,
                ids=scheme,
                seed=seed,
                epochs=zero.epochs,
                epoch_cap=zero.epoch_cap,
                reached_target=zero.reached_target,
                seconds=zero.seconds,
                train_seq_acc=train_acc,
                ia1=ia.value,
                ia1_low=ia.ci_low,
                ia1_high=ia.ci_high,
                loaded=zero.loaded,
                run_dir=settings.portable_path(run_dir),
            )
        )
        histories.append(zero.history.to_frame().assign(n=n, ids=scheme, seed=seed))
        print(
            f"N={n} {scheme:9s} seed {seed}: {zero.epochs} epochs, {zero.seconds:.0f} s, train acc {train_acc:.3f}, "
            f"IA@1 {ia.value:.3f} [{ia.ci_low:.3f}, {ia.ci_high:.3f}]" + (" (loaded)" if zero.loaded else "")
        )
    runs = pd.DataFrame(rows)
    history_frame = pd.concat(histories, ignore_index=True)
    write_table(runs, paths.tables / "indexing_runs")
    write_csv(history_frame, paths.tables / "histories_indexing.csv")
    figure = training_curves(
        history_frame, phase="indexing", split="train", metrics=("loss", "seq_acc"), title="Figure 1: indexing (train)"
    )
    save_figure(figure, paths.figures / "figure1_indexing.png")
    return IndexingResult(runs, history_frame, {"figure1_indexing": figure})


def summary_line(spec: DSISpec, runs: pd.DataFrame) -> str:
    """How many databases reached the target accuracy within their epoch cap, and the range of IA@1.

    The cap is each model's own (a reused model may have been trained under another one).
    """
    target = spec.index.target_accuracy
    reached = runs["train_seq_acc"] >= target if target is not None else pd.Series(False, index=runs.index)
    caps = sorted({int(c) for c in runs["epoch_cap"].dropna()}) or [spec.index.epochs]
    return (
        f"{int(reached.sum())} of {len(runs)} runs reached the target train accuracy {target} within "
        f"{' / '.join(map(str, caps))} epochs; zero-shot IA@1 ranges {runs['ia1'].min():.3f}-{runs['ia1'].max():.3f}."
    )
