"""cram_ext.routed_attention against cram_ext.reference.routed_attention (docs/design.md §2, §5).

Besides the relative error of out and of every gradient, each comparison checks the
rows that were not routed exactly: out is 0 and lse is -inf there (and finite at
routed rows), and the gradient of q is 0 there, whatever grad_out holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from conftest import (
    DEVICES,
    TOLERANCE,
    assert_close_rel,
    at_offset,
    attention_params,
    cuda_only,
    grad_floor,
    poison_allocator,
    reference_dtype,
    route_from_mask,
    routing_mask,
)

import cram_ext
from cram_ext import reference
from cram_ext.reference import routed_mask


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    T: int
    S: int
    H: int
    Hk: int
    pattern: str  # see conftest.routing_mask
    density: float = 0.5

    def __str__(self):
        return self.name


CASES = [
    Case("T1-mixed", B=2, T=1, S=1, H=2, Hk=1, pattern="mixed"),  # row 0 not routed, row 1 routed
    Case("T1-S9", B=2, T=1, S=9, H=2, Hk=2, pattern="all"),
    Case("T17-mixed", B=6, T=17, S=17, H=4, Hk=2, pattern="mixed"),  # none/all/first/last/ends/random
    Case("T65-all", B=2, T=65, S=65, H=2, Hk=2, pattern="all"),  # counts = T, T = 64 + 1
    Case("T130-sparse", B=2, T=130, S=130, H=2, Hk=1, pattern="random", density=0.05),
    Case("gqa-H4-Hk1", B=2, T=33, S=33, H=4, Hk=1, pattern="random"),
    Case("gqa-H4-Hk2-S>T", B=3, T=20, S=29, H=4, Hk=2, pattern="mixed"),
    Case("S>T-first", B=2, T=7, S=100, H=2, Hk=1, pattern="first"),
    Case("last", B=2, T=70, S=70, H=2, Hk=2, pattern="last"),
    Case("none", B=2, T=9, S=12, H=2, Hk=2, pattern="none"),  # counts = 0 everywhere
    Case("BH-large", B=8, T=9, S=9, H=16, Hk=4, pattern="random"),
    # CPU query blocks: 256 queries (T=613: 256, 256, 101), and blocks cut at a 256-position span
    Case("T613-all", B=1, T=613, S=613, H=2, Hk=1, pattern="all"),
    Case("T700-span", B=2, T=700, S=731, H=2, Hk=2, pattern="random", density=0.3),
    # CPU row groups of 64 in a key chunk a block sees only in part: with 300 cached keys the
    # first groups of a block see nothing of its last chunk; at density 0.93 blocks straddle chunks
    Case("T1300-all-S>T", B=1, T=1300, S=1600, H=2, Hk=1, pattern="all"),
    Case("T1100-dense-S>T", B=2, T=1100, S=1163, H=2, Hk=2, pattern="random", density=0.93),
]


def make_qkv(B, T, S, H, Hk, D, dtype, device, scale=1.0, requires_grad=True):
    q = (scale * torch.randn(B, T, H, D, device=device)).to(dtype).requires_grad_(requires_grad)
    k = (scale * torch.randn(B, S, Hk, D, device=device)).to(dtype).requires_grad_(requires_grad)
    v = torch.randn(B, S, Hk, D, device=device).to(dtype).requires_grad_(requires_grad)
    return q, k, v


def assert_same_result(a, b):
    """Two runs of the op on the same values: bitwise equal on every device (the CUDA
    forward merges key splits in a fixed order; nothing reduces with atomics)."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    assert torch.equal(out_a, out_b) and torch.equal(lse_a, lse_b)


def check_unrouted_rows(out, lse, routed):
    """out exactly 0 and lse exactly -inf at rows not routed; both finite at routed rows."""
    rows = routed[:, :, None, None].expand_as(out)
    assert (out[~rows] == 0).all(), "out is not exactly 0 at a row that was not routed"
    assert torch.isfinite(out[rows]).all(), "out is not finite at a routed row"
    lse_rows = routed[:, None, :].expand_as(lse)
    assert (lse[~lse_rows] == float("-inf")).all(), "lse is not -inf at a row that was not routed"
    assert torch.isfinite(lse[lse_rows]).all(), "lse is not finite at a routed row"


