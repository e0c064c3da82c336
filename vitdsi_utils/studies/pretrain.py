"""The pretraining study (notebook 13): a DSI from a self-supervised encoder against the same DSI from scratch.

:func:`run` runs a :class:`PretrainSpec`, for a recipe or a notebook profile; :func:`pretrain_study` is the study itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from vitdsi_utils import metrics
from vitdsi_utils.baselines.ssl import SSLConfig, SSLEncoder, embed_images, outside_images, save_ssl, train_ssl
from vitdsi_utils.data.database import build_database
from vitdsi_utils.data.images import SIZES, load_images
from vitdsi_utils.data.relevance import label_relevance
from vitdsi_utils.ids.codec import ID_SCHEMES
from vitdsi_utils.ids.schemes import assign_ids, codec_for, sibling_agreement
from vitdsi_utils.model.decoding import beam_search
from vitdsi_utils.model.vit import DSIConfig, ViTConfig, ViTEncoder
from vitdsi_utils.reports.paper import attach_paper
from vitdsi_utils.runs import SSL_FILE, StudyPaths, database_name, run_name
from vitdsi_utils.studies.dsi import run_experiment
from vitdsi_utils.studies.pretrain_report import (
    PretrainResult,
    comparison_frame,
    indexing_epochs_summary,
    pretrain_markdown,
    write_pretrain_report,
    write_profile_report,
)
from vitdsi_utils.studies.specs import (
    ImageSourceSpec,
    ModelSpec,
    check_choices,
    dsi_model,
    no_pooling,
    refuse_profile_only,
)
from vitdsi_utils.training.config import TrainConfig, seed_everything


# ------------------------------------------------------------------------------------------
# Probes: is the representation any good, before any DSI training?
# ------------------------------------------------------------------------------------------
def embedding_probe(encoder: ViTEncoder, db: Any, *, k: int = 10, seed: int = 0) -> dict[str, float]:
    """Label-free quality checks of ``encoder``'s mean-pooled embeddings on a database.

    * ``knn_acc``: each test query takes the majority class of its ``k`` nearest indexed
      images (cosine): the database lookup a DSI has to learn;
    * ``linear_acc``: a logistic regression on the train queries' and indexed images'
      embeddings, scored on the test queries;
    * ``map@10``: retrieval of the indexed images by cosine similarity, over the test queries;
    * ``chance``: the share of the most common test class.
    """
    from sklearn.linear_model import LogisticRegression

    index_images, index_labels = db.split("index")
    test_images, test_labels = db.split("test")
    train_images, train_labels = db.split("train")
    index_z, test_z = embed_images(encoder, index_images).numpy(), embed_images(encoder, test_images).numpy()
    train_z = embed_images(encoder, train_images).numpy()
    similarity = test_z @ index_z.T
    nearest = np.argsort(-similarity, axis=1, kind="stable")
    votes = index_labels[nearest[:, :k]]
    n_classes = int(max(index_labels.max(), test_labels.max())) + 1
    counts = np.stack([(votes == c).sum(axis=1) for c in range(n_classes)], axis=1)
    knn = float((counts.argmax(axis=1) == test_labels).mean())
    probe = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    probe.fit(np.concatenate([train_z, index_z]), np.concatenate([train_labels, index_labels]))
    linear = float((probe.predict(test_z) == test_labels).mean())
    relevant = label_relevance(test_labels, index_labels, kind="class")
    hits = metrics.relevance_matrix(nearest[:, :10], relevant)
    ap = metrics.average_precision_at_k(hits, relevant.sum(axis=1), 10)
    chance = float(np.bincount(test_labels).max() / len(test_labels))
    return {"knn_acc": knn, "linear_acc": linear, "map@10": float(np.nanmean(ap)), "chance": chance}


# ------------------------------------------------------------------------------------------
# The study: pretrain, probe, train the DSI from the pretrained encoder, compare with scratch
# ------------------------------------------------------------------------------------------


def pretrain_study(
    source: str = "imagenette",
    size: int = 64,
    n: int = 512,
    seed: int = 0,
    scheme: str = "clustered",
    *,
    exclude_ns: Sequence[int] = (512, 1024, 2048),
    model_overrides: dict | None = None,
    ssl_config: SSLConfig | None = None,
    index_config: Any = None,
    retrieval_config: Any = None,
    max_pairs_per_query: int | None = None,
    baseline_table: str | os.PathLike | None = None,
    baseline_histories: str | os.PathLike | None = None,
    train_scratch: bool = False,
    max_images: int | None = None,
    semantic_ids: dict | None = None,
    runs_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    annotations: str | os.PathLike | None = None,
    name: str | None = None,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Pretrain an encoder on the images outside the databases, then index and fine-tune a DSI from it.

    The pretraining images are every image of ``source`` that none of the databases of sizes
    ``exclude_ns`` (and ``n``) for ``seed`` uses (:func:`outside_images`). The encoder is the
    DSI's (``model_overrides`` as for the DSI study). The probes (:func:`embedding_probe`)
    compare the pretrained encoder with a randomly initialised one on the database. The DSI
    is trained from the pretrained encoder with ``index_config`` / ``retrieval_config``; the
    from-scratch numbers come from ``baseline_table`` (a DSI study's CSV, with
    ``baseline_histories`` for its curves) or, with ``train_scratch``, from a run here.
    ``max_images`` pretrains on a seeded random subset of that many outside images (None: all),
    for a shorter run.

    ``semantic_ids`` (e.g. ``{"k": 10, "c": 10}``) adds a third DSI, also from the SSL encoder, whose
    IDs are label-free semantic IDs: hierarchical k-means over the *SSL encoder's* embeddings of
    the indexed images (:func:`~vitdsi_utils.ids.schemes.assign_ids`, tag ``semantic-ssl-k..-c..``).
    ``id_facts`` then says how often sibling IDs (same parent prefix) share a class, for those IDs
    and for the same k-means over a randomly initialised encoder's embeddings. ``root`` and
    ``annotations`` locate the images as in :func:`~vitdsi_utils.data.images.load_images`; ``name`` is
    what the run folders call the data (as there; None: the source, or a folder's own name).

    Returns and (with ``out_dir``) writes: ``results`` (DSI rows, ``init`` = scratch / ssl, ``ids``
    the scheme), ``probes``, ``ssl_history``, ``histories`` (indexing curves), ``paired``,
    ``id_facts`` and a figure; ``markdown`` is the report (settings, the tables and the probes).
    """
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 2):
        raise ValueError(f"max_images must be None or an integer >= 2 (InfoNCE needs two images), got {max_images!r}")

    runs_dir = Path(runs_dir) if runs_dir is not None else None
    ssl_config = ssl_config or SSLConfig(progress=progress)
    index_config = index_config or TrainConfig(epochs=400, lr=1e-3, warmup_steps=100, target_accuracy=0.99, seed=seed)
    retrieval_config = retrieval_config or TrainConfig(epochs=10, lr=1e-3, seed=seed)
    overrides = dict(model_overrides or {})
    image_set = load_images(source, size, root=root, annotations=annotations, name=name, progress=progress)
    db = build_database(image_set, n, id_scheme=scheme, seed=seed)
    others = [
        build_database(image_set, m, id_scheme=scheme, seed=seed)
        for m in sorted(set(exclude_ns) - {n})
        if m <= len(image_set.images)
    ]
    images, rows = outside_images(image_set, [db, *others])
    if max_images is not None and max_images < len(images):
        keep = np.sort(np.random.default_rng(seed).choice(len(images), size=max_images, replace=False))
        images, rows = images[keep], rows[keep]
    # the encoder of the DSI: every architecture field of the DSI's config, so the weights fit it
    dsi_fields = DSIConfig(image_size=size, **overrides).to_dict()
    encoder_config = ViTConfig(**{k: v for k, v in dsi_fields.items() if k in {f.name for f in fields(ViTConfig)}})
    # one folder per pretraining (epochs, batch, number of images), so a study whose SSL settings
    # change trains a new encoder beside the old one instead of refusing the old checkpoint
    ssl_tag = f"e{ssl_config.epochs}-b{ssl_config.batch_size}-i{len(images)}"
    ssl_dir = runs_dir / f"ssl-{database_name(db)}-{ssl_tag}" if runs_dir is not None else None
    ssl_path = ssl_dir / SSL_FILE if ssl_dir is not None else None
    torch.manual_seed(ssl_config.seed)
    model = SSLEncoder(encoder_config, ssl_config.proj_hidden, ssl_config.proj_dim)
    start = time.perf_counter()
    ssl_history = train_ssl(model, images, config=ssl_config, checkpoint_path=ssl_path)
    ssl_frame = ssl_history.to_frame()
    ssl_seconds = float(ssl_frame["seconds"].sum()) if len(ssl_frame) else time.perf_counter() - start

    seed_everything(seed)
    random_encoder = ViTEncoder(encoder_config)
    probes = pd.DataFrame(
        [
            {"encoder": "random init", **embedding_probe(random_encoder, db, seed=seed)},
            {"encoder": "SSL pretrained", **embedding_probe(model, db, seed=seed)},
        ]
    ).assign(n=n, ids=scheme, seed=seed, ssl_images=len(images), ssl_epochs=int(ssl_frame["epoch"].max()))

    if ssl_path is None:  # no run folder: the encoder still has to reach the DSI through a file
        import tempfile

        ssl_path = Path(tempfile.mkdtemp()) / SSL_FILE
        save_ssl(ssl_path, model, ssl_config, ssl_history, epoch=ssl_config.epochs)
    tables, histories, models = [], [], {}
    # (init, encoder file, IDs: None = the database's own; else an IDAssignment)
    runs: list[tuple[str, Any, Any]] = [("ssl", ("ssl", ssl_path), None)]
    if train_scratch:
        runs.append(("scratch", None, None))
    id_facts = pd.DataFrame()
    if semantic_ids is not None:
        semantic, id_facts = _ssl_semantic_ids(db, model, random_encoder, seed, semantic_ids)
        runs.append(("ssl", ("ssl", ssl_path), semantic))
    for init, spec, assignment in runs:
        ids = scheme if assignment is None else assignment.scheme
        name = run_name(db, None if assignment is None else assignment.tag) + (
            f"-init-{init}-{ssl_tag}" if spec is not None else ""
        )
        experiment = run_experiment(
            db,
            model_overrides=overrides,
            index_config=index_config,
            retrieval_config=retrieval_config,
            run_dir=runs_dir / name if runs_dir is not None else None,
            max_pairs_per_query=max_pairs_per_query,
            encoder_init=spec,
            codec=None if assignment is None else assignment.codec,
            ids=ids,
        )
        tables.append(experiment.table.assign(init=init))
        if assignment is None:
            models[init] = experiment
        for phase in (experiment.zero_shot, experiment.fine_tuned):
            if phase is not None and len(phase.history):
                histories.append(phase.history.to_frame().assign(n=n, ids=ids, seed=seed, init=init))
    paired = pd.DataFrame()
    if "scratch" in models:
        codec = codec_for(db)
        paired = pd.concat(
            [
                paired_comparison(
                    getattr(models["ssl"], attr).model, getattr(models["scratch"], attr).model, codec, db, seed=seed
                ).assign(model=name)
                for attr, name in (("zero_shot", "DSI zero-shot"), ("fine_tuned", "DSI fine-tuned"))
            ],
            ignore_index=True,
        )
    if baseline_table is not None:
        base = pd.read_csv(baseline_table)
        keep = (
            (base["n"] == n)
            & (base["ids"] == scheme)
            & (base["seed"] == seed)
            & (base["size"] == size)
            & (base["source"] == source)
        )
        if not keep.any():
            raise ValueError(
                f"{baseline_table} has no row for {source} {size} px, N={n}, {scheme} IDs, seed {seed}; "
                "run `make dsi` first, or train the scratch DSI here (scratch: true)"
            )
        label = "scratch (make dsi)" if train_scratch else "scratch"
        tables.append(base[keep].drop(columns=[c for c in ("paper",) if c in base.columns]).assign(init=label))
        if baseline_histories is not None and Path(baseline_histories).is_file() and not train_scratch:
            bh = pd.read_csv(baseline_histories)
            bh = bh[(bh["n"] == n) & (bh["ids"] == scheme) & (bh["seed"] == seed)]
            histories.append(bh.assign(init="scratch"))
    results = attach_paper(pd.concat(tables, ignore_index=True))
    history_frame = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    out = {
        "results": results,
        "probes": probes,
        "ssl_history": ssl_frame,
        "histories": history_frame,
        "paired": paired,
        "id_facts": id_facts,
    }
    out["markdown"] = pretrain_markdown(
        out,
        source,
        size,
        n,
        scheme,
        seed,
        encoder_config,
        ssl_config,
        len(images),
        ssl_seconds,
        index_config,
        retrieval_config,
        max_pairs_per_query,
    )
    if out_dir is not None:
        write_pretrain_report(out, Path(out_dir), source, size)
    return out


