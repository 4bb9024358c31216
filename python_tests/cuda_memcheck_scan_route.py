"""CUDA gated_scan and route, forward and backward, against cram_ext.reference on small odd shapes.

A standalone script, not a pytest module: meant to run under
    compute-sanitizer --tool memcheck python python_tests/cuda_memcheck_scan_route.py
(and as a quick smoke test without it). The shapes are small but cover every code
path of the kernels: T = 1, T not a multiple of any block size, several chunks of
the parallel scan (look-back across chunk windows), C not a multiple of the 16-byte
vector, a partial last channel slice, tensors at an unaligned storage offset
(scalar path), h0 given or not, routing rows with none / all / some positions, rows
longer than one compaction span, and a CUDA graph capture of both ops.

The reference runs on the same device in float32 (float64 would be tighter but is
slow under the sanitizer). Exits 1 on any mismatch, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch
import torch.nn.functional as F

import cram_ext
from cram_ext import reference

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEV = "cuda"

failures: list[str] = []


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    num, den = (out - ref).norm().item(), ref.norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def check(what: str, ok: bool, detail: str = "") -> None:
    if not ok:
        failures.append(f"{what}: {detail}")
        print(f"FAIL {what}: {detail}", flush=True)


def check_close(what: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    if out.shape != ref.shape:
        check(what, False, f"shape {tuple(out.shape)} != {tuple(ref.shape)}")
        return
    if not torch.isfinite(out).all():
        check(what, False, "non-finite values")
        return
    err = rel_error(out, ref)
    check(what, err <= tol, f"relative error {err:.3e} > {tol:.1e}")


def unaligned(shape, dtype) -> torch.Tensor:
    """A contiguous tensor one element past a 16-byte boundary: the kernels' scalar path."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.empty(n + 1, device=DEV, dtype=dtype)
    return buf[1:].view(shape)


# ---------------------------------------------------------------- gated_scan


def scan_case(B: int, T: int, C: int, dtype: torch.dtype, with_h0: bool, misaligned: bool = False) -> None:
    name = f"gated_scan B={B} T={T} C={C} {dtype} h0={with_h0}{' unaligned' if misaligned else ''}"
    x = torch.randn(B, T, C, device=DEV).to(dtype)
    log_a = (-F.softplus(torch.randn(B, T, C, device=DEV))).to(dtype)
    if misaligned:
        x_u, l_u = unaligned((B, T, C), dtype), unaligned((B, T, C), dtype)
        x_u.copy_(x)
        l_u.copy_(log_a)
        x, log_a = x_u, l_u
    h0 = torch.randn(B, C, device=DEV) if with_h0 else None
    inputs = [x.requires_grad_(), log_a.requires_grad_()] + ([h0.requires_grad_()] if with_h0 else [])

    h, h_last = cram_ext.gated_scan(x, log_a, h0)
    refs = [t.detach().float().requires_grad_() for t in inputs]
    h_ref, h_last_ref = reference.gated_scan(refs[0], refs[1], refs[2] if with_h0 else None)
    tol = TOL[dtype]
    check_close(f"{name}: h", h, h_ref, tol)
    check_close(f"{name}: h_last", h_last, h_last_ref, max(tol, 1e-5))

    grad_h = torch.randn(B, T, C, device=DEV).to(dtype)
    grad_h_last = torch.randn(B, C, device=DEV)
    grads = torch.autograd.grad((h, h_last), inputs, (grad_h, grad_h_last))
    ref_grads = torch.autograd.grad((h_ref, h_last_ref), refs, (grad_h.float(), grad_h_last))
    for label, g, gr in zip(("x", "log_a", "h0"), grads, ref_grads):
        check_close(f"{name}: grad {label}", g, gr, tol)


def scan_cases(quick: bool) -> None:
    # (B, T, C): T = 1; odd T and C (scalar path); C a multiple of the vector with a
    # partial last channel slice (64 bf16 channels / 32 float32 channels per slice);
    # T spanning several chunks (forward 256 / backward 128 steps per chunk on the
    # vector path, 128 / 64 on the scalar path) so that the look-back walks windows.
    shapes = [(1, 1, 3), (3, 37, 3), (2, 37, 130), (3, 33, 200), (2, 300, 136), (1, 600, 64)]
    if not quick:
        shapes += [(2, 1100, 8), (1, 2100, 3)]
    for dtype in DTYPES:
        for i, (B, T, C) in enumerate(shapes):
            scan_case(B, T, C, dtype, with_h0=i % 2 == 0)
        scan_case(2, 300, 64, dtype, with_h0=True, misaligned=True)
        # T = 0: no steps, h_last = h0 and grad_h0 = grad_h_last.
        x = torch.zeros(2, 0, 8, device=DEV, dtype=dtype, requires_grad=True)
        h0 = torch.randn(2, 8, device=DEV, requires_grad=True)
        h, h_last = cram_ext.gated_scan(x, x.detach().clone().requires_grad_(), h0)
        check(f"gated_scan T=0 {dtype}: h_last", torch.equal(h_last, h0.detach()), "h_last != h0")
        g = torch.randn(2, 8, device=DEV)
        (gh0,) = torch.autograd.grad(h_last, h0, g)
        check(f"gated_scan T=0 {dtype}: grad h0", torch.equal(gh0, g), "grad_h0 != grad_h_last")


# --------------------------------------------------------------------- route