def check_against_reference(q, k, v, index, counts, tol, softmax_scale=None, compare_grads=("q", "k", "v"),
                            deterministic=False):
    """Forward (out, lse) and the gradients named in compare_grads against the reference,
    run in float64 for float64 inputs and in float32 otherwise, on the same (rounded)
    inputs and the same grad_out. Gradients not compared must still be finite."""
    B, T, H, _ = q.shape
    ref_dtype = reference_dtype(q.dtype)
    qr, kr, vr = (t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v))
    routed = routed_mask(index, counts, T)

    poison_allocator(q.device.type)
    out, lse = cram_ext.routed_attention(q, k, v, index, counts, softmax_scale, deterministic=deterministic)
    out_ref, lse_ref = reference.routed_attention(qr, kr, vr, index, counts, softmax_scale)

    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == (B, H, T) and lse.dtype == ref_dtype and not lse.requires_grad
    check_unrouted_rows(out, lse, routed)
    assert_close_rel(out, out_ref, tol, "out")
    lse_rows = routed[:, None, :].expand_as(lse)
    assert_close_rel(lse[lse_rows], lse_ref[lse_rows], tol, "lse")

    # grad_out is random at every row: the rows that were not routed must ignore it.
    grad_out = torch.randn_like(out_ref).to(q.dtype)
    poison_allocator(q.device.type)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(out_ref, (qr, kr, vr), grad_out.to(ref_dtype))
    floor = grad_floor(grad_out[routed])  # a query that sees a single key: see grad_floor
    for name, g, gr, inp in zip("qkv", grads, ref_grads, (q, k, v)):
        assert g.dtype == inp.dtype and g.shape == inp.shape, name
        assert torch.isfinite(g).all(), f"grad {name} is not finite"
        if name in compare_grads:
            assert_close_rel(g, gr, tol, f"grad {name}", floor=floor)
    assert (grads[0][~routed] == 0).all(), "grad q is not 0 at a row that was not routed"
    return out, lse


@pytest.mark.parametrize("device, dtype, D", attention_params())
def test_deterministic(device, dtype, D):
    """deterministic=True: forward and backward bitwise identical run to run, on a shape
    where the CUDA forward splits tiles over keys (few routed queries, many keys) and
    one where the backward sums many query tiles into each dK/dV row."""
    for B, T, H, Hk, density in ((1, 3000, 2, 1, 0.03), (2, 700, 4, 2, 0.6)):
        q, k, v = make_qkv(B, T, T, H, Hk, D, dtype, device)
        index, counts = route_from_mask(routing_mask(B, T, "random", device, density))
        grad_out = torch.randn(q.shape, device=device).to(dtype)
        runs = []
        for _ in range(2):
            out, lse = cram_ext.routed_attention(q, k, v, index, counts, deterministic=True)
            runs.append((out, lse, *torch.autograd.grad(out, (q, k, v), grad_out)))
        for name, x, y in zip(("out", "lse", "grad q", "grad k", "grad v"), *runs):
            assert torch.equal(x, y), f"{name} differs between two runs"


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("device, dtype, D", attention_params())
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
def test_matches_reference(device, dtype, D, case, deterministic):
    """Both backward paths (on CUDA: dQ summed inside the dK/dV kernel, or its own kernel)."""
    q, k, v = make_qkv(case.B, case.T, case.S, case.H, case.Hk, D, dtype, device)
    mask = routing_mask(case.B, case.T, case.pattern, device, case.density)
    index, counts = route_from_mask(mask)
    check_against_reference(q, k, v, index, counts, TOLERANCE[dtype], deterministic=deterministic)