@dataclass
class PretrainSpec(ImageSourceSpec):
    """Settings of the pretraining study (recipe ``study: pretrain``): one database (``n``, ``seed``, ``scheme``).

    The encoder is pretrained (``ssl``) on every image that no database of the sizes ``exclude_ns`` uses
    (or a seeded subset of ``ssl_images``), then the DSI is indexed (``index``) and fine-tuned
    (``fine_tune``) from it. ``scratch`` also trains the DSI from scratch here and compares the two query
    by query; ``baseline`` (a DSI study's CSV, with ``baseline_histories``) adds its from-scratch rows.
    ``semantic_ids`` adds a DSI whose IDs are k-means codes (``semantic_k``, ``semantic_c``) of the SSL
    encoder's embeddings.
    """

    size: int = field(default=160, metadata={"choices": SIZES})
    n: int = 512
    seed: int = 0
    scheme: str = field(default="clustered", metadata={"choices": ID_SCHEMES})
    exclude_ns: tuple[int, ...] = (512, 1024, 2048)
    ssl: SSLConfig = field(default_factory=lambda: SSLConfig(epochs=4, batch_size=128))
    ssl_images: int | None = None
    model: ModelSpec = field(default_factory=dsi_model)
    index: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=400, target_accuracy=0.99, lr=1e-3, warmup_steps=100)
    )
    fine_tune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=1e-3))
    max_pairs_per_query: int | None = 5
    baseline: str | None = None
    baseline_histories: str | None = None
    scratch: bool = False
    semantic_ids: bool = False
    semantic_k: int = 10
    semantic_c: int = 10

    #: notebook profile keys (13_pretrain) -> spec keys
    PROFILE_KEYS = {
        **ImageSourceSpec.PROFILE_KEYS,
        "SIZE": "size",
        "PRETRAIN_N": "n",
        "PRETRAIN_SCHEME": "scheme",
        "NS": "exclude_ns",
        "SEEDS": ("seed[0]", "ssl.seed[0]", "index.seed[0]", "fine_tune.seed[0]"),
        "SSL_EPOCHS": "ssl.epochs",
        "SSL_BATCH_SIZE": "ssl.batch_size",
        "SSL_IMAGES": "ssl_images",
        **ModelSpec.PROFILE_KEYS,
        "LR": ("index.lr", "fine_tune.lr"),
        "BATCH_SIZE": ("index.batch_size", "fine_tune.batch_size"),
        "WARMUP_STEPS": "index.warmup_steps",
        "INDEX_EPOCHS": "index.epochs",
        "TARGET_ACCURACY": "index.target_accuracy",
        "RETRIEVAL_EPOCHS": "fine_tune.epochs",
        "MAX_PAIRS_PER_QUERY": "max_pairs_per_query",
        "PRETRAIN_SEMANTIC_IDS": "semantic_ids",
        "IDS_K": "semantic_k",
        "IDS_C": "semantic_c",
    }

    def __post_init__(self) -> None:
        check_choices(self)
        no_pooling(self)


