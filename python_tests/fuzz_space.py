"""The input space of the property tests, and the check of one drawn case per op.

Shared by test_fuzz.py (hypothesis draws cases; CPU in CI, CUDA where a GPU is visible)
and cuda_fuzz.py (seeded random cases on a GPU, many processes under compute-sanitizer).
A case is drawn through a `Draw`, so hypothesis (which shrinks a failure to a small case)
and a plain seeded generator (which reproduces case N of seed S in a fresh process) walk
the same space:

- sizes: small, prime, next to the kernels' block sizes (64, 128, 256), or uniform;
- dtypes: every supported one per device; head dims: 64/128 on CUDA, any D on the CPU;
- routing: density 0, 1, or in between; first/last position only; S > T; GQA;
- memory layout of every tensor argument and of every incoming gradient: contiguous, one
  element past an aligned address, a slice of wider rows, a non-unit inner stride, a
  permuted storage order (q, k, v as (B, H, T, D) tensors transposed to (B, T, H, D), the
  layout SDPA users hold), packed q/k/v, stride-0 broadcasts, and a gradient that is one
  scalar broadcast everywhere (what `out.sum().backward()` sends);
- malformed routings (unsorted, out of range, counts outside [0, T]): no reference to
  match, but the op must not crash or touch memory out of bounds (see cuda_fuzz.py).

Every check compares with `cram_ext.reference` run on the CPU from the same (rounded)
inputs, in float64 for float64 inputs and in float32 otherwise (docs/design.md §5), within its
relative-error bounds, and raises AssertionError naming what differed. metaplastic_scan is
compared with the float64 loop of `cram_ext.reference_metaplastic` whatever its dtype
(docs/metaplastic.md §4).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from conftest import (
    ATTN_DTYPES,
    DTYPE_NAMES,
    SCAN_DTYPES,
    TOLERANCE,
    assert_close_rel,
    at_offset,
    grad_floor,
    poison_allocator,
    reference_dtype,
    route_from_mask,
)
from test_route import check_route_exact
from test_routed_attention import check_unrouted_rows

import cram_ext
from cram_ext import reference
from cram_ext.reference import routed_mask
from cram_ext.reference_metaplastic import _initial_state, _prior_per_head, _step, metaplastic_scan_reference

# ------------------------------------------------------------------------ drawing


class Draw(Protocol):
    def int(self, lo: int, hi: int) -> int: ...  # inclusive
    def choice(self, options: Sequence[Any]) -> Any: ...


class RandomDraw:
    """Draws from a seeded `random.Random`: case `i` of seed `s` is the same in every process."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.rng.randrange(len(options))]


class HypothesisDraw:
    """Draws through hypothesis' `data.draw`, so a failing case shrinks."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def choice(self, options: Sequence[Any]) -> Any:
        return self.data.draw(self.st.sampled_from(list(options)))


PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 31, 37, 61, 67, 97, 127, 131, 193, 257, 509, 521, 1021, 1031, 2053)
EDGES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def draw_size(draw: Draw, hi: int, lo: int = 1) -> int:
    """A size in [lo, hi], biased towards the ones that find bugs."""
    kind = draw.choice(("small", "prime", "edge", "uniform"))
    if kind == "small":
        return draw.int(lo, max(lo, min(hi, 8)))
    if kind == "prime":
        options = [p for p in PRIMES if lo <= p <= hi]
        return draw.choice(options) if options else draw.int(lo, hi)
    if kind == "edge":
        options = [e + d for e in EDGES for d in (-1, 0, 1) if lo <= e + d <= hi]
        return draw.choice(options) if options else draw.int(lo, hi)
    return draw.int(lo, hi)


# ------------------------------------------------------------------------ layouts

# How a tensor argument or an incoming gradient is laid out in memory; values never depend
# on the layout except for the broadcasts, whose values are constant along a dimension.
LAYOUTS = ("contiguous", "offset", "padded", "strided", "permuted", "packed", "expanded")
GRAD_LAYOUTS = ("contiguous", "offset", "permuted", "expanded", "scalar")


def draw_layout(draw: Draw, options: Sequence[str] = LAYOUTS) -> str:
    # Contiguous half the time: the other layouts are each rarer, the common case is common.
    return draw.choice(("contiguous",) * len(options) + tuple(options))


def random_values(shape: Sequence[int], layout: str, gen: torch.Generator, expand_dim: int,
                  transform=lambda v: v) -> torch.Tensor:
    """float64 values transform(N(0, 1)) on the CPU; constant along `expand_dim` for
    "expanded" and everywhere for "scalar" (the values a broadcast can hold). The transform
    runs before the broadcast: elementwise ops need not give equal inputs equal outputs
    (vectorised and scalar tails round differently)."""
    small = list(shape)
    if layout == "scalar":
        small = [1] * len(shape)
    elif layout == "expanded" and len(shape) > 0:
        small[expand_dim] = 1
    return transform(torch.randn(small, generator=gen, dtype=torch.float64)).expand(shape).clone()


def laid_out(values: torch.Tensor, layout: str, dtype: torch.dtype, device: str, expand_dim: int) -> torch.Tensor:
    """`values` (rounded to dtype) in the given memory layout, on device, as a leaf."""
    v = values.to(dtype)
    shape, n = list(v.shape), v.dim()
    if layout == "contiguous" or n == 0:
        out = v.to(device)
    elif layout == "offset":  # contiguous, one element past an aligned address
        out = at_offset(v.to(device))
    elif layout == "padded":  # rows of a wider tensor: unit inner stride, odd row stride
        buf = torch.empty(shape[:-1] + [shape[-1] + 3], dtype=dtype, device=device)
        out = buf[..., : shape[-1]]
        out.copy_(v)
    elif layout == "strided":  # every other element of the inner dimension
        buf = torch.empty(shape[:-1] + [2 * shape[-1]], dtype=dtype, device=device)
        out = buf[..., ::2]
        out.copy_(v)
    elif layout == "permuted":  # stored with dims 0 and 1 (2-d) or 1 and 2 (3-d, 4-d) swapped
        a, b = (0, 1) if n <= 2 else (1, 2)
        out = v.transpose(a, b).contiguous().to(device).transpose(a, b)
    elif layout == "packed":  # one of three tensors packed along a new dim before the last (qkv)
        buf = torch.empty(shape[:-1] + [3, shape[-1]], dtype=dtype, device=device)
        out = buf[..., 1, :]
        out.copy_(v)
    elif layout in ("expanded", "scalar"):  # stride 0 where the values are constant
        dims = [expand_dim] if layout == "expanded" else list(range(n))
        index = tuple(slice(0, 1) if d in dims else slice(None) for d in range(n))
        out = v[index].contiguous().to(device).expand(shape)
    else:
        raise ValueError(layout)
    assert torch.equal(out.cpu(), v), layout
    return out.detach()


def make_input(shape, layout, dtype, device, gen, expand_dim=0, scale=1.0, transform=None):
    """A leaf tensor requiring grad, and its values (rounded to dtype) in float64 on the CPU."""
    values = random_values(shape, layout, gen, expand_dim, lambda v: (transform or (lambda u: u))(v * scale))
    t = laid_out(values, layout, dtype, device, expand_dim)  # checks that t holds these values
    return t.requires_grad_(), values.to(dtype).to(torch.float64)


def make_grad(shape, layout, dtype, device, gen, expand_dim=0):
    values = random_values(shape, layout, gen, expand_dim)
    return laid_out(values, layout, dtype, device, expand_dim)


def as_ref(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference's leaf: the input's values in the reference's dtype (docs/design.md §5: float64
    for float64 inputs, float32 otherwise), on the CPU."""
    return values.to(dtype).requires_grad_()