def route_case(B: int, T: int, C: int, dtype: torch.dtype, bias_value: float, with_force: bool,
               misaligned: bool = False) -> None:
    name = (f"route B={B} T={T} C={C} {dtype} bias={bias_value} force={with_force}"
            f"{' unaligned' if misaligned else ''}")
    hidden = torch.randn(B, T, C, device=DEV).to(dtype)
    if misaligned:
        h_u = unaligned((B, T, C), dtype)
        h_u.copy_(hidden)
        hidden = h_u
    weight = (torch.randn(C, device=DEV) / max(C, 1) ** 0.5).to(dtype)
    bias = torch.tensor(bias_value, device=DEV)
    force = torch.rand(B, T, device=DEV) < 0.1 if with_force else None
    threshold = 0.5

    hidden.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    r = cram_ext.route(hidden, weight, bias, threshold, force)
    hr, wr, br = (t.detach().float().requires_grad_() for t in (hidden, weight, bias))
    ref = reference.route(hr, wr, br, threshold, force)

    check_close(f"{name}: prob", r.prob, ref.prob, 1e-5)
    # The decision must follow the op's own prob exactly, and the reference's except
    # at probabilities within rounding of the threshold.
    own = r.prob > threshold
    if force is not None:
        own = own | force
    check(f"{name}: mask vs own prob", torch.equal(r.mask, own), "mask != (prob > threshold) | force")
    near = (ref.prob - threshold).abs() < 1e-4
    check(f"{name}: mask vs reference", torch.equal(r.mask & ~near, ref.mask & ~near), "mask differs")
    index, counts = cram_ext.route_from_mask(r.mask)
    check(f"{name}: counts", torch.equal(r.counts, counts), f"{r.counts.tolist()} != {counts.tolist()}")
    check(f"{name}: index", torch.equal(r.index, index), "index is not the compaction of mask")

    grad_prob = torch.randn(B, T, device=DEV)
    grads = torch.autograd.grad(r.prob, (hidden, weight, bias), grad_prob)
    ref_grads = torch.autograd.grad(ref.prob, (hr, wr, br), grad_prob)
    tol = TOL[dtype]
    if bias_value > 4:
        # Near prob = 1 the gradient's factor (1 - prob) is a cancellation: one ulp of
        # prob (~6e-8) is ~2e-4 of (1 - prob) at bias 8, in the reference as much as here.
        tol = max(tol, 1e-3)
    for label, g, gr in zip(("hidden", "weight", "bias"), grads, ref_grads):
        check_close(f"{name}: grad {label}", g, gr, max(tol, 1e-5) if label != "hidden" else tol)


def route_cases(quick: bool) -> None:
    # T beyond one compaction span (2048) and not a multiple of the 64-row tile;
    # bias +-8: every row all routed / none routed (counts = T / 0).
    shapes = [(1, 1, 3), (3, 37, 130), (2, 65, 64), (3, 100, 200)]
    if not quick:
        shapes += [(2, 4500, 16), (1, 2049, 24)]
    for dtype in DTYPES:
        for i, (B, T, C) in enumerate(shapes):
            route_case(B, T, C, dtype, bias_value=0.0, with_force=i % 2 == 1)
        route_case(2, 70, 64, dtype, bias_value=8.0, with_force=False)
        route_case(2, 70, 64, dtype, bias_value=-8.0, with_force=True)
        route_case(2, 70, 64, dtype, bias_value=-8.0, with_force=False)
        route_case(2, 70, 64, dtype, bias_value=0.0, with_force=True, misaligned=True)
    # T = 0: counts = 0, nothing else to write.
    r = cram_ext.route(torch.randn(3, 0, 8, device=DEV), torch.randn(8, device=DEV), torch.tensor(0.0, device=DEV))
    check("route T=0: counts", torch.equal(r.counts, torch.zeros(3, dtype=torch.int32, device=DEV)), "nonzero")


# ---------------------------------------------------------------- CUDA graphs


def graph_case() -> None:
    """Both ops captured in a CUDA graph (no host sync, no allocation outside the
    graph pool), replayed on new inputs, match eager."""
    B, T, C = 2, 700, 64
    x = torch.randn(B, T, C, device=DEV, dtype=torch.bfloat16)
    log_a = (-F.softplus(torch.randn(B, T, C, device=DEV))).to(torch.bfloat16)
    hidden = torch.randn(B, T, C, device=DEV, dtype=torch.bfloat16)
    weight = torch.randn(C, device=DEV) / C**0.5
    bias = torch.tensor(0.1, device=DEV)

    def step():
        h, h_last = cram_ext.gated_scan(x, log_a)
        r = cram_ext.route(hidden, weight, bias)
        return h, h_last, r.prob, r.index, r.counts

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        hidden.copy_(torch.randn_like(hidden))
        graph.replay()
        eager = step()
        for label, a, b in zip(("h", "h_last", "prob", "index", "counts"), outs, eager):
            check(f"cuda graph: {label}", torch.equal(a, b), "replay differs from eager")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the longest shapes")
    parser.add_argument("--device", default="cuda", help="cpu checks this script against the CPU ops")
    args = parser.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cpu":
        torch.manual_seed(0)
        scan_cases(args.quick)
        route_cases(args.quick)
        print(f"{len(failures)} check(s) failed" if failures else "all CPU checks passed")
        return 1 if failures else 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    if "cuda" not in cram_ext.build_info()["backends"]:
        print("cram_ext was built without CUDA", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    for part in (scan_cases, route_cases):
        try:
            part(args.quick)
        except Exception:  # an exception is a failure too, and the other part still runs
            failures.append(f"{part.__name__}: exception")
            traceback.print_exc()
    try:
        graph_case()
    except Exception:
        failures.append("graph_case: exception")
        traceback.print_exc()
    torch.cuda.synchronize()
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        return 1
    print("all CUDA gated_scan / route checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