def test_kernel_cpu():
    assert cram_ext.routed_attention_kernel("cpu", 64) == "cpu"
    assert cram_ext.routed_attention_kernel("cpu", 128, "backward") == "cpu"
    with pytest.raises(ValueError, match="device"):
        cram_ext.routed_attention_kernel("meta", 64)
    with pytest.raises(ValueError, match="which"):
        cram_ext.routed_attention_kernel("cpu", 64, "fwd")


def test_sm80_switch_restores_the_environment(monkeypatch):
    monkeypatch.setenv("CRAM_ROUTED_ATTENTION_SM80", "7")
    with cram_ext.routed_attention_sm80():
        assert os.environ["CRAM_ROUTED_ATTENTION_SM80"] == "1"
    assert os.environ["CRAM_ROUTED_ATTENTION_SM80"] == "7"
    monkeypatch.delenv("CRAM_ROUTED_ATTENTION_SM80")
    with pytest.raises(RuntimeError, match="inside"), cram_ext.routed_attention_sm80(False):
        assert os.environ["CRAM_ROUTED_ATTENTION_SM80"] == "0"
        raise RuntimeError("inside")
    assert "CRAM_ROUTED_ATTENTION_SM80" not in os.environ


@pytest.mark.parametrize("device", [cuda_only("cuda")])
@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_choice(device, D, which, monkeypatch):
    """The sm_90a kernels run on Hopper with a "9.0a" build at D = 128, the SM80 ones
    everywhere else, and CRAM_ROUTED_ATTENTION_SM80=1 forces the SM80 ones (at every call)."""
    capability = torch.cuda.get_device_capability()
    sm90a = capability == (9, 0) and "9.0a" in cram_ext.build_info()["cuda_archs"].split(";") and D == 128
    monkeypatch.delenv("CRAM_ROUTED_ATTENTION_SM80", raising=False)
    assert cram_ext.routed_attention_kernel(device, D, which) == ("sm90a" if sm90a else "sm80")
    monkeypatch.setenv("CRAM_ROUTED_ATTENTION_SM80", "1")
    assert cram_ext.routed_attention_kernel(device, D, which) == "sm80"
    monkeypatch.setenv("CRAM_ROUTED_ATTENTION_SM80", "0")
    assert cram_ext.routed_attention_kernel(device, D, which) == ("sm90a" if sm90a else "sm80")


KERNEL_CASES = [c for c in CASES if c.name in ("T17-mixed", "T130-sparse", "gqa-H4-Hk2-S>T", "T1100-dense-S>T")]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("device, dtype, D", [cuda_only("cuda", torch.bfloat16, 128), cuda_only("cuda", torch.float16, 128)])
def test_kernels_agree(device, dtype, D, deterministic, case):
    """Both CUDA forwards and backwards on the same inputs, each against the reference (on
    Hopper: the sm_90a kernels and the SM80 ones; elsewhere the SM80 ones twice). The whole
    file runs with CRAM_ROUTED_ATTENTION_SM80=1 too on the device (scripts/device_check.sh)."""
    q, k, v = make_qkv(case.B, case.T, case.S, case.H, case.Hk, D, dtype, device)
    index, counts = route_from_mask(routing_mask(case.B, case.T, case.pattern, device, case.density))
    outs = []
    for sm80 in (False, True):
        with cram_ext.routed_attention_sm80(sm80):
            outs.append(check_against_reference(q, k, v, index, counts, TOLERANCE[dtype], deterministic=deterministic))
    (out_a, lse_a), (out_b, lse_b) = outs
    # Two kernels, one rounding of P to 16 bits each: close, not necessarily bitwise.
    assert_close_rel(out_a, out_b, TOLERANCE[dtype], "out of the two kernels")
    rows = routed_mask(index, counts, case.T)[:, None, :].expand_as(lse_a)
    assert_close_rel(lse_a[rows], lse_b[rows], TOLERANCE[dtype], "lse of the two kernels")


