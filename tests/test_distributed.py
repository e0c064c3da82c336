"""Data-parallel training and evaluation over torch.distributed: two processes (torchrun, Gloo on the CPU) against one.

The tests start this file as a script, once in one plain process and once under
``python -m torch.distributed.run --standalone --nproc_per_node 2`` (each process one OpenMP
thread), and compare what the runs write. The functions at the bottom are that script: the DSI
(indexing with its eval-mode stop checks and validation, then multi-task training with redrawn
targets and augmented views), the dense encoder and the self-supervised encoder on the smoke
profile's digits, and the sharded searches.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vitdsi_utils import cli, distributed
from vitdsi_utils.baselines.dense import DenseConfig, DenseEncoder, DenseTrainConfig, train_dense
from vitdsi_utils.baselines.index import SHARD_QUERIES, FlatIPIndex, faiss_available
from vitdsi_utils.baselines.ssl import SSLConfig, SSLEncoder, train_ssl
from vitdsi_utils.data.database import Database, build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.ids.schemes import codec_for
from vitdsi_utils.model.decoding import beam_search
from vitdsi_utils.model.vit import DSIConfig, DSIModel, ViTConfig
from vitdsi_utils.training import loop
from vitdsi_utils.training.checkpoint import load_checkpoint
from vitdsi_utils.training.config import TrainConfig, seed_everything
from vitdsi_utils.training.tasks import AugmentedViews, IndexingTask, RetrievalPairs, SameClassTargets

HERE = Path(__file__).resolve()
TINY = dict(image_size=32, patch_size=16, dim=32, mlp_dim=64, depth=1, heads=2)
#: Weights of a 2-process run differ from a 1-process run by float summation order only (DDP adds
#: two half-batch gradients, matrix products run on half batches). Measured, the key biases aside:
#: 2.4e-7 after the DSI's 16 indexing steps, 7.1e-6 after 12 more multi-task steps (Adam divides each
#: step by the gradient's own size, so where a gradient is nearly zero rounding becomes a visible
#: step), 1.5e-6 for the dense encoder and 1.0e-7 for the self-supervised one.
WEIGHT_TOLERANCE = 5e-5
RESUME_EPOCHS, KILL_AFTER_EPOCH, STEPS_PER_EPOCH = 5, 2, 4  # 50 indexed images in batches of 16


# ------------------------------------------------------------------------------------------
# Launching the script
# ------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    # the script finds the package of this checkout through PYTHONPATH; one thread per process
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}


def _command(processes: int, *args: str) -> list[str]:
    """This script with ``args``, in ``processes`` processes under torchrun (``-m`` ... runs a module instead)."""
    target = list(args) if args[0] == "-m" else [str(HERE), *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*launcher, *target]


def _run(processes: int, *args: str, timeout: float = 150) -> None:
    done = subprocess.run(_command(processes, *args), env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{processes} process(es) failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def _rows(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest weight difference, leaving out the key biases of attention.

    A key bias adds ``q . b`` to every score of a query, which softmax takes back out: its
    gradient is zero in exact arithmetic and rounding noise in floats, and Adam, which divides a
    step by the gradient's own size, turns that noise into steps of the learning rate's size.
    So these biases wander in either run (up to about 1e-3 here) without changing any output.
    """
    assert a.keys() == b.keys()
    worst = 0.0
    for name in a:
        x, y = a[name].double(), b[name].double()
        if name.endswith("in_proj_bias"):  # (query, key, value) biases: drop the key third
            third = len(x) // 3
            x, y = torch.cat([x[:third], x[2 * third :]]), torch.cat([y[:third], y[2 * third :]])
        worst = max(worst, float((x - y).abs().max()))
    return worst


