"""metaplastic_scan (cram) beside a torch.compile'd chunked reference and fla's chunk_simple_gla.

    python -m bench.metaplastic [--device auto|cpu|cuda] [--quick] [--dtype bf16,fp32] [--pass fwd|fwd_bwd|both]
                                [--impl cram,compiled_ref,...] [--shape B,T,H,dk,dv]
                                [--out PATH | --record] [--append] [--no-check] [--threads N] [--rep-ms MS]

The op (docs/metaplastic.md), per batch row and head, a_t = exp(log_alpha_t):
    M_t = a_t M_{t-1} + v_t k_t^T,  Ibar_t = a_t Ibar_{t-1} + b_t (k_t*k_t)^T,  o_t = scale (M_t / (Ibar_t + I_p)) q_t

Implementations (impl):
  cram            cram_ext.metaplastic_scan(q, k, v, b, log_alpha, prior): o and the final (M, Ibar)
  compiled_ref    torch.compile(cram_ext.reference_metaplastic.metaplastic_scan_chunked) (chunk 64,
                  fp32 inside; fullgraph, static shapes: one compile per shape, dtype and pass)
  eager_ref       the same chunked reference, eager (the CPU baseline; not run by default on a GPU,
                  where it holds ~8 fp32 (B,T,H,dv,dk) buffers)
  fla_simple_gla  fla.ops.simple_gla.chunk_simple_gla(q, k, v, g=log_alpha, scale) (Triton, CUDA only;
                  disabled with a note if fla does not import): scalar-decay gated linear attention,
                  the op's b = 0, I_p = 1 special case, on tensor cores without the per-token state
                  read-out -- the speed of the non-metaplastic model, the baseline to approach.
                  output_final_state=False (cram always writes its final state: 2*B*H*dv*dk fp32).
                  On Hopper with Triton in [3.4, 3.7.1) fla refuses its gated backward (wrong results,
                  fla issue #640): fwd_bwd is then timed with that guard lifted, time only, and labelled so.
                  It can also fault (an illegal address at 16x2048x16x32x64 on an H100), which ends the
                  run: so fla comes after the other impls of a case in the default order (every second
                  round of --rounds reverses it).

Inputs (docs/metaplastic.md §4): q, k (B,T,H,dk) L2-normalised over dk; v (B,T,H,dv) ~ N(0,1);
b = sigmoid(N(0,1)) (B,T,H,dv); log_alpha = -A_h * Delta (B,T,H) in float32 with A_h log-uniform
in [1, 16] per head and Delta log-uniform in [1e-3, 1e-1] per token (decays 0.2 .. 0.999,
horizons 1 .. 1000 tokens); prior = ones(H) float32; scale = dk^-0.5. q, k, v, b in the case's dtype
(bf16 on a GPU, fp32 on the CPU). fwd_bwd differentiates o into every input (q, k, v, b, log_alpha,
prior; fla: q, k, v, g).

FLOP convention (records' flops, and "flops_model"): the elementwise state work, counted only for the
impls that compute this op (cram, compiled_ref, eager_ref; fla_simple_gla's records have flops null):
  fwd     = 8 * B * T * H * dk * dv   (per token, head and state entry: the M and Ibar updates, the
                                       division, the read-out's multiply-add; the issue's count)
  fwd_bwd = 3 x fwd                   (the backward recomputes the states and runs the adjoint
                                       recurrence, about twice the forward's work; a convention)
Each record also carries peak_flops: the GPU's fp32 FMA peak, SMs x FP32 lanes per SM (64 on sm_70/75/80,
128 on sm_61/86/89/90/100/120) x 2 x the SM clock (torch.cuda.get_device_properties(...).clock_rate, the
maximum clock; when not exposed, NVIDIA's datasheet boost clock of a known card: H100 SXM / H200 /
GH200 1980 MHz, H100 PCIe 1755, H100 NVL / H200 NVL 1785, A100 1410), and peak_source saying which;
null on the CPU. An H100 SXM: 132 x 128 x 2 x 1.98 GHz = 66.9 TFLOP/s. The tables print flops / time
as a fraction of it.

Check (each impl's first forward): o, and the final (M, Ibar) where the impl returns it, against
metaplastic_scan_chunked on the same (rounded) inputs in float64 on the CPU, float32 on a GPU (run
a batch row and a few heads at a time to bound its memory); tolerance docs/metaplastic.md §4:
fp32 max(1e-5, 8 sqrt(T) eps), fp16 5e-3, bf16 1e-2. fla_simple_gla computes GLA, not this op: its o
is checked against the same reference with b = 0 and I_p = 1, which is GLA (docs/metaplastic.md §1),
at tolerance >= 5e-3 (its matmuls run in bf16 or TF32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from . import runner
from .failures import Skip
from .registry import Bench, Call, Case, Impl, once, per_device, register, rel_err

FWD_FLOPS_PER_ENTRY = 8  # per token, head and (dv x dk) state entry; the count
FWD_BWD_FACTOR = 3.0  # fwd_bwd = 3 x fwd: recomputed states + the adjoint recurrence (~2 x fwd)
FLOPS_MODEL = "fwd 8*B*T*H*dk*dv (elementwise state work); fwd_bwd 3 x fwd"
COUNTED = ("cram", "compiled_ref", "eager_ref")  # the impls that compute the metaplastic recurrence
REF_ELEMENTS = 2**27  # (rows x T x heads x dv x dk) of one piece of the reference: ~8 such fp32 buffers live


def _shape(B, T, H, dk, dv):
    return {"B": B, "T": T, "H": H, "dk": dk, "dv": dv}


def _dims(case: Case):
    return (case.shape[k] for k in ("B", "T", "H", "dk", "dv"))


# ------------------------------------------------------------ FLOPs and peak


def flops(case: Case, pass_: str) -> float:
    B, T, H, dk, dv = _dims(case)
    fwd = float(FWD_FLOPS_PER_ENTRY * B * T * H * dk * dv)
    return fwd * (FWD_BWD_FACTOR if pass_ == "fwd_bwd" else 1.0)


# FP32 FMA lanes ("CUDA cores") per SM by compute capability (NVIDIA's architecture whitepapers).
FP32_LANES_PER_SM = {
    (6, 0): 64, (6, 1): 128, (7, 0): 64, (7, 2): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128,
    (8, 9): 128, (9, 0): 128, (10, 0): 128, (10, 3): 128, (12, 0): 128, (12, 1): 128,
}
# Boost clocks (MHz) of NVIDIA's datasheets, for when the properties expose no clock. The first
# name contained in the device name wins: the more specific names come first.
KNOWN_BOOST_MHZ = (("H200 NVL", 1785), ("GH200", 1980), ("H200", 1980), ("H100 PCIe", 1755), ("H100 NVL", 1785),
                   ("H100", 1980), ("A100", 1410))


def fp32_peak_from(props) -> tuple[float | None, str]:
    """(peak fp32 FLOP/s, how it was derived) from CUDA device properties (name, major, minor,
    multi_processor_count, clock_rate in kHz as cudaDeviceProp.clockRate); (None, why) when
    the lanes per SM or the clock are unknown."""
    cc = (props.major, props.minor)
    lanes = FP32_LANES_PER_SM.get(cc)
    if lanes is None:
        return None, f"sm_{cc[0]}{cc[1]}: FP32 lanes per SM unknown, no peak"
    khz = getattr(props, "clock_rate", 0) or 0
    if 300_000 <= khz <= 4_000_000:  # the maximum SM clock, in kHz (cudaDeviceProp.clockRate)
        mhz, where = khz / 1000, "clock_rate"
    else:
        known = next(((n, m) for n, m in KNOWN_BOOST_MHZ if n.lower() in props.name.lower()), None)
        if known is None:
            return None, f"{props.name}: no clock exposed and no known boost clock, no peak"
        mhz, where = known[1], f"datasheet boost clock of {known[0]}"
    sms = props.multi_processor_count
    peak = sms * lanes * 2 * mhz * 1e6
    return peak, f"{sms} SMs x {lanes} FP32 lanes x 2 x {mhz:.0f} MHz ({where}) = {peak / 1e12:.1f} TFLOP/s"


@functools.lru_cache(maxsize=None)
def device_peak(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, f"{device.type}: no peak derived"
    return fp32_peak_from(torch.cuda.get_device_properties(device))


def record_fields(case: Case, pass_: str, impl: str) -> dict:
    peak, source = device_peak(case.device)
    fields = {"flops_model": FLOPS_MODEL, "peak_flops": peak, "peak_source": source}
    if impl not in COUNTED:  # fla computes GLA (matmuls on tensor cores): the count does not describe it
        fields.update(flops=None, flops_model="not counted: GLA, not the metaplastic state work")
        if pass_ == "fwd_bwd" and _fla_bwd_guarded():
            fields["note"] = ("fla_simple_gla fwd_bwd: fla refuses its gated backward on Hopper with this Triton "
                              "(wrong results, fla issue #640); timed with that guard lifted, time only")
    return fields


def _fla_bwd_guarded() -> bool:
    """Whether fla's gated backward refuses to run here (Hopper, Triton in [3.4, 3.7.1): fla issue #640)."""
    from fla.ops.common import chunk_o

    return bool(chunk_o.IS_NVIDIA_HOPPER and chunk_o.TRITON_ABOVE_3_4_0 and not chunk_o.TRITON_ABOVE_3_7_1)


