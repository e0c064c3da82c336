"""Short timing probes behind the budget of the paper-cpu profile (160 px, the paper's model, 2-core CPU).

    .venv/bin/python benchmarks/probe_paper_cpu.py            # about 5 minutes on 2 idle cores
    .venv/bin/python benchmarks/probe_paper_cpu.py --threads 1

Nothing here trains a useful model: the probes time one or two epochs of each kind of training
the profile runs, and one call of each search, on the profile's model at 160 px:

* DSI training, images/s of ``fit`` at batch 32 (second epoch; the first warms up), for the
  indexed share of N = 512 / 1024 / 2048 (128 / 256 / 512 images) with the paper's decimal IDs, and with
  atomic IDs (one token, a softmax over the indexed images);
* the teacher-forced check in eval mode (what the stop rule and validation run), images/s;
* top-100 constrained beam search (the incremental decoder), ms per query, batch of 32 queries;
* the dense encoder's contrastive training (batch 64), images/s, and embedding, images/s;
* decoding Imagenette JPEGs to 160 px, images/s; BoVW (200 words) fit on 128 / 256 / 512 real
  images and the features of a query, s;
* indexing 128 real images (the indexed share of N = 512) with the paper-cpu settings at 64 and at
  160 px for ``--indexing-epochs`` epochs: the eval-mode sequence accuracy every 5 epochs, to set the
  160 px epoch count beside the 64 px runs of ``reports/cpu/`` (67-82 epochs to IA@1 0.99).

Random weights and (for the DSI and dense probes) random images: the cost of a step does not
depend on what the weights hold. The 1-minute load average is recorded before and after, since
other jobs on the cores slow every probe. Writes ``reports/benchmarks/paper_cpu_probes.{csv,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

try:
    import vitdsi_utils  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitdsi_utils import settings
from vitdsi_utils.baselines.dense import DenseConfig, DenseEncoder, DenseTrainConfig, train_dense
from vitdsi_utils.bovw import BoVW
from vitdsi_utils.data.files import list_image_files, load_image, sample_image_folder
from vitdsi_utils.environment import describe_machine
from vitdsi_utils.ids.codec import make_codec
from vitdsi_utils.ids.schemes import atomic_codec
from vitdsi_utils.model.decoding import beam_search
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.reports.tables import write_table
from vitdsi_utils.training.config import TrainConfig
from vitdsi_utils.training.loop import evaluate, fit
from vitdsi_utils.training.tasks import IndexingTask

SIZE = 160
MODEL = dict(image_size=SIZE, patch_size=16, dim=128, mlp_dim=256, depth=6, heads=4, dropout=0.1)


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)


def probe_dsi(n_index: int, codec, label: str) -> list[dict]:
    """Training, eval and beam-search rates of the paper's DSI on ``n_index`` images with ``codec``."""
    torch.manual_seed(0)
    model = DSIModel(DSIConfig.from_codec(codec, **MODEL))
    images = random_images(n_index)
    config = TrainConfig(epochs=2, target_accuracy=None, progress=False, device="cpu")
    history = fit(model, codec, [IndexingTask(images)], config=config, stop_on=None, phase="probe")
    last = [r for r in history if r["epoch"] == 2 and r["split"] == "train"][-1]
    train_rate = last["n_examples"] / last["seconds"]
    start = time.perf_counter()
    evaluate(model, codec, [IndexingTask(images)], amp=False)
    eval_rate = n_index / (time.perf_counter() - start)
    queries = random_images(32, seed=1)
    beam_search(model, queries[:8], codec, k=100, batch_size=32)  # warm-up
    start = time.perf_counter()
    beam_search(model, queries, codec, k=100, batch_size=32)
    beam_ms = 1000 * (time.perf_counter() - start) / len(queries)
    rows = [
        {"probe": f"DSI training, {label}", "n": n_index, "value": train_rate, "unit": "images/s"},
        {"probe": f"DSI teacher-forced check, {label}", "n": n_index, "value": eval_rate, "unit": "images/s"},
        {"probe": f"DSI top-100 beam search, {label}", "n": n_index, "value": beam_ms, "unit": "ms/query"},
    ]
    for row in rows:
        print(row, flush=True)
    return rows


def probe_dense(n: int) -> list[dict]:
    """Contrastive training (two epochs, the second timed) and embedding rates of the dense encoder."""
    torch.manual_seed(0)
    model = DenseEncoder(DenseConfig(**MODEL, pooling="mean"))
    images = random_images(n)
    labels = np.arange(n) % 10
    config = DenseTrainConfig(epochs=1, batch_size=64, progress=False, device="cpu")
    train_dense(model, images, labels, config=config)  # warm-up
    start = time.perf_counter()
    train_dense(model, images, labels, config=config)
    train_rate = n / (time.perf_counter() - start)
    start = time.perf_counter()
    model.embed(images)
    embed_rate = n / (time.perf_counter() - start)
    rows = [
        {"probe": "dense contrastive training", "n": n, "value": train_rate, "unit": "images/s"},
        {"probe": "dense embedding", "n": n, "value": embed_rate, "unit": "images/s"},
    ]
    for row in rows:
        print(row, flush=True)
    return rows