def _assert_histories_close(one: list[dict], two: list[dict], tolerance: float = 1e-5) -> None:
    """The same rows (epochs, splits, tasks, counts, accuracies) and the same values up to ``tolerance``."""
    assert len(one) == len(two)
    for a, b in zip(_rows(one), _rows(two)):
        assert a.keys() == b.keys(), (a, b)
        for key in a:
            if isinstance(a[key], float):
                assert abs(a[key] - b[key]) <= tolerance, (key, a, b)
            else:
                assert a[key] == b[key], (key, a, b)


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------
def test_shares_cover_every_item_once_in_rank_order():
    for n in (0, 1, 5, 16, 17, 100, 4097):
        for world in (1, 2, 3, 8):
            slices = [distributed.shard_slice(n, for_rank=r, world=world) for r in range(world)]
            assert [i for s in slices for i in range(n)[s]] == list(range(n))
            assert max(s.stop - s.start for s in slices) - min(s.stop - s.start for s in slices) <= 1
            for block in (1, 4, 64):
                ranges = [distributed.shard_range(n, block, for_rank=r, world=world) for r in range(world)]
                assert [i for share in ranges for i in share] == list(range(n))
                for share in ranges:  # whole blocks, except the tail that ends the last full block's share
                    assert not share or share.start % block == 0 and (share.stop % block == 0 or share.stop == n)
                    assert len(share) == 0 or len(share) >= min(block, n)


def test_without_a_group_every_helper_is_the_single_process_answer():
    tensor = torch.arange(6.0).view(3, 2)
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_reduce_sum(tensor) is tensor and distributed.gather_rows(tensor) is tensor
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.min_over_ranks(7) == 7
    assert distributed.shard_slice(10) == slice(0, 10) and distributed.shard_range(10, 4) == range(0, 10)
    assert distributed.on_main(lambda x: x + 1, 1) == 2 and distributed.data_parallel(torch.nn.Linear(1, 1))
    assert distributed.init_distributed("cpu") == torch.device("cpu") and not distributed.active()
    seeds = {distributed.epoch_seed(0, e, r) for e in range(3) for r in range(2)}
    assert len(seeds) == 6 and distributed.epoch_seed(0, 1, 1) == distributed.epoch_seed(0, 1, 1)


