"""A flat inner-product index: exact top-k search over L2-normalised vectors (FAISS, or torch as a fallback)."""

from __future__ import annotations

import warnings
from numbers import Integral

import numpy as np
import torch

from vitdsi_utils import distributed

BACKENDS = ("auto", "faiss", "torch")


FAISS_PIN = "faiss-cpu==1.15.1"  # the version requirements.txt pins


# Queries scored against the database at once by the torch backend, so (queries x database) stays bounded.
_SEARCH_CHUNK = 1024

#: Queries per block when a search is shared out over a process group: whole blocks go to each process.
#: It is FAISS's own query block (``distance_compute_blas_query_bs``) and a multiple of the torch chunk.
SHARD_QUERIES = 4096


def faiss_available() -> bool:
    """Whether ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


class FlatIPIndex:
    """Exact top-k search by inner product over database vectors (n_db, D): FAISS ``IndexFlatIP`` or torch.

    ``backend="auto"`` uses FAISS when it can be imported and otherwise falls back, with a
    warning, to a torch matrix product and a stable sort (ties go to the lower row); both
    return the same ranking up to ties. ``"faiss"`` insists on FAISS, ``"torch"`` never uses it.
    ``search`` returns ``(D, I)`` in the FAISS convention: scores (Q, k') float32 and rows
    (Q, k') int64, sorted by descending score, with ``k' = min(k, n_db)``.

    Under a process group ``search`` is a collective call (every process passes the same
    queries; see :meth:`search`).
    """

    def __init__(self, vectors: np.ndarray, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"database vectors must be a non-empty (n_db, D) array, got shape {vectors.shape}")
        self.vectors = vectors
        self.backend = self._resolve(backend)
        if self.backend == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatIP(vectors.shape[1])
            self._faiss.add(vectors)

    @staticmethod
    def _resolve(backend: str) -> str:
        if backend == "torch":
            return "torch"
        if faiss_available():
            return "faiss"
        if backend == "faiss":
            raise ImportError(f"backend='faiss' needs FAISS: install it with `pip install {FAISS_PIN}`")
        warnings.warn(
            f"faiss is not installed (`pip install {FAISS_PIN}`); searching with a torch matrix product "
            "instead: the same ranking, slower on large databases",
            UserWarning,
            stacklevel=3,
        )
        return "torch"

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(self, queries: np.ndarray, k: int, *, shard: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-k database rows of each query vector (Q, D) by inner product; see the class docstring.

        Under a process group with ``shard=True`` every process searches its blocks of
        :data:`SHARD_QUERIES` queries and gets every process's results back. The torch backend's
        results are then bit for bit those of one process; FAISS may round an inner product
        differently in its last bit when it picks another kernel for fewer queries, so its scores
        agree to about 1e-6 and its rows up to near-ties. ``shard=False``: search every query here.
        """
        k = min(check_k(k), len(self))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (Q, {self.dim}), got {queries.shape}")
        if shard and distributed.active():
            share = distributed.shard_range(len(queries), SHARD_QUERIES)
            scores, rows = self._search(queries[share.start : share.stop], k)
            return distributed.gather_array(scores), distributed.gather_array(rows)
        return self._search(queries, k)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.backend == "faiss":
            scores, rows = self._faiss.search(queries, k)
            return scores.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)
        database = torch.from_numpy(self.vectors)
        scores = np.empty((len(queries), k), dtype=np.float32)
        rows = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), _SEARCH_CHUNK):
            similarity = torch.from_numpy(queries[start : start + _SEARCH_CHUNK]) @ database.T
            top, order = torch.sort(similarity, dim=1, descending=True, stable=True)
            scores[start : start + len(top)] = top[:, :k].numpy()
            rows[start : start + len(top)] = order[:, :k].numpy()
        return scores, rows
