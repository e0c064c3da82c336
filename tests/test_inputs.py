"""Issue 21: what a new user feeds in and what the toolkit says back.

Relevance from explicit label kinds, manifests that keep their format and name every unused file,
messages that are true and said once, metric cells that carry no information marked as such, and
the study on a folder of one's own images.
"""
from __future__ import annotations

import numpy as np
import pytest

from vitdsi_utils.data.relevance import label_relevance


# ------------------------------------------------------------------------------------------
# Relevance: the caller says what the labels are
# ------------------------------------------------------------------------------------------
def test_label_lists_are_label_sets_when_the_caller_says_so():
    # read as a multi-hot matrix these would make everything relevant; as label sets only {0, 1} & {1, 5} meet
    assert label_relevance([[0, 1], [2, 3]], [[1, 5], [7, 8]], kind="sets").tolist() == [[True, False], [False, False]]


def test_label_lists_without_a_kind_are_refused_as_ambiguous():
    with pytest.raises(ValueError, match=r"say what the labels are: .*kind='class'.*kind='sets'.*kind='multi-hot'"):
        label_relevance([[0, 1], [2, 3]], [[1, 5], [7, 8]])
    with pytest.raises(ValueError, match="say what the labels are"):  # an integer matrix could be either
        label_relevance(np.array([[0, 1], [1, 0]]), np.array([[1, 1], [0, 1]]))


def test_label_lists_are_not_a_multi_hot_matrix():
    with pytest.raises(ValueError, match=r"kind='multi-hot' takes 0/1 .* hold 2; rows of label ids are kind='sets'"):
        label_relevance([[0, 1], [2, 3]], [[1, 5], [7, 8]], kind="multi-hot")
    with pytest.raises(ValueError, match="rows differ in length"):
        label_relevance([[0, 1], [1]], [[1, 0]], kind="multi-hot")


def test_label_sets_of_different_lengths_work():
    relevant = label_relevance([(0,), (1, 2), ()], [(0, 1), (2,), (3, 4, 5)], kind="sets")
    assert relevant.tolist() == [[True, False, False], [True, True, False], [False, False, False]]
    # without kind= they are refused with the choices, never numpy's "inhomogeneous shape"
    with pytest.raises(ValueError, match="say what the labels are"):
        label_relevance([(0,), (1, 2)], [(0, 1), (2,)])


def test_class_ids_against_label_sets_are_refused_not_silently_false():
    with pytest.raises(ValueError, match=r"say what the labels are"):
        label_relevance([0, 1], [{0}, {1}])
    with pytest.raises(ValueError, match=r"kind='class' .* database item 0 is \{0\}; label sets go with kind='sets'"):
        label_relevance([0, 1], [{0}, {1}], kind="class")
    with pytest.raises(ValueError, match=r"kind='sets' .* query item 0 is 0; class ids go with kind='class'"):
        label_relevance([0, 1], [{0}, {1}], kind="sets")
    assert label_relevance([{0}, {1}], [{0}, {1}], kind="sets").tolist() == [[True, False], [False, True]]
    assert label_relevance([0, 1], [0, 1], kind="class").tolist() == [[True, False], [False, True]]


def test_arrays_whose_dtype_says_the_kind_need_no_kind():
    assert label_relevance(np.array([0, 2]), np.array([2, 0, 1])).tolist() == [[False, True, False], [True, False, False]]
    multi_hot = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
    assert label_relevance(multi_hot, multi_hot).tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match=r"different forms \(class and multi-hot\)"):
        label_relevance(np.array([0, 1]), multi_hot)
    with pytest.raises(ValueError, match="boolean .* is multi-hot; pass kind='multi-hot'"):
        label_relevance(multi_hot, multi_hot, kind="sets")
    with pytest.raises(ValueError, match="unknown relevance kind 'labels'"):
        label_relevance([0], [0], kind="labels")


def test_every_form_of_the_same_labels_gives_the_same_relevance():
    sets_q, sets_db = [{0, 2}, {1}], [{2}, {0, 1}, {3}]
    hot_q = np.array([[1, 0, 1, 0], [0, 1, 0, 0]])
    hot_db = np.array([[0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]])
    expected = label_relevance(sets_q, sets_db, kind="sets")
    np.testing.assert_array_equal(label_relevance(hot_q, hot_db, kind="multi-hot"), expected)
    np.testing.assert_array_equal(label_relevance(hot_q.astype(bool), hot_db.astype(bool)), expected)
