"""Which database images are relevant to a query: same class, or at least one shared label."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np
import scipy.sparse as sp


def multilabel_relevance(query_sets: Sequence[Any], db_sets: Sequence[Any]) -> np.ndarray:
    """Return (Q, n_db) bool: True where a query's label set and a database item's set intersect."""
    # Only labels that some query carries can make a database item relevant, so the
    # vocabulary comes from the queries and database labels outside it are dropped.
    vocab = {label: j for j, label in enumerate(dict.fromkeys(chain.from_iterable(query_sets)))}

    def indicator(sets: Sequence[Any]) -> sp.csr_matrix:
        columns = [[vocab[label] for label in s if label in vocab] for s in sets]
        lengths = np.fromiter((len(c) for c in columns), dtype=np.int64, count=len(columns))
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        indices = np.fromiter(chain.from_iterable(columns), dtype=np.int64, count=int(indptr[-1]))
        data = np.ones(indices.size, dtype=np.int32)
        return sp.csr_matrix((data, indices, indptr), shape=(len(columns), len(vocab)))

    # (Q, V) @ (V, n_db) counts the shared labels of every pair
    shared = indicator(query_sets) @ indicator(db_sets).T
    return shared.toarray() > 0


def label_relevance(query_labels: Sequence[Any], db_labels: Sequence[Any]) -> np.ndarray:
    """Return (Q, n_db) bool relevance: the same class, or at least one shared label for multi-label data.

    Labels come in one of three forms, the same for queries and database: class ids (n,);
    label sets (sequences of sets, e.g. frozensets); or a multi-hot matrix (n, C) of 0/1 or bool,
    where row i marks the labels of item i (``Database.relevance_labels`` gives this form).
    """
    if len(query_labels) and isinstance(query_labels[0], (set, frozenset)):
        return multilabel_relevance(query_labels, db_labels)
    query_labels = np.asarray(query_labels)
    db_labels = np.asarray(db_labels)
    if query_labels.ndim == 2 and db_labels.ndim == 2:
        if query_labels.shape[1] != db_labels.shape[1]:
            raise ValueError(
                f"multi-hot labels must have the same number of columns (labels): queries {query_labels.shape}, "
                f"database {db_labels.shape}"
            )
        # (Q, C) @ (C, n_db) counts the labels each pair shares
        return (query_labels != 0).astype(np.int32) @ (db_labels != 0).astype(np.int32).T > 0
    if query_labels.ndim != 1 or db_labels.ndim != 1:
        raise ValueError(
            "labels must be class ids (n,) for both queries and database, or multi-hot (n, C) for both; "
            f"got shapes {query_labels.shape} and {db_labels.shape}"
        )
    return query_labels[:, None] == db_labels[None, :]