@pytest.mark.slow
def test_two_processes_train_and_search_like_one(tmp_path, one_torch_thread):
    """Two processes on shards of the same global batches (dropout 0) end where one process ends.

    What may differ is float summation order only: DDP sums the two shards' gradients instead
    of one batch's, the loss sums are added up across processes, and the matrix products run
    on half batches. So weights agree to ``WEIGHT_TOLERANCE`` (attention key biases aside, see
    :func:`_max_difference`) and histories to 1e-5 (the same epochs, counts and accuracies). With dropout > 0 the runs would part ways by design: one
    process draws one dropout mask per batch from one stream, two processes draw theirs from
    a stream per rank and epoch, so the masks, and every step after, differ.
    """
    (tmp_path / "one").mkdir()
    compare(tmp_path / "one")  # one process: this one
    _run(2, "compare", str(tmp_path / "two"))
    one, two = torch.load(tmp_path / "one" / "result.pt"), torch.load(tmp_path / "two" / "result.pt")
    for part in ("index", "multitask", "dense", "ssl"):
        difference = _max_difference(one[part]["weights"], two[part]["weights"])
        assert difference < WEIGHT_TOLERANCE, f"{part}: weights differ by {difference:.2e}"
        _assert_histories_close(one[part]["history"], two[part]["history"])
    index_rows = _rows(two["index"]["history"])
    assert {"train", "train_eval", "val"} <= {row["split"] for row in index_rows}  # every eval-mode path ran
    assert any("ia1" in row for row in index_rows)  # the beam-search stop check ran
    # every rank holds the same weights, and its sharded searches returned what one process computes
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["digests"] == ranks[1]["digests"]
    for report in ranks:
        assert report["world"] == 2 and all(report["equal"].values()), report["equal"]
        assert report["faiss_score_difference"] < 1e-5


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_with_two_or_one(tmp_path, one_torch_thread):
    """SIGKILL a 2-process indexing run (dropout 0.1) in the epoch after its second checkpoint, then resume.

    Resumed with 2 processes it ends bit for bit where an uninterrupted 2-process run ends:
    the generator comes back from the checkpoint and each rank's dropout stream is derived
    from (seed, epoch, rank). Resumed with 1 process it finishes the remaining epochs (one
    process then draws dropout from the checkpoint's torch RNG, so its weights differ).
    """
    killed, marker = tmp_path / "killed", tmp_path / "mid-epoch"
    process = subprocess.Popen(
        _command(2, "hang", str(killed), str(KILL_AFTER_EPOCH), str(marker)),
        env=_env(),
        stdout=(tmp_path / "killed.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            log = (tmp_path / "killed.log").read_text()
            assert process.poll() is None, f"the 2-process run exited early:\n{log[-4000:]}"
            assert time.monotonic() < deadline, f"the 2-process run never reached the middle of an epoch:\n{log}"
            time.sleep(0.1)
    finally:
        # torchrun starts each worker in a session of its own: kill the launcher and every worker
        pids = [process.pid] + [int(p.read_text()) for p in sorted((killed / "pids").glob("rank*"))]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=30)
    assert load_checkpoint(killed / "indexing.ckpt")["epoch"] == KILL_AFTER_EPOCH
    shutil.copytree(killed, tmp_path / "killed-copy")

    _run(2, "index", str(tmp_path / "straight"), str(killed))  # an unbroken run, then the 2 -> 2 resume
    index([tmp_path / "killed-copy"])  # the 2 -> 1 resume: this process
    straight, resumed = torch.load(tmp_path / "straight" / "result.pt"), torch.load(killed / "result.pt")
    alone = torch.load(tmp_path / "killed-copy" / "result.pt")
    for name, weight in straight["weights"].items():
        assert torch.equal(weight, resumed["weights"][name]), f"{name} differs after the 2 -> 2 resume"
    assert _rows(resumed["history"]) == _rows(straight["history"])
    assert [row["epoch"] for row in alone["history"]] == list(range(1, RESUME_EPOCHS + 1))
    # the epochs before the kill are the checkpoint's, whoever resumed
    assert _rows(alone["history"])[:KILL_AFTER_EPOCH] == _rows(straight["history"])[:KILL_AFTER_EPOCH]


#: A profile whose one cell trains in seconds: 20 indexed digits, 3 indexing epochs, 1 fine-tuning epoch.
TINY_PROFILE = """
DATASET: digits
SIZE: 32
NS: [80]
ID_SCHEMES: [clustered]
SEEDS: [0]
PATCH_SIZE: 16
DIM: 32
MLP_DIM: 64
DEPTH: 1
HEADS: 2
DROPOUT: 0.1
LR: 0.002
BATCH_SIZE: 8
INDEX_EPOCHS: 3
TARGET_ACCURACY: 0.99
RETRIEVAL_EPOCHS: 1
MAX_PAIRS_PER_QUERY: 2
K: 10
"""


@pytest.mark.slow
def test_the_train_command_runs_under_torchrun_and_one_process_scores_its_models_alike(tmp_path, one_torch_thread):
    """``torchrun ... -m vitdsi_utils train`` trains and scores one cell; ``vitdsi train`` in one process then
    finds both models finished in the run folder, loads them and scores them exactly as the two processes
    did (their sharded beam searches return what one process computes)."""
    profile, run_dir = tmp_path / "tiny.yaml", tmp_path / "cell"
    profile.write_text(TINY_PROFILE)
    args = ["train", "--profile", str(profile), "--images", "80", "--run-dir", str(run_dir), "--quiet"]
    _run(2, "-m", "vitdsi_utils", *args)
    two = json.loads((run_dir / "summary.json").read_text())
    assert two["processes"] == 2 and two["run"] == "digits-32px-N80-clustered-seed0"
    assert not two["zero_shot"]["loaded"] and two["zero_shot"]["epochs"] <= 3 and two["fine_tuned"]["epochs"] == 1
    assert cli.main([*args, "--summary", str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["processes"] == 1 and one["zero_shot"]["loaded"] and one["fine_tuned"]["loaded"]
    for phase in ("zero_shot", "fine_tuned"):
        assert one[phase]["metrics"] == two[phase]["metrics"]
    assert {"IA@1", "mAP@10", "P@10"} <= set(one["fine_tuned"]["metrics"])


def documented_torchrun_commands() -> list[tuple[str, list[str]]]:
    """Every ``torchrun ...`` command line in the README and the docs, as (file, arguments)."""
    import re
    import shlex

    root = HERE.parents[1]
    found = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for command in re.findall(r"^\s*(?:\.venv/bin/)?torchrun (.+)$", path.read_text(), flags=re.M):
            command = re.split(r"\s+#", command)[0].strip()
            found.append((path.relative_to(root).as_posix(), shlex.split(command)))
    return found


def test_every_documented_torchrun_command_gets_past_both_parsers():
    """torchrun's own parser reads abbreviations of its options anywhere on the line, even after the
    module's name: the README once wrote ``train ... --n 200``, which torchrun refuses as ambiguous
    (``--nnodes``, ``--nproc-per-node``, ...) before any process starts. Each command in the docs must
    pass torchrun's parser and then reach ``vitdsi train`` with every argument understood."""
    from torch.distributed.run import parse_args as torchrun_args

    commands = documented_torchrun_commands()
    assert len(commands) >= 3 and any(where == "README.md" for where, _ in commands)
    for where, argv in commands:
        launched = torchrun_args(argv)
        assert launched.module and launched.training_script == "vitdsi_utils", (where, argv)
        args = cli.build_parser().parse_args(launched.training_script_args)
        assert args.func is cli._cmd_train, (where, argv)
    readme = next(argv for where, argv in commands if where == "README.md")
    assert cli.build_parser().parse_args(torchrun_args(readme).training_script_args).n == 200
    # the failure this guards against: --n is fine for vitdsi in one process, fatal for torchrun
    assert cli.build_parser().parse_args(["train", "--n", "200"]).n == 200
    with pytest.raises(SystemExit):
        torchrun_args(["--standalone", "-m", "vitdsi_utils", "train", "--n", "200"])


# ------------------------------------------------------------------------------------------
# The script the tests launch
# ------------------------------------------------------------------------------------------
def small_database() -> Database:
    with warnings.catch_warnings(), distributed.main_first():  # rank 0 writes the image cache first
        warnings.simplefilter("ignore")
        return build_database(load_images("digits", 32, progress=False), 200, id_scheme="clustered", seed=0)


def _split(db: Database, role: str) -> torch.Tensor:
    return torch.from_numpy(db.split(role)[0])


def _new_model(codec, dropout: float) -> DSIModel:
    seed_everything(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 4 patches per image: the smoke profile's coarse model
        return DSIModel(DSIConfig.from_codec(codec, dropout=dropout, **TINY))


def _snapshot(model: torch.nn.Module, history: list) -> dict:
    """Copies of the weights (``state_dict`` holds the live parameters, which training goes on changing) and the rows."""
    return {"weights": {name: w.detach().clone() for name, w in model.state_dict().items()}, "history": list(history)}


def compare(out: Path) -> None:
    """Train every objective (dropout 0) and run the sharded searches; rank 0 saves the results."""
    distributed.init_distributed("cpu")
    torch.set_num_threads(1)
    db = small_database()
    codec = codec_for(db)
    index, train, val = _split(db, "index"), _split(db, "train"), _split(db, "val")
    index_labels = db.relevance_labels("index")
    result, digests = {}, {}

    model = _new_model(codec, dropout=0.0)
    config = TrainConfig(
        epochs=6, batch_size=15, lr=3e-3, target_accuracy=0.02, stop_check_every=2, stop_beam=5,
        eval_batch_size=16, seed=0, device="cpu", progress=False,
    )  # fmt: skip
    val_pairs = RetrievalPairs.from_labels(val, db.relevance_labels("val"), index_labels, max_pairs_per_query=2)
    history = loop.fit(
        model, codec, [IndexingTask(index)], val=[val_pairs], config=config, checkpoint_path=out / "i.ckpt"
    )
    result["index"] = _snapshot(model, history)

    same = SameClassTargets.from_labels(train, db.relevance_labels("train"), index_labels)
    tasks = [IndexingTask(index), same, AugmentedViews(index, views=1)]
    config = TrainConfig(epochs=2, batch_size=25, lr=1e-3, seed=1, eval_batch_size=16, device="cpu", progress=False)
    history = loop.fit(model, codec, tasks, val=[val_pairs], config=config, stop_on=None, mix_ratio=1.0)
    result["multitask"] = _snapshot(model, history)

    seed_everything(0)
    encoder = DenseEncoder(DenseConfig(dropout=0.0, **TINY))
    labels = db.relevance_labels("train")
    dense_config = DenseTrainConfig(
        epochs=2, batch_size=16, lr=2e-3, warmup_steps=2, min_crop=0.8, eval_batch_size=16, device="cpu", progress=False
    )
    val_set = (val.numpy(), db.relevance_labels("val"), index.numpy(), index_labels)
    history = train_dense(encoder, train.numpy(), labels, config=dense_config, val=val_set)
    result["dense"] = _snapshot(encoder, history)

    seed_everything(0)
    ssl = SSLEncoder(ViTConfig(dropout=0.0, **TINY), proj_hidden=32, proj_dim=16)
    history = train_ssl(
        ssl, index.numpy(), config=SSLConfig(epochs=2, batch_size=16, warmup_steps=2, device="cpu", progress=False)
    )
    result["ssl"] = _snapshot(ssl, history)

    for part, trained in result.items():
        digests[part] = [float(w.double().sum()) for w in trained["weights"].values()]
    # sharded searches against the same searches made by this process alone
    sharded = beam_search(model, train, codec, k=5, batch_size=8)
    alone = beam_search(model, train, codec, k=5, batch_size=8, shard=False)
    equal = {"beam": all(torch.equal(a, b) for a, b in zip(sharded, alone))}
    equal["embed"] = torch.equal(encoder.embed(train, 16), encoder.embed(train, 16, shard=False))
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((SHARD_QUERIES + 900, 16)).astype(np.float32)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    torch_index = FlatIPIndex(vectors, backend="torch")
    equal["torch_search"] = all(
        np.array_equal(a, b)
        for a, b in zip(torch_index.search(queries, 10), torch_index.search(queries, 10, shard=False))
    )
    faiss_difference = 0.0
    if faiss_available():
        faiss_index = FlatIPIndex(vectors, backend="faiss")
        (s1, r1), (s2, r2) = faiss_index.search(queries, 10), faiss_index.search(queries, 10, shard=False)
        equal["faiss_rows"] = bool(np.array_equal(r1, r2))
        faiss_difference = float(np.abs(s1 - s2).max())
    report = {"world": distributed.world_size(), "digests": digests, "equal": equal}
    report["faiss_score_difference"] = faiss_difference
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(report))
    if distributed.is_main():
        torch.save(result, out / "result.pt")
    distributed.close_distributed()


def index(run_dirs: list[Path], hang_after: int | None = None, marker: Path | None = None) -> None:
    """Index the small database (dropout 0.1) into each of ``run_dirs`` in turn, resuming a checkpoint found there;
    rank 0 saves each result.

    With ``hang_after``, every process hangs after the first optimiser step of the epoch that
    follows that checkpoint (rank 0 then writes ``marker``), waiting for the test's SIGKILL.
    Each run is seeded alone, so runs made one after the other in one launch are those of
    separate launches.
    """
    distributed.init_distributed("cpu")
    torch.set_num_threads(1)
    db = small_database()
    codec = codec_for(db)
    if hang_after is not None:
        real_losses, steps = loop.token_losses, {"n": 0}

        def losses(*args, **kwargs):  # one call per training step (no eval-mode pass in this run)
            steps["n"] += 1
            if steps["n"] == hang_after * STEPS_PER_EPOCH + 2:  # the checkpoint is written, a step is done
                if distributed.is_main():
                    marker.write_text("mid-epoch\n")
                time.sleep(300)
            return real_losses(*args, **kwargs)

        loop.token_losses = losses  # where fit() looks it up
    for run_dir in run_dirs:
        (run_dir / "pids").mkdir(parents=True, exist_ok=True)
        (run_dir / "pids" / f"rank{distributed.rank()}").write_text(str(os.getpid()))
        model = _new_model(codec, dropout=0.1)
        config = TrainConfig(
            epochs=RESUME_EPOCHS, batch_size=16, lr=2e-3, target_accuracy=None, seed=0, device="cpu", progress=False
        )
        history = loop.train_indexing(
            model, codec, _split(db, "index"), config=config, checkpoint_path=run_dir / "indexing.ckpt"
        )
        if distributed.is_main():
            torch.save(_snapshot(model, history), run_dir / "result.pt")
    distributed.close_distributed()


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
        compare(Path(sys.argv[2]))
    elif sys.argv[1] == "hang":
        index([Path(sys.argv[2])], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        index([Path(folder) for folder in sys.argv[2:]])
