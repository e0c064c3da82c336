"""Time the ViT-DSI model: training throughput and top-k beam-search latency against the IDB size.

    .venv/bin/python benchmarks/bench_dsi.py                      # CPU-sized default, about a minute on 2 idle cores
    .venv/bin/python benchmarks/bench_dsi.py --device cuda --image-size 64 160 --queries 1024

Model: the paper's size (DSIConfig defaults: dim 128, depth 6 + 6, 4 heads, patch 16), random
weights and random uint8 images: neither the training step nor the constrained beam search
depends on what the weights have learnt, only on N (through the ID trie) and the image size.

* training: images/s of ``fit`` (batch 32, Adam, bf16 autocast on CUDA) on N random images,
  per epoch after one warm-up epoch; the best of ``--repeats`` epochs (and their median).
* decoding: ``beam_search`` top-k (beam = k) over the N IDs for one batch of queries after a
  warm-up call; the best of ``--repeats`` calls, per query (ms) and as queries/s.

Best-of, because other jobs on shared cores can only slow a run down; the report records the
load average so a contaminated run is visible.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

try:
    import vitdsi_utils  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitdsi_utils import settings
from vitdsi_utils.devices import resolve_device
from vitdsi_utils.environment import describe_machine, machine_info
from vitdsi_utils.ids.codec import make_codec
from vitdsi_utils.model.decoding import beam_search
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.reports.tables import write_table
from vitdsi_utils.training.config import TrainConfig
from vitdsi_utils.training.loop import fit
from vitdsi_utils.training.tasks import IndexingTask


def random_images(n: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8).to(device)


def time_training(model: DSIModel, codec, images: torch.Tensor, args, device: torch.device) -> dict:
    """Images/s of ``fit`` per epoch after a warm-up epoch: best and median over ``args.repeats`` epochs."""
    config = TrainConfig(
        batch_size=args.batch_size,
        epochs=1 + args.repeats,
        target_accuracy=None,  # never stops early
        device=str(device),
        progress=False,
        compile=args.compile,
    )
    history = fit(model, codec, [IndexingTask(images)], config=config, stop_on=None, phase="bench")
    rates = torch.tensor([r["n_examples"] / r["seconds"] for r in history if r["epoch"] > 1])
    return {
        "train_batch": args.batch_size,
        "train_steps_per_epoch": math.ceil(len(images) / args.batch_size),
        "train_images_per_s": rates.max().item(),
        "train_images_per_s_median": rates.median().item(),
    }


def time_decoding(model: DSIModel, codec, queries: torch.Tensor, args, device: torch.device) -> dict:
    """ms per query of beam_search top-k over one batch of queries: best and median of ``args.repeats`` calls."""
    beam_search(model, queries[: max(1, len(queries) // 4)], codec, k=args.k, batch_size=len(queries), device=device)
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        beam_search(model, queries, codec, k=args.k, batch_size=len(queries), device=device)  # ends on the CPU: synced
        times.append(time.perf_counter() - start)
    ms = torch.tensor(times) * 1000 / len(queries)
    return {
        "k": args.k,
        "decode_queries": len(queries),
        "decode_ms_per_query": ms.min().item(),
        "decode_ms_per_query_median": ms.median().item(),
        "decode_queries_per_s": 1000 / ms.min().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512], help="IDB sizes N")
    parser.add_argument("--image-size", type=int, nargs="+", default=[64], help="e.g. 64 160")
    parser.add_argument("--k", type=int, default=100, help="IDs returned per query (beam = k)")
    parser.add_argument("--queries", type=int, default=None, help="queries per decoding batch (cpu 32, cuda 512)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs / decoding calls; the best is reported")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile (inductor) for training")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="folder (default reports/benchmarks/)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    n_queries = args.queries or (512 if device.type == "cuda" else 32)
    out = Path(args.out) if args.out else settings.reports_dir() / "benchmarks"
    machine = describe_machine()
    load_before = os.getloadavg()[0]  # other jobs on the same cores make CPU timings meaningless: record it
    print(f"machine: {machine}; device {device}; torch threads {torch.get_num_threads()}; load {load_before:.2f}")

    rows = []
    for size in args.image_size:
        queries = random_images(n_queries, size, device, seed=1)
        for n in args.sizes:
            codec = make_codec(n)
            torch.manual_seed(0)
            model = DSIModel(DSIConfig.from_codec(codec, image_size=size)).to(device)
            row = {
                "device": str(device),
                "image_size": size,
                "N": n,
                "id_tokens": codec.max_length - 1,
                "params": model.num_parameters(),
            }
            if not args.skip_training:
                row.update(time_training(model, codec, random_images(n, size, device), args, device))
            row.update(time_decoding(model, codec, queries, args, device))
            rows.append(row)
            print({key: round(v, 2) if isinstance(v, float) else v for key, v in row.items()}, flush=True)

    frame = pd.DataFrame(rows)
    info = machine_info()
    md = "\n".join(
        [
            f"# ViT-DSI timings ({device.type})",
            "",
            f"Machine: {machine}; torch CPU threads {torch.get_num_threads()}; processor {info['processor']}; "
            f"1-min load average {load_before:.2f} before and {os.getloadavg()[0]:.2f} after the run "
            "(CPU timings are only meaningful when both are well below the core count).",
            "",
            "Paper-sized model (dim 128, 6 encoder + 6 decoder blocks, 4 heads, patch 16, "
            f"{rows[0]['params']:,} parameters at {args.image_size[0]} px), random weights and images.",
            f"`train_images_per_s`: `fit` at batch {args.batch_size} on N images (Adam; bf16 autocast on CUDA), "
            f"best of {args.repeats} epochs after a warm-up epoch (`_median`: their median). `decode_ms_per_query`: "
            f"constrained beam search, top-k with beam = k, {n_queries} queries in one batch, best of "
            f"{args.repeats} calls after a warm-up call. Best-of because other jobs on shared cores only ever slow a run.",
            "",
            frame.round(2).to_markdown(index=False),
            "",
            "Rerun: `.venv/bin/python benchmarks/bench_dsi.py --device "
            + args.device
            + (f" --threads {args.threads}" if args.threads else "")
            + f" --sizes {' '.join(map(str, args.sizes))} --image-size {' '.join(map(str, args.image_size))} --k {args.k}`",
        ]
    )
    sizes = "_".join(f"{s}px" for s in args.image_size)
    threads = f"_{args.threads}thread" if args.threads else ""
    stem = out / f"dsi_{sizes}_{'gpu' if device.type == 'cuda' else 'cpu'}{threads}"
    write_table(frame, stem, markdown=md)
    print(frame.round(2).to_string(index=False))
    print(f"written {stem}.csv and {stem}.md")


if __name__ == "__main__":
    main()
