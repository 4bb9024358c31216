"""The plain-PyTorch metaplastic memory (cram_ext.reference_metaplastic, docs/metaplastic.md).

Checks of the references themselves, which the C++/CUDA kernels will later be held to:
the special cases (b = 0 is gated linear attention divided by I_p), the paper's (mu, I)
form, recurrent = chunked = step-by-step decoding, chunk-size invariance, carried states,
gradients of every input (the chunked form's against the loop's in float64, gradcheck on
the loop), dtypes, resets and T = 0. Inputs are fresh and random in the ranges a trained
layer produces (docs/metaplastic.md §4), never zeros.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCE, assert_close_rel

from cram_ext.reference_metaplastic import (
    MetaplasticState,
    gla_reference,
    metaplastic_scan_chunked,
    metaplastic_scan_reference,
    metaplastic_step,
    state_from_mean_importance,
    state_to_mean_importance,
)

F64 = torch.float64
TOL = TOLERANCE[F64]  # 1e-10: float64 against float64


def make_inputs(B, T, H, dk, dv, dtype=F64, with_state=False, prior_range=(0.5, 2.0)):
    """Realistic inputs (docs/metaplastic.md §4): q, k L2-normalised; v ~ N(0, 1);
    b = sigmoid(.) * softplus(per-head scale) in (0, ~2); log_alpha = -A * dt with A in
    [1, 16] per head and dt log-uniform in [1e-3, 1e-1] (horizons from ~1 to ~1000 tokens);
    I_p log-uniform in prior_range per head; a state with M ~ N(0, 1), Ibar in [0, 3]."""
    q = F.normalize(torch.randn(B, T, H, dk, dtype=F64), dim=-1)
    k = F.normalize(torch.randn(B, T, H, dk, dtype=F64), dim=-1)
    v = torch.randn(B, T, H, dv, dtype=F64)
    b = torch.sigmoid(torch.randn(B, T, H, dv, dtype=F64)) * F.softplus(torch.randn(H, 1, dtype=F64))
    A = torch.empty(H, dtype=F64).uniform_(1.0, 16.0)
    dt = torch.empty(B, T, H, dtype=F64).uniform_(math.log(1e-3), math.log(1e-1)).exp()
    log_alpha = -A * dt
    lo, hi = prior_range
    prior = torch.empty(H, dtype=F64).uniform_(math.log(lo), math.log(hi)).exp()
    state = None
    if with_state:
        state = MetaplasticState(torch.randn(B, H, dv, dk, dtype=F64), 3 * torch.rand(B, H, dv, dk, dtype=F64))
    cast = [x.to(dtype) for x in (q, k, v, b, log_alpha)]
    return (*cast, prior, state)


def assert_same_scan(got, ref, tol, what=""):
    """(o, (M, Ibar)) against (o, (M, Ibar))."""
    (o, (M, ibar)), (o_ref, (M_ref, ibar_ref)) = got, ref
    assert o.dtype == o_ref.dtype and M.dtype == M_ref.dtype and ibar.dtype == ibar_ref.dtype
    assert_close_rel(o, o_ref, tol, f"{what} o")
    assert_close_rel(M, M_ref, tol, f"{what} M")
    assert_close_rel(ibar, ibar_ref, tol, f"{what} Ibar", floor=1e-12)


def paper_form(q, k, v, b, log_alpha, prior, mu0=None, I0=None, scale=None):
    """The paper's recurrence in (mean, importance), PALIMPSA.md §1, written independently:
    I_t = a I_{t-1} + (1 - a) I_p + b (k*k)^T;  mu_t = a (I_{t-1} / I_t) mu_{t-1} + (v k^T) / I_t;
    o_t = scale * mu_t q_t. float64 only; returns o (B, T, H, d_v), mu_T, I_T."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    Ip = prior.view(1, H, 1, 1)
    mu = torch.zeros(B, H, dv, dk, dtype=F64) if mu0 is None else mu0
    I = Ip.expand(B, H, dv, dk) if I0 is None else I0
    outs = []
    for t in range(T):
        a = log_alpha[:, t].exp()[:, :, None, None]
        kt, vt, bt, qt = k[:, t], v[:, t], b[:, t], q[:, t]
        I_new = a * I + (1 - a) * Ip + bt[..., :, None] * (kt * kt)[..., None, :]
        mu = a * (I / I_new) * mu + (vt[..., :, None] * kt[..., None, :]) / I_new
        I = I_new
        outs.append(scale * (mu * qt[..., None, :]).sum(-1))
    return torch.stack(outs, 1), mu, I


