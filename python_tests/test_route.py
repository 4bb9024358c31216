"""cram_ext.route against cram_ext.reference.route (docs/design.md §2, §5).

prob is compared in relative error; mask, index and counts must match exactly. A
probability within 1e-5 of the threshold may legitimately fall either way (the op
and the reference sum in different orders), so the mask is compared only away from
the threshold, and index/counts must always be exactly the compaction of the op's
own mask (and equal the reference's when no probability is that close).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DEVICES,
    SCAN_DTYPES,
    TOLERANCE,
    assert_close_rel,
    at_offset,
    device_dtype_params,
    poison_allocator,
    reference_dtype,
    route_from_mask,
)

import cram_ext
from cram_ext import reference

TIE_BAND = 1e-5
SHAPES = [(1, 1, 8), (4, 17, 65), (3, 300, 32), (2, 4097, 4)]


def make_inputs(B, T, C, dtype, device, requires_grad=True, weight_dtype=None, bias=0.0):
    """hidden ~ N(0, 1) and weight ~ N(0, 1/C): logits of order 1, so both sides of 0.5 occur.
    weight and bias default to the accumulation dtype (float32 parameters, float64 for float64)."""
    weight_dtype = weight_dtype or reference_dtype(dtype)
    hidden = torch.randn(B, T, C, device=device).to(dtype).requires_grad_(requires_grad)
    weight = (torch.randn(C, device=device) / C**0.5).to(weight_dtype).requires_grad_(requires_grad)
    bias = torch.tensor(bias, device=device, dtype=weight_dtype).requires_grad_(requires_grad)
    return hidden, weight, bias


def check_route_exact(r, ref, threshold, force):
    """mask/index/counts of the op against the reference, exactly (see the module docstring)."""
    B, T = r.mask.shape
    assert r.mask.dtype == torch.bool and r.index.dtype == torch.int32 and r.counts.dtype == torch.int32
    assert r.mask.shape == (B, T) and r.index.shape == (B, T) and r.counts.shape == (B,)
    # The op's own outputs are consistent with its mask: positions in order, then T.
    index, counts = route_from_mask(r.mask)
    assert torch.equal(r.counts, counts), "counts is not the number of routed tokens of mask"
    assert torch.equal(r.index, index), "index is not the compaction of mask"
    tail = torch.arange(T, device=r.index.device) >= r.counts.unsqueeze(1)
    assert (r.index[tail] == T).all(), "index tail must be T exactly"
    cram_ext.check_route(r.index, r.counts, T)
    if force is not None:
        assert r.mask[force].all(), "a forced token was not routed"
    # Against the reference, away from the threshold (and everywhere when nothing is close).
    near = (ref.prob.double() - threshold).abs() <= TIE_BAND
    if force is not None:
        near &= ~force
    assert torch.equal(r.mask[~near], ref.mask[~near]), "mask differs from the reference"
    if not near.any():
        assert torch.equal(r.mask, ref.mask)
        assert torch.equal(r.counts, ref.counts)
        assert torch.equal(r.index, ref.index)


def check_against_reference(hidden, weight, bias, threshold, force, tol):
    ref_dtype = reference_dtype(hidden.dtype)
    hr = hidden.detach().to(ref_dtype).requires_grad_()
    wr = weight.detach().to(ref_dtype).requires_grad_()
    br = bias.detach().to(ref_dtype).requires_grad_()

    poison_allocator(hidden.device.type)
    r = cram_ext.route(hidden, weight, bias, threshold, force)
    ref = reference.route(hr, wr, br, threshold, force)

    assert r.prob.dtype == ref_dtype and r.prob.shape == hidden.shape[:2]
    assert torch.isfinite(r.prob).all()
    # prob is computed in float32 (float64) from the given inputs, whatever their dtype.
    assert_close_rel(r.prob, ref.prob, TOLERANCE[ref_dtype], "prob")
    check_route_exact(r, ref, threshold, force)
    assert not r.mask.requires_grad and not r.index.requires_grad and not r.counts.requires_grad

    grad_prob = torch.randn_like(ref.prob)
    grads = torch.autograd.grad(r.prob, (hidden, weight, bias), grad_prob)
    ref_grads = torch.autograd.grad(ref.prob, (hr, wr, br), grad_prob)
    for name, g, gr, inp in zip(("hidden", "weight", "bias"), grads, ref_grads, (hidden, weight, bias)):
        assert g.dtype == inp.dtype and g.shape == inp.shape, name
        # A gradient comes back in its input's dtype: float32 weight -> float32 rounding.
        assert_close_rel(g, gr, max(tol, TOLERANCE[g.dtype]), f"grad {name}")
    return r


@pytest.mark.parametrize("forced", [False, True], ids=["force=None", "force"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-C{}".format(*s))
@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_matches_reference(device, dtype, shape, forced):
    hidden, weight, bias = make_inputs(*shape, dtype, device)
    force = torch.rand(shape[:2], device=device) < 0.2 if forced else None
    check_against_reference(hidden, weight, bias, 0.5, force, TOLERANCE[dtype])


@pytest.mark.parametrize("threshold", [0.5, 0.1, 0.9, 0.0, 1.0, -1.0, 2.0])
@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_thresholds(device, dtype, threshold):
    """Thresholds inside (0, 1), at its ends (1.0 routes nothing, since prob > 1 never holds) and outside."""
    hidden, weight, bias = make_inputs(3, 40, 24, dtype, device, bias=0.3)
    r = check_against_reference(hidden, weight, bias, threshold, None, TOLERANCE[dtype])
    if threshold >= 1.0:
        assert (r.counts == 0).all()
    if threshold < 0.0:
        assert (r.counts == 40).all()


@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_rows_none_all_first_last(device, dtype):
    """Rows with no routed token, every token, only position 0, only T-1, and forced tokens
    the router alone would not pick."""
    B, T, C = 5, 37, 16
    hidden, weight, bias = make_inputs(B, T, C, dtype, device, requires_grad=False)
    # hidden = +-6 weight / |weight|^2: logits of +-6, probabilities 0.0025 / 0.9975, far
    # from the threshold, with gradients that float16 still represents.
    w = 6.0 * weight / weight.norm() ** 2
    with torch.no_grad():
        hidden[0] = (-w).to(dtype)  # row 0: nothing routed
        hidden[1] = w.to(dtype)  # row 1: everything routed
        hidden[2:] = (-w).to(dtype)  # rows 2-4: nothing, unless forced
    force = torch.zeros(B, T, dtype=torch.bool, device=device)
    force[2, 0] = True  # only position 0
    force[3, T - 1] = True  # only position T-1
    force[4, 0] = force[4, T - 1] = True
    force[1, 5] = True  # forcing a token that is routed anyway changes nothing
    for t in (hidden, weight, bias):
        t.requires_grad_()
    r = check_against_reference(hidden, weight, bias, 0.5, force, TOLERANCE[dtype])
    assert r.counts.tolist() == [0, T, 1, 1, 2]
    assert r.index[2, 0].item() == 0 and r.index[3, 0].item() == T - 1
    assert r.index[4, :2].tolist() == [0, T - 1]
    assert (r.index[0] == T).all()
    assert torch.equal(r.index[1], torch.arange(T, dtype=torch.int32, device=device))


@pytest.mark.parametrize(
    "weight_dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["w-f64", "w-f32", "w-bf16"]
)
@pytest.mark.parametrize("device", DEVICES)
def test_weight_and_bias_dtypes(device, weight_dtype):
    """weight and bias may have any floating dtype; their gradients come back in it."""
    hidden, weight, bias = make_inputs(2, 33, 20, torch.float32, device, weight_dtype=weight_dtype, bias=-0.2)
    check_against_reference(hidden, weight, bias, 0.5, None, TOLERANCE[torch.float32])


@pytest.mark.parametrize("param_dtype", ["same", torch.float32, "other16"], ids=["w-same", "w-f32", "w-other16"])
@pytest.mark.parametrize("device, dtype", device_dtype_params({"cpu": [torch.bfloat16], "cuda": [torch.bfloat16, torch.float16]}))
def test_half_hidden_with_half_parameters(device, dtype, param_dtype):
    """16-bit hidden with weight and bias in its own dtype (model.to(bfloat16)), in
    float32, or in the other 16-bit type (read as is, or converted by the launcher)."""
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    w_dtype = {"same": dtype, "other16": other}.get(param_dtype, param_dtype)
    hidden, weight, bias = make_inputs(3, 70, 48, dtype, device, weight_dtype=w_dtype, bias=0.1)
    check_against_reference(hidden, weight, bias, 0.5, None, max(TOLERANCE[dtype], TOLERANCE[w_dtype]))


@pytest.mark.parametrize("C", [4100, 8200], ids=["C4100-scalar", "C8200-vector"])
@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_wide_rows(device, dtype, C):
    """Rows wider than the CUDA kernel's staged weight chunk (4096 channels): the dot
    product is summed over several chunks; C = 4100 is not a multiple of any vector width."""
    hidden, weight, bias = make_inputs(2, 37, C, dtype, device)
    check_against_reference(hidden, weight, bias, 0.5, None, TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(device):
    B, T, C = 3, 29, 12
    hidden = torch.randn(B, C, T, device=device).transpose(1, 2)
    weight = torch.randn(2 * C, device=device)[::2] / C**0.5
    bias = torch.tensor(0.1, device=device)
    force = (torch.rand(T, B, device=device) < 0.3).t()
    r = cram_ext.route(hidden, weight, bias, 0.5, force)
    r_c = cram_ext.route(hidden.contiguous(), weight.contiguous(), bias, 0.5, force.contiguous())
    for a, b in zip(r, r_c):
        assert torch.equal(a, b)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    check_against_reference(hidden, weight, bias, 0.5, force, 1e-5)


@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_unaligned_storage_offset(device, dtype):
    """Contiguous inputs (hidden, weight, force) whose data pointer is one element past an aligned address."""
    hidden, weight, bias = make_inputs(3, 45, 24, dtype, device, requires_grad=False)
    force = at_offset(torch.rand(3, 45, device=device) < 0.2)
    hidden, weight, bias = at_offset(hidden).requires_grad_(), at_offset(weight).requires_grad_(), bias.requires_grad_()
    check_against_reference(hidden, weight, bias, 0.5, force, TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_no_threshold_argument_defaults_to_half(device):
    hidden, weight, bias = make_inputs(2, 50, 8, torch.float32, device, requires_grad=False)
    r = cram_ext.route(hidden, weight, bias)
    r_half = cram_ext.route(hidden, weight, bias, 0.5, None)
    for a, b in zip(r, r_half):
        assert torch.equal(a, b)


def test_gradcheck_float64():
    hidden, weight, bias = make_inputs(2, 7, 5, torch.float64, "cpu", weight_dtype=torch.float64)
    force = torch.rand(2, 7) < 0.3
    assert torch.autograd.gradcheck(lambda h, w, b: cram_ext.route(h, w, b, 0.5, force).prob, (hidden, weight, bias))
    assert torch.autograd.gradcheck(lambda h, w, b: cram_ext.route(h, w, b).prob, (hidden, weight, bias))


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, contiguous):
    B, T, C = 2, 11, 6
    if contiguous:
        hidden, weight, bias = make_inputs(B, T, C, torch.float32, device)
        force = torch.rand(B, T, device=device) < 0.3
    else:
        hidden = torch.randn(B, C, T, device=device).transpose(1, 2).requires_grad_()
        weight = torch.randn(2 * C, device=device)[::2].detach().requires_grad_()
        bias = torch.tensor(0.0, device=device, requires_grad=True)
        force = (torch.rand(T, B, device=device) < 0.3).t()
    for f in (None, force):
        torch.library.opcheck(torch.ops.cram.route.default, (hidden, weight, bias, 0.5, f))
    with torch.no_grad():
        r = cram_ext.route(hidden, weight, bias)
    grad_prob = torch.randn_like(r.prob)
    torch.library.opcheck(
        torch.ops.cram.route_backward.default, (grad_prob, r.prob, hidden.detach(), weight.detach())
    )


@pytest.mark.parametrize("device", DEVICES)
def test_inference_mode(device):
    hidden, weight, bias = make_inputs(2, 300, 16, torch.float32, device, requires_grad=False)
    expected = cram_ext.route(hidden, weight, bias)
    with torch.inference_mode():
        got = cram_ext.route(hidden, weight, bias)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
