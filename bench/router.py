"""route (cram) beside eager PyTorch and torch.compile'd PyTorch.

    python -m bench.router [--device auto|cpu|cuda] [--quick] [--dtype bf16,fp32] [--pass fwd|fwd_bwd|both]
                           [--impl cram,torch_eager,torch_compile] [--shape B,T,C] [--threshold 0.5]

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

from . import common
from .common import Fatal, Runner, Sink

BENCH = "route"
IMPLS = ["cram", "torch_eager", "torch_compile"]
DEFAULT_IMPLS = {
    ("cuda", False): IMPLS,
    ("cuda", True): IMPLS,
    ("cpu", False): IMPLS,
    ("cpu", True): ["cram", "torch_eager"],  # no torch.compile in the CPU smoke test (slow to compile)
}
SHAPES = {
    ("cuda", False): [(8, 4096, 2048), (2, 16384, 4096), (64, 1024, 1024), (1, 65536, 512)],
    ("cuda", True): [(2, 1024, 256)],
    ("cpu", False): [(4, 4096, 256), (2, 1024, 512)],
    ("cpu", True): [(2, 256, 64), (1, 512, 32)],
}
DTYPES = {"cuda": [torch.bfloat16, torch.float32], "cpu": [torch.float32]}


def route_bytes(B: int, T: int, C: int, dtype: torch.dtype, pass_: str) -> int:
    elt = common.element_size(dtype)
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


def sort_route(hidden, weight, bias, threshold: float):
    B, T, _ = hidden.shape
    prob = torch.sigmoid((hidden.float() * weight.float()).sum(dim=-1) + bias.float())
    mask = prob > threshold
    counts = mask.sum(dim=1, dtype=torch.int32)
    positions = torch.arange(T, device=hidden.device).expand(B, T)
    index = torch.where(mask, positions, T).sort(dim=1).values.to(torch.int32)
    return prob, mask, index, counts


_compiled = None


def compiled_route():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(sort_route, dynamic=False, fullgraph=True)
    return _compiled


# ----------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = common.base_parser(__doc__.split("\n")[0])
    p.epilog = "--shape takes B,T,C."
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--no-check", action="store_true", help="skip the check of every impl against the reference")
    args = p.parse_args(argv)

    device = common.resolve_device(args.device)
    dev = device.type
    torch.manual_seed(0)
    env = common.Env.detect(device)
    cfg = common.timing_config(device, args.quick, args.rep_ms)
    passes = common.parse_passes(args.passes)
    # GPU smoke test: bf16 only (every compiled impl compiles once per shape, dtype and pass)
    dtypes = common.parse_dtypes(args.dtype, [torch.bfloat16] if args.quick and dev == "cuda" else DTYPES[dev])
    impls = common.parse_impls(args.impl, DEFAULT_IMPLS[(dev, args.quick)], IMPLS)
    common.setup_torch(args.threads, compiling="torch_compile" in impls)
    shapes = [tuple(s[k] for k in "BTC") for s in common.parse_shapes(args.shape, ["B", "T", "C"], [])] \
        if args.shape else SHAPES[(dev, args.quick)]
    sink = Sink(args.out or common.default_out_path("router", env, args.quick), append=args.append)
    runner = Runner(env, sink, cfg)

    import cram_ext

    print(f"bench.router on {env.device_name} (torch {env.torch}, commit {env.commit}, "
          f"{torch.get_num_threads()} CPU threads)")
    print(f"cram_ext build: {cram_ext.build_info().get('backends')}; impls: {impls}; passes: {passes}")

    thr = float(args.threshold)
    fns = {
        "cram": lambda h, w, b: cram_ext.route(h, w, b, thr),
        "torch_eager": lambda h, w, b: eager_route(h, w, b, thr),
    }
    if "torch_compile" in impls:
        c = compiled_route()
        fns["torch_compile"] = lambda h, w, b: c(h, w, b, thr)

    try:
        copy = sink.add(common.copy_bandwidth_record(env, cfg, args.quick))
        print(f"  copy bandwidth: {common.gbps(copy):.1f} GB/s ({copy['bytes'] / 2**30:.2f} GiB moved, "
              f"{copy['ms']:.3f} ms)", flush=True)
        for B, T, C in shapes:
            for dtype in dtypes:
                run_shape(B, T, C, dtype, thr, passes, impls, fns, env, runner, check=not args.no_check)
    except Fatal as e:
        print(f"\nFATAL (device error, stopping): {e}")
        common.finish(sink, runner)
        return 1
    summarize(sink.records)
    common.finish(sink, runner)
    return 0


def run_shape(B, T, C, dtype, thr, passes, impls, fns, env, runner: Runner, check: bool) -> None:
    import cram_ext

    device = env.device
    shape = {"B": B, "T": T, "C": C}
    print(f"\n== {common.shape_str(shape)}  {common.dtype_name(dtype)}", flush=True)
    hidden = torch.randn(B, T, C, device=device, dtype=dtype)
    weight = (torch.randn(C, device=device) / C**0.5).to(dtype)
    bias = torch.zeros((), device=device, dtype=torch.float32)
    grad_prob = torch.randn(B, T, device=device, dtype=torch.float32)
    with torch.no_grad():
        ref = cram_ext.reference.route(hidden, weight, bias, thr)
    density = float(ref.mask.float().mean().item())

    for impl in impls:
        f = fns.get(impl)
        if f is None or not runner.enabled(impl):
            continue
        for pass_ in passes:
            if pass_ == "fwd":
                def run():
                    with torch.no_grad():
                        return f(hidden, weight, bias)
            else:
                def run():
                    h_, w_, b_ = (t.detach().requires_grad_() for t in (hidden, weight, bias))
                    prob = f(h_, w_, b_)[0]
                    return torch.autograd.grad(prob, (h_, w_, b_), grad_prob)
            r = runner.time(impl, pass_, "", run, lambda ms, p=pass_, i=impl: common.make_record(
                env, bench=BENCH, impl=i, pass_=p, shape=shape, density=density, dtype=dtype, ms=ms,
                bytes_=route_bytes(B, T, C, dtype, p), flops=None))
            if r is not None and pass_ == passes[0] and check:
                _check(impl, f, hidden, weight, bias, ref, runner)
    del hidden, weight, bias, grad_prob, ref
    common.free_memory(device)


def _check(impl, f, hidden, weight, bias, ref, runner: Runner) -> None:
    """prob vs the reference; mask/index/counts must agree except where prob sits at the threshold
    within rounding (low-precision dot products may flip those tokens)."""
    try:
        with torch.no_grad():
            prob, mask, index, counts = f(hidden, weight, bias)
        err = float((prob.float() - ref.prob.float()).norm() / ref.prob.float().norm())
        flips = int((mask != ref.mask).sum().item())
        # the compaction must be consistent with the impl's own mask
        own_index, own_counts = _compact(mask)
        compact_ok = bool(torch.equal(index.to(torch.int32), own_index) and torch.equal(counts.to(torch.int32), own_counts))
        tol = 1e-5 if hidden.dtype in (torch.float32, torch.float64) else 1e-2
        bad = err > tol or not compact_ok or flips > max(1, mask.numel() // 1000)
        print(f"  check {impl:<14} prob rel err {err:.2e}, mask flips {flips}, compaction "
              f"{'ok' if compact_ok else 'WRONG'}{'   <-- WARNING' if bad else ''}", flush=True)
    except Exception as e:  # noqa: BLE001
        if common.is_fatal(e):
            raise Fatal(f"{impl} check: {common.short_error(e, 400)}") from e
        runner.note(f"{impl} check failed: {common.short_error(e)}")


def _compact(mask):
    B, T = mask.shape
    counts = mask.sum(dim=1, dtype=torch.int32)
    positions = torch.arange(T, device=mask.device).expand(B, T)
    return torch.where(mask, positions, T).sort(dim=1).values.to(torch.int32), counts


def summarize(records: list[dict]) -> None:
    common.print_bandwidth_table(records, "route: all results (minimal bytes, see the module docstring)")
    common.print_speedups(records, BENCH, [i for i in IMPLS if i != "cram"],
                          "speedup of cram: baseline ms / cram ms (> 1: cram faster)")


if __name__ == "__main__":
    raise SystemExit(main())