# ---------------------------------------------------------------- the cases


def setup(case: Case) -> Case:
    B, T, H, dk, dv = _dims(case)
    dev, dtype = case.device, case.dtype
    case.q = F.normalize(torch.randn(B, T, H, dk, device=dev), dim=-1).to(dtype)
    case.k = F.normalize(torch.randn(B, T, H, dk, device=dev), dim=-1).to(dtype)
    case.v = torch.randn(B, T, H, dv, device=dev).to(dtype)
    case.b = torch.sigmoid(torch.randn(B, T, H, dv, device=dev)).to(dtype)
    A = torch.empty(H, device=dev).uniform_(0.0, math.log(16.0)).exp()  # per head, log-uniform in [1, 16]
    delta = torch.empty(B, T, H, device=dev).uniform_(math.log(1e-3), math.log(1e-1)).exp()
    case.log_alpha = -(A * delta)  # float32
    case.prior = torch.ones(H, device=dev)
    case.grad_o = torch.randn(B, T, H, dv, device=dev).to(dtype)
    if dtype == torch.float32:
        case.tol = max(1e-5, 8 * math.sqrt(max(T, 1)) * torch.finfo(torch.float32).eps)
    elif dtype == torch.float16:
        case.tol = 5e-3
    inputs = (case.q, case.k, case.v, case.b, case.log_alpha, case.prior)
    case.inputs = inputs
    case.reference = once(functools.partial(reference, *inputs))  # no cycle via case
    case.gla_reference = once(functools.partial(reference, *inputs, gla=True))
    return case


