"""cram_ext.gated_scan against cram_ext.reference.gated_scan (docs/design.md §2, §5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICES,
    SCAN_DTYPES,
    TOLERANCE,
    assert_close_rel,
    at_offset,
    device_dtype_params,
    poison_allocator,
    reference_dtype,
)

import cram_ext
from cram_ext import reference

# (B, T, C): T = 1, T and C not multiples of any block size (C = 3, 65, 130 around the
# 64-channel block), a long-ish T.
SHAPES = [(2, 1, 3), (3, 17, 65), (2, 100, 130), (1, 2048, 5)]


def make_inputs(B, T, C, dtype, device, with_h0, requires_grad=True):
    """x ~ N(0, 1), log_a = -softplus(N(0, 1)) (decays in (0, 1)), h0 ~ N(0, 1) in the accumulation dtype."""
    x = torch.randn(B, T, C, device=device).to(dtype)
    log_a = (-F.softplus(torch.randn(B, T, C, device=device))).to(dtype)
    h0 = torch.randn(B, C, device=device, dtype=reference_dtype(dtype)) if with_h0 else None
    for t in (x, log_a, h0):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, log_a, h0


def as_reference(t, dtype):
    return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)


def check_against_reference(x, log_a, h0, tol):
    """Forward and every gradient of the op against the reference, which runs in
    float64 for float64 inputs and float32 otherwise, on the same (rounded) inputs."""
    ref_dtype = reference_dtype(x.dtype)
    xr, lr, h0r = (as_reference(t, ref_dtype) for t in (x, log_a, h0))

    poison_allocator(x.device.type)
    h, h_last = cram_ext.gated_scan(x, log_a, h0)
    h_ref, h_last_ref = reference.gated_scan(xr, lr, h0r)

    assert h.shape == x.shape and h.dtype == x.dtype and h.device == x.device
    assert h_last.shape == (x.shape[0], x.shape[2]) and h_last.dtype == ref_dtype
    assert torch.isfinite(h).all() and torch.isfinite(h_last).all()
    assert_close_rel(h, h_ref, tol, "h")
    assert_close_rel(h_last, h_last_ref, tol, "h_last")

    grad_h = torch.randn_like(h_ref).to(x.dtype)
    grad_h_last = torch.randn_like(h_last_ref)
    inputs = [t for t in (x, log_a, h0) if t is not None]
    ref_inputs = [t for t in (xr, lr, h0r) if t is not None]
    grads = torch.autograd.grad((h, h_last), inputs, (grad_h, grad_h_last))
    ref_grads = torch.autograd.grad((h_ref, h_last_ref), ref_inputs, (grad_h.to(ref_dtype), grad_h_last))
    for name, g, gr, inp in zip(("x", "log_a", "h0"), grads, ref_grads, inputs):
        assert g.dtype == inp.dtype and g.shape == inp.shape, name
        assert_close_rel(g, gr, tol, f"grad {name}")


@pytest.mark.parametrize("with_h0", [False, True], ids=["h0=None", "h0"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-C{}".format(*s))
@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_matches_reference(device, dtype, shape, with_h0):
    x, log_a, h0 = make_inputs(*shape, dtype, device, with_h0)
    check_against_reference(x, log_a, h0, TOLERANCE[dtype])


@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_many_lanes(device, dtype):
    """B x C lanes spanning several threads / blocks, with a partial last channel block."""
    x, log_a, h0 = make_inputs(8, 33, 200, dtype, device, with_h0=True)
    check_against_reference(x, log_a, h0, TOLERANCE[dtype])


@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_noncontiguous_inputs(device, dtype):
    """Inputs that are views with other strides give the same result as contiguous copies."""
    B, T, C = 2, 19, 70
    x_t = torch.randn(B, C, T, device=device).to(dtype).transpose(1, 2)
    log_a_t = (-F.softplus(torch.randn(B, C, T, device=device))).to(dtype).transpose(1, 2)
    h0_t = torch.randn(C, B, device=device, dtype=reference_dtype(dtype)).t()
    assert not x_t.is_contiguous() and not h0_t.is_contiguous()
    h, h_last = cram_ext.gated_scan(x_t, log_a_t, h0_t)
    h_c, h_last_c = cram_ext.gated_scan(x_t.contiguous(), log_a_t.contiguous(), h0_t.contiguous())
    assert torch.equal(h, h_c) and torch.equal(h_last, h_last_c)
    x_t.requires_grad_(), log_a_t.requires_grad_(), h0_t.requires_grad_()
    check_against_reference(x_t, log_a_t, h0_t, TOLERANCE[dtype])


@pytest.mark.parametrize("device, dtype", device_dtype_params(SCAN_DTYPES))
def test_unaligned_storage_offset(device, dtype):
    """Contiguous inputs whose data pointer is one element past an aligned address."""
    x, log_a, h0 = make_inputs(2, 19, 70, dtype, device, with_h0=True, requires_grad=False)
    x, log_a, h0 = (at_offset(t).requires_grad_() for t in (x, log_a, h0))
    check_against_reference(x, log_a, h0, TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_decay_extremes(device):
    """log_a = 0 is a running sum; log_a very negative forgets: h = x."""
    B, T, C = 2, 50, 9
    x = torch.randn(B, T, C, device=device, dtype=torch.float32)
    h0 = torch.randn(B, C, device=device)
    h, h_last = cram_ext.gated_scan(x, torch.zeros_like(x), h0)
    expected = h0.unsqueeze(1) + x.double().cumsum(1).float()
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_last, expected[:, -1], rtol=1e-5, atol=1e-5)
    h, h_last = cram_ext.gated_scan(x, torch.full_like(x, -200.0), h0)
    torch.testing.assert_close(h, x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h_last, x[:, -1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_h0_none_equals_zeros(device):
    x, log_a, _ = make_inputs(3, 21, 66, torch.float32, device, with_h0=False, requires_grad=False)
    h, h_last = cram_ext.gated_scan(x, log_a, None)
    h_z, h_last_z = cram_ext.gated_scan(x, log_a, torch.zeros(3, 66, device=device))
    assert torch.equal(h, h_z) and torch.equal(h_last, h_last_z)


@pytest.mark.parametrize("use", ["h", "h_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_through_one_output(device, use):
    """A loss on only one of the outputs (the other's gradient is absent) works and matches."""
    x, log_a, h0 = make_inputs(2, 13, 7, torch.float32, device, with_h0=True)
    xr, lr, h0r = (t.detach().clone().requires_grad_() for t in (x, log_a, h0))
    out = cram_ext.gated_scan(x, log_a, h0)
    ref = reference.gated_scan(xr, lr, h0r)
    i = 0 if use == "h" else 1
    (out[i] * out[i]).sum().backward()
    (ref[i] * ref[i]).sum().backward()
    for t, tr, name in ((x, xr, "x"), (log_a, lr, "log_a"), (h0, h0r, "h0")):
        assert_close_rel(t.grad, tr.grad, 1e-5, f"grad {name}")


def test_gradcheck_float64():
    x, log_a, h0 = make_inputs(2, 6, 5, torch.float64, "cpu", with_h0=True)
    assert torch.autograd.gradcheck(cram_ext.gated_scan, (x, log_a, h0))
    assert torch.autograd.gradcheck(lambda a, b: cram_ext.gated_scan(a, b, None), (x, log_a))


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, contiguous):
    dtype = torch.float32
    B, T, C = 2, 9, 67
    if contiguous:
        x, log_a, h0 = make_inputs(B, T, C, dtype, device, with_h0=True)
    else:
        x = torch.randn(B, C, T, device=device).transpose(1, 2).requires_grad_()
        log_a = (-F.softplus(torch.randn(B, C, T, device=device))).transpose(1, 2).requires_grad_()
        h0 = torch.randn(C, B, device=device).t().requires_grad_()
    torch.library.opcheck(torch.ops.cram.gated_scan.default, (x, log_a, h0))
    torch.library.opcheck(torch.ops.cram.gated_scan.default, (x, log_a, None))
    with torch.no_grad():
        h, h_last = cram_ext.gated_scan(x, log_a, h0)
    grad_h, grad_h_last = torch.randn_like(h), torch.randn_like(h_last)
    if not contiguous:
        grad_h = torch.randn(B, C, T, device=device).transpose(1, 2)
    for initial in (h0.detach(), None):
        torch.library.opcheck(
            torch.ops.cram.gated_scan_backward.default, (grad_h, grad_h_last, log_a.detach(), h, initial)
        )


@pytest.mark.parametrize("device", DEVICES)
def test_inference_mode(device):
    x, log_a, h0 = make_inputs(2, 9, 130, torch.float32, device, with_h0=True, requires_grad=False)
    expected = cram_ext.gated_scan(x, log_a, h0)
    with torch.inference_mode():
        got = cram_ext.gated_scan(x, log_a, h0)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
