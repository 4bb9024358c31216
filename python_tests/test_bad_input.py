"""Bad input: every argument check raises the documented exception naming the argument
(docs/design.md §2), check_route rejects each kind of malformed routing, and a malformed routing
passed straight to routed_attention never crashes (set_debug(True) rejects it first).

Each case is a function of the device that returns (op, args); the matrix runs on every
device, plus cases that only exist with a GPU (mixed devices, CUDA head dims and dtypes).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import DEVICES, cuda_only, route_from_mask, routing_mask

import cram_ext

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
B, T, C = 2, 5, 3
H, HK, S, D = 4, 2, 7, 8


def _scan(dev, x=None, log_a=None, h0="default"):
    x = torch.randn(B, T, C, device=dev) if x is None else x
    log_a = -torch.rand(B, T, C, device=dev) if log_a is None else log_a
    h0 = torch.randn(B, C, device=dev) if isinstance(h0, str) else h0
    return cram_ext.gated_scan, (x, log_a, h0)


def _route(dev, hidden=None, weight=None, bias=None, force="default"):
    hidden = torch.randn(B, T, C, device=dev) if hidden is None else hidden
    weight = torch.randn(C, device=dev) if weight is None else weight
    bias = torch.tensor(0.0, device=dev) if bias is None else bias
    force = torch.zeros(B, T, dtype=torch.bool, device=dev) if isinstance(force, str) else force
    return cram_ext.route, (hidden, weight, bias, 0.5, force)


def _attn(dev, q=None, k=None, v=None, index=None, counts=None, dtype=None, d=None):
    dtype = dtype or (F16 if dev == "cuda" else F32)
    d = d or (64 if dev == "cuda" else D)
    q = torch.randn(B, T, H, d, device=dev, dtype=dtype) if q is None else q
    k = torch.randn(B, S, HK, d, device=dev, dtype=dtype) if k is None else k
    v = torch.randn(B, S, HK, d, device=dev, dtype=dtype) if v is None else v
    r_index, r_counts = route_from_mask(routing_mask(B, T, "random", dev))
    index = r_index if index is None else index
    counts = r_counts if counts is None else counts
    return cram_ext.routed_attention, (q, k, v, index, counts)


def _attn_dims(dev):
    return 64 if dev == "cuda" else D


def _kv(dev, b=B, s=S, hk=HK, d=None, dtype=None):
    return torch.randn(b, s, hk, d or _attn_dims(dev), device=dev, dtype=dtype or (F16 if dev == "cuda" else F32))


def _q(dev, b=B, t=T, h=H, d=None, dtype=None):
    return torch.randn(b, t, h, d or _attn_dims(dev), device=dev, dtype=dtype or (F16 if dev == "cuda" else F32))


def _scan_bwd(dev, grad_h=None, grad_h_last=None, log_a=None, h=None, h0="default"):
    grad_h = torch.randn(B, T, C, device=dev) if grad_h is None else grad_h
    grad_h_last = torch.randn(B, C, device=dev) if grad_h_last is None else grad_h_last
    log_a = -torch.rand(B, T, C, device=dev) if log_a is None else log_a
    h = torch.randn(B, T, C, device=dev) if h is None else h
    h0 = torch.randn(B, C, device=dev) if isinstance(h0, str) else h0
    return torch.ops.cram.gated_scan_backward.default, (grad_h, grad_h_last, log_a, h, h0)


def _route_bwd(dev, grad_prob=None, prob=None, hidden=None, weight=None):
    grad_prob = torch.randn(B, T, device=dev) if grad_prob is None else grad_prob
    prob = torch.rand(B, T, device=dev) if prob is None else prob
    hidden = torch.randn(B, T, C, device=dev) if hidden is None else hidden
    weight = torch.randn(C, device=dev) if weight is None else weight
    return torch.ops.cram.route_backward.default, (grad_prob, prob, hidden, weight)


def _attn_bwd(dev, grad_out=None, out=None, lse=None):
    _, (q, k, v, index, counts) = _attn(dev)
    out_ok, lse_ok = cram_ext.routed_attention(q, k, v, index, counts)
    grad_out = torch.randn_like(out_ok) if grad_out is None else grad_out
    out = out_ok if out is None else out
    lse = lse_ok if lse is None else lse
    return torch.ops.cram.routed_attention_backward.default, (grad_out, q, k, v, out, lse, index, counts, 0.3)


def _dt(dev):
    return F16 if dev == "cuda" else F32


# (id, build(device) -> (op, args), exception type, message fragment)
CASES = [
    # ---------------------------------------------------------------- gated_scan
    ("scan-x-rank", lambda d: _scan(d, x=torch.randn(B, T, device=d)), ValueError, r"x: expected a 3-d tensor"),
    ("scan-x-rank4", lambda d: _scan(d, x=torch.randn(B, T, C, 1, device=d)), ValueError, r"x: expected a 3-d tensor"),
    ("scan-x-int", lambda d: _scan(d, x=torch.ones(B, T, C, dtype=torch.int32, device=d)), TypeError,
     r"x: expected dtype in"),
    ("scan-log_a-dtype", lambda d: _scan(d, log_a=-torch.rand(B, T, C, device=d, dtype=F16)), TypeError,
     r"log_a: expected the dtype of x"),
    ("scan-log_a-shape", lambda d: _scan(d, log_a=-torch.rand(B, T + 1, C, device=d)), ValueError,
     r"log_a: expected shape"),
    ("scan-log_a-rank", lambda d: _scan(d, log_a=-torch.rand(B, T * C, device=d)), ValueError,
     r"log_a: expected shape"),
    ("scan-h0-shape", lambda d: _scan(d, h0=torch.randn(B, C + 1, device=d)), ValueError, r"h0: expected shape"),
    ("scan-h0-rank", lambda d: _scan(d, h0=torch.randn(B, 1, C, device=d)), ValueError, r"h0: expected shape"),
    ("scan-h0-dtype", lambda d: _scan(d, h0=torch.randn(B, C, device=d, dtype=F16)), TypeError,
     r"h0: expected dtype in"),
    ("scan-h0-dtype-bf16-x", lambda d: _scan(d, x=torch.randn(B, T, C, device=d, dtype=BF16),
                                             log_a=-torch.rand(B, T, C, device=d, dtype=BF16),
                                             h0=torch.randn(B, C, device=d, dtype=BF16)), TypeError,
     r"h0: expected dtype in"),
    ("scan-bwd-grad_h_last-shape", lambda d: _scan_bwd(d, grad_h_last=torch.randn(B, C + 2, device=d)), ValueError,
     r"grad_h_last: expected shape"),
    ("scan-bwd-grad_h-dtype", lambda d: _scan_bwd(d, grad_h=torch.randn(B, T, C, device=d, dtype=BF16)),
     TypeError, r"grad_h: expected the dtype of h"),
    ("scan-bwd-h0-dtype", lambda d: _scan_bwd(d, h0=torch.randn(B, C, device=d, dtype=F16)), TypeError,
     r"h0: expected dtype in"),
    # --------------------------------------------------------------------- route
    ("route-hidden-rank", lambda d: _route(d, hidden=torch.randn(B * T, C, device=d)), ValueError,
     r"hidden: expected a 3-d tensor"),
    ("route-hidden-int", lambda d: _route(d, hidden=torch.ones(B, T, C, dtype=torch.int64, device=d)), TypeError,
     r"hidden: expected dtype in"),
    ("route-weight-shape", lambda d: _route(d, weight=torch.randn(C + 1, device=d)), ValueError,
     r"weight: expected shape"),
    ("route-weight-rank", lambda d: _route(d, weight=torch.randn(1, C, device=d)), ValueError,
     r"weight: expected shape"),
    ("route-weight-int", lambda d: _route(d, weight=torch.ones(C, dtype=torch.int32, device=d)), TypeError,
     r"weight: expected dtype in"),
    ("route-bias-1d", lambda d: _route(d, bias=torch.zeros(1, device=d)), ValueError, r"bias: expected a 0-d tensor"),
    ("route-bias-2d", lambda d: _route(d, bias=torch.zeros(1, 1, device=d)), ValueError,
     r"bias: expected a 0-d tensor"),
    ("route-bias-int", lambda d: _route(d, bias=torch.tensor(0, device=d)), TypeError, r"bias: expected dtype in"),
    ("route-force-dtype", lambda d: _route(d, force=torch.zeros(B, T, dtype=torch.uint8, device=d)), TypeError,
     r"force: expected dtype in \{Bool\}"),
    ("route-force-float", lambda d: _route(d, force=torch.zeros(B, T, device=d)), TypeError,
     r"force: expected dtype in \{Bool\}"),
    ("route-force-shape", lambda d: _route(d, force=torch.zeros(B, T + 1, dtype=torch.bool, device=d)), ValueError,
     r"force: expected shape"),
    ("route-force-rank", lambda d: _route(d, force=torch.zeros(B * T, dtype=torch.bool, device=d)), ValueError,
     r"force: expected shape"),
    ("route-bwd-grad_prob-dtype", lambda d: _route_bwd(d, grad_prob=torch.randn(B, T, device=d, dtype=F64)),
     TypeError, r"grad_prob: expected dtype in"),
    ("route-bwd-prob-shape", lambda d: _route_bwd(d, prob=torch.rand(B, T + 1, device=d)), ValueError,
     r"prob: expected shape"),
    # ---------------------------------------------------------- routed_attention
    ("attn-deterministic-int", lambda d: (partial(cram_ext.routed_attention, deterministic=1), _attn(d)[1]), TypeError,
     r"deterministic must be a bool"),
    ("attn-q-rank", lambda d: _attn(d, q=torch.randn(B, T, H * _attn_dims(d), device=d, dtype=_dt(d))), ValueError,
     r"q: expected a 4-d tensor"),
    ("attn-k-rank", lambda d: _attn(d, k=torch.randn(B, S, HK * _attn_dims(d), device=d, dtype=_dt(d))),
     ValueError, r"k: expected a 4-d tensor"),
    ("attn-v-rank", lambda d: _attn(d, v=torch.randn(B, S, HK, _attn_dims(d), 1, device=d, dtype=_dt(d))),
     ValueError, r"v: expected a 4-d tensor"),
    ("attn-q-int", lambda d: _attn(d, q=torch.ones(B, T, H, _attn_dims(d), dtype=torch.int32, device=d)),
     TypeError, r"q: expected dtype in"),
    ("attn-k-dtype", lambda d: _attn(d, k=_kv(d, dtype=BF16)), TypeError, r"k: expected the dtype of q"),
    ("attn-v-dtype", lambda d: _attn(d, v=_kv(d, dtype=BF16)), TypeError, r"v: expected the dtype of q"),
    ("attn-k-batch", lambda d: _attn(d, k=_kv(d, b=B + 1), v=_kv(d, b=B + 1)), ValueError, r"k: expected shape"),
    ("attn-k-headdim", lambda d: _attn(d, k=_kv(d, d=2 * _attn_dims(d)), v=_kv(d, d=2 * _attn_dims(d))),
     ValueError, r"k: expected shape"),
    ("attn-v-shape", lambda d: _attn(d, v=_kv(d, s=S + 1)), ValueError, r"v: expected shape"),
    ("attn-H%Hk", lambda d: _attn(d, k=_kv(d, hk=3), v=_kv(d, hk=3)), ValueError,
     r"k: the number of query heads H=4 must be a multiple of the number of key/value heads Hk=3"),
    ("attn-Hk=0", lambda d: _attn(d, k=_kv(d, hk=0), v=_kv(d, hk=0)), ValueError,
     r"k: the number of query heads H=4 must be a multiple"),
    ("attn-S<T", lambda d: _attn(d, k=_kv(d, s=T - 1), v=_kv(d, s=T - 1)), ValueError, r"k: expected S >= T"),
    ("attn-index-dtype", lambda d: _attn(d, index=torch.zeros(B, T, dtype=torch.int64, device=d)), TypeError,
     r"index: expected dtype in \{Int\}"),
    ("attn-index-shape", lambda d: _attn(d, index=torch.zeros(B, T + 1, dtype=torch.int32, device=d)), ValueError,
     r"index: expected shape"),
    ("attn-index-rank", lambda d: _attn(d, index=torch.zeros(B * T, dtype=torch.int32, device=d)), ValueError,
     r"index: expected shape"),
    ("attn-counts-dtype", lambda d: _attn(d, counts=torch.zeros(B, dtype=torch.int64, device=d)), TypeError,
     r"counts: expected dtype in \{Int\}"),
    ("attn-counts-shape", lambda d: _attn(d, counts=torch.zeros(B + 1, dtype=torch.int32, device=d)), ValueError,
     r"counts: expected shape"),
    ("attn-counts-rank", lambda d: _attn(d, counts=torch.zeros(B, 1, dtype=torch.int32, device=d)), ValueError,
     r"counts: expected shape"),
    ("attn-bwd-lse-dtype", lambda d: _attn_bwd(d, lse=torch.zeros(B, H, T, device=d, dtype=F64)), TypeError,
     r"lse: expected dtype in"),
    ("attn-bwd-lse-shape", lambda d: _attn_bwd(d, lse=torch.zeros(B, T, H, device=d)), ValueError,
     r"lse: expected shape"),
    ("attn-bwd-grad_out-shape", lambda d: _attn_bwd(d, grad_out=_q(d, t=T + 1)), ValueError,
     r"grad_out: expected shape"),
]


# A meta tensor among real ones would dispatch to the fake kernel and return uninitialised
# memory: the wrappers refuse it first.
CASES += [
    ("scan-log_a-on-meta", lambda d: _scan(d, log_a=-torch.rand(B, T, C, device="meta")), ValueError,
     r"log_a: expected a tensor on .* like x, got one on meta"),
    ("route-weight-on-meta", lambda d: _route(d, weight=torch.randn(C, device="meta")), ValueError,
     r"weight: expected a tensor on .* like hidden, got one on meta"),
    ("attn-k-on-meta", lambda d: _attn(d, k=_kv(d).to("meta")), ValueError,
     r"k: expected a tensor on .* like q, got one on meta"),
    ("attn-q-as-BHTD", lambda d: _attn(d, q=_q(d).transpose(1, 2).contiguous()), ValueError,
     r"looks like \(B, H, T, D\): pass q.transpose\(1, 2\)"),
]


@pytest.mark.parametrize("build, exc, match", [pytest.param(*c[1:], id=c[0]) for c in CASES])
@pytest.mark.parametrize("device", DEVICES)
def test_bad_argument(device, build, exc, match):
    op, args = build(device)
    with pytest.raises(exc, match=match):
        op(*args)


# Cases that only exist on a GPU. Mixed devices: one argument on the CPU, the rest on CUDA.
CUDA_CASES = [
    ("scan-log_a-on-cpu", lambda: _scan("cuda", log_a=-torch.rand(B, T, C)), ValueError,
     r"log_a: expected a tensor on cuda:0 like x, got one on cpu"),
    ("scan-h0-on-cpu", lambda: _scan("cuda", h0=torch.randn(B, C)), ValueError, r"h0: expected a tensor on cuda"),
    ("scan-x-f64", lambda: _scan("cuda", x=torch.randn(B, T, C, device="cuda", dtype=F64),
                                  log_a=-torch.rand(B, T, C, device="cuda", dtype=F64), h0=None), TypeError,
     r"x: expected dtype in"),
    ("route-weight-on-cpu", lambda: _route("cuda", weight=torch.randn(C)), ValueError,
     r"weight: expected a tensor on cuda"),
    ("route-bias-on-cpu", lambda: _route("cuda", bias=torch.tensor(0.0)), ValueError,
     r"bias: expected a tensor on cuda"),
    ("route-force-on-cpu", lambda: _route("cuda", force=torch.zeros(B, T, dtype=torch.bool)), ValueError,
     r"force: expected a tensor on cuda"),
    ("route-hidden-f64", lambda: _route("cuda", hidden=torch.randn(B, T, C, device="cuda", dtype=F64)), TypeError,
     r"hidden: expected dtype in"),
    ("attn-k-on-cpu", lambda: _attn("cuda", k=_kv("cpu", d=64, dtype=F16)), ValueError,
     r"k: expected a tensor on cuda"),
    ("attn-v-on-cpu", lambda: _attn("cuda", v=_kv("cpu", d=64, dtype=F16)), ValueError,
     r"v: expected a tensor on cuda"),
    ("attn-index-on-cpu", lambda: _attn("cuda", index=route_from_mask(routing_mask(B, T, "all", "cpu"))[0]),
     ValueError, r"index: expected a tensor on cuda"),
    ("attn-counts-on-cpu", lambda: _attn("cuda", counts=torch.full((B,), T, dtype=torch.int32)), ValueError,
     r"counts: expected a tensor on cuda"),
    ("attn-headdim-32", lambda: _attn("cuda", d=32), ValueError, r"q: head dim D must be 64 or 128 on CUDA, got 32"),
    ("attn-headdim-96", lambda: _attn("cuda", d=96), ValueError, r"q: head dim D must be 64 or 128 on CUDA, got 96"),
    ("attn-f32", lambda: _attn("cuda", dtype=F32), TypeError, r"q: expected dtype in"),
]


@pytest.mark.parametrize("build, exc, match", [cuda_only(*c[1:], id=c[0]) for c in CUDA_CASES])
def test_bad_argument_cuda(build, exc, match):
    op, args = build()
    with pytest.raises(exc, match=match):
        op(*args)


# ------------------------------------------------------------------ check_route


def _valid_route(device, T=9):
    mask = routing_mask(4, T, "mixed", device)  # rows: none, all, first, last
    return route_from_mask(mask)


def _set(t, idx, value):
    t = t.clone()
    t[idx] = value
    return t


# (id, (index, counts) -> (index, counts) with one violation, message fragment); the
# valid route's rows are: 0 none routed, 1 all routed, 2 only 0, 3 only T-1; T = 9.
ROUTE_VIOLATIONS = [
    ("counts>T", lambda i, c: (i, _set(c, 0, 10)), r"counts\[0\] = 10 is outside \[0, T=9\]"),
    ("counts<0", lambda i, c: (i, _set(c, 2, -1)), r"counts\[2\] = -1 is outside \[0, T=9\]"),
    ("index>=T", lambda i, c: (_set(i, (2, 0), 9), c), r"index\[2, 0\] = 9 is outside \[0, T=9\)"),
    ("index<0", lambda i, c: (_set(i, (1, 4), -3), c), r"index\[1, 4\] = -3 is outside"),
    ("unsorted", lambda i, c: (_set(_set(i, (1, 3), 4), (1, 4), 3), c), r"index\[1\] is not strictly increasing"),
    ("duplicate", lambda i, c: (_set(i, (1, 5), 4), c), r"index\[1\] is not strictly increasing"),
    ("bad-tail", lambda i, c: (_set(i, (3, 5), 2), c), r"index\[3, 5\] = 2, past counts\[3\], must be T=9"),
    ("bad-tail-empty-row", lambda i, c: (_set(i, (0, 0), 0), c), r"index\[0, 0\] = 0, past counts\[0\]"),
    ("counts-too-small", lambda i, c: (i, _set(c, 1, 8)), r"index\[1, 8\] = 8, past counts\[1\]"),
]


@pytest.mark.parametrize("corrupt, match", [pytest.param(*v[1:], id=v[0]) for v in ROUTE_VIOLATIONS])
@pytest.mark.parametrize("device", DEVICES)
def test_check_route_rejects(device, corrupt, match):
    index, counts = _valid_route(device)
    cram_ext.check_route(index, counts, 9)  # the uncorrupted route passes
    bad_index, bad_counts = corrupt(index, counts)
    with pytest.raises(ValueError, match=match):
        cram_ext.check_route(bad_index, bad_counts, 9)


@pytest.mark.parametrize("device", DEVICES)
def test_check_route_argument_errors(device):
    index, counts = _valid_route(device)
    with pytest.raises(TypeError, match="int32"):
        cram_ext.check_route(index.long(), counts, 9)
    with pytest.raises(TypeError, match="int32"):
        cram_ext.check_route(index, counts.long(), 9)
    with pytest.raises(ValueError, match=r"index: expected shape \(B, T=10\)"):
        cram_ext.check_route(index, counts, 10)
    with pytest.raises(ValueError, match=r"counts: expected shape \(4,\)"):
        cram_ext.check_route(index, counts[:3], 9)
    with pytest.raises(TypeError, match="tensors"):
        cram_ext.check_route(index.tolist(), counts, 9)


@pytest.mark.parametrize("threshold", [0.5, -1.0, 2.0], ids=["some", "all", "none"])
@pytest.mark.parametrize("device", DEVICES)
def test_check_route_accepts_route_output(device, threshold):
    hidden = torch.randn(3, 50, 8, device=device)
    force = torch.rand(3, 50, device=device) < 0.1
    for f in (None, force):
        r = cram_ext.route(hidden, torch.randn(8, device=device), torch.tensor(0.0, device=device), threshold, f)
        cram_ext.check_route(r.index, r.counts, 50)


# ------------------------------------------- malformed routing in routed_attention

TA = 40  # sequence length of the malformed-routing cases


def _malformed(device, kind):
    index, counts = route_from_mask(routing_mask(3, TA, "random", device))
    i32 = torch.iinfo(torch.int32)
    if kind == "index-too-large":
        index[:, 0] = TA
        index[1, 1] = i32.max
    elif kind == "index-negative":
        index[:, 0] = -1
        index[2, 0] = i32.min
    elif kind == "counts>T":
        counts[0] = TA + 5
        counts[1] = i32.max
    elif kind == "counts<0":
        counts[0] = -1
        counts[1] = i32.min
    elif kind == "unsorted":
        index[:, :4] = torch.tensor([30, 2, 17, 2], dtype=torch.int32, device=device)
        counts.clamp_(min=4)
    elif kind == "garbage":
        index = torch.randint(i32.min, i32.max, (3, TA), dtype=torch.int32, device=device)
        counts = torch.tensor([TA, i32.max, i32.min], dtype=torch.int32, device=device)
    else:
        raise ValueError(kind)
    return index, counts


MALFORMED = ["index-too-large", "index-negative", "counts>T", "counts<0", "unsorted", "garbage"]


@pytest.mark.parametrize("kind", MALFORMED)
@pytest.mark.parametrize("device", DEVICES)
def test_malformed_routing_does_not_crash(device, kind):
    """Without debug checks a malformed routing may give any answer, but the op must return
    (forward and backward) without touching memory out of bounds."""
    dtype, d = (F16, 64) if device == "cuda" else (F32, 16)
    q = torch.randn(3, TA, 4, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(3, TA + 3, 2, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(3, TA + 3, 2, d, device=device, dtype=dtype, requires_grad=True)
    index, counts = _malformed(device, kind)
    out, lse = cram_ext.routed_attention(q, k, v, index, counts)
    assert out.shape == q.shape and lse.shape == (3, 4, TA)
    out.float().sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    if device == "cuda":
        torch.cuda.synchronize()  # surface an asynchronous fault here, not in a later test


@pytest.mark.parametrize("kind", MALFORMED)
@pytest.mark.parametrize("device", DEVICES)
def test_debug_mode_rejects_malformed_routing(device, kind, debug_mode):
    dtype, d = (F16, 64) if device == "cuda" else (F32, 16)
    q = torch.randn(3, TA, 4, d, device=device, dtype=dtype)
    k = torch.randn(3, TA, 2, d, device=device, dtype=dtype)
    v = torch.randn(3, TA, 2, d, device=device, dtype=dtype)
    index, counts = _malformed(device, kind)
    with pytest.raises(ValueError, match="check_route"):
        cram_ext.routed_attention(q, k, v, index, counts)
    # A valid routing still goes through in debug mode.
    index, counts = route_from_mask(routing_mask(3, TA, "mixed", device))
    out, _ = cram_ext.routed_attention(q, k, v, index, counts)
    assert torch.isfinite(out).all()


def test_debug_mode_off_by_default():
    """Without CRAM_DEBUG the index is not validated (no host sync in the op)."""
    import os

    from cram_ext import ops

    if os.environ.get("CRAM_DEBUG", "0") not in ("", "0"):
        pytest.skip("CRAM_DEBUG is set in this environment")
    assert ops._debug is False
    q = k = v = torch.randn(1, 4, 1, 8)
    index, counts = torch.full((1, 4), 7, dtype=torch.int32), torch.tensor([9], dtype=torch.int32)
    out, lse = cram_ext.routed_attention(q, k, v, index, counts)  # any answer, but no exception
    assert out.shape == q.shape and lse.shape == (1, 1, 4)



@pytest.mark.parametrize("device", DEVICES)
def test_route_takes_a_python_float_bias(device):
    hidden, weight = torch.randn(B, T, C, device=device), torch.randn(C, device=device)
    a = cram_ext.route(hidden, weight, 0.25)
    b = cram_ext.route(hidden, weight, torch.tensor(0.25, device=device))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_all_meta_inputs_give_shapes():
    """Meta everywhere is shape inference (meta-device model init), not an error."""
    q = torch.randn(B, T, H, D, device="meta")
    k = v = torch.randn(B, S, HK, D, device="meta")
    index = torch.zeros(B, T, dtype=torch.int32, device="meta")
    out, lse = cram_ext.routed_attention(q, k, v, index, torch.zeros(B, dtype=torch.int32, device="meta"))
    assert out.shape == q.shape and out.device.type == "meta" and lse.shape == (B, H, T)


def test_routed_attention_layer_wants_a_batch_dimension():
    layer = cram_ext.RoutedAttention(32, 4)
    with pytest.raises(ValueError, match=r"add a batch dimension"):
        layer(torch.randn(10, 32))
    with pytest.raises(ValueError, match=r"E=32"):
        layer(torch.randn(2, 10, 16))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=0), "num_heads must be a positive int"),
    (dict(num_heads=-4), "num_heads must be a positive int"),
    (dict(num_heads=4.0), "num_heads must be a positive int"),
    (dict(num_kv_heads=0), "num_kv_heads must be a positive int"),
    (dict(threshold=5.0), "threshold must be in"),
    (dict(explore=2.0), "explore must be in"),
])
def test_routed_attention_layer_rejects_bad_arguments(kwargs, match):
    args = dict(embed_dim=32, num_heads=4) | kwargs
    with pytest.raises(ValueError, match=match):
        cram_ext.RoutedAttention(**args)


def _attention_layers():
    from cram_ext.models.transformer import CausalSelfAttention
    return [cram_ext.RoutedAttention(32, 4), CausalSelfAttention(32, 4)]


@pytest.mark.parametrize("index", [0, 1], ids=["RoutedAttention", "CausalSelfAttention"])
def test_attention_layer_names_a_mask_passed_as_the_cache(index):
    """layer(x, mask), as nn.MultiheadAttention habits write it: the second positional is the cache."""
    layer = _attention_layers()[index]
    x = torch.randn(2, 10, 32)
    for mode in (layer.train, layer.eval):
        mode()
        with pytest.raises(TypeError, match=f"{type(layer).__name__}: cache must be a KVCache.*attention_mask="):
            layer(x, torch.ones(2, 10, dtype=torch.bool))


@pytest.mark.parametrize("index", [0, 1], ids=["RoutedAttention", "CausalSelfAttention"])
def test_attention_layer_names_a_dtype_mismatch(index):
    layer = _attention_layers()[index]
    with pytest.raises(TypeError, match=rf"{type(layer).__name__}: x is torch.float64 and the layer's parameters "
                                        r"are torch.float32"):
        layer(torch.randn(2, 10, 32, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: mixed dtypes are what it is for
        assert layer(torch.randn(2, 10, 32)).shape == (2, 10, 32)
