"""Score models on a Database and assemble the study's result tables (ours beside the paper's)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from . import metrics
from .bovw import BoVW
from .data import Database, build_database, load_images
from .paper import paper_table1
from .tables import format_interval, format_number, write_table

#: Our metric names -> the paper's column they are compared with. The paper's "MAP@10" and
#: "R@100" used its 10-query protocol, so they sit beside our paper-protocol rows; our
#: all-query mAP@10 and R@100 are shown next to them for what they are.
PAPER_METRIC = {
    "IA@1": "IA@1",
    "IA@5": "IA@5",
    "paper MAP@10 (mean P@10, 10 queries)": "MAP@10",  # = PROTOCOL_MAP
    "paper R@100 (10 queries)": "R@100",  # = PROTOCOL_RECALL
}


#: Model names of the BoVW rows: word histograms (the paper's baseline) and VLAD over the same words.
BOVW_MODEL, VLAD_MODEL = "BoVW", "VLAD"

#: Sources the paper's Table 1 does not describe: its numbers are ImageNet's, so they are not put
#: beside results on these (the paper printed no COCO table).
NOT_IN_PAPER_TABLE1 = frozenset({"coco"})


def retrieval_metrics(
    ranked: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray, *, seed: int = 0, n_resamples: int = 1000
) -> pd.DataFrame:
    """mAP@10, P@10, R@100 and the paper protocol, with 95% intervals and chance (one row per metric).

    Labels are class ids (n,) or multi-hot label sets (n, C), as ``Database.relevance_labels``
    returns them; see :func:`metrics.label_relevance`.
    """
    relevant = metrics.label_relevance(query_labels, db_labels)
    return metrics.evaluate_ranking(
        ranked, relevant, ks_precision=(10,), ks_recall=(100,), ks_map=(10,), n_resamples=n_resamples, seed=seed
    )


@dataclass
class BoVWResult:
    """What one BoVW evaluation produced: the metric table, timings (s) and the fitted model."""

    table: pd.DataFrame
    timings: dict = field(default_factory=dict)
    model: BoVW | None = None

    def rows(self, db: Database) -> pd.DataFrame:
        """The table as result rows of ``db`` beside the DSI's: model BoVW, the database's keys, ids "-", timings."""
        s = db.settings
        return self.table.assign(model=BOVW_MODEL, source=s["source"], size=s["size"], n=s["n"], ids="-",
                                 seed=s["seed"], **self.timings)


def bovw_variant(
    n_words: int,
    *,
    encoding: str = "histogram",
    rootsift: bool = False,
    tfidf: bool = False,
    power_normalisation: bool | None = None,
    intra_normalisation: bool = False,
) -> str:
    """The tag of a BoVW setting in file names and tables: 'K200', 'K200_rootsift_tfidf', 'K64_vlad_intra' ...

    The power normalisation is named only where it differs from the encoding's default (on for
    VLAD, off for histograms): '_nopower' or '_power'.
    """
    power_default = encoding == "vlad"
    power = power_default if power_normalisation is None else bool(power_normalisation)
    parts = [f"K{n_words}", "rootsift" if rootsift else "", "tfidf" if tfidf else "",
             "vlad" if encoding == "vlad" else "", "intra" if intra_normalisation else "",
             "" if power == power_default else ("power" if power else "nopower")]
    return "_".join(part for part in parts if part)


def evaluate_bovw(
    db: Database,
    *,
    n_words: int = 200,
    encoding: str = "histogram",
    rootsift: bool = False,
    tfidf: bool = False,
    power_normalisation: bool | None = None,
    intra_normalisation: bool = False,
    k: int = 100,
    query_role: str = "test",
    seed: int = 0,
    vocabularies: int = 1,
    progress: bool = True,
) -> BoVWResult:
    """Fit BoVW on the indexed images of ``db`` and score its top-``k`` lists for the ``query_role`` queries.

    ``encoding``, ``rootsift``, ``tfidf``, ``power_normalisation`` and ``intra_normalisation``
    are :class:`~vitdsi_utils.bovw.BoVW`'s options (``encoding="vlad"`` for VLAD).

    ``vocabularies`` > 1 fits that many vocabularies (k-means seeds ``seed``, ``seed + 1``, ...)
    and averages every metric per query over them before the bootstrap (see
    :func:`vitdsi_utils.metrics.evaluate_ranking`). One k-means fit can land a few points of
    P@10 above or below another on a small database, which is enough to flip a comparison of
    intervals; the average is the baseline's expected quality. Timings are per fit (means).
    """
    if isinstance(vocabularies, bool) or not isinstance(vocabularies, int) or vocabularies < 1:
        raise ValueError(f"vocabularies must be an integer >= 1, got {vocabularies!r}")
    index_images, _ = db.split("index")
    query_images, _ = db.split(query_role)
    index_labels, query_labels = db.relevance_labels("index"), db.relevance_labels(query_role)
    rankings, fit_s, search_s = [], 0.0, 0.0
    for draw in range(vocabularies):
        model = BoVW(n_words, encoding=encoding, rootsift=rootsift, tfidf=tfidf,
                     power_normalisation=power_normalisation, intra_normalisation=intra_normalisation,
                     random_state=seed + draw, progress=progress)
        start = time.perf_counter()
        model.fit(index_images)
        fitted = time.perf_counter()
        _, ranked = model.search(query_images, k)
        searched = time.perf_counter()
        rankings.append(ranked)
        fit_s += fitted - start
        search_s += searched - fitted
    table = retrieval_metrics(np.stack(rankings), query_labels, index_labels, seed=seed)
    timings = {
        "fit_s": fit_s / vocabularies,
        "search_s": search_s / vocabularies,
        "search_ms_per_query": 1000 * search_s / vocabularies / max(len(query_images), 1),
        "n_index": len(index_images),
        "vocabularies": vocabularies,
    }
    return BoVWResult(table, timings, model)


def bovw_study(
    source: str = "imagenette",
    size: int = 160,
    ns: Iterable[int] = (512, 1024, 2048),
    seeds: Iterable[int] = (0,),
    out_dir: str | Path | None = None,
    *,
    n_words: int = 200,
    encoding: str = "histogram",
    rootsift: bool = False,
    tfidf: bool = False,
    power_normalisation: bool | None = None,
    intra_normalisation: bool = False,
    vocabularies: int = 1,
    root: str | Path | None = None,
    annotations: str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Evaluate BoVW for every N and seed; write manifests and result tables under ``out_dir``.

    ``vocabularies`` averages the metrics over that many k-means vocabularies (see
    :func:`evaluate_bovw`). The options are :class:`~vitdsi_utils.bovw.BoVW`'s (``encoding="vlad"`` for VLAD); the
    tables are named ``bovw_<source>_<size>px_<variant>`` after :func:`bovw_variant`. ``root``
    and ``annotations`` locate the images as in :func:`data.load_images`. Returns the long
    table: one row per (n, seed, metric) with value, interval, chance and, where the paper
    reported one, its number.
    """
    options = dict(encoding=encoding, rootsift=rootsift, tfidf=tfidf, power_normalisation=power_normalisation,
                   intra_normalisation=intra_normalisation)
    BoVW(n_words, **options)._check_params()  # a bad combination fails before the images are loaded
    image_set = load_images(source, size, root=root, annotations=annotations, progress=progress)
    out_dir = Path(out_dir) if out_dir is not None else None
    frames = []
    for n in ns:
        for seed in seeds:
            db = build_database(image_set, n, seed=seed)
            if out_dir is not None:
                db.save_manifest(out_dir / "manifests" / f"{source}-{size}px-N{n}-seed{seed}.csv")
            result = evaluate_bovw(db, n_words=n_words, **options, seed=seed, vocabularies=vocabularies,
                                   progress=progress)
            frame = result.table.assign(
                model=VLAD_MODEL if encoding == "vlad" else BOVW_MODEL, source=source, size=size, n=n, ids="-", seed=seed, dim=result.model.dim_,
                **result.timings
            )
            frames.append(frame)
    results = attach_paper(pd.concat(frames, ignore_index=True))
    variant = bovw_variant(n_words, **options)
    power = (encoding == "vlad") if power_normalisation is None else bool(power_normalisation)
    results = results.assign(n_words=n_words, rootsift=rootsift, tfidf=tfidf, encoding=encoding,
                             power_normalisation=power, intra_normalisation=intra_normalisation, variant=variant)
    if out_dir is not None:
        stem = out_dir / f"bovw_{source}_{size}px_{variant}"
        write_table(results, stem, markdown=bovw_markdown(results, source, size))
    return results


