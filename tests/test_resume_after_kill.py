"""A training process killed with SIGKILL mid-epoch resumes from its checkpoint and ends exactly like an unbroken run.

The test starts the indexing phase of a tiny experiment in a child process (this file, run as
a script), waits until the child is in the middle of the epoch after a checkpoint, kills it
with SIGKILL (no Python cleanup runs), then runs the whole experiment again in the same run
folder and compares weights, histories and the metric table with an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

from vitdsi_utils.data.database import Database, build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.phases import index_database
from vitdsi_utils.studies.dsi import run_experiment
from vitdsi_utils.training import loop
from vitdsi_utils.training.checkpoint import load_checkpoint
from vitdsi_utils.training.config import TrainConfig

TINY = dict(patch_size=16, dim=32, mlp_dim=64, depth=1, heads=2, dropout=0.1)
KILL_AFTER_EPOCH = 2  # the child hangs in the epoch after this checkpoint, and is killed there
TIMING_COLUMNS = ["indexing_eval_s", "search_s", "search_ms_per_query", "train_s"]


def small_database() -> Database:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_database(load_images("digits", 32, progress=False), 80, id_scheme="random", seed=0)


def index_config() -> TrainConfig:
    # 20 indexed images in batches of 8: three steps per epoch; never stops early
    return TrainConfig(epochs=5, batch_size=8, lr=2e-3, target_accuracy=None, seed=0, device="cpu", progress=False)


def retrieval_config() -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=16, lr=1e-3, seed=0, device="cpu", progress=False)


def child(run_dir: Path, marker: Path) -> None:
    """Index the small database in ``run_dir``; hang in the middle of epoch KILL_AFTER_EPOCH + 1."""
    torch.set_num_threads(1)
    saved = {"epoch": 0}
    steps_after = {"n": 0}
    real_save, real_losses = loop.save_checkpoint, loop.token_losses

    def save(*args, **kwargs):
        path = real_save(*args, **kwargs)
        saved["epoch"] = args[5]
        return path

    def losses(*args, **kwargs):  # called once per training step
        if saved["epoch"] >= KILL_AFTER_EPOCH:
            steps_after["n"] += 1
            if steps_after["n"] == 2:  # one optimiser step of the next epoch is done, two remain
                marker.write_text("mid-epoch\n")
                time.sleep(300)  # wait here for the SIGKILL
        return real_losses(*args, **kwargs)

    loop.save_checkpoint, loop.token_losses = save, losses  # where fit() looks them up
    index_database(small_database(), model_overrides=TINY, config=index_config(), run_dir=run_dir)
    raise SystemExit("the child finished training: it was never killed")


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, one_torch_thread, monkeypatch):
    run_dir, marker = tmp_path / "killed", tmp_path / "mid-epoch"
    # the child runs this file as a script; it finds the package of this checkout through PYTHONPATH
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = (tmp_path / "child.log").open("w")
    process = subprocess.Popen([sys.executable, __file__, str(run_dir), str(marker)], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert process.poll() is None, f"the child exited early:\n{(tmp_path / 'child.log').read_text()}"
            assert time.monotonic() < deadline, "the child never reached the middle of an epoch"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()

    # what the killed run left: its last checkpoint, whole, and nothing half-written; beside it the run
    # folder's lock file and the note naming its holder, which the kill could not remove
    assert load_checkpoint(run_dir / "indexing.ckpt")["epoch"] == KILL_AFTER_EPOCH
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", ".lock.owner.json", "indexing.ckpt"]

    db = small_database()
    kwargs = dict(model_overrides=TINY, index_config=index_config(), retrieval_config=retrieval_config(), k=10)
    # the dead process holds no lock: the folder is taken at once, without waiting
    monkeypatch.setenv("VITDSI_LOCK_TIMEOUT", "0")
    resumed = run_experiment(db, run_dir=run_dir, **kwargs)
    straight = run_experiment(db, run_dir=tmp_path / "unbroken", **kwargs)

    for phase in ("zero_shot", "fine_tuned"):
        a, b = getattr(resumed, phase), getattr(straight, phase)
        for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
            assert torch.equal(x, y), f"{phase}: {name} differs"
        history_a, history_b = (h.to_frame().drop(columns="seconds") for h in (a.history, b.history))
        pd.testing.assert_frame_equal(history_a, history_b)
    assert resumed.zero_shot.epochs == straight.zero_shot.epochs == index_config().epochs
    pd.testing.assert_frame_equal(
        resumed.table.drop(columns=TIMING_COLUMNS), straight.table.drop(columns=TIMING_COLUMNS)
    )


if __name__ == "__main__":
    child(Path(sys.argv[1]), Path(sys.argv[2]))