# ---------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """Largest sizes drawn per device: the CPU check must stay cheap in CI; on the GPU the
    sizes reach several chunks of the scan, several router tiles and key splits of the
    attention forward, while the float64 reference on the CPU stays fast."""

    scan_T: int
    scan_C: int
    route_T: int
    route_C: int
    attn_T: int
    attn_extra_S: int  # S - T at most
    attn_work: int  # B * H * T * S at most (the reference's score matrix)
    decode_S: int  # the KV cache's length at most (routed_decode)
    meta_T: int  # metaplastic_scan: T at most
    meta_D: int  # d_k and d_v at most
    meta_work: int  # B * H * T * d_v * d_k at most (the float64 loop's autograd graph holds ~6 of these)


LIMITS = {
    "cpu": Limits(scan_T=300, scan_C=160, route_T=300, route_C=300, attn_T=150, attn_extra_S=150, attn_work=400_000,
                  decode_S=600, meta_T=160, meta_D=48, meta_work=300_000),
    "cuda": Limits(scan_T=2100, scan_C=600, route_T=2100, route_C=1100, attn_T=700, attn_extra_S=1300,
                   attn_work=6_000_000, decode_S=5000, meta_T=600, meta_D=128, meta_work=6_000_000),
}

PARAM_DTYPES = tuple(DTYPE_NAMES)


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str, floor: float = 0.0) -> None:
    """assert_close_rel, with `out` on any device, and a floor that also covers the
    rounding of values below out.dtype's smallest normal number: a float16 result of 1e-7
    has two significant bits (seen: a saturated router's grad hidden, 3% off). Values past
    out.dtype's largest number are compared by sign only."""
    info = torch.finfo(out.dtype)
    subnormal = 0.5 * info.tiny * info.eps * out.numel() ** 0.5 / tol
    out = out.detach().cpu()
    # Where the exact value is at the edge of out.dtype's range, the result may round to
    # +-inf (a float16 gradient of 1e5): there it must be huge or inf of the right sign.
    edge = ref.abs() >= 0.99 * info.max
    if edge.any():
        assert (out[edge].double() * ref[edge].sign() >= 0.9 * info.max).all(), f"{what}: wrong value past the range"
        out, ref = out[~edge], ref[~edge]
    assert_close_rel(out, ref, tol, what, floor=max(floor, subnormal))


# ------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class ScanCase:
    B: int
    T: int
    C: int
    dtype: torch.dtype
    with_h0: bool
    decay: str  # "softplus" (a in (0, 1)), "one" (log_a = 0: a running sum), "sharp" (a near 0)
    layouts: dict = field(hash=False)  # x, log_a, h0, grad_h, grad_h_last
    seed: int

    def __str__(self) -> str:
        return (f"gated_scan(B={self.B}, T={self.T}, C={self.C}, {DTYPE_NAMES[self.dtype]}, h0={self.with_h0}, "
                f"decay={self.decay}, layouts={self.layouts}, seed={self.seed})")


@dataclass(frozen=True)
class RouteCase:
    B: int
    T: int
    C: int
    dtype: torch.dtype
    weight_dtype: torch.dtype
    bias_dtype: torch.dtype
    threshold: float
    force: str  # "none" | "random" | "all"
    scale: float  # of hidden: 0.1 keeps probabilities near sigmoid(bias), 10 saturates them
    layouts: dict = field(hash=False)  # hidden, weight, force, grad_prob
    seed: int

    def __str__(self) -> str:
        return (f"route(B={self.B}, T={self.T}, C={self.C}, {DTYPE_NAMES[self.dtype]}, "
                f"weight {DTYPE_NAMES[self.weight_dtype]}, bias {DTYPE_NAMES[self.bias_dtype]}, "
                f"threshold={self.threshold}, force={self.force}, scale={self.scale}, layouts={self.layouts}, "
                f"seed={self.seed})")


@dataclass(frozen=True)
class AttentionCase:
    B: int
    T: int
    S: int
    H: int
    Hk: int
    D: int
    dtype: torch.dtype
    pattern: str  # "random" | "none" | "all" | "first" | "last" | "ends"
    density: float
    deterministic: bool
    softmax_scale: float | None
    malformed: str  # "" or the kind of bad routing (then no reference comparison)
    layouts: dict = field(hash=False)  # q, k, v, index, counts, grad_out
    seed: int
    sm80: bool = False  # CUDA: run the SM80 kernels on Hopper too (CRAM_ROUTED_ATTENTION_SM80)

    def __str__(self) -> str:
        return (f"routed_attention(B={self.B}, T={self.T}, S={self.S}, H={self.H}, Hk={self.Hk}, D={self.D}, "
                f"{DTYPE_NAMES[self.dtype]}, {self.pattern} rho={self.density}, deterministic={self.deterministic}, "
                f"softmax_scale={self.softmax_scale}, malformed={self.malformed or None}, layouts={self.layouts}, "
                f"seed={self.seed}, sm80={self.sm80})")


@dataclass(frozen=True)
class DecodeCase:
    B: int
    S: int
    H: int
    Hk: int
    D: int
    dtype: torch.dtype
    lengths: str  # "full", "random" (some past S or negative: clamped), "short" (a few keys)
    density: float  # share of rows routed
    softmax_scale: float | None
    layouts: dict = field(hash=False)  # q, k_cache, v_cache, seqlens, routed
    seed: int


@dataclass(frozen=True)
class MetaplasticCase:
    B: int
    T: int
    H: int
    dk: int
    dv: int
    dtype: torch.dtype
    log_alpha_dtype: torch.dtype  # the inputs' dtype or float32
    prior: str  # "heads" (an (H,) tensor), "0-d" (a scalar tensor), "float" (a Python number)
    prior_dtype: torch.dtype  # of a prior tensor
    prior_range: tuple  # I_p is log-uniform in it, per head
    with_state: bool
    decay: str  # "realistic" (horizons 1-1000 tokens), "one" (log_alpha = 0), "sharp" (a < e^-5), "reset" (some -inf)
    b: str  # "realistic" (in (0, 1.5)) or "zero"
    scale: float | None
    grads: str  # "all" (o and the final state), "o" (a loss on o only)
    layouts: dict = field(hash=False)  # q, k, v, b, log_alpha, M0, Ibar0, grad_o, grad_M, grad_Ibar
    seed: int = 0

    def __str__(self) -> str:
        return (f"metaplastic_scan(B={self.B}, T={self.T}, H={self.H}, d_k={self.dk}, d_v={self.dv}, "
                f"{DTYPE_NAMES[self.dtype]}, log_alpha {DTYPE_NAMES[self.log_alpha_dtype]}, prior={self.prior} "
                f"{DTYPE_NAMES[self.prior_dtype]} in {self.prior_range}, state={self.with_state}, decay={self.decay}, "
                f"b={self.b}, scale={self.scale}, grads={self.grads}, layouts={self.layouts}, seed={self.seed})")


def draw_scan_case(draw: Draw, device: str) -> ScanCase:
    lim = LIMITS[device]
    return ScanCase(
        B=draw_size(draw, 4), T=draw_size(draw, lim.scan_T), C=draw_size(draw, lim.scan_C),
        dtype=draw.choice(SCAN_DTYPES[device]), with_h0=draw.choice((False, True)),
        decay=draw.choice(("softplus", "softplus", "one", "sharp")),
        layouts={name: draw_layout(draw, LAYOUTS if not name.startswith("grad") else GRAD_LAYOUTS)
                 for name in ("x", "log_a", "h0", "grad_h", "grad_h_last")},
        seed=draw.int(0, 2**31 - 1),
    )


def draw_route_case(draw: Draw, device: str) -> RouteCase:
    lim = LIMITS[device]
    return RouteCase(
        B=draw_size(draw, 4), T=draw_size(draw, lim.route_T), C=draw_size(draw, lim.route_C),
        dtype=draw.choice(SCAN_DTYPES[device]), weight_dtype=draw.choice(PARAM_DTYPES),
        bias_dtype=draw.choice(PARAM_DTYPES), threshold=draw.choice((0.0, 0.1, 0.3, 0.5, 0.5, 0.9, 1.0)),
        force=draw.choice(("none", "none", "random", "all")), scale=draw.choice((0.1, 1.0, 1.0, 10.0)),
        layouts={"hidden": draw_layout(draw), "weight": draw_layout(draw, ("offset", "strided", "expanded")),
                 "force": draw_layout(draw, ("offset", "permuted", "strided")),
                 "grad_prob": draw_layout(draw, GRAD_LAYOUTS)},
        seed=draw.int(0, 2**31 - 1),
    )


MALFORMED = ("unsorted", "out_of_range", "negative", "counts_over_T", "counts_negative", "duplicates")


def draw_attention_case(draw: Draw, device: str, malformed_rate: int = 0) -> AttentionCase:
    """malformed_rate: one case in that many gets a malformed routing (0: never)."""
    lim = LIMITS[device]
    D = draw.choice((64, 128)) if device == "cuda" else draw_size(draw, 72)
    Hk, group = draw_size(draw, 4), draw.choice((1, 1, 2, 3, 4))
    T = draw_size(draw, lim.attn_T)
    S = T + draw.choice((0, 0, draw_size(draw, lim.attn_extra_S)))
    B = draw_size(draw, 4)
    while B * Hk * group * T * S > lim.attn_work and Hk * group > 1:  # keep the reference's scores small
        Hk, group = (Hk // 2, group) if Hk > 1 else (1, group // 2)
    H = Hk * group
    while B * H * T * S > lim.attn_work and B > 1:
        B -= 1
    if B * H * T * S > lim.attn_work:
        S = max(T, lim.attn_work // (B * H * T))
    malformed = ""
    if malformed_rate and draw.int(1, malformed_rate) == 1:
        malformed = draw.choice(MALFORMED)
    return AttentionCase(
        B=B, T=T, S=S, H=H, Hk=Hk, D=D, dtype=draw.choice(ATTN_DTYPES[device]),
        pattern=draw.choice(("random", "random", "random", "none", "all", "first", "last", "ends")),
        density=draw.choice((0.02, 0.1, 0.5, 0.9)), deterministic=draw.choice((False, True)),
        softmax_scale=draw.choice((None, None, None, 0.05, -0.3)), malformed=malformed,
        layouts={**{name: draw_layout(draw) for name in ("q", "k", "v")},
                 "index": draw_layout(draw, ("offset", "permuted")), "counts": draw_layout(draw, ("offset", "strided")),
                 "grad_out": draw_layout(draw, GRAD_LAYOUTS)},
        seed=draw.int(0, 2**31 - 1),
        sm80=device == "cuda" and draw.choice((False, True)),
    )


def draw_decode_case(draw: Draw, device: str) -> DecodeCase:
    lim = LIMITS[device]
    # S crosses the CUDA kernel's split lengths (256-1024 keys) and its keys per iteration.
    return DecodeCase(
        B=draw_size(draw, 9), S=draw.choice((0,) + (draw_size(draw, lim.decode_S),) * 7),
        Hk=(Hk := draw_size(draw, 4)), H=Hk * draw.choice((1, 1, 2, 3, 4, 5, 8)),
        D=draw.choice((64, 128)) if device == "cuda" else draw_size(draw, 72), dtype=draw.choice(ATTN_DTYPES[device]),
        lengths=draw.choice(("full", "random", "random", "short")), density=draw.choice((0.0, 0.3, 0.7, 1.0, 1.0, 1.0)),
        softmax_scale=draw.choice((None, None, 0.05, -0.3)),
        layouts={**{name: draw_layout(draw) for name in ("q", "k_cache", "v_cache")},
                 "seqlens": draw_layout(draw, ("offset", "strided")), "routed": draw_layout(draw, ("offset", "strided"))},
        seed=draw.int(0, 2**31 - 1),
    )


def draw_metaplastic_case(draw: Draw, device: str) -> MetaplasticCase:
    lim = LIMITS[device]
    B, H = draw_size(draw, 4), draw_size(draw, 4)
    T = draw.choice((0,) + (draw_size(draw, lim.meta_T),) * 9)
    dk, dv = draw_size(draw, lim.meta_D), draw_size(draw, lim.meta_D)
    while B * H * T * dk * dv > lim.meta_work and B * H > 1:  # keep the float64 loop's graph small
        B, H = (B - 1, H) if B >= H else (B, H - 1)
    T = min(T, max(1, lim.meta_work // (B * H * dk * dv)))
    dtype = draw.choice(SCAN_DTYPES[device])
    acc = reference_dtype(dtype)
    return MetaplasticCase(
        B=B, T=T, H=H, dk=dk, dv=dv, dtype=dtype, log_alpha_dtype=draw.choice((dtype, torch.float32)),
        prior=draw.choice(("heads", "heads", "0-d", "float")), prior_dtype=draw.choice((acc, torch.float32, torch.float64)),
        prior_range=draw.choice(((0.5, 2.0), (0.5, 2.0), (1e-2, 1e2))), with_state=draw.choice((False, True)),
        decay=draw.choice(("realistic", "realistic", "one", "sharp", "reset")), b=draw.choice(("realistic",) * 3 + ("zero",)),
        scale=draw.choice((None, None, 1.0, 0.3)), grads=draw.choice(("all", "all", "o")),
        layouts={**{name: draw_layout(draw) for name in ("q", "k", "v", "b")},
                 "log_alpha": draw_layout(draw, ("offset", "strided", "permuted", "expanded")),
                 **{name: draw_layout(draw, ("offset", "padded", "strided", "permuted", "expanded"))
                    for name in ("M0", "Ibar0")},
                 **{name: draw_layout(draw, GRAD_LAYOUTS) for name in ("grad_o", "grad_M", "grad_Ibar")}},
        seed=draw.int(0, 2**31 - 1),
    )


# ------------------------------------------------------------------------ checks


def check_scan(case: ScanCase, device: str) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    B, T, C, dt, lay = case.B, case.T, case.C, case.dtype, case.layouts
    acc = reference_dtype(dt)
    decay = {"softplus": lambda v: -F.softplus(v), "one": lambda v: v * 0, "sharp": lambda v: -5 - 5 * v.abs()}
    x, x_ref = make_input((B, T, C), lay["x"], dt, device, gen, expand_dim=1)
    log_a, log_a_ref = make_input((B, T, C), lay["log_a"], dt, device, gen, expand_dim=1,
                                  transform=decay[case.decay])
    h0, h0_ref = make_input((B, C), lay["h0"], acc, device, gen) if case.with_h0 else (None, None)
    inputs = [t for t in (x, log_a, h0) if t is not None]
    # float64: a float32 reference's own running sums over T = 2000 steps are off by more
    # than float32's tolerance (seen: 1.8e-5), the op's chunked scan by less.
    ref_inputs = [as_ref(t, torch.float64) for t in (x_ref, log_a_ref, h0_ref) if t is not None]

    poison_allocator(device)
    h, h_last = cram_ext.gated_scan(x, log_a, h0)
    h_ref, h_last_ref = reference.gated_scan(*ref_inputs[:2], ref_inputs[2] if h0 is not None else None)
    assert h.shape == (B, T, C) and h.dtype == dt and h.device.type == device, "h: shape, dtype or device"
    assert h_last.shape == (B, C) and h_last.dtype == acc, "h_last: shape or dtype"
    # A float32 recurrence over T steps rounds like a running sum: against float64, the CPU
    # op and a float32 reference alike were off by 3.4 sqrt(T) eps at T = 2000 (1.8e-5 for
    # a = 1 and a constant gradient), past float32's 1e-5.
    tol = max(TOLERANCE[dt], 8 * T**0.5 * torch.finfo(acc).eps)
    assert_close(h, h_ref, tol, "h")
    assert_close(h_last, h_last_ref, tol, "h_last")

    grad_h = make_grad((B, T, C), lay["grad_h"], dt, device, gen, expand_dim=1)
    grad_h_last = make_grad((B, C), lay["grad_h_last"], acc, device, gen)
    poison_allocator(device)
    grads = torch.autograd.grad((h, h_last), inputs, (grad_h, grad_h_last))
    ref_grads = torch.autograd.grad((h_ref, h_last_ref), ref_inputs,
                                    (grad_h.cpu().double(), grad_h_last.cpu().double()))
    for name, g, gr, inp in zip(("x", "log_a", "h0"), grads, ref_grads, inputs):
        assert g.shape == inp.shape and g.dtype == inp.dtype, f"grad {name}: shape or dtype"
        assert_close(g, gr, tol, f"grad {name}")


def check_route(case: RouteCase, device: str) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    B, T, C, lay = case.B, case.T, case.C, case.layouts
    acc = reference_dtype(case.dtype)
    hidden, hidden_ref = make_input((B, T, C), lay["hidden"], case.dtype, device, gen, expand_dim=1,
                                    scale=case.scale)
    weight, weight_ref = make_input((C,), lay["weight"], case.weight_dtype, device, gen, scale=C**-0.5)
    bias, bias_ref = make_input((), "contiguous", case.bias_dtype, device, gen, scale=0.5)
    force = force_c = None
    if case.force != "none":
        force_c = torch.rand(B, T, generator=gen) < (0.3 if case.force == "random" else 2.0)
        force = laid_out(force_c, lay["force"], torch.bool, device, 0)

    poison_allocator(device)
    r = cram_ext.route(hidden, weight, bias, case.threshold, force)
    hr, wr, br = (as_ref(t, acc) for t in (hidden_ref, weight_ref, bias_ref))
    ref = reference.route(hr, wr, br, case.threshold, force_c)
    assert r.prob.dtype == acc and r.prob.shape == (B, T), "prob: shape or dtype"
    assert_close(r.prob, ref.prob, TOLERANCE[acc], "prob")
    check_route_exact(type(r)(*(t.cpu() for t in r)), ref, case.threshold, force_c)

    grad_prob = make_grad((B, T), lay["grad_prob"], acc, device, gen)
    poison_allocator(device)
    grads = torch.autograd.grad(r.prob, (hidden, weight, bias), grad_prob)
    ref_grads = torch.autograd.grad(ref.prob, (hr, wr, br), grad_prob.cpu())
    # Floors from the error bounds of the computation, not from the result (which can be
    # small): grad weight and grad bias sum B * T terms of both signs, so their rounding
    # scales with the sum of the terms' magnitudes; and a saturated probability p holds
    # 1 - p to an absolute eps only, so every row's p (1 - p) is known to eps.
    with torch.no_grad():
        eps = torch.finfo(acc).eps
        terms = (grad_prob.cpu().to(acc).abs() * (ref.prob * (1 - ref.prob) + 2 * eps / TOLERANCE[acc]))
        terms = terms.reshape(-1)
        magnitude = {"hidden": torch.linalg.vector_norm(terms[:, None] * wr.abs()).item(),
                     "weight": torch.linalg.vector_norm(terms @ hr.abs().reshape(-1, C)).item(),
                     "bias": terms.sum().item()}
    for name, g, gr, inp in zip(("hidden", "weight", "bias"), grads, ref_grads, (hidden, weight, bias)):
        assert g.shape == inp.shape and g.dtype == inp.dtype, f"grad {name}: shape or dtype"
        # Each gradient comes back in its input's dtype, so it carries that dtype's rounding.
        tol = max(TOLERANCE[case.dtype], TOLERANCE[inp.dtype])
        assert_close(g, gr, tol, f"grad {name}", floor=magnitude[name])


def attention_routing(case: AttentionCase, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, counts) on the CPU: a valid routing of the case's pattern, or a malformed one."""
    B, T = case.B, case.T
    mask = torch.zeros(B, T, dtype=torch.bool)
    if case.pattern == "random":
        mask = torch.rand(B, T, generator=gen) < case.density
    elif case.pattern == "all":
        mask[:] = True
    elif case.pattern in ("first", "ends"):
        mask[:, 0] = True
    if case.pattern in ("last", "ends"):
        mask[:, T - 1] = True
    index, counts = route_from_mask(mask)
    if case.malformed:
        b = int(torch.randint(B, (1,), generator=gen))
        i = int(torch.randint(T, (1,), generator=gen))
        if case.malformed == "unsorted":
            index[b] = torch.randperm(T, generator=gen).to(torch.int32)
            counts[b] = T
        elif case.malformed == "out_of_range":
            index[b, i] = T + 1 + int(torch.randint(1000, (1,), generator=gen))
            counts[b] = max(int(counts[b]), i + 1)
        elif case.malformed == "negative":
            index[b, i] = -1 - int(torch.randint(1000, (1,), generator=gen))
            counts[b] = max(int(counts[b]), i + 1)
        elif case.malformed == "counts_over_T":
            counts[b] = T + 1 + int(torch.randint(1 << 20, (1,), generator=gen))
        elif case.malformed == "counts_negative":
            counts[b] = -1 - int(torch.randint(1 << 20, (1,), generator=gen))
        elif case.malformed == "duplicates":
            index[b] = int(torch.randint(T, (1,), generator=gen))
            counts[b] = T
    return index, counts


def delta_error_floors(case: AttentionCase, q, k, index, counts, out, grad_out, tol) -> tuple[float, float, float]:
    """Floors for grad q, k, v from the backward's error bound. Like FlashAttention's, it
    takes delta_t = rowsum(dO_t * O_t) from the output O rounded to the input dtype, off by
    up to e_t = eps * sum |dO_t| |O_t|; dS = P (dP - delta) then carries that error, large beside
    a small dS (seen: bf16, D = 3, grad k 1.02e-2 off). grad v does not use delta. With
    w_t = |scale| e_t: bound_q[t] = w_t sum_s P_ts |k_s| (attention with values |k|), and
    bound_k[s] = sum_t P_ts w_t |q_t| (that attention's grad v for incoming grad w |q|)."""
    scale = q.shape[-1] ** -0.5 if case.softmax_scale is None else case.softmax_scale
    q, k = q.detach(), k.detach()
    abs_k = k.abs().requires_grad_()
    attn_abs_k, _ = reference.routed_attention(q, k, abs_k, index, counts, case.softmax_scale)
    with torch.no_grad():
        w = abs(scale) * torch.finfo(case.dtype).eps * (grad_out.abs() * out.abs()).sum(-1, keepdim=True)
        bound_q = w * attn_abs_k
    (bound_k,) = torch.autograd.grad(attn_abs_k, abs_k, w * q.abs())
    return (torch.linalg.vector_norm(bound_q).item() / tol, torch.linalg.vector_norm(bound_k).item() / tol, 0.0)


def check_attention(case: AttentionCase, device: str) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    B, T, S, H, Hk, D, dt, lay = case.B, case.T, case.S, case.H, case.Hk, case.D, case.dtype, case.layouts
    q, q_ref = make_input((B, T, H, D), lay["q"], dt, device, gen, expand_dim=2)
    k, k_ref = make_input((B, S, Hk, D), lay["k"], dt, device, gen, expand_dim=2)
    v, v_ref = make_input((B, S, Hk, D), lay["v"], dt, device, gen, expand_dim=2)
    index_c, counts_c = attention_routing(case, gen)
    index = laid_out(index_c, lay["index"], torch.int32, device, 0)
    counts = laid_out(counts_c, lay["counts"], torch.int32, device, 0)

    poison_allocator(device)
    with cram_ext.routed_attention_sm80(case.sm80):
        out, lse = cram_ext.routed_attention(q, k, v, index, counts, case.softmax_scale,
                                             deterministic=case.deterministic)
    grad_out = make_grad((B, T, H, D), lay["grad_out"], dt, device, gen, expand_dim=2)
    poison_allocator(device)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert out.shape == (B, T, H, D) and out.dtype == dt, "out: shape or dtype"
    assert lse.shape == (B, H, T) and lse.dtype == reference_dtype(dt), "lse: shape or dtype"
    if case.malformed:  # no reference: only shapes, and (under compute-sanitizer) memory safety
        for g, inp in zip(grads, (q, k, v)):
            assert g.shape == inp.shape and g.dtype == inp.dtype
        if device == "cuda":
            torch.cuda.synchronize()
        return

    acc = reference_dtype(dt)
    qr, kr, vr = (as_ref(t, acc) for t in (q_ref, k_ref, v_ref))
    out_ref, lse_ref = reference.routed_attention(qr, kr, vr, index_c, counts_c, case.softmax_scale)
    routed = routed_mask(index_c, counts_c, T)
    out_c, lse_c = out.cpu(), lse.cpu()
    check_unrouted_rows(out_c, lse_c, routed)
    tol = TOLERANCE[dt]
    assert_close(out_c, out_ref, tol, "out")
    rows = routed[:, None, :].expand_as(lse_c)
    assert_close(lse_c[rows], lse_ref[rows], tol, "lse")

    g_out = grad_out.cpu().to(acc)
    ref_grads = torch.autograd.grad(out_ref, (qr, kr, vr), g_out)
    # A query that sees one key has a constant softmax: the exact gradients of q and of that
    # key are 0 and the op returns rounding noise (see test_routed_attention).
    floor = grad_floor(g_out[routed]) if routed.any() else 1.0
    floors = dict(zip("qkv", (max(floor, f) for f in delta_error_floors(case, qr, kr, index_c, counts_c, out_ref, g_out, tol))))
    for name, g, gr, inp in zip("qkv", grads, ref_grads, (q, k, v)):
        assert g.shape == inp.shape and g.dtype == inp.dtype, f"grad {name}: shape or dtype"
        assert torch.isfinite(g).all(), f"grad {name} is not finite"
        assert_close(g, gr, tol, f"grad {name}", floor=floors[name])
    assert (grads[0].cpu()[~routed] == 0).all(), "grad q is not 0 at a row that was not routed"


def check_decode(case: DecodeCase, device: str) -> None:
    """routed_decode against the reference; rows not routed (or with no keys) exactly 0 and
    -inf, whatever the cache holds past each row's length (NaN here)."""
    gen = torch.Generator().manual_seed(case.seed)
    B, S, H, Hk, D, dt, lay = case.B, case.S, case.H, case.Hk, case.D, case.dtype, case.layouts
    q, q_ref = make_input((B, H, D), lay["q"], dt, device, gen)
    k_values = random_values((B, S, Hk, D), lay["k_cache"], gen, 0)
    v_values = random_values((B, S, Hk, D), lay["v_cache"], gen, 0)
    if case.lengths == "full":
        n = torch.full((B,), S, dtype=torch.int32)
    elif case.lengths == "short":
        n = torch.randint(0, min(S, 3) + 1, (B,), generator=gen, dtype=torch.int32)
    else:
        n = torch.randint(-2, S + 4, (B,), generator=gen, dtype=torch.int32)
    valid = torch.arange(S)[None, :] < n.clamp(0, S)[:, None].long()
    k = laid_out(k_values, lay["k_cache"], dt, device, 0)
    v = laid_out(v_values, lay["v_cache"], dt, device, 0)
    # Poison what must not be read (not in a broadcast cache, whose rows are one row).
    invalid = (~valid)[:, :, None, None].to(device)
    for cache in (k, v):
        if cache.stride(0) != 0 or B == 1:
            cache.masked_fill_(invalid, float("nan"))
    routed = torch.rand(B, generator=gen) < case.density
    seqlens_t = laid_out(n.double(), lay["seqlens"], torch.int32, device, 0)
    routed_t = laid_out(routed.double(), lay["routed"], torch.bool, device, 0)
    out, lse = cram_ext.routed_decode(q.detach(), k, v, seqlens_t, routed_t, case.softmax_scale)
    acc = reference_dtype(dt)
    ref_out, ref_lse = reference.routed_decode(q_ref.to(acc), k.detach().cpu().to(acc), v.detach().cpu().to(acc), n,
                                               routed, case.softmax_scale)
    assert out.shape == (B, H, D) and out.dtype == dt and lse.shape == (B, H)
    out, lse = out.cpu(), lse.cpu()
    empty = ~(routed & (n > 0))
    assert (out[empty] == 0).all(), "rows not routed (or with no keys) must be exactly 0"
    assert (lse[empty] == float("-inf")).all(), "lse of rows not routed (or with no keys) must be -inf"
    if (~empty).any():
        tol = TOLERANCE[dt]
        assert_close(out[~empty], ref_out[~empty].double(), tol, "out")
        assert_close(lse[~empty], ref_lse[~empty].double(), max(tol, 1e-6), "lse")


# Gradients of metaplastic_scan against the float64 loop. float64: the contract's 1e-10; the
# others are looser than the output's bound: the backward's sums (d log_alpha: d_v d_k terms
# per token; d prior: all of B T d_v d_k) add rounding, and q, k, v, b's gradients come back
# rounded to their dtype.
METAPLASTIC_GRAD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def metaplastic_tolerance(dtype: torch.dtype, T: int) -> float:
    """Bound on o (and, with the accumulation dtype, on the final state) against the float64
    loop: docs/metaplastic.md §4, a float32 scan over T steps max(1e-5, 16 sqrt(T) eps). Each
    step rounds the decay (expf, up to 2 ulp), its product and the add: 8 sqrt(T) eps was passed
    by 1.37e-5 at T = 184 (CUDA, b = 0, the state a product of 184 rounded decays)."""
    if dtype == torch.float64:
        return TOLERANCE[dtype]
    return max(TOLERANCE[dtype], 16 * max(T, 1) ** 0.5 * torch.finfo(torch.float32).eps)


def metaplastic_prior_grad_floor(q, k, v, b, log_alpha, prior, state, scale, grad_o) -> float:
    """Floor for grad prior: the norm of sum |terms| per head (a 0-d prior sums the heads).
    The prior enters only the read-out, so grad prior = -scale sum_{b,t,i,j} dO_ti q_tj M_tij /
    (Ibar_tij + I_p)^2, a sum of B T d_v d_k terms of both signs. Its error is each term's
    (the recomputed state's, up to metaplastic_tolerance) times sum |terms|, which can be
    thousands of times |sum| (seen on CUDA and CPU: grad prior 1.0e-4 to 9.0e-4 off |sum| at
    cancellation factors 35 to 3,400), so |sum| alone is not a scale to measure it against.
    The states come from the float64 loop's own step (cram_ext.reference_metaplastic)."""
    f64, cpu = torch.float64, torch.device("cpu")
    q, k, v, b, g = (x.detach().to(cpu, f64) for x in (q, k, v, b, grad_o))
    B, T, H, dk = q.shape
    scale = dk**-0.5 if scale is None else float(scale)
    prior = prior.detach().to(cpu, f64) if torch.is_tensor(prior) else prior
    ip = _prior_per_head(prior, H, f64, cpu)
    state = None if state is None else tuple(s.detach().to(cpu) for s in state)
    M, ibar = _initial_state(state, B, H, v.shape[-1], dk, f64, cpu)
    alpha = log_alpha.detach().to(cpu, f64).exp()
    total = torch.zeros(H, dtype=f64)
    with torch.no_grad():
        for t in range(T):
            _, M, ibar = _step(M, ibar, q[:, t], k[:, t], v[:, t], b[:, t], alpha[:, t], ip, scale)
            total += (g[:, t, :, :, None] * q[:, t, :, None, :] * M / (ibar + ip) ** 2).abs().sum((0, 2, 3))
    total = abs(scale) * (total if torch.as_tensor(prior).dim() == 1 else total.sum())
    return torch.linalg.vector_norm(total).item()


def _leaf(values: torch.Tensor, layout: str, dtype: torch.dtype, device: str, expand_dim: int):
    t = laid_out(values, layout, dtype, device, expand_dim)
    return t.requires_grad_(), values.to(dtype).to(torch.float64)


def metaplastic_inputs(case: MetaplasticCase, device: str, gen: torch.Generator):
    """The op's arguments (q, k, v, b, log_alpha, prior, state) laid out as the case says, and the
    float64 values the kernel reads (inputs rounded to their dtypes, log_alpha and prior to the
    accumulation dtype), in the ranges of docs/metaplastic.md §4."""
    B, T, H, dk, dv, dt, lay = case.B, case.T, case.H, case.dk, case.dv, case.dtype, case.layouts
    acc = reference_dtype(dt)
    # q, k, v, b constant along the heads when expanded; L2 normalisation keeps that.
    q_v = F.normalize(random_values((B, T, H, dk), lay["q"], gen, 2), dim=-1)
    k_v = F.normalize(random_values((B, T, H, dk), lay["k"], gen, 2), dim=-1)
    v_v = random_values((B, T, H, dv), lay["v"], gen, 2)
    b_v = random_values((B, T, H, dv), lay["b"], gen, 2, lambda x: 1.5 * torch.sigmoid(x) * (case.b != "zero"))
    # log_alpha = -A dt, A in [1, 16] per head, dt log-uniform in [1e-3, 1e-1]; constant along T when expanded.
    A = 1 + 15 * torch.rand(H, generator=gen, dtype=torch.float64)

    def log_alpha_values(x):  # on the values before their broadcast (random_values says why)
        u = torch.sigmoid(1.7 * x)  # about uniform in (0, 1)
        return {"realistic": -A * 1e-3 * 100.0**u, "reset": -A * 1e-3 * 100.0**u, "one": 0 * u,
                "sharp": -5 - 10 * u}[case.decay]

    la_v = random_values((B, T, H), lay["log_alpha"], gen, 1, log_alpha_values)
    if case.decay == "reset":
        reset = torch.rand(B, 1 if lay["log_alpha"] == "expanded" else T, H, generator=gen) < 0.05
        if T > 0 and lay["log_alpha"] != "expanded":
            reset[0, 0] = True  # a reset at the first token: the initial state is forgotten
        la_v = la_v.masked_fill(reset.expand(B, T, H), float("-inf"))
    q, q_r = _leaf(q_v, lay["q"], dt, device, 2)
    k, k_r = _leaf(k_v, lay["k"], dt, device, 2)
    v, v_r = _leaf(v_v, lay["v"], dt, device, 2)
    b, b_r = _leaf(b_v, lay["b"], dt, device, 2)
    la, la_r = _leaf(la_v, lay["log_alpha"], case.log_alpha_dtype, device, 1)
    la_r = la_r.to(acc).double()
    lo, hi = case.prior_range
    prior_v = torch.empty(H, dtype=torch.float64).uniform_(math.log(lo), math.log(hi), generator=gen).exp()
    if case.prior == "float":
        prior = float(prior_v[0])
        prior_r = torch.tensor(prior, dtype=acc).double().expand(H)
    else:
        prior_v = prior_v[0] if case.prior == "0-d" else prior_v
        prior, prior_r = _leaf(prior_v, "contiguous", case.prior_dtype, device, 0)
        prior_r = prior_r.to(acc).double()
    state = state_r = None
    if case.with_state:
        M0, M0_r = _leaf(random_values((B, H, dv, dk), lay["M0"], gen, 0), lay["M0"], acc, device, 0)
        I0_v = random_values((B, H, dv, dk), lay["Ibar0"], gen, 0, lambda x: 3 * torch.sigmoid(x))
        I0, I0_r = _leaf(I0_v, lay["Ibar0"], acc, device, 0)
        state, state_r = (M0, I0), (M0_r, I0_r)
    return (q, k, v, b, la, prior, state), (q_r, k_r, v_r, b_r, la_r, prior_r, state_r)


def check_metaplastic(case: MetaplasticCase, device: str) -> None:
    """metaplastic_scan, forward and every gradient, against the float64 loop of
    cram_ext.reference_metaplastic on the values the kernel reads."""
    gen = torch.Generator().manual_seed(case.seed)
    B, T, H, dk, dv, dt, lay = case.B, case.T, case.H, case.dk, case.dv, case.dtype, case.layouts
    acc = reference_dtype(dt)
    args, ref_args = metaplastic_inputs(case, device, gen)
    q, k, v, b, la, prior, state = args
    q_r, k_r, v_r, b_r, la_r, prior_r, state_r = ref_args
    ref_leaves = [t.detach().requires_grad_() for t in (q_r, k_r, v_r, b_r, la_r)]
    leaves = [q, k, v, b, la]
    if torch.is_tensor(prior):
        leaves.append(prior)
        prior_r = prior_r.detach().requires_grad_()
        ref_leaves.append(prior_r)
    if state is not None:
        leaves += list(state)
        state_r = tuple(s.detach().requires_grad_() for s in state_r)
        ref_leaves += list(state_r)

    poison_allocator(device)
    o, (M, ibar) = cram_ext.metaplastic_scan(q, k, v, b, la, prior, state, case.scale)
    o_ref, (M_ref, ibar_ref) = metaplastic_scan_reference(*ref_leaves[:5], prior_r, state_r, case.scale)
    assert o.shape == (B, T, H, dv) and o.dtype == dt and o.device.type == device, "o: shape, dtype or device"
    for name, x in (("M", M), ("Ibar", ibar)):
        assert x.shape == (B, H, dv, dk) and x.dtype == acc, f"{name}: shape or dtype"
    tol, state_tol = metaplastic_tolerance(dt, T), metaplastic_tolerance(acc, T)
    assert_close(o, o_ref, tol, "o")
    assert_close(M, M_ref, state_tol, "M")
    assert_close(ibar, ibar_ref, state_tol, "Ibar", floor=1e-6)

    grad_o = make_grad((B, T, H, dv), lay["grad_o"], dt, device, gen, expand_dim=2)
    outputs, ref_outputs, grad_outputs = [o], [o_ref], [grad_o]
    if case.grads == "all":
        grad_M = make_grad((B, H, dv, dk), lay["grad_M"], acc, device, gen)
        grad_I = make_grad((B, H, dv, dk), lay["grad_Ibar"], acc, device, gen)
        outputs += [M, ibar]
        ref_outputs += [M_ref, ibar_ref]
        grad_outputs += [grad_M, grad_I]
    poison_allocator(device)
    grads = torch.autograd.grad(outputs, leaves, grad_outputs)
    # With T = 0 the loop's o (and, without a state, its final state) is a function of nothing.
    connected = [(r, g.cpu().double()) for r, g in zip(ref_outputs, grad_outputs) if r.requires_grad]
    ref_grads = [None] * len(ref_leaves)
    if connected:
        outs, grads_in = zip(*connected)
        ref_grads = torch.autograd.grad(outs, ref_leaves, grads_in, allow_unused=True)
    names = ["q", "k", "v", "b", "log_alpha"] + (["prior"] if torch.is_tensor(prior) else []) + \
        (["M0", "Ibar0"] if state is not None else [])
    for name, g, g_ref, inp in zip(names, grads, ref_grads, leaves):
        assert g.shape == inp.shape and g.dtype == inp.dtype, f"grad {name}: shape or dtype"
        # Each gradient comes back in its input's dtype (log_alpha and prior may be float32
        # beside float64 inputs), so it carries that dtype's rounding.
        grad_tol = max(METAPLASTIC_GRAD_TOLERANCE[dt], METAPLASTIC_GRAD_TOLERANCE[inp.dtype], tol)
        g_ref = torch.zeros(inp.shape, dtype=torch.float64) if g_ref is None else g_ref
        if name == "log_alpha":
            resets = (ref_args[4] == float("-inf")).expand(g_ref.shape)
            assert (g.detach().cpu()[resets] == 0).all(), "grad log_alpha: not 0 at a reset"
        floor = 1e-6
        if name == "prior":
            floor = max(floor, metaplastic_prior_grad_floor(*ref_leaves[:5], prior_r, state_r, case.scale, grad_o))
        assert_close(g, g_ref, grad_tol, f"grad {name}", floor=floor)


OPS = {
    "scan": (draw_scan_case, check_scan),
    "route": (draw_route_case, check_route),
    "attention": (draw_attention_case, check_attention),
    "decode": (draw_decode_case, check_decode),
    "metaplastic": (draw_metaplastic_case, check_metaplastic),
}