def decode(q, k, v, b, log_alpha, prior, state):
    """metaplastic_step token by token: (o, final state)."""
    outs = []
    for t in range(q.shape[1]):
        o_t, state = metaplastic_step(q[:, t], k[:, t], v[:, t], b[:, t], log_alpha[:, t], prior, state)
        outs.append(o_t)
    return torch.stack(outs, 1), state


# ---------------------------------------------------------------- special cases


@pytest.mark.parametrize("scan", [metaplastic_scan_reference, metaplastic_scan_chunked], ids=["recurrent", "chunked"])
def test_no_importance_unit_prior_is_gla(scan):
    """b = 0, I_p = 1: the output and M are gated linear attention's, Ibar stays 0."""
    q, k, v, b, la, _, _ = make_inputs(3, 131, 2, 31, 65)
    b = torch.zeros_like(b)
    o, (M, ibar) = scan(q, k, v, b, la, torch.ones(2, dtype=F64))
    o_gla, S = gla_reference(q, k, v, la)
    assert_close_rel(o, o_gla, TOL, "o")
    assert_close_rel(M, S, TOL, "M")
    assert torch.equal(ibar, torch.zeros_like(ibar))


@pytest.mark.parametrize("scan", [metaplastic_scan_reference, metaplastic_scan_chunked], ids=["recurrent", "chunked"])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
def test_no_importance_is_gla_over_prior(scan, with_state):
    """b = 0, any I_p (here 1e-2..1e2 per head): output = GLA / I_p; an initial state
    (M_0 = S_0, Ibar_0 = 0) is GLA's initial state."""
    q, k, v, b, la, prior, _ = make_inputs(2, 65, 4, 16, 24, prior_range=(1e-2, 1e2))
    b = torch.zeros_like(b)
    S0 = torch.randn(2, 4, 24, 16, dtype=F64) if with_state else None
    state = MetaplasticState(S0, torch.zeros_like(S0)) if with_state else None
    o, (M, _) = scan(q, k, v, b, la, prior, state, scale=1.0)
    o_gla, S = gla_reference(q, k, v, la, S0, scale=1.0)
    assert_close_rel(o, o_gla / prior[:, None], TOL, "o")
    assert_close_rel(M, S, TOL, "M")


def test_strong_prior_is_mamba2():
    """I_p >> N / d_k (PALIMPSA.md §2): the importance barely moves off I_p, so the output
    tends to GLA / I_p with b present, to relative order b * horizon / (d_k * I_p)."""
    q, k, v, b, la, _, _ = make_inputs(2, 64, 2, 16, 16)
    prior = torch.full((2,), 1e6, dtype=F64)
    o, _ = metaplastic_scan_chunked(q, k, v, b, la, prior)
    o_gla, _ = gla_reference(q, k, v, la)
    assert_close_rel(o * prior[:, None], o_gla, 1e-4, "o * I_p")
    # and the correction is real: it is not exactly GLA
    assert (o * prior[:, None] - o_gla).abs().max() > 0


def test_paper_form():
    """The scanned (M, Ibar) form equals the paper's (mu, I) recurrence, from a (mu_0, I_0)
    state through state_from_mean_importance, and the final state converts back."""
    q, k, v, b, la, prior, _ = make_inputs(2, 65, 3, 31, 65)
    mu0 = torch.randn(2, 3, 65, 31, dtype=F64)
    I0 = prior.view(3, 1, 1) * torch.empty(2, 3, 65, 31, dtype=F64).uniform_(0.3, 4.0)  # some below I_p
    o_p, mu_p, I_p = paper_form(q, k, v, b, la, prior, mu0, I0)
    state = state_from_mean_importance(mu0, I0, prior)
    for scan in (metaplastic_scan_reference, metaplastic_scan_chunked):
        o, final = scan(q, k, v, b, la, prior, state)
        mu, I = state_to_mean_importance(final, prior)
        assert_close_rel(o, o_p, TOL, f"{scan.__name__} o")
        assert_close_rel(mu, mu_p, TOL, f"{scan.__name__} mu")
        assert_close_rel(I, I_p, TOL, f"{scan.__name__} I")
    # no state is mu_0 = 0, I_0 = I_p
    o_p, _, _ = paper_form(q, k, v, b, la, prior)
    assert_close_rel(metaplastic_scan_reference(q, k, v, b, la, prior)[0], o_p, TOL, "fresh o")


