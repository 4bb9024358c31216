"""Standalone GPU check of the CUDA routed_attention kernels against the reference.

Run on a machine with a GPU after building cram_ext:

    python python_tests/cuda_attention_check.py            # all cases
    python python_tests/cuda_attention_check.py -k gqa     # cases whose name contains "gqa"
    compute-sanitizer --tool memcheck python python_tests/cuda_attention_check.py --quick

For every case the forward (and, unless --no-backward, the backward) of
`cram_ext.routed_attention` runs on CUDA and is compared with
`cram_ext.reference.routed_attention` run in float32 on the same GPU from the same
(rounded) inputs: relative error ||x - ref|| / ||ref|| on routed rows (bf16 <= 1e-2,
fp16 <= 5e-3) for both backward paths, exact 0 / -inf on rows that were not routed,
bitwise identical gradients over two deterministic=True backward runs, no NaN/inf. Prints one line per case and a summary;
exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from dataclasses import dataclass

import torch

import cram_ext
from cram_ext import reference
from conftest import rel_error

TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}


@dataclass
class Case:
    name: str
    B: int
    T: int
    H: int
    Hk: int
    D: int
    dtype: torch.dtype
    S: int | None = None  # None: S = T
    density: float = 0.5  # fraction of routed positions (random), per row
    pattern: str = "random"  # random | all | none | first | last | mixed
    logit_scale: float = 1.0  # multiplies q (large logits)
    softmax_scale: float | None = None

    def label(self) -> str:
        s = self.S if self.S is not None else self.T
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return (
            f"{self.name}[B={self.B} T={self.T} S={s} H={self.H} Hk={self.Hk} D={self.D} {dt} "
            f"{self.pattern} rho={self.density}]"
        )


def make_routing(case: Case, device, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask, index, counts) following route()'s conventions: index sorted, T in unused slots."""
    B, T = case.B, case.T
    if case.pattern == "random":
        mask = torch.rand(B, T, generator=gen, device=device) < case.density
    elif case.pattern == "all":
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
    elif case.pattern == "none":
        mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    elif case.pattern == "first":
        mask = torch.zeros(B, T, dtype=torch.bool, device=device)
        mask[:, 0] = True
    elif case.pattern == "last":
        mask = torch.zeros(B, T, dtype=torch.bool, device=device)
        mask[:, T - 1] = True
    elif case.pattern == "mixed":
        # Row 0: nothing routed; row 1: everything; other rows: random at `density`.
        mask = torch.rand(B, T, generator=gen, device=device) < case.density
        mask[0] = False
        if B > 1:
            mask[1] = True
    else:
        raise ValueError(case.pattern)
    return (mask, *cram_ext.route_from_mask(mask))


