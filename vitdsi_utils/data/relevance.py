"""Which database images are relevant to a query: same class, or at least one shared label.

Labels come in three forms, and the caller says which one it passes (``kind=``), because the same
Python value can mean two things: ``[[0, 1], [1, 1]]`` is either a multi-hot matrix (item 0 has
label 1, item 1 has labels 0 and 1) or two label lists (the sets {0, 1} and {1}).

* ``"class"``: one class per item, shape (n,); relevant means the same class.
* ``"sets"``: one label set per item (a set, frozenset, tuple or list of hashable labels; the sets
  may differ in length, and may be empty); relevant means at least one shared label.
* ``"multi-hot"``: a (n, C) matrix of 0/1 or bool, row i marking the labels of item i, with the
  same C for queries and database; relevant means at least one shared label.

Without ``kind`` only numpy arrays whose dtype says the form are accepted: an integer 1-D array is
class ids, a boolean 2-D array is multi-hot (``Database.relevance_labels`` returns one of these, and
``Database.relevance_kind`` names it). Anything else raises a ValueError that says what to pass.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from itertools import chain
from typing import Any

import numpy as np
import scipy.sparse as sp

#: The label forms :func:`label_relevance` takes (its ``kind=`` argument).
RELEVANCE_KINDS = ("class", "sets", "multi-hot")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _label_sets(items: Any, side: str) -> list[frozenset]:
    """``items`` as a list of frozensets of labels, or a ValueError naming the first item that is not a set."""
    if isinstance(items, np.ndarray) and items.dtype == bool and items.ndim == 2:
        raise ValueError(f"{side} labels are a boolean (n, C) matrix, which is multi-hot; pass kind='multi-hot'")
    if isinstance(items, (str, bytes)) or not hasattr(items, "__len__"):
        raise ValueError(f"{side} labels must be a sequence with one label set per item, got {_describe(items)}")
    sets = []
    for i, item in enumerate(items):
        if isinstance(item, (str, bytes)) or not hasattr(item, "__iter__"):
            raise ValueError(
                f"kind='sets' takes one label set per item, but {side} item {i} is {_describe(item)}; "
                "class ids go with kind='class' (or write each class c as the set {c} on both sides)"
            )
        labels = item.tolist() if isinstance(item, np.ndarray) else list(item)
        bad = next(
            (label for label in labels if not isinstance(label, Hashable) or isinstance(label, (list, set))), None
        )
        if bad is not None:
            raise ValueError(f"{side} item {i} holds {_describe(bad)}, which cannot be a label")
        sets.append(frozenset(labels))
    return sets


def multilabel_relevance(query_sets: Sequence[Any], db_sets: Sequence[Any]) -> np.ndarray:
    """Return (Q, n_db) bool: True where a query's label set and a database item's set intersect.

    Each item is an iterable of hashable labels (sets may differ in length, or be empty).
    """
    query_sets, db_sets = _label_sets(query_sets, "query"), _label_sets(db_sets, "database")
    # Only labels that some query carries can make a database item relevant, so the
    # vocabulary comes from the queries and database labels outside it are dropped.
    vocab = {label: j for j, label in enumerate(dict.fromkeys(chain.from_iterable(query_sets)))}

    def indicator(sets: Sequence[frozenset]) -> sp.csr_matrix:
        columns = [[vocab[label] for label in s if label in vocab] for s in sets]
        lengths = np.fromiter((len(c) for c in columns), dtype=np.int64, count=len(columns))
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        indices = np.fromiter(chain.from_iterable(columns), dtype=np.int64, count=int(indptr[-1]))
        data = np.ones(indices.size, dtype=np.int32)
        return sp.csr_matrix((data, indices, indptr), shape=(len(columns), len(vocab)))

    # (Q, V) @ (V, n_db) counts the shared labels of every pair
    shared = indicator(query_sets) @ indicator(db_sets).T
    return shared.toarray() > 0


def _class_labels(labels: Any, side: str) -> np.ndarray:
    """``labels`` as a 1-D array of class ids, or a ValueError that says which form they look like."""
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        raise ValueError(
            f"kind='class' takes one class per item, shape (n,), but the {side} labels have shape {labels.shape}; "
            "a (n, C) 0/1 matrix is kind='multi-hot', rows of label ids are kind='sets'"
        )
    items = list(labels) if not isinstance(labels, np.ndarray) else labels
    for i, item in enumerate(items):
        if isinstance(item, (set, frozenset, list, tuple, np.ndarray)):
            raise ValueError(
                f"kind='class' takes one class per item, but {side} item {i} is {_describe(item)}; "
                "label sets go with kind='sets' on both sides (a class c is then the set {c})"
            )
    array = np.asarray(items)
    if array.ndim != 1:
        raise ValueError(
            f"kind='class' takes one class per item, shape (n,); the {side} labels have shape {array.shape}"
        )
    return array


def _multi_hot(labels: Any, side: str) -> np.ndarray:
    """``labels`` as a boolean (n, C) matrix, or a ValueError when they are not 0/1 rows of one length."""
    if not isinstance(labels, np.ndarray):
        lengths = {len(row) if hasattr(row, "__len__") else -1 for row in labels}
        if len(lengths) > 1 or -1 in lengths:
            raise ValueError(
                f"kind='multi-hot' takes a (n, C) matrix of 0/1, but the {side} rows differ in length or are not rows; "
                "lists of label ids are kind='sets'"
            )
    array = np.asarray(labels)
    if array.ndim != 2:
        raise ValueError(f"kind='multi-hot' takes a (n, C) matrix of 0/1; the {side} labels have shape {array.shape}")
    if array.dtype != bool:
        if not (np.issubdtype(array.dtype, np.number) and np.isin(array, (0, 1)).all()):
            bad = (
                array[~np.isin(array, (0, 1))].ravel()[:1]
                if np.issubdtype(array.dtype, np.number)
                else array.ravel()[:1]
            )
            raise ValueError(
                f"kind='multi-hot' takes 0/1 (or bool) entries, but the {side} labels hold {_describe(bad.tolist()[0])}; "
                "rows of label ids are kind='sets'"
            )
    return array != 0


def infer_relevance_kind(query_labels: Any, db_labels: Any) -> str:
    """The kind of two label arrays whose dtype says it (integer 1-D: 'class'; boolean 2-D: 'multi-hot').

    Anything else is ambiguous or mixed, and raises a ValueError naming the kinds to choose from.
    """
    forms = []
    for labels in (query_labels, db_labels):
        if isinstance(labels, np.ndarray) and labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
            forms.append("class")
        elif isinstance(labels, np.ndarray) and labels.ndim == 2 and labels.dtype == bool:
            forms.append("multi-hot")
        else:
            forms.append(None)
    if forms[0] is not None and forms[0] == forms[1]:
        return forms[0]
    if None not in forms:
        raise ValueError(
            f"queries and database labels have different forms ({forms[0]} and {forms[1]}); give both in one form"
        )
    raise ValueError(
        "say what the labels are: label_relevance(..., kind='class') for one class per item, kind='sets' for label "
        "sets (they may differ in length), or kind='multi-hot' for a (n, C) 0/1 matrix. Only an integer numpy "
        "array (n,) or a boolean numpy array (n, C) is read without kind=, since lists such as [[0, 1], [2, 3]] "
        "could be either of the last two"
    )


def label_relevance(query_labels: Any, db_labels: Any, kind: str | None = None) -> np.ndarray:
    """Return (Q, n_db) bool relevance: the same class, or at least one shared label for multi-label data.

    ``kind`` says what both label arguments hold (see the module docstring): ``"class"`` (one class
    per item), ``"sets"`` (one label set per item) or ``"multi-hot"`` (a (n, C) 0/1 matrix). Without
    it only an integer numpy array (class ids) or a boolean numpy array (multi-hot) is accepted;
    ``Database.relevance_labels`` returns one of these and ``Database.relevance_kind`` names it.
    Labels that do not fit ``kind`` raise a ValueError that names the item and the kind that fits.
    """
    if kind is None:
        kind = infer_relevance_kind(query_labels, db_labels)
    if kind not in RELEVANCE_KINDS:
        raise ValueError(f"unknown relevance kind {kind!r}; choose one of {RELEVANCE_KINDS}")
    if kind == "sets":
        return multilabel_relevance(query_labels, db_labels)
    if kind == "multi-hot":
        queries, database = _multi_hot(query_labels, "query"), _multi_hot(db_labels, "database")
        if queries.shape[1] != database.shape[1]:
            raise ValueError(
                f"multi-hot labels must have the same number of columns (labels): queries {queries.shape}, "
                f"database {database.shape}"
            )
        # (Q, C) @ (C, n_db) counts the labels each pair shares
        return queries.astype(np.int32) @ database.astype(np.int32).T > 0
    queries, database = _class_labels(query_labels, "query"), _class_labels(db_labels, "database")
    return queries[:, None] == database[None, :]
