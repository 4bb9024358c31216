"""routed_attention (cram) beside dense causal attention and FlexAttention on gathered queries.

    python -m bench.attention [--device auto|cpu|cuda] [--quick] [--dtype bf16] [--pass fwd|fwd_bwd|both]
                              [--impl cram,sdpa_cudnn,...] [--shape B,H,T,D[,Hk]] [--densities 0.1,0.5]

Implementations (impl):
  cram            cram_ext.routed_attention on q (B,T,H,D), k/v (B,S,Hk,D) and a routing (index, counts)
  cram_deterministic  the same with deterministic=True (forward+backward only; the forward is the same)
  sdpa_flash      F.scaled_dot_product_attention(is_causal=True) forced to SDPBackend.FLASH_ATTENTION
  sdpa_cudnn      ... forced to SDPBackend.CUDNN_ATTENTION
  sdpa_efficient  ... forced to SDPBackend.EFFICIENT_ATTENTION
  sdpa_math       ... forced to SDPBackend.MATH (not run by default: it materialises T x T)
  sdpa            plain SDPA(is_causal=True), backend chosen by PyTorch (the CPU baseline)
  flex_gathered   torch.compile(flex_attention) on the routed queries gathered to (B,H,n_max,D),
                  mask_mod: kv_idx <= pos[b, q_idx] + (S - T) with pos the original positions
                  (padding slots: pos = -1, fully masked). The gather of q and the block mask are
                  built outside the timing (the gather is O(n*H*D), negligible); FlexAttention's
                  output stays compacted (B,H,n_max,D), cram's is scattered to (B,T,H,D).

Layouts: SDPA and FlexAttention take (B,H,T,D): the transposes (and contiguous copies) are made
outside the timing. GQA: SDPA gets enable_gqa=True (k/v repeated outside the timing if a backend
refuses it), FlexAttention enable_gqa=True.

Routing: for density rho, n = round(rho*T) positions per batch row, uniformly without replacement,
compacted on the device by sorting (as cram_ext.reference.route does).

FLOP convention (useful FLOPs, as FlashAttention's benchmarks count them):
  routed forward  = 4 * H * D * sum over routed (b, t) of (t + 1 + S - T)   (keys each routed query sees)
  dense causal    = 4 * B * H * D * T * (T + 1) / 2                          (S == T)
  forward+backward = 3.5 x forward (backward = 2.5 x forward: 5 matmuls of which 1 recomputes).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from . import common
from .common import Fatal, Runner, Sink

BENCH = "routed_attention"
FWD_BWD_FACTOR = 3.5

SDPA_BACKENDS = {  # impl -> SDPBackend attribute name
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
}
IMPLS = ["cram", "cram_deterministic", "sdpa", *SDPA_BACKENDS, "flex_gathered"]
DEFAULT_IMPLS = {
    "cuda": ["cram", "cram_deterministic", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex_gathered"],
    "cpu": ["cram", "sdpa"],
}


def _shape(B, H, T, D, Hk=None, S=None):
    return {"B": B, "H": H, "Hk": H if Hk is None else Hk, "T": T, "S": T if S is None else S, "D": D}


SHAPES = {
    ("cuda", False): [_shape(2, 16, 8192, 128), _shape(1, 16, 32768, 128), _shape(4, 32, 4096, 64),
                      _shape(2, 32, 8192, 128, Hk=8)],
    ("cuda", True): [_shape(1, 4, 1024, 64), _shape(1, 8, 1024, 128, Hk=2)],
    ("cpu", False): [_shape(1, 4, 4096, 64)],
    ("cpu", True): [_shape(1, 2, 256, 32), _shape(2, 4, 192, 32, Hk=2)],
}
DENSITIES = {
    ("cuda", False): [0.016, 0.05, 0.1, 0.25, 0.5, 1.0],
    ("cuda", True): [0.1],  # FlexAttention compiles once per (shape, density, pass)
    ("cpu", False): [0.05, 0.1, 0.25, 1.0],
    ("cpu", True): [0.1, 1.0],
}
DTYPES = {"cuda": [torch.bfloat16], "cpu": [torch.float32]}
CPU_TARGET_SHAPE = _shape(1, 4, 4096, 64)  # the CPU target: cram fwd at rho=0.1 >= 4x sdpa


# ------------------------------------------------------------------- routing


def routing_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool -> (index (B, T) int32, counts (B,) int32), on the mask's device, no host sync:
    routed positions ascending in index[b, :counts[b]], then T (the layout cram_ext.route returns)."""
    B, T = mask.shape
    counts = mask.sum(dim=1, dtype=torch.int32)
    positions = torch.arange(T, device=mask.device).expand(B, T)
    index = torch.where(mask, positions, T).sort(dim=1).values.to(torch.int32)
    return index, counts


