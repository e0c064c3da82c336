"""Query latency: milliseconds per query of a batch of top-k searches, by DSI beam search, BoVW and dense search.

Each function builds a method for one database (an untrained DSI over ``n`` decimal IDs, whose
beam search does the same work as a trained one; a BoVW vocabulary; a dense index) and times it
with :func:`time_per_query`: medians over repeated calls, wall and CPU time per query. The scale
study (:mod:`vitdsi_utils.studies.scale_tables`) tabulates them against N. The models run on ``device``
("auto": CUDA when there is one, :func:`vitdsi_utils.devices.resolve_device`); the DSI's beam search
in float32 unless ``amp`` asks for bf16 (:func:`vitdsi_utils.devices.autocast`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from vitdsi_utils.baselines.dense import DenseConfig, DenseEncoder
from vitdsi_utils.bovw import BoVW
from vitdsi_utils.devices import resolve_device
from vitdsi_utils.ids.codec import make_codec
from vitdsi_utils.model.decoding import beam_search
from vitdsi_utils.model.vit import DSIConfig, DSIModel
from vitdsi_utils.retrieval.searchers import DenseRetriever

#: Methods of the latency table, in plotting order.
METHODS = ("DSI beam search", "BoVW", "Dense (FAISS)")


def time_per_query(search: Callable[[], Any], n_queries: int, repeats: int = 3, warmup: int = 1) -> tuple[float, float]:
    """(wall, CPU) seconds per query: medians over ``repeats`` calls of ``search()`` (after ``warmup`` untimed
    calls), divided by ``n_queries``.

    The CPU time is this process's (all its threads): on a shared machine it is what the search
    costs, while the wall time also counts the time spent waiting for a core. On a GPU only the
    wall time means anything.
    """
    if repeats < 1 or n_queries < 1:
        raise ValueError(f"repeats and n_queries must be at least 1, got {repeats} and {n_queries}")
    for _ in range(warmup):
        search()
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        search()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls) / n_queries, statistics.median(cpus) / n_queries


def latency_row(method: str, build: float, build_cpu: float, wall: float, cpu: float, **extra: Any) -> dict[str, Any]:
    """One row of the latency table: build seconds (wall, CPU) and milliseconds per query (wall, CPU)."""
    return {
        "method": method,
        "build_s": build,
        "build_cpu_s": build_cpu,
        "ms_per_query": 1000 * wall,
        "cpu_ms_per_query": 1000 * cpu,
        **extra,
    }


def as_ks(k: int | Sequence[int]) -> list[int]:
    """``k`` as a list of list lengths: one int, or several (a latency row per k, one build for all)."""
    return [int(k)] if isinstance(k, (int, np.integer)) else [int(v) for v in k]


def dsi_latency(
    n: int,
    queries: np.ndarray,
    *,
    model_overrides: dict | None = None,
    k: int = 100,
    beam_size: int | None = None,
    batch_size: int = 64,
    repeats: int = 3,
    device: str | torch.device = "auto",
    amp: bool | str = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Top-k beam-search latency of an untrained DSI over ``n`` decimal IDs: build = codec + trie seconds."""
    return dsi_latency_rows(
        n,
        queries,
        [k],
        model_overrides=model_overrides,
        beam_size=beam_size,
        batch_size=batch_size,
        repeats=repeats,
        device=device,
        amp=amp,
        seed=seed,
    )[0]


def dsi_latency_rows(
    n: int,
    queries: np.ndarray,
    ks: Sequence[int],
    *,
    model_overrides: dict | None = None,
    beam_size: int | None = None,
    batch_size: int = 64,
    repeats: int = 3,
    device: str | torch.device = "auto",
    amp: bool | str = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """:func:`dsi_latency` for every k of ``ks`` (beam ``max(k, beam_size)``) with one model and codec."""
    device = resolve_device(device)

    t0, c0 = time.perf_counter(), time.process_time()
    codec = make_codec(n)
    build, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.manual_seed(seed)
    model = DSIModel(DSIConfig.from_codec(codec, image_size=int(queries.shape[1]), **(model_overrides or {})))
    model.to(device).eval()
    images = torch.from_numpy(np.ascontiguousarray(queries))
    rows = []
    for k in ks:
        beam = None if beam_size is None else max(k, beam_size)

        def search(k: int = k, beam: int | None = beam) -> Any:
            return beam_search(model, images, codec, k=k, beam_size=beam, batch_size=batch_size, device=device, amp=amp)

        wall, cpu = time_per_query(search, len(queries), repeats)
        rows.append(latency_row(METHODS[0], build, build_cpu, wall, cpu, k=k, parameters=model.num_parameters()))
    return rows


def bovw_latency(
    database_images: np.ndarray,
    queries: np.ndarray,
    *,
    n_words: int = 200,
    k: int = 100,
    repeats: int = 3,
    seed: int = 0,
    n_jobs: int = 1,
) -> dict[str, Any]:
    """Top-k BoVW latency (SIFT of the queries + histograms + cosine top-k); build = ``fit`` seconds."""
    return bovw_latency_rows(database_images, queries, [k], n_words=n_words, repeats=repeats, seed=seed, n_jobs=n_jobs)[
        0
    ]


def bovw_latency_rows(
    database_images: np.ndarray,
    queries: np.ndarray,
    ks: Sequence[int],
    *,
    n_words: int = 200,
    repeats: int = 3,
    seed: int = 0,
    n_jobs: int = 1,
) -> list[dict[str, Any]]:
    """:func:`bovw_latency` for every k of ``ks`` with one fitted vocabulary."""

    model = BoVW(n_words, random_state=seed, n_jobs=n_jobs, progress=False)
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(database_images)
    build, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = []
    for k in ks:
        wall, cpu = time_per_query(lambda k=k: model.search(queries, k), len(queries), repeats)
        rows.append(latency_row(METHODS[1], build, build_cpu, wall, cpu, k=k, parameters=0))
    return rows


def dense_latency(
    database_images: np.ndarray,
    queries: np.ndarray,
    *,
    model_overrides: dict | None = None,
    k: int = 100,
    repeats: int = 3,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Top-k latency of an untrained dense encoder + flat inner-product index (FAISS when installed).

    Build = embedding the database and filling the index. The FAISS index is on the CPU
    (``faiss-cpu``) whatever ``device`` the encoder runs on.
    """
    return dense_latency_rows(
        database_images, queries, [k], model_overrides=model_overrides, repeats=repeats, device=device, seed=seed
    )[0]


def dense_latency_rows(
    database_images: np.ndarray,
    queries: np.ndarray,
    ks: Sequence[int],
    *,
    model_overrides: dict | None = None,
    repeats: int = 3,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """:func:`dense_latency` for every k of ``ks`` with one encoder and index."""
    device = resolve_device(device)

    overrides = {"pooling": "mean", **(model_overrides or {})}
    torch.manual_seed(seed)
    encoder = DenseEncoder(DenseConfig(image_size=int(queries.shape[1]), **overrides)).to(device)
    c0 = time.process_time()
    retriever = DenseRetriever.from_model(encoder).index(database_images)
    build_cpu = time.process_time() - c0
    rows = []
    for k in ks:
        wall, cpu = time_per_query(lambda k=k: retriever.search(queries, k), len(queries), repeats)
        rows.append(
            latency_row(
                METHODS[2],
                retriever.index_seconds_,
                build_cpu,
                wall,
                cpu,
                k=k,
                parameters=encoder.num_parameters(),
                backend=retriever.index_.backend,
            )
        )
    return rows
