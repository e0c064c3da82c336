"""Known answers for the retrieval metrics, their chance levels, the bootstrap and the paper protocol."""

import numpy as np
import pandas as pd
import pytest

import vitdsi_utils.metrics as M
from vitdsi_utils.data.relevance import label_relevance, multilabel_relevance

# ----------------------------------------------------------------------------------------------
# A hand-worked example: 6 database rows, 3 queries, rankings of length K = 4.
#
#   query 0: relevant {1, 3, 5}  (|R| = 3), ranked [3, 0, 5, 2]   -> hits [1, 0, 1, 0]
#   query 1: relevant {1}        (|R| = 1), ranked [4, 1, -1, -1] -> hits [0, 1, 0, 0]
#            (the model returned only two results)
#   query 2: relevant {}         (|R| = 0), ranked [0, 1, 2, 3]   -> hits [0, 0, 0, 0]
#
# query 0: P@1 = 1, P@2 = 1/2, P@3 = 2/3, P@4 = 2/4
#          R@2 = 1/3, R@4 = 2/3
#          AP@4 = (P@1 + P@3) / min(3, 4) = (1 + 2/3) / 3 = 5/9
#          AP@2 = P@1 / min(3, 2) = 1/2
# query 1: P@1 = 0, P@2 = 1/2, P@4 = 1/4 (padding counts as misses, still divide by 4)
#          R@2 = R@4 = 1
#          AP@4 = AP@2 = P@2 / min(1, k) = 1/2
# query 2: P@k = 0; R@k and AP@k undefined (NaN)
# ----------------------------------------------------------------------------------------------

RANKED = np.array([[3, 0, 5, 2], [4, 1, -1, -1], [0, 1, 2, 3]])
RELEVANT = np.zeros((3, 6), dtype=bool)
RELEVANT[0, [1, 3, 5]] = True
RELEVANT[1, 1] = True
N_REL = RELEVANT.sum(axis=1)


def test_relevance_matrix_hand_example():
    hits = M.relevance_matrix(RANKED, RELEVANT)
    expected = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    assert hits.dtype == bool and hits.shape == (3, 4)
    np.testing.assert_array_equal(hits, expected)