LONG_PARAMS = [
    pytest.param("cpu", torch.float32, 16, id="cpu-f32-D16"),
    cuda_only("cuda", torch.float16, 64),
    cuda_only("cuda", torch.bfloat16, 128),
]


@pytest.mark.parametrize("device, dtype, D", LONG_PARAMS)
def test_long_sequence(device, dtype, D):
    """T = 4097 (one past a power of two): sparse routing with the first and last position routed."""
    B, T, H, Hk = 1, 4097, 2, 1
    q, k, v = make_qkv(B, T, T, H, Hk, D, dtype, device)
    mask = routing_mask(B, T, "random", device, density=0.02)
    mask[:, 0] = mask[:, T - 1] = True
    index, counts = route_from_mask(mask)
    check_against_reference(q, k, v, index, counts, TOLERANCE[dtype])


@pytest.mark.parametrize("device, dtype, D", attention_params())
def test_large_logits(device, dtype, D):
    """q and k scaled by 30: scores in the thousands, the softmax nearly one-hot.

    No NaN/inf anywhere and out still matches. The gradients of q and k of a saturated
    softmax are tiny differences of large terms, ill-conditioned in reduced precision:
    they are compared in float64 only, checked finite otherwise."""
    B, T, H, Hk = 2, 40, 4, 2
    q, k, v = make_qkv(B, T, T, H, Hk, D, dtype, device, scale=30.0)
    index, counts = route_from_mask(routing_mask(B, T, "mixed", device))
    compare = ("q", "k", "v") if dtype == torch.float64 else ("v",)
    check_against_reference(q, k, v, index, counts, TOLERANCE[dtype], compare_grads=compare)


@pytest.mark.parametrize("device, dtype, D", attention_params())
def test_softmax_scale(device, dtype, D):
    """An explicit scale is used as given; None means D ** -0.5."""
    B, T, H = 2, 23, 2
    q, k, v = make_qkv(B, T, T, H, H, D, dtype, device)
    index, counts = route_from_mask(routing_mask(B, T, "random", device))
    check_against_reference(q, k, v, index, counts, TOLERANCE[dtype], softmax_scale=0.37)
    with torch.no_grad():
        default = cram_ext.routed_attention(q, k, v, index, counts)
        explicit = cram_ext.routed_attention(q, k, v, index, counts, D**-0.5)
    assert_same_result(default, explicit)


@pytest.mark.parametrize("device, dtype, D", attention_params())
def test_with_route_output(device, dtype, D):
    """The routing as cram_ext.route produces it, end to end."""
    B, T, H, Hk = 3, 50, 4, 2
    q, k, v = make_qkv(B, T, T, H, Hk, D, dtype, device)
    hidden = torch.randn(B, T, 8, device=device)
    force = torch.zeros(B, T, dtype=torch.bool, device=device)
    force[:, 0] = True
    r = cram_ext.route(hidden, torch.randn(8, device=device) / 8**0.5, torch.tensor(-0.5, device=device), 0.5, force)
    check_against_reference(q, k, v, r.index, r.counts, TOLERANCE[dtype])


@pytest.mark.parametrize("device, dtype, D", attention_params())
def test_noncontiguous_inputs(device, dtype, D):
    """q, k, v as transposed views of (B, H, T, D) tensors, the common attention layout."""
    B, T, H, Hk = 2, 31, 4, 2
    q = torch.randn(B, H, T, D, device=device).to(dtype).transpose(1, 2)
    k = torch.randn(B, Hk, T, D, device=device).to(dtype).transpose(1, 2)
    v = torch.randn(B, Hk, T, D, device=device).to(dtype).transpose(1, 2)
    index, counts = route_from_mask(routing_mask(B, T, "random", device))
    with torch.no_grad():
        out, lse = cram_ext.routed_attention(q, k, v, index, counts)
        out_c, lse_c = cram_ext.routed_attention(q.contiguous(), k.contiguous(), v.contiguous(), index, counts)
    assert_same_result((out, lse), (out_c, lse_c))
    for t in (q, k, v):
        t.requires_grad_()
    check_against_reference(q, k, v, index, counts, TOLERANCE[dtype])


