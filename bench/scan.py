"""gated_scan (cram) beside fla chunk_hgrn, torch.compile'd associative_scan and eager PyTorch.

    python -m bench.scan [--device auto|cpu|cuda] [--quick] [--dtype bf16,fp32] [--pass fwd|fwd_bwd|both]
                         [--impl cram,fla_chunk_hgrn,...] [--shape B,T,C]

The recurrence, per channel: h[:, t] = exp(log_a[:, t]) * h[:, t-1] + x[:, t], h[:, -1] = 0.

Implementations (impl):
  cram                      cram_ext.gated_scan(x, log_a)
  fla_chunk_hgrn            fla.ops.hgrn.chunk_hgrn(x, g=log_a) (Triton; skipped with a note if fla
                            does not import; a shape it fails on is skipped)
  associative_scan_compile  torch.compile of torch._higher_order_ops.associative_scan over the pairs
                            (a, x), combine (a1, x1), (a2, x2) -> (a1*a2, a2*x1 + x2) along T, in fp32
                            (combine_mode="pointwise" on a GPU; "generic" on CPU, where pointwise is
                            unsupported)
  torch_eager               eager PyTorch, Hillis-Steele log-step scan in fp32: ceil(log2 T) steps of
                            h[t] += a[t]*h[t-d], a[t] *= a[t-d] (O(T log T) work, stable: no exp(-cumsum))
  torch_compile             torch.compile of the same log-step scan
  reference_loop            cram_ext.reference.gated_scan: the plain Python loop over T (CPU only by
                            default; the issue's CPU target is cram fwd >= 20x this at (4,4096,256) fp32)

Minimal bytes (elt = element size of x's dtype; N = B*T*C; h_last (B, C) ignored):
  fwd      = read x, log_a; write h                                   = 3 * N * elt
  fwd_bwd  = fwd + backward (read grad_h, log_a, h; write grad_x, grad_log_a) = 8 * N * elt
The table prints GB/s = bytes / time and its fraction of the measured device-to-device copy bandwidth.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from . import common
from .common import Fatal, Runner, Sink

BENCH = "gated_scan"
IMPLS = ["cram", "fla_chunk_hgrn", "associative_scan_compile", "torch_eager", "torch_compile", "reference_loop"]
DEFAULT_IMPLS = {
    ("cuda", False): ["cram", "fla_chunk_hgrn", "associative_scan_compile", "torch_eager", "torch_compile"],
    ("cuda", True): ["cram", "fla_chunk_hgrn", "associative_scan_compile", "torch_eager", "torch_compile"],
    ("cpu", False): ["cram", "reference_loop", "torch_eager", "torch_compile", "associative_scan_compile"],
    # no torch.compile in the CPU smoke test: compiling takes 10-30 s on a small CPU
    ("cpu", True): ["cram", "reference_loop", "torch_eager"],
}
SHAPES = {
    ("cuda", False): [(8, 4096, 2048), (2, 16384, 4096), (64, 1024, 1024), (1, 65536, 512)],
    ("cuda", True): [(2, 1024, 256)],
    ("cpu", False): [(4, 4096, 256), (2, 1024, 512)],
    ("cpu", True): [(2, 256, 64), (1, 512, 32)],
}
DTYPES = {"cuda": [torch.bfloat16, torch.float32], "cpu": [torch.float32]}
CPU_TARGET = ((4, 4096, 256), "float32", 20.0)  # cram fwd >= 20x reference_loop
REFERENCE_BWD_MAX_T = 512


def scan_bytes(B: int, T: int, C: int, dtype: torch.dtype, pass_: str) -> int:
    n = B * T * C * common.element_size(dtype)
    return 3 * n if pass_ == "fwd" else 8 * n


# ------------------------------------------------------------------ baselines


def logstep_scan(x: torch.Tensor, log_a: torch.Tensor) -> torch.Tensor:
    """Hillis-Steele inclusive scan of h[t] = a[t] h[t-1] + x[t] along dim 1, in fp32."""
    T = x.shape[1]
    a = log_a.float().exp()
    h = x.float()
    d = 1
    while d < T:
        h = torch.cat([h[:, :d], torch.addcmul(h[:, d:], a[:, d:], h[:, :-d])], dim=1)
        if 2 * d < T:  # the last step needs no new a
            a = torch.cat([a[:, :d], a[:, d:] * a[:, :-d]], dim=1)
        d *= 2
    return h.to(x.dtype)


def _combine(left, right):
    a1, x1 = left
    a2, x2 = right
    return (a1 * a2, a2 * x1 + x2)


def _make_assoc(mode: str):
    from torch._higher_order_ops.associative_scan import associative_scan

    def assoc_scan(x, log_a):
        _, h = associative_scan(_combine, (log_a.float().exp(), x.float()), dim=1, combine_mode=mode)
        return h.to(x.dtype)

    return assoc_scan


_compiled: dict[str, object] = {}


def compiled(name: str):
    if name not in _compiled:
        if name == "torch_compile":
            fn = logstep_scan
        else:
            fn = _make_assoc(name.split(":")[1])
        _compiled[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _compiled[name]


def _fla():
    from fla.ops.hgrn import chunk_hgrn

    return lambda x, log_a: chunk_hgrn(x, log_a)[0]


# ----------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = common.base_parser(__doc__.split("\n")[0])
    p.epilog = "--shape takes B,T,C."
    p.add_argument("--no-check", action="store_true", help="skip the accuracy check of every impl")
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
    common.setup_torch(args.threads, compiling=any(i in impls for i in ("torch_compile", "associative_scan_compile")))
    shapes = [tuple(s[k] for k in "BTC") for s in common.parse_shapes(args.shape, ["B", "T", "C"], [])] \
        if args.shape else SHAPES[(dev, args.quick)]
    sink = Sink(args.out or common.default_out_path("scan", env, args.quick), append=args.append)
    runner = Runner(env, sink, cfg)

    import cram_ext

    print(f"bench.scan on {env.device_name} (torch {env.torch}, commit {env.commit}, "
          f"{torch.get_num_threads()} CPU threads)")
    print(f"cram_ext build: {cram_ext.build_info().get('backends')}; impls: {impls}; passes: {passes}")

    fns = {
        "cram": lambda x, la: cram_ext.gated_scan(x, la)[0],
        "torch_eager": logstep_scan,
        "reference_loop": lambda x, la: cram_ext.reference.gated_scan(x, la)[0],
    }
    if "fla_chunk_hgrn" in impls:
        try:
            fns["fla_chunk_hgrn"] = _fla()
        except Exception as e:  # noqa: BLE001 - ImportError, or triton failing to initialise
            runner.disable("fla_chunk_hgrn", None, f"fla does not import: {common.short_error(e)}")
    if "torch_compile" in impls:
        fns["torch_compile"] = compiled("torch_compile")
    # combine_mode "pointwise" (inductor's Triton scan) needs CUDA; "generic" is the CPU fallback.
    assoc_modes = ["pointwise"] if dev == "cuda" else ["generic"]

    try:
        copy = sink.add(common.copy_bandwidth_record(env, cfg, args.quick))
        print(f"  copy bandwidth: {common.gbps(copy):.1f} GB/s ({copy['bytes'] / 2**30:.2f} GiB moved, "
              f"{copy['ms']:.3f} ms)", flush=True)
        for B, T, C in shapes:
            for dtype in dtypes:
                run_shape(B, T, C, dtype, passes, impls, fns, assoc_modes, env, runner, check=not args.no_check)
    except Fatal as e:
        print(f"\nFATAL (device error, stopping): {e}")
        common.finish(sink, runner)
        return 1
    summarize(sink.records, dev)
    common.finish(sink, runner)
    return 0


def run_shape(B, T, C, dtype, passes, impls, fns, assoc_modes, env, runner: Runner, check: bool) -> None:
    import cram_ext

    device = env.device
    shape = {"B": B, "T": T, "C": C}
    print(f"\n== {common.shape_str(shape)}  {common.dtype_name(dtype)}", flush=True)
    x = torch.randn(B, T, C, device=device, dtype=dtype)
    # decays a = sigmoid(u), u ~ N(2, 1): a ~ 0.88 typical, state magnitudes O(1/(1-a))
    log_a = F.logsigmoid(torch.randn(B, T, C, device=device, dtype=torch.float32) + 2).to(dtype)
    grad_h = torch.randn_like(x)

    ref = None
    if check:
        try:
            with torch.no_grad():
                # the contract on CPU (for moderate sizes); the fp32 log-step scan elsewhere
                ref = (cram_ext.reference.gated_scan(x, log_a)[0] if device.type == "cpu" and B * T * C <= 2**24
                       else logstep_scan(x.float(), log_a.float()))
        except Exception as e:  # noqa: BLE001
            if common.is_fatal(e):
                raise Fatal(common.short_error(e, 400)) from e
            runner.note(f"accuracy check unavailable: {common.short_error(e)}")
            common.free_memory(device)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2

    for impl in impls:
        if not runner.enabled(impl):
            continue
        label = ""
        if impl == "associative_scan_compile":
            fn = _pick_assoc(x, log_a, assoc_modes, device, runner)
            if fn is None:
                continue
            label = f"({fn[0]})"
            f = fn[1]
        else:
            f = fns.get(impl)
            if f is None:
                continue
        for pass_ in passes:
            if impl == "reference_loop" and pass_ == "fwd_bwd" and T > REFERENCE_BWD_MAX_T:
                runner.note(f"reference_loop fwd_bwd T={T}: skipped (autograd through the loop's a[:, t] selects "
                            f"is O(T^2): 80 s a call at T=4096); measured for T <= {REFERENCE_BWD_MAX_T}")
                continue
            if pass_ == "fwd":
                def run():
                    with torch.no_grad():
                        return f(x, log_a)
            else:
                def run():
                    x_, la_ = x.detach().requires_grad_(), log_a.detach().requires_grad_()
                    return torch.autograd.grad(f(x_, la_), (x_, la_), grad_h)
            r = runner.time(impl, pass_, label, run, lambda ms, p=pass_, i=impl: common.make_record(
                env, bench=BENCH, impl=i, pass_=p, shape=shape, density=None, dtype=dtype, ms=ms,
                bytes_=scan_bytes(B, T, C, dtype, p), flops=None))
            if r is not None and pass_ == passes[0] and ref is not None:
                _check(impl, f, x, log_a, ref, tol, runner)
    del x, log_a, grad_h, ref
    common.free_memory(device)


def _pick_assoc(x, log_a, modes, device, runner: Runner):
    """The first combine_mode whose compiled associative_scan runs here: (mode, fn) or None."""
    errors = []
    for mode in modes:
        fn = compiled(f"assoc:{mode}")
        try:
            with torch.no_grad():
                fn(x, log_a)
            common.synchronize(device)
            return mode, fn
        except Exception as e:  # noqa: BLE001
            if common.is_fatal(e):
                raise Fatal(f"associative_scan_compile: {common.short_error(e, 400)}") from e
            errors.append(f"{mode}: {common.short_error(e, 120)}")
            common.free_memory(device)
    runner.note(f"associative_scan_compile {common.shape_str({'B': x.shape[0], 'T': x.shape[1], 'C': x.shape[2]})}: "
                f"skipped ({'; '.join(errors)})")
    return None


def _check(impl, f, x, log_a, ref, tol, runner: Runner) -> None:
    try:
        with torch.no_grad():
            h = f(x, log_a)
        err = float((h.float() - ref.float()).norm() / ref.float().norm())
        flag = "" if err <= tol else "   <-- WARNING: above tolerance"
        print(f"  check {impl:<24} rel err {err:.2e}{flag}", flush=True)
    except Exception as e:  # noqa: BLE001
        if common.is_fatal(e):
            raise Fatal(f"{impl} check: {common.short_error(e, 400)}") from e
        runner.note(f"{impl} check failed: {common.short_error(e)}")


def summarize(records: list[dict], dev: str) -> None:
    common.print_bandwidth_table(records, "gated_scan: all results (minimal bytes: fwd 3N, fwd_bwd 8N elements)")
    common.print_speedups(records, BENCH, [i for i in IMPLS if i != "cram"],
                          "speedup of cram: baseline ms / cram ms (> 1: cram faster)")
    if dev == "cpu":
        (B, T, C), dt, target = CPU_TARGET
        shape = {"B": B, "T": T, "C": C}
        pick = {r["impl"]: r for r in records if r["bench"] == BENCH and r["shape"] == shape and r["dtype"] == dt
                and r["pass"] == "fwd" and r["impl"] in ("cram", "reference_loop")}
        if len(pick) == 2:
            ratio = pick["reference_loop"]["ms"] / pick["cram"]["ms"]
            print(f"\nCPU target ({common.shape_str(shape)} {dt}): cram fwd >= {target:g}x faster than the "
                  f"reference loop: {ratio:.1f}x  {'PASS' if ratio >= target else 'FAIL'}")


if __name__ == "__main__":
    raise SystemExit(main())