def attach_paper(results: pd.DataFrame) -> pd.DataFrame:
    """Add a ``paper`` column: the paper's number for the same model, N, IDs and metric (else NaN).

    Rows whose ``source`` is in :data:`NOT_IN_PAPER_TABLE1` (COCO) get NaN: the paper's Table 1
    was measured on ImageNet. A ``paper`` column already there is replaced, so attaching twice is
    the same as attaching once.
    """
    paper = paper_table1().rename(columns={"metric": "paper_metric"})
    results = results.drop(columns="paper", errors="ignore")
    keyed = results.assign(paper_metric=results["metric"].map(PAPER_METRIC))
    merged = keyed.merge(paper, on=["model", "n", "ids", "paper_metric"], how="left")
    if "source" in merged.columns:
        merged.loc[merged["source"].isin(NOT_IN_PAPER_TABLE1), "paper"] = float("nan")
    return merged.drop(columns="paper_metric")


PROTOCOL_MAP, PROTOCOL_RECALL = "paper MAP@10 (mean P@10, 10 queries)", "paper R@100 (10 queries)"

TABLE1_NOTE = (
    "Our values are over **all test queries** (IA: all indexed images), with bootstrap 95% intervals in "
    "brackets; `chance` is the exact expectation of a random ranking. The paper's MAP@10 and R@100 were the "
    "mean P@10 and R@100 over 10 random queries; our `protocol` columns repeat that protocol (10 seeded "
    "queries), and their brackets give the 2.5-97.5% range of that estimate over 1000 draws of 10 queries: "
    "where the paper's number could land by the choice of queries alone."
)


