"""Beam search before and after issue 17, side by side: milliseconds per query of top-k retrieval.

    .venv/bin/python benchmarks/bench_beam.py --device cpu --threads 1   # the default cases, a few minutes on one idle core
    .venv/bin/python benchmarks/bench_beam.py --device cuda --queries 512

For each case (image size, N) one DSI of the paper's size (DSIConfig defaults: dim 128, MLP 256,
6 encoder + 6 decoder blocks, 4 heads, patch 16) with random weights and N decimal IDs searches
the same batch of random uint8 query images with

* ``reference``: ``decoding.beam_search_reference``, the beam search before issue 17 (the encoder
  memory copied once per beam, the whole decoder re-run over the prefix at every step), and
* ``incremental``: ``decoding.beam_search`` (cross-attention keys and values once per query and
  layer, cached self-attention, one new token per beam and step).

Latency does not depend on what the weights have learnt: the constrained search walks the same
trie with the same beam widths. Each implementation gets one warm-up call, then ``--repeats``
timed calls, alternating between the two so that a change of load hits both; the table gives the
best and the median wall time per query and the median CPU time of the process per query (best-of,
because other jobs on shared cores only ever slow a run). The two must return the same IDs in the
same order with scores within 1e-5, except that IDs whose scores tie to float precision may swap
places (see :func:`compare`; bf16 autocast on CUDA reorders more).
"""

from __future__ import annotations

import argparse
import os
import statistics
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
from vitdsi_utils.model.decoding import beam_search, beam_search_reference
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.reports.tables import write_table

IMPLEMENTATIONS = {"reference": beam_search_reference, "incremental": beam_search}
TOLERANCE = 1e-5  #: scores of the two implementations agree to this
#: (image size px, N): the issue's targets (>= 4x at 160 px for N = 512 and 2,048, >= 3x at 64 px for N = 13,394)
DEFAULT_CASES = ["160:512", "160:2048", "160:13394", "64:512", "64:13394"]


def random_images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def compare(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], tol: float = TOLERANCE) -> dict:
    """Compare two beam-search results (scores, rows), each (Q, k), query by query.

    ``identical``: the same rows in the same order, scores within ``tol``. ``tie_swapped``: scores
    within ``tol`` position by position, and every row that differs is a tie: it stands in the
    other list at a score within ``2 * tol``, or both sit at the cut-off (a tie for the last place).
    Such swaps come from float rounding (the two implementations sum in different orders) between
    IDs whose scores agree to about 1e-6. ``different``: anything else (must be 0).
    """
    (sa, ra), (sb, rb) = a, b
    counts = {"identical": 0, "tie_swapped": 0, "different": 0}
    for q in range(len(ra)):
        fa, fb = torch.isfinite(sa[q]), torch.isfinite(sb[q])
        close = torch.equal(fa, fb) and bool(((sa[q][fa] - sb[q][fb]).abs() <= tol).all())
        if close and torch.equal(ra[q], rb[q]):
            counts["identical"] += 1
            continue
        ties = close
        for i in (ra[q] != rb[q]).nonzero().flatten().tolist() if close else []:
            where = (ra[q] == rb[q, i]).nonzero().flatten()
            other = sa[q, where[0]] if len(where) else sa[q][fa][-1]  # its place in the other list, or the cut-off
            ties &= bool((other - sa[q, i]).abs() <= 2 * tol)
        counts["tie_swapped" if ties else "different"] += 1
    finite = torch.isfinite(sa) & torch.isfinite(sb)
    counts["max_score_diff"] = float((sa[finite] - sb[finite]).abs().max()) if finite.any() else 0.0
    return counts


