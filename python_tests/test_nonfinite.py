"""NaN and Inf inputs: each op's documented behaviour (see the ops' docstrings), and the
promise that a non-finite value stays where the op's semantics put it.

- gated_scan: a channel's recurrence is IEEE arithmetic on that channel alone: a NaN at
  (b, t, c) makes h[b, t:, c] and h_last[b, c] NaN and nothing else; log_a = -inf is a
  reset (a = 0) and stays finite.
- route: a row whose probability is NaN is not routed (NaN > threshold is false) unless
  forced; other rows are unaffected.
- routed_attention: rows that are not routed are never read as queries: a NaN in q or in
  grad_out there changes nothing. A NaN or Inf in k or v reaches only queries of its own
  sequence and key/value head group, never another sequence.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, attention_params, route_from_mask, routing_mask

import cram_ext

NAN, INF = float("nan"), float("inf")


def scan_dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_scan_nan_stays_in_its_channel(device):
    # T spans many chunks of the CUDA scan; the NaN sits in the middle chunk.
    B, T, C = 3, 1500, 130
    dt = scan_dtype(device)
    x = torch.randn(B, T, C, device=device).to(dt)
    log_a = (-torch.rand(B, T, C, device=device)).to(dt)
    h_clean, last_clean = cram_ext.gated_scan(x, log_a)
    b, t, c = 1, 700, 77
    for which in ("x", "log_a"):
        xs, ls = x.clone(), log_a.clone()
        (xs if which == "x" else ls)[b, t, c] = NAN
        h, last = cram_ext.gated_scan(xs, ls)
        nan = torch.zeros(B, T, C, dtype=torch.bool, device=device)
        nan[b, t:, c] = True
        assert torch.isnan(h[nan]).all(), f"NaN in {which} did not reach h[b, t:, c]"
        assert torch.equal(h[~nan], h_clean[~nan]), f"NaN in {which} changed another element of h"
        assert torch.isnan(last[b, c]) and torch.isfinite(last[~nan[:, -1]]).all()
        assert torch.equal(last[~nan[:, -1]], last_clean[~nan[:, -1]])


@pytest.mark.parametrize("device", DEVICES)
def test_scan_backward_nan_stays_in_its_channel(device):
    B, T, C = 2, 900, 70
    dt = scan_dtype(device)
    x = torch.randn(B, T, C, device=device).to(dt).requires_grad_()
    log_a = (-torch.rand(B, T, C, device=device)).to(dt).requires_grad_()
    h, h_last = cram_ext.gated_scan(x, log_a)
    grad_h = torch.randn_like(h)
    clean = torch.autograd.grad((h, h_last), (x, log_a), (grad_h, torch.zeros_like(h_last)), retain_graph=True)
    b, t, c = 0, 450, 3
    grad_h[b, t, c] = NAN
    dirty = torch.autograd.grad((h, h_last), (x, log_a), (grad_h, torch.zeros_like(h_last)))
    nan = torch.zeros(B, T, C, dtype=torch.bool, device=device)
    nan[b, : t + 1, c] = True  # the reverse scan carries it to every earlier step
    for name, g, g_clean in zip(("x", "log_a"), dirty, clean):
        assert torch.equal(g[~nan], g_clean[~nan]), f"NaN in grad_h changed grad {name} elsewhere"
    assert torch.isnan(dirty[0][nan]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_scan_minus_inf_decay_is_a_reset(device):
    B, T, C = 2, 300, 40
    x = torch.randn(B, T, C, device=device).requires_grad_()
    log_a = (-torch.rand(B, T, C, device=device))
    log_a[:, 100] = -INF
    log_a.requires_grad_()
    h, h_last = cram_ext.gated_scan(x, log_a)
    assert torch.equal(h[:, 100], x[:, 100].detach())
    gx, gl = torch.autograd.grad((h.sum() + h_last.sum()), (x, log_a))
    assert torch.isfinite(gx).all() and torch.isfinite(gl).all()
    assert (gl[:, 100] == 0).all()  # d h[t] / d log_a[t] = a[t] * h[t-1] = 0


@pytest.mark.parametrize("device", DEVICES)
def test_route_nan_row_is_not_routed(device):
    B, T, C = 3, 200, 64
    hidden = torch.randn(B, T, C, device=device)
    weight = torch.randn(C, device=device) / C**0.5
    bias = torch.tensor(2.0, device=device)  # almost every token routed
    clean = cram_ext.route(hidden, weight, bias, 0.5)
    hidden[1, 17, 5] = NAN
    force = torch.zeros(B, T, dtype=torch.bool, device=device)
    force[2, 17] = True
    hidden[2, 17, 0] = NAN
    r = cram_ext.route(hidden, weight, bias, 0.5, force)
    assert torch.isnan(r.prob[1, 17]) and not r.mask[1, 17], "a NaN probability must not be routed"
    assert r.mask[2, 17], "a forced token is routed whatever its probability"
    other = torch.ones(B, T, dtype=torch.bool, device=device)
    other[1, 17] = other[2, 17] = False
    assert torch.equal(r.prob[other], clean.prob[other]) and torch.equal(r.mask[other], clean.mask[other])
    index, counts = route_from_mask(r.mask)
    assert torch.equal(r.index, index) and torch.equal(r.counts, counts)


def _attention_inputs(device, dtype, D, B=3, T=200, H=4, Hk=2):
    q = torch.randn(B, T, H, D, device=device).to(dtype)
    k = torch.randn(B, T, Hk, D, device=device).to(dtype)
    v = torch.randn(B, T, Hk, D, device=device).to(dtype)
    mask = routing_mask(B, T, "random", device, 0.3)
    return q, k, v, mask


def _run(q, k, v, index, counts, grad_out):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = cram_ext.routed_attention(q, k, v, index, counts, deterministic=True)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), grad_out))


@pytest.mark.parametrize("device, dtype, D", attention_params())
def test_attention_nan_in_rows_not_routed_is_ignored(device, dtype, D):
    """NaN in q and in grad_out at rows that are not routed: every output and gradient is
    bitwise what it is without them (grad q is 0 there)."""
    q, k, v, mask = _attention_inputs(device, dtype, D)
    index, counts = route_from_mask(mask)
    grad_out = torch.randn_like(q)
    clean = _run(q, k, v, index, counts, grad_out)
    q, grad_out = q.clone(), grad_out.clone()
    q[~mask] = NAN
    grad_out[~mask] = NAN
    dirty = _run(q, k, v, index, counts, grad_out)
    for name, a, b in zip(("out", "lse", "grad q", "grad k", "grad v"), dirty, clean):
        assert torch.equal(a, b), f"{name} changed by NaN at rows that were not routed"


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("device, dtype, D", attention_params())
def test_attention_nonfinite_key_stays_in_its_sequence(device, dtype, D, value):
    """NaN/Inf in k and v of sequence 0, kv head 1: the other sequences and the other head
    group are bitwise unaffected. (The key is later than every routed query of its sequence,
    so no query sees it; within its own key tile it may still enter P @ V as 0 * NaN, as in
    FlashAttention, so nothing is claimed for its own sequence and head group.)"""
    q, k, v, mask = _attention_inputs(device, dtype, D)
    H, Hk = q.shape[2], k.shape[2]
    mask[0, 150:] = False  # the poisoned key 160 is later than every routed query of row 0
    index, counts = route_from_mask(mask)
    grad_out = torch.randn_like(q)
    clean = _run(q, k, v, index, counts, grad_out)
    k, v = k.clone(), v.clone()
    k[0, 160, 1] = value
    v[0, 160, 1] = value
    out, lse, gq, gk, gv = _run(q, k, v, index, counts, grad_out)
    c_out, c_lse, c_gq, c_gk, c_gv = clean
    group = H // Hk
    same_group = torch.zeros(H, dtype=torch.bool, device=device)
    same_group[group : 2 * group] = True
    for name, a, b in (("out", out, c_out), ("grad q", gq, c_gq)):
        assert torch.equal(a[1:], b[1:]), f"{name} of another sequence changed"
        assert torch.equal(a[0][:, ~same_group], b[0][:, ~same_group]), f"{name} of another head group changed"
    assert torch.equal(lse[1:], c_lse[1:]) and torch.equal(lse[0][~same_group], c_lse[0][~same_group])
    for name, a, b in (("grad k", gk, c_gk), ("grad v", gv, c_gv)):
        assert torch.equal(a[1:], b[1:]), f"{name} of another sequence changed"
        assert torch.equal(a[0, :, 0], b[0, :, 0]), f"{name} of another head group changed"