def run(spec: PretrainSpec, paths: StudyPaths) -> dict[str, pd.DataFrame] | PretrainResult:
    """The pretraining study of ``spec``: encoders and DSIs to ``paths.runs``, the report to ``paths.out``.

    A recipe's run writes ``pretrain_<source>_<size>px`` and its companions into ``paths.out`` and returns
    :func:`pretrain_study`'s tables. A notebook profile's run (notebook 13) always trains the DSI from
    scratch too (``scratch``): its run folder names the data as the profile's other notebooks do
    (``name``), so it is notebook 03/04's model of the database, loaded when the settings agree. It shows
    no progress bars, writes the notebook's files into the profile's report
    (:func:`~vitdsi_utils.studies.pretrain_report.write_profile_report`) and returns them.
    """
    if paths.profile is not None:
        out = pretrain_study(
            spec.source,
            spec.size,
            spec.n,
            spec.seed,
            spec.scheme,
            exclude_ns=tuple(spec.exclude_ns),
            model_overrides=spec.model.overrides(),
            ssl_config=replace(spec.ssl, progress=False),
            index_config=replace(spec.index, progress=False),
            retrieval_config=replace(spec.fine_tune, progress=False),
            max_pairs_per_query=spec.max_pairs_per_query,
            baseline_table=spec.baseline,
            baseline_histories=spec.baseline_histories,
            train_scratch=True,
            max_images=spec.ssl_images,
            semantic_ids={"k": spec.semantic_k, "c": spec.semantic_c} if spec.semantic_ids else None,
            runs_dir=paths.runs,
            root=spec.root,
            annotations=spec.annotations,
            name=spec.name,
            progress=False,
        )
        return write_profile_report(out, paths.tables, paths.figures, spec.index.target_accuracy, spec.index.epochs)
    refuse_profile_only(spec)
    return pretrain_study(
        spec.source,
        spec.size,
        spec.n,
        spec.seed,
        spec.scheme,
        exclude_ns=tuple(spec.exclude_ns),
        model_overrides=spec.model.overrides(),
        ssl_config=spec.ssl,
        index_config=spec.index,
        retrieval_config=spec.fine_tune,
        max_pairs_per_query=spec.max_pairs_per_query,
        baseline_table=spec.baseline,
        baseline_histories=spec.baseline_histories,
        train_scratch=spec.scratch,
        max_images=spec.ssl_images,
        semantic_ids={"k": spec.semantic_k, "c": spec.semantic_c} if spec.semantic_ids else None,
        runs_dir=paths.runs,
        out_dir=paths.out,
        root=spec.root,
        annotations=spec.annotations,
    )