# ---------------------------------------------------------------- forms agree


SIZES = [  # B, T, H, d_k, d_v
    (2, 1, 2, 31, 65),
    (3, 7, 3, 31, 65),
    (4, 64, 2, 16, 8),
    (2, 65, 4, 31, 65),
    (3, 131, 2, 8, 33),
]


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}-T{}-H{}-dk{}-dv{}".format(*s))
def test_recurrent_chunked_decode_agree(size, with_state):
    q, k, v, b, la, prior, state = make_inputs(*size, with_state=with_state)
    ref = metaplastic_scan_reference(q, k, v, b, la, prior, state)
    assert ref[0].shape == v.shape
    assert_same_scan(metaplastic_scan_chunked(q, k, v, b, la, prior, state), ref, TOL, "chunked")
    assert_same_scan(decode(q, k, v, b, la, prior, state), ref, TOL, "decode")


def test_chunk_size_invariance():
    q, k, v, b, la, prior, state = make_inputs(2, 131, 3, 31, 65, with_state=True)
    ref = metaplastic_scan_reference(q, k, v, b, la, prior, state)
    for C in (1, 16, 64, 100, 131, 256):
        assert_same_scan(metaplastic_scan_chunked(q, k, v, b, la, prior, state, chunk_size=C), ref, TOL, f"C={C}")


@pytest.mark.parametrize("split", [1, 50, 64])
def test_carried_state(split):
    """Two runs with the state carried from the first equal one run, in every form."""
    q, k, v, b, la, prior, state = make_inputs(2, 131, 2, 31, 65, with_state=True)
    ref = metaplastic_scan_reference(q, k, v, b, la, prior, state)
    first, second = (slice(0, split), slice(split, None))
    for scan in (metaplastic_scan_reference, lambda *a: metaplastic_scan_chunked(*a, chunk_size=16), decode):
        o1, mid = scan(q[:, first], k[:, first], v[:, first], b[:, first], la[:, first], prior, state)
        o2, final = scan(q[:, second], k[:, second], v[:, second], b[:, second], la[:, second], prior, mid)
        assert_same_scan((torch.cat([o1, o2], 1), final), ref, TOL)


def test_empty_sequence():
    """T = 0: no output, the state passes through (zeros without one)."""
    q, k, v, b, la, prior, state = make_inputs(2, 0, 2, 5, 3, with_state=True)
    for scan in (metaplastic_scan_reference, metaplastic_scan_chunked):
        o, final = scan(q, k, v, b, la, prior, state)
        assert o.shape == (2, 0, 2, 3)
        assert torch.equal(final.M, state.M) and torch.equal(final.Ibar, state.Ibar)
        _, final = scan(q, k, v, b, la, prior)
        assert final.M.shape == (2, 2, 3, 5) and not final.M.any() and not final.Ibar.any()


def test_reset():
    """log_alpha = -inf is an exact reset in every form: the state before it is forgotten,
    and its gradient is finite (0 at the reset)."""
    q, k, v, b, la, prior, state = make_inputs(2, 40, 2, 8, 6, with_state=True)
    la = la.clone()
    la[0, 0] = float("-inf")
    la[:, 17] = float("-inf")
    la.requires_grad_(True)
    ref = metaplastic_scan_reference(q, k, v, b, la, prior, state)
    assert_same_scan(metaplastic_scan_chunked(q, k, v, b, la, prior, state, chunk_size=16), ref, TOL)
    assert_same_scan(decode(q, k, v, b, la, prior, state), ref, TOL, "decode")
    after = metaplastic_scan_reference(q[:, 17:], k[:, 17:], v[:, 17:], b[:, 17:], la[:, 17:], prior)
    assert_close_rel(ref[0][:, 17:], after[0], TOL, "after the reset")
    for scan in (metaplastic_scan_reference, lambda *a: metaplastic_scan_chunked(*a, chunk_size=16)):
        (g,) = torch.autograd.grad(scan(q, k, v, b, la, prior, state)[0].square().sum(), la)
        assert torch.isfinite(g).all() and (g[:, 17] == 0).all() and (g[0, 0] == 0).all()


