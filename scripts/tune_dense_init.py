"""Choose the dense-init DSI's multi-task setting on the VAL queries, never on the test queries.

    .venv/bin/python scripts/tune_dense_init.py                    # N = 1024, clustered IDs, every variant
    .venv/bin/python scripts/tune_dense_init.py --n 512 --variants base same-class

It loads the zero-shot model that ``make dsi-dense-init`` indexed from the dense encoder (in the
recipe's ``runs_dir``: ``--recipe``, default ``recipes/dsi-dense-init.yaml``), trains the multi-task
phase once per variant (nothing is saved), and scores each on the database's val queries (IA@1 over
the indexed images, mAP@10 and P@10 with bootstrap intervals). The variants change the recipe's
multi-task training (its ``multitask`` section, ``mix_ratio`` and ``max_pairs_per_query``), starting
from plain (query, relevant ID) pairs. The table goes to the recipe's ``out_dir``
(``reports/dsi_dense_init/tuning_val_N<N>.{csv,md}``; ``--set out_dir=...`` elsewhere). The variant
chosen here is then run on the test queries by ``make dsi-dense-init-sameclass``.

``--model PATH`` tunes from any other zero-shot model instead (a ``zero_shot.pt`` of the same
database), e.g. the patch-8 DSI of ``make dsi-patch8``; ``--tag`` then names the table
(``tuning_val_N<N>_<tag>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import load_images
from vitdsi_utils.evaluation import evaluate_dsi
from vitdsi_utils.phases import fine_tune
from vitdsi_utils.reports.tables import format_interval, write_table
from vitdsi_utils.runs import ZERO_SHOT_FILE, run_name
from vitdsi_utils.studies.dense_init import DenseInitSpec
from vitdsi_utils.studies.recipes import load_recipe
from vitdsi_utils.training.checkpoint import load_model
from vitdsi_utils.training.config import TrainConfig

#: name -> (multi-task epochs, mix ratio, fine_tune options, label smoothing); "base" is `make dsi-dense-init`'s
#: (its recipe's 30 epochs and mix ratio 2; the recipe gives the rest of the training settings)
VARIANTS = {
    "base": (30, 2.0, {}, 0.0),
    "60-epochs": (60, 2.0, {}, 0.0),
    "mix-4": (30, 4.0, {}, 0.0),
    "index-views-1": (30, 2.0, {"index_views": 1}, 0.0),
    "same-class": (30, 2.0, {"targets": "same-class"}, 0.0),
    "label-smoothing-0.1": (30, 2.0, {}, 0.1),
    # indexing alone after the multi-task epochs until IA@1 is back at 0.98 (at most 20 epochs)
    "consolidate": (30, 2.0, {"consolidate": 20}, 0.0),
    "same-class+views-1": (30, 2.0, {"targets": "same-class", "index_views": 1}, 0.0),
    "same-class+consolidate": (30, 2.0, {"targets": "same-class", "consolidate": 20}, 0.0),
}


def variant_config(spec: DenseInitSpec, name: str, seed: int) -> tuple[TrainConfig, float | None, dict]:
    """(multi-task training, mix ratio, fine_tune options) of a variant: the recipe's multi-task phase, changed."""
    epochs, mix, options, smoothing = VARIANTS[name]
    config = dataclasses.replace(spec.multitask, epochs=epochs, seed=seed, label_smoothing=smoothing, progress=False)
    return config, mix, options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipe",
        default="dsi-dense-init",
        help="the dense-init recipe (a file, or a name in recipes/; default dsi-dense-init)",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a setting of the recipe, as `vitdsi run --set` (e.g. out_dir=reports/x)",
    )
    parser.add_argument("--n", type=int, default=1024, help="database size N (default 1024)")
    parser.add_argument("--scheme", default="clustered", choices=["clustered", "random"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--model",
        default=None,
        help="a zero_shot.pt of this database to tune from (default: the dense-init one in runs_dir)",
    )
    parser.add_argument("--tag", default=None, help="suffix of the table's name (tuning_val_N<N>_<tag>)")
    args = parser.parse_args(argv)
    try:
        runs = load_recipe(args.recipe, args.sets)
        if len(runs) != 1 or not isinstance(runs[0].spec, DenseInitSpec):
            raise ValueError(f"{args.recipe}: tuning takes a recipe of one dense-init run (study: dense-init)")
    except ValueError as error:
        print(f"tune_dense_init: error: {error}", file=sys.stderr)
        return 2
    spec, paths = runs[0].spec, runs[0].paths

    image_set = load_images(spec.source, spec.size, root=spec.root, progress=False)
    db = build_database(image_set, args.n, id_scheme=args.scheme, seed=args.seed)
    path = (
        Path(args.model)
        if args.model
        else Path(paths.runs) / run_name(db, f"{args.scheme}-dense-init") / ZERO_SHOT_FILE
    )
    if not path.is_file():
        hint = "" if args.model else ": run `make dsi-dense-init` first (it indexes the DSI from the dense encoder)"
        print(f"{path} is missing{hint}", file=sys.stderr)
        return 1
    zero, codec, _ = load_model(path)
    rows = []
    for name in tqdm(args.variants, desc="variants"):
        config, mix, options = variant_config(spec, name, args.seed)
        epochs = config.epochs
        start = time.perf_counter()
        tuned = fine_tune(
            db,
            zero,
            config=config,
            max_pairs_per_query=spec.max_pairs_per_query,
            multitask=True,
            mix_ratio=mix,
            codec=codec,
            **options,
        )
        seconds = time.perf_counter() - start
        table, _ = evaluate_dsi(tuned.model, codec, db, query_role="val", seed=args.seed)
        for row in table.to_dict("records"):
            rows.append(
                {
                    "variant": name,
                    "n": args.n,
                    "ids": args.scheme,
                    "seed": args.seed,
                    "epochs": epochs,
                    "mix_ratio": mix,
                    "train_s": round(seconds, 1),
                    **row,
                }
            )
    long = pd.DataFrame(rows)
    shown = long[long["metric"].isin(["IA@1", "mAP@10", "P@10"])]
    wide = shown.assign(
        cell=[format_interval(v, lo, hi) for v, lo, hi in zip(shown["value"], shown["ci_low"], shown["ci_high"])]
    )
    wide = wide.pivot_table(
        index=["variant", "train_s"], columns="metric", values="cell", aggfunc="first", sort=False
    ).reset_index()
    eligible = (
        shown[shown["metric"] == "mAP@10"]
        .set_index("variant")["value"]
        .where(shown[shown["metric"] == "IA@1"].set_index("variant")["value"] >= 0.95)
        .dropna()
    )
    best = eligible.idxmax() if len(eligible) else "none (no variant keeps IA@1 >= 0.95)"
    n_val = int(long[long["metric"] == "mAP@10"]["n_queries"].iloc[0])
    markdown = "\n".join(
        [
            f"# Multi-task settings of the {'dense-init ' if not args.model else ''}DSI{' (' + args.tag + ')' if args.tag else ''}, scored on the val queries (N = {args.n}, {args.scheme} IDs, "
            f"{spec.size} px, seed {args.seed})",
            "",
            f"`python scripts/tune_dense_init.py {' '.join(argv if argv is not None else sys.argv[1:])}`: each variant fine-tunes the same "
            f"zero-shot model (`{path}`) multi-task, and is scored on the {n_val} val queries "
            "(IA@1: the indexed images); the test queries are not looked at. 95% bootstrap intervals.",
            "",
            wide.to_markdown(index=False),
            "",
            f"Highest val mAP@10 with IA@1 >= 0.95: **{best}**. The differences between variants are inside the "
            "intervals, so this is a choice, not a finding.",
        ]
    )
    stem = f"tuning_val_N{args.n}" + (f"_{args.tag}" if args.tag else "")
    write_table(long, Path(paths.out) / stem, markdown=markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
