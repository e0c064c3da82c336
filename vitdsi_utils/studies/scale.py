"""Scale study: query latency and indexing accuracy against the number of indexed images N.

The study's target 5 asks to index all 13,394 Imagenette images and to measure how each
retrieval method's cost grows with N. This module does both parts:

* :func:`~vitdsi_utils.data.database.index_all_database` - a database whose *every* image is indexed (no query pool):
  :func:`data.build_database` always keeps 75% of the draw as queries, so it cannot index the
  whole image set. N images are drawn balanced over the classes with a fixed seed and numbered
  by the ID scheme (random IDs by default: they need no labels).
* :func:`~vitdsi_utils.data.database.query_views` - the query batch of the latency runs: horizontally flipped copies of a
  seeded sample of indexed images (near-duplicate queries). When every image is indexed there is
  no held-out image left, and none is needed: the latency of the three methods does not depend
  on what the query shows (the beam search always walks the same trie with the same widths).
* :func:`latency_table` - per-query top-k latency of DSI trie-constrained beam search, BoVW and
  dense FAISS search for each N: batched queries, one warm-up call excluded, median over repeats,
  with each method's build time (DSI: the ID codec and its trie; BoVW: SIFT + k-means + histograms;
  dense: embedding the database + the flat index). The DSI and the dense encoder are *untrained*
  models of the study's size: latency depends on N and the model's size, not on its weights.
* :func:`ia_table` - IA@1 of a DSI trained to memorise N images, with the epochs and seconds it
  took; on a CPU only the small N are affordable, so ``max epochs`` caps the larger ones and the
  table says whether the target was reached.
* :func:`run` runs a :class:`ScaleSpec` and writes the tables and the figure
  (:func:`~vitdsi_utils.studies.scale_report.scale_figure`: latency and IA@1 against N).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from vitdsi_utils.atomic import write_json
from vitdsi_utils.data.database import index_all_database, query_views
from vitdsi_utils.data.images import SIZES, SOURCES, ImageSet, load_images
from vitdsi_utils.devices import resolve_device
from vitdsi_utils.ids.codec import ID_SCHEMES, make_codec
from vitdsi_utils.model.decoding import indexing_accuracy
from vitdsi_utils.phases import index_database
from vitdsi_utils.reports.plots import save_figure
from vitdsi_utils.reports.tables import write_csv, write_table
from vitdsi_utils.retrieval.latency import METHODS, as_ks, bovw_latency_rows, dense_latency_rows, dsi_latency_rows
from vitdsi_utils.runs import StudyPaths
from vitdsi_utils.studies.scale_report import scale_figure, scale_markdown
from vitdsi_utils.studies.specs import ModelSpec, check_choices, full_model, no_pooling
from vitdsi_utils.training.config import TrainConfig

#: The number of Imagenette images that pass the aspect rule (train + val, all ten classes).
IMAGENETTE_ALL = 13_394


def geometric_ns(start: int = 512, stop: int = IMAGENETTE_ALL, factor: int = 2) -> list[int]:
    """``start, start*factor, ...`` below ``stop``, then ``stop`` itself: e.g. 512, 1024, ..., 8192, 13394."""
    if start < 1 or stop < start or factor < 2:
        raise ValueError(f"need 1 <= start <= stop and factor >= 2, got start={start}, stop={stop}, factor={factor}")
    ns, n = [], start
    while n < stop:
        ns.append(n)
        n *= factor
    return ns + [stop]


def latency_table(
    image_set: ImageSet,
    ns: Sequence[int],
    *,
    methods: Sequence[str] = METHODS,
    n_queries: int = 64,
    batch_size: int = 64,
    k: int | Sequence[int] = 100,
    repeats: int = 3,
    model_overrides: dict | None = None,
    bovw_words: int = 200,
    device: str = "auto",
    amp: bool | str = False,
    id_scheme: str = "random",
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per (N, method, k): build seconds and median milliseconds per query for a batch of top-``k``
    searches. ``k`` is one list length or several (e.g. ``[10, 100]``: each method is built once per N and
    timed for every k; the DSI beam is k). ``device`` runs the models ("auto": CUDA when there is one; the rows
    name the device it resolved to), ``amp`` the DSI's beam search (:func:`vitdsi_utils.devices.autocast`)."""
    device = str(resolve_device(device))
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    ks = as_ks(k)
    dsi_overrides = {key: v for key, v in (model_overrides or {}).items() if key != "pooling"}
    rows = []
    steps = [(n, m) for n in ns for m in methods]
    bar = tqdm(steps, desc="latency", disable=not progress)
    db = None
    for n, method in bar:
        bar.set_postfix(n=n, method=method)
        if db is None or db.n_index != n:
            db = index_all_database(image_set, n, id_scheme=id_scheme, seed=seed)
            queries = query_views(db, n_queries, seed=seed)
        images = db.split("index")[0]
        if method == METHODS[0]:
            found = dsi_latency_rows(
                n,
                queries,
                ks,
                model_overrides=dsi_overrides,
                batch_size=batch_size,
                repeats=repeats,
                device=device,
                amp=amp,
                seed=seed,
            )
        elif method == METHODS[1]:
            found = bovw_latency_rows(images, queries, ks, n_words=bovw_words, repeats=repeats, seed=seed)
        else:
            found = dense_latency_rows(
                images, queries, ks, model_overrides=model_overrides, repeats=repeats, device=device, seed=seed
            )
        rows += [
            {
                "n": n,
                **row,
                "queries": n_queries,
                "batch": batch_size,
                "repeats": repeats,
                "device": str(device),
                "size": image_set.size,
            }
            for row in found
        ]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------