# ---------------------------------------------------------------- gradients


def test_gradients_chunked_match_recurrent():
    """Every input's gradient (q, k, v, b, log_alpha, prior, M_0, Ibar_0), from a loss on the
    output and on the final state, in float64."""
    q, k, v, b, la, prior, state = make_inputs(2, 65, 3, 31, 65, with_state=True)
    inputs = [x.requires_grad_(True) for x in (q, k, v, b, la, prior, *state)]
    names = ["q", "k", "v", "b", "log_alpha", "prior", "M0", "Ibar0"]
    w_o = torch.randn(2, 65, 3, 65, dtype=F64)
    w_M, w_I = torch.randn(2, 3, 65, 31, dtype=F64), torch.randn(2, 3, 65, 31, dtype=F64)

    def grads(scan):
        q, k, v, b, la, prior, M0, I0 = inputs
        o, (M, ibar) = scan(q, k, v, b, la, prior, (M0, I0))
        loss = (o * w_o).sum() + (M * w_M).sum() + (ibar * w_I).sum()
        return torch.autograd.grad(loss, inputs)

    ref = grads(metaplastic_scan_reference)
    for C in (16, 64):
        got = grads(lambda *a: metaplastic_scan_chunked(*a, chunk_size=C))
        for name, g, g_ref in zip(names, got, ref):
            assert_close_rel(g, g_ref, TOL, f"C={C} d{name}")


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_gradcheck(form):
    q, k, v, b, la, prior, state = make_inputs(1, 5, 2, 3, 2, with_state=True)
    if form == "recurrent":
        def fn(q, k, v, b, la, prior, M0, I0):
            o, (M, ibar) = metaplastic_scan_reference(q, k, v, b, la, prior, (M0, I0))
            return o, M, ibar
    else:
        def fn(q, k, v, b, la, prior, M0, I0):
            o, (M, ibar) = metaplastic_scan_chunked(q, k, v, b, la, prior, (M0, I0), chunk_size=2)
            return o, M, ibar
    inputs = tuple(x.requires_grad_(True) for x in (q, k, v, b, la, prior, *state))
    assert torch.autograd.gradcheck(fn, inputs)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_low_precision(dtype):
    """o in the input dtype, the state in float32; the float32 forms agree with the float64
    reference of the same (rounded) inputs within the dtype's bound."""
    q, k, v, b, la, prior, state = make_inputs(2, 131, 2, 31, 65, dtype=dtype, with_state=True)
    state32 = MetaplasticState(*(s.float() for s in state))
    exact = metaplastic_scan_reference(*(x.double() for x in (q, k, v, b, la)), prior, state)
    scan_tol = max(1e-5, 8 * math.sqrt(131) * torch.finfo(torch.float32).eps)  # docs/design.md §5
    tol = max(scan_tol, TOLERANCE[dtype])
    for got in (metaplastic_scan_reference(q, k, v, b, la, prior.float(), state32),
                metaplastic_scan_chunked(q, k, v, b, la, prior.float(), state32)):
        o, (M, ibar) = got
        assert o.dtype == dtype and M.dtype == torch.float32 and ibar.dtype == torch.float32
        assert_close_rel(o, exact[0], tol, "o")
        assert_close_rel(M, exact[1].M, scan_tol, "M")
        assert_close_rel(ibar, exact[1].Ibar, scan_tol, "Ibar")


def test_bad_shapes():
    q, k, v, b, la, prior, state = make_inputs(2, 5, 2, 4, 3, with_state=True)
    with pytest.raises(ValueError, match="b: expected shape"):
        metaplastic_scan_reference(q, k, v, b[..., :2], la, prior)
    with pytest.raises(ValueError, match="prior"):
        metaplastic_scan_chunked(q, k, v, b, la, prior[:1].expand(3))
    with pytest.raises(ValueError, match="state.M"):
        metaplastic_scan_chunked(q, k, v, b, la, prior, (state.M.transpose(-1, -2), state.Ibar))