def console_summary(spec: PretrainSpec, result: dict[str, pd.DataFrame]) -> str:
    """The DSI rows by initialisation, how each indexing ended, the paired differences and the probes."""
    lines = [
        comparison_frame(result["results"]).to_string(index=False),
        indexing_epochs_summary(result["results"], spec.index.target_accuracy, spec.index.epochs),
    ]
    if len(result["paired"]):
        lines.append(result["paired"].round(3).to_string(index=False))
    lines.append(
        result["probes"][["encoder", "knn_acc", "linear_acc", "map@10", "chance"]].round(3).to_string(index=False)
    )
    return "\n".join(lines)


def _ssl_semantic_ids(
    db: Any, ssl_encoder: ViTEncoder, random_encoder: ViTEncoder, seed: int, params: dict
) -> tuple[Any, pd.DataFrame]:
    """Semantic IDs from the SSL encoder's embeddings of the indexed images, and facts beside those of a random encoder."""

    index_images = db.split("index")[0]
    rows, assignments = [], {}
    for name, tag, encoder in (
        ("random init", "random-encoder", random_encoder),
        ("SSL pretrained", "ssl", ssl_encoder),
    ):
        embeddings = embed_images(encoder, index_images).double().numpy()
        assignments[tag] = assign_ids(db, "semantic", embeddings=embeddings, embedding_name=tag, seed=seed, **params)
        agreement, chance = sibling_agreement(assignments[tag].codec, db.index_labels)
        rows.append(
            {"embeddings": name, **assignments[tag].summary(), "sibling_agreement": agreement, "sibling_chance": chance}
        )
    return assignments["ssl"], pd.DataFrame(rows)


