"""MQAR generator: the statistics docs/tasks.md defines."""

from __future__ import annotations

import pytest
import torch

from cram_ext.data import IGNORE, mqar, recurring_table

V, L, KV = 256, 128, 8


def _pairs(inputs, kv):
    return inputs[:, 0 : 2 * kv : 2], inputs[:, 1 : 2 * kv : 2]


def test_layout_ranges_and_labels():
    b = mqar(64, L, KV, V, seed=1)
    keys, values = _pairs(b.inputs, KV)
    assert b.inputs.shape == b.labels.shape == b.recurring.shape == (64, L)
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    for n in range(64):
        assert keys[n].unique().numel() == KV  # keys without replacement
        pos = (b.labels[n] != IGNORE).nonzero().squeeze(1)
        assert pos.numel() == KV  # each key queried once
        assert (pos >= 2 * KV).all() and ((pos - 2 * KV) % 2 == 0).all()  # after the context, at even offsets
        paired = dict(zip(keys[n].tolist(), values[n].tolist()))
        for p in pos.tolist():
            key = int(b.inputs[n, p])
            assert int(b.labels[n, p]) == paired[key]  # label: the key's value
            if p + 1 < L:
                assert int(b.inputs[n, p + 1]) == paired[key]  # which follows the query
        queried = set(b.inputs[n, pos].tolist())
        assert queried == set(paired)
        rest = torch.ones(L, dtype=torch.bool)
        rest[: 2 * KV] = False
        rest[pos] = False
        rest[(pos + 1).clamp(max=L - 1)] = False
        assert (b.inputs[n, rest] == 0).all()  # filler
    assert not b.recurring.any()


def test_query_gaps_follow_the_power_law():
    b = mqar(400, 256, 4, 512, seed=2)
    offsets = ((b.labels != IGNORE).nonzero()[:, 1] - 8) // 2
    # p(g) ~ g^(a-1) with a = 0.01 puts most queries near the context; uniform would give a median of ~60.
    assert offsets.float().median() < 20
    assert (offsets == 0).float().mean() > 0.1


def test_recurring_pairs_are_shared_and_novel_keys_avoid_the_table():
    table_keys, table_values = recurring_table(V, 16, seed=7)
    table = dict(zip(table_keys.tolist(), table_values.tolist()))
    b = mqar(50, L, KV, V, recurring_frac=0.5, num_recurring_pairs=16, seed=3, table_seed=7)
    assert b.recurring.sum() == 50 * 4
    q = b.labels != IGNORE
    for n in range(50):
        for p in q[n].nonzero().squeeze(1).tolist():
            key = int(b.inputs[n, p])
            if b.recurring[n, p]:
                assert table[key] == int(b.labels[n, p])
            else:
                assert key not in table
    assert not (b.recurring & ~q).any()


def test_seeded_and_constrained():
    a, b = mqar(8, L, KV, V, seed=5), mqar(8, L, KV, V, seed=5)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, mqar(8, L, KV, V, seed=6).inputs)
    with pytest.raises(ValueError, match="4 \\* num_kv_pairs <= seq_len"):
        mqar(1, 16, 5, V)
    with pytest.raises(ValueError, match="vocab_size > seq_len"):
        mqar(1, 64, 4, 64)
    with pytest.raises(ValueError, match="num_recurring_pairs"):
        mqar(1, L, KV, V, recurring_frac=0.5, num_recurring_pairs=2)
