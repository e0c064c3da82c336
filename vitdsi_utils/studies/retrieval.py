"""The retrieval phase of a profile's DSI study (notebook 04): each zero-shot model fine-tuned on queries.

:func:`run` copies each database's zero-shot model (notebook 03's; indexed here first when its run
folder lacks it) and trains it on (query image, relevant ID) pairs, then writes the histories and
Figures 2 and 3 into the profile's report.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import pandas as pd
from matplotlib.figure import Figure

from vitdsi_utils.data.database import databases
from vitdsi_utils.phases import fine_tune, index_database
from vitdsi_utils.reports.plots import save_figure, training_curves
from vitdsi_utils.reports.tables import write_csv
from vitdsi_utils.runs import ZERO_SHOT_FILE, StudyPaths
from vitdsi_utils.studies.dsi import DSISpec
from vitdsi_utils.studies.specs import SpecError, require_profile, spec_images
from vitdsi_utils.training.config import seed_everything


class RetrievalResult(NamedTuple):
    """What :func:`run` returns: the per-epoch histories (train and val splits) and Figures 2 and 3."""

    histories: pd.DataFrame
    figures: dict[str, Figure]


def run(spec: DSISpec, paths: StudyPaths) -> RetrievalResult:
    """Fine-tune the zero-shot model of every database of ``spec``; one printed line per database.

    ``spec.fine_tune`` is the training (its seed is each database's); ``spec.max_pairs_per_query``
    caps each query's pairs. A fine-tuned model already in the run folder is loaded when it was
    trained with these settings from this zero-shot model. Writes ``tables/histories_retrieval.csv``
    and ``figures/figure2_retrieval_train.png`` / ``figure3_retrieval_val.png``.
    """
    require_profile(paths, "04_retrieval")
    if spec.fine_tune is None:
        raise SpecError("fine_tune: notebook 04 fine-tunes the zero-shot models; set its epochs (RETRIEVAL_EPOCHS)")
    image_set = spec_images(spec)
    overrides = spec.model.overrides()
    histories = []
    for db in databases(image_set, spec.ns, spec.schemes, spec.seeds):
        n, scheme, seed = db.settings["n"], db.settings["id_scheme"], db.settings["seed"]
        run_dir = paths.run_dir(db)
        if not (run_dir / ZERO_SHOT_FILE).exists():
            print(f"N={n} {scheme} seed {seed}: no zero-shot model from 03_indexing in {run_dir}; training it now")
            seed_everything(seed)
        index_config = replace(spec.index, seed=seed, progress=False)
        zero = index_database(db, model_overrides=overrides, config=index_config, run_dir=run_dir)
        tuned = fine_tune(
            db,
            zero.model,
            config=replace(spec.fine_tune, seed=seed, progress=False),
            run_dir=run_dir,
            max_pairs_per_query=spec.max_pairs_per_query,
        )
        history = tuned.history.to_frame().assign(n=n, ids=scheme, seed=seed)
        histories.append(history)
        last = history[history["epoch"] == history["epoch"].max()].set_index("split")
        val = f", val {last.at['val', 'loss']:.3f}" if "val" in last.index else ""
        print(
            f"N={n} {scheme:9s} seed {seed}: {tuned.epochs} epochs, {tuned.seconds:.0f} s; last epoch loss "
            f"train {last.at['train', 'loss']:.3f}{val}" + (" (loaded)" if tuned.loaded else "")
        )
    history_frame = pd.concat(histories, ignore_index=True)
    write_csv(history_frame, paths.tables / "histories_retrieval.csv")
    figures = {
        "figure2_retrieval_train": training_curves(
            history_frame, phase="retrieval", split="train", title="Figure 2: retrieval (train)"
        ),
        "figure3_retrieval_val": training_curves(
            history_frame, phase="retrieval", split="val", title="Figure 3: retrieval (validation)"
        ),
    }
    for stem, figure in figures.items():
        save_figure(figure, paths.figures / f"{stem}.png")
    return RetrievalResult(history_frame, figures)
