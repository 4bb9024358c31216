"""route (cram) beside eager PyTorch and torch.compile'd PyTorch.

    python -m bench.router [--device auto|cpu|cuda] [--quick] [--dtype bf16,fp32] [--pass fwd|fwd_bwd|both]
                           [--impl cram,torch_eager,torch_compile] [--shape B,T,C] [--threshold 0.5]
                           [--out PATH | --record] [--append] [--no-check] [--threads N] [--rep-ms MS]

What is computed (docs/design.md §2): prob = sigmoid(hidden @ weight + bias) in fp32, mask = prob > threshold,
counts = routed tokens per row, index = each row's routed positions ascending, then T.

Implementations (impl):
  cram           cram_ext.route(hidden, weight, bias, threshold)
  torch_eager    the natural eager code: (hidden @ weight).float() + bias (the matvec in hidden's
                 dtype, fp32 accumulation inside cuBLAS), sigmoid, > threshold, compaction with
                 mask.nonzero() + cumsum ranks (nonzero syncs the host: that is the baseline)
  torch_compile  torch.compile(fullgraph=True) of a sync-free version: fp32 dot product as a fused
                 reduction, sort-based compaction (as cram_ext.reference.route)

Inputs: hidden ~ N(0, 1), weight ~ N(0, 1/C) in hidden's dtype, bias = 0 (fp32 0-dim): about half
of the tokens are routed; the record's density is the routed fraction measured on the inputs.
fwd_bwd: prob.backward(random grad) into hidden, weight and bias.

Minimal bytes (N = B*T*C, elt = hidden's element size; BT = B*T):
  fwd      = read hidden (N*elt) + weight (C*elt) + write prob (4 BT), mask (BT), index (4 BT), counts (4 B)
  fwd_bwd  = fwd + backward: read grad_prob (4 BT), prob (4 BT), hidden (N*elt); write grad_hidden (N*elt),
             grad_weight (4 C), grad_bias (4)
The table prints GB/s and its fraction of the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import torch

from . import runner
from .registry import MEMORY_BOUND, Bench, Call, Case, Impl, register, rel_err


def route_bytes(case: Case, pass_: str) -> int:
    B, T, C = (case.shape[k] for k in "BTC")
    elt = case.dtype.itemsize
    n, bt = B * T * C, B * T
    fwd = n * elt + C * elt + 4 * bt + bt + 4 * bt + 4 * B
    if pass_ == "fwd":
        return fwd
    return fwd + 4 * bt + 4 * bt + n * elt + n * elt + 4 * C + 4


# ------------------------------------------------------------------ baselines


def eager_route(hidden, weight, bias, threshold: float):
    B, T, _ = hidden.shape
    prob = torch.sigmoid((hidden @ weight.to(hidden.dtype)).float() + bias.float())
    mask = prob > threshold
    counts = mask.sum(dim=1, dtype=torch.int32)
    b, t = mask.nonzero(as_tuple=True)  # host sync
    rank = mask.cumsum(dim=1)[b, t] - 1
    index = torch.full((B, T), T, dtype=torch.int32, device=hidden.device)
    index[b, rank] = t.to(torch.int32)
    return prob, mask, index, counts


_compiled = None


def compiled_route():
    """torch.compile(fullgraph=True) of the sync-free route: fp32 dot product as a fused
    reduction, sort-based compaction (cram_ext.route_from_mask, as cram_ext.reference.route)."""
    global _compiled
    if _compiled is None:
        from cram_ext import route_from_mask

        def sort_route(hidden, weight, bias, threshold: float):
            prob = torch.sigmoid((hidden.float() * weight.float()).sum(dim=-1) + bias.float())
            mask = prob > threshold
            index, counts = route_from_mask(mask)
            return prob, mask, index, counts

        _compiled = torch.compile(sort_route, dynamic=False, fullgraph=True)
    return _compiled


# ---------------------------------------------------------------- the cases


def setup(case: Case) -> Case:
    """Inputs and the reference route; the record's density is the routed fraction measured on them."""
    import cram_ext

    B, T, C = (case.shape[k] for k in "BTC")
    case.hidden = torch.randn(B, T, C, device=case.device, dtype=case.dtype)
    case.weight = (torch.randn(C, device=case.device) / C**0.5).to(case.dtype)
    case.bias = torch.zeros((), device=case.device, dtype=torch.float32)
    case.grad_prob = torch.randn(B, T, device=case.device, dtype=torch.float32)
    case.threshold = float(case.args.threshold)
    with torch.no_grad():
        case.reference = cram_ext.reference.route(case.hidden, case.weight, case.bias, case.threshold)
    case.density = float(case.reference.mask.float().mean().item())
    return case


def check(case: Case, result) -> tuple[str, bool]:
    """prob vs the reference; mask/index/counts must agree except where prob sits at the threshold
    within rounding (low-precision dot products may flip those tokens)."""
    import cram_ext

    prob, mask, index, counts = result
    ref = case.reference
    err = rel_err(prob, ref.prob)
    flips = int((mask != ref.mask).sum().item())
    # the compaction must be consistent with the impl's own mask
    own_index, own_counts = cram_ext.route_from_mask(mask)
    compact_ok = bool(torch.equal(index.to(torch.int32), own_index) and torch.equal(counts.to(torch.int32), own_counts))
    ok = err <= case.tol and compact_ok and flips <= max(1, mask.numel() // 1000)
    return f"prob rel err {err:.2e}, mask flips {flips}, compaction {'ok' if compact_ok else 'WRONG'}", ok


def route_call(case: Case, fn) -> Call:
    """fn(hidden, weight, bias, threshold) -> (prob, mask, index, counts); prob differentiated."""
    thr = case.threshold
    return Call(lambda h, w, b: fn(h, w, b, thr), (case.hidden, case.weight, case.bias), grad=case.grad_prob,
                out=0, check=lambda result: check(case, result))


def cram(case: Case) -> Call:
    import cram_ext

    return route_call(case, cram_ext.route)


# ------------------------------------------------------------------ the spec


SPEC = register(Bench(
    name="router",
    record="route",
    doc=__doc__,
    impls=[
        Impl("cram", cram),
        Impl("torch_eager", lambda case: route_call(case, eager_route)),
        Impl("torch_compile", lambda case: route_call(case, compiled_route()), compiles=True),
    ],
    defaults={
        ("cuda", False): ["cram", "torch_eager", "torch_compile"],
        ("cuda", True): ["cram", "torch_eager", "torch_compile"],
        ("cpu", False): ["cram", "torch_eager", "torch_compile"],
        ("cpu", True): ["cram", "torch_eager"],  # no torch.compile in the CPU smoke test (slow to compile)
    },
    **MEMORY_BOUND,
    setup=setup,
    bytes=route_bytes,
    tolerance=(1e-5, 1e-2),
    baselines=["torch_eager", "torch_compile"],
    title="route: all results (minimal bytes, see the module docstring)",
    flags=[(("--threshold",), {"type": float, "default": 0.5, "help": "router threshold"})],
))


def main(argv=None) -> int:
    return runner.main(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
