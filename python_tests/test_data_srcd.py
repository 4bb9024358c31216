"""SRCD generator: the statistics docs/tasks.md defines."""

from __future__ import annotations

import math

import pytest
import torch

from cram_ext.data import IGNORE, SRCDBatch, srcd, srcd_input_dim, srcd_recurring_table

L, D, K, V, S, Q = 64, 4, 32, 8, 6, 3


def _channels(b: SRCDBatch, obs_dim: int, num_keys: int, num_values: int):
    """Split inputs by the documented layout: obs | event (3) | key | value | log dt."""
    x = b.inputs
    e0, k0 = obs_dim, obs_dim + 3
    v0 = k0 + num_keys
    return x[..., :obs_dim], x[..., e0:k0], x[..., k0:v0], x[..., v0 : v0 + num_values], x[..., -1]


def _store_keys(b: SRCDBatch, obs_dim: int, num_keys: int, num_values: int):
    """(N, num_stores) keys and values at the store steps, in time order."""
    _, event, key, value, _ = _channels(b, obs_dim, num_keys, num_values)
    store = event[..., 1] == 1
    n = b.inputs.shape[0]
    return key[store].argmax(-1).view(n, -1), value[store].argmax(-1).view(n, -1)


def test_shapes_dtypes_and_input_dim():
    b = srcd(5, seq_len=L, obs_dim=D, num_keys=K, num_values=V, num_stores=S, num_queries=Q, seed=1)
    assert srcd_input_dim(D, K, V) == D + 3 + K + V + 1
    assert b.input_dim == srcd_input_dim(D, K, V) and b.obs_dim == D
    assert b.inputs.shape == (5, L, D + 3 + K + V + 1) and b.inputs.dtype == torch.float32
    assert b.dt.shape == (5, L) and b.dt.dtype == torch.float32
    assert b.targets.shape == (5, L, D) and b.targets.dtype == torch.float32
    assert b.target_mask.shape == (5, L) and b.target_mask.dtype == torch.bool
    assert b.labels.shape == (5, L) and b.labels.dtype == torch.int64
    assert b.recurring.shape == (5, L) and b.recurring.dtype == torch.bool
    assert b.target_mask[:, :-1].all() and not b.target_mask[:, -1].any()
    d = srcd(2)  # the defaults
    assert d.inputs.shape == (2, 128, srcd_input_dim(4, 64, 16))