def test_issue_size():
    """The issue's odd size (B=4, T=511, H=4, d_v=65, d_k=31), scale 1, float64: the chunked
    form's output, final state and every gradient equal the loop's."""
    q, k, v, b, la, prior, state = make_inputs(4, 511, 4, 31, 65, with_state=True)
    inputs = [x.requires_grad_(True) for x in (q, k, v, b, la, prior, *state)]
    w_o = torch.randn(4, 511, 4, 65, dtype=F64)

    def run(scan):
        q, k, v, b, la, prior, M0, I0 = inputs
        o, (M, ibar) = scan(q, k, v, b, la, prior, (M0, I0), scale=1.0)
        loss = (o * w_o).sum() + M.sum() + ibar.sum()
        return (o, M, ibar), torch.autograd.grad(loss, inputs)

    ref, ref_grads = run(metaplastic_scan_reference)
    got, grads = run(metaplastic_scan_chunked)
    for name, x, x_ref in zip(["o", "M", "Ibar"], got, ref):
        assert_close_rel(x, x_ref, TOL, name)
    for name, g, g_ref in zip(["q", "k", "v", "b", "log_alpha", "prior", "M0", "Ibar0"], grads, ref_grads):
        assert_close_rel(g, g_ref, TOL, f"d{name}")


def adjoint(q, k, v, b, log_alpha, prior, state, scale, dO, dM_T, dI_T):
    """The backward of docs/metaplastic.md §3, written out (float64): a forward loop that
    keeps every state, then the reverse recurrences of the state adjoints."""
    B, T, H, dk = q.shape
    ip = prior.view(1, H, 1, 1)
    a = log_alpha.exp()
    Ms, Is = [state.M], [state.Ibar]
    for t in range(T):
        at = a[:, t, :, None, None]
        Ms.append(at * Ms[-1] + v[:, t, ..., :, None] * k[:, t, ..., None, :])
        Is.append(at * Is[-1] + b[:, t, ..., :, None] * (k[:, t] ** 2)[..., None, :])
    GM, GI = dM_T, dI_T  # adjoints of M_t, Ibar_t from later tokens and the final state
    dq, dk_, dv, db, dla = (torch.zeros_like(x) for x in (q, k, v, b, log_alpha))
    dprior = torch.zeros_like(prior)
    for t in reversed(range(T)):
        P = Is[t + 1] + ip
        mu = Ms[t + 1] / P
        dq[:, t] = scale * (mu * dO[:, t, ..., :, None]).sum(-2)
        dmu = scale * dO[:, t, ..., :, None] * q[:, t, ..., None, :]
        GM = GM + dmu / P
        GI = GI - dmu * mu / P
        dprior -= (dmu * mu / P).sum((0, 2, 3))
        dv[:, t] = (GM * k[:, t, ..., None, :]).sum(-1)
        dk_[:, t] = (GM * v[:, t, ..., :, None]).sum(-2) + 2 * k[:, t] * (GI * b[:, t, ..., :, None]).sum(-2)
        db[:, t] = (GI * (k[:, t] ** 2)[..., None, :]).sum(-1)
        dla[:, t] = a[:, t] * ((GM * Ms[t]).sum((-1, -2)) + (GI * Is[t]).sum((-1, -2)))
        GM, GI = a[:, t, :, None, None] * GM, a[:, t, :, None, None] * GI
    return dq, dk_, dv, db, dla, dprior, GM, GI


def test_adjoint_equations():
    """The backward equations the doc gives to the kernels equal autograd's gradients of the
    reference loop."""
    q, k, v, b, la, prior, state = make_inputs(2, 37, 3, 7, 5, with_state=True)
    inputs = [x.requires_grad_(True) for x in (q, k, v, b, la, prior, *state)]
    dO = torch.randn(2, 37, 3, 5, dtype=F64)
    dM, dI = torch.randn(2, 3, 5, 7, dtype=F64), torch.randn(2, 3, 5, 7, dtype=F64)
    o, (M, ibar) = metaplastic_scan_reference(*inputs[:6], tuple(inputs[6:]), scale=0.7)
    ref = torch.autograd.grad((o * dO).sum() + (M * dM).sum() + (ibar * dI).sum(), inputs)
    with torch.no_grad():
        got = adjoint(q, k, v, b, la, prior, MetaplasticState(*state), 0.7, dO, dM, dI)
    for name, g, g_ref in zip(["q", "k", "v", "b", "log_alpha", "prior", "M0", "Ibar0"], got, ref):
        assert_close_rel(g, g_ref, TOL, f"d{name}")
