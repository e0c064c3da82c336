"""Searchers: every retrieval model behind one interface, ``search(images, k) -> (scores, rows)``.

``images`` are uint8 (Q, S, S, 3); ``scores`` (Q, k) are higher-is-better and ``rows`` (Q, k) are
database rows (-1 where a model returns fewer than k). BoVW, the DSI's beam search and dense search
all answer this way, so the demo, re-ranking and the studies treat them alike.
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

import numpy as np
import torch

from vitdsi_utils.baselines.dense import (
    DenseConfig,
    DenseEncoder,
    DenseTrainConfig,
    _finished,
    load_dense,
    train_dense,
)
from vitdsi_utils.baselines.index import BACKENDS, FlatIPIndex, check_k
from vitdsi_utils.devices import resolve_device
from vitdsi_utils.model.decoding import beam_search
from vitdsi_utils.training.history import History


# ------------------------------------------------------------------------------------------
# The retriever
# ------------------------------------------------------------------------------------------
class DenseRetriever:
    """Dense image retrieval, scikit-learn style: ``fit`` the encoder, ``index`` the database, ``search``.

    ``fit(images, labels)`` trains a new :class:`DenseEncoder` (``model_config``) with
    ``train_config``; ``index(images)`` embeds the database images into a :class:`FlatIPIndex`
    (``backend``); ``search(query_images, k)`` returns ``(D, I)``: cosine scores and database
    rows (Q, k') like :meth:`bovw.BoVW.search`. ``transform`` (alias ``embed``) gives the
    unit-norm embeddings (n, D) float32. :meth:`from_checkpoint` wraps a saved encoder.

    Attributes after fitting: ``model_`` (the encoder), ``history_`` (per-epoch rows),
    ``fit_seconds_``; after indexing: ``index_`` (the FlatIPIndex), ``index_seconds_``.
    """

    def __init__(
        self,
        model_config: DenseConfig | None = None,
        train_config: DenseTrainConfig | None = None,
        *,
        backend: str = "auto",
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.model_config = model_config
        self.train_config = train_config
        self.backend = backend

    # -- fitting ---------------------------------------------------------------------------
    def fit(
        self,
        images: np.ndarray,
        labels: Any,
        *,
        val: tuple | None = None,
        checkpoint_path: str | os.PathLike | None = None,
    ) -> DenseRetriever:
        """Train a new encoder on uint8 ``images`` (n, S, S, 3) with ``labels`` (n,); see :func:`train_dense`."""
        images = np.asarray(images)
        config = self.model_config or DenseConfig(image_size=int(images.shape[1]) if images.ndim == 4 else 160)
        train_config = self.train_config or DenseTrainConfig()
        torch.manual_seed(train_config.seed)  # the initial weights are as reproducible as the training
        model = DenseEncoder(config)
        start = time.perf_counter()
        self.loaded_ = _finished(checkpoint_path, train_config.epochs)
        self.history_ = train_dense(
            model, images, labels, config=train_config, val=val, checkpoint_path=checkpoint_path
        )
        self.model_ = model
        # the training time the history records (all epochs, also those of an earlier, resumed run)
        self.fit_seconds_ = float(sum(row.get("seconds", 0.0) for row in self.history_))
        self.call_seconds_ = time.perf_counter() - start
        return self

    @classmethod
    def from_model(cls, model: DenseEncoder, *, backend: str = "auto", history: list | None = None) -> DenseRetriever:
        """A retriever around an already trained encoder."""
        retriever = cls(model.config, backend=backend)
        retriever.model_ = model.eval()
        retriever.history_ = History(history or [])
        retriever.fit_seconds_ = 0.0
        return retriever

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, backend: str = "auto", device: str = "auto") -> DenseRetriever:
        """A retriever around the encoder saved at ``path`` (``weights_only`` loading; errors say what to do),
        on ``device`` ("auto": CUDA when there is one)."""
        model, meta = load_dense(path, map_location=resolve_device(device))
        retriever = cls.from_model(model, backend=backend, history=meta["history"])
        retriever.train_config = DenseTrainConfig.from_dict(meta["train_config"]) if meta["train_config"] else None
        retriever.fit_seconds_ = float(sum(row.get("seconds", 0.0) for row in meta["history"]))
        return retriever

    def _check_fitted(self, what: str = "model_") -> None:
        if not hasattr(self, what):
            step = "fit() or from_checkpoint()" if what == "model_" else "index(database_images)"
            raise RuntimeError(f"this DenseRetriever is not ready: call {step} first")

    # -- encoding, indexing, search --------------------------------------------------------
    def transform(self, images: np.ndarray) -> np.ndarray:
        """Unit-norm embeddings (n, D) float32 of uint8 images (n, S, S, 3)."""
        self._check_fitted()
        batch = self.train_config.eval_batch_size if self.train_config else 256
        return self.model_.embed(images, batch).numpy()

    embed = transform

    def index(self, images: np.ndarray) -> DenseRetriever:
        """Embed the database images (n_db, S, S, 3) and build the flat inner-product index over them."""
        start = time.perf_counter()
        self.index_ = FlatIPIndex(self.transform(images), backend=self.backend)
        self.index_seconds_ = time.perf_counter() - start
        return self

    @property
    def database_vectors(self) -> np.ndarray:
        """The indexed embeddings (n_db, D) float32."""
        self._check_fitted("index_")
        return self.index_.vectors

    def search(self, query_images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosine scores (Q, k') float32, database rows (Q, k') int64) of uint8 query images; k' = min(k, n_db)."""
        self._check_fitted("index_")
        k = check_k(k)  # before the forward pass, so a bad k fails fast
        return self.index_.search(self.transform(query_images), k)

    def search_vectors(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` for embeddings (Q, D) from :meth:`transform`."""
        self._check_fitted("index_")
        return self.index_.search(query_vectors, k)


class Searcher(Protocol):
    """What QueryDemo needs of a model: a batched top-k search over the indexed images."""

    def search(self, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k), rows (Q, k)) for uint8 images (Q, S, S, 3)."""
        ...


class BoVWSearcher:
    """A fitted :class:`bovw.BoVW` as a searcher: cosine scores of its visual-word histograms."""

    def __init__(self, bovw: Any):
        self.bovw = bovw

    def search(self, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosine scores (Q, k), rows (Q, k)); k is capped at the database size."""
        return self.bovw.search(np.asarray(images), k)


class DSISearcher:
    """A DSI model as a searcher: trie-constrained beam search, scores are sequence log-probabilities."""

    def __init__(self, model: Any, codec: Any, *, beam_size: int | None = None):
        self.model, self.codec, self.beam_size = model, codec, beam_size

    def search(self, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(log-probabilities (Q, k), rows (Q, k)); k is capped at the number of IDs."""
        import torch

        k = min(k, len(self.codec))
        beam = None if self.beam_size is None else max(self.beam_size, k)
        images = torch.from_numpy(np.ascontiguousarray(images))
        scores, rows = beam_search(self.model, images, self.codec, k=k, beam_size=beam)
        return scores.numpy(), rows.numpy()