@pytest.mark.parametrize("device, dtype, D", attention_params())
def test_expanded_inputs(device, dtype, D):
    """k and v broadcast over the batch and q over the heads (stride 0; the sm_90a forward's
    TMA cannot step along a zero stride, so the launcher copies them): same result as the
    materialised tensors."""
    B, T, H, Hk = 3, 37, 4, 2
    q = torch.randn(B, T, 1, D, device=device).to(dtype).requires_grad_().expand(B, T, H, D)
    k = torch.randn(1, T, Hk, D, device=device).to(dtype).requires_grad_().expand(B, T, Hk, D)
    v = torch.randn(1, T, Hk, D, device=device).to(dtype).requires_grad_().expand(B, T, Hk, D)
    index, counts = route_from_mask(routing_mask(B, T, "random", device))
    with torch.no_grad():
        out, lse = cram_ext.routed_attention(q, k, v, index, counts)
        out_c, lse_c = cram_ext.routed_attention(q.contiguous(), k.contiguous(), v.contiguous(), index, counts)
    assert_same_result((out, lse), (out_c, lse_c))
    check_against_reference(q, k, v, index, counts, TOLERANCE[dtype])


@pytest.mark.parametrize("device, dtype, D", attention_params())
def test_unaligned_storage_offset(device, dtype, D):
    """Contiguous q, k, v, index and counts whose data pointers are one element past an aligned address."""
    B, T, H, Hk = 2, 29, 4, 2
    qkv = make_qkv(B, T, T + 2, H, Hk, D, dtype, device, requires_grad=False)
    q, k, v = (at_offset(t).requires_grad_() for t in qkv)
    index, counts = (at_offset(t) for t in route_from_mask(routing_mask(B, T, "mixed", device)))
    check_against_reference(q, k, v, index, counts, TOLERANCE[dtype])


def test_gradcheck_float64():
    B, T, S, H, Hk, D = 2, 5, 7, 4, 2, 3
    q, k, v = make_qkv(B, T, S, H, Hk, D, torch.float64, "cpu")
    mask = routing_mask(B, T, "random", "cpu")
    mask[0, 0] = mask[1, T - 1] = True
    mask[1, 0] = False
    index, counts = route_from_mask(mask)
    assert torch.autograd.gradcheck(lambda q, k, v: cram_ext.routed_attention(q, k, v, index, counts)[0], (q, k, v))
    # GQA with a single key/value head and one routed query per row.
    q, k, v = make_qkv(B, T, T, H, 1, D, torch.float64, "cpu")
    index, counts = route_from_mask(routing_mask(B, T, "last", "cpu"))
    assert torch.autograd.gradcheck(
        lambda q, k, v: cram_ext.routed_attention(q, k, v, index, counts, 0.7)[0], (q, k, v), fast_mode=True
    )


