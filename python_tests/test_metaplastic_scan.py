"""cram_ext.metaplastic_scan and metaplastic_step (the C++/CUDA ops) against the plain-PyTorch
loop of cram_ext.reference_metaplastic (docs/metaplastic.md, the contract).

Every comparison is with the float64 loop run on the CPU from the values the kernel reads
(inputs rounded to their dtype; log_alpha and the prior to the accumulation dtype), by the
relative error of docs/metaplastic.md §4: float64 <= 1e-10; float32 <= max(1e-5, 8 sqrt(T) eps);
float16 <= 5e-3 and bfloat16 <= 1e-2 on o; gradients within fuzz_space's
METAPLASTIC_GRAD_TOLERANCE. Inputs are random in the ranges a trained layer produces (§4), never
zeros. The same tests run on CUDA where a GPU is visible.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICES,
    DTYPE_NAMES,
    SCAN_DTYPES,
    assert_close_rel,
    cuda_only,
    device_dtype_params,
    poison_allocator,
    reference_dtype,
)
from fuzz_space import (
    METAPLASTIC_GRAD_TOLERANCE,
    HypothesisDraw,
    check_metaplastic,
    draw_metaplastic_case,
    metaplastic_prior_grad_floor,
    metaplastic_tolerance,
)
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import cram_ext
from cram_ext.reference_metaplastic import (
    MetaplasticState,
    gla_reference,
    metaplastic_scan_chunked,
    metaplastic_scan_reference,
)

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
NAMES = ["q", "k", "v", "b", "log_alpha", "prior", "M0", "Ibar0"]


def make_inputs(B, T, H, dk, dv, dtype, device, with_state=False, prior_range=(0.5, 2.0)):
    """Realistic inputs (docs/metaplastic.md §4), leaves requiring grad: q, k L2-normalised;
    v ~ N(0, 1); b in (0, ~2); log_alpha = -A dt, A in [1, 16] per head, dt log-uniform in
    [1e-3, 1e-1]; I_p log-uniform in prior_range per head; a state M ~ N(0, 1), Ibar in [0, 3].
    q, k, v, b, log_alpha in `dtype`; prior and the state in the accumulation dtype."""
    acc = reference_dtype(dtype)
    q = F.normalize(torch.randn(B, T, H, dk, dtype=F64), dim=-1)
    k = F.normalize(torch.randn(B, T, H, dk, dtype=F64), dim=-1)
    v = torch.randn(B, T, H, dv, dtype=F64)
    b = torch.sigmoid(torch.randn(B, T, H, dv, dtype=F64)) * F.softplus(torch.randn(H, 1, dtype=F64))
    A = torch.empty(H, dtype=F64).uniform_(1.0, 16.0)
    log_alpha = -A * torch.empty(B, T, H, dtype=F64).uniform_(math.log(1e-3), math.log(1e-1)).exp()
    prior = torch.empty(H, dtype=F64).uniform_(math.log(prior_range[0]), math.log(prior_range[1])).exp()
    leaves = [x.to(dtype).to(device).requires_grad_() for x in (q, k, v, b, log_alpha)]
    leaves.append(prior.to(acc).to(device).requires_grad_())
    state = None
    if with_state:
        state = tuple(x.to(acc).to(device).requires_grad_()
                      for x in (torch.randn(B, H, dv, dk, dtype=F64), 3 * torch.rand(B, H, dv, dk, dtype=F64)))
    return (*leaves, state)


def exact(t):
    """The float64 CPU leaf of what the kernel reads from t (None stays None)."""
    if t is None:
        return None
    return t.detach().cpu().double().requires_grad_(t.requires_grad)


def op_leaves(q, k, v, b, la, prior, state):
    return [q, k, v, b, la, prior] + (list(state) if state is not None else [])


def run_with_grads(scan, leaves, state, grad_o, grad_M, grad_I, scale=None):
    """(o, M, Ibar) of scan and the gradients of every leaf for incoming grad_o, grad_M, grad_I
    (None for leaves the outputs do not depend on, as the loop's at T = 0)."""
    q, k, v, b, la, prior = leaves[:6]
    o, (M, ibar) = scan(q, k, v, b, la, prior, state, scale)
    outs = [(x, g) for x, g in ((o, grad_o), (M, grad_M), (ibar, grad_I)) if x.requires_grad]
    grads = [None] * len(leaves)
    if outs:
        grads = torch.autograd.grad([x for x, _ in outs], leaves, [g for _, g in outs], allow_unused=True)
    return (o, M, ibar), grads


def check_against_reference(q, k, v, b, la, prior, state, scale=None, tol=None, grad_tol=None):
    """Forward and every gradient (q, k, v, b, log_alpha, prior, M0, Ibar0) of the op against
    the float64 loop, from random incoming gradients of o and of the final state."""
    dtype, T = q.dtype, q.shape[1]
    acc = reference_dtype(dtype)
    tol = metaplastic_tolerance(dtype, T) if tol is None else tol
    state_tol = metaplastic_tolerance(acc, T) if dtype != F64 else tol
    grad_tol = max(METAPLASTIC_GRAD_TOLERANCE[dtype], tol) if grad_tol is None else grad_tol
    leaves = op_leaves(q, k, v, b, la, prior, state)
    ref_leaves = [exact(x) for x in leaves]
    ref_state = tuple(ref_leaves[6:]) if state is not None else None

    B, _, H, dk = q.shape
    dv = v.shape[-1]
    grad_o = torch.randn(B, T, H, dv, device=q.device).to(dtype)
    grad_M = torch.randn(B, H, dv, dk, device=q.device, dtype=acc)
    grad_I = torch.randn(B, H, dv, dk, device=q.device, dtype=acc)
    poison_allocator(q.device.type)
    (o, M, ibar), grads = run_with_grads(cram_ext.metaplastic_scan, leaves, state, grad_o, grad_M, grad_I, scale)
    (o_r, M_r, ibar_r), ref_grads = run_with_grads(metaplastic_scan_reference, ref_leaves, ref_state, exact(grad_o),
                                                   exact(grad_M), exact(grad_I), scale)
    assert o.shape == v.shape and o.dtype == dtype and o.device == q.device
    assert M.shape == ibar.shape == (B, H, dv, dk) and M.dtype == ibar.dtype == acc
    assert_close_rel(o, o_r, tol, "o")
    assert_close_rel(M, M_r, state_tol, "M")
    assert_close_rel(ibar, ibar_r, state_tol, "Ibar", floor=1e-12)
    for name, g, g_r, x in zip(NAMES, grads, ref_grads, leaves):
        assert g.shape == x.shape and g.dtype == x.dtype, f"grad {name}: shape or dtype"
        g_r = torch.zeros(x.shape, dtype=F64) if g_r is None else g_r
        floor = 1e-12
        if name == "prior":
            floor = max(floor, metaplastic_prior_grad_floor(*ref_leaves[:6], ref_state, scale, grad_o))
        assert_close_rel(g, g_r, grad_tol, f"grad {name}", floor=floor)
    return (o, M, ibar), grads


# ------------------------------------------------------------------ against the loop

SIZES = [  # B, T, H, d_k, d_v: T around the 64-token chunk, odd and prime head dims
    (2, 0, 2, 5, 3),
    (2, 1, 2, 31, 65),
    (3, 2, 3, 7, 5),
    (2, 63, 2, 16, 24),
    (2, 64, 3, 31, 65),
    (1, 65, 2, 33, 17),
    (3, 131, 2, 8, 33),
]
CUDA_SIZES = [  # the CUDA limits: d_k, d_v = 128, several chunks
    (2, 300, 2, 128, 128),
    (1, 257, 3, 64, 127),
    (3, 129, 1, 1, 128),
    (1, 33, 2, 65, 7),  # 32 lanes a row, 15 of them past d_k; one partial row block
]


def size_id(s):
    return "B{}-T{}-H{}-dk{}-dv{}".format(*s)


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("size", SIZES, ids=size_id)
@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_matches_reference(device, dtype, size, with_state):
    check_against_reference(*make_inputs(*size, dtype, device, with_state))


@pytest.mark.parametrize("size", CUDA_SIZES, ids=size_id)
@pytest.mark.parametrize("dtype", SCAN_DTYPES["cuda"], ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("device", [cuda_only("cuda")])
def test_matches_reference_cuda_sizes(device, dtype, size):
    check_against_reference(*make_inputs(*size, dtype, device, with_state=True))


@pytest.mark.parametrize("device, dtype", [pytest.param("cpu", F64, id="cpu-f64"), cuda_only("cuda", F32)])
def test_issue_size(device, dtype):
    """The issue's odd size (B=4, T=511, H=4, d_v=65, d_k=31), scale 1: output, final state and
    every gradient equal the loop's (float64: to 1e-10)."""
    check_against_reference(*make_inputs(4, 511, 4, 31, 65, dtype, device, with_state=True), scale=1.0)


@pytest.mark.parametrize("device, dtype", [pytest.param("cpu", F64, id="cpu-f64"), cuda_only("cuda", F32)])
def test_long_sequence(device, dtype):
    """T = 4099: the CPU backward's chunks grow to sqrt(T) = 65 tokens, the last one partial;
    against the float64 chunked form (the loop is slow at this length)."""
    B, T, H, dk, dv = 1, 4099, 2, 3, 5
    q, k, v, b, la, prior, state = make_inputs(B, T, H, dk, dv, dtype, device, with_state=True)
    leaves = op_leaves(q, k, v, b, la, prior, state)
    ref_leaves = [exact(x) for x in leaves]
    grad_o = torch.randn(B, T, H, dv, device=device).to(dtype)
    grad_M, grad_I = (torch.randn(B, H, dv, dk, device=device, dtype=reference_dtype(dtype)) for _ in range(2))
    out, grads = run_with_grads(cram_ext.metaplastic_scan, leaves, state, grad_o, grad_M, grad_I)
    ref, ref_grads = run_with_grads(metaplastic_scan_chunked, ref_leaves, tuple(ref_leaves[6:]), exact(grad_o),
                                    exact(grad_M), exact(grad_I))
    tol = metaplastic_tolerance(dtype, T)
    for name, x, x_r in zip(("o", "M", "Ibar"), out, ref):
        assert_close_rel(x, x_r, tol, name)
    for name, g, g_r in zip(NAMES, grads, ref_grads):
        assert_close_rel(g, g_r, max(tol, METAPLASTIC_GRAD_TOLERANCE[dtype]), f"grad {name}")


@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_many_lanes(device, dtype):
    """More (batch, head) lanes than threads: each thread's scratch serves several lanes."""
    check_against_reference(*make_inputs(5, 70, 7, 13, 9, dtype, device, with_state=True))


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_log_alpha_float32(device):
    """bfloat16 inputs with float32 log_alpha and a float64 prior (both allowed): their
    gradients come back in their own dtypes."""
    q, k, v, b, la, prior, state = make_inputs(2, 37, 3, 11, 6, BF16, device, with_state=True)
    la = la.detach().float().requires_grad_()
    prior = prior.detach().double().requires_grad_()
    (_, _, _), grads = check_against_reference(q, k, v, b, la, prior, state)
    assert grads[4].dtype == F32 and grads[5].dtype == F64


def test_gradcheck():
    """float64 finite differences of every input, with and without a state, through a reset."""
    q, k, v, b, la, prior, state = make_inputs(2, 5, 2, 3, 2, F64, "cpu", with_state=True)

    def fn(q, k, v, b, la, prior, *state):
        o, (M, ibar) = cram_ext.metaplastic_scan(q, k, v, b, la, prior, state or None, 0.8)
        return o, M, ibar

    assert torch.autograd.gradcheck(fn, (q, k, v, b, la, prior, *state))
    assert torch.autograd.gradcheck(fn, (q, k, v, b, la, prior))
    la_reset = la.detach().clone()
    la_reset[0, 2, 1] = float("-inf")
    assert torch.autograd.gradcheck(fn, (q, k, v, b, la_reset.requires_grad_(), prior, *state))


# ------------------------------------------------------------------ special cases


def _exact_dtype(device):
    """float64 on the CPU (the contract's 1e-10), float32 on CUDA."""
    return F64 if device == "cpu" else F32


@pytest.mark.parametrize("device", DEVICES)
def test_no_importance_unit_prior_is_gla(device):
    """b = 0, I_p = 1: o and M are gated linear attention's, Ibar stays exactly 0."""
    dtype = _exact_dtype(device)
    q, k, v, b, la, _, _ = make_inputs(3, 131, 2, 31, 65, dtype, device)
    b = torch.zeros_like(b)
    o, (M, ibar) = cram_ext.metaplastic_scan(q, k, v, b, la, torch.ones(2, dtype=dtype, device=device))
    o_gla, S = gla_reference(*(exact(x) for x in (q, k, v, la)))
    tol = metaplastic_tolerance(dtype, 131)
    assert_close_rel(o, o_gla, tol, "o")
    assert_close_rel(M, S, tol, "M")
    assert not ibar.any()


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("device", DEVICES)
def test_no_importance_is_gla_over_prior(device, with_state):
    """b = 0, I_p in 1e-2..1e2 per head: o = GLA / I_p; a state (S_0, Ibar_0 = 0) is GLA's S_0."""
    dtype = _exact_dtype(device)
    q, k, v, b, la, prior, _ = make_inputs(2, 65, 4, 16, 24, dtype, device, prior_range=(1e-2, 1e2))
    b = torch.zeros_like(b)
    S0 = torch.randn(2, 4, 24, 16, dtype=dtype, device=device) if with_state else None
    state = (S0, torch.zeros_like(S0)) if with_state else None
    o, (M, _) = cram_ext.metaplastic_scan(q, k, v, b, la, prior, state, scale=1.0)
    o_gla, S = gla_reference(*(exact(x) for x in (q, k, v, la)), exact(S0), scale=1.0)
    tol = metaplastic_tolerance(dtype, 65)
    assert_close_rel(o, o_gla / exact(prior)[:, None], tol, "o")
    assert_close_rel(M, S, tol, "M")


@pytest.mark.parametrize("device", [cuda_only("cuda")])
def test_no_importance_matches_fla_simple_gla(device):
    """b = 0, I_p = 1 against fla's chunk_simple_gla (Triton, tensor cores), the library
    implementation of the same special case, in bf16 (issue 17's device check)."""
    fla = pytest.importorskip("fla.ops.simple_gla", reason="fla-core is not installed (carry its wheel)")
    q, k, v, b, la, _, _ = make_inputs(2, 300, 4, 64, 128, BF16, device)
    o, _ = cram_ext.metaplastic_scan(q, k, v, torch.zeros_like(b), la, 1.0)
    o_fla, _ = fla.chunk_simple_gla(q.detach(), k.detach(), v.detach(), g=la.detach().float(), scale=64**-0.5,
                                    initial_state=None, output_final_state=False)
    assert_close_rel(o, o_fla, 1e-2, "o against fla chunk_simple_gla")


@pytest.mark.parametrize("split", [1, 50, 64])
@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_carried_state(device, dtype, split):
    """Two calls with the state carried from the first equal one call, forward and backward
    (the gradient reaches the first call through the second's grad M0, grad Ibar0). On the
    CPU the forward is the same loop either way: bitwise equal."""
    q, k, v, b, la, prior, state = make_inputs(2, 131, 2, 31, 65, dtype, device, with_state=True)
    leaves = op_leaves(q, k, v, b, la, prior, state)
    o, (M, ibar) = cram_ext.metaplastic_scan(q, k, v, b, la, prior, state)
    grad_o = torch.randn_like(o)
    loss = (o.float() * grad_o).sum() + M.sum() + (ibar * ibar).sum()
    grads = torch.autograd.grad(loss, leaves)

    first, second = slice(0, split), slice(split, None)
    o1, mid = cram_ext.metaplastic_scan(q[:, first], k[:, first], v[:, first], b[:, first], la[:, first], prior, state)
    o2, (M2, ibar2) = cram_ext.metaplastic_scan(q[:, second], k[:, second], v[:, second], b[:, second], la[:, second],
                                                prior, mid)
    o12 = torch.cat([o1, o2], 1)
    loss12 = (o12.float() * grad_o).sum() + M2.sum() + (ibar2 * ibar2).sum()
    grads12 = torch.autograd.grad(loss12, leaves)
    if device == "cpu":
        assert torch.equal(o12, o) and torch.equal(M2, M) and torch.equal(ibar2, ibar)
    tol = metaplastic_tolerance(dtype, 131)
    assert_close_rel(o12, o, tol, "o")
    assert_close_rel(M2, M, metaplastic_tolerance(reference_dtype(dtype), 131), "M")
    for name, g, g_ref in zip(NAMES, grads12, grads):
        assert_close_rel(g, g_ref, max(tol, METAPLASTIC_GRAD_TOLERANCE[dtype]), f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_reset(device):
    """log_alpha = -inf is an exact reset: what follows equals a fresh run from no state, the
    initial state's gradient is exactly 0 where the first token resets, and log_alpha's gradient
    is finite, exactly 0 at the resets."""
    dtype = _exact_dtype(device)
    q, k, v, b, la, prior, state = make_inputs(2, 40, 2, 8, 6, dtype, device, with_state=True)
    la = la.detach().clone()
    la[0, 0] = float("-inf")  # batch row 0, both heads: forget the initial state
    la[:, 17] = float("-inf")
    la.requires_grad_()
    (o, _, _), grads = check_against_reference(q, k, v, b, la, prior, state)
    after, _ = cram_ext.metaplastic_scan(q[:, 17:], k[:, 17:], v[:, 17:], b[:, 17:], la[:, 17:], prior)
    if device == "cpu":
        assert torch.equal(o[:, 17:], after)
    assert_close_rel(o[:, 17:], after, metaplastic_tolerance(dtype, 40), "after the reset")
    g_la, g_M0, g_I0 = grads[4], grads[6], grads[7]
    assert torch.isfinite(g_la).all()
    assert (g_la[:, 17] == 0).all() and (g_la[0, 0] == 0).all()
    assert not g_M0[0].any() and not g_I0[0].any()
    assert g_M0[1].any() and g_I0[1].any()


# ------------------------------------------------------------------ decoding


@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_step_equals_scan(device, dtype):
    """metaplastic_step on one token equals the scan of a one-token sequence, and a run of steps
    equals the scan of the sequence; the state is updated in place. On the CPU, bitwise."""
    B, T, H, dk, dv = 3, 9, 2, 31, 65
    q, k, v, b, la, prior, state = make_inputs(B, T, H, dk, dv, dtype, device, with_state=True)
    q, k, v, b, la, prior = (x.detach() for x in (q, k, v, b, la, prior))
    M0, I0 = (s.detach() for s in state)
    o_scan, (M_scan, I_scan) = cram_ext.metaplastic_scan(q, k, v, b, la, prior, (M0, I0))
    M, ibar = M0.clone(), I0.clone()
    ptrs = (M.data_ptr(), ibar.data_ptr())
    outs = []
    for t in range(T):
        o_t = cram_ext.metaplastic_step(q[:, t], k[:, t], v[:, t], b[:, t], la[:, t], prior, (M, ibar))
        assert o_t.shape == (B, H, dv) and o_t.dtype == dtype
        if t == 0:
            o_one, (M_one, I_one) = cram_ext.metaplastic_scan(q[:, :1], k[:, :1], v[:, :1], b[:, :1], la[:, :1],
                                                              prior, (M0, I0))
            if device == "cpu":
                assert torch.equal(o_t, o_one[:, 0]) and torch.equal(M, M_one) and torch.equal(ibar, I_one)
            assert_close_rel(o_t, o_one[:, 0], metaplastic_tolerance(dtype, 1), "one step o")
            assert_close_rel(M, M_one, metaplastic_tolerance(F32, 1), "one step M")
        outs.append(o_t)
    assert (M.data_ptr(), ibar.data_ptr()) == ptrs, "the state was not updated in place"
    o_steps = torch.stack(outs, 1)
    if device == "cpu":
        assert torch.equal(o_steps, o_scan) and torch.equal(M, M_scan) and torch.equal(ibar, I_scan)
    tol = metaplastic_tolerance(dtype, T)
    assert_close_rel(o_steps, o_scan, tol, "o")
    assert_close_rel(M, M_scan, metaplastic_tolerance(reference_dtype(dtype), T), "M")
    assert_close_rel(ibar, I_scan, metaplastic_tolerance(reference_dtype(dtype), T), "Ibar")


@pytest.mark.parametrize("device", DEVICES)
def test_step_matches_reference(device):
    """A step with a float prior and a reset, against the loop on a one-token sequence."""
    dtype = _exact_dtype(device)
    q, k, v, b, la, _, state = make_inputs(4, 1, 3, 7, 5, dtype, device, with_state=True)
    q, k, v, b, la = (x.detach()[:, 0] for x in (q, k, v, b, la))
    la[1, 2] = float("-inf")
    M, ibar = (s.detach().clone() for s in state)
    o = cram_ext.metaplastic_step(q, k, v, b, la, 0.75, (M, ibar), scale=0.6)
    o_r, (M_r, I_r) = metaplastic_scan_reference(*(exact(x).detach().unsqueeze(1) for x in (q, k, v, b, la)), 0.75,
                                                 tuple(exact(s).detach() for s in state), scale=0.6)
    tol = metaplastic_tolerance(dtype, 1)
    assert_close_rel(o, o_r[:, 0], tol, "o")
    assert_close_rel(M, M_r, tol, "M")
    assert_close_rel(ibar, I_r, tol, "Ibar")


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_empty_sequence(device, dtype):
    """T = 0: o is empty, the final state equals the initial one (a new tensor; zeros without
    one), and the state's gradients pass the incoming ones through; d prior = 0."""
    q, k, v, b, la, prior, state = make_inputs(2, 0, 3, 5, 4, dtype, device, with_state=True)
    o, (M, ibar) = cram_ext.metaplastic_scan(q, k, v, b, la, prior, state)
    assert o.shape == (2, 0, 3, 4) and o.dtype == dtype
    assert torch.equal(M, state[0]) and torch.equal(ibar, state[1])
    assert M.data_ptr() != state[0].data_ptr()
    grad_M, grad_I = torch.randn_like(M), torch.randn_like(ibar)
    grads = torch.autograd.grad((o, M, ibar), op_leaves(q, k, v, b, la, prior, state),
                                (torch.zeros_like(o), grad_M, grad_I))
    assert torch.equal(grads[6], grad_M) and torch.equal(grads[7], grad_I)
    assert not grads[5].any() and grads[0].shape == q.shape and grads[4].shape == la.shape
    _, (M, ibar) = cram_ext.metaplastic_scan(q, k, v, b, la, prior)
    assert M.shape == (2, 3, 4, 5) and not M.any() and not ibar.any()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    q, k, v, b, la, prior, state = make_inputs(0, 7, 3, 5, 4, F32, device, with_state=True)
    o, (M, ibar) = cram_ext.metaplastic_scan(q, k, v, b, la, prior, state)
    assert o.shape == (0, 7, 3, 4) and M.shape == (0, 3, 4, 5)
    grads = torch.autograd.grad((o.sum() + M.sum() + ibar.sum()), op_leaves(q, k, v, b, la, prior, state))
    assert grads[5].shape == (3,) and not grads[5].any()  # d prior sums over no batch rows
    for g, x in zip(grads, op_leaves(q, k, v, b, la, prior, state)):
        assert g.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_every_output_written(device):
    """Under deterministic mode torch fills new tensors with NaN: every element of every
    output (o, the state, all gradients) must be overwritten, at T = 0 and 1, B = 1 and sizes
    off the kernels' blocks."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        for B, T, with_state in ((1, 0, False), (2, 1, False), (3, 67, True), (1, 130, False)):
            q, k, v, b, la, prior, state = make_inputs(B, T, 3, 9, 7, F32, device, with_state=with_state)
            probe = torch.empty(3, device=device)
            assert probe.isnan().all(), "deterministic mode does not poison new tensors here"
            o, (M, ibar) = cram_ext.metaplastic_scan(q, k, v, b, la, prior, state)
            leaves = op_leaves(q, k, v, b, la, prior, state)
            grads = torch.autograd.grad((o, M, ibar), leaves, (torch.randn_like(o), torch.randn_like(M),
                                                               torch.randn_like(ibar)))
            for name, x in zip(["o", "M", "Ibar"] + [f"grad {n}" for n in NAMES], [o, M, ibar, *grads]):
                assert torch.isfinite(x).all(), f"{name} (B={B}, T={T}) holds unwritten memory"
            M_s, I_s = (torch.randn(B, 3, 7, 9, device=device) for _ in range(2))
            o_t = cram_ext.metaplastic_step(q.detach()[:, 0] if T else q.new_zeros(B, 3, 9),
                                            k.detach()[:, 0] if T else q.new_zeros(B, 3, 9),
                                            v.detach()[:, 0] if T else q.new_zeros(B, 3, 7),
                                            b.detach()[:, 0] if T else q.new_zeros(B, 3, 7),
                                            la.detach()[:, 0] if T else q.new_zeros(B, 3), prior.detach(), (M_s, I_s))
            assert torch.isfinite(o_t).all(), "step o holds unwritten memory"
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]


@pytest.mark.parametrize("device", DEVICES)
def test_prior_forms(device):
    """The prior as a number, a 0-d tensor and an (H,) tensor (any float dtype) give the same
    result; a 0-d prior's gradient is the sum of the per-head ones, in its dtype."""
    q, k, v, b, la, _, state = make_inputs(2, 20, 3, 6, 5, F32, device, with_state=True)
    args = [x.detach() for x in (q, k, v, b, la)]
    state = tuple(s.detach() for s in state)
    o_num, _ = cram_ext.metaplastic_scan(*args, 0.7, state)
    heads = torch.full((3,), 0.7, dtype=F64, device=device, requires_grad=True)
    scalar = torch.tensor(0.7, dtype=F32, device=device, requires_grad=True)
    o_heads, _ = cram_ext.metaplastic_scan(*args, heads, state)
    o_scalar, _ = cram_ext.metaplastic_scan(*args, scalar, state)
    assert torch.equal(o_num, o_heads) and torch.equal(o_num, o_scalar)
    g = torch.randn_like(o_num)
    (g_heads,) = torch.autograd.grad(o_heads, heads, g)
    (g_scalar,) = torch.autograd.grad(o_scalar, scalar, g)
    assert g_heads.dtype == F64 and g_scalar.dtype == F32 and g_scalar.shape == ()
    torch.testing.assert_close(g_scalar.double(), g_heads.sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_default_scale(device):
    q, k, v, b, la, prior, _ = make_inputs(2, 9, 2, 13, 4, F32, device)
    args = [x.detach() for x in (q, k, v, b, la, prior)]
    assert torch.equal(cram_ext.metaplastic_scan(*args)[0], cram_ext.metaplastic_scan(*args, scale=13**-0.5)[0])
    o2, _ = cram_ext.metaplastic_scan(*args, scale=2 * 13**-0.5)
    assert_close_rel(o2, 2 * cram_ext.metaplastic_scan(*args)[0], 1e-6, "scale")


@pytest.mark.parametrize("use", ["o", "state"])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_through_one_output(device, use):
    """A loss on o only, or on the final state only (the other outputs' gradients absent)."""
    dtype = _exact_dtype(device)
    q, k, v, b, la, prior, state = make_inputs(2, 33, 2, 7, 5, dtype, device, with_state=True)
    leaves = op_leaves(q, k, v, b, la, prior, state)
    ref_leaves = [exact(x) for x in leaves]

    def loss(scan, ls):
        o, (M, ibar) = scan(*ls[:6], tuple(ls[6:]))
        return (o.double() ** 2).sum() if use == "o" else (M.double() ** 2).sum() + ibar.double().sum()

    grads = torch.autograd.grad(loss(cram_ext.metaplastic_scan, leaves), leaves)
    # The final state does not depend on q: the loop's gradient of it is None, the op's zeros.
    ref_grads = torch.autograd.grad(loss(metaplastic_scan_reference, ref_leaves), ref_leaves, allow_unused=True)
    tol = max(metaplastic_tolerance(dtype, 33), METAPLASTIC_GRAD_TOLERANCE[dtype])
    for name, g, g_r in zip(NAMES, grads, ref_grads):
        if g_r is None:
            assert not g.any(), f"grad {name}"
        else:
            assert_close_rel(g, g_r, tol, f"grad {name}", floor=1e-12)


@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_noncontiguous_inputs(device, dtype):
    """Views with other strides (q, k, v, b stored as (B, H, T, d), log_alpha as (B, H, T), the
    state transposed) give the same result as contiguous copies, and the right gradients."""
    B, T, H, dk, dv = 2, 19, 3, 10, 7
    q, k, v, b, la, prior, state = make_inputs(B, T, H, dk, dv, dtype, device, with_state=True)

    def restride(x, perm):  # the same values, stored in another order
        inverse = [perm.index(i) for i in range(len(perm))]
        return x.detach().permute(perm).contiguous().permute(inverse).requires_grad_()

    q, k, v, b = (restride(x, (0, 2, 1, 3)) for x in (q, k, v, b))
    la = restride(la, (0, 2, 1))
    state = tuple(restride(s, (0, 1, 3, 2)) for s in state)
    prior = torch.stack([prior.detach(), prior.detach()], 1)[:, 0].requires_grad_()  # stride 2
    assert not (q.is_contiguous() or la.is_contiguous() or state[0].is_contiguous() or prior.is_contiguous())
    out = cram_ext.metaplastic_scan(q, k, v, b, la, prior, state)
    out_c = cram_ext.metaplastic_scan(*(x.contiguous() for x in (q, k, v, b, la, prior)),
                                      tuple(s.contiguous() for s in state))
    assert torch.equal(out[0], out_c[0]) and torch.equal(out[1][0], out_c[1][0]) and torch.equal(out[1][1], out_c[1][1])
    check_against_reference(q, k, v, b, la, prior, state)


@pytest.mark.parametrize("device", DEVICES)
def test_inference_mode(device):
    q, k, v, b, la, prior, state = make_inputs(2, 9, 2, 13, 4, F32, device, with_state=True)
    args = [x.detach() for x in (q, k, v, b, la, prior)]
    state = tuple(s.detach() for s in state)
    expected = cram_ext.metaplastic_scan(*args, state)
    with torch.inference_mode():
        got = cram_ext.metaplastic_scan(*args, state)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1][0], expected[1][0])


def test_thread_count_does_not_change_results():
    """Lanes are independent and d prior is summed over batch rows in a fixed order: one thread
    and two give bitwise the same outputs and gradients."""
    q, k, v, b, la, prior, state = make_inputs(3, 70, 5, 9, 6, F32, "cpu", with_state=True)
    leaves = op_leaves(q, k, v, b, la, prior, state)
    saved = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            o, (M, ibar) = cram_ext.metaplastic_scan(q, k, v, b, la, prior, state)
            grads = torch.autograd.grad((o.sum() + (M * M).sum() + ibar.sum()), leaves)
            results.append((o, M, ibar, *grads))
    finally:
        torch.set_num_threads(saved)
    for x, y in zip(*results):
        assert torch.equal(x, y)


# ------------------------------------------------------------------ torch integration


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dtype = F32 if device == "cpu" else BF16
    B, T, H, dk, dv = 2, 9, 3, 7, 5
    q, k, v, b, la, prior, state = make_inputs(B, T, H, dk, dv, dtype, device, with_state=True)
    M0, I0 = state
    scan = torch.ops.cram.metaplastic_scan.default
    torch.library.opcheck(scan, (q, k, v, b, la, prior, M0, I0, 0.5))
    torch.library.opcheck(scan, (q, k, v, b, la, prior, None, None, 0.5))
    torch.library.opcheck(scan, (q, k, v, b, la, prior, M0, None, 0.5))
    # strided inputs
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    torch.library.opcheck(scan, (qt, k, v, b, la, prior, M0, I0, 0.5))
    with torch.no_grad():
        o, M, ibar = scan(q, k, v, b, la, prior, M0, I0, 0.5)
    grad_o, grad_M, grad_I = torch.randn_like(o), torch.randn_like(M), torch.randn_like(ibar)
    detached = [x.detach() for x in (q, k, v, b, la, prior)]
    for initial in ((M0.detach(), I0.detach()), (None, None)):
        torch.library.opcheck(torch.ops.cram.metaplastic_scan_backward.default,
                              (grad_o, grad_M, grad_I, *detached, *initial, 0.5))
    step_args = [x.detach()[:, 0] for x in (q, k, v, b, la)]
    torch.library.opcheck(torch.ops.cram.metaplastic_step.default,
                          (*step_args, prior.detach(), M0.detach().clone(), I0.detach().clone(), 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    """torch.compile(fullgraph=True) of a function around metaplastic_scan and its backward, and
    of a decoding step (the in-place state update), matches eager: no graph breaks, no host sync."""
    dtype = F32 if device == "cpu" else BF16

    def layer(q, k, v, b, la, prior, M0, I0):
        o, (M, ibar) = cram_ext.metaplastic_scan(torch.tanh(q), k, v, F.softplus(b), -F.softplus(la), prior,
                                                 (M0, I0))
        return (o.float() ** 2).mean() + M.square().mean() + ibar.mean()

    def decode(q, k, v, b, la, prior, M, ibar):
        return cram_ext.metaplastic_step(q, k, v, b, la, prior, (M, ibar)) * 2

    torch._dynamo.reset()
    q, k, v, b, la, prior, state = make_inputs(2, 17, 3, 6, 5, dtype, device, with_state=True)
    leaves = op_leaves(q, k, v, b, la, prior, state)
    compiled = torch.compile(layer, fullgraph=True)
    loss_c = compiled(*leaves)
    grads_c = torch.autograd.grad(loss_c, leaves)
    loss_e = layer(*leaves)
    grads_e = torch.autograd.grad(loss_e, leaves)
    tol = 1e-5 if dtype == F32 else 1e-2
    assert_close_rel(loss_c, loss_e, tol, "loss")
    for name, g, g_e in zip(NAMES, grads_c, grads_e):
        assert_close_rel(g, g_e, tol, f"grad {name}")

    step_args = [x.detach()[:, 0] for x in (q, k, v, b, la)] + [prior.detach()]
    M_c, I_c = (s.detach().clone() for s in state)
    M_e, I_e = (s.detach().clone() for s in state)
    o_c = torch.compile(decode, fullgraph=True)(*step_args, M_c, I_c)
    o_e = decode(*step_args, M_e, I_e)
    assert torch.equal(o_c, o_e) and torch.equal(M_c, M_e) and torch.equal(I_c, I_e)
    torch._dynamo.reset()


# ------------------------------------------------------------------ bad input

B_, T_, H_, DK, DV = 2, 5, 3, 4, 6


def _scan_args(dev, dtype=F32, **over):
    acc = reference_dtype(dtype)
    args = dict(
        q=torch.randn(B_, T_, H_, DK, device=dev, dtype=dtype), k=torch.randn(B_, T_, H_, DK, device=dev, dtype=dtype),
        v=torch.randn(B_, T_, H_, DV, device=dev, dtype=dtype), b=torch.rand(B_, T_, H_, DV, device=dev, dtype=dtype),
        log_alpha=-torch.rand(B_, T_, H_, device=dev, dtype=dtype), prior=torch.ones(H_, device=dev, dtype=acc),
        state=(torch.randn(B_, H_, DV, DK, device=dev, dtype=acc), torch.rand(B_, H_, DV, DK, device=dev, dtype=acc)))
    args.update(over)
    return cram_ext.metaplastic_scan, tuple(args.values())


def _scan(**over):
    return lambda dev: _scan_args(dev, **over)


def _state(dev, M=None, Ibar=None, dtype=F32):
    return (torch.randn(B_, H_, DV, DK, device=dev, dtype=dtype) if M is None else M,
            torch.rand(B_, H_, DV, DK, device=dev, dtype=dtype) if Ibar is None else Ibar)


def _step(dev, dtype=F32, **over):
    acc = reference_dtype(dtype)
    args = dict(q=torch.randn(B_, H_, DK, device=dev, dtype=dtype), k=torch.randn(B_, H_, DK, device=dev, dtype=dtype),
                v=torch.randn(B_, H_, DV, device=dev, dtype=dtype), b=torch.rand(B_, H_, DV, device=dev, dtype=dtype),
                log_alpha=-torch.rand(B_, H_, device=dev, dtype=dtype), prior=torch.ones(H_, device=dev, dtype=acc),
                state=_state(dev, dtype=acc))
    args.update(over)
    return cram_ext.metaplastic_step, tuple(args.values())


def _backward(dev, **over):
    _, (q, k, v, b, la, prior, (M0, I0)) = _scan_args(dev)
    args = dict(grad_o=torch.randn_like(v), grad_M=torch.randn_like(M0), grad_Ibar=torch.randn_like(I0), q=q, k=k,
                v=v, b=b, log_alpha=la, prior=prior, M0=M0, Ibar0=I0, scale=0.5)
    args.update(over)
    return torch.ops.cram.metaplastic_scan_backward.default, tuple(args.values())


def _r(*shape, dev, dtype=F32):
    return torch.randn(*shape, device=dev, dtype=dtype)


# (id, build(device) -> (op, args), exception type, message fragment)
BAD = [
    ("q-rank", lambda d: _scan_args(d, q=_r(B_, T_, H_ * DK, dev=d)), ValueError, r"q: expected a 4-d tensor"),
    ("q-int", lambda d: _scan_args(d, q=torch.ones(B_, T_, H_, DK, device=d, dtype=torch.int32)), TypeError,
     r"q: expected dtype in"),
    ("k-dtype", lambda d: _scan_args(d, k=_r(B_, T_, H_, DK, dev=d, dtype=BF16)), TypeError,
     r"k: expected the dtype of q"),
    ("v-dtype", lambda d: _scan_args(d, v=_r(B_, T_, H_, DV, dev=d, dtype=F64)), TypeError,
     r"v: expected the dtype of q"),
    ("b-dtype", lambda d: _scan_args(d, b=_r(B_, T_, H_, DV, dev=d, dtype=F16)), TypeError,
     r"b: expected the dtype of q"),
    ("k-shape", lambda d: _scan_args(d, k=_r(B_, T_, H_, DK + 1, dev=d)), ValueError, r"k: expected shape"),
    ("v-rank", lambda d: _scan_args(d, v=_r(B_, T_, H_ * DV, dev=d)), ValueError, r"v: expected a 4-d tensor"),
    ("v-shape", lambda d: _scan_args(d, v=_r(B_, T_ + 1, H_, DV, dev=d)), ValueError, r"v: expected shape"),
    ("b-shape", lambda d: _scan_args(d, b=_r(B_, T_, H_, DV - 1, dev=d)), ValueError, r"b: expected shape"),
    ("log_alpha-shape", lambda d: _scan_args(d, log_alpha=_r(B_, T_, H_, 1, dev=d)), ValueError,
     r"log_alpha: expected shape"),
    ("log_alpha-int", lambda d: _scan_args(d, log_alpha=torch.zeros(B_, T_, H_, device=d, dtype=torch.int64)),
     TypeError, r"log_alpha: expected dtype in"),
    ("prior-shape", lambda d: _scan_args(d, prior=torch.ones(H_ + 1, device=d)), ValueError, r"prior: expected shape"),
    ("prior-rank", lambda d: _scan_args(d, prior=torch.ones(1, H_, device=d)), ValueError, r"prior: expected shape"),
    ("prior-int", lambda d: _scan_args(d, prior=torch.ones(H_, device=d, dtype=torch.int32)), TypeError,
     r"prior: expected dtype in"),
    ("M0-shape", lambda d: _scan_args(d, state=_state(d, M=_r(B_, H_, DK, DV, dev=d))), ValueError,
     r"M0: expected shape"),
    ("Ibar0-shape", lambda d: _scan_args(d, state=_state(d, Ibar=_r(B_, H_, DV, DK, 1, dev=d))), ValueError,
     r"Ibar0: expected shape"),
    ("M0-dtype", lambda d: _scan_args(d, state=_state(d, M=_r(B_, H_, DV, DK, dev=d, dtype=F64))), TypeError,
     r"M0: expected dtype in"),
    ("Ibar0-dtype", lambda d: _scan_args(d, state=_state(d, Ibar=_r(B_, H_, DV, DK, dev=d, dtype=F16))), TypeError,
     r"Ibar0: expected dtype in"),
    ("state-bf16", lambda d: _scan_args(d, dtype=BF16, state=_state(d, dtype=BF16)), TypeError,
     r"M0: expected dtype in \{Float\}"),
    ("state-f32-for-f64", lambda d: _scan_args(d, dtype=F64, state=_state(d)), TypeError,
     r"M0: expected dtype in \{Double\}"),
    ("dk-0", lambda d: _scan_args(d, q=_r(B_, T_, H_, 0, dev=d), k=_r(B_, T_, H_, 0, dev=d),
                                   state=_state(d, M=_r(B_, H_, DV, 0, dev=d), Ibar=_r(B_, H_, DV, 0, dev=d))),
     ValueError, r"expected head dims d_k, d_v >= 1"),
    ("log_alpha-on-meta", lambda d: _scan_args(d, log_alpha=_r(B_, T_, H_, dev="meta")), ValueError,
     r"log_alpha: expected a tensor on .* like q, got one on meta"),
    ("step-q-rank", lambda d: _step(d, q=_r(B_, 1, H_, DK, dev=d)), ValueError, r"q: expected a 3-d tensor"),
    ("step-v-shape", lambda d: _step(d, v=_r(B_, H_ + 1, DV, dev=d)), ValueError, r"v: expected shape"),
    ("step-b-shape", lambda d: _step(d, b=_r(B_, H_ + 1, DV, dev=d)), ValueError, r"b: expected shape"),
    ("step-log_alpha-shape", lambda d: _step(d, log_alpha=_r(B_, H_, 1, dev=d)), ValueError,
     r"log_alpha: expected shape"),
    ("step-M-dtype", lambda d: _step(d, state=_state(d, M=_r(B_, H_, DV, DK, dev=d, dtype=F16))), TypeError,
     r"M: expected dtype in"),
    ("step-Ibar-shape", lambda d: _step(d, state=_state(d, Ibar=_r(B_, H_, DV, DK + 1, dev=d))), ValueError,
     r"Ibar: expected shape"),
    ("step-M-noncontiguous", lambda d: _step(d, state=_state(d, M=_r(B_, H_, DK, DV, dev=d).transpose(-1, -2))),
     ValueError, r"M, Ibar: the state is updated in place and must be contiguous"),
    ("step-prior-shape", lambda d: _step(d, prior=torch.ones(H_ - 1, device=d)), ValueError, r"prior: expected shape"),
    ("bwd-grad_o-dtype", lambda d: _backward(d, grad_o=_r(B_, T_, H_, DV, dev=d, dtype=BF16)), TypeError,
     r"grad_o: expected the dtype of q"),
    ("bwd-grad_o-shape", lambda d: _backward(d, grad_o=_r(B_, T_, H_, DV + 1, dev=d)), ValueError,
     r"grad_o: expected shape"),
    ("bwd-grad_M-shape", lambda d: _backward(d, grad_M=_r(B_, H_, DV, DK + 1, dev=d)), ValueError,
     r"grad_M: expected shape"),
    ("bwd-grad_Ibar-dtype", lambda d: _backward(d, grad_Ibar=_r(B_, H_, DV, DK, dev=d, dtype=F64)), TypeError,
     r"grad_Ibar: expected dtype in"),
]


@pytest.mark.parametrize("build, exc, match", [pytest.param(*c[1:], id=c[0]) for c in BAD])
@pytest.mark.parametrize("device", DEVICES)
def test_bad_argument(device, build, exc, match):
    if device == "cuda" and "Double" in match:
        pytest.skip("float64 inputs are refused on CUDA before the state is checked (test_bad_argument_cuda)")
    op, args = build(device)
    with pytest.raises(exc, match=match):
        op(*args)


# Cases that only exist on a GPU: mixed devices, the CUDA head-dim limit, float64.
BAD_CUDA = [
    ("log_alpha-on-cpu", lambda: _scan_args("cuda", log_alpha=_r(B_, T_, H_, dev="cpu")), ValueError,
     r"log_alpha: expected a tensor on cuda:0 like q, got one on cpu"),
    ("prior-on-cpu", lambda: _scan_args("cuda", prior=torch.ones(H_)), ValueError, r"prior: expected a tensor on cuda"),
    ("M0-on-cpu", lambda: _scan_args("cuda", state=_state("cpu")), ValueError, r"M0: expected a tensor on cuda"),
    ("step-M-on-cpu", lambda: _step("cuda", state=_state("cpu")), ValueError, r"M: expected a tensor on cuda"),
    ("dk-129", lambda: _scan_args("cuda", q=_r(B_, T_, H_, 129, dev="cuda"), k=_r(B_, T_, H_, 129, dev="cuda"),
                                   state=None), ValueError, r"q: d_k must be at most 128 on CUDA, got 129"),
    ("dv-129", lambda: _scan_args("cuda", v=_r(B_, T_, H_, 129, dev="cuda"), b=_r(B_, T_, H_, 129, dev="cuda"),
                                   state=None), ValueError, r"v: d_v must be at most 128 on CUDA, got 129"),
    ("f64", lambda: _scan_args("cuda", dtype=F64), TypeError, r"q: expected dtype in"),
]


@pytest.mark.parametrize("build, exc, match", [cuda_only(*c[1:], id=c[0]) for c in BAD_CUDA])
def test_bad_argument_cuda(build, exc, match):
    op, args = build()
    with pytest.raises(exc, match=match):
        op(*args)


# ------------------------------------------------------------------ property test


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
@settings(max_examples=40, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_property_matches_reference(device, data):
    """Shapes (small, prime, next to the 64-token chunk; T = 0), dtypes, the prior's forms, resets,
    b = 0, and every argument's and incoming gradient's memory layout (fuzz_space.py, also run at
    scale by test_fuzz.py and cuda_fuzz.py --ops metaplastic): forward and every gradient
    against the float64 loop."""
    case = draw_metaplastic_case(HypothesisDraw(data), device)
    note(str(case))
    check_metaplastic(case, device)