def probe_images_and_bovw(root: Path, per_class: int) -> list[dict]:
    """Decoding real JPEGs to 160 px, then BoVW (200 words) on 128 / 256 / 512 of them."""
    files, _, labels = list_image_files(root)
    labels = np.asarray(labels)
    picked = [i for c in range(labels.max() + 1) for i in np.flatnonzero(labels == c)[:per_class]]
    start = time.perf_counter()
    decoded = [load_image(root / files[i], SIZE) for i in picked]
    decode_rate = len(picked) / (time.perf_counter() - start)
    images = np.stack([im for im in decoded if im is not None])
    rows = [{"probe": "decode Imagenette JPEG to 160 px", "n": len(picked), "value": decode_rate, "unit": "images/s"}]
    rng = np.random.default_rng(0)
    for n_index in (128, 256, 512):
        subset = images[rng.permutation(len(images))[:n_index]]
        start = time.perf_counter()
        model = BoVW(200, random_state=0, progress=False).fit(subset)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        model.transform(images[:64])
        query_ms = 1000 * (time.perf_counter() - start) / 64
        rows += [
            {"probe": "BoVW fit (SIFT, k-means 200, histograms)", "n": n_index, "value": fit_s, "unit": "s"},
            {"probe": "BoVW query features", "n": n_index, "value": query_ms, "unit": "ms/query"},
        ]
    for row in rows:
        print(row, flush=True)
    return rows


def probe_indexing(root: Path, epochs: int, sizes: tuple[int, ...] = (64, SIZE)) -> list[dict]:
    """How fast the paper's DSI memorises 128 real images (the indexed share of N = 512) at 64 and 160 px.

    The same 13 Imagenette images per class (the first 128), clustered IDs, the paper-cpu settings
    (lr 1e-3, 100 warm-up steps, batch 32), ``epochs`` epochs with no stop rule; every 5 epochs the
    teacher-forced sequence accuracy in eval mode, which gates the stop rule's IA@1 check.
    """
    rows = []
    for size in sizes:
        images, labels, _ = sample_image_folder(root, size, per_class=13)
        order = np.argsort(labels, kind="stable")[:128]  # clustered: same-class images get consecutive IDs
        codec = make_codec(128)
        torch.manual_seed(0)
        model = DSIModel(DSIConfig.from_codec(codec, **{**MODEL, "image_size": size}))
        task = IndexingTask(torch.from_numpy(images[order]))
        config = TrainConfig(
            lr=1e-3, warmup_steps=100, epochs=epochs, target_accuracy=None, eval_every=5, progress=False, device="cpu"
        )
        start = time.perf_counter()
        history = fit(model, codec, [task], val=[task], config=config, stop_on=None, phase="probe")
        seconds = time.perf_counter() - start
        for r in history:
            if r["split"] == "val":
                rows.append(
                    {
                        "probe": f"indexing 128 real images at {size} px: eval sequence accuracy",
                        "n": r["epoch"],
                        "value": r["seq_acc"],
                        "unit": "after epoch n",
                    }
                )
        rows.append(
            {
                "probe": f"indexing 128 real images at {size} px: seconds per epoch",
                "n": 128,
                "value": seconds / epochs,
                "unit": "s",
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--per-class", type=int, default=60, help="real images decoded per class for BoVW")
    parser.add_argument("--skip", nargs="*", default=[], choices=["dsi", "dense", "bovw", "indexing"])
    parser.add_argument("--indexing-epochs", type=int, default=30, help="epochs of the indexing probe")
    parser.add_argument("--out", default=None, help="folder (default reports/benchmarks/)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    print(f"{describe_machine()}; torch threads {torch.get_num_threads()}; load {load_before:.2f}", flush=True)
    rows: list[dict] = []
    if "dsi" not in args.skip:
        for n_index in (128, 256, 512):
            rows += probe_dsi(n_index, make_codec(n_index), f"{n_index} indexed, dense IDs")
        rows += probe_dsi(512, atomic_codec(512), "512 indexed, atomic IDs")
    if "dense" not in args.skip:
        rows += probe_dense(512)
    if "bovw" not in args.skip:
        root = settings.imagenette_dir()
        if root is None:
            print(f"{settings.IMAGENETTE_ENV} is unset: no BoVW probe", flush=True)
        else:
            rows += probe_images_and_bovw(root, args.per_class)
    if "indexing" not in args.skip and settings.imagenette_dir() is not None:
        rows += probe_indexing(settings.imagenette_dir(), args.indexing_epochs)
    frame = pd.DataFrame(rows)
    md = "\n".join(
        [
            "# Timing probes at 160 px for the paper-cpu profile",
            "",
            f"Machine: {describe_machine()}; torch CPU threads {torch.get_num_threads()}; 1-min load average "
            f"{load_before:.2f} before and {os.getloadavg()[0]:.2f} after (other jobs on the cores slow every probe).",
            "The paper's model (patch 16, dim 128, 6 + 6 blocks, 4 heads), random weights; DSI and dense probes on "
            "random images, BoVW on real Imagenette images. See the docstring of benchmarks/probe_paper_cpu.py.",
            "",
            frame.round(2).to_markdown(index=False),
            "",
            "Rerun: `.venv/bin/python benchmarks/probe_paper_cpu.py"
            + (f" --threads {args.threads}" if args.threads else "")
            + "`",
        ]
    )
    out = Path(args.out) if args.out else settings.reports_dir() / "benchmarks"
    threads = f"_{args.threads}thread" if args.threads else ""
    write_table(frame, out / f"paper_cpu_probes{threads}", markdown=md)
    print(md)


if __name__ == "__main__":
    main()