def run_case(case: Case, backward: bool, seed: int) -> list[str]:
    """Returns a list of failure messages (empty: pass)."""
    device = torch.device("cuda")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    S = case.S if case.S is not None else case.T
    q = (torch.randn(case.B, case.T, case.H, case.D, generator=gen, device=device) * case.logit_scale).to(case.dtype)
    k = torch.randn(case.B, S, case.Hk, case.D, generator=gen, device=device).to(case.dtype)
    v = torch.randn(case.B, S, case.Hk, case.D, generator=gen, device=device).to(case.dtype)
    mask, index, counts = make_routing(case, device, gen)
    tol = TOL[case.dtype]
    failures: list[str] = []

    # ---- forward
    out, lse = cram_ext.routed_attention(q, k, v, index, counts, case.softmax_scale)
    torch.cuda.synchronize()
    ref_out, ref_lse = reference.routed_attention(q.float(), k.float(), v.float(), index, counts, case.softmax_scale)

    if out.shape != q.shape or out.dtype != q.dtype:
        failures.append(f"out: shape/dtype {tuple(out.shape)} {out.dtype}, expected {tuple(q.shape)} {q.dtype}")
    if lse.shape != (case.B, case.H, case.T) or lse.dtype != torch.float32:
        failures.append(f"lse: shape/dtype {tuple(lse.shape)} {lse.dtype}")
    if failures:
        return failures

    routed = mask[:, :, None, None].expand_as(out)
    routed_lse = mask[:, None, :].expand_as(lse)
    if not torch.isfinite(out[routed]).all():
        failures.append("out: non-finite values on routed rows")
    if not torch.isfinite(lse[routed_lse]).all():
        failures.append("lse: non-finite values on routed rows")
    e = rel_error(out[routed].float(), ref_out[routed].float())
    if e > tol:
        failures.append(f"out: rel err {e:.3e} > {tol:.0e}")
    lse_err = (lse[routed_lse] - ref_lse[routed_lse]).abs().max().item() if routed_lse.any() else 0.0
    if lse_err > 1e-2:
        failures.append(f"lse: max abs err {lse_err:.3e} > 1e-2")
    if (out[~routed] != 0).any():
        failures.append("out: non-routed rows are not exactly 0")
    if not (lse[~routed_lse] == -math.inf).all():
        failures.append("lse: non-routed rows are not exactly -inf")
    fwd_msg = f"fwd err {e:.2e} lse {lse_err:.1e}"

    # ---- backward
    bwd_msg = ""
    if backward:
        grad_out = torch.randn(out.shape, generator=gen, device=device).to(case.dtype)
        scale = case.D**-0.5 if case.softmax_scale is None else float(case.softmax_scale)

        def cuda_grads(deterministic):
            return torch.ops.cram.routed_attention_backward.default(
                grad_out, q, k, v, out, lse, index, counts, scale, deterministic)

        # deterministic=True: bitwise identical twice. Both paths are checked for accuracy.
        det = cuda_grads(True)
        det2 = cuda_grads(True)
        torch.cuda.synchronize()
        for name, a, b2 in zip(("grad_q", "grad_k", "grad_v"), det, det2):
            if not torch.equal(a, b2):
                failures.append(f"{name}: two deterministic runs differ")
        dq, dk, dv = cuda_grads(False)

        qr = q.float().requires_grad_(True)
        kr = k.float().requires_grad_(True)
        vr = v.float().requires_grad_(True)
        o_ref, _ = reference.routed_attention(qr, kr, vr, index, counts, case.softmax_scale)
        (o_ref * grad_out.float()).sum().backward()
        errs = []
        # The floor of the pytest suite: a gradient that is exactly zero in the reference
        # (T = 1: one key, so dQ = 0) is compared against the scale of grad_out.
        floor = 0.1 * torch.linalg.vector_norm(grad_out[routed].double()).item()
        for path, grads in (("", (dq, dk, dv)), ("deterministic ", det)):
            for name, got, want in zip(("grad_q", "grad_k", "grad_v"), grads, (qr.grad, kr.grad, vr.grad)):
                name = path + name
                if got.shape != want.shape or got.dtype != case.dtype:
                    failures.append(f"{name}: shape/dtype {tuple(got.shape)} {got.dtype}")
                    continue
                if not torch.isfinite(got).all():
                    failures.append(f"{name}: non-finite values")
                ge = rel_error(got.float(), want, floor)
                if not path:
                    errs.append(f"{name[-1]} {ge:.2e}")
                if ge > tol:
                    failures.append(f"{name}: rel err {ge:.3e} > {tol:.0e}")
            if (grads[0][~routed] != 0).any():
                failures.append(f"{path}grad_q: non-routed rows are not exactly 0")
        # Through autograd as well (the registered backward is the same op).
        qa = q.clone().requires_grad_(True)
        oa, _ = cram_ext.routed_attention(qa, k, v, index, counts, case.softmax_scale, deterministic=True)
        oa.backward(grad_out)
        if not torch.equal(qa.grad, det[0]):
            failures.append("autograd grad_q differs from routed_attention_backward")
        bwd_msg = " bwd err " + " ".join(errs)
    print(f"  {'FAIL' if failures else 'ok  '} {case.label()}: {fwd_msg}{bwd_msg}")
    return failures