def test_precision_hand_example():
    hits = M.relevance_matrix(RANKED, RELEVANT)
    np.testing.assert_allclose(M.precision_at_k(hits, 1), [1, 0, 0])
    np.testing.assert_allclose(M.precision_at_k(hits, 2), [1 / 2, 1 / 2, 0])
    np.testing.assert_allclose(M.precision_at_k(hits, 3), [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(M.precision_at_k(hits, 4), [2 / 4, 1 / 4, 0])


def test_recall_hand_example_nan_without_relevant():
    hits = M.relevance_matrix(RANKED, RELEVANT)
    r2 = M.recall_at_k(hits, N_REL, 2)
    r4 = M.recall_at_k(hits, N_REL, 4)
    np.testing.assert_allclose(r2[:2], [1 / 3, 1])
    np.testing.assert_allclose(r4[:2], [2 / 3, 1])
    assert np.isnan(r2[2]) and np.isnan(r4[2])


def test_average_precision_hand_example():
    hits = M.relevance_matrix(RANKED, RELEVANT)
    ap4 = M.average_precision_at_k(hits, N_REL, 4)
    ap2 = M.average_precision_at_k(hits, N_REL, 2)
    ap1 = M.average_precision_at_k(hits, N_REL, 1)
    np.testing.assert_allclose(ap4[:2], [5 / 9, 1 / 2])
    np.testing.assert_allclose(ap2[:2], [1 / 2, 1 / 2])
    np.testing.assert_allclose(ap1[:2], [1, 0])  # AP@1 = rel(1)
    assert np.isnan(ap4[2])


def test_k_larger_than_ranking_length():
    hits = M.relevance_matrix(RANKED, RELEVANT)
    # only 4 ranks exist; the missing 6 count as misses
    np.testing.assert_allclose(M.precision_at_k(hits, 10), [2 / 10, 1 / 10, 0])
    np.testing.assert_allclose(M.recall_at_k(hits, N_REL, 10)[:2], [2 / 3, 1])
    # AP@10 of query 0: (1 + 2/3) / min(3, 10) = 5/9, unchanged from AP@4
    np.testing.assert_allclose(M.average_precision_at_k(hits, N_REL, 10)[:2], [5 / 9, 1 / 2])


def test_perfect_ranking_scores_one():
    # |R| = 5 > k = 3: a perfect top-3 still gets AP@3 = 1 thanks to min(|R|, k)
    relevant = np.zeros((1, 8), dtype=bool)
    relevant[0, :5] = True
    hits = M.relevance_matrix(np.array([[0, 1, 2, 3, 4]]), relevant)
    assert M.average_precision_at_k(hits, relevant.sum(1), 3)[0] == pytest.approx(1.0)
    assert M.precision_at_k(hits, 5)[0] == pytest.approx(1.0)
    assert M.recall_at_k(hits, relevant.sum(1), 5)[0] == pytest.approx(1.0)


def test_evaluate_ranking_table():
    df = M.evaluate_ranking(RANKED, RELEVANT, ks_precision=(2, 10), ks_recall=(4,), ks_map=(4,), n_resamples=200)
    assert list(df.columns) == list(M.RESULT_COLUMNS)
    assert list(df["metric"]) == [
        "P@2",
        "P@10",
        "R@4",
        "mAP@4",
        "paper MAP@10 (mean P@10, 10 queries)",
        "paper R@100 (10 queries)",
    ]
    row = df.set_index("metric")
    # P is defined for all three queries; R and mAP ignore query 2
    assert row.loc["P@2", "value"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert row.loc["P@10", "value"] == pytest.approx((2 / 10 + 1 / 10 + 0) / 3)
    assert row.loc["R@4", "value"] == pytest.approx((2 / 3 + 1) / 2)
    assert row.loc["mAP@4", "value"] == pytest.approx((5 / 9 + 1 / 2) / 2)
    assert (row.loc["P@2", "n_queries"], row.loc["P@2", "n_ignored"]) == (3, 0)
    assert (row.loc["mAP@4", "n_queries"], row.loc["mAP@4", "n_ignored"]) == (2, 1)
    # only 3 queries exist, so the paper protocol uses them all: mean P@10 over all queries
    assert row.loc["paper MAP@10 (mean P@10, 10 queries)", "value"] == pytest.approx(0.1)
    assert row.loc["paper R@100 (10 queries)", "value"] == pytest.approx((2 / 3 + 1) / 2)
    assert row.loc["paper R@100 (10 queries)", "n_ignored"] == 1
    # with every query drawn each time, the draw-to-draw range collapses onto the value
    assert row.loc["paper R@100 (10 queries)", "ci_low"] == pytest.approx(row.loc["paper R@100 (10 queries)", "value"])
    assert row.loc["paper MAP@10 (mean P@10, 10 queries)", "chance"] == row.loc["P@10", "chance"]
    # chance: P@2 = mean |R| / n_db * min(k, n)/k = (4/3) / 6; R@4 = 4/6 over queries with |R| > 0
    assert row.loc["P@2", "chance"] == pytest.approx((4 / 3) / 6)
    assert row.loc["R@4", "chance"] == pytest.approx(4 / 6)
    # values are fractions, and every interval brackets its value
    finite = df.dropna(subset=["ci_low"])
    assert ((finite["ci_low"] <= finite["value"]) & (finite["value"] <= finite["ci_high"])).all()
    assert df["value"].between(0, 1).all()


def test_a_stack_of_rankings_averages_every_metric_per_query():
    # a second ranker that finds query 0's relevant rows first and misses query 1's
    other = np.array([[1, 3, 5, 0], [4, 0, 2, 3], [5, 4, 3, 2]])
    kwargs = dict(ks_precision=(2,), ks_recall=(4,), ks_map=(4,), n_resamples=200)
    stacked = M.evaluate_ranking(np.stack([RANKED, other]), RELEVANT, **kwargs).set_index("metric")
    # query 0: P@2 1/2 and 1, R@4 2/3 and 1, AP@4 5/9 and 1; query 1: P@2 1/2 and 0, R@4 1 and 0, AP@4 1/2 and 0
    assert stacked.at["P@2", "value"] == pytest.approx(((1 / 2 + 1) / 2 + (1 / 2 + 0) / 2 + 0) / 3)
    assert stacked.at["R@4", "value"] == pytest.approx(((2 / 3 + 1) / 2 + (1 + 0) / 2) / 2)
    assert stacked.at["mAP@4", "value"] == pytest.approx(((5 / 9 + 1) / 2 + (1 / 2 + 0) / 2) / 2)
    assert stacked.at["mAP@4", "n_ignored"] == 1  # query 2 has no relevant row in either ranking
    # the paper protocol sees the same queries (all three here), so it averages too
    assert stacked.at["paper MAP@10 (mean P@10, 10 queries)", "value"] == pytest.approx(
        ((2 + 3) / 20 + (1 + 0) / 20) / 3
    )
    # a stack of one ranking is that ranking
    single = M.evaluate_ranking(RANKED, RELEVANT, **kwargs)
    pd.testing.assert_frame_equal(M.evaluate_ranking(RANKED[None], RELEVANT, **kwargs), single)
    with pytest.raises(ValueError, match="at least one ranking"):
        M.evaluate_ranking(RANKED[:0][None][:0], RELEVANT, **kwargs)


# ----------------------------------------------------------------------------------------------
# validation


def test_duplicates_raise_naming_the_query():
    ranked = np.array([[0, 1, 2], [3, 4, 3], [1, 1, 0]])
    with pytest.raises(ValueError, match="query 1"):
        M.relevance_matrix(ranked, np.zeros((3, 5), dtype=bool))


def test_repeated_padding_is_not_a_duplicate():
    hits = M.relevance_matrix(np.array([[2, -1, -1, -1]]), np.ones((1, 3), dtype=bool))
    np.testing.assert_array_equal(hits, [[True, False, False, False]])


@pytest.mark.parametrize("bad", [5, 7, -2])
def test_out_of_range_raises(bad):
    ranked = np.array([[0, 1], [2, bad]])
    with pytest.raises(ValueError, match="query 1"):
        M.relevance_matrix(ranked, np.zeros((2, 5), dtype=bool))


def test_result_after_padding_raises():
    with pytest.raises(ValueError, match="query 0.*left-packed"):
        M.relevance_matrix(np.array([[0, -1, 2]]), np.zeros((1, 5), dtype=bool))


def test_other_bad_inputs_raise():
    hits = np.zeros((2, 3), dtype=bool)
    with pytest.raises(ValueError):
        M.precision_at_k(hits, 0)
    with pytest.raises(ValueError):
        M.relevance_matrix(np.array([[0.0, 1.0]]), np.zeros((1, 3), dtype=bool))
    with pytest.raises(ValueError):  # query count mismatch
        M.relevance_matrix(np.array([[0, 1]]), np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError):  # more hits than relevant items
        M.recall_at_k(np.ones((1, 3), dtype=bool), [2], 3)


# ----------------------------------------------------------------------------------------------
# indexing accuracy


def test_indexing_accuracy_known_answers():
    ranked = np.array([[2, 0, 1], [1, 0, 2], [0, 1, -1], [3, -1, -1]])
    targets = np.array([0, 1, 2, 3])
    # query 0 finds itself at rank 2, query 1 at rank 1, query 2 never, query 3 at rank 1
    np.testing.assert_array_equal(M.indexing_accuracy_at_k(ranked, targets, 1), [0, 1, 0, 1])
    np.testing.assert_array_equal(M.indexing_accuracy_at_k(ranked, targets, 2), [1, 1, 0, 1])
    np.testing.assert_array_equal(M.indexing_accuracy_at_k(ranked, targets, 5), [1, 1, 0, 1])

    df = M.evaluate_indexing(ranked, targets, ks=(1, 2), n_resamples=200)
    assert list(df.columns) == list(M.RESULT_COLUMNS)
    assert list(df["metric"]) == ["IA@1", "IA@2"]
    np.testing.assert_allclose(df["value"], [2 / 4, 3 / 4])
    np.testing.assert_allclose(df["chance"], [1 / 4, 2 / 4])  # n_db defaults to the 4 queries
    assert (df["n_queries"] == 4).all()


def test_indexing_accuracy_range_check():
    with pytest.raises(ValueError, match="query 0"):
        M.evaluate_indexing(np.array([[7], [0]]), np.array([0, 1]))  # n_db = 2 by default
    df = M.evaluate_indexing(np.array([[7], [0]]), np.array([0, 1]), ks=(1,), n_db=10)
    assert df.loc[0, "chance"] == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------
# chance levels against a Monte Carlo over random permutations


N_DB = 12


@pytest.fixture(scope="module")
def random_rankings():
    rng = np.random.default_rng(1234)
    return rng.random((20_000, N_DB)).argsort(axis=1)  # each row a uniform random permutation


@pytest.mark.parametrize("n_rel", [1, 3, 5, 12])
@pytest.mark.parametrize("k", [1, 5, 20])  # 20 > n_db: only 12 ranks exist
def test_chance_matches_monte_carlo(random_rankings, n_rel, k):
    # by symmetry the relevant items can be rows 0 .. n_rel-1
    hits = random_rankings < n_rel
    counts = np.full(len(hits), n_rel)
    simulated = {
        "P": M.precision_at_k(hits, k).mean(),
        "R": M.recall_at_k(hits, counts, k).mean(),
        "AP": M.average_precision_at_k(hits, counts, k).mean(),
    }
    assert M.chance_precision_at_k(n_rel, N_DB, k) == pytest.approx(simulated["P"], abs=0.01)
    assert M.chance_recall_at_k(n_rel, N_DB, k) == pytest.approx(simulated["R"], abs=0.01)
    assert M.chance_average_precision_at_k(n_rel, N_DB, k) == pytest.approx(simulated["AP"], abs=0.01)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_chance_indexing_accuracy_matches_monte_carlo(random_rankings, k):
    simulated = M.indexing_accuracy_at_k(random_rankings, np.zeros(len(random_rankings), int), k).mean()
    assert M.chance_indexing_accuracy_at_k(N_DB, k) == pytest.approx(simulated, abs=0.01)


def test_chance_closed_forms_small_cases():
    # n = 3, one relevant item, k = 3: AP = 1 / (its rank), rank uniform on {1, 2, 3}
    assert M.chance_average_precision_at_k(1, 3, 3) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    # everything relevant: any ranking is perfect
    assert M.chance_average_precision_at_k(4, 4, 2) == pytest.approx(1.0)
    assert M.chance_precision_at_k(4, 4, 2) == pytest.approx(1.0)
    # k beyond n_db: P@k still divides by k
    assert M.chance_precision_at_k(2, 4, 8) == pytest.approx(2 / 8)
    # queries without relevant items are left out of the recall and AP means, not of P
    assert M.chance_recall_at_k([0, 3], 12, 5) == pytest.approx(5 / 12)
    only_three = M.chance_average_precision_at_k(3, 12, 5)
    assert M.chance_average_precision_at_k([0, 3], 12, 5) == pytest.approx(only_three)
    assert M.chance_precision_at_k([0, 3], 12, 4) == pytest.approx(0.5 * 3 / 12)
    assert np.isnan(M.chance_recall_at_k([0, 0], 12, 5))


# ----------------------------------------------------------------------------------------------
# bootstrap and the paper protocol


def test_bootstrap_ci_contains_mean_and_shrinks():
    rng = np.random.default_rng(0)
    small = (rng.random(40) < 0.3).astype(float)
    large = (rng.random(4000) < 0.3).astype(float)
    lo_s, hi_s = M.bootstrap_ci(small)
    lo_l, hi_l = M.bootstrap_ci(large)
    assert lo_s <= small.mean() <= hi_s
    assert lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # ~sqrt(100) = 10 times narrower
    assert M.bootstrap_ci(small, seed=3) == M.bootstrap_ci(small, seed=3)
    lo90, hi90 = M.bootstrap_ci(small, confidence=0.9)
    assert lo_s <= lo90 and hi90 <= hi_s


def test_bootstrap_ci_drops_nan():
    assert M.bootstrap_ci(np.array([np.nan, 1.0, 1.0])) == (1.0, 1.0)
    lo, hi = M.bootstrap_ci(np.array([np.nan, np.nan]))
    assert np.isnan(lo) and np.isnan(hi)


@pytest.fixture(scope="module")
def many_queries():
    rng = np.random.default_rng(7)
    hits = rng.random((300, 50)) < rng.random((300, 1))  # per-query hit rates vary
    n_rel = hits.sum(axis=1) + rng.integers(0, 20, 300)
    return hits, n_rel


def test_paper_protocol_reproducible_and_seed_dependent(many_queries):
    hits, n_rel = many_queries
    a = M.paper_protocol(hits, n_rel, seed=0, n_draws=200)
    b = M.paper_protocol(hits, n_rel, seed=0, n_draws=200)
    c = M.paper_protocol(hits, n_rel, seed=1, n_draws=200)
    assert set(a) >= {"paper_map@10", "paper_recall@100", "paper_map@10_std", "paper_recall@100_std"}
    assert a["paper_map@10_p2.5"] <= a["paper_map@10_p97.5"]
    assert a == b
    assert a["paper_map@10"] != c["paper_map@10"]
    assert a["paper_recall@100"] != c["paper_recall@100"]
    assert 0 <= a["paper_map@10"] <= 1 and 0 <= a["paper_recall@100"] <= 1
    # a mean of 10 out of 300 queries scatters like sd / sqrt(10) (times the finite-population factor)
    p10 = M.precision_at_k(hits, 10)
    expected_std = p10.std(ddof=1) / np.sqrt(10) * np.sqrt((300 - 10) / (300 - 1))
    assert a["paper_map@10_std"] == pytest.approx(expected_std, rel=0.2)


def test_paper_protocol_is_mean_precision_of_the_drawn_queries(many_queries):
    hits, n_rel = many_queries
    # with every query drawn, the estimate is the plain mean P@10 / R@100 and does not vary
    out = M.paper_protocol(hits, n_rel, n_queries=len(hits), n_draws=20)
    assert out["paper_map@10"] == pytest.approx(M.precision_at_k(hits, 10).mean())
    assert out["paper_recall@100"] == pytest.approx(M.recall_at_k(hits, n_rel, 100).mean())
    assert out["paper_map@10_std"] == pytest.approx(0, abs=1e-12)
    # and it is not mAP@10
    assert out["paper_map@10"] != pytest.approx(M.average_precision_at_k(hits, n_rel, 10).mean())


# ----------------------------------------------------------------------------------------------
# relevance from labels


def test_label_relevance_single_label():
    rel = label_relevance(np.array([0, 2]), np.array([2, 0, 0, 1]))
    np.testing.assert_array_equal(rel, [[0, 1, 1, 0], [1, 0, 0, 0]])


def test_multilabel_relevance_hand_example():
    queries = [frozenset({"cat"}), frozenset({"dog", "car"}), frozenset()]
    db = [frozenset({"cat", "dog"}), frozenset({"car"}), frozenset({"boat"}), frozenset()]
    expected = np.array(
        [
            [1, 0, 0, 0],  # cat: only db 0 has a cat
            [1, 1, 0, 0],  # dog or car: db 0 (dog) and db 1 (car)
            [0, 0, 0, 0],  # no labels, nothing relevant
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(multilabel_relevance(queries, db), expected)
    np.testing.assert_array_equal(label_relevance(queries, db, kind="sets"), expected)
