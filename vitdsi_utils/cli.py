"""Command line: ``vitdsi <command>`` or ``python -m vitdsi_utils <command>``.

``vitdsi run RECIPE [--set KEY=VALUE ...]`` runs a study from a recipe (``recipes/*.yaml``, see
:mod:`vitdsi_utils.studies.recipes`); ``vitdsi recipes`` lists them; ``vitdsi study --profile NAME`` runs the
notebooks; ``vitdsi data`` writes the databases' manifests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitdsi_utils import settings
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import SIZES, SOURCES, load_images
from vitdsi_utils.locks import RunFolderBusy
from vitdsi_utils.runner.run import StudyFailed, run_study
from vitdsi_utils.studies.recipes import dump_runs, list_recipes, load_recipe, run_recipe


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
                path = db.save_manifest(out / f"{image_set.name}-{args.size}px-N{n}-seed{seed}-{scheme}.csv")
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
        help="smoke (minutes, CI), cpu (64 px, about 40 minutes on 2 cores), paper-cpu (160 px, Table 1's "
        "models, about 2.5 hours on 2 cores), paper (GPU) or a path to a YAML profile (default: smoke)",
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
        "epoch per phase, a small model and budgets, N / 8 and a subset of the images: checks in minutes that "
        "the grid runs; report in reports/<profile>-dry-run (see docs/study_runner.md)",
    )
    study.add_argument("--out", default=None, help="report folder (default: reports/<profile>)")
    study.add_argument("--runs", default=None, help="trained-model folder (default: data/runs/<profile>)")
    study.add_argument("--quiet", action="store_true", help="no progress output")
    study.set_defaults(func=_cmd_study)
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