# Indexing accuracy
# ------------------------------------------------------------------------------------------
def ia_table(
    image_set: ImageSet,
    ns: Sequence[int],
    *,
    index_config: Any,
    model_overrides: dict | None = None,
    runs_dir: str | Path | None = None,
    id_scheme: str = "random",
    seed: int = 0,
    beam_size: int = 100,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train (or load) a DSI that memorises each N of ``ns``; return (one row per N, the training histories).

    ``index_config`` (a :class:`train.TrainConfig`) caps the epochs and sets the stop rule; the row
    says whether IA@1 reached its target, and which batch size, learning rate and stop rule
    trained the model (read from the checkpoint, so a model loaded from ``runs_dir`` reports its
    own). IA@1 is re-measured by beam search (width ``beam_size``) unless the run stopped on the IA
    check, whose value it then reuses (same weights, same search). A re-measured value is kept in
    the run folder (``ia1_beam<width>.json``, tied to the model's epochs and training time), since
    at N = 13,394 one beam search over every indexed image costs tens of CPU minutes.
    """

    rows, histories = [], []
    for n in ns:
        db = index_all_database(image_set, n, id_scheme=id_scheme, seed=seed)
        run_dir = (
            Path(runs_dir) / f"scale-{image_set.name}-{image_set.size}px-I{n}-{id_scheme}-seed{seed}"
            if runs_dir
            else None
        )
        result = index_database(db, model_overrides=model_overrides, config=index_config, run_dir=run_dir)
        history = result.history.to_frame()
        last = history.iloc[-1] if len(history) else None
        trained = {**index_config.to_dict(), **result.config}
        if last is not None and last["split"] == "train_eval" and "ia1" in history and not pd.isna(last["ia1"]):
            ia1, beam = float(last["ia1"]), int(trained.get("stop_beam", beam_size))
        else:
            beam = beam_size
            ia1 = _cached_ia1(run_dir, beam, result)
            if ia1 is None:
                ia1 = indexing_accuracy(
                    result.model,
                    make_codec(n),
                    db.images,
                    beam_size=beam,
                    batch_size=64,
                    device=index_config.device if index_config.device != "auto" else None,
                    progress=n >= 4096,
                )
                _cache_ia1(run_dir, beam, result, ia1)
        target = trained["target_accuracy"]
        rows.append(
            {
                "n": n,
                "IA@1": ia1,
                "epochs": result.epochs,
                "train_s": result.seconds,
                "s_per_epoch": result.seconds / max(1, result.epochs),
                "target": target,
                "reached": target is not None and ia1 >= target,
                "max_epochs": trained["epochs"],
                "batch_size": trained["batch_size"],
                "lr": trained["lr"],
                "stop_rule": trained["stop_metric"],
                "ia_beam": beam,
                "size": image_set.size,
                "ids": id_scheme,
            }
        )
        histories.append(history.assign(n=n))
    return pd.DataFrame(rows), (pd.concat(histories, ignore_index=True) if histories else pd.DataFrame())


def _ia1_key(result: Any) -> dict[str, Any]:
    return {"epochs": int(result.epochs), "train_s": round(float(result.seconds), 3)}


def _cached_ia1(run_dir: Path | None, beam: int, result: Any) -> float | None:
    """The IA@1 measured earlier for this very model (same epochs and training time), if any."""
    path = run_dir / f"ia1_beam{beam}.json" if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return float(saved["ia1"]) if saved.get("model") == _ia1_key(result) and "ia1" in saved else None


def _cache_ia1(run_dir: Path | None, beam: int, result: Any, ia1: float) -> None:
    if run_dir is not None and run_dir.is_dir():
        write_json(run_dir / f"ia1_beam{beam}.json", {"ia1": ia1, "beam": beam, "model": _ia1_key(result)})


def reusable_latency(path: str | Path, ns: Sequence[int], **settings: Any) -> pd.DataFrame | None:
    """The latency table at ``path`` if it exists and covers every N of ``ns`` for every method with these
    ``settings`` (k: one or several list lengths, n_queries, batch_size, repeats, device, size); else None."""
    path = Path(path)
    if not path.exists():
        return None
    table = pd.read_csv(path)
    columns = {
        "k": "k",
        "n_queries": "queries",
        "batch_size": "batch",
        "repeats": "repeats",
        "device": "device",
        "size": "size",
    }
    for key, value in settings.items():
        column = columns[key]
        values = {str(v) for v in as_ks(value)} if key == "k" else {str(value)}
        if column not in table or set(table[column].astype(str)) != values:
            return None
    ks = as_ks(settings.get("k", sorted(set(table["k"])) if "k" in table else []))
    have = set(zip(table["n"], table["method"], table["k"])) if "k" in table else set()
    if not all((n, m, k) in have for n in ns for m in METHODS for k in ks) or "cpu_ms_per_query" not in table:
        return None
    return table[table["n"].isin(list(ns))].reset_index(drop=True)


def _scale_study(
    image_set: ImageSet,
    ns: Sequence[int],
    ia_ns: Sequence[int],
    *,
    index_config: Any,
    out_dir: str | Path,
    runs_dir: str | Path | None = None,
    model_overrides: dict | None = None,
    n_queries: int = 64,
    batch_size: int = 64,
    k: int | Sequence[int] = 100,
    repeats: int = 3,
    bovw_words: int = 200,
    device: str = "auto",
    amp: bool | str = False,
    id_scheme: str = "random",
    seed: int = 0,
    reuse_latency: bool = False,
    keep_ia: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame, Figure]:
    """Latency for every N of ``ns`` and IA@1 for every N of ``ia_ns``; writes ``scale_latency``,
    ``scale_ia`` (CSV + Markdown), ``scale.md`` and ``scale.png`` into ``out_dir``.

    ``k`` is one list length or several (latency rows for each; IA@1 is measured with a beam of
    the largest). With ``reuse_latency`` an existing ``scale_latency.csv`` in ``out_dir`` is kept
    when it holds every (N, method, k) at the same query batch, repeats, device and image size (see
    :func:`reusable_latency`), so adding a trained N does not time every search again. With
    ``keep_ia`` nothing is trained: the IA@1 table already in ``out_dir`` (``scale_ia.csv``, if
    any) is kept as it is and drawn beside the new latency, and ``ia_ns`` is ignored. ``device`` and ``amp``
    run the timed searches (see :func:`latency_table`).
    """
    device = str(resolve_device(device))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if keep_ia:
        ia = pd.read_csv(out / "scale_ia.csv") if (out / "scale_ia.csv").exists() else pd.DataFrame()
        histories = pd.DataFrame()
    else:
        ia, histories = ia_table(
            image_set,
            ia_ns,
            index_config=index_config,
            model_overrides=model_overrides,
            runs_dir=runs_dir,
            id_scheme=id_scheme,
            seed=seed,
            beam_size=max(as_ks(k)),
        )
    latency = (
        reusable_latency(
            out / "scale_latency.csv",
            ns,
            k=k,
            n_queries=n_queries,
            batch_size=batch_size,
            repeats=repeats,
            device=device,
            size=image_set.size,
        )
        if reuse_latency
        else None
    )
    if latency is not None:
        print(f"reusing the latency table {out / 'scale_latency.csv'} (same N, methods and settings)")
    else:
        latency = latency_table(
            image_set,
            ns,
            n_queries=n_queries,
            batch_size=batch_size,
            k=k,
            repeats=repeats,
            model_overrides=model_overrides,
            bovw_words=bovw_words,
            device=device,
            amp=amp,
            id_scheme=id_scheme,
            seed=seed,
        )
    settings = {
        "source": image_set.name,
        "size": image_set.size,
        "device": device,
        "k": k,
        "queries": n_queries,
        "repeats": repeats,
    }
    write_table(latency, out / "scale_latency")
    if not keep_ia:
        write_table(ia, out / "scale_ia")
    if len(histories):
        write_csv(histories, out / "scale_histories.csv")
    (out / "scale.md").write_text(scale_markdown(latency, ia, settings) + "\n")
    fig = scale_figure(latency, ia, title=f"{image_set.source} at {image_set.size} px, {device}")
    save_figure(fig, out / "scale.png")
    return latency, ia, fig


# ------------------------------------------------------------------------------------------
# The study as a spec
# ------------------------------------------------------------------------------------------
@dataclass
class ScaleSpec:
    """Settings of the scale study (recipe ``study: scale``). An N of 0 stands for every usable image.

    Latency is timed for every N of ``ns`` (untrained models of the ``model`` size) and list length in ``k``,
    IA@1 of a DSI trained (``index``) on every N of ``ia_ns`` (none: latency only; beam: the largest ``k``).
    ``index.device`` and ``index.amp`` also run the timed searches. ``reuse_latency`` keeps a latency table
    already in the output folder when it covers every N at these settings; ``keep_ia`` trains nothing and
    keeps the IA@1 table already there (``ia_ns`` is then ignored).
    """

    source: str = field(default="imagenette", metadata={"choices": SOURCES})
    root: str | None = None
    annotations: str | None = None
    size: int = field(default=64, metadata={"choices": SIZES})
    ns: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 0)
    ia_ns: tuple[int, ...] = (512,)
    seed: int = 0
    ids: str = field(default="random", metadata={"choices": ID_SCHEMES})
    model: ModelSpec = field(default_factory=full_model)
    index: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=100, lr=1e-3, warmup_steps=100, target_accuracy=0.99)
    )
    queries: int = 64  # queries in the timed batch
    query_batch: int = 64  # queries decoded together by the beam search
    repeats: int = 3  # timed repeats (the median is reported)
    k: tuple[int, ...] = (100,)  # results per query (and the DSI beam width); several: latency for each
    words: int = 200  # BoVW visual words
    reuse_latency: bool = False
    keep_ia: bool = False

    #: notebook profile keys (11_scale) -> spec keys
    PROFILE_KEYS = {
        "DATASET": "source",
        "DATASET_ROOT": "root",
        "DATASET_ANNOTATIONS": "annotations",
        "SIZE": "size",
        "SCALE_NS": "ns",
        "SCALE_IA_NS": "ia_ns",
        "SEEDS": ("seed[0]", "index.seed[0]"),
        "PATCH_SIZE": "model.patch_size",
        "DIM": "model.dim",
        "MLP_DIM": "model.mlp_dim",
        "DEPTH": "model.depth",
        "HEADS": "model.heads",
        "DROPOUT": "model.dropout",
        "LR": "index.lr",
        "BATCH_SIZE": "index.batch_size",
        "WARMUP_STEPS": "index.warmup_steps",
        "SCALE_INDEX_EPOCHS": "index.epochs",
        "TARGET_ACCURACY": "index.target_accuracy",
        "SCALE_QUERIES": ("queries", "query_batch"),
        "SCALE_REPEATS": "repeats",
        "K": "k",
        "BOVW_WORDS": "words",
    }

    def __post_init__(self) -> None:
        check_choices(self)
        no_pooling(self)


def run(spec: ScaleSpec, paths: StudyPaths) -> tuple[pd.DataFrame, pd.DataFrame, Figure]:
    """The scale study of ``spec``: tables and figure to ``paths.out``, trained DSIs to ``paths.runs``."""
    image_set = load_images(spec.source, spec.size, root=spec.root, annotations=spec.annotations)
    ns = [n if n > 0 else len(image_set) for n in spec.ns]  # 0 means every usable image
    ia_ns = [n if n > 0 else len(image_set) for n in spec.ia_ns]
    config = spec.index
    return _scale_study(
        image_set,
        ns,
        ia_ns,
        index_config=config,
        out_dir=paths.out,
        runs_dir=paths.runs,
        model_overrides=spec.model.overrides(),
        n_queries=spec.queries,
        batch_size=spec.query_batch,
        k=list(spec.k),
        repeats=spec.repeats,
        bovw_words=spec.words,
        device=config.device,
        amp=config.amp,
        id_scheme=spec.ids,
        seed=spec.seed,
        reuse_latency=spec.reuse_latency,
        keep_ia=spec.keep_ia,
    )


def console_summary(spec: ScaleSpec, result: tuple[pd.DataFrame, pd.DataFrame, Any]) -> str:
    """The latency and IA@1 tables."""
    return scale_markdown(
        result[0],
        result[1],
        {
            "source": spec.source,
            "size": spec.size,
            "device": spec.index.device,
            "k": list(spec.k),
            "queries": spec.queries,
            "repeats": spec.repeats,
        },
    )
