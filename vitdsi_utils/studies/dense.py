"""The dense-baseline study: dense search beside BoVW and the DSI, and re-ranking of their candidates.

:func:`run` runs a :class:`DenseSpec`: per database the dense encoder is trained (or loaded), scored
beside BoVW, and re-ranks BoVW's and the DSI's candidates. Notebook 07 and ``vitdsi run recipes/dense.yaml``
both call it; a profile's paths (the notebook's) give the notebook's tables, figures and verdicts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vitdsi_utils.baselines.dense import DENSE_MODEL, DenseConfig, DenseTrainConfig
from vitdsi_utils.baselines.index import faiss_available
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import SIZES, load_images
from vitdsi_utils.evaluation import evaluate_bovw, retrieval_metrics
from vitdsi_utils.ids.codec import ID_SCHEMES, make_codec
from vitdsi_utils.reports.paper import TABLE1_NOTE, attach_paper, table1_markdown
from vitdsi_utils.reports.plots import metric_vs_n, save_figure, training_curves
from vitdsi_utils.reports.tables import write_table
from vitdsi_utils.retrieval.rerank import VectorScorer
from vitdsi_utils.retrieval.searchers import BoVWSearcher, DenseRetriever, DSISearcher
from vitdsi_utils.runs import DENSE_FILE, DSI_MODEL_FILES, StudyPaths, database_name, run_name
from vitdsi_utils.studies.dense_report import dense_markdown
from vitdsi_utils.studies.rerank import rerank_markdown, rerank_study, summary, tradeoff_figure
from vitdsi_utils.studies.specs import (
    ImageSourceSpec,
    ModelSpec,
    check_choices,
    full_model,
    refuse_profile_only,
    spec_images,
)
from vitdsi_utils.training.checkpoint import load_model


@dataclass
class DenseSpec(ImageSourceSpec):
    """Settings of the dense-baseline study (recipe ``study: dense``).

    ``model`` is the dense encoder (the DSI's size, mean pooling), ``train`` its contrastive training.
    ``schemes`` name the ID schemes whose DSI models in ``dsi_runs`` are re-ranked (the first draws the
    databases); ``dsi_table`` (a DSI study's CSV) adds its rows of the same databases beside the dense rows.
    ``annotations`` is read by a profile's study only; a recipe's COCO run takes them from VITDSI_COCO_ANNOTATIONS.
    """

    size: int = field(default=160, metadata={"choices": SIZES})
    ns: tuple[int, ...] = (512, 1024, 2048)
    seeds: tuple[int, ...] = (0,)
    schemes: tuple[str, ...] = field(default=("clustered",), metadata={"choices": ID_SCHEMES})
    model: ModelSpec = field(default_factory=lambda: full_model(pos_encoding="sinusoidal", pooling="mean"))
    train: DenseTrainConfig = field(default_factory=lambda: DenseTrainConfig(epochs=90))
    include_index: bool = True  # train on the indexed images too, as the DSI (false: the train queries only)
    words: int = 200  # BoVW visual words
    vocabularies: int = 5  # BoVW metrics averaged per query over this many k-means vocabularies
    depths: tuple[int, ...] = (10, 50, 100)  # re-ranking depths M
    k: int = 100  # length of the ranked lists
    dsi_runs: str | None = None  # a folder of DSI runs whose models are re-ranked
    dsi_table: str | None = None

    #: settings only a notebook profile's study reads (a recipe that sets them is refused)
    PROFILE_ONLY = ("annotations", "name")

    #: notebook profile keys (07_dense) -> spec keys
    PROFILE_KEYS = {
        **ImageSourceSpec.PROFILE_KEYS,
        "SIZE": "size",
        "NS": "ns",
        "ID_SCHEMES": "schemes",
        "SEEDS": ("seeds", "train.seed[0]"),
        **ModelSpec.PROFILE_KEYS,
        "DENSE_POOLING": "model.pooling",
        "DENSE_EPOCHS": "train.epochs",
        "DENSE_LR": "train.lr",
        "DENSE_BATCH_SIZE": "train.batch_size",
        "DENSE_MARGIN": "train.margin",
        "DENSE_ENTROPY_WEIGHT": "train.entropy_weight",
        "DENSE_TRAIN_ON_INDEX": "include_index",
        "BOVW_WORDS": "words",
        "BOVW_VOCABULARIES": "vocabularies",
        "RERANK_DEPTHS": "depths",
        "K": "k",
    }

    def __post_init__(self) -> None:
        check_choices(self)


class DenseResult(NamedTuple):
    """What :func:`run` returns: the Table-1 rows, the re-ranking rows, the training histories, and
    (a profile's study) its figures by file stem."""

    results: pd.DataFrame
    reranking: pd.DataFrame
    histories: pd.DataFrame
    figures: dict[str, Figure] = {}


def run(spec: DenseSpec, paths: StudyPaths) -> DenseResult:
    """The dense study of ``spec``: encoders to ``paths.runs``, tables and figures to ``paths.out``.

    With a profile's paths (:meth:`StudyPaths.create`, notebook 07) it is that profile's study: see
    :func:`_profile_study`. Otherwise (a recipe) :func:`_dense_study` writes its files into ``paths.out``.
    """
    if paths.profile is not None:
        return _profile_study(spec, paths)
    refuse_profile_only(spec)
    return DenseResult(
        *_dense_study(
            spec.source,
            spec.size,
            tuple(spec.ns),
            tuple(spec.seeds),
            schemes=tuple(spec.schemes),
            model_overrides=spec.model.overrides(),
            train_config=spec.train,
            include_index=spec.include_index,
            bovw_words=spec.words,
            bovw_vocabularies=spec.vocabularies,
            depths=tuple(spec.depths),
            k=spec.k,
            runs_dir=paths.runs,
            dsi_runs=spec.dsi_runs,
            dsi_table=spec.dsi_table,
            out_dir=paths.out,
            root=spec.root,
        )
    )


def console_summary(spec: DenseSpec, result: DenseResult) -> str:
    """Headline metrics per model, N and ID scheme, then the re-ranking summary."""
    results, reranking = result[0], result[1]
    shown = results[results["metric"].isin(["mAP@10", "P@10", "R@100"])]
    return "\n".join(
        [
            shown.pivot_table(index=["model", "n", "ids"], columns="metric", values="value").round(3).to_string(),
            summary(reranking).round(3).to_string(index=False),
        ]
    )


# ------------------------------------------------------------------------------------------
# One database: train (or load), evaluate
# ------------------------------------------------------------------------------------------
def training_images(db: Any, *, include_index: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The labelled images the encoder learns from: the train queries, plus the indexed images.

    The fine-tuned DSI learns from the same two sets (train queries as inputs, indexed images
    through their IDs), so with ``include_index`` both models see the same labelled images.
    Validation and test queries are never trained on.
    """
    images, labels = db.split("train")
    if include_index:
        index_images, index_labels = db.split("index")
        images, labels = np.concatenate([images, index_images]), np.concatenate([labels, index_labels])
    return images, labels


def train_or_load(
    db: Any,
    *,
    model_overrides: dict | None = None,
    train_config: DenseTrainConfig | None = None,
    include_index: bool = True,
    run_dir: str | os.PathLike | None = None,
    backend: str = "auto",
) -> DenseRetriever:
    """The dense retriever of ``db``: trained on :func:`training_images`, with the val queries as validation.

    With ``run_dir`` the encoder is saved as ``dense.pt`` there; a later call with the same
    settings loads it instead of training again (``retriever.loaded_`` is then True), and an
    interrupted training resumes. The retriever comes back with ``db``'s indexed images indexed.
    """
    train_config = train_config or DenseTrainConfig()
    path = Path(run_dir) / DENSE_FILE if run_dir is not None else None
    images, labels = training_images(db, include_index=include_index)
    index_images, index_labels = db.split("index")
    val_images, val_labels = db.split("val")
    val = (val_images, val_labels, index_images, index_labels) if len(val_images) else None
    config = DenseConfig(image_size=int(db.settings["size"]), **(model_overrides or {}))
    retriever = DenseRetriever(config, train_config, backend=backend)
    retriever.fit(images, labels, val=val, checkpoint_path=path)
    return retriever.index(index_images)


def evaluate_dense(
    retriever: DenseRetriever, db: Any, *, k: int = 100, query_role: str = "test", seed: int = 0
) -> tuple[pd.DataFrame, dict]:
    """Index ``db``'s indexed images and score the top-``k`` lists of its ``query_role`` queries.

    Returns (table, timings): the rows of :func:`evaluation.retrieval_metrics` (mAP@10, P@10,
    R@100 and the paper protocol, with intervals and chance), labelled like the other models'
    rows (``model`` = :data:`DENSE_MODEL`, source, size, n, ``ids`` "-", seed), and the wall
    times of indexing and search (embedding the queries included). ``seed`` seeds the
    bootstrap; ``seed`` in the table is the database's.
    """

    index_images, _ = db.split("index")
    query_images, _ = db.split(query_role)
    retriever.index(index_images)
    start = time.perf_counter()
    _, ranked = retriever.search(query_images, k)
    searched = time.perf_counter() - start
    table = retrieval_metrics(
        ranked, db.relevance_labels(query_role), db.relevance_labels("index"), kind=db.relevance_kind, seed=seed
    )
    s = db.settings
    table = table.assign(model=DENSE_MODEL, source=s["source"], size=s["size"], n=s["n"], ids="-", seed=s["seed"])
    timings = {
        "index_s": retriever.index_seconds_,
        "search_s": searched,
        "search_ms_per_query": 1000 * searched / max(len(query_images), 1),
        "n_index": len(index_images),
        "train_s": getattr(retriever, "fit_seconds_", float("nan")),
        "backend": retriever.index_.backend,
    }
    return table, timings


# ------------------------------------------------------------------------------------------
# The study: dense beside BoVW and DSI, and re-ranking, for every database of a grid
# ------------------------------------------------------------------------------------------
def first_stages(db: Any, *, bovw: Any = None, dsi_run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The first-stage searchers available for ``db``: a fitted BoVW, and the DSI models a run folder holds.

    DSI models are ``zero_shot.pt`` / ``fine_tuned.pt`` in ``dsi_run_dir`` (the folder of
    ``db``'s run, as notebooks 03/04 or the DSI study write it); a model trained on another
    database (other IDs) is an error rather than a silent mismatch.
    """

    stages: dict[str, Any] = {}
    if bovw is not None:
        stages["BoVW"] = BoVWSearcher(bovw)
    if dsi_run_dir is not None:
        expected = make_codec(db.n_index).codes
        for name, file in DSI_MODEL_FILES:
            path = Path(dsi_run_dir) / file
            if path.is_file():
                model, codec, _ = load_model(path)
                if codec.codes != expected:
                    raise ValueError(f"{path} was trained on another database (its IDs differ); delete it and retrain")
                stages[name] = DSISearcher(model, codec)
    return stages


def rerank_database(
    db: Any,
    retriever: DenseRetriever,
    stages: dict[str, Any],
    *,
    depths: tuple[int, ...] = (10, 50, 100),
    k: int = 100,
    include_alone: bool = True,
    query_role: str = "test",
) -> pd.DataFrame:
    """:func:`rerank.rerank_study` of ``stages`` re-scored by the dense encoder, on ``db``'s test queries.

    The retriever's index is rebuilt over ``db``'s indexed images first (their row order
    follows ``db``'s ID scheme). Rows are labelled with ``n``, ``ids`` (the scheme for DSI
    first stages, "-" for the others, whose results do not depend on IDs) and ``seed``.
    ``include_alone`` adds the dense search alone (first_stage "-").
    """

    retriever.index(db.split("index")[0])
    query_images, _ = db.split(query_role)
    study = rerank_study(
        stages,
        VectorScorer.from_dense(retriever, "dense"),
        query_images,
        db.relevance_labels(query_role),
        db.relevance_labels("index"),
        kind=db.relevance_kind,
        depths=depths,
        k=k,
        seed=int(db.settings["seed"]),
        include_alone=include_alone,
    )
    s = db.settings
    ids = np.where(study["first_stage"].str.startswith("DSI"), s["id_scheme"], "-")
    return study.assign(n=s["n"], ids=ids, seed=s["seed"], size=s["size"], source=s["source"])


def _dense_study(
    source: str = "imagenette",
    size: int = 64,
    ns: tuple[int, ...] = (512, 1024),
    seeds: tuple[int, ...] = (0,),
    *,
    schemes: tuple[str, ...] = ("clustered",),
    model_overrides: dict | None = None,
    train_config: DenseTrainConfig | None = None,
    include_index: bool = True,
    bovw_words: int = 200,
    bovw_vocabularies: int = 1,
    depths: tuple[int, ...] = (10, 50, 100),
    k: int = 100,
    runs_dir: str | os.PathLike | None = None,
    dsi_runs: str | os.PathLike | None = None,
    dsi_table: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train, evaluate and re-rank for every N and seed; return (results, re-ranking, histories).

    Per database (drawn with ``schemes[0]``'s IDs): the dense encoder is trained (or loaded
    from ``runs_dir``) and evaluated, and BoVW is fitted and evaluated on the same test
    queries (averaged over ``bovw_vocabularies`` k-means vocabularies). The re-ranking study
    re-scores BoVW's candidates and, for every scheme whose DSI models ``dsi_runs/<run name>/``
    holds, the DSI's, with the dense encoder. ``dsi_table``
    (a CSV written by the DSI study) adds the DSI rows of the same databases to the results
    for comparison. With ``out_dir``: ``dense_<source>_<size>px``, ``rerank_<source>_<size>px``
    (CSV + Markdown), ``histories_dense_<source>_<size>px.csv`` and the figure
    ``rerank_<source>_<size>px.png``.
    """

    train_config = train_config or DenseTrainConfig(progress=progress)
    image_set = load_images(source, size, root=root, progress=progress)
    results, reranking, histories = [], [], []
    for n in ns:
        for seed in seeds:
            db = build_database(image_set, n, id_scheme=schemes[0], seed=seed)
            run_dir = Path(runs_dir) / database_name(db) if runs_dir is not None else None
            retriever = train_or_load(
                db,
                model_overrides=model_overrides,
                train_config=train_config,
                include_index=include_index,
                run_dir=run_dir,
            )
            histories.append(retriever.history_.to_frame().assign(n=n, ids="-", seed=seed))
            table, timings = evaluate_dense(retriever, db, k=k, seed=seed)
            results.append(table.assign(**timings))
            bovw = evaluate_bovw(
                db, n_words=bovw_words, k=k, seed=seed, vocabularies=bovw_vocabularies, progress=progress
            )
            results.append(bovw.rows(db))
            for i, scheme in enumerate(schemes):
                scheme_db = db if i == 0 else build_database(image_set, n, id_scheme=scheme, seed=seed)
                dsi_dir = Path(dsi_runs) / run_name(scheme_db) if dsi_runs is not None else None
                stages = first_stages(scheme_db, bovw=bovw.model if i == 0 else None, dsi_run_dir=dsi_dir)
                if stages or i == 0:
                    reranking.append(
                        rerank_database(scheme_db, retriever, stages, depths=depths, k=k, include_alone=i == 0)
                    )
    if dsi_table is not None:
        dsi = pd.read_csv(dsi_table)
        keep = dsi["n"].isin(ns) & dsi["seed"].isin(seeds) & (dsi["size"] == size) & (dsi["source"] == source)
        results.append(dsi[keep].drop(columns=[c for c in ("paper",) if c in dsi.columns]))
    results_frame = attach_paper(pd.concat(results, ignore_index=True))
    rerank_frame = pd.concat(reranking, ignore_index=True)
    history_frame = pd.concat(histories, ignore_index=True)
    if out_dir is not None:
        out_dir = Path(out_dir)
        model_config = DenseConfig(image_size=size, **(model_overrides or {}))
        settings = {
            "source": source,
            "size": size,
            "model": (
                f"ViT patch {model_config.patch_size}, width {model_config.dim}, {model_config.depth} blocks, "
                f"{model_config.heads} heads, {model_config.pooling} pooling, {model_config.pos_encoding} positions"
            ),
            "training": (
                f"{train_config.epochs} epochs of AdamW (lr {train_config.lr}, weight decay "
                f"{train_config.weight_decay}), batches of {train_config.batch_size} in groups of "
                f"{train_config.per_class} same-class images, contrastive margin {train_config.margin} + "
                f"{train_config.entropy_weight} x differential entropy, on the train queries"
                + (" and the indexed images" if include_index else "")
            ),
            "dsi": f"copied from `{dsi_table}` (same databases and test queries)" if dsi_table is not None else None,
        }
        stem = f"{source}_{size}px"
        write_table(
            results_frame, out_dir / f"dense_{stem}", markdown=dense_markdown(results_frame, history_frame, settings)
        )
        write_table(rerank_frame, out_dir / f"rerank_{stem}", markdown=rerank_markdown(rerank_frame, source, size))
        history_frame.to_csv(out_dir / f"histories_dense_{stem}.csv", index=False)
        save_figure(tradeoff_figure(rerank_frame, "mAP@10"), out_dir / f"rerank_{stem}.png")
    return results_frame, rerank_frame, history_frame


# ------------------------------------------------------------------------------------------
# A notebook profile's dense study (notebook 07)
# ------------------------------------------------------------------------------------------
def _profile_study(spec: DenseSpec, paths: StudyPaths) -> DenseResult:
    """Notebook 07's study, inside a profile's report (``paths`` from :meth:`StudyPaths.create`).

    Beside what :func:`_dense_study` does for a recipe, it differs where a profile's study shares
    its folders with the other notebooks: each database seed also seeds its encoder's training; the
    encoder is kept in the run folder of the first scheme's database (``paths.run_dir``), the DSI
    models re-ranked are those notebooks 03/04 left in ``paths.runs``, and the Table-1 rows of BoVW
    and the DSI are notebook 05's (``tables/table1.csv``; the BoVW fitted here when it is missing).
    Writes ``tables/`` histories_dense.csv, dense and rerank (CSV and Markdown) and ``figures/``
    dense_training, dense_validation, dense_vs_n and rerank_tradeoff (PNG); prints a line per
    database trained and says where the BoVW, DSI and re-ranked models came from.
    """
    print("search backend:", "FAISS IndexFlatIP" if faiss_available() else "torch (faiss-cpu is not installed)")
    image_set = spec_images(spec)
    name = image_set.name
    overrides = spec.model.overrides()
    retrievers, bovw_models, histories, frames = {}, {}, [], []
    for n in spec.ns:
        for seed in spec.seeds:
            db = build_database(image_set, n, id_scheme=spec.schemes[0], seed=seed)
            retriever = train_or_load(
                db,
                model_overrides=overrides,
                train_config=replace(spec.train, seed=seed, progress=False),
                include_index=spec.include_index,
                run_dir=paths.run_dir(db),
            )
            retrievers[(n, seed)] = (db, retriever)
            history = retriever.history_.to_frame().assign(n=n, ids="-", seed=seed)
            histories.append(history)
            val = history.loc[history["split"] == "val", "map@10"]
            print(
                f"N={n} seed {seed}: {spec.train.epochs} epochs, {retriever.fit_seconds_:.0f} s of training; "
                f"val mAP@10 {val.iloc[-1]:.3f} (best {val.max():.3f})" + (" (loaded)" if retriever.loaded_ else "")
            )
    history_frame = pd.concat(histories, ignore_index=True)
    history_frame.to_csv(paths.tables / "histories_dense.csv", index=False)
    figures = {
        "dense_training": training_curves(
            history_frame,
            phase="dense",
            split="train",
            metrics=("loss", "contrastive", "entropy"),
            title="Dense encoder: training objective per epoch",
        ),
        "dense_validation": training_curves(
            history_frame,
            phase="dense",
            split="val",
            metrics=("map@10", "p@10"),
            title="Dense encoder: validation queries per epoch",
        ),
    }

    for (n, seed), (db, retriever) in retrievers.items():
        table, timings = evaluate_dense(retriever, db, k=spec.k, seed=seed)
        frames.append(table.assign(**timings))
        bovw = evaluate_bovw(
            db, n_words=spec.words, k=spec.k, seed=seed, vocabularies=spec.vocabularies, progress=False
        )
        bovw_models[(n, seed)] = bovw.model
        frames.append(bovw.rows(db))
    ours = pd.concat(frames, ignore_index=True)
    table1_csv = paths.tables / "table1.csv"
    if table1_csv.exists():
        earlier = pd.read_csv(table1_csv)
        earlier = earlier[earlier["n"].isin(spec.ns) & earlier["seed"].isin(spec.seeds)].drop(columns="paper")
        results = pd.concat([earlier, ours[ours["model"] == DENSE_MODEL]], ignore_index=True)
        print(f"BoVW and DSI rows from {table1_csv.name} (notebook 05)")
    else:
        results = ours
        print(f"{table1_csv} is missing (notebook 05 writes it): BoVW as fitted here, no DSI rows")
    results = attach_paper(results)
    markdown = "\n\n".join(
        [f"{name} at {spec.size} px, profile `{paths.profile}`. " + TABLE1_NOTE, table1_markdown(results)]
    )
    write_table(results, paths.tables / "dense", markdown=markdown)
    figures["dense_vs_n"] = metric_vs_n(results, ("mAP@10", "P@10", "R@100"), title="Dense, BoVW and DSI against N")

    studies = []
    for (n, seed), (first_db, retriever) in retrievers.items():
        for i, scheme in enumerate(spec.schemes):
            db = first_db if i == 0 else build_database(image_set, n, id_scheme=scheme, seed=seed)
            stages = first_stages(db, bovw=bovw_models[(n, seed)] if i == 0 else None, dsi_run_dir=paths.run_dir(db))
            if not any(stage.startswith("DSI") for stage in stages):
                print(f"N={n} {scheme} seed {seed}: no DSI models in {paths.run_dir(db)} (notebooks 03/04 train them)")
            if stages or i == 0:
                studies.append(
                    rerank_database(db, retriever, stages, depths=tuple(spec.depths), k=spec.k, include_alone=i == 0)
                )
    reranking = pd.concat(studies, ignore_index=True)
    write_table(reranking, paths.tables / "rerank", markdown=rerank_markdown(reranking, name, spec.size))
    figures["rerank_tradeoff"] = tradeoff_figure(reranking, "mAP@10")
    for stem, fig in figures.items():
        save_figure(fig, paths.figures / f"{stem}.png")
    return DenseResult(results, reranking, history_frame, figures)
