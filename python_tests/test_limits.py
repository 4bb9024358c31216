"""Sizes past 2**31 elements: every op works there (the kernels index in 64 bits), checked
against the reference on slices small enough for it.

CUDA only (the CPU kernels index in int64 throughout, and these sizes would take minutes
there); each test needs 20-40 GB of GPU memory and is skipped, saying so, on a GPU with less.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA_SKIP, assert_close_rel, route_from_mask

import cram_ext

pytestmark = CUDA_SKIP
BIG = 2**31


def need_gib(gib: float) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2**30:.0f} GiB free")


def test_scan_past_int32():
    need_gib(60)
    B, T, C = 1, 2**20, 4096 + 8  # B * T * C > 2**31
    assert B * T * C > BIG
    x = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16)
    log_a = torch.empty_like(x).uniform_(-0.1, 0.0)
    x.requires_grad_()
    log_a.requires_grad_()
    h, h_last = cram_ext.gated_scan(x, log_a)
    grad_h = torch.randn_like(h)
    gx, gl = torch.autograd.grad((h, h_last), (x, log_a), (grad_h, torch.zeros_like(h_last)))
    for c0 in (0, 2048, C - 16):  # the last channels sit past element 2**31 at late steps
        xs, ls = (t.detach()[:, :, c0 : c0 + 16].contiguous().requires_grad_() for t in (x, log_a))
        hs, hs_last = cram_ext.gated_scan(xs, ls)
        gxs, gls = torch.autograd.grad((hs, hs_last), (xs, ls),
                                       (grad_h[:, :, c0 : c0 + 16].contiguous(), torch.zeros_like(hs_last)))
        tail = slice(T - 4096, T)
        assert_close_rel(h[:, tail, c0 : c0 + 16], hs[:, tail], 1e-2, f"h, channels {c0}+")
        assert_close_rel(h_last[:, c0 : c0 + 16], hs_last, 1e-2, f"h_last, channels {c0}+")
        assert_close_rel(gx[:, tail, c0 : c0 + 16], gxs[:, tail], 1e-2, f"grad x, channels {c0}+")
        assert_close_rel(gl[:, :4096, c0 : c0 + 16], gls[:, :4096], 1e-2, f"grad log_a, channels {c0}+")


def test_route_past_int32():
    need_gib(40)
    B, T, C = 2, 2**19 + 3, 2048 + 8
    assert B * T * C > BIG
    hidden = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(C, device="cuda") / C**0.5).requires_grad_()
    bias = torch.tensor(0.1, device="cuda", requires_grad=True)
    r = cram_ext.route(hidden, weight, bias, 0.5)
    rows = torch.cat([torch.arange(0, 64), torch.arange(T - 64, T)]).cuda()
    for b in range(B):
        expected = torch.sigmoid(hidden[b, rows].detach().float() @ weight.detach() + bias.detach())
        assert_close_rel(r.prob[b, rows], expected, 1e-5, f"prob, row {b}")
    index, counts = route_from_mask(r.mask)
    assert torch.equal(r.index, index) and torch.equal(r.counts, counts)
    grad_prob = torch.randn_like(r.prob)
    gh, gw, gb = torch.autograd.grad(r.prob, (hidden, weight, bias), grad_prob)
    p = r.prob.detach()
    dlogit = grad_prob * p * (1 - p)
    assert_close_rel(gh[1, rows], (dlogit[1, rows, None] * weight.detach()).to(gh.dtype), 1e-2, "grad hidden")
    assert_close_rel(gb, dlogit.sum(), 1e-4, "grad bias")
    expected_w = torch.einsum("bt,btc->c", dlogit, hidden.detach().float())
    assert_close_rel(gw, expected_w, 1e-4, "grad weight")


def attention_rows_reference(q, k, v, t_rows, grad_rows, scale):
    """Causal attention for the query positions t_rows only (B = 1, S == T), in float32 with
    autograd: (out rows, grad q rows, grad k, grad v). Heads grouped, not repeated, so that
    the keys are held once."""
    n, H, D = len(t_rows), q.shape[2], q.shape[3]
    Hk = k.shape[2]
    qr = q[0, t_rows].detach().float().requires_grad_()  # (n, H, D)
    kr, vr = (t[0].detach().float().requires_grad_() for t in (k, v))  # (S, Hk, D)
    scores = torch.einsum("nkgd,skd->nkgs", qr.view(n, Hk, H // Hk, D), kr) * scale
    keys = torch.arange(k.shape[1], device=q.device)
    scores = scores.masked_fill(keys > t_rows.view(n, 1, 1, 1), float("-inf"))
    out = torch.einsum("nkgs,skd->nkgd", torch.softmax(scores, dim=-1), vr).reshape(n, H, D)
    gq, gk, gv = torch.autograd.grad(out, (qr, kr, vr), grad_rows.float())
    return out.detach(), gq, gk, gv


def test_attention_past_int32():
    need_gib(40)
    B, T, H, Hk, D = 1, 2**20 + 1000, 16, 2, 128
    assert B * T * H * D > BIG
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(B, T, Hk, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    v = torch.randn(B, T, Hk, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    # A few routed queries at the start, in the middle and past element 2**31 of q.
    t_rows = torch.tensor([0, 1, 5000, 2**19, T - 700, T - 3, T - 1], device="cuda")
    mask = torch.zeros(B, T, dtype=torch.bool, device="cuda")
    mask[0, t_rows] = True
    index, counts = route_from_mask(mask)
    for deterministic in (False, True):
        out, lse = cram_ext.routed_attention(q, k, v, index, counts, deterministic=deterministic)
        grad_out = torch.randn_like(out)
        gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad_out)
        ref_out, ref_gq, ref_gk, ref_gv = attention_rows_reference(q, k, v, t_rows, grad_out[0, t_rows], D**-0.5)
        assert_close_rel(out[0, t_rows], ref_out, 1e-2, "out")
        assert_close_rel(gq[0, t_rows], ref_gq, 1e-2, "grad q")
        assert_close_rel(gk[0], ref_gk, 1e-2, "grad k")
        assert_close_rel(gv[0], ref_gv, 1e-2, "grad v")
        unrouted = ~mask
        assert (out[unrouted] == 0).all() and (gq[unrouted] == 0).all()
        del out, lse, gq, gk, gv
