"""Score models on a database: long result rows (metric, value, interval, chance) for BoVW and the DSI.

The paper's numbers are set beside these rows by :func:`vitdsi_utils.reports.paper.attach_paper`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from vitdsi_utils import metrics
from vitdsi_utils.bovw import BoVW, NoKeypointsWarning
from vitdsi_utils.data.database import Database
from vitdsi_utils.data.relevance import label_relevance
from vitdsi_utils.model.decoding import beam_search
from vitdsi_utils.reports.tables import BOVW_MODEL


def retrieval_metrics(
    ranked: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    kind: str | None = None,
    seed: int = 0,
    n_resamples: int = 1000,
) -> pd.DataFrame:
    """mAP@10, P@10, R@100 and the paper protocol, with 95% intervals and chance (one row per metric).

    Labels are class ids (n,) or multi-hot label sets (n, C), as ``Database.relevance_labels``
    returns them, and ``kind`` says which (``Database.relevance_kind``); see :func:`label_relevance`.
    """
    relevant = label_relevance(query_labels, db_labels, kind=kind)
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
        return self.table.assign(
            model=BOVW_MODEL, source=s["source"], size=s["size"], n=s["n"], ids="-", seed=s["seed"], **self.timings
        )


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
    parts = [
        f"K{n_words}",
        "rootsift" if rootsift else "",
        "tfidf" if tfidf else "",
        "vlad" if encoding == "vlad" else "",
        "intra" if intra_normalisation else "",
        "" if power == power_default else ("power" if power else "nopower"),
    ]
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
        model = BoVW(
            n_words,
            encoding=encoding,
            rootsift=rootsift,
            tfidf=tfidf,
            power_normalisation=power_normalisation,
            intra_normalisation=intra_normalisation,
            random_state=seed + draw,
            progress=progress,
        )
        with warnings.catch_warnings():
            if draw:  # the same images have the same keypoints in every vocabulary: the first draw has said it
                warnings.simplefilter("ignore", NoKeypointsWarning)
            start = time.perf_counter()
            model.fit(index_images)
            fitted = time.perf_counter()
            _, ranked = model.search(query_images, k)
            searched = time.perf_counter()
        rankings.append(ranked)
        fit_s += fitted - start
        search_s += searched - fitted
    table = retrieval_metrics(np.stack(rankings), query_labels, index_labels, kind=db.relevance_kind, seed=seed)
    timings = {
        "fit_s": fit_s / vocabularies,
        "search_s": search_s / vocabularies,
        "search_ms_per_query": 1000 * search_s / vocabularies / max(len(query_images), 1),
        "n_index": len(index_images),
        "vocabularies": vocabularies,
    }
    return BoVWResult(table, timings, model)


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
            metrics.evaluate_indexing(
                np.stack(owns), np.arange(len(index_images)), ks=(1, 5), seed=seed, n_db=len(codec)
            ),
            retrieval_metrics(np.stack(rankings), query_labels, index_labels, kind=db.relevance_kind, seed=seed),
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