def random_routing(B: int, T: int, density: float, device, generator: torch.Generator | None = None):
    """n = round(density*T) (at least 1) routed positions per row, uniformly without replacement."""
    n = min(T, max(1, round(density * T)))
    scores = torch.rand(B, T, device=device, generator=generator)
    chosen = scores.topk(n, dim=1).indices
    mask = torch.zeros(B, T, dtype=torch.bool, device=device).scatter_(1, chosen, True)
    return routing_from_mask(mask)


def routed_fwd_flops(index: torch.Tensor, counts: torch.Tensor, H: int, D: int, S: int, T: int) -> float:
    """4*H*D * sum over routed (b, t) of (t + 1 + S - T). Reads the routing on the host."""
    slot = torch.arange(index.shape[1], device=index.device)
    valid = slot < counts.unsqueeze(1).long()
    keys = torch.where(valid, index.long() + 1 + (S - T), 0)
    return 4.0 * H * D * float(keys.sum().item())


def dense_fwd_flops(B: int, H: int, T: int, D: int) -> float:
    return 4.0 * B * H * D * T * (T + 1) / 2


# ------------------------------------------------------------- FlexAttention


def gathered_positions(index: torch.Tensor, counts: torch.Tensor, T: int):
    """The compacted view FlexAttention works on.

    Returns (pos, gather_idx, n_max): pos (B, n_max) int64 original positions, -1 in padding
    slots; gather_idx (B, n_max) int64 in [0, T) (padding slots clamped, their rows are masked);
    n_max = max(counts) (a host read, done once outside the timing)."""
    n_max = max(1, int(counts.max().item()))
    idx = index[:, :n_max].long()
    valid = torch.arange(n_max, device=index.device) < counts.unsqueeze(1).long()
    pos = torch.where(valid, idx, -1)
    gather_idx = idx.clamp(0, T - 1)
    return pos, gather_idx, n_max