def time_case(size: int, n: int, k: int, queries: torch.Tensor, args, device: torch.device) -> dict:
    codec = make_codec(n)
    torch.manual_seed(0)
    model = DSIModel(DSIConfig.from_codec(codec, image_size=size)).to(device).eval()
    amp = args.amp and device.type == "cuda"

    def run(name: str):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        out = IMPLEMENTATIONS[name](model, queries, codec, k=k, batch_size=len(queries), device=device, amp=amp)
        return out, time.perf_counter() - t0, time.process_time() - c0  # results end on the CPU: synced

    results, walls, cpus = {}, {name: [] for name in IMPLEMENTATIONS}, {name: [] for name in IMPLEMENTATIONS}
    for name in IMPLEMENTATIONS:  # warm-up
        results[name] = run(name)[0]
    for _ in range(args.repeats):
        for name in IMPLEMENTATIONS:
            _, wall, cpu = run(name)
            walls[name].append(wall)
            cpus[name].append(cpu)
    row = {
        "device": str(device),
        "image_size": size,
        "N": n,
        "id_tokens": codec.max_length - 1,
        "k": k,
        "beam": k,
        "queries": len(queries),
    }
    ms = lambda seconds: 1000 * seconds / len(queries)  # noqa: E731
    for name in IMPLEMENTATIONS:
        row[f"{name}_ms"] = ms(min(walls[name]))
        row[f"{name}_ms_median"] = ms(statistics.median(walls[name]))
        row[f"{name}_cpu_ms"] = ms(statistics.median(cpus[name]))
    row["speedup"] = row["reference_ms"] / row["incremental_ms"]
    row["speedup_cpu"] = row["reference_cpu_ms"] / row["incremental_cpu_ms"]
    row.update(compare(results["reference"], results["incremental"]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one) | cpu | cuda")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="image_size:N pairs, e.g. 160:512 64:13394")
    parser.add_argument("--k", type=int, nargs="+", default=[100], help="IDs returned per query (beam = k)")
    parser.add_argument("--queries", type=int, default=None, help="queries in the timed batch (cpu 32, cuda 512)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per implementation; best and median reported"
    )
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA for both implementations")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="folder (default reports/benchmarks/)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    n_queries = args.queries or (512 if device.type == "cuda" else 32)
    out = Path(args.out) if args.out else settings.reports_dir() / "benchmarks"
    machine = describe_machine()
    load_before = load()
    print(
        f"machine: {machine}; device {device}; torch threads {torch.get_num_threads()}; load {load_before}", flush=True
    )

    rows = []
    for case in args.cases:
        size, n = (int(v) for v in case.split(":"))
        queries = random_images(n_queries, size)
        for k in args.k:
            rows.append(time_case(size, n, k, queries, args, device))
            print({key: round(v, 3) if isinstance(v, float) else v for key, v in rows[-1].items()}, flush=True)
    load_after = load()

    frame = pd.DataFrame(rows)
    shown = frame[
        [
            "image_size",
            "N",
            "id_tokens",
            "k",
            "queries",
            "reference_ms",
            "incremental_ms",
            "speedup",
            "reference_ms_median",
            "incremental_ms_median",
            "reference_cpu_ms",
            "incremental_cpu_ms",
            "speedup_cpu",
            "identical",
            "tie_swapped",
            "different",
            "max_score_diff",
        ]
    ]
    info = machine_info()
    threads = f" --threads {args.threads}" if args.threads else ""
    md = "\n".join(
        [
            f"# Beam search before and after issue 17 ({device.type})",
            "",
            f"Machine: {machine}; processor {info['processor']}; torch CPU threads {torch.get_num_threads()}; "
            f"load average (1 / 5 / 15 min) {load_before} before and {load_after} after the run.",
            "",
            "Paper-sized DSI (dim 128, MLP 256, 6 + 6 blocks, 4 heads, patch 16), random weights, N decimal IDs, "
            f"{n_queries} random query images searched in one batch, top-k with beam = k. `reference`: "
            "`decoding.beam_search_reference` (before issue 17); `incremental`: `decoding.beam_search`. "
            f"`*_ms`: best of {args.repeats} timed calls after a warm-up call, wall milliseconds per query "
            "(`_median`: their median; `_cpu_ms`: median CPU milliseconds of the process per query); the two "
            "implementations alternate. Agreement, per query: `identical` (the same rows in the same order, "
            "scores within 1e-5), `tie_swapped` (scores within 1e-5 at every place, and the rows that differ swap "
            "places with IDs of the same score to float precision: ties, whose order depends on summation order), "
            "`different` (anything else); `max_score_diff`: the largest difference of their scores."
            + (" bf16 autocast on CUDA." if args.amp and device.type == "cuda" else ""),
            "",
            shown.round(
                {
                    "reference_ms": 1,
                    "incremental_ms": 2,
                    "speedup": 1,
                    "reference_ms_median": 1,
                    "incremental_ms_median": 2,
                    "reference_cpu_ms": 1,
                    "incremental_cpu_ms": 2,
                    "speedup_cpu": 1,
                }
            ).to_markdown(index=False),
            "",
            f"Rerun: `.venv/bin/python benchmarks/bench_beam.py --device {args.device}{threads} --cases {' '.join(args.cases)} "
            f"--k {' '.join(map(str, args.k))} --queries {n_queries} --repeats {args.repeats}"
            + (" --amp" if args.amp else "")
            + "`",
        ]
    )
    stem = out / f"beam_{'gpu' if device.type == 'cuda' else 'cpu'}{f'_{args.threads}thread' if args.threads else ''}"
    write_table(
        frame.assign(
            load_before=load_before, load_after=load_after, torch_threads=torch.get_num_threads(), machine=machine
        ),
        stem,
        markdown=md,
    )
    print(shown.round(3).to_string(index=False))
    print(f"load average {load_before} before, {load_after} after; written {stem}.csv and {stem}.md")


if __name__ == "__main__":
    main()