def reference(q, k, v, b, log_alpha, prior, gla: bool = False):
    """(o, M, Ibar) of metaplastic_scan_chunked in float64 on the CPU, float32 on a GPU, a batch row
    and a group of heads at a time (at most REF_ELEMENTS state entries over T). gla: b = 0,
    I_p = 1, i.e. scalar-decay gated linear attention (M is then GLA's state)."""
    from cram_ext.reference_metaplastic import metaplastic_scan_chunked

    acc = torch.float64 if q.device.type == "cpu" else torch.float32
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    if gla:
        b, prior = torch.zeros_like(v), torch.ones_like(prior)
    heads = max(1, min(H, REF_ELEMENTS // max(1, T * dv * dk)))
    o = torch.empty(B, T, H, dv, dtype=acc, device=q.device)
    M = torch.empty(B, H, dv, dk, dtype=acc, device=q.device)
    ibar = torch.empty_like(M)
    with torch.no_grad():
        for i in range(B):
            for h in range(0, H, heads):
                rows, hs = slice(i, i + 1), slice(h, h + heads)
                part = [x[rows, :, hs].to(acc) for x in (q, k, v, b, log_alpha)]
                o_p, (M_p, I_p) = metaplastic_scan_chunked(*part, prior[hs].to(acc))
                o[rows, :, hs], M[rows, hs], ibar[rows, hs] = o_p, M_p, I_p
    return o, M, ibar


def metaplastic_call(case: Case, fn, **kw) -> Call:
    """fn(q, k, v, b, log_alpha, prior) -> (o, (M, Ibar)), differentiated through o into every
    input, checked (o and the final state) against the reference."""

    def check(out) -> tuple[str, bool]:
        o, (M, ibar) = out
        ref_o, ref_M, ref_I = case.reference()
        errs = {"o": rel_err(o, ref_o), "M": rel_err(M, ref_M), "Ibar": rel_err(ibar, ref_I)}
        text = ", ".join(f"{name} {e:.2e}" for name, e in errs.items())
        where = "fp64" if case.device.type == "cpu" else "fp32"
        return f"rel err {text} vs {where} chunked reference", max(errs.values()) <= case.tol

    return Call(fn, case.inputs, grad=case.grad_o, out=0, check=check, **kw)


# ----------------------------------------------------------- implementations


def cram(case: Case) -> Call:
    import cram_ext

    scan = cram_ext.metaplastic_scan
    return metaplastic_call(case, lambda q, k, v, b, log_alpha, prior: scan(q, k, v, b, log_alpha, prior))


def _require_cram():
    import cram_ext  # noqa: F401 - loads the library and its op registrations

    return torch.ops.cram.metaplastic_scan.default


def _chunked(q, k, v, b, log_alpha, prior):
    from cram_ext.reference_metaplastic import metaplastic_scan_chunked

    o, (M, ibar) = metaplastic_scan_chunked(q, k, v, b, log_alpha, prior)
    return o, (M, ibar)


_compiled: dict[str, object] = {}


def compiled_chunked():
    if "chunked" not in _compiled:
        _compiled["chunked"] = torch.compile(_chunked, dynamic=False, fullgraph=True)
    return _compiled["chunked"]


def _import_fla():
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla


def fla_simple_gla(case: Case) -> Call:
    if case.device.type != "cuda":
        raise Skip("fla's Triton kernels need CUDA, skipped")
    chunk_simple_gla = _import_fla()
    scale = case.shape["dk"] ** -0.5
    tol = max(case.tol, 5e-3)

    def gla(q, k, v, g):
        return chunk_simple_gla(q, k, v, g=g, scale=scale, initial_state=None, output_final_state=False)

    def check(out) -> tuple[str, bool]:
        err = rel_err(out[0], case.gla_reference()[0])
        return f"rel err o {err:.2e} vs fp32 GLA (the chunked reference at b=0, I_p=1)", err <= tol

    call = Call(gla, (case.q, case.k, case.v, case.log_alpha), grad=case.grad_o, out=0, check=check,
                label="(GLA: no b, no prior)")
    # fla refuses its gated backward on Hopper with Triton in [3.4, 3.7.1): the results are wrong there
    # (fla issue #640). Its time is still the time of the same kernels, so time it with the guard
    # lifted and say so; nothing is checked on that path (the check reads the forward only).
    call.fallback = dataclasses.replace(call, label="(GLA; backward: fla #640 guard lifted, time only)",
                                        context=_fla_bwd_guard_lifted)
    return call


@contextlib.contextmanager
def _fla_bwd_guard_lifted():
    from fla.ops.common import chunk_o

    saved = chunk_o.TRITON_ABOVE_3_7_1
    chunk_o.TRITON_ABOVE_3_7_1 = True
    try:
        yield
    finally:
        chunk_o.TRITON_ABOVE_3_7_1 = saved


# ------------------------------------------------------------------ the spec


SPEC = register(Bench(
    name="metaplastic",
    record="metaplastic_scan",
    doc=__doc__,
    impls=[
        Impl("cram", cram, requires=_require_cram),
        Impl("compiled_ref", lambda case: metaplastic_call(case, compiled_chunked()), compiles=True),
        Impl("eager_ref", lambda case: metaplastic_call(case, _chunked)),
        Impl("fla_simple_gla", fla_simple_gla, requires=_import_fla),
    ],
    defaults={
        ("cuda", False): ["cram", "compiled_ref", "fla_simple_gla"],
        ("cuda", True): ["cram", "compiled_ref", "fla_simple_gla"],
        ("cpu", False): ["cram", "eager_ref", "compiled_ref"],
        # no torch.compile in the CPU smoke test: compiling takes 10-30 s on a small CPU
        ("cpu", True): ["cram", "eager_ref"],
    },
    shapes={
        ("cuda", False): [_shape(8, 4096, 8, 64, 128), _shape(2, 16384, 8, 64, 128), _shape(16, 2048, 16, 32, 64)],
        ("cuda", True): [_shape(2, 512, 4, 32, 64)],
        ("cpu", False): [_shape(2, 1024, 4, 32, 64)],
        ("cpu", True): [_shape(1, 128, 2, 16, 32)],
    },
    dtypes=per_device(cuda=[torch.bfloat16], cpu=[torch.float32]),
    shape_keys=("B", "T", "H", "dk", "dv"),
    make_shape=_shape,
    setup=setup,
    flops=flops,
    record_fields=record_fields,
    tolerance=(1e-5, 1e-2),  # fp32 and fp16 are set per case in setup (docs/metaplastic.md §4)
    baselines=["compiled_ref", "fla_simple_gla", "eager_ref"],
    table="flops",
    title="metaplastic_scan: all results (elementwise FLOPs: fwd 8*B*T*H*dk*dv, fwd_bwd 3 x fwd; "
          "fla_simple_gla is GLA, not counted)",
))


def main(argv=None) -> int:
    return runner.main(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