def gather_queries(q_bhtd: torch.Tensor, gather_idx: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) gathered along T at gather_idx (B, n) -> (B, H, n, D), contiguous."""
    B, H, _, D = q_bhtd.shape
    n = gather_idx.shape[1]
    return q_bhtd.gather(2, gather_idx[:, None, :, None].expand(B, H, n, D)).contiguous()


def make_mask_mod(pos: torch.Tensor, offset: int):
    """mask_mod(b, h, q_idx, kv_idx): query slot q_idx of row b sits at original position
    pos[b, q_idx] and sees keys kv_idx <= pos + (S - T); padding slots (pos < 0) see nothing."""

    def mask_mod(b, h, q_idx, kv_idx):
        p = pos[b, q_idx]
        return (p >= 0) & (kv_idx <= p + offset)

    return mask_mod


def build_block_mask(pos: torch.Tensor, offset: int, B: int, n_max: int, S: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = make_mask_mod(pos, offset)
    try:
        return create_block_mask(mask_mod, B, None, n_max, S, device=device)
    except Exception as e:  # noqa: BLE001 - e.g. OOM of the dense mask at long T: build it compiled
        if common.is_fatal(e):
            raise
        common.free_memory(torch.device(device))
        return torch.compile(create_block_mask)(mask_mod, B, None, n_max, S, device=device)


_flex_compiled = None


def flex_fn(compiled: bool = True):
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


# ---------------------------------------------------------------------- SDPA


def cram_fwd_bwd(q, k, v, index, counts, grad_out, deterministic: bool):
    """A timed forward+backward of routed_attention (fresh leaves each call)."""
    import cram_ext

    def fn():
        q_, k_, v_ = (x.detach().requires_grad_() for x in (q, k, v))
        o, _ = cram_ext.routed_attention(q_, k_, v_, index, counts, deterministic=deterministic)
        return torch.autograd.grad(o, (q_, k_, v_), grad_out)
    return fn


def sdpa_context(impl: str):
    if impl not in SDPA_BACKENDS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[impl]))


def _first_working(candidates, device):
    """candidates: [(note, fn)]; the first whose fn() runs (probed once), else the last."""
    for note, fn in candidates[:-1]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
                common.synchronize(device)
            return note, fn
        except Exception as e:  # noqa: BLE001
            if common.is_fatal(e):
                raise Fatal(common.short_error(e, 400)) from e
    return candidates[-1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--densities", default=None, help="comma list of routing densities")
    p.add_argument("--no-check", action="store_true", help="skip the accuracy check of cram/flex vs fp32 SDPA")
    p.epilog = "--shape takes B,H,T,D[,Hk] (S = T)."
    args = p.parse_args(argv)

    device = common.resolve_device(args.device)
    dev = device.type
    torch.manual_seed(0)
    env = common.Env.detect(device)
    cfg = common.timing_config(device, args.quick, args.rep_ms)
    passes = common.parse_passes(args.passes)
    dtypes = common.parse_dtypes(args.dtype, DTYPES[dev])
    impls = common.parse_impls(args.impl, DEFAULT_IMPLS[dev], IMPLS)
    common.setup_torch(args.threads, compiling="flex_gathered" in impls)
    shapes = [
        _shape(**s) for s in common.parse_shapes(args.shape, ["B", "H", "T", "D"], SHAPES[(dev, args.quick)],
                                                 optional={"Hk": None})
    ] if args.shape else SHAPES[(dev, args.quick)]
    densities = [float(x) for x in args.densities.split(",")] if args.densities else DENSITIES[(dev, args.quick)]
    out_path = args.out or common.default_out_path("attention", env, args.quick)
    sink = Sink(out_path, append=args.append)
    runner = Runner(env, sink, cfg)

    import cram_ext

    print(f"bench.attention on {env.device_name} (torch {env.torch}, commit {env.commit}, "
          f"{torch.get_num_threads()} CPU threads)")
    print(f"cram_ext build: {cram_ext.build_info().get('backends')}; impls: {impls}; passes: {passes}")
    try:
        for shape in shapes:
            for dtype in dtypes:
                run_shape(shape, dtype, densities, passes, impls, env, runner, check=not args.no_check)
    except Fatal as e:
        print(f"\nFATAL (device error, stopping): {e}")
        common.finish(sink, runner)
        return 1
    summarize(sink.records, dev)
    common.finish(sink, runner)
    return 0


def run_shape(shape, dtype, densities, passes, impls, env, runner: Runner, check: bool) -> None:
    import cram_ext

    device = env.device
    B, H, Hk, T, S, D = (shape[k] for k in ("B", "H", "Hk", "T", "S", "D"))
    if H % Hk or S < T:
        runner.note(f"shape {shape}: needs H % Hk == 0 and S >= T, skipped")
        return
    gqa = Hk != H
    print(f"\n== {common.shape_str(shape)}  {common.dtype_name(dtype)}", flush=True)

    q = torch.randn(B, T, H, D, device=device, dtype=dtype)
    k = torch.randn(B, S, Hk, D, device=device, dtype=dtype)
    v = torch.randn(B, S, Hk, D, device=device, dtype=dtype)
    grad_out = torch.randn_like(q)
    # (B, H, T, D) contiguous copies for SDPA / FlexAttention, made outside the timing.
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    grad_out_t = grad_out.transpose(1, 2).contiguous()
    dense_flops = dense_fwd_flops(B, H, T, D) if S == T else None

    def rec(impl, pass_, density, flops_fwd):
        flops = None if flops_fwd is None else flops_fwd * (FWD_BWD_FACTOR if pass_ == "fwd_bwd" else 1.0)
        return lambda ms: common.make_record(env, bench=BENCH, impl=impl, pass_=pass_, shape=shape,
                                             density=density, dtype=dtype, ms=ms, bytes_=None, flops=flops)

    # ---- dense baselines
    for impl in [i for i in impls if i == "sdpa" or i in SDPA_BACKENDS]:
        if S != T:
            runner.note(f"{impl}: is_causal SDPA is top-left aligned, S != T not comparable, skipped")
            continue
        if gqa:
            k_rep, v_rep = (x.repeat_interleave(H // Hk, dim=1) for x in (kt, vt))
        for pass_ in passes:
            with sdpa_context(impl):
                candidates = []
                if pass_ == "fwd":
                    def fwd(kk=kt, vv=vt, g=gqa):
                        with torch.no_grad():
                            return F.scaled_dot_product_attention(qt, kk, vv, is_causal=True, enable_gqa=g)
                    candidates.append(("", fwd))
                    if gqa:
                        candidates.append((" (k/v repeated)", lambda: fwd(k_rep, v_rep, False)))
                else:
                    def fwd_bwd(kk=kt, vv=vt, g=gqa):
                        q_, k_, v_ = (x.detach().requires_grad_() for x in (qt, kk, vv))
                        o = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=g)
                        return torch.autograd.grad(o, (q_, k_, v_), grad_out_t)
                    candidates.append(("", fwd_bwd))
                    if gqa:
                        candidates.append((" (k/v repeated)", lambda: fwd_bwd(k_rep, v_rep, False)))
                note, fn = _first_working(candidates, device)
                runner.time(impl, pass_, f"dense{note}", fn, rec(impl, pass_, None, dense_flops))
        if gqa:
            del k_rep, v_rep

    # ---- fp32 reference for the accuracy check (k/v repeated: fp32 + enable_gqa could fall to math)
    ref = None
    if check and ("cram" in impls or "flex_gathered" in impls) and S == T:
        try:
            with torch.no_grad():
                rk, rv = (x.float().repeat_interleave(H // Hk, dim=1) for x in (kt, vt))
                ref = F.scaled_dot_product_attention(qt.float(), rk, rv, is_causal=True)  # (B, H, T, D)
                del rk, rv
        except Exception as e:  # noqa: BLE001
            if common.is_fatal(e):
                raise Fatal(common.short_error(e, 400)) from e
            runner.note(f"accuracy check unavailable: {common.short_error(e)}")
            common.free_memory(device)
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2

    # ---- routed: cram and FlexAttention on gathered queries
    for density in densities:
        index, counts = random_routing(B, T, density, device)
        flops = routed_fwd_flops(index, counts, H, D, S, T)
        n_routed = int(counts.sum().item())

        if "cram" in impls and runner.enabled("cram"):
            if ref is not None:
                try:
                    with torch.no_grad():
                        out, _ = cram_ext.routed_attention(q, k, v, index, counts)
                    mask = cram_ext.reference.routed_mask(index, counts, T)
                    err = rel_err(out[mask], ref.transpose(1, 2)[mask])
                    zero = bool((out[~mask] == 0).all()) if n_routed < B * T else True
                    flag = "" if (err <= tol and zero) else "   <-- WARNING: above tolerance" if zero else \
                        "   <-- WARNING: unrouted rows not zero"
                    print(f"  check cram  rho={density:<6} rel err {err:.2e} vs fp32 SDPA{flag}", flush=True)
                    del out
                except NotImplementedError as e:
                    runner.disable("cram", "fwd", common.short_error(e))
                except Exception as e:  # noqa: BLE001
                    if common.is_fatal(e):
                        raise Fatal(f"cram check: {common.short_error(e, 400)}") from e
                    runner.note(f"cram check rho={density}: {common.short_error(e)}")
            for pass_ in passes:
                if pass_ == "fwd":
                    def fn():
                        with torch.no_grad():
                            return cram_ext.routed_attention(q, k, v, index, counts)
                else:
                    fn = cram_fwd_bwd(q, k, v, index, counts, grad_out, deterministic=False)
                runner.time("cram", pass_, f"rho={density}", fn, rec("cram", pass_, density, flops))

        if "cram_deterministic" in impls and runner.enabled("cram_deterministic") and "fwd_bwd" in passes:
            runner.time("cram_deterministic", "fwd_bwd", f"rho={density}",
                        cram_fwd_bwd(q, k, v, index, counts, grad_out, deterministic=True),
                        rec("cram_deterministic", "fwd_bwd", density, flops))

        if "flex_gathered" in impls and runner.enabled("flex_gathered"):
            try:
                pos, gather_idx, n_max = gathered_positions(index, counts, T)
                q_g = gather_queries(qt, gather_idx)
                block_mask = build_block_mask(pos, S - T, B, n_max, S, device)
                flex = flex_fn(compiled=True)
            except Exception as e:  # noqa: BLE001
                if common.is_fatal(e):
                    raise Fatal(f"flex setup: {common.short_error(e, 400)}") from e
                runner.note(f"flex_gathered rho={density}: setup failed ({common.short_error(e)})")
                common.free_memory(device)
                continue
            grad_g = torch.randn_like(q_g)
            for pass_ in passes:
                if pass_ == "fwd":
                    def fn():
                        with torch.no_grad():
                            return flex(q_g, kt, vt, block_mask=block_mask, enable_gqa=gqa)
                else:
                    def fn():
                        q_, k_, v_ = (x.detach().requires_grad_() for x in (q_g, kt, vt))
                        o = flex(q_, k_, v_, block_mask=block_mask, enable_gqa=gqa)
                        return torch.autograd.grad(o, (q_, k_, v_), grad_g)
                r = runner.time("flex_gathered", pass_, f"rho={density} n_max={n_max}", fn,
                                rec("flex_gathered", pass_, density, flops))
                if r is not None and pass_ == passes[0] and ref is not None:
                    try:
                        with torch.no_grad():
                            o = flex(q_g, kt, vt, block_mask=block_mask, enable_gqa=gqa)
                        valid = pos >= 0
                        ref_g = gather_queries(ref, gather_idx)
                        err = rel_err(o.transpose(1, 2)[valid], ref_g.transpose(1, 2)[valid])
                        flag = "" if err <= tol else "   <-- WARNING: above tolerance"
                        print(f"  check flex  rho={density:<6} rel err {err:.2e} vs fp32 SDPA{flag}", flush=True)
                    except Exception as e:  # noqa: BLE001
                        if common.is_fatal(e):
                            raise Fatal(f"flex check: {common.short_error(e, 400)}") from e
                        runner.note(f"flex check rho={density}: {common.short_error(e)}")
            del q_g, grad_g, block_mask
        del index, counts
    del q, k, v, qt, kt, vt, grad_out, grad_out_t, ref
    common.free_memory(device)


def summarize(records: list[dict], dev: str) -> None:
    recs = [r for r in records if r["bench"] == BENCH]
    rows = []
    for r in recs:
        t = common.tflops(r)
        rows.append([common.shape_str(r["shape"]), r["dtype"], r["pass"], r["impl"], common.fmt(r["density"]),
                     common.fmt(r["ms"], ".4f"), common.fmt(t, ".4g")])
    common.print_table(["shape", "dtype", "pass", "impl", "density", "ms", "TFLOP/s"], rows,
                       "routed_attention: all results (useful FLOPs; fwd_bwd = 3.5 x fwd)")
    common.print_speedups(records, BENCH, ["sdpa", *SDPA_BACKENDS, "flex_gathered"],
                          "speedup of cram: baseline ms / cram ms (> 1: cram faster); flex matched on density",
                          match_density=["flex_gathered"])
    if dev == "cpu":
        # The CPU target: routed_attention fwd at density 0.1 >= 4x faster than dense SDPA causal.
        for c in recs:
            if c["impl"] == "cram" and c["pass"] == "fwd" and c["density"] == 0.1 and c["shape"] == CPU_TARGET_SHAPE:
                base = [r for r in recs if r["impl"] == "sdpa" and r["pass"] == "fwd" and r["shape"] == c["shape"]
                        and r["dtype"] == c["dtype"]]
                if base:
                    ratio = base[0]["ms"] / c["ms"]
                    print(f"\nCPU target ({common.shape_str(c['shape'])} {c['dtype']}): cram fwd at density 0.1 "
                          f">= 4x faster than sdpa causal: {ratio:.2f}x  {'PASS' if ratio >= 4 else 'FAIL'}")


if __name__ == "__main__":
    raise SystemExit(main())