def paired_comparison(
    model_a: Any, model_b: Any, codec: Any, db: Any, *, k: int = 100, n_resamples: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per-query differences ``a - b`` of two DSI models on the same queries, with paired bootstrap intervals.

    IA@1 over the indexed images; AP@10 and P@10 over the test queries, from the same top-``k``
    beam search as the evaluation. A paired interval is much narrower than the two separate
    intervals when both models find the same queries easy or hard. Rows: ``metric``, ``a``,
    ``b``, ``diff``, ``ci_low``, ``ci_high``, ``n``.
    """

    index_images, _ = db.split("index")
    query_images, _ = db.split("test")
    relevant = db.relevance("test")
    per_model = []
    for model in (model_a, model_b):
        # the evaluation's search (evaluation.evaluate_dsi: top-5, so a beam of 5): with a beam of 1
        # the top-1 can differ, and the paired IA@1 would not match the table's
        _, own = beam_search(model, torch.from_numpy(index_images), codec, k=min(5, len(codec)))
        _, ranked = beam_search(model, torch.from_numpy(query_images), codec, k=min(k, len(codec)))
        hits = metrics.relevance_matrix(ranked.numpy(), relevant)
        per_model.append(
            {
                "IA@1": metrics.indexing_accuracy_at_k(own.numpy(), np.arange(len(index_images)), 1),
                "mAP@10": metrics.average_precision_at_k(hits, relevant.sum(axis=1), 10),
                "P@10": metrics.precision_at_k(hits, 10),
            }
        )
    rows = []
    for metric in ("IA@1", "mAP@10", "P@10"):
        a, b = per_model[0][metric], per_model[1][metric]
        diff = a - b
        low, high = metrics.bootstrap_ci(diff, n_resamples=n_resamples, seed=seed)
        rows.append(
            {
                "metric": metric,
                "a": float(np.nanmean(a)),
                "b": float(np.nanmean(b)),
                "diff": float(np.nanmean(diff)),
                "ci_low": low,
                "ci_high": high,
                "n": int(np.isfinite(diff).sum()),
            }
        )
    return pd.DataFrame(rows)