def table1_markdown(results: pd.DataFrame) -> str:
    """Table 1 as Markdown: one row per (model, N, IDs, seed), ours with intervals beside the paper's numbers."""
    header = (
        "| model | N | IDs | seed | IA@1 | paper IA@1 | IA@5 | paper IA@5 | mAP@10 | P@10 | R@100 "
        "| protocol MAP@10 | paper MAP@10 | protocol R@100 | paper R@100 | chance P@10 | chance R@100 |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    order = {BOVW_MODEL: 0, VLAD_MODEL: 0.5, "DSI zero-shot": 1, "DSI fine-tuned": 2, "DSI multi-task": 3}
    keys = results[["model", "n", "ids", "seed"]].drop_duplicates()
    keys = keys.assign(_o=keys["model"].map(order).fillna(9)).sort_values(["_o", "n", "ids", "seed"])
    for model, n, ids, seed in keys[["model", "n", "ids", "seed"]].itertuples(index=False):
        group = results[(results.model == model) & (results.n == n) & (results.ids == ids) & (results.seed == seed)]
        row = group.set_index("metric")

        def cell(metric: str) -> str:
            if metric not in row.index:
                return "–"
            return format_interval(row.at[metric, "value"], row.at[metric, "ci_low"], row.at[metric, "ci_high"])

        def number(metric: str, column: str) -> str:
            return format_number(row.at[metric, column]) if metric in row.index and column in row.columns else "–"

        lines.append(
            f"| {model} | {n} | {ids} | {seed} | {cell('IA@1')} | {number('IA@1', 'paper')} | {cell('IA@5')} "
            f"| {number('IA@5', 'paper')} | {cell('mAP@10')} | {cell('P@10')} | {cell('R@100')} "
            f"| {cell(PROTOCOL_MAP)} | {number(PROTOCOL_MAP, 'paper')} | {cell(PROTOCOL_RECALL)} "
            f"| {number(PROTOCOL_RECALL, 'paper')} | {number('P@10', 'chance')} | {number('R@100', 'chance')} |"
        )
    return "\n".join(lines)


def bovw_markdown(results: pd.DataFrame, source: str, size: int) -> str:
    """A Markdown report of a BoVW study: settings, then Table 1's BoVW rows."""
    first = results.iloc[0]
    vlad = first.get("encoding", "histogram") == "vlad"
    flags = (("VLAD", vlad), ("RootSIFT", first["rootsift"]), ("tf-idf", first["tfidf"]),
             ("intra-normalisation", first.get("intra_normalisation", False)),
             ("no power normalisation" if vlad else "power normalisation", first.get("power_normalisation", vlad) != vlad))
    options = ", ".join(name for name, on in flags if on)
    timing = results.groupby(["n", "seed"])[["fit_s", "search_s"]].first().sum(axis=1)
    encoded = (f"one VLAD vector per image ({first['n_words']} x 128 values: the per-word sums of residuals to "
               "the word's centre, signed square root unless said otherwise, L2-normalised)" if vlad
               else "one histogram per image")
    return "\n".join([
        f"# BoVW baseline on {source} at {size} px (K = {first['n_words']}{', ' + options if options else ''})",
        "",
        f"Grayscale SIFT, k-means vocabulary of {first['n_words']} words fitted on the indexed images, {encoded}, "
        "cosine similarity, top-100. " + _vocabulary_note(results) + TABLE1_NOTE,
        "",
        table1_markdown(results),
        "",
        f"Fit + search wall time per run: {timing.min():.1f}-{timing.max():.1f} s "
        "(see reports/benchmarks/ for timings on an idle machine).",
    ])


def _vocabulary_note(results: pd.DataFrame) -> str:
    """A sentence on the number of vocabularies the metrics average over ('' for one)."""
    counts = results["vocabularies"] if "vocabularies" in results.columns else pd.Series([1])
    v = int(counts.max())
    if v <= 1:
        return ""
    return (f"Every metric is averaged per query over {v} vocabularies (k-means seeds seed ... seed + {v - 1}) "
            "before the bootstrap, so the row is the baseline's expected quality rather than one fit's. ")


def _read_bovw_table(path: Path) -> pd.DataFrame:
    """A table written by :func:`bovw_study`, with the columns that tables from before VLAD lack filled in."""
    frame = pd.read_csv(path)
    defaults = {"encoding": "histogram", "power_normalisation": False, "intra_normalisation": False, "vocabularies": 1,
                "variant": path.stem.split("px_", 1)[-1], "dim": frame["n_words"].iloc[0]}
    for column, value in defaults.items():
        if column not in frame.columns:
            frame[column] = value
    return frame


def _is_plain_bovw(frame: pd.DataFrame) -> bool:
    """Whether a BoVW table is the paper's setting: histograms, no RootSIFT, tf-idf or power normalisation."""
    first = frame.iloc[0]
    return first["encoding"] == "histogram" and not (first["rootsift"] or first["tfidf"] or first["power_normalisation"])


def vlad_comparison(out_dir: str | Path, source: str, size: int, *, baseline_words: int = 200) -> pd.DataFrame | None:
    """Write ``vlad_<source>_<size>px.{csv,md}``: every VLAD table in ``out_dir`` beside plain BoVW.

    Collects the tables :func:`bovw_study` wrote in ``out_dir`` for ``source`` and ``size``: the
    VLAD variants and plain BoVW (histograms without options). A VLAD variant is *better* or
    *worse* than plain BoVW with ``baseline_words`` words (at the same N and seed) on a metric
    only when their 95% intervals do not overlap. The databases are the same because they are
    drawn from (source, size, N, seed) alone; the query counts are checked anyway. Returns the
    long table, or None when ``out_dir`` holds no VLAD table for this source and size.
    """
    out_dir = Path(out_dir)
    frames = [_read_bovw_table(path) for path in sorted(out_dir.glob(f"bovw_{source}_{size}px_K*.csv"))]
    vlad = [f for f in frames if f["encoding"].iloc[0] == "vlad"]
    plain = [f for f in frames if _is_plain_bovw(f)]
    if not vlad:
        return None
    baseline = next((f for f in plain if f["n_words"].iloc[0] == baseline_words), None)
    if baseline is None:
        raise FileNotFoundError(
            f"no plain BoVW table with {baseline_words} words for {source} at {size} px in {out_dir}; run "
            f"`vitdsi bovw --source {source} --size {size} --n ... --words {baseline_words}` first"
        )
    results = pd.concat(plain + vlad, ignore_index=True)
    queries = results[results["metric"] == "P@10"].groupby(["n", "seed"])["n_queries"].nunique()
    if (queries > 1).any():
        raise ValueError(f"the BoVW tables in {out_dir} disagree on the number of test queries at "
                         f"(N, seed) = {list(queries[queries > 1].index)}: they come from different databases")
    base = baseline[["n", "seed", "metric", "value", "ci_low", "ci_high"]].rename(
        columns={c: f"baseline_{c}" for c in ("value", "ci_low", "ci_high")})
    results = results.merge(base, on=["n", "seed", "metric"], how="left")
    results["verdict"] = np.where(results["ci_low"] > results["baseline_ci_high"], "better",
                                  np.where(results["ci_high"] < results["baseline_ci_low"], "worse", "overlap"))
    results.loc[results["variant"] == baseline["variant"].iloc[0], "verdict"] = "baseline"
    write_table(results, out_dir / f"vlad_{source}_{size}px",
                markdown=vlad_markdown(results, source, size, baseline["variant"].iloc[0]))
    return results


def vlad_markdown(results: pd.DataFrame, source: str, size: int, baseline: str) -> str:
    """The VLAD comparison as Markdown: one row per (variant, N, seed), then the verdicts against ``baseline``."""
    lines = [
        f"# VLAD against plain BoVW on {source} at {size} px",
        "",
        "Both encode the grayscale SIFT descriptors of an image with a k-means vocabulary fitted on the indexed "
        "images, and rank the indexed images by cosine similarity (top 100). BoVW counts the descriptors per word "
        "(a K-bin histogram, the paper's baseline). VLAD sums, per word, the residuals `x - c` of the descriptors "
        "to the word's centre (K x 128 values), takes the signed square root of every component (power "
        "normalisation; `nopower`: without it), optionally L2-normalises each word's block (`intra`), and "
        "L2-normalises the vector. `rootsift`: RootSIFT descriptors. Values are over all test queries with "
        "bootstrap 95% intervals; `vs " + baseline + "` says *better* or *worse* only where the two intervals do "
        "not overlap (same database, same queries). Times: fit (SIFT, k-means, encoding the indexed images) plus "
        "search of all test queries, one run on a shared 2-core machine.",
        "",
        f"| variant | model | K | dim | N | seed | mAP@10 | P@10 | R@100 | chance P@10 | chance R@100 "
        f"| fit + search s | vs {baseline}: mAP@10 | P@10 | R@100 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = results[["variant", "n", "seed"]].drop_duplicates()
    order = {v: i for i, v in enumerate(results.drop_duplicates("variant").sort_values(
        ["encoding", "n_words", "variant"])["variant"])}
    keys = keys.assign(_o=keys["variant"].map(order)).sort_values(["n", "seed", "_o"])
    for variant, n, seed in keys[["variant", "n", "seed"]].itertuples(index=False):
        row = results[(results["variant"] == variant) & (results["n"] == n) & (results["seed"] == seed)]
        row = row.set_index("metric")

        def cell(metric: str) -> str:
            return format_interval(row.at[metric, "value"], row.at[metric, "ci_low"], row.at[metric, "ci_high"])

        first = row.iloc[0]
        seconds = first["fit_s"] + first["search_s"]
        verdicts = " | ".join(row.at[m, "verdict"] if first["verdict"] != "baseline" else "–"
                              for m in ("mAP@10", "P@10", "R@100"))
        lines.append(
            f"| {variant} | {first['model']} | {first['n_words']} | {int(first['dim'])} | {n} | {seed} "
            f"| {cell('mAP@10')} | {cell('P@10')} | {cell('R@100')} | {format_number(row.at['P@10', 'chance'])} "
            f"| {format_number(row.at['R@100', 'chance'])} | {seconds:.1f} | {verdicts} |"
        )
    return "\n".join(lines)


def evaluate_dsi(
    model,
    codec,
    db: Database,
    *,
    k: int = 100,
    beam_size: int | None = None,
    query_role: str = "test",
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[pd.DataFrame, dict]:
    """IA@1/IA@5 over the indexed images and retrieval metrics over the ``query_role`` queries.

    Both come from trie-constrained beam search, so every list holds distinct, valid IDs.
    Returns (table, timings) with one table row per metric.

    ``model`` may also be a list of models trained alike with different seeds (same codec): every
    metric is then averaged per image / query over the models before the bootstrap over queries,
    as BoVW is averaged over its k-means vocabularies, so the row is the training recipe's expected
    quality rather than one run's. The timings are then per model.
    """
    import torch

    from .decoding import beam_search

    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise ValueError("evaluate_dsi needs a model, or a non-empty list of models")
    index_images, _ = db.split("index")
    query_images, _ = db.split(query_role)
    index_labels, query_labels = db.relevance_labels("index"), db.relevance_labels(query_role)
    owns, rankings, index_s, search_s = [], [], 0.0, 0.0
    for one in models:
        start = time.perf_counter()
        _, own = beam_search(one, torch.from_numpy(index_images), codec, k=5, batch_size=batch_size)
        indexed = time.perf_counter()
        _, ranked = beam_search(
            one, torch.from_numpy(query_images), codec, k=min(k, len(codec)), beam_size=beam_size, batch_size=batch_size
        )
        searched = time.perf_counter()
        owns.append(own.numpy())
        rankings.append(ranked.numpy())
        index_s, search_s = index_s + indexed - start, search_s + searched - indexed
    table = pd.concat(  # a stack of one scores exactly as the single ranking
        [
            metrics.evaluate_indexing(np.stack(owns), np.arange(len(index_images)), ks=(1, 5), seed=seed,
                                      n_db=len(codec)),
            retrieval_metrics(np.stack(rankings), query_labels, index_labels, seed=seed),
        ],
        ignore_index=True,
    )
    timings = {
        "indexing_eval_s": index_s / len(models),
        "search_s": search_s / len(models),
        "search_ms_per_query": 1000 * search_s / len(models) / max(len(query_images), 1),
        "n_index": len(index_images),
    }
    return table, timings