def graph_capture_check(deterministic: bool) -> list[str]:
    """The forward and backward under CUDA graph capture (no host sync, fixed shapes).
    deterministic=True replays bitwise; the default path sums dQ in a varying order."""
    device = torch.device("cuda")
    B, T, H, Hk, D = 2, 300, 4, 2, 64
    q = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(B, T, Hk, D, device=device, dtype=torch.bfloat16)
    v = torch.randn(B, T, Hk, D, device=device, dtype=torch.bfloat16)
    g = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    index, counts = cram_ext.route_from_mask(torch.rand(B, T, device=device) < 0.3)
    scale = D**-0.5

    def step():
        o, l = torch.ops.cram.routed_attention.default(q, k, v, index, counts, scale)
        grads = torch.ops.cram.routed_attention_backward.default(g, q, k, v, o, l, index, counts, scale,
                                                                 deterministic)
        return (o, l, *grads)

    eager = step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    # New routing, same shapes: the graph must follow counts/index on the device.
    index2, counts2 = cram_ext.route_from_mask(torch.rand(B, T, device=device) < 0.6)
    index.copy_(index2)
    counts.copy_(counts2)
    graph.replay()
    torch.cuda.synchronize()
    fresh = step()
    failures = []
    for name, a, b2 in zip(("out", "lse", "grad_q", "grad_k", "grad_v"), captured, fresh):
        same = torch.equal(a, b2) if deterministic or name != "grad_q" else torch.allclose(
            a.float(), b2.float(), rtol=1e-2, atol=1e-2)
        if not same:
            failures.append(f"cuda graph (deterministic={deterministic}): {name} after replay differs from eager")
    del eager
    print(f"  {'FAIL' if failures else 'ok  '} cuda graph capture + replay with new routing, deterministic={deterministic}")
    return failures


def cases(quick: bool) -> list[Case]:
    bf, hf = torch.bfloat16, torch.float16
    out: list[Case] = []
    for D in (64, 128):
        for dt in (bf, hf):
            out += [
                Case("t1", 2, 1, 2, 2, D, dt, pattern="all"),
                Case("t1_s_gt_t", 2, 1, 2, 1, D, dt, S=5, pattern="all"),
                Case("t37", 2, 37, 2, 2, D, dt, density=0.5),
                Case("t37_all", 1, 37, 2, 2, D, dt, pattern="all"),
                Case("gqa", 2, 129, 4, 2, D, dt, density=0.4),
                Case("gqa_s_gt_t", 2, 77, 4, 2, D, dt, S=200, density=0.5),
                Case("mixed_rows", 3, 150, 2, 1, D, dt, pattern="mixed", density=0.3),
                Case("none", 2, 64, 2, 2, D, dt, pattern="none"),
                Case("first", 2, 300, 2, 2, D, dt, pattern="first"),
                Case("last", 2, 300, 2, 2, D, dt, pattern="last"),
                # S >= 512 and few tiles: the split-KV path (2 splits), small enough for memcheck.
                Case("split_kv_small", 1, 600, 2, 1, D, dt, density=0.05),
            ]
            if not quick:
                out += [
                    Case("t4097", 1, 4097, 2, 2, D, dt, density=0.5),
                    # Few tiles over long keys: the split-KV path.
                    Case("split_kv", 1, 4097, 2, 2, D, dt, density=0.02),
                    Case("split_kv_s_gt_t", 2, 1500, 4, 1, D, dt, S=5000, density=0.05),
                    # Many tiles: the direct path.
                    Case("dense_many_tiles", 2, 2048, 8, 4, D, dt, pattern="all"),
                    Case("large_logits", 1, 513, 2, 2, D, dt, density=0.5, logit_scale=30.0),
                    Case("custom_scale", 1, 200, 2, 2, D, dt, density=0.5, softmax_scale=0.3),
                    Case("negative_scale", 1, 200, 2, 2, D, dt, density=0.5, softmax_scale=-0.1),
                ]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    ap.add_argument("--quick", action="store_true", help="small shapes only (for compute-sanitizer)")
    ap.add_argument("--no-backward", action="store_true", help="forward only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    info = torch.ops.cram.build_info()
    print(f"cram_ext build: {info}; device: {torch.cuda.get_device_name()}")

    selected = [c for c in cases(args.quick) if args.k in c.name]
    failed: list[tuple[str, list[str]]] = []
    for i, case in enumerate(selected):
        try:
            f = run_case(case, backward=not args.no_backward, seed=args.seed + i)
        except Exception:  # noqa: BLE001 - report and go on
            f = ["exception:\n" + traceback.format_exc()]
            print(f"  FAIL {case.label()}: exception")
        if f:
            failed.append((case.label(), f))
    n = len(selected)
    if not args.k and not args.no_backward:
        for deterministic in (True, False):
            n += 1
            try:
                f = graph_capture_check(deterministic)
            except Exception:  # noqa: BLE001
                f = ["exception:\n" + traceback.format_exc()]
                print("  FAIL cuda graph capture: exception")
            if f:
                failed.append((f"cuda graph, deterministic={deterministic}", f))

    print(f"\n{n - len(failed)}/{n} passed")
    for label, msgs in failed:
        print(f"FAILED {label}")
        for m in msgs:
            print(f"    {m}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