def test_events_one_hots_and_labels():
    n = 200
    table_keys, table_values = srcd_recurring_table(K, V, 10, seed=3)
    table = dict(zip(table_keys.tolist(), table_values.tolist()))
    b = srcd(n, seq_len=L, obs_dim=D, num_keys=K, num_values=V, num_stores=S, num_queries=Q,
             recurring_frac=0.5, num_recurring_pairs=10, seed=2, table_seed=3)
    obs, event, key, value, log_dt = _channels(b, D, K, V)
    # One-hots are exactly one-hot where set, all-zero elsewhere.
    assert ((event == 0) | (event == 1)).all() and (event.sum(-1) == 1).all()
    for ch in (key, value):
        assert ((ch == 0) | (ch == 1)).all()
    store, query = event[..., 1] == 1, event[..., 2] == 1
    assert torch.equal(key.sum(-1), (store | query).float())
    assert torch.equal(value.sum(-1), store.float())
    assert torch.allclose(log_dt[:, :-1], b.dt[:, 1:].log()) and (log_dt[:, -1] == 0).all()
    # Exact counts, in the right halves.
    assert (store.sum(1) == S).all() and (query.sum(1) == Q).all()
    assert not store[:, L // 2 :].any() and not query[:, : L // 2].any()
    # Labels exactly at query steps; recurring only there.
    assert torch.equal(b.labels != IGNORE, query)
    assert not (b.recurring & ~query).any()
    assert ((b.labels[query] >= 0) & (b.labels[query] < V)).all()
    n_rec = round(0.5 * S)
    for i in range(n):
        s_pos = store[i].nonzero().squeeze(1)
        s_keys = key[i, s_pos].argmax(-1).tolist()
        s_vals = value[i, s_pos].argmax(-1).tolist()
        assert len(set(s_keys)) == S  # distinct keys per example
        stored = dict(zip(s_keys, s_vals))
        assert sum(k in table for k in s_keys) == n_rec  # the recurring fraction, exactly
        for k, v in stored.items():
            if k in table:
                assert table[k] == v
        q_pos = query[i].nonzero().squeeze(1)
        q_keys = key[i, q_pos].argmax(-1).tolist()
        assert len(set(q_keys)) == Q  # distinct queried keys
        for p, k in zip(q_pos.tolist(), q_keys):
            assert k in stored and s_pos.min() < p  # stored earlier in this example
            assert int(b.labels[i, p]) == stored[k]
            assert bool(b.recurring[i, p]) == (k in table)
            if k in table:
                assert table[k] == int(b.labels[i, p])
    # Both kinds get queried, in about the stored proportion.
    assert 0.35 < b.recurring.sum() / query.sum() < 0.65


def test_positions_and_query_choice_are_uniform():
    n, L2 = 4000, 16
    b = srcd(n, seq_len=L2, obs_dim=2, num_keys=16, num_values=4, num_stores=2, num_queries=1,
             recurring_frac=0.0, num_recurring_pairs=0, seed=4)
    _, event, key, _, _ = _channels(b, 2, 16, 4)
    store, query = event[..., 1] == 1, event[..., 2] == 1
    for hits, k in ((store[:, : L2 // 2], 2), (query[:, L2 // 2 :], 1)):
        freq = hits.float().mean(0)  # each of the 8 positions: k/8
        assert (freq - k / 8).abs().max() < 0.04
    # The query asks the first or second stored key with equal odds.
    first = key[store].argmax(-1).view(n, 2)[:, 0]
    asked = key[query].argmax(-1)
    assert abs((asked == first).float().mean() - 0.5) < 0.04


def _rank_usage(n, stores, frac, pairs, zipf, seed):
    table_keys, _ = srcd_recurring_table(K, V, pairs, seed=11)
    rank_of = torch.full((K,), -1, dtype=torch.long)
    rank_of[table_keys] = torch.arange(pairs)
    b = srcd(n, seq_len=2 * stores, obs_dim=2, num_keys=K, num_values=V, num_stores=stores, num_queries=1,
             recurring_frac=frac, num_recurring_pairs=pairs, recurring_zipf=zipf, seed=seed, table_seed=11)
    keys, _ = _store_keys(b, 2, K, V)
    ranks = rank_of[keys]
    ranks = ranks[ranks >= 0]
    assert ranks.numel() == n * round(frac * stores)
    return torch.bincount(ranks, minlength=pairs).double() / n  # P(rank is used in an example)


def test_recurring_zipf_weights():
    pairs, n, zipf = 8, 12000, 1.2
    w = (torch.arange(pairs, dtype=torch.float64) + 1) ** -zipf
    w = w / w.sum()
    # One recurring pair per example: usage frequency = the normalised weights.
    usage = _rank_usage(n, stores=2, frac=0.5, pairs=pairs, zipf=zipf, seed=5)
    assert (usage - w).abs().max() < 0.02
    # Two per example, without replacement: P(i used) = w_i + sum_{j != i} w_j w_i / (1 - w_j).
    usage2 = _rank_usage(n, stores=4, frac=0.5, pairs=pairs, zipf=zipf, seed=6)
    incl = w + w * ((w / (1 - w)).sum() - w / (1 - w))
    assert abs(incl.sum() - 2) < 1e-9
    assert (usage2 - incl).abs().max() < 0.025
    assert (usage2[:-1] > usage2[1:] - 0.02).all()  # decreasing in rank
    # zipf 0: near-uniform, round(frac * S) / pairs each.
    usage0 = _rank_usage(n, stores=8, frac=0.5, pairs=16, zipf=0.0, seed=7)
    assert (usage0 - 4 / 16).abs().max() < 0.03


def test_dt_distribution():
    m = 0.2
    b = srcd(64, seq_len=128, obs_dim=2, num_keys=K, num_values=V, mean_dt=m, seed=8)
    assert (b.dt > 0).all() and (b.dt >= m / 10).all() and (b.dt <= 5 * m).all()
    # Clipped exponential: E = m (1 - e^-5) + m (0.1 - (1 - e^-0.1)).
    expected = m * (1 - math.exp(-5)) + m * (0.1 - (1 - math.exp(-0.1)))
    assert abs(b.dt.double().mean() - expected) < 0.06 * m  # ~5 standard errors
    # Both clip bounds are hit (P(X < m/10) ~ 9.5 %, P(X > 5m) ~ 0.7 %).
    assert (b.dt == b.dt.min()).float().mean() > 0.05
    assert (b.dt == b.dt.max()).sum() >= 5


def test_noiseless_dynamics():
    b = srcd(32, seq_len=96, obs_dim=6, num_keys=K, num_values=V, noise=0.0, seed=9)
    obs = b.inputs[..., :6]
    # Orthogonal mixing of a decaying latent: the norm never grows.
    norm = obs.double().norm(dim=-1)
    assert (norm[:, 1:] <= norm[:, :-1] * (1 + 1e-6)).all()
    assert (norm[:, -1] < norm[:, 0]).all()
    # Next-observation targets.
    assert torch.equal(b.targets[:, :-1], obs[:, 1:])
    assert (b.targets[:, -1] == 0).all()


def test_exact_oscillator_step():
    # One frequency and damping for every pair: each gap scales the observation by
    # exp(-z w dt) and turns it by w dt, so <o_t, o_{t-1}> = |o_{t-1}|^2 exp(-z w dt) cos(w dt).
    w, z = 2.0, 0.1
    b = srcd(16, seq_len=64, obs_dim=4, num_keys=K, num_values=V, freq_range=(w, w), damping_range=(z, z),
             noise=0.0, seed=10)
    o = b.inputs[..., :4].double()
    dt = b.dt[:, 1:].double()
    prev, cur = o[:, :-1], o[:, 1:]
    scale = torch.exp(-z * w * dt)
    assert torch.allclose(cur.norm(dim=-1), prev.norm(dim=-1) * scale, rtol=1e-5, atol=1e-6)
    dot = (cur * prev).sum(-1)
    assert torch.allclose(dot, prev.pow(2).sum(-1) * scale * torch.cos(w * dt), rtol=1e-4, atol=1e-5)


def test_noise_level():
    kw = dict(seq_len=128, obs_dim=4, num_keys=K, num_values=V, seed=12)
    clean, noisy = srcd(64, noise=0.0, **kw), srcd(64, noise=0.3, **kw)
    # Noise is drawn last: the rest of the batch does not depend on it.
    assert torch.equal(clean.dt, noisy.dt) and torch.equal(clean.labels, noisy.labels)
    assert torch.equal(clean.inputs[..., 4:], noisy.inputs[..., 4:])
    diff = noisy.inputs[..., :4] - clean.inputs[..., :4]
    assert abs(diff.std() - 0.3) < 0.02 and abs(diff.mean()) < 0.02


def test_seeded():
    kw = dict(seq_len=L, obs_dim=D, num_keys=K, num_values=V, num_stores=S, num_queries=Q)
    a, b = srcd(8, seed=5, **kw), srcd(8, seed=5, **kw)
    for f in ("inputs", "dt", "targets", "target_mask", "labels", "recurring"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    c = srcd(8, seed=6, **kw)
    assert not torch.equal(a.inputs, c.inputs) and not torch.equal(a.labels, c.labels)
    k1, v1 = srcd_recurring_table(K, V, 16, seed=1)
    k2, v2 = srcd_recurring_table(K, V, 16, seed=2)
    assert torch.equal(k1, srcd_recurring_table(K, V, 16, seed=1)[0])
    assert k1.unique().numel() == 16 and ((k1 >= 0) & (k1 < K)).all() and ((v1 >= 0) & (v1 < V)).all()
    assert not (torch.equal(k1, k2) and torch.equal(v1, v2))
    # table_seed changes the stored recurring keys, not the dynamics.
    t1 = srcd(8, table_seed=1, seed=5, **kw)
    t2 = srcd(8, table_seed=2, seed=5, **kw)
    assert torch.equal(t1.dt, t2.dt) and torch.equal(t1.targets, t2.targets)
    assert not torch.equal(_store_keys(t1, D, K, V)[0], _store_keys(t2, D, K, V)[0])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(obs_dim=3), "obs_dim"),
        (dict(seq_len=16, num_stores=9, num_queries=2), "num_stores"),
        (dict(seq_len=8, num_stores=2, num_queries=5), "num_queries"),
        (dict(num_stores=3, num_queries=4), "num_queries"),
        (dict(num_stores=8, recurring_frac=0.5, num_recurring_pairs=3), "num_recurring_pairs"),
        (dict(num_keys=10, num_recurring_pairs=12), "num_recurring_pairs"),
        (dict(num_keys=12, num_stores=8, recurring_frac=0.5, num_recurring_pairs=10), "num_keys"),
        (dict(recurring_frac=1.5), "recurring_frac"),
        (dict(freq_range=(0.0, 1.0)), "freq_range"),
        (dict(damping_range=(0.3, 0.1)), "damping_range"),
        (dict(mean_dt=0.0), "mean_dt"),
        (dict(noise=-0.1), "noise"),
    ],
)
def test_constraints_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        srcd(1, **kwargs)


def test_table_constraint():
    with pytest.raises(ValueError, match="num_pairs"):
        srcd_recurring_table(4, 2, 5, seed=0)
