"""gated_scan (cram) beside fla chunk_hgrn, torch.compile'd associative_scan and eager PyTorch.

    python -m bench.scan [--device auto|cpu|cuda] [--quick] [--dtype bf16,fp32] [--pass fwd|fwd_bwd|both]
                         [--impl cram,fla_chunk_hgrn,...] [--shape B,T,C]
                         [--out PATH | --record] [--append] [--no-check] [--threads N] [--rep-ms MS]

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

import functools

import torch
import torch.nn.functional as F

from . import runner
from .registry import MEMORY_BOUND, Bench, Call, Case, Impl, Target, btc, once, register, rel_err

REFERENCE_BWD_MAX_T = 512


def scan_bytes(case: Case, pass_: str) -> int:
    n = case.shape["B"] * case.shape["T"] * case.shape["C"] * case.dtype.itemsize
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


# ---------------------------------------------------------------- the cases


def setup(case: Case) -> Case:
    B, T, C = (case.shape[k] for k in "BTC")
    case.x = torch.randn(B, T, C, device=case.device, dtype=case.dtype)
    # decays a = sigmoid(u), u ~ N(2, 1): a ~ 0.88 typical, state magnitudes O(1/(1-a))
    case.log_a = F.logsigmoid(torch.randn(B, T, C, device=case.device, dtype=torch.float32) + 2).to(case.dtype)
    case.grad_h = torch.randn_like(case.x)
    case.reference = once(functools.partial(reference, case.x, case.log_a))  # no cycle via case
    return case


def reference(x: torch.Tensor, log_a: torch.Tensor) -> torch.Tensor:
    """The contract (cram_ext.reference) on CPU for moderate sizes; the fp32 log-step scan elsewhere."""
    import cram_ext

    with torch.no_grad():
        if x.device.type == "cpu" and x.numel() <= 2**24:
            return cram_ext.reference.gated_scan(x, log_a)[0]
        return logstep_scan(x.float(), log_a.float())


def scan_call(case: Case, fn, **kw) -> Call:
    """fn(x, log_a) -> h, differentiated into x and log_a, checked against the reference."""

    def check(h: torch.Tensor) -> tuple[str, bool]:
        err = rel_err(h, case.reference())
        return f"rel err {err:.2e}", err <= case.tol

    return Call(fn, (case.x, case.log_a), grad=case.grad_h, check=check, **kw)


# ----------------------------------------------------------- implementations


def cram(case: Case) -> Call:
    import cram_ext

    gated_scan = cram_ext.gated_scan
    return scan_call(case, lambda x, log_a: gated_scan(x, log_a)[0])


def _import_fla():
    from fla.ops.hgrn import chunk_hgrn

    return chunk_hgrn


def fla_chunk_hgrn(case: Case) -> Call:
    chunk_hgrn = _import_fla()
    return scan_call(case, lambda x, log_a: chunk_hgrn(x, log_a)[0])


def associative_scan_compile(case: Case) -> Call:
    # combine_mode "pointwise" (inductor's Triton scan) needs CUDA; "generic" is the CPU fallback.
    mode = "pointwise" if case.device.type == "cuda" else "generic"
    return scan_call(case, compiled(f"assoc:{mode}"), label=f"({mode})")


def reference_loop(case: Case) -> Call:
    import cram_ext

    loop = cram_ext.reference.gated_scan
    T = case.shape["T"]
    slow = (f"T={T}: autograd through the loop's a[:, t] selects is O(T^2): 80 s a call at T=4096; "
            f"measured for T <= {REFERENCE_BWD_MAX_T}") if T > REFERENCE_BWD_MAX_T else None
    return scan_call(case, lambda x, log_a: loop(x, log_a)[0], no_backward=slow)


# ------------------------------------------------------------------ the spec


SPEC = register(Bench(
    name="scan",
    record="gated_scan",
    doc=__doc__,
    impls=[
        Impl("cram", cram),
        Impl("fla_chunk_hgrn", fla_chunk_hgrn, requires=_import_fla),
        Impl("associative_scan_compile", associative_scan_compile, compiles=True),
        Impl("torch_eager", lambda case: scan_call(case, logstep_scan)),
        Impl("torch_compile", lambda case: scan_call(case, compiled("torch_compile")), compiles=True),
        Impl("reference_loop", reference_loop),
    ],
    defaults={
        ("cuda", False): ["cram", "fla_chunk_hgrn", "associative_scan_compile", "torch_eager", "torch_compile"],
        ("cuda", True): ["cram", "fla_chunk_hgrn", "associative_scan_compile", "torch_eager", "torch_compile"],
        ("cpu", False): ["cram", "reference_loop", "torch_eager", "torch_compile", "associative_scan_compile"],
        # no torch.compile in the CPU smoke test: compiling takes 10-30 s on a small CPU
        ("cpu", True): ["cram", "reference_loop", "torch_eager"],
    },
    **MEMORY_BOUND,
    setup=setup,
    bytes=scan_bytes,
    tolerance=(1e-5, 1e-2),
    baselines=["fla_chunk_hgrn", "associative_scan_compile", "torch_compile", "torch_eager", "reference_loop"],
    title="gated_scan: all results (minimal bytes: fwd 3N, fwd_bwd 8N elements)",
    # The CPU target: cram fwd >= 20x the reference loop.
    targets=[Target(shape=btc(4, 4096, 256), baseline="reference_loop", factor=20, what="the reference loop",
                    dtype="float32")],
))


def main(argv=None) -> int:
    return runner.main(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
