"""Command line: ``vitdsi <command>`` or ``python -m vitdsi_utils <command>``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vitdsi_utils import settings
from vitdsi_utils.baselines.dense import DENSE_MODEL, DenseTrainConfig
from vitdsi_utils.baselines.ssl import SSLConfig
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import SIZES, SOURCES, load_images
from vitdsi_utils.ids.schemes import CODEC_SCHEMES
from vitdsi_utils.locks import RunFolderBusy
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.reports.tables import write_table
from vitdsi_utils.runner.run import StudyFailed, run_study
from vitdsi_utils.studies.ablations import (
    FACTORS,
    ablation_figure,
    ablation_grid,
    ablations_markdown,
    merge_results,
    run_ablations,
    summary_table,
)
from vitdsi_utils.studies.bovw import bovw_study, vlad_comparison
from vitdsi_utils.studies.dense import dense_study
from vitdsi_utils.studies.dense_init import dense_init_study
from vitdsi_utils.studies.dsi import dsi_study
from vitdsi_utils.studies.incremental import incremental_study
from vitdsi_utils.studies.pretrain import comparison_frame, pretrain_study
from vitdsi_utils.studies.rerank import summary
from vitdsi_utils.studies.scale import scale_markdown, scale_study
from vitdsi_utils.training.config import TrainConfig, check_int, check_number


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (as the errors of the commands themselves), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: The range of every numeric option, by its dest: (kind, low, high, low excluded, high excluded).
#: The configs check the same (TrainConfig, DenseTrainConfig, SSLConfig); here the error names the option.
_LIMITS: dict[str, tuple[type, float | None, float | None, bool, bool]] = {
    **{name: (int, 1, None, False, False) for name in (
        "epochs", "index_epochs", "retrieval_epochs", "multitask_epochs", "dense_epochs", "ssl_epochs",
        "finetune_epochs", "batch_size", "dense_batch_size", "ssl_batch_size", "query_batch", "max_pairs_per_query",
        "vocabularies", "words", "queries", "repeats", "k", "dim", "mlp_dim", "depth", "heads", "patch",
        "semantic_k", "semantic_c", "ssl_images", "depths")},
    **{name: (int, 0, None, False, False) for name in (
        "warmup_steps", "index_views", "consolidate", "stop_check_every", "seed", "seeds")},
    "per_class": (int, 2, None, False, False),
    **{name: (float, 0, None, True, False) for name in ("lr", "dense_lr", "ssl_lr", "temperature", "mix_ratio")},
    "target_accuracy": (float, 0, 1, True, False),
    **{name: (float, 0, 1, True, False) for name in ("view_min_crop", "min_crop", "min_scale")},
    **{name: (float, 0, 1, False, True) for name in ("label_smoothing", "dropout")},
    **{name: (float, 0, None, False, False) for name in ("weight_decay", "entropy_weight", "replay_ratios")},
    "new_fraction": (float, 0, 1, True, True),
}


def _ranged(kind: type, low: float | None, high: float | None, low_open: bool, high_open: bool):
    """An argparse ``type`` that parses ``kind`` and checks the range (one-line message without the option name)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        try:
            if kind is int:
                return check_int("", value, int(low))
            return check_number("", value, low, high, low_open=low_open, high_open=high_open)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def _check_ranges(parser: argparse.ArgumentParser) -> None:
    """Give every numeric option of ``parser`` and its commands the range of :data:`_LIMITS`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _check_ranges(command)
        elif action.dest in _LIMITS and action.type in (int, float):
            action.type = _ranged(*_LIMITS[action.dest])


def _add_data_arguments(parser: argparse.ArgumentParser, *, sizes_default: int = 160) -> None:

    parser.add_argument("--source", default="imagenette", choices=SOURCES, help="image source (default: imagenette)")
    parser.add_argument("--root", default=None,
                        help="ImageFolder tree for --source folder, an Imagenette copy, or the COCO images folder "
                        "(default for coco: VITDSI_COCO_IMAGES)")
    parser.add_argument("--annotations", default=None,
                        help="COCO instances JSON for --source coco (default: VITDSI_COCO_ANNOTATIONS)")
    parser.add_argument("--size", type=int, default=sizes_default, choices=SIZES, help="image side in px")
    parser.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048], help="database sizes N (total images)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the database draw")


def _add_fine_tune_options(parser: argparse.ArgumentParser) -> None:
    """The retrieval fine-tuning options of issue 5 (see ``phases.fine_tune``)."""
    parser.add_argument("--targets", default="pairs", choices=["pairs", "same-class"],
                        help="fine-tuning targets: fixed (query, relevant ID) pairs (default), or same-class: one "
                        "relevant ID per train query, redrawn at random every epoch")
    parser.add_argument("--index-views", type=int, default=0, metavar="K",
                        help="add K randomly flipped and cropped views of every indexed image per fine-tuning epoch, "
                        "as extra queries for that image's own ID (default 0: none)")
    parser.add_argument("--view-min-crop", type=float, default=0.7,
                        help="with --index-views: crops keep at least this fraction of the image side (default 0.7)")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="label smoothing of the fine-tuning cross-entropy (default 0)")
    _add_consolidate_argument(parser)


def _add_consolidate_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--consolidate", type=int, default=0, metavar="E",
                        help="after fine-tuning, up to E epochs of indexing alone, stopped once the indexed images' "
                        "IA@1 is back at the fine-tuning target accuracy (0.98) (default 0: none)")


def _cmd_data(args: argparse.Namespace) -> int:

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


#: Visual words when --words is not given: the paper's 200 for histograms, fewer for VLAD (K x 128 values).
BOVW_WORDS, VLAD_WORDS = 200, 64


#: k-means vocabularies BoVW's metrics are averaged over; one fit moves P@10 by a few points on a small database
BOVW_VOCABULARIES = 5


def _cmd_bovw(args: argparse.Namespace) -> int:

    out = Path(args.out or settings.reports_dir() / "bovw")
    encoding = "vlad" if args.vlad else "histogram"
    start = time.perf_counter()
    for n_words in args.words or [VLAD_WORDS if args.vlad else BOVW_WORDS]:
        results = bovw_study(
            args.source, args.size, args.n, args.seeds, out, n_words=n_words, encoding=encoding,
            rootsift=args.rootsift, tfidf=args.tfidf, power_normalisation=args.power_norm,
            intra_normalisation=args.intra_norm, vocabularies=args.vocabularies, root=args.root,
            annotations=args.annotations,
        )
        shown = results[results["metric"].isin(["mAP@10", "P@10", "R@100"])]
        print(f"{results['model'].iloc[0]} {results['variant'].iloc[0]}:")
        print(shown[["n", "seed", "metric", "value", "ci_low", "ci_high", "chance"]].to_string(index=False))
    print(f"BoVW study done in {time.perf_counter() - start:.0f} s; tables in {out}")
    if args.vlad:
        compared = vlad_comparison(out, args.source, args.size)
        print(f"VLAD beside plain BoVW ({compared['variant'].nunique()} variants): "
              f"{out / f'vlad_{args.source}_{args.size}px.md'}")
    return 0


def _cmd_dsi(args: argparse.Namespace) -> int:

    out = Path(args.out or settings.reports_dir() / "dsi")
    runs = Path(args.runs or settings.data_dir() / "runs" / "dsi")
    overrides = {"patch_size": args.patch, "dropout": args.dropout, "pos_encoding": args.pos}
    index_config = TrainConfig(
        epochs=args.index_epochs, target_accuracy=args.target_accuracy, lr=args.lr, seed=args.seeds[0],
        warmup_steps=args.warmup_steps, stop_metric=args.stop_metric,
    )
    retrieval_config = TrainConfig(epochs=args.retrieval_epochs, lr=args.lr, seed=args.seeds[0],
                                   label_smoothing=args.label_smoothing)
    if (args.encoder_init is None) != (args.encoder_weights is None):
        raise ValueError("--encoder-init and --encoder-weights go together: name the source and its file")
    encoder_init = (args.encoder_init, args.encoder_weights) if args.encoder_init else None
    start = time.perf_counter()
    results, _ = dsi_study(
        args.source, args.size, tuple(args.n), tuple(args.schemes), tuple(args.seeds),
        model_overrides=overrides, index_config=index_config, retrieval_config=retrieval_config,
        max_pairs_per_query=args.max_pairs_per_query, out_dir=out, runs_dir=runs,
        multitask=args.multitask, mix_ratio=args.mix_ratio,
        multitask_config=TrainConfig(epochs=args.multitask_epochs or args.retrieval_epochs, lr=args.lr,
                                     seed=args.seeds[0], label_smoothing=args.label_smoothing),
        root=args.root, annotations=args.annotations, encoder_init=encoder_init,
        targets=args.targets, index_views=args.index_views, view_min_crop=args.view_min_crop,
        consolidate=args.consolidate, fine_tune_phase=not args.no_fine_tune,
        bovw_vocabularies=args.vocabularies if args.bovw else 0, bovw_words=args.words,
    )
    shown = results[results["metric"].isin(["IA@1", "IA@5", "mAP@10", "P@10", "R@100"])]
    print(shown.pivot_table(index=["model", "n", "ids"], columns="metric", values="value").round(3).to_string())
    print(f"DSI study done in {time.perf_counter() - start:.0f} s; tables in {out}, checkpoints in {runs}")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:

    out = Path(args.out or settings.reports_dir() / "ablations")
    runs = Path(args.runs or settings.data_dir() / "runs" / "dsi")
    levels = {}
    for item in args.levels or []:
        factor, _, chosen = item.partition("=")
        if not chosen:
            raise ValueError(f"--levels takes FACTOR=LEVEL[,LEVEL...], e.g. patch=32; got {item!r}")
        levels[factor] = chosen.split(",")
    base = {"patch_size": args.patch, "dropout": args.dropout, "pos_encoding": args.pos}
    grid = ablation_grid(args.factors, base_model=base, levels=levels)
    index_config = TrainConfig(epochs=args.index_epochs, target_accuracy=args.target_accuracy, lr=args.lr,
                               seed=args.seed, warmup_steps=args.warmup_steps, stop_metric=args.stop_metric)
    retrieval_config = TrainConfig(epochs=args.retrieval_epochs, lr=args.lr, seed=args.seed)
    run_settings = {"source": args.source, "size": args.size, "n": args.n, "seed": args.seed, "scheme": args.scheme,
                    "index_epochs_cap": args.index_epochs, "retrieval_epochs": args.retrieval_epochs,
                    "max_pairs_per_query": args.max_pairs_per_query, "lr": args.lr}
    stem = out / f"ablations_{args.source}_{args.size}px_N{args.n}"
    note = (f"# ViT DSI ablations, {args.source} at {args.size} px, N = {args.n}, {args.scheme} IDs, seed {args.seed}\n\n"
            f"Default: patch {args.patch}, dropout {args.dropout}, {args.pos} positions, 25% of each class indexed, "
            f"plain fine-tuning. Indexing: lr {args.lr}, warm-up {args.warmup_steps} steps, until IA@1 >= "
            f"{args.target_accuracy} ({args.stop_metric} rule) or {args.index_epochs} epochs. Fine-tuning: "
            f"{args.retrieval_epochs} epochs, lr {args.lr}, at most {args.max_pairs_per_query} pairs per query.")

    def write(long):
        merged = merge_results(long, stem.with_suffix(".csv"), run_settings)
        write_table(merged, stem, markdown=ablations_markdown(merged, note))
        fig = ablation_figure(merged, index_cap=args.index_epochs,
                                        title=f"DSI ablations, {args.source} {args.size} px, N = {args.n}")
        save_figure(fig, out / f"ablations_{args.source}_{args.size}px_N{args.n}.png")
        return merged

    image_set = load_images(args.source, args.size, root=args.root, annotations=args.annotations)
    start = time.perf_counter()
    print(f"{len(grid)} variants: " + ", ".join(v.name for v in grid))
    long = run_ablations(
        image_set, grid, n=args.n, seed=args.seed, scheme=args.scheme, base_model=base, index_config=index_config,
        retrieval_config=retrieval_config, max_pairs_per_query=args.max_pairs_per_query,
        view_min_crop=args.view_min_crop, runs_dir=runs, on_variant=write,
    )
    merged = write(long)
    print(summary_table(merged).drop(columns=["factor", "level"]).to_string(index=False))
    print(f"ablations done in {time.perf_counter() - start:.0f} s; table and figure in {out}, models in {runs}")
    return 0


def _cmd_dense(args: argparse.Namespace) -> int:

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
        bovw_words=args.words, bovw_vocabularies=args.vocabularies, depths=tuple(args.depths), runs_dir=runs,
        dsi_runs=args.dsi_runs,
        dsi_table=args.dsi_table, out_dir=out, root=args.root,
    )
    shown = results[results["metric"].isin(["mAP@10", "P@10", "R@100"])]
    print(shown.pivot_table(index=["model", "n", "ids"], columns="metric", values="value").round(3).to_string())

    print(summary(reranking).round(3).to_string(index=False))
    print(f"{DENSE_MODEL} study done in {time.perf_counter() - start:.0f} s; tables in {out}, encoders in {runs}")
    return 0


def _cmd_dense_init(args: argparse.Namespace) -> int:

    out = Path(args.out or settings.reports_dir() / "dsi_dense_init")
    runs = Path(args.runs or settings.data_dir() / "runs" / "dsi_dense_init")
    dense_runs = Path(args.dense_runs or settings.data_dir() / "runs" / "dense")
    overrides = {"patch_size": args.patch, "dropout": args.dropout, "pos_encoding": args.pos}
    seed = args.seeds[0]
    start = time.perf_counter()
    results, _ = dense_init_study(
        args.source, args.size, tuple(args.n), tuple(args.schemes), tuple(args.seeds),
        model_overrides=overrides,
        dense_config=DenseTrainConfig(epochs=args.dense_epochs, lr=args.dense_lr, batch_size=args.dense_batch_size,
                                      seed=seed),
        dense_pooling=args.pooling,
        index_config=TrainConfig(epochs=args.index_epochs, target_accuracy=args.target_accuracy, lr=args.lr,
                                 warmup_steps=args.warmup_steps, seed=seed),
        multitask_config=TrainConfig(epochs=args.multitask_epochs, lr=args.lr, seed=seed),
        mix_ratio=args.mix_ratio, max_pairs_per_query=args.max_pairs_per_query, bovw_words=args.words,
        bovw_vocabularies=args.vocabularies, targets=args.targets, index_views=args.index_views,
        consolidate=args.consolidate,
        id_params={"k": args.semantic_k, "c": args.semantic_c},
        dense_runs=dense_runs, runs_dir=runs, out_dir=out,
        root=args.root,
    )
    shown = results[results["metric"].isin(["IA@1", "mAP@10", "P@10", "R@100"])]
    print(shown.pivot_table(index=["model", "n", "ids"], columns="metric", values="value").round(3).to_string())
    print(f"dense-init DSI study done in {time.perf_counter() - start:.0f} s; tables in {out}, checkpoints in {runs}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:

    out = Path(args.out or settings.reports_dir() / "pretrain")
    runs = Path(args.runs or settings.data_dir() / "runs" / "pretrain")
    seed = args.seeds[0]
    ssl_config = SSLConfig(epochs=args.ssl_epochs, batch_size=args.ssl_batch_size, lr=args.ssl_lr,
                           temperature=args.temperature, min_scale=args.min_scale, seed=seed)
    index_config = TrainConfig(epochs=args.index_epochs, target_accuracy=args.target_accuracy, lr=args.lr,
                               warmup_steps=args.warmup_steps, seed=seed)
    retrieval_config = TrainConfig(epochs=args.retrieval_epochs, lr=args.lr, seed=seed)
    start = time.perf_counter()
    result = pretrain_study(
        args.source, args.size, args.n[0], seed, args.scheme, exclude_ns=tuple(args.exclude_n),
        model_overrides={"patch_size": args.patch, "dropout": args.dropout, "pos_encoding": args.pos},
        ssl_config=ssl_config, index_config=index_config, retrieval_config=retrieval_config,
        max_pairs_per_query=args.max_pairs_per_query, baseline_table=args.baseline,
        baseline_histories=args.baseline_histories, train_scratch=args.scratch, max_images=args.ssl_images,
        semantic_ids={"k": args.semantic_k, "c": args.semantic_c} if args.semantic_ids else None,
        runs_dir=runs, out_dir=out, root=args.root,
    )
    print(comparison_frame(result["results"]).to_string(index=False))
    if len(result["paired"]):
        print(result["paired"].round(3).to_string(index=False))
    print(result["probes"][["encoder", "knn_acc", "linear_acc", "map@10", "chance"]].round(3).to_string(index=False))
    print(f"pretraining study done in {time.perf_counter() - start:.0f} s; tables in {out}, checkpoints in {runs}")


def _model_overrides(args: argparse.Namespace) -> dict:
    return {"patch_size": args.patch, "dim": args.dim, "mlp_dim": args.mlp_dim, "depth": args.depth,
            "heads": args.heads, "dropout": args.dropout}


def _index_config(args: argparse.Namespace):
    """The indexing settings of `_add_model_arguments` as a TrainConfig (epochs from --index-epochs)."""

    return TrainConfig(epochs=args.index_epochs, lr=args.lr, batch_size=args.batch_size,
                       warmup_steps=args.warmup_steps, target_accuracy=args.target_accuracy, seed=args.seeds[0],
                       stop_metric=args.stop_metric, stop_check_every=args.stop_check_every, device=args.device,
                       amp=args.amp, compile=args.compile)


def _add_vocabularies_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocabularies", type=int, default=BOVW_VOCABULARIES,
                        help="average BoVW's metrics per query over this many k-means vocabularies "
                        "(seeds seed, seed+1, ...)")


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
    parser.add_argument("--stop-metric", default="ia", choices=["ia", "eval", "train"],
                        help="how indexing's stop accuracy is read: ia = IA@1 of beam search (default), eval = "
                        "teacher-forced accuracy without dropout (cheap at large N; IA@1 is then measured once at "
                        "the end), train = the running accuracy")
    parser.add_argument("--stop-check-every", type=int, default=0, metavar="E",
                        help="with --stop-metric ia/eval: also check every E epochs, whatever the running accuracy "
                        "(default 0: only once the running accuracy, with dropout, is within 80%% of the target)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (training and beam search)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for training (CUDA only)")
    parser.add_argument("--ids", default="random", choices=["random", "clustered"], help="ID scheme (default random)")


def _cmd_scale(args: argparse.Namespace) -> int:

    out = Path(args.out or settings.reports_dir() / "scale")
    runs = Path(args.runs or settings.data_dir() / "runs" / "scale")
    image_set = load_images(args.source, args.size, root=args.root, annotations=args.annotations)
    ns = [n if n > 0 else len(image_set) for n in args.n]  # 0 means every usable image
    ia_ns = [n if n > 0 else len(image_set) for n in args.ia_n]
    config = _index_config(args)
    start = time.perf_counter()
    latency, ia, _ = scale_study(
        image_set, ns, ia_ns, index_config=config, out_dir=out, runs_dir=runs, model_overrides=_model_overrides(args),
        n_queries=args.queries, batch_size=args.query_batch, k=args.k, repeats=args.repeats, bovw_words=args.words,
        device=args.device, amp=args.amp, id_scheme=args.ids, seed=args.seeds[0], reuse_latency=args.reuse_latency,
        keep_ia=args.keep_ia,
    )
    print(scale_markdown(latency, ia, {"source": args.source, "size": args.size, "device": args.device, "k": args.k,
                                       "queries": args.queries, "repeats": args.repeats}))
    print(f"scale study done in {time.perf_counter() - start:.0f} s; tables and figure in {out}")
    return 0


def _cmd_incremental(args: argparse.Namespace) -> int:

    out = Path(args.out or settings.reports_dir() / "incremental")
    runs = Path(args.runs or settings.data_dir() / "runs" / "incremental")
    image_set = load_images(args.source, args.size, root=args.root, annotations=args.annotations)
    config = _index_config(args)
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

    parser = _Parser(prog="vitdsi", description="ViT as a Differentiable Search Index: the study's tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="build the databases and write their manifests")
    _add_data_arguments(data)
    data.add_argument("--out", default=None, help="folder for manifests (default: reports/data)")
    data.set_defaults(func=_cmd_data)

    bovw = commands.add_parser("bovw", help="evaluate the BoVW baseline for each N (writes CSV + Markdown)")
    _add_data_arguments(bovw)
    bovw.add_argument("--words", type=int, nargs="+", default=None,
                      help=f"visual words K, one run per value (default: {BOVW_WORDS}, the paper's; {VLAD_WORDS} with --vlad)")
    bovw.add_argument("--vlad", action="store_true",
                      help="VLAD encoding (per-word sums of residuals, K x 128 values) instead of word histograms; "
                      "also writes vlad_<source>_<size>px.{csv,md}: every VLAD table of --out beside plain BoVW "
                      f"with {BOVW_WORDS} words (run that first)")
    _add_vocabularies_argument(bovw)
    bovw.add_argument("--rootsift", action="store_true", help="RootSIFT descriptors")
    bovw.add_argument("--tfidf", action="store_true", help="tf-idf weighting of the histograms (not with --vlad)")
    bovw.add_argument("--power-norm", action=argparse.BooleanOptionalAction, default=None,
                      help="signed square root of every component before L2 (default: on with --vlad, off for histograms)")
    bovw.add_argument("--intra-norm", action="store_true", help="with --vlad: L2-normalise each word's block first")
    bovw.add_argument("--out", default=None, help="output folder (default: reports/bovw)")
    bovw.set_defaults(func=_cmd_bovw)
    dsi = commands.add_parser("dsi", help="train and evaluate ViT DSI (zero-shot and fine-tuned) for each N and ID scheme")
    _add_data_arguments(dsi)

    dsi.add_argument("--schemes", nargs="+", default=["clustered", "random"], choices=CODEC_SCHEMES,
                     help="ID schemes (default: clustered random); atomic is one output token per indexed image, "
                          "semantic and rq are k-means codes of the indexed images' BoVW histograms")
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
    dsi.add_argument("--encoder-init", default=None, choices=["ssl", "dense", "dsi", "torchvision"],
                     help="start the encoder from pretrained weights (default: random): a `vitdsi pretrain` "
                          "checkpoint, a dense encoder, a DSI model or a torchvision ViT state dict")
    dsi.add_argument("--encoder-weights", default=None, metavar="PATH",
                     help="with --encoder-init: the checkpoint or state dict to copy the encoder from")
    dsi.add_argument("--no-fine-tune", action="store_true",
                     help="skip plain retrieval fine-tuning (keep the zero-shot and, with --multitask, the multi-task model)")
    dsi.add_argument("--bovw", action="store_true",
                     help="add BoVW's rows for each database (--words words, averaged over --vocabularies k-means "
                     "vocabularies) and target 3's verdict for every DSI row")
    dsi.add_argument("--words", type=int, default=200, help="with --bovw: BoVW visual words (default 200, the paper's)")
    _add_vocabularies_argument(dsi)
    _add_fine_tune_options(dsi)
    dsi.add_argument("--out", default=None, help="output folder (default: reports/dsi)")
    dsi.add_argument("--runs", default=None, help="checkpoint folder (default: data/runs/dsi)")
    dsi.set_defaults(func=_cmd_dsi)

    ablate = commands.add_parser("ablate", help="DSI ablations, one factor at a time: positions, patch, dropout, "
                                 "indexed share, mix ratio, fine-tuning options (writes CSV + Markdown + a figure)")

    ablate.add_argument("--source", default="imagenette", choices=SOURCES, help="image source (default: imagenette)")
    ablate.add_argument("--root", default=None, help="image folder for --source folder / coco, or an Imagenette copy")
    ablate.add_argument("--annotations", default=None, help="COCO instances JSON for --source coco")
    ablate.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    ablate.add_argument("--n", type=int, default=512, help="database size N (default 512)")
    ablate.add_argument("--seed", type=int, default=0, help="database draw and training seed (default 0)")
    ablate.add_argument("--scheme", default="clustered", choices=["clustered", "random"], help="ID scheme")
    ablate.add_argument("--factors", nargs="+", default=list(FACTORS), choices=list(FACTORS),
                        help="factors to vary, one at a time from the default (default: all)")
    ablate.add_argument("--levels", nargs="+", default=None, metavar="FACTOR=L1,L2",
                        help="keep only these levels of a factor, e.g. patch=32 (levels: "
                        + "; ".join(f"{f}: {', '.join(label for label, _ in v)}" for f, v in FACTORS.items()) + ")")
    ablate.add_argument("--patch", type=int, default=16, help="default patch size")
    ablate.add_argument("--dropout", type=float, default=0.1, help="default dropout")
    ablate.add_argument("--pos", default="sinusoidal", choices=["sinusoidal", "learned", "conditional"],
                        help="default positional encoding")
    ablate.add_argument("--lr", type=float, default=1e-3)
    ablate.add_argument("--warmup-steps", type=int, default=100, help="warm-up of the indexing phase")
    ablate.add_argument("--index-epochs", type=int, default=150, help="cap on indexing epochs (stops at the target)")
    ablate.add_argument("--target-accuracy", type=float, default=0.99, help="indexing stops at this IA@1")
    ablate.add_argument("--stop-metric", default="ia", choices=["ia", "eval", "train"])
    ablate.add_argument("--retrieval-epochs", type=int, default=10, help="fine-tuning epochs")
    ablate.add_argument("--max-pairs-per-query", type=int, default=5, help="cap on pairs per query (pairs mode)")
    ablate.add_argument("--view-min-crop", type=float, default=0.7, help="crop side fraction of the index views")
    ablate.add_argument("--out", default=None, help="output folder (default: reports/ablations)")
    ablate.add_argument("--runs", default=None, help="model folder (default: data/runs/dsi, shared with vitdsi dsi, "
                        "so the default variant reuses its models)")
    ablate.set_defaults(func=_cmd_ablate)

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
    _add_vocabularies_argument(dense)
    dense.add_argument("--depths", type=int, nargs="+", default=[10, 50, 100], help="re-ranking depths M")
    dense.add_argument("--dsi-runs", default=None, help="folder of DSI runs (vitdsi dsi --runs) whose models to re-rank")
    dense.add_argument("--dsi-table", default=None, help="a DSI results CSV (vitdsi dsi) to show beside the dense rows")
    dense.add_argument("--out", default=None, help="output folder (default: reports/dense)")
    dense.add_argument("--runs", default=None, help="encoder checkpoints (default: data/runs/dense)")
    dense.set_defaults(func=_cmd_dense)

    init = commands.add_parser(
        "dense-init", help="DSI whose encoder starts from the dense encoder, trained multi-task, beside BoVW and "
        "the dense model; checks targets 3 and 4 (writes CSV + Markdown)")
    _add_data_arguments(init)
    init.add_argument("--schemes", nargs="+", default=["clustered", "random", "semantic"],
                      choices=["clustered", "random", "semantic"],
                      help="ID schemes (semantic: hierarchical k-means over the dense embeddings)")
    init.add_argument("--patch", type=int, default=16, help="patch size (default 16)")
    init.add_argument("--dropout", type=float, default=0.1)
    init.add_argument("--pos", default="sinusoidal", choices=["sinusoidal", "learned", "conditional"])
    init.add_argument("--pooling", default="mean", choices=["mean", "cls"], help="the dense encoder's pooling")
    init.add_argument("--dense-epochs", type=int, default=90, help="dense encoder epochs (loaded when trained already)")
    init.add_argument("--dense-lr", type=float, default=5e-4)
    init.add_argument("--dense-batch-size", type=int, default=64)
    init.add_argument("--lr", type=float, default=1e-3, help="learning rate of indexing and multi-task training")
    init.add_argument("--warmup-steps", type=int, default=100)
    init.add_argument("--index-epochs", type=int, default=400, help="most indexing epochs (stops at the target)")
    init.add_argument("--target-accuracy", type=float, default=0.99, help="indexing stops at this IA@1")
    init.add_argument("--multitask-epochs", type=int, default=30)
    init.add_argument("--mix-ratio", type=float, default=2.0, help="retrieval pairs per indexed image per epoch")
    init.add_argument("--max-pairs-per-query", type=int, default=5,
                      help="cap on (query, relevant ID) pairs per query (a seeded sample)")
    init.add_argument("--targets", default="pairs", choices=["pairs", "same-class"],
                      help="multi-task retrieval targets: fixed (query, relevant ID) pairs, or one relevant ID "
                      "drawn per train query and epoch")
    init.add_argument("--index-views", type=int, default=0,
                      help="augmented views of every indexed image per epoch as extra queries of its own ID")
    _add_consolidate_argument(init)
    init.add_argument("--semantic-k", type=int, default=10, help="semantic IDs: k-means branching factor")
    init.add_argument("--semantic-c", type=int, default=10, help="semantic IDs: leaf size")
    init.add_argument("--words", type=int, default=200, help="BoVW visual words")
    _add_vocabularies_argument(init)
    init.add_argument("--dense-runs", default=None, help="dense encoders (default: data/runs/dense, as vitdsi dense)")
    init.add_argument("--runs", default=None, help="DSI checkpoints (default: data/runs/dsi_dense_init)")
    init.add_argument("--out", default=None, help="output folder (default: reports/dsi_dense_init)")
    init.set_defaults(func=_cmd_dense_init)
    pretrain = commands.add_parser("pretrain", help="self-supervised pretraining of the DSI encoder on images "
                                   "outside the database, then the DSI from it, compared with from scratch")
    _add_data_arguments(pretrain)
    pretrain.set_defaults(n=[512])
    pretrain.add_argument("--scheme", default="clustered", choices=["clustered", "random"])
    pretrain.add_argument("--exclude-n", type=int, nargs="+", default=[512, 1024, 2048],
                          help="pretrain only on images that none of the databases of these sizes uses")
    pretrain.add_argument("--ssl-epochs", type=int, default=4, help="pretraining epochs over the outside images")
    pretrain.add_argument("--ssl-batch-size", type=int, default=128)
    pretrain.add_argument("--ssl-images", type=int, default=None,
                          help="pretrain on a seeded random subset of this many outside images (default: all)")
    pretrain.add_argument("--ssl-lr", type=float, default=1e-3)
    pretrain.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature")
    pretrain.add_argument("--min-scale", type=float, default=0.25, help="smallest crop area fraction")
    pretrain.add_argument("--patch", type=int, default=16)
    pretrain.add_argument("--dropout", type=float, default=0.1)
    pretrain.add_argument("--pos", default="sinusoidal", choices=["sinusoidal", "learned", "conditional"])
    pretrain.add_argument("--lr", type=float, default=1e-3, help="DSI learning rate (both phases)")
    pretrain.add_argument("--warmup-steps", type=int, default=100)
    pretrain.add_argument("--index-epochs", type=int, default=400)
    pretrain.add_argument("--target-accuracy", type=float, default=0.99)
    pretrain.add_argument("--retrieval-epochs", type=int, default=10)
    pretrain.add_argument("--max-pairs-per-query", type=int, default=5)
    pretrain.add_argument("--baseline", default=None,
                          help="a `vitdsi dsi` results CSV whose from-scratch rows are compared (e.g. "
                               "reports/dsi/dsi_imagenette_64px.csv)")
    pretrain.add_argument("--baseline-histories", default=None, help="its histories CSV, for the indexing curves")
    pretrain.add_argument("--scratch", action="store_true", help="also train the from-scratch DSI here (same settings), and compare "
                          "it with the SSL-initialised one query by query (paired bootstrap)")
    pretrain.add_argument("--semantic-ids", action="store_true",
                          help="also train a DSI from the SSL encoder whose IDs are semantic IDs (hierarchical "
                          "k-means) over the SSL encoder's embeddings of the indexed images: label-free IDs")
    pretrain.add_argument("--semantic-k", type=int, default=10, help="semantic IDs: k-means branching factor")
    pretrain.add_argument("--semantic-c", type=int, default=10, help="semantic IDs: leaf size")
    pretrain.add_argument("--out", default=None, help="output folder (default: reports/pretrain)")
    pretrain.add_argument("--runs", default=None, help="checkpoint folder (default: data/runs/pretrain)")
    pretrain.set_defaults(func=_cmd_pretrain)

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
    scale.add_argument("--k", type=int, nargs="+", default=[100],
                       help="results per query (and the DSI beam width); several (e.g. 10 100): latency for each, "
                       "IA@1 with the largest")
    scale.add_argument("--words", type=int, default=200, help="BoVW visual words")
    scale.add_argument("--keep-ia", action="store_true",
                       help="latency only: train nothing, keep the IA@1 table already in --out and redraw the "
                       "figure with it (--ia-n is ignored)")
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
    study.add_argument("--profile", default="smoke", help="smoke (minutes, CI), cpu (64 px, about 40 minutes on 2 cores), paper (GPU) "
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
    _check_ranges(parser)
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
