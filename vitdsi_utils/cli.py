"""Command line: ``vitdsi <command>`` or ``python -m vitdsi_utils <command>``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import settings


def _add_data_arguments(parser: argparse.ArgumentParser, *, sizes_default: int = 160) -> None:
    from .data import SIZES, SOURCES

    parser.add_argument("--source", default="imagenette", choices=SOURCES, help="image source (default: imagenette)")
    parser.add_argument("--root", default=None,
                        help="ImageFolder tree for --source folder, an Imagenette copy, or the COCO images folder "
                        "(default for coco: VITDSI_COCO_IMAGES)")
    parser.add_argument("--annotations", default=None,
                        help="COCO instances JSON for --source coco (default: VITDSI_COCO_ANNOTATIONS)")
    parser.add_argument("--size", type=int, default=sizes_default, choices=SIZES, help="image side in px")
    parser.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048], help="database sizes N (total images)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the database draw")


def _cmd_data(args: argparse.Namespace) -> int:
    from .data import build_database, load_images

    out = Path(args.out or settings.reports_dir() / "data")
    image_set = load_images(args.source, args.size, root=args.root, annotations=args.annotations)
    print(f"{len(image_set)} usable images in {len(image_set.classes)} classes "
          f"({len(image_set.skipped)} unreadable, {image_set.dropped_aspect} outside the aspect range"
          + (f", {len(image_set.unannotated)} without annotations" if image_set.is_multilabel else "") + ")")
    for n in args.n:
        for seed in args.seeds:
            for scheme in ("random", "clustered"):
                db = build_database(image_set, n, id_scheme=scheme, seed=seed)
                path = db.save_manifest(out / f"{args.source}-{args.size}px-N{n}-seed{seed}-{scheme}.csv")
            print(f"N={n} seed={seed}: " + ", ".join(f"{role} {count}" for role, count in db.counts().sum().items())
                  + f" -> {path.parent}")
    return 0


def _cmd_bovw(args: argparse.Namespace) -> int:
    from .evaluation import bovw_study

    out = Path(args.out or settings.reports_dir() / "bovw")
    start = time.perf_counter()
    results = bovw_study(
        args.source, args.size, args.n, args.seeds, out,
        n_words=args.words, rootsift=args.rootsift, tfidf=args.tfidf, root=args.root, annotations=args.annotations,
    )
    shown = results[results["metric"].isin(["mAP@10", "P@10", "R@100"])]
    print(shown[["n", "seed", "metric", "value", "ci_low", "ci_high", "chance"]].to_string(index=False))
    print(f"BoVW study done in {time.perf_counter() - start:.0f} s; tables in {out}")
    return 0


def _cmd_dsi(args: argparse.Namespace) -> int:
    from .experiments import dsi_study
    from .train import TrainConfig

    out = Path(args.out or settings.reports_dir() / "dsi")
    runs = Path(args.runs or settings.data_dir() / "runs" / "dsi")
    overrides = {"patch_size": args.patch, "dropout": args.dropout, "pos_encoding": args.pos}
    index_config = TrainConfig(
        epochs=args.index_epochs, target_accuracy=args.target_accuracy, lr=args.lr, seed=args.seeds[0],
        warmup_steps=args.warmup_steps, stop_metric=args.stop_metric,
    )
    retrieval_config = TrainConfig(epochs=args.retrieval_epochs, lr=args.lr, seed=args.seeds[0])
    start = time.perf_counter()
    results, _ = dsi_study(
        args.source, args.size, tuple(args.n), tuple(args.schemes), tuple(args.seeds),
        model_overrides=overrides, index_config=index_config, retrieval_config=retrieval_config,
        max_pairs_per_query=args.max_pairs_per_query, out_dir=out, runs_dir=runs,
        multitask=args.multitask, mix_ratio=args.mix_ratio,
        multitask_config=TrainConfig(epochs=args.multitask_epochs or args.retrieval_epochs, lr=args.lr,
                                     seed=args.seeds[0]), root=args.root, annotations=args.annotations,
    )
    shown = results[results["metric"].isin(["IA@1", "IA@5", "mAP@10", "P@10", "R@100"])]
    print(shown.pivot_table(index=["model", "n", "ids"], columns="metric", values="value").round(3).to_string())
    print(f"DSI study done in {time.perf_counter() - start:.0f} s; tables in {out}, checkpoints in {runs}")
    return 0


def _cmd_dense(args: argparse.Namespace) -> int:
    from .dense import DENSE_MODEL, DenseTrainConfig, dense_study

    out = Path(args.out or settings.reports_dir() / "dense")
    runs = Path(args.runs or settings.data_dir() / "runs" / "dense")
    overrides = {"patch_size": args.patch, "dim": args.dim, "mlp_dim": args.mlp_dim, "depth": args.depth,
                 "heads": args.heads, "dropout": args.dropout, "pos_encoding": args.pos, "pooling": args.pooling}
    train_config = DenseTrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, per_class=args.per_class, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, margin=args.margin,
        entropy_weight=args.entropy_weight, min_crop=args.min_crop, seed=args.seeds[0],
    )
    start = time.perf_counter()
    results, reranking, _ = dense_study(
        args.source, args.size, tuple(args.n), tuple(args.seeds), schemes=tuple(args.schemes),
        model_overrides=overrides, train_config=train_config, include_index=not args.queries_only,
        bovw_words=args.words, depths=tuple(args.depths), runs_dir=runs, dsi_runs=args.dsi_runs,
        dsi_table=args.dsi_table, out_dir=out, root=args.root,
    )
    shown = results[results["metric"].isin(["mAP@10", "P@10", "R@100"])]
    print(shown.pivot_table(index=["model", "n", "ids"], columns="metric", values="value").round(3).to_string())
    from .rerank import summary

    print(summary(reranking).round(3).to_string(index=False))
    print(f"{DENSE_MODEL} study done in {time.perf_counter() - start:.0f} s; tables in {out}, encoders in {runs}")
    return 0


def _model_overrides(args: argparse.Namespace) -> dict:
    return {"patch_size": args.patch, "dim": args.dim, "mlp_dim": args.mlp_dim, "depth": args.depth,
            "heads": args.heads, "dropout": args.dropout}


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patch", type=int, default=16, help="patch size (default 16, the paper's)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--mlp-dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--target-accuracy", type=float, default=0.99, help="indexing stops at this IA@1")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (training and beam search)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for training (CUDA only)")
    parser.add_argument("--ids", default="random", choices=["random", "clustered"], help="ID scheme (default random)")


def _cmd_scale(args: argparse.Namespace) -> int:
    from .data import load_images
    from .scale import scale_markdown, scale_study
    from .train import TrainConfig

    out = Path(args.out or settings.reports_dir() / "scale")
    runs = Path(args.runs or settings.data_dir() / "runs" / "scale")
    image_set = load_images(args.source, args.size, root=args.root, annotations=args.annotations)
    ns = [n if n > 0 else len(image_set) for n in args.n]  # 0 means every usable image
    ia_ns = [n if n > 0 else len(image_set) for n in args.ia_n]
    config = TrainConfig(epochs=args.index_epochs, lr=args.lr, batch_size=args.batch_size,
                         warmup_steps=args.warmup_steps, target_accuracy=args.target_accuracy, seed=args.seeds[0],
                         device=args.device, amp=args.amp, compile=args.compile)
    start = time.perf_counter()
    latency, ia, _ = scale_study(
        image_set, ns, ia_ns, index_config=config, out_dir=out, runs_dir=runs, model_overrides=_model_overrides(args),
        n_queries=args.queries, batch_size=args.query_batch, k=args.k, repeats=args.repeats, bovw_words=args.words,
        device=args.device, amp=args.amp, id_scheme=args.ids, seed=args.seeds[0], reuse_latency=args.reuse_latency,
    )
    print(scale_markdown(latency, ia, {"source": args.source, "size": args.size, "device": args.device, "k": args.k,
                                       "queries": args.queries, "repeats": args.repeats}))
    print(f"scale study done in {time.perf_counter() - start:.0f} s; tables and figure in {out}")
    return 0


def _cmd_incremental(args: argparse.Namespace) -> int:
    from .data import build_database, load_images
    from .incremental import incremental_study
    from .train import TrainConfig

    out = Path(args.out or settings.reports_dir() / "incremental")
    runs = Path(args.runs or settings.data_dir() / "runs" / "incremental")
    image_set = load_images(args.source, args.size, root=args.root, annotations=args.annotations)
    config = TrainConfig(epochs=args.index_epochs, lr=args.lr, batch_size=args.batch_size,
                         warmup_steps=args.warmup_steps, target_accuracy=args.target_accuracy, seed=args.seeds[0],
                         device=args.device, amp=args.amp, compile=args.compile)
    start = time.perf_counter()
    for n in args.n:
        db = build_database(image_set, n, id_scheme=args.ids, seed=args.seeds[0])
        results, _, _ = incremental_study(
            db, index_config=config, finetune_epochs=args.finetune_epochs, replay_ratios=args.replay_ratios,
            new_fraction=args.new_fraction, model_overrides=_model_overrides(args), out_dir=out, runs_dir=runs,
        )
        print(results.round(3).to_string(index=False))
    print(f"incremental study done in {time.perf_counter() - start:.0f} s; tables and figure in {out}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from .study import StudyFailed, run_study

    overrides = {"DATASET": args.dataset} if args.dataset else None
    try:
        run_study(args.profile, start_at=args.start_at, force=args.force, out_root=args.out,
                  runs_dir=args.runs, overrides=overrides, progress=not args.quiet)
    except StudyFailed as error:
        # with progress on, the runner has printed the error already
        print(f"vitdsi study: {error}" if args.quiet else "vitdsi study: stopped at the failing notebook",
              file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data import SOURCES

    parser = argparse.ArgumentParser(prog="vitdsi", description="ViT as a Differentiable Search Index: the study's tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="build the databases and write their manifests")
    _add_data_arguments(data)
    data.add_argument("--out", default=None, help="folder for manifests (default: reports/data)")
    data.set_defaults(func=_cmd_data)

    bovw = commands.add_parser("bovw", help="evaluate the BoVW baseline for each N (writes CSV + Markdown)")
    _add_data_arguments(bovw)
    bovw.add_argument("--words", type=int, default=200, help="visual words K (default: 200, the paper's)")
    bovw.add_argument("--rootsift", action="store_true", help="RootSIFT descriptors")
    bovw.add_argument("--tfidf", action="store_true", help="tf-idf weighting of the histograms")
    bovw.add_argument("--out", default=None, help="output folder (default: reports/bovw)")
    bovw.set_defaults(func=_cmd_bovw)
    dsi = commands.add_parser("dsi", help="train and evaluate ViT DSI (zero-shot and fine-tuned) for each N and ID scheme")
    _add_data_arguments(dsi)
    dsi.add_argument("--schemes", nargs="+", default=["clustered", "random"], choices=["clustered", "random"])
    dsi.add_argument("--patch", type=int, default=16, help="patch size (default 16)")
    dsi.add_argument("--dropout", type=float, default=0.1)
    dsi.add_argument("--pos", default="sinusoidal", choices=["sinusoidal", "learned", "conditional"])
    dsi.add_argument("--lr", type=float, default=5e-4)
    dsi.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up of the indexing phase")
    dsi.add_argument("--index-epochs", type=int, default=1000, help="most indexing epochs (stops at the target)")
    dsi.add_argument("--target-accuracy", type=float, default=0.98, help="indexing stops at this train accuracy")
    dsi.add_argument("--stop-metric", default="ia", choices=["ia", "eval", "train"],
                     help="what the indexing stop rule reads: IA@1 of beam search (ia, default), teacher-forced "
                          "accuracy without dropout (eval), or the running accuracy with dropout (train)")
    dsi.add_argument("--retrieval-epochs", type=int, default=75, help="fine-tuning epochs (paper: 75)")
    dsi.add_argument("--max-pairs-per-query", type=int, default=None,
                     help="cap on (query, relevant ID) pairs per query (default: all, as the paper)")
    dsi.add_argument("--multitask", action="store_true",
                     help="also train a multi-task model: pairs and indexing examples in the same epochs")
    dsi.add_argument("--mix-ratio", type=float, default=None,
                     help="with --multitask: retrieval pairs per indexed image per epoch (default: every pair once)")
    dsi.add_argument("--multitask-epochs", type=int, default=None,
                     help="with --multitask: its epochs (default: --retrieval-epochs)")
    dsi.add_argument("--out", default=None, help="output folder (default: reports/dsi)")
    dsi.add_argument("--runs", default=None, help="checkpoint folder (default: data/runs/dsi)")
    dsi.set_defaults(func=_cmd_dsi)

    dense = commands.add_parser("dense", help="train and evaluate the dense (contrastive ViT) baseline and the "
                                "re-ranking study for each N (writes CSV + Markdown + a figure)")
    _add_data_arguments(dense)
    dense.add_argument("--schemes", nargs="+", default=["clustered"], choices=["clustered", "random"],
                       help="ID schemes whose DSI models (in --dsi-runs) are re-ranked; the first draws the databases")
    dense.add_argument("--patch", type=int, default=16, help="patch size (default 16, as the DSI)")
    dense.add_argument("--dim", type=int, default=128)
    dense.add_argument("--mlp-dim", type=int, default=256)
    dense.add_argument("--depth", type=int, default=6)
    dense.add_argument("--heads", type=int, default=4)
    dense.add_argument("--dropout", type=float, default=0.1)
    dense.add_argument("--pos", default="sinusoidal", choices=["sinusoidal", "learned", "conditional"])
    dense.add_argument("--pooling", default="mean", choices=["mean", "cls"], help="mean of the patch tokens or a class token")
    dense.add_argument("--epochs", type=int, default=90)
    dense.add_argument("--batch-size", type=int, default=64)
    dense.add_argument("--per-class", type=int, default=2, help="same-class images per group in a batch (>= 2)")
    dense.add_argument("--lr", type=float, default=5e-4)
    dense.add_argument("--weight-decay", type=float, default=0.05)
    dense.add_argument("--warmup-steps", type=int, default=50)
    dense.add_argument("--margin", type=float, default=0.5, help="contrastive margin (seed 001: 0.5)")
    dense.add_argument("--entropy-weight", type=float, default=0.7, help="differential-entropy weight (seed 001: 0.7)")
    dense.add_argument("--min-crop", type=float, default=1.0, help="random crops down to this side fraction (1: none)")
    dense.add_argument("--queries-only", action="store_true",
                       help="train on the train queries only (default: also on the indexed images, as the DSI)")
    dense.add_argument("--words", type=int, default=200, help="BoVW visual words")
    dense.add_argument("--depths", type=int, nargs="+", default=[10, 50, 100], help="re-ranking depths M")
    dense.add_argument("--dsi-runs", default=None, help="folder of DSI runs (vitdsi dsi --runs) whose models to re-rank")
    dense.add_argument("--dsi-table", default=None, help="a DSI results CSV (vitdsi dsi) to show beside the dense rows")
    dense.add_argument("--out", default=None, help="output folder (default: reports/dense)")
    dense.add_argument("--runs", default=None, help="encoder checkpoints (default: data/runs/dense)")
    dense.set_defaults(func=_cmd_dense)

    scale = commands.add_parser("scale", help="latency per query against N (DSI beam search, BoVW, dense FAISS) and "
                                "IA@1 of a DSI trained on N images (writes CSV + Markdown + one figure)")
    _add_data_arguments(scale, sizes_default=64)
    scale.set_defaults(n=[512, 1024, 2048, 4096, 8192, 0])
    scale.add_argument("--ia-n", type=int, nargs="*", default=[512],
                       help="N of the DSI models trained for IA@1 (0: every usable image); none: latency only")
    scale.add_argument("--index-epochs", type=int, default=100, help="most indexing epochs per N (stops at the target)")
    _add_model_arguments(scale)
    scale.add_argument("--queries", type=int, default=64, help="queries in the timed batch")
    scale.add_argument("--query-batch", type=int, default=64, help="queries decoded together by the beam search")
    scale.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    scale.add_argument("--k", type=int, default=100, help="results per query (and the DSI beam width)")
    scale.add_argument("--words", type=int, default=200, help="BoVW visual words")
    scale.add_argument("--reuse-latency", action="store_true",
                       help="keep the latency table already in --out when it covers every N at these settings")
    scale.add_argument("--out", default=None, help="output folder (default: reports/scale)")
    scale.add_argument("--runs", default=None, help="checkpoint folder (default: data/runs/scale)")
    scale.set_defaults(func=_cmd_scale)

    incremental = commands.add_parser("incremental", help="add new images to a trained DSI: fine-tuning with and "
                                      "without replay against retraining from scratch (CSV + Markdown + figure)")
    _add_data_arguments(incremental, sizes_default=64)
    incremental.set_defaults(n=[1024])
    incremental.add_argument("--new-fraction", type=float, default=0.2, help="share of the indexed images added later")
    incremental.add_argument("--replay-ratios", type=float, nargs="+", default=[0.0, 1.0, 4.0],
                             help="old images replayed per new image and epoch (0: no replay)")
    incremental.add_argument("--index-epochs", type=int, default=200, help="most epochs of the initial and the full indexing")
    incremental.add_argument("--finetune-epochs", type=int, default=40, help="most fine-tuning epochs (stops when the "
                             "new images reach the target)")
    _add_model_arguments(incremental)
    incremental.add_argument("--out", default=None, help="output folder (default: reports/incremental)")
    incremental.add_argument("--runs", default=None, help="checkpoint folder (default: data/runs/incremental)")
    incremental.set_defaults(func=_cmd_incremental)

    study = commands.add_parser("study", help="run the study's notebooks with a profile's parameters (report in reports/<profile>)")
    study.add_argument("--profile", default="smoke", help="smoke (minutes, CI), cpu (~45 min on 2 cores), paper (GPU) "
                       "or a path to a YAML profile (default: smoke)")
    study.add_argument("--start-at", default=None, metavar="NAME",
                       help="run NAME (e.g. 04 or 04_retrieval) and every notebook after it; the ones before "
                       "are skipped unchecked and their earlier outputs reused")
    study.add_argument("--force", action="store_true",
                       help="rerun every notebook, even those whose executed copy is up to date "
                       "(by default a rerun skips them and starts at the first stale one)")
    study.add_argument("--dataset", default=None, choices=SOURCES,
                       help="run the profile on another image source, e.g. coco (reads VITDSI_COCO_IMAGES and "
                       "VITDSI_COCO_ANNOTATIONS); the report then goes to reports/<profile>-<dataset>")
    study.add_argument("--out", default=None, help="report folder (default: reports/<profile>)")
    study.add_argument("--runs", default=None, help="trained-model folder (default: data/runs/<profile>)")
    study.add_argument("--quiet", action="store_true", help="no progress output")
    study.set_defaults(func=_cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        # errors of ours say what to do; a traceback would only bury the message
        print(f"vitdsi {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
