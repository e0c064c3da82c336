import numpy as np
import pytest
import torch

from vitdsi_utils.ids.codec import IDCodec, decimal_codes, dense_id_order, make_codec


def test_decimal_codes_fixed_width():
    assert decimal_codes(3) == [(0,), (1,), (2,)]
    assert decimal_codes(128)[127] == (1, 2, 7)
    assert decimal_codes(128)[5] == (0, 0, 5)
    assert all(len(c) == 3 for c in decimal_codes(1000))
    with pytest.raises(ValueError):
        decimal_codes(1001, n_digits=3)


def test_codec_round_trip_and_special_tokens():
    codec = make_codec(128)
    assert (codec.bos, codec.eos, codec.pad, codec.vocab_size) == (10, 11, 12, 13)
    targets = codec.targets()
    assert targets.shape == (128, 4)
    assert torch.equal(targets[42], torch.tensor([0, 4, 2, codec.eos]))
    inputs = codec.decoder_inputs(targets[[42]])
    assert torch.equal(inputs[0], torch.tensor([codec.bos, 0, 4, 2]))
    for row in range(128):
        assert codec.lookup(targets[row].tolist()) == row
    assert codec.to_string(7) == "007"
    assert codec.lookup([9, 9, 9]) == -1


def test_variable_length_codes_pad_after_eos():
    codec = IDCodec([(1,), (1, 2), (3, 0, 4)], base=5)
    targets = codec.targets()
    assert targets.tolist() == [[1, 6, 7, 7], [1, 2, 6, 7], [3, 0, 4, 6]]
    inputs = codec.decoder_inputs(targets)
    # the model never reads EOS as an input: after it comes PAD
    assert inputs.tolist() == [[5, 1, 7, 7], [5, 1, 2, 7], [5, 3, 0, 4]]


def test_trie_walk_reaches_every_id_and_nothing_else():
    codec = make_codec(37)
    trie = codec.trie
    assert trie.allowed(0) == [0, 1, 2, 3]
    node = int(trie.next_node[0, 3])
    assert trie.allowed(node) == list(range(7))  # 30..36 exist
    rows = []
    for code in codec.codes:
        node = 0
        for token in code:
            node = int(trie.next_node[node, token])
            assert node > 0
        terminal = int(trie.next_node[node, codec.eos])
        assert trie.allowed(terminal) == [codec.pad]
        assert int(trie.next_node[terminal, codec.pad]) == terminal
        rows.append(int(trie.row[terminal]))
    assert rows == list(range(37))
    assert int((trie.row >= 0).sum()) == 37


def test_codec_rejects_bad_ids():
    with pytest.raises(ValueError, match="distinct"):
        IDCodec([(1, 2), (1, 2)])
    with pytest.raises(ValueError, match="0..9"):
        IDCodec([(1, 12)])
    with pytest.raises(ValueError):
        IDCodec([])


def test_dense_id_orders():
    labels = np.array([2, 0, 1, 0, 2, 1, 0])
    random_order = dense_id_order(labels, "random", seed=3)
    assert sorted(random_order.tolist()) == list(range(7))
    clustered = dense_id_order(labels, "clustered", seed=3)
    assert sorted(clustered.tolist()) == list(range(7))
    assert labels[clustered].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert np.array_equal(dense_id_order(labels, "random", seed=3), random_order)
    with pytest.raises(ValueError, match="unknown ID scheme"):
        dense_id_order(labels, "semantic-ish")
