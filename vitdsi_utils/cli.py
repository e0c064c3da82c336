"""Command line: ``vitdsi <command>`` or ``python -m vitdsi_utils <command>``.

``vitdsi run RECIPE [--set KEY=VALUE ...]`` runs a study from a recipe (``recipes/*.yaml``, see
:mod:`vitdsi_utils.studies.recipes`); ``vitdsi recipes`` lists them; ``vitdsi study --profile NAME`` runs the
notebooks; ``vitdsi data`` writes the databases' manifests; ``vitdsi train`` trains and scores one DSI
cell of a profile, in one process or data-parallel under ``torchrun`` (``docs/distributed.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from vitdsi_utils import distributed, settings
from vitdsi_utils.atomic import write_json
from vitdsi_utils.data.database import build_database, database_with_ids
from vitdsi_utils.data.images import SIZES, SOURCES, load_images
from vitdsi_utils.ids.schemes import CODEC_SCHEMES
from vitdsi_utils.locks import RunFolderBusy
from vitdsi_utils.reports.tables import FINE_TUNED, ZERO_SHOT
from vitdsi_utils.runner.profiles import load_profile
from vitdsi_utils.runner.run import StudyFailed, run_study
from vitdsi_utils.runs import PhaseResult, database_name, run_name
from vitdsi_utils.studies.dsi import DSISpec, run_experiment
from vitdsi_utils.studies.recipes import dump_runs, list_recipes, load_recipe, run_recipe
from vitdsi_utils.studies.specs import spec_from_profile


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (as the errors of the commands themselves), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:

    parser.add_argument("--source", default="imagenette", choices=SOURCES, help="image source (default: imagenette)")
    parser.add_argument(
        "--root",
        default=None,
        help="ImageFolder tree for --source folder, an Imagenette copy, or the COCO images folder "
        "(default for coco: VITDSI_COCO_IMAGES)",
    )
    parser.add_argument(
        "--annotations", default=None, help="COCO instances JSON for --source coco (default: VITDSI_COCO_ANNOTATIONS)"
    )
    parser.add_argument("--size", type=int, default=160, choices=SIZES, help="image side in px")
    parser.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048], help="database sizes N (total images)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the database draw")


def _cmd_data(args: argparse.Namespace) -> int:

    out = Path(args.out or settings.reports_dir() / "data")
    image_set = load_images(args.source, args.size, root=args.root, annotations=args.annotations)
    print(image_set.summary())
    for n in args.n:
        for seed in args.seeds:
            for scheme in ("random", "clustered"):
                db = build_database(image_set, n, id_scheme=scheme, seed=seed)
                path = db.save_manifest(out / f"{database_name(db)}-{scheme}.csv")
            print(
                f"N={n} seed={seed}: "
                + ", ".join(f"{role} {count}" for role, count in db.counts().sum().items())
                + f" -> {path.parent}"
            )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:

    runs = load_recipe(args.recipe, args.sets)  # every run is checked before the first starts
    if args.only:
        wrong = [i for i in args.only if not 1 <= i <= len(runs)]
        if wrong:
            raise ValueError(f"--run {wrong[0]}: {args.recipe} has runs 1 to {len(runs)}")
        runs = [runs[i - 1] for i in args.only]
    if args.dry_run:
        print(dump_runs(runs), end="")
        return 0
    run_recipe(runs)
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:

    for name, what in list_recipes():
        print(f"{name:<26} {what}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:

    given = {
        "DATASET": args.dataset,
        "DATASET_ROOT": args.root,
        "DATASET_ANNOTATIONS": args.annotations,
        "DATASET_NAME": args.dataset_name,
    }
    overrides = {key: value for key, value in given.items() if value is not None} or None
    try:
        run_study(
            args.profile,
            start_at=args.start_at,
            force=args.force,
            out_root=args.out,
            runs_dir=args.runs,
            overrides=overrides,
            progress=not args.quiet,
            dry_run=args.dry_run,
        )
    except StudyFailed as error:
        # with progress on, the runner has printed the error already
        print(
            f"vitdsi study: {error}" if args.quiet else "vitdsi study: stopped at the failing notebook", file=sys.stderr
        )
        return 1
    return 0


def _cmd_train(args: argparse.Namespace) -> int:

    device = distributed.init_distributed(args.device)  # a process group when torchrun started several
    try:
        return _train_cell(args, device)
    finally:
        distributed.close_distributed()


#: The metrics the train command prints.
_SHOWN_METRICS = ["IA@1", "IA@5", "mAP@10", "P@10", "R@100"]


def _train_cell(args: argparse.Namespace, device: Any) -> int:
    """Index one database of the profile, score it, fine-tune, score again; rank 0 writes the JSON summary."""
    params = load_profile(args.profile)
    spec = spec_from_profile(DSISpec, params, ignore_unknown=True)
    n = args.n if args.n is not None else spec.ns[0]
    ids = args.ids or spec.schemes[0]
    seed = args.seed if args.seed is not None else spec.seeds[0]
    k = args.k if args.k is not None else int(params.get("K", 100))
    show = not args.quiet and distributed.is_main()
    # the seed draws the database and seeds both phases, as in the notebooks 03 and 04
    runtime = {"seed": seed, "device": str(device), "progress": show}
    index_config = dataclasses.replace(spec.index, **runtime)
    retrieval_config = dataclasses.replace(spec.fine_tune, **runtime) if spec.fine_tune is not None else None
    with distributed.main_first():  # rank 0 decodes the images into the cache, then the others read it
        image_set = load_images(spec.source, spec.size, root=spec.root, annotations=spec.annotations, progress=show)
    db, assignment = database_with_ids(image_set, n, ids, seed=seed)
    name = run_name(db, assignment.tag)
    run_dir = Path(args.run_dir) if args.run_dir else settings.data_dir() / "runs" / str(params["PROFILE"]) / name
    experiment = run_experiment(
        db,
        model_overrides=spec.model.overrides(),
        index_config=index_config,
        retrieval_config=retrieval_config,
        fine_tune_phase=retrieval_config is not None,
        run_dir=run_dir,
        k=k,
        max_pairs_per_query=spec.max_pairs_per_query,
        codec=assignment.codec,
        ids=ids,
        targets=spec.targets,
        index_views=spec.index_views,
        view_min_crop=spec.view_min_crop,
        consolidate=spec.consolidate,
    )
    summary = {
        "profile": params["PROFILE"],
        "run": name,
        "n": n,
        "ids": ids,
        "seed": seed,
        "k": k,
        "processes": distributed.world_size(),
        "device": str(device),
        "run_dir": str(run_dir),
        "zero_shot": _phase_summary(experiment.zero_shot, experiment.table, ZERO_SHOT),
    }
    if experiment.fine_tuned is not None:
        summary["fine_tuned"] = _phase_summary(experiment.fine_tuned, experiment.table, FINE_TUNED)
    path = Path(args.summary) if args.summary else run_dir / "summary.json"
    distributed.on_main(write_json, path, summary)
    if distributed.is_main():
        shown = experiment.table[experiment.table["metric"].isin(_SHOWN_METRICS)]
        table = shown.pivot_table(index="model", columns="metric", values="value", sort=False)
        print(table[[m for m in _SHOWN_METRICS if m in table.columns]].round(3).to_string())
        print(f"{distributed.world_size()} process(es) on {device}; summary: {path}")
    return 0


def _phase_summary(phase: PhaseResult, table: pd.DataFrame, model: str) -> dict[str, Any]:
    """Epochs, stop rule, training time and every metric (value and 95% interval) of one trained model."""

    def number(value: Any) -> float | None:  # NaN (an undefined metric) as JSON null
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

    rows = table[table["model"] == model]
    return {
        "epochs": phase.epochs,
        "reached_target": phase.reached_target,
        "train_s": phase.seconds,
        "loaded": phase.loaded,
        "metrics": {
            row.metric: {"value": number(row.value), "ci_low": number(row.ci_low), "ci_high": number(row.ci_high)}
            for row in rows.itertuples()
        },
    }


def build_parser() -> argparse.ArgumentParser:

    parser = _Parser(prog="vitdsi", description="ViT as a Differentiable Search Index: the study's tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="build the databases and write their manifests")
    _add_data_arguments(data)
    data.add_argument("--out", default=None, help="folder for manifests (default: reports/data)")
    data.set_defaults(func=_cmd_data)

    run = commands.add_parser(
        "run",
        help="run a study from a recipe (recipes/<name>.yaml): settings, output and model folders",
        description="Run a recipe: a YAML file naming a study and its settings (see recipes/ and `vitdsi recipes`).",
    )
    run.add_argument("recipe", help="a recipe file, e.g. recipes/dsi.yaml, or the name of one in recipes/ (dsi)")
    run.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a setting of every run of the recipe: dotted keys for sections, YAML values, "
        "e.g. --set index.epochs=10 --set ns=[512] --set out_dir=/tmp/out (repeatable)",
    )
    run.add_argument(
        "--run",
        dest="only",
        type=int,
        action="append",
        default=[],
        metavar="I",
        help="only run I of the recipe (1, 2, ... as --dry-run numbers them; repeatable)",
    )
    run.add_argument(
        "--dry-run", action="store_true", help="print every run's settings (YAML, defaults filled in) and stop"
    )
    run.set_defaults(func=_cmd_run)

    recipes = commands.add_parser("recipes", help="list the recipes in recipes/ and what each runs")
    recipes.set_defaults(func=_cmd_recipes)

    study = commands.add_parser(
        "study", help="run the study's notebooks with a profile's parameters (report in reports/<profile>)"
    )
    study.add_argument(
        "--profile",
        default="smoke",
        help="smoke (minutes, CI), cpu (64 px, 35-55 minutes on 2 cores), paper-cpu (160 px, Table 1's "
        "models, 2.2 hours on 2 idle cores), paper (GPU) or a path to a YAML profile (default: smoke)",
    )
    study.add_argument(
        "--start-at",
        default=None,
        metavar="NAME",
        help="run NAME (e.g. 04 or 04_retrieval) and every notebook after it; the ones before "
        "are skipped unchecked and their earlier outputs reused",
    )
    study.add_argument(
        "--force",
        action="store_true",
        help="rerun every notebook, even those whose executed copy is up to date "
        "(by default a rerun skips them and starts at the first stale one)",
    )
    study.add_argument(
        "--dataset",
        default=None,
        choices=SOURCES,
        help="run the profile on another image source: folder (your own images, with --root), coco "
        "(--root and --annotations, or VITDSI_COCO_IMAGES and VITDSI_COCO_ANNOTATIONS), imagenette, "
        "digits; the report then goes to reports/<profile>-<name>",
    )
    study.add_argument(
        "--root",
        default=None,
        metavar="PATH",
        help="the images: an ImageFolder tree <root>/<class>/<image> for --dataset folder, a local "
        "Imagenette copy, or the COCO images folder (profile key DATASET_ROOT)",
    )
    study.add_argument(
        "--annotations",
        default=None,
        metavar="JSON",
        help="the COCO instances file for --dataset coco (profile key DATASET_ANNOTATIONS)",
    )
    study.add_argument(
        "--dataset-name",
        default=None,
        metavar="NAME",
        help="what the reports call the data set (default: the folder's name for --dataset folder, "
        "else the source; profile key DATASET_NAME)",
    )
    study.add_argument(
        "--dry-run",
        action="store_true",
        help="every notebook of the profile's grid (all N, ID schemes, seeds, ablation factors, ...) with one "
        "epoch per phase, a small model and budgets, N / 16 and a subset of the images: checks in minutes that "
        "the grid runs; report in reports/<profile>-dry-run (see docs/study_runner.md)",
    )
    study.add_argument("--out", default=None, help="report folder (default: reports/<profile>)")
    study.add_argument("--runs", default=None, help="trained-model folder (default: data/runs/<profile>)")
    study.add_argument("--quiet", action="store_true", help="no progress output")
    study.set_defaults(func=_cmd_study)

    train = commands.add_parser(
        "train",
        help="train and score one DSI cell of a profile (indexing, zero-shot, fine-tuning, fine-tuned); "
        "data-parallel under torchrun",
        description="Index one database of a profile until its target, score it, fine-tune it on retrieval "
        "pairs and score it again; print the metrics and write a JSON summary. It runs alike in one process "
        "and under torchrun: torchrun --standalone --nproc_per_node=P -m vitdsi_utils train ... shares every "
        "batch out over P processes (docs/distributed.md).",
    )
    train.add_argument("--profile", default="smoke", help="smoke, cpu, paper or a YAML profile path (default: smoke)")
    train.add_argument(
        "--images",
        "--n",
        dest="n",
        type=int,
        default=None,
        metavar="N",
        help="database size N, in images (default: the profile's first). Under torchrun write --images: torchrun "
        "reads --n as an abbreviation of its own options and stops",
    )
    train.add_argument("--ids", default=None, choices=CODEC_SCHEMES, help="ID scheme (default: the profile's first)")
    train.add_argument(
        "--seed", type=int, default=None, help="database draw and training seed (default: the profile's first)"
    )
    train.add_argument(
        "--run-dir",
        default=None,
        metavar="DIR",
        help="checkpoints and trained models; an interrupted run resumes there (default: "
        "data/runs/<profile>/<run name>, the study runner's folder)",
    )
    train.add_argument("--k", type=int, default=None, help="length of the ranked lists (default: the profile's K)")
    train.add_argument(
        "--device",
        default="auto",
        help="auto (under torchrun: cuda:LOCAL_RANK with GPUs; else cuda if available, else cpu) or a torch device",
    )
    train.add_argument("--summary", default=None, metavar="JSON", help="summary file (default: <run dir>/summary.json)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RunFolderBusy) as error:
        # errors of ours say what to do; a traceback would only bury the message
        print(f"vitdsi {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