OPCHECK_PARAMS = [
    pytest.param("cpu", torch.float32, 8, id="cpu-f32-D8"),
    pytest.param("cpu", torch.bfloat16, 8, id="cpu-bf16-D8"),
    cuda_only("cuda", torch.float16, 64),
    cuda_only("cuda", torch.bfloat16, 128),
]


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("device, dtype, D", OPCHECK_PARAMS)
def test_opcheck(device, dtype, D, contiguous):
    B, T, S, H, Hk = 2, 9, 12, 4, 2
    if contiguous:
        q, k, v = make_qkv(B, T, S, H, Hk, D, dtype, device)
    else:
        q = torch.randn(B, H, T, D, device=device).to(dtype).transpose(1, 2).requires_grad_()
        k = torch.randn(B, Hk, S, D, device=device).to(dtype).transpose(1, 2).requires_grad_()
        v = torch.randn(B, Hk, S, D, device=device).to(dtype).transpose(1, 2).requires_grad_()
    index, counts = route_from_mask(routing_mask(B, T, "mixed", device))
    torch.library.opcheck(torch.ops.cram.routed_attention.default, (q, k, v, index, counts, D**-0.5))
    with torch.no_grad():
        out, lse = cram_ext.routed_attention(q, k, v, index, counts)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.cram.routed_attention_backward.default,
        (grad_out, q.detach(), k.detach(), v.detach(), out, lse, index, counts, D**-0.5),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_runs_below_autograd(device):
    """Called below autograd (as the autograd formula calls it), the kernel must record no
    graph of its own, on any thread, and it must work under inference_mode. (The CPU kernel
    once ran its ATen calls on worker threads without the caller's thread-local state.)"""
    B, T, H, D = 2, 300, 4, 64
    q, k, v = make_qkv(B, T, T, H, H, D, torch.float16 if device == "cuda" else torch.float32, device)
    index, counts = route_from_mask(routing_mask(B, T, "all", device))
    with torch._C._AutoDispatchBelowAutograd():
        out, lse = torch.ops.cram.routed_attention.default(q, k, v, index, counts, D**-0.5)
        assert not out.requires_grad and out.grad_fn is None
        assert not lse.requires_grad and lse.grad_fn is None
        grads = torch.ops.cram.routed_attention_backward.default(
            torch.randn_like(out), q, k, v, out, lse, index, counts, D**-0.5
        )
        for g in grads:
            assert not g.requires_grad and g.grad_fn is None
    with torch.no_grad():
        expected = cram_ext.routed_attention(q, k, v, index, counts)
    with torch.inference_mode():
        got = cram_ext.routed_attention(q.detach(), k.detach(), v.detach(), index, counts)
    assert_same_result(got, expected)


@pytest.mark.parametrize("device", [cuda_only("cuda")])
def test_cuda_graph_capture(device):
    """route -> routed_attention -> gated_scan capture into a CUDA graph (no host sync) and replay."""
    B, T, H, D, C = 2, 130, 4, 64, 256
    hidden = torch.randn(B, T, C, device=device)
    weight = torch.randn(C, device=device) / C**0.5
    bias = torch.tensor(0.0, device=device)
    q, k, v = make_qkv(B, T, T, H, H, D, torch.bfloat16, device, requires_grad=False)
    log_a = -torch.nn.functional.softplus(torch.randn(B, T, H * D, device=device))

    def step():
        r = cram_ext.route(hidden, weight, bias)
        out, _ = cram_ext.routed_attention(q, k, v, r.index, r.counts)
        return cram_ext.gated_scan(out.reshape(B, T, H * D).float(), log_a)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        hidden.normal_()
        q.normal_()
        graph.replay()
        torch.cuda.synchronize()
        expected = step()
        # The same kernels on the same inputs; only a reduction order may differ.
        assert_close_rel(captured[0], expected[0], 1e-5, "h")
        assert_close_rel(captured[1], expected[1], 1e-5, "h_last")


# The backward's workspace once put the fused dQ accumulator 8 bytes off a 16-byte boundary
# whenever B * H * T was odd: "misaligned address" on the GPU, the context lost (issue 12).
ODD_BHT_CASES = [  # (B, T, S, H, Hk)
    (1, 1, 1, 1, 1), (1, 1, 5, 1, 1), (1, 3, 3, 1, 1), (1, 65, 65, 1, 1), (3, 7, 7, 1, 1), (1, 5, 9, 3, 1),
    (1, 2, 2, 1, 1), (2, 1, 1, 1, 1), (1, 1, 1, 2, 1),
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("B, T, S, H, Hk", ODD_BHT_CASES, ids=lambda *a: None)
@pytest.mark.parametrize("device, dtype, D", attention_params())
def test_odd_batch_heads_length(device, dtype, D, B, T, S, H, Hk, deterministic):
    q, k, v = make_qkv(B, T, S, H, Hk, D, dtype, device)
    index, counts = route_from_mask(routing_mask(B, T, "all", device))
    check_against_reference(q, k, v, index, counts, TOLERANCE[dtype], deterministic=deterministic)
