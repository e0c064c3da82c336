"""The scale study's two tables: per-query latency of each method against N, and IA@1 of a DSI trained on N.

* :func:`latency_table` - per-query top-k latency of DSI trie-constrained beam search, BoVW and dense
  FAISS search for each N (untrained models of the study's size), with each method's build time.
* :func:`ia_table` - IA@1 of a DSI trained to memorise N images, with its epochs and seconds; a beam
  search re-measured after training is kept in the run folder (:func:`_cached_ia1`).
* :func:`reusable_latency` - an existing latency table, when it covers the same N and settings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from vitdsi_utils.atomic import write_json
from vitdsi_utils.data.database import index_all_database, query_views
from vitdsi_utils.data.images import ImageSet
from vitdsi_utils.devices import resolve_device
from vitdsi_utils.ids.codec import make_codec
from vitdsi_utils.model.decoding import indexing_accuracy
from vitdsi_utils.phases import index_database
from vitdsi_utils.retrieval.latency import METHODS, as_ks, bovw_latency_rows, dense_latency_rows, dsi_latency_rows
from vitdsi_utils.runs import run_name

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
        run_dir = Path(runs_dir) / run_name(db, study="scale") if runs_dir else None
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
