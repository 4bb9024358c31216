"""routed_attention (cram) beside dense causal attention and FlexAttention on gathered queries.

    python -m bench.attention [--device auto|cpu|cuda] [--quick] [--dtype bf16] [--pass fwd|fwd_bwd|both]
                              [--impl cram,sdpa_cudnn,...] [--shape B,H,T,D[,Hk]] [--densities 0.1,0.5]
                              [--out PATH | --record] [--append] [--no-check] [--threads N] [--rep-ms MS]

Implementations (impl):
  cram            cram_ext.routed_attention on q (B,T,H,D), k/v (B,S,Hk,D) and a routing (index, counts)
  cram_deterministic  the same with deterministic=True (forward+backward only; the forward is the same)
  cram_sm80       cram with CRAM_ROUTED_ATTENTION_SM80=1: the SM80 kernels where cram runs the sm_90a
                  ones (Hopper, D = 128; cram_ext.routed_attention_kernel), else cram again
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
compacted on the device by cram_ext.route_from_mask.

FLOP convention (useful FLOPs, as FlashAttention's benchmarks count them):
  routed forward  = 4 * H * D * sum over routed (b, t) of (t + 1 + S - T)   (keys each routed query sees)
  dense causal    = 4 * B * H * D * T * (T + 1) / 2                          (S == T)
  forward+backward = 3.5 x forward (backward = 2.5 x forward: 5 matmuls of which 1 recomputes).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from . import runner
from .failures import Skip, free_memory, is_fatal
from .registry import Bench, Call, Case, Impl, Target, once, per_device, register, rel_err

FWD_BWD_FACTOR = 3.5
SDPA_BACKENDS = {  # impl -> SDPBackend attribute name
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
}


def _shape(B, H, T, D, Hk=None, S=None):
    return {"B": B, "H": H, "Hk": H if Hk is None else Hk, "T": T, "S": T if S is None else S, "D": D}


def _dims(case: Case):
    return (case.shape[k] for k in ("B", "H", "Hk", "T", "S", "D"))


# ------------------------------------------------------------------- routing


def random_routing(B: int, T: int, density: float, device, generator: torch.Generator | None = None):
    """n = round(density*T) (at least 1) routed positions per row, uniformly without replacement."""
    import cram_ext

    n = min(T, max(1, round(density * T)))
    scores = torch.rand(B, T, device=device, generator=generator)
    chosen = scores.topk(n, dim=1).indices
    mask = torch.zeros(B, T, dtype=torch.bool, device=device).scatter_(1, chosen, True)
    return cram_ext.route_from_mask(mask)


def routed_fwd_flops(index: torch.Tensor, counts: torch.Tensor, H: int, D: int, S: int, T: int) -> float:
    """4*H*D * sum over routed (b, t) of (t + 1 + S - T). Reads the routing on the host."""
    slot = torch.arange(index.shape[1], device=index.device)
    valid = slot < counts.unsqueeze(1).long()
    keys = torch.where(valid, index.long() + 1 + (S - T), 0)
    return 4.0 * H * D * float(keys.sum().item())


def dense_fwd_flops(B: int, H: int, T: int, D: int) -> float:
    return 4.0 * B * H * D * T * (T + 1) / 2


# ---------------------------------------------------------------- the cases


def setup(case: Case) -> Case:
    """q (B,T,H,D), k/v (B,S,Hk,D) and (B,H,T,D) contiguous copies for SDPA / FlexAttention,
    made outside the timing; the fp32 reference is computed when a check first needs it."""
    B, H, Hk, T, S, D = _dims(case)
    if H % Hk or S < T:
        raise Skip("needs H % Hk == 0 and S >= T, skipped")
    case.q = torch.randn(B, T, H, D, device=case.device, dtype=case.dtype)
    case.k = torch.randn(B, S, Hk, D, device=case.device, dtype=case.dtype)
    case.v = torch.randn(B, S, Hk, D, device=case.device, dtype=case.dtype)
    case.grad_out = torch.randn_like(case.q)
    case.qt, case.kt, case.vt = (x.transpose(1, 2).contiguous() for x in (case.q, case.k, case.v))
    case.grad_out_t = case.grad_out.transpose(1, 2).contiguous()
    case.gqa = Hk != H
    case.flops_fwd = dense_fwd_flops(B, H, T, D) if S == T else None
    case.reference = once(functools.partial(fp32_reference, case.qt, case.kt, case.vt))  # no cycle via case
    return case


def fp32_reference(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
    """Dense causal SDPA in fp32 on (B, H, T, D) layouts; k/v repeated (fp32 + enable_gqa could fall to math)."""
    (H, T), (Hk, S) = qt.shape[1:3], kt.shape[1:3]
    if S != T:
        raise Skip("no fp32 reference for S != T (is_causal SDPA is top-left aligned)")
    with torch.no_grad():
        rk, rv = (x.float().repeat_interleave(H // Hk, dim=1) for x in (kt, vt))
        return F.scaled_dot_product_attention(qt.float(), rk, rv, is_causal=True)


def at_density(case: Case, density: float) -> Case:
    B, H, Hk, T, S, D = _dims(case)
    index, counts = random_routing(B, T, density, case.device)
    return case.derive(density=density, label=f"rho={density}", index=index, counts=counts,
                       flops_fwd=routed_fwd_flops(index, counts, H, D, S, T))


def flops(case: Case, pass_: str) -> float | None:
    if case.flops_fwd is None:
        return None
    return case.flops_fwd * (FWD_BWD_FACTOR if pass_ == "fwd_bwd" else 1.0)


# ----------------------------------------------------------- implementations


def cram(deterministic: bool, sm80: bool = False):
    def build(case: Case) -> Call:
        import cram_ext

        index, counts = case.index, case.counts
        context = cram_ext.routed_attention_sm80 if sm80 else contextlib.nullcontext

        def attend(q, k, v):
            with context():
                return cram_ext.routed_attention(q, k, v, index, counts, deterministic=deterministic)

        return Call(attend, (case.q, case.k, case.v), grad=case.grad_out, out=0,
                    check=lambda out: check_cram(case, out[0]))

    return build


def record_fields(case: Case, pass_: str, impl: str) -> dict:
    """Which kernels a cram record timed ("sm90a", "sm80" or "cpu"): on Hopper it depends on
    the head dim and the build, so the record says it."""
    if not impl.startswith("cram"):
        return {}
    import cram_ext

    with cram_ext.routed_attention_sm80(impl == "cram_sm80"):
        kernel = functools.partial(cram_ext.routed_attention_kernel, case.q.device, case.shape["D"])
        return {"forward_kernel": kernel("forward"), "backward_kernel": kernel("backward") if pass_ == "fwd_bwd" else None}


def check_cram(case: Case, out: torch.Tensor) -> tuple[str, bool]:
    """Routed rows against the fp32 reference; the rows not routed must be zero."""
    import cram_ext

    ref = case.reference().transpose(1, 2)
    mask = cram_ext.reference.routed_mask(case.index, case.counts, case.shape["T"])
    err = rel_err(out[mask], ref[mask])
    zero = bool((out[~mask] == 0).all())
    return f"rel err {err:.2e} vs fp32 SDPA{'' if zero else ', unrouted rows not zero'}", err <= case.tol and zero


def sdpa_context(backend: str | None):
    if backend is None:
        return contextlib.nullcontext

    def context():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, backend))

    return context


def sdpa(backend: str | None):
    """Dense causal SDPA, forced to `backend` (None: PyTorch's choice). GQA: enable_gqa=True,
    or k/v repeated (outside the timing) when the backend refuses it."""

    def build(case: Case) -> Call:
        B, H, Hk, T, S, D = _dims(case)
        if S != T:
            raise Skip("is_causal SDPA is top-left aligned, S != T not comparable, skipped")

        def attend(gqa: bool):
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        context = sdpa_context(backend)
        call = Call(attend(case.gqa), (case.qt, case.kt, case.vt), grad=case.grad_out_t, label="dense",
                    context=context)
        if case.gqa:
            k_rep, v_rep = (x.repeat_interleave(H // Hk, dim=1) for x in (case.kt, case.vt))
            call.fallback = Call(attend(False), (case.qt, k_rep, v_rep), grad=case.grad_out_t,
                                 label="dense (k/v repeated)", context=context)
        return call

    return build


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
        if is_fatal(e):
            raise
        free_memory(torch.device(device))
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


def flex_gathered(case: Case) -> Call:
    """FlexAttention on the routed queries gathered to (B, H, n_max, D); the gather and the
    block mask are built here, outside the timing."""
    B, H, Hk, T, S, D = _dims(case)
    pos, gather_idx, n_max = gathered_positions(case.index, case.counts, T)
    q_g = gather_queries(case.qt, gather_idx)
    block_mask = build_block_mask(pos, S - T, B, n_max, S, case.device)
    flex = flex_fn(compiled=True)

    def attend(q, k, v):
        return flex(q, k, v, block_mask=block_mask, enable_gqa=case.gqa)

    def check(out: torch.Tensor) -> tuple[str, bool]:
        valid = pos >= 0
        ref_g = gather_queries(case.reference(), gather_idx)
        err = rel_err(out.transpose(1, 2)[valid], ref_g.transpose(1, 2)[valid])
        return f"rel err {err:.2e} vs fp32 SDPA", err <= case.tol

    return Call(attend, (q_g, case.kt, case.vt), grad=torch.randn_like(q_g), label=f"n_max={n_max}", check=check)


# ------------------------------------------------------------------ the spec


SPEC = register(Bench(
    name="attention",
    record="routed_attention",
    doc=__doc__,
    impls=[
        Impl("cram", cram(deterministic=False), routed=True),
        Impl("cram_deterministic", cram(deterministic=True), passes=("fwd_bwd",), routed=True),
        Impl("cram_sm80", cram(deterministic=False, sm80=True), routed=True),
        Impl("sdpa", sdpa(None)),
        *(Impl(name, sdpa(backend)) for name, backend in SDPA_BACKENDS.items()),
        Impl("flex_gathered", flex_gathered, routed=True, compiles=True),
    ],
    defaults=per_device(
        cuda=["cram", "cram_sm80", "cram_deterministic", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex_gathered"],
        cpu=["cram", "sdpa"],
    ),
    shapes={
        ("cuda", False): [_shape(2, 16, 8192, 128), _shape(1, 16, 32768, 128), _shape(4, 32, 4096, 64),
                          _shape(2, 32, 8192, 128, Hk=8)],
        ("cuda", True): [_shape(1, 4, 1024, 64), _shape(1, 8, 1024, 128, Hk=2)],
        ("cpu", False): [_shape(1, 4, 4096, 64)],
        ("cpu", True): [_shape(1, 2, 256, 32), _shape(2, 4, 192, 32, Hk=2)],
    },
    densities={
        ("cuda", False): [0.016, 0.05, 0.1, 0.25, 0.5, 1.0],
        ("cuda", True): [0.1],  # FlexAttention compiles once per (shape, density, pass)
        ("cpu", False): [0.05, 0.1, 0.25, 1.0],
        ("cpu", True): [0.1, 1.0],
    },
    dtypes=per_device(cuda=[torch.bfloat16], cpu=[torch.float32]),
    shape_keys=("B", "H", "T", "D"),
    shape_optional=("Hk",),
    make_shape=_shape,
    setup=setup,
    at_density=at_density,
    flops=flops,
    record_fields=record_fields,
    tolerance=(1e-4, 2e-2),
    baselines=["sdpa", *SDPA_BACKENDS, "flex_gathered"],
    match_density=("flex_gathered",),
    table="flops",
    title="routed_attention: all results (useful FLOPs; fwd_bwd = 3.5 x fwd)",
    # The CPU target: cram fwd at density 0.1 >= 4x faster than dense causal SDPA.
    targets=[Target(shape=_shape(1, 4, 4096, 64), baseline="sdpa", factor=4, what="sdpa causal", density=0.1)],
))


def main(argv=None) -> int:
    return runner.main(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
