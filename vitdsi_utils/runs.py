"""Run folders: where a trained model of a database lives, what its files are called, and loading it back.

One run folder per database (``<runs>/<run name>/``) holds its trained DSI models (``zero_shot.pt``,
``fine_tuned.pt``, ``multitask.pt``) and their histories. This module is the one place that names them,
and the one that saves a training phase's final model there (:func:`save_phase`, with the settings and
data it was trained on) and loads it back checked against them (:func:`load_phase`, a :class:`PhaseResult`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitdsi_utils import settings
from vitdsi_utils.data.database import Database
from vitdsi_utils.devices import resolve_device
from vitdsi_utils.ids.codec import IDCodec
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.reports.tables import FINE_TUNED, ZERO_SHOT
from vitdsi_utils.settings import resolve_portable
from vitdsi_utils.training.checkpoint import load_checkpoint, load_model, save_checkpoint
from vitdsi_utils.training.config import TrainConfig
from vitdsi_utils.training.history import History

#: The files of a run folder: the indexed (zero-shot) model and the checkpoint of its training ...
ZERO_SHOT_FILE, INDEXING_CHECKPOINT = "zero_shot.pt", "indexing.ckpt"
#: ... the models trained from it (plain fine-tuning, multi-task), each beside its own checkpoints ...
FINE_TUNED_FILE, MULTITASK_FILE = "fine_tuned.pt", "multitask.pt"
#: ... and the encoders of the baselines kept in the same folder (dense search, self-supervised pretraining).
DENSE_FILE, SSL_FILE = "dense.pt", "ssl.pt"

#: The DSI models of a run folder that the tables report, by their row name in the tables.
DSI_MODEL_FILES = ((ZERO_SHOT, ZERO_SHOT_FILE), (FINE_TUNED, FINE_TUNED_FILE))


def phase_files(multitask: bool) -> tuple[str, str, str]:
    """(final model, training checkpoint, consolidation checkpoint) of plain fine-tuning or of multi-task training."""
    if multitask:
        return MULTITASK_FILE, "multitask.ckpt", "multitask_consolidate.ckpt"
    return FINE_TUNED_FILE, "retrieval.ckpt", "consolidate.ckpt"


#: Every file trained from the zero-shot model: it may not be retrained under them.
DESCENDANT_FILES = phase_files(False) + phase_files(True)


def find_run_dir(path: str | Path, db: Database, ids: str | None = None) -> Path | None:
    """The run folder of ``db`` (with IDs ``ids``, default its own) under ``path`` (see :meth:`QueryDemo.from_run_dir`), or None."""
    import pandas as pd

    path, name = Path(path), run_name(db, ids)
    candidates = [path, path / name]
    listing = path / "tables" / "indexing_runs.csv"
    if listing.is_file():
        runs = pd.read_csv(listing)
        candidates += [resolve_portable(p) for p in runs.loc[runs["run"] == name, "run_dir"]]
    for candidate in candidates:
        if (candidate / ZERO_SHOT_FILE).is_file() or (candidate / FINE_TUNED_FILE).is_file():
            return candidate
    return None


def _database_parts(db: Database) -> tuple[str, str, str]:
    """(data set, ``<size>px-N<n>``, ``seed<seed>``) of ``db``; ``I<n>`` for a database that indexes every image it drew."""
    s = db.settings
    count = "I" if s.get("index_fraction") == 1.0 else "N"  # index_all_database; build_database keeps queries
    return s.get("dataset") or s["source"], f"{s['size']}px-{count}{s['n']}", f"seed{s['seed']}"


def database_name(db: Database) -> str:
    """The database whatever its IDs: data set, image size, N and seed, e.g. ``imagenette-64px-N512-seed0``.

    Names what belongs to the draw of images rather than to a DSI: the dense encoder's run folder (which
    every ID scheme's DSI shares), the manifests of the databases.
    """
    return "-".join(_database_parts(db))


def run_name(db: Database, ids: str | None = None, *, study: str | None = None) -> str:
    """A folder name that identifies the database: data set, size, N, ID scheme and seed.

    The data set is its name (``ImageSet.name``: the source, or a folder's own name), so two image
    folders never share run folders. ``ids`` names the ID scheme when the codec is not the
    database's own dense one (e.g. ``IDAssignment.tag``, such as ``semantic-bovw-k10-c10``);
    default: the database's scheme. ``study`` prefixes the folder of a study that keeps its models
    apart from the DSI study's (``incremental``, ``scale``); a database that indexes every image
    it drew is ``I<n>`` rather than ``N<n>``.
    """
    dataset, size_n, seed = _database_parts(db)
    name = f"{dataset}-{size_n}-{ids or db.settings['id_scheme']}-{seed}"
    return f"{study}-{name}" if study else name


# ------------------------------------------------------------------------------------------
# A phase's final model in its run folder: saved with what made it, loaded back checked
# ------------------------------------------------------------------------------------------
def seconds_before(checkpoint: Path | None) -> float:
    """Training seconds already spent in an unfinished run's checkpoint (0 without one), so the time of a
    run resumed over several sessions counts every session, not the last one only."""
    if checkpoint is None or not checkpoint.exists():
        return 0.0

    return float(sum(row.get("seconds", 0.0) for row in load_checkpoint(checkpoint)["history"]))


@dataclass
class PhaseResult:
    """A trained model of one phase, with its history and the wall time it took."""

    model: DSIModel
    history: History
    seconds: float
    epochs: int  # the epochs it trained (all phases; for indexing, those run before the stop rule fired)
    config: dict[str, Any] = field(default_factory=dict)  # the TrainConfig it was trained with (plain values)
    # whether its stop rule fired: indexing reached the target accuracy before its epoch cap (fine-tuning:
    # consolidation did); None without a stop rule, or for a model saved before this was recorded
    reached_target: bool | None = None
    loaded: bool = False  # loaded from its run folder rather than trained (or continued) in this call

    @property
    def epoch_cap(self) -> int | None:
        """The epoch cap it was trained under (its own, which may be below the one requested of a reused model)."""
        return self.config.get("epochs")


def load_phase(
    path: Path, codec: IDCodec, config: DSIConfig, fingerprint: dict, device: str = "auto"
) -> tuple[PhaseResult, dict[str, Any]]:
    """(the finished phase at ``path`` on ``device``, its meta); CheckpointError if it was trained for another
    model, IDs or database. The callers compare its training settings. The model goes where the phase would
    have trained it (the training settings' device), so a reused model is evaluated where a fresh one is."""
    model, _, meta = load_model(
        path, map_location=resolve_device(device), expect_config=config, expect_codec=codec, expect_data=fingerprint
    )
    result = PhaseResult(
        model,
        meta["history"],
        float(meta["extra"].get("seconds", 0.0)),
        int(meta["epoch"]),
        dict(meta.get("train_config") or {}),
        loaded=True,
    )
    return result, meta


def save_phase(
    path: Path,
    model: DSIModel,
    codec: IDCodec,
    config: TrainConfig,
    history: History,
    seconds: float,
    epochs: int,
    fingerprint: dict,
    options: dict[str, Any] | None = None,
    reached: bool | None = None,
) -> None:

    extra = {
        "seconds": seconds,
        "data": fingerprint,
        "reached_target": reached,
        **({"options": options} if options is not None else {}),
    }
    save_checkpoint(path, model, None, model.config, config, epochs, history, codec, extra=extra)


# ------------------------------------------------------------------------------------------
# Helpers the notebooks share: where outputs go, the grid of databases, loading trained models
# ------------------------------------------------------------------------------------------
@dataclass
class StudyPaths:
    """Where a study's outputs go: ``out`` (its tables and figures) and ``runs`` (its trained models).

    ``profile`` names the notebook profile whose study this is (:meth:`create`). A study run from a
    notebook writes into the profile's shared report, ``out/tables/`` and ``out/figures/``, under the
    notebook's file names, keeps one folder of models per database (:meth:`run_dir`) and reads the
    tables of the notebooks before it. A recipe's run (``profile`` None) writes its own files into ``out``.
    """

    out: Path
    runs: Path
    profile: str | None = None

    @classmethod
    def create(cls, profile: str, out_dir: str | Path | None = None, runs_dir: str | Path | None = None) -> StudyPaths:
        """The notebooks' OUT_DIR / RUNS_DIR, or ``reports/<profile>`` / ``data/runs/<profile>``.

        tables/ and figures/ are created; run folders appear when a model is saved.
        """
        paths = cls(
            Path(out_dir) if out_dir else settings.reports_dir() / profile,
            Path(runs_dir) if runs_dir else settings.data_dir() / "runs" / profile,
            profile,
        )
        for folder in (paths.tables, paths.figures):
            folder.mkdir(parents=True, exist_ok=True)
        return paths

    @property
    def tables(self) -> Path:
        return self.out / "tables"

    @property
    def figures(self) -> Path:
        return self.out / "figures"

    def run_dir(self, db: Any) -> Path:
        """The folder of ``db``'s trained models (``zero_shot.pt``, ``fine_tuned.pt``)."""

        return self.runs / run_name(db)


def load_trained(
    path: str | Path, profile: str = "smoke", device: str = "auto", dataset: str | None = None
) -> tuple[Any, Any, dict]:
    """(model on ``device``, codec, meta) of a model the study trained; when missing, an error naming its notebook.

    ``dataset`` (the notebooks' DATASET) goes into the command the error suggests.
    """

    path = Path(path)
    if not path.is_file():
        notebook = "03_indexing" if path.name == ZERO_SHOT_FILE else "04_retrieval"
        raise FileNotFoundError(
            f"{path} does not exist: notebook {notebook} trains it; run "
            f"`vitdsi study --profile {profile}{f' --dataset {dataset}' if dataset else ''} --start-at {notebook}`"
        )
    return load_model(path, map_location=resolve_device(device))
