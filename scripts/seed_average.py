"""One DSI recipe trained with several seeds on one database, scored per seed and averaged per query.

    .venv/bin/python scripts/seed_average.py                       # the make dsi-patch8 recipe, N = 512, seeds 0-4
    .venv/bin/python scripts/seed_average.py --seeds 1 2 --no-report   # train only (e.g. two processes side by side)
    .venv/bin/python scripts/seed_average.py --scheme atomic          # the same recipe and images with atomic IDs

A single training run is one draw of the training noise (initial weights, example order,
dropout); at N = 512, with 38 test queries, that noise moves a DSI's P@10 by a few hundredths,
enough to flip target 3's verdict. BoVW is already averaged over 5 k-means vocabularies. This
script gives the DSI the same treatment: the recipe of ``make dsi-patch8`` (patch 8, indexing
until IA@1 >= 0.99, multi-task with same-class targets; options below) is trained once per
``--seeds`` value, with the *database* fixed (seed 0). Seed 0's models are the ones
``make dsi-patch8`` trained (``<runs>/<database>/``); seed s > 0 trains into
``<runs>/<database>-train<s>/``, so a rerun loads instead of retraining.

``--scheme random`` or ``--scheme atomic`` trains the recipe on the same images with random IDs
(the database of seed 0 built with that scheme) or atomic IDs (one token per indexed image, given
to the random build's indexed images, as ``vitdsi dsi --schemes atomic`` does). The report is then
``seeds_N<N>_<scheme>``, so target 4 (a label-free scheme within 0.03 of clustered IDs) can be
read seed-averaged on both sides.

When the clustered report of the same N is in ``<out>``, the report of another scheme ends with
target 4's differences to it, per shared seed and for the seed averages.

The report (``<out>/seeds_N<N>.{csv,md}``) has one row per seed and one row for the seed
average (every metric averaged per image / query over the seeds, then a bootstrap over
queries: :func:`vitdsi_utils.evaluation.evaluate_dsi` with a list of models), beside BoVW
averaged over 5 vocabularies, with target 3's verdict for each row.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from vitdsi_utils.data.database import database_with_ids
from vitdsi_utils.data.images import load_images
from vitdsi_utils.evaluation import evaluate_bovw, evaluate_dsi
from vitdsi_utils.phases import fine_tune, index_database
from vitdsi_utils.reports.tables import MULTITASK, write_table
from vitdsi_utils.reports.targets import beats_baseline, gap_markdown, gap_table
from vitdsi_utils.runs import run_name
from vitdsi_utils.training.config import TrainConfig

AVERAGE = "DSI multi-task, seed average"


def train_seed(db, seed: int, args: argparse.Namespace, assignment):
    """The zero-shot and multi-task models of one training seed (loaded when its folder has them)."""
    folder = Path(args.runs) / (run_name(db, assignment.tag) + ("" if seed == 0 else f"-train{seed}"))
    overrides = {"patch_size": args.patch, "dropout": 0.1, "pos_encoding": "sinusoidal"}
    index_config = TrainConfig(epochs=args.index_epochs, target_accuracy=0.99, lr=args.lr, seed=seed,
                               warmup_steps=100, stop_metric="ia")
    zero = index_database(db, model_overrides=overrides, config=index_config, run_dir=folder, codec=assignment.codec)
    config = TrainConfig(epochs=args.multitask_epochs, lr=args.lr, seed=seed)
    tuned = fine_tune(db, zero.model, config=config, run_dir=folder, max_pairs_per_query=5, multitask=True,
                      mix_ratio=args.mix_ratio, targets=args.targets, codec=assignment.codec)
    return zero, tuned


def target4_section(ours: pd.DataFrame, clustered: pd.DataFrame) -> str:
    """Target 4 for the seeds both reports share and for their seed averages: this scheme minus clustered IDs."""
    both = pd.concat([ours, clustered], ignore_index=True)
    both = both[both["model"] != "BoVW"]
    shared = set(ours["model"]) & set(clustered["model"])
    gaps = gap_table(both[both["model"].isin(shared)], reference="clustered")
    return "\n".join([
        "## Target 4: this scheme minus clustered IDs (the same recipe, seeds and images; point estimates)", "",
        f"Clustered rows from `seeds_N{int(ours['n'].iloc[0])}.csv`. Within 0.03 on every metric "
        "is target 4 as written; the last column is the one-sided reading (no metric more than 0.03 below).", "",
        gap_markdown(gaps),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="database size N (default 512)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--index-epochs", type=int, default=400)
    parser.add_argument("--multitask-epochs", type=int, default=30)
    parser.add_argument("--mix-ratio", type=float, default=2.0)
    parser.add_argument("--targets", default="same-class", choices=["pairs", "same-class"])
    parser.add_argument("--scheme", default="clustered", choices=["clustered", "random", "atomic"],
                        help="ID scheme (default clustered); the images are the same for every scheme")
    parser.add_argument("--vocabularies", type=int, default=5, help="BoVW k-means vocabularies averaged")
    parser.add_argument("--words", type=int, default=200, help="BoVW visual words")
    parser.add_argument("--source", default="imagenette", help="image source (default imagenette)")
    parser.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    parser.add_argument("--runs", default="data/runs/dsi_patch8")
    parser.add_argument("--out", default="reports/dsi_patch8")
    parser.add_argument("--no-report", action="store_true", help="train (or load) the seeds, write nothing")
    args = parser.parse_args(argv)

    image_set = load_images(args.source, args.size, progress=False)
    db, assignment = database_with_ids(image_set, args.n, args.scheme, seed=0)
    codec = assignment.codec
    rows, models = [], []
    for seed in args.seeds:
        start = time.perf_counter()
        zero, tuned = train_seed(db, seed, args, assignment)
        print(f"seed {seed}: indexing {zero.epochs} epochs, multi-task {tuned.epochs} epochs "
              f"({time.perf_counter() - start:.0f} s here)", flush=True)
        models.append(tuned.model)
        if not args.no_report:
            table, _ = evaluate_dsi(tuned.model, codec, db, seed=0)
            rows.append(table.assign(model=f"{MULTITASK}, seed {seed}", index_epochs=zero.epochs,
                                     train_s=zero.seconds + tuned.seconds))
    if args.no_report:
        return 0
    table, _ = evaluate_dsi(models, codec, db, seed=0)
    rows.append(table.assign(model=AVERAGE))
    bovw = evaluate_bovw(db, n_words=args.words, seed=0, vocabularies=args.vocabularies, progress=False)
    rows.append(bovw.table.assign(model="BoVW"))
    long = pd.concat(rows, ignore_index=True).assign(n=args.n, ids=args.scheme, seed=0, size=args.size,
                                                    source=args.source)
    verdicts = beats_baseline(long)
    shown = long[long["metric"].isin(["IA@1", "mAP@10", "P@10"])]
    cells = shown.assign(cell=[f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in
                               zip(shown["value"], shown["ci_low"], shown["ci_high"])])
    wide = cells.pivot_table(index="model", columns="metric", values="cell", aggfunc="first", sort=False)
    wide = wide.join(verdicts.set_index("model")[["mAP@10 verdict", "P@10 verdict", "met"]]).reset_index()
    command = "python scripts/seed_average.py " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown = "\n".join([
        f"# One DSI recipe, {len(args.seeds)} training seeds (N = {args.n}, {args.scheme} IDs, {args.source} at {args.size} px, database seed 0)",
        "",
        f"`{command.strip()}`: patch {args.patch}, indexing until IA@1 >= 0.99 (at most {args.index_epochs} epochs, "
        f"lr {args.lr:g}), then {args.multitask_epochs} multi-task epochs (mix ratio {args.mix_ratio:g}, "
        f"{args.targets} targets). Training seeds {', '.join(map(str, args.seeds))}; the database, its queries and "
        f"BoVW ({args.vocabularies} vocabularies) are the same for every row. The seed average scores every metric "
        "per indexed image / test query as the mean over the seeds, then bootstraps over queries (95% intervals). "
        "Target 3: IA@1 >= 0.95 and both intervals above BoVW's.",
        "",
        wide.to_markdown(index=False),
    ])
    clustered_report = Path(args.out) / f"seeds_N{args.n}.csv"
    if args.scheme != "clustered" and clustered_report.exists():
        markdown += "\n\n" + target4_section(long, pd.read_csv(clustered_report))
    stem = f"seeds_N{args.n}" + ("" if args.scheme == "clustered" else f"_{args.scheme}")
    write_table(long, Path(args.out) / stem, markdown=markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
