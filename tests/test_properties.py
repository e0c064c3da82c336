"""Property-based tests (hypothesis): metric bounds and invariants, exact chance levels, the ID codec and trie.

Each property holds for every input hypothesis draws; a failure is shrunk to the smallest
counter-example. Sizes are kept small so the whole file runs in a few seconds.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitdsi_utils import metrics
from vitdsi_utils.ids.codec import IDCodec, decimal_codes, dense_id_order, make_codec

# the shared 2-core machine makes single examples slow now and then: no per-example deadline
quick = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------
@st.composite
def rankings(draw, max_db: int = 30, max_queries: int = 5):
    """(ranked (Q, K) left-packed with -1, relevant (Q, n_db) bool): any valid input of the metrics."""
    n_db = draw(st.integers(1, max_db))
    n_queries = draw(st.integers(1, max_queries))
    width = draw(st.integers(1, n_db + 3))  # wider than the database: the tail must be padding
    ranked = np.full((n_queries, width), -1, dtype=np.int64)
    for q in range(n_queries):
        length = draw(st.integers(0, min(width, n_db)))
        ranked[q, :length] = draw(st.permutations(range(n_db)))[:length]
    relevant = np.array(
        draw(st.lists(st.lists(st.booleans(), min_size=n_db, max_size=n_db), min_size=n_queries, max_size=n_queries)),
        dtype=bool,
    )
    return ranked, relevant


ks = st.integers(1, 40)


@st.composite
def code_sets(draw):
    """(distinct codes, base): token tuples of mixed lengths over an alphabet of ``base`` symbols."""
    base = draw(st.integers(2, 12))
    code = st.lists(st.integers(0, base - 1), min_size=1, max_size=4).map(tuple)
    codes = draw(st.lists(code, min_size=1, max_size=40, unique=True))
    return codes, base


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------
@quick
@given(rankings(), ks)
def test_precision_recall_and_ap_lie_in_the_unit_interval(case, k):
    ranked, relevant = case
    hits = metrics.relevance_matrix(ranked, relevant)
    n_rel = relevant.sum(axis=1)
    p = metrics.precision_at_k(hits, k)
    r = metrics.recall_at_k(hits, n_rel, k)
    ap = metrics.average_precision_at_k(hits, n_rel, k)
    assert ((p >= 0) & (p <= 1)).all()
    defined = n_rel > 0  # recall and AP are undefined (NaN) without a relevant item
    assert np.isnan(r[~defined]).all() and np.isnan(ap[~defined]).all()
    for values in (r[defined], ap[defined]):
        assert ((values >= 0) & (values <= 1 + 1e-12)).all()
    # a query scores 0 on every metric exactly when its top k holds no relevant item
    found = hits[:, :k].any(axis=1)
    assert ((p > 0) == found).all() and ((ap[defined] > 0) == found[defined]).all()


@quick
@given(rankings(), ks, ks)
def test_more_ranks_never_lose_hits_or_recall(case, k1, k2):
    ranked, relevant = case
    small, large = sorted((k1, k2))
    hits = metrics.relevance_matrix(ranked, relevant)
    n_rel = relevant.sum(axis=1)
    found_small = metrics.precision_at_k(hits, small) * small
    found_large = metrics.precision_at_k(hits, large) * large
    assert (found_small <= found_large + 1e-9).all()
    defined = n_rel > 0
    assert (
        metrics.recall_at_k(hits, n_rel, small)[defined] <= metrics.recall_at_k(hits, n_rel, large)[defined] + 1e-12
    ).all()


@quick
@given(rankings(), ks, st.randoms(use_true_random=False))
def test_a_perfect_ranking_has_ap_one(case, k, rng):
    _, relevant = case
    n_db = relevant.shape[1]
    perfect = np.empty((len(relevant), n_db), dtype=np.int64)
    for q, row in enumerate(relevant):
        good, bad = list(np.flatnonzero(row)), list(np.flatnonzero(~row))
        rng.shuffle(good)  # any order among the relevant items is perfect
        rng.shuffle(bad)
        perfect[q] = good + bad
    hits = metrics.relevance_matrix(perfect, relevant)
    n_rel = relevant.sum(axis=1)
    defined = n_rel > 0
    assert np.allclose(metrics.average_precision_at_k(hits, n_rel, k)[defined], 1.0)
    assert np.allclose(metrics.precision_at_k(hits, k), np.minimum(n_rel, k) / k)
    assert np.allclose(metrics.recall_at_k(hits, n_rel, k)[defined], np.minimum(n_rel, k)[defined] / n_rel[defined])


@quick
@given(rankings(), ks)
def test_indexing_accuracy_invariants(case, k):
    ranked, _ = case
    n_db = max(int(ranked.max()) + 1, 1)
    targets = np.array([row[row >= 0][0] if (row >= 0).any() else 0 for row in ranked])
    ia = metrics.indexing_accuracy_at_k(ranked, targets, k, n_db=n_db)
    assert set(np.unique(ia)) <= {0.0, 1.0}
    has_result = (ranked >= 0).any(axis=1)
    assert (ia[has_result] == 1).all()  # the target sits at rank 1 there
    later = metrics.indexing_accuracy_at_k(ranked, targets, k + 1, n_db=n_db)
    assert (later >= ia).all()  # IA@k never drops as k grows
    # IA@k is 1 exactly when the target is among the first k results
    expected = [(t in row[:k]) for row, t in zip(ranked, targets)]
    assert ia.tolist() == [float(e) for e in expected]


@quick
@given(st.integers(1, 5).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, 7))))
def test_chance_levels_equal_the_mean_over_every_ordering(case):
    """The closed forms are exact: they match the average over all n! orderings of the database."""
    n_db, n_rel, k = case
    relevant = np.zeros((1, n_db), dtype=bool)
    relevant[0, :n_rel] = True
    orderings = np.array(list(itertools.permutations(range(n_db))), dtype=np.int64)
    hits = metrics.relevance_matrix(orderings, np.repeat(relevant, len(orderings), axis=0))
    counts = np.full(len(orderings), n_rel)
    assert math.isclose(metrics.chance_precision_at_k(n_rel, n_db, k), metrics.precision_at_k(hits, k).mean())
    ia = metrics.indexing_accuracy_at_k(orderings, np.zeros(len(orderings), dtype=np.int64), k, n_db=n_db)
    assert math.isclose(metrics.chance_indexing_accuracy_at_k(n_db, k), ia.mean())
    if n_rel == 0:
        assert math.isnan(metrics.chance_recall_at_k(n_rel, n_db, k))
        assert math.isnan(metrics.chance_average_precision_at_k(n_rel, n_db, k))
    else:
        assert math.isclose(metrics.chance_recall_at_k(n_rel, n_db, k), metrics.recall_at_k(hits, counts, k).mean())
        exact = metrics.average_precision_at_k(hits, counts, k).mean()
        assert math.isclose(metrics.chance_average_precision_at_k(n_rel, n_db, k), exact, rel_tol=1e-12)


@quick
@given(st.integers(1, 500), st.integers(1, 600), st.data())
def test_chance_levels_are_bounded(n_db, k, data):
    n_rel = data.draw(st.lists(st.integers(1, n_db), min_size=1, max_size=5))
    for value in (
        metrics.chance_precision_at_k(n_rel, n_db, k),
        metrics.chance_recall_at_k(n_rel, n_db, k),
        metrics.chance_average_precision_at_k(n_rel, n_db, k),
        metrics.chance_indexing_accuracy_at_k(n_db, k),
    ):
        assert 0 <= value <= 1 + 1e-12
    if k >= n_db:  # the whole database is returned: every relevant item and the own ID are found
        assert metrics.chance_recall_at_k(n_rel, n_db, k) == 1.0
        assert metrics.chance_indexing_accuracy_at_k(n_db, k) == 1.0
    # a random ranking finds relevant items at the rate they occur in the database
    assert math.isclose(metrics.chance_precision_at_k(n_rel, n_db, k), np.mean(n_rel) / n_db * min(k, n_db) / k)


@quick
@given(st.lists(st.floats(0, 1), min_size=1, max_size=50), st.integers(0, 10_000))
def test_bootstrap_interval_is_ordered_and_inside_the_data(values, seed):
    low, high = metrics.bootstrap_ci(np.array(values), n_resamples=200, seed=seed)
    assert min(values) - 1e-12 <= low <= high <= max(values) + 1e-12


# ------------------------------------------------------------------------------------------
# IDs: codec round trip and the trie
# ------------------------------------------------------------------------------------------
def trie_sequences(codec: IDCodec) -> dict[tuple[int, ...], int]:
    """Every token path from the root that ends with EOS in the trie, with the row its terminal node names."""
    trie, found = codec.trie, {}
    stack = [(0, ())]
    while stack:
        node, path = stack.pop()
        for token in trie.allowed(node):
            child = int(trie.next_node[node, token])
            if token == codec.eos:
                assert trie.allowed(child) == [codec.pad]  # a finished ID only continues with PAD
                found[path] = int(trie.row[child])
            elif token < codec.base:
                stack.append((child, path + (token,)))
            else:
                raise AssertionError(f"token {token} (BOS or PAD) inside an ID")
    return found


@quick
@given(code_sets())
def test_codes_to_tokens_to_codes_round_trip(case):
    codes, base = case
    codec = IDCodec(codes, base=base)
    targets = codec.targets()
    assert targets.shape == (len(codes), max(map(len, codes)) + 1)
    for row, code in enumerate(codes):
        tokens = targets[row].tolist()
        assert tokens[: len(code)] == list(code) and tokens[len(code)] == codec.eos
        assert set(tokens[len(code) + 1 :]) <= {codec.pad}
        assert codec.lookup(tokens) == row
    inputs = codec.decoder_inputs(targets)
    assert (inputs[:, 0] == codec.bos).all() and not (inputs == codec.eos).any()
    shifted = targets[:, :-1].masked_fill(targets[:, :-1] == codec.eos, codec.pad)
    assert torch.equal(inputs[:, 1:], shifted)  # teacher forcing reads the target shifted right


@quick
@given(code_sets())
def test_the_trie_holds_exactly_the_codes(case):
    codes, base = case
    codec = IDCodec(codes, base=base)
    assert trie_sequences(codec) == {code: row for row, code in enumerate(codes)}
    assert int((codec.trie.row >= 0).sum()) == len(codes)  # one terminal node per ID, no others


@quick
@given(code_sets(), st.lists(st.integers(0, 11), min_size=1, max_size=5).map(tuple))
def test_a_sequence_that_is_no_code_looks_up_nothing(case, tokens):
    codes, base = case
    codec = IDCodec(codes, base=base)
    content = tuple(t for t in tokens if t < base)
    assert codec.lookup(list(tokens)) == (codes.index(content) if content in codes else -1)


@quick
@given(st.integers(1, 3000))
def test_decimal_ids_read_back_as_their_row(n):
    codec = make_codec(n)
    strings = codec.strings()
    assert [int(s) for s in strings] == list(range(n))
    assert len({len(s) for s in strings}) == 1 and len(strings[0]) == len(str(n - 1))
    assert codec.codes == decimal_codes(n)


@quick
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.integers(0, 2**31 - 1))
def test_id_orders_are_seeded_permutations(labels, seed):
    labels = np.array(labels)
    for scheme in ("random", "clustered"):
        order = dense_id_order(labels, scheme, seed=seed)
        assert sorted(order.tolist()) == list(range(len(labels)))
        assert np.array_equal(order, dense_id_order(labels, scheme, seed=seed))
    clustered = dense_id_order(labels, "clustered", seed=seed)
    assert (np.diff(labels[clustered]) >= 0).all()  # same-class images get consecutive IDs
