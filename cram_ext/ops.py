"""The cram ops: Python wrappers, fake (meta) implementations and autograd.

The ops themselves are declared in csrc/registration.cpp and implemented per
backend in C++/CUDA; the launchers there check every argument and raise
TypeError / ValueError naming it. This module adds what torch.compile and
autograd need, and the user-facing signatures.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the library runs the op registrations)
from .reference import accumulate_dtype
from .route_types import Route

__all__ = ["gated_scan", "route", "routed_attention", "routed_attention_kernel",
           "routed_attention_sm80", "routed_decode", "metaplastic_scan", "metaplastic_step", "check_route",
           "set_debug"]

_debug = os.environ.get("CRAM_DEBUG", "0") not in ("", "0")


def _check_same_device(op: str, **tensors: Tensor | None) -> None:
    """Every tensor argument on the first one's device, in the C++ launchers' words. Called
    by the fake kernels: a meta tensor among CPU or CUDA ones dispatches to them (not to the
    launchers, which check this themselves) and would return uninitialised memory."""
    given = [(name, t) for name, t in tensors.items() if isinstance(t, Tensor)]
    for name, t in given[1:]:
        if t.device != given[0][1].device:
            raise ValueError(f"{op}: {name}: expected a tensor on {given[0][1].device} like {given[0][0]}, got one "
                             f"on {t.device}")


def set_debug(enabled: bool) -> None:
    """Validate index/counts with `check_route` inside `routed_attention`.

    Off by default (or set CRAM_DEBUG=1): the check reads the routing on the host,
    a device sync that CUDA graphs and torch.compile(fullgraph=True) don't allow.
    """
    global _debug
    _debug = bool(enabled)


# ---------------------------------------------------------------- gated_scan


def gated_scan(x: Tensor, log_a: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gated linear scan, per channel: h[:, t] = exp(log_a[:, t]) * h[:, t-1] + x[:, t].

    Args:
        x: (B, T, C) float32/float16/bfloat16 (float64 on CPU).
        log_a: (B, T, C), the log of the decay, same dtype as x (usually <= 0).
        h0: (B, C) initial state in float32 (float64 for float64 x), or None for zeros.

    Returns:
        h: (B, T, C) in x.dtype, accumulated in float32 (float64 for float64 x).
        h_last: (B, C), the final state in the accumulation dtype.

    Differentiable in x, log_a and h0. Any strides and storage offsets (inputs are made
    contiguous where the kernels need it). Sizes past 2**31 elements work: the kernels
    index in 64 bits (python_tests/test_limits.py, (1, 2**20, 4104) on the GPU).

    Non-finite values follow IEEE arithmetic channel by channel: a NaN in x or log_a at
    (b, t, c) makes h[b, t:, c] and h_last[b, c] NaN and nothing else; log_a = -inf is a
    reset (exp(log_a) = 0 exactly, so h[:, t] = x[:, t] and its log_a gradient is 0).
    """
    return torch.ops.cram.gated_scan.default(x, log_a, h0)


@torch.library.register_fake("cram::gated_scan")
def _(x, log_a, h0):
    _check_same_device("gated_scan", x=x, log_a=log_a, h0=h0)
    # The kernels write contiguous outputs whatever the inputs' strides: new_empty, not empty_like.
    return x.new_empty(x.shape), x.new_empty((x.shape[0], x.shape[2]), dtype=accumulate_dtype(x.dtype))


@torch.library.register_fake("cram::gated_scan_backward")
def _(grad_h, grad_h_last, log_a, h, h0):
    _check_same_device("gated_scan_backward", grad_h=grad_h, grad_h_last=grad_h_last, log_a=log_a, h=h, h0=h0)
    return h.new_empty(h.shape), h.new_empty(h.shape), grad_h_last.new_empty(grad_h_last.shape)


def _gated_scan_setup_context(ctx, inputs, output):
    _, log_a, h0 = inputs
    h, _ = output
    ctx.save_for_backward(log_a, h, h0)


def _gated_scan_backward(ctx, grad_h, grad_h_last):
    log_a, h, h0 = ctx.saved_tensors
    grad_x, grad_log_a, grad_h0 = torch.ops.cram.gated_scan_backward.default(grad_h, grad_h_last, log_a, h, h0)
    return grad_x, grad_log_a, grad_h0 if h0 is not None else None


torch.library.register_autograd(
    "cram::gated_scan", _gated_scan_backward, setup_context=_gated_scan_setup_context
)


# --------------------------------------------------------------------- route


def route(
    hidden: Tensor, weight: Tensor, bias: Tensor | float, threshold: float = 0.5, force: Tensor | None = None
) -> Route:
    """The router decision and the in-row compaction of the routed positions.

    Args:
        hidden: (B, T, C) float32/float16/bfloat16 (float64 on CPU).
        weight: (C,) router weight, any floating dtype.
        bias: 0-dim router bias, any floating dtype, or a Python number (as float32).
        threshold: a token is routed when its probability exceeds this.
        force: (B, T) bool, tokens routed whatever their probability (exploration), or None.

    Returns:
        A `Route` (prob, mask, index, counts); see its docstring. Only prob is
        differentiable, in hidden, weight and bias. No host-device sync.

    Any strides and storage offsets; sizes past 2**31 elements work (T < 2**31). A row
    whose probability is NaN (a NaN in its hidden state) is not routed unless forced
    (NaN > threshold is false); other rows are unaffected.
    """
    if not isinstance(bias, Tensor):
        # A fill kernel, not a host-to-device copy: capturable in a CUDA graph.
        bias = torch.full((), float(bias), dtype=torch.float32, device=hidden.device)
    return Route(*torch.ops.cram.route.default(hidden, weight, bias, float(threshold), force))


@torch.library.register_fake("cram::route")
def _(hidden, weight, bias, threshold, force):
    _check_same_device("route", hidden=hidden, weight=weight, bias=bias, force=force)
    B, T = hidden.shape[0], hidden.shape[1]
    return (
        hidden.new_empty((B, T), dtype=accumulate_dtype(hidden.dtype)),
        hidden.new_empty((B, T), dtype=torch.bool),
        hidden.new_empty((B, T), dtype=torch.int32),
        hidden.new_empty((B,), dtype=torch.int32),
    )


@torch.library.register_fake("cram::route_backward")
def _(grad_prob, prob, hidden, weight):
    _check_same_device("route_backward", grad_prob=grad_prob, prob=prob, hidden=hidden, weight=weight)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), prob.new_empty(())


def _route_setup_context(ctx, inputs, output):
    hidden, weight, bias, _, _ = inputs
    prob = output[0]
    ctx.save_for_backward(prob, hidden, weight)
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(*output[1:])


def _route_backward(ctx, grad_prob, *_):
    prob, hidden, weight = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = torch.ops.cram.route_backward.default(grad_prob, prob, hidden, weight)
    return grad_hidden, grad_weight, grad_bias.to(ctx.bias_dtype), None, None


torch.library.register_autograd("cram::route", _route_backward, setup_context=_route_setup_context)


def check_route(index: Tensor, counts: Tensor, T: int) -> None:
    """Raise ValueError unless (index, counts) is a valid routing of T positions.

    Valid: index (B, T) int32 and counts (B,) int32 on one device, 0 <= counts <= T,
    index[b, :counts[b]] strictly increasing in [0, T), index[b, counts[b]:] == T.
    Reads the tensors on the host (a device sync): a debugging aid, see `set_debug`.
    """
    if not isinstance(index, Tensor) or not isinstance(counts, Tensor):
        raise TypeError("check_route: index and counts must be tensors")
    if index.dtype != torch.int32 or counts.dtype != torch.int32:
        raise TypeError(f"check_route: index and counts must be int32, got {index.dtype} and {counts.dtype}")
    if index.dim() != 2 or index.shape[1] != T:
        raise ValueError(f"check_route: index: expected shape (B, T={T}), got {tuple(index.shape)}")
    if counts.shape != (index.shape[0],):
        raise ValueError(f"check_route: counts: expected shape ({index.shape[0]},), got {tuple(counts.shape)}")
    if index.device != counts.device:
        raise ValueError(f"check_route: index on {index.device} and counts on {counts.device}")
    bad_counts = (counts < 0) | (counts > T)
    if bool(bad_counts.any()):
        b = int(bad_counts.nonzero()[0, 0])
        raise ValueError(f"check_route: counts[{b}] = {int(counts[b])} is outside [0, T={T}]")
    slot = torch.arange(T, device=index.device).expand_as(index)
    routed = slot < counts.unsqueeze(1)
    out_of_range = routed & ((index < 0) | (index >= T))
    if bool(out_of_range.any()):
        b, i = (int(v) for v in out_of_range.nonzero()[0])
        raise ValueError(f"check_route: index[{b}, {i}] = {int(index[b, i])} is outside [0, T={T})")
    unsorted = routed[:, 1:] & (index[:, 1:] <= index[:, :-1])
    if bool(unsorted.any()):
        b, i = (int(v) for v in unsorted.nonzero()[0])
        raise ValueError(f"check_route: index[{b}] is not strictly increasing at slot {i + 1}")
    bad_tail = ~routed & (index != T)
    if bool(bad_tail.any()):
        b, i = (int(v) for v in bad_tail.nonzero()[0])
        raise ValueError(f"check_route: index[{b}, {i}] = {int(index[b, i])}, past counts[{b}], must be T={T}")


# ---------------------------------------------------------- routed_attention


def routed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: Tensor,
    counts: Tensor,
    softmax_scale: float | None = None,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    """Causal softmax attention computed only for routed queries, at their original positions.

    For every b, i < counts[b], t = index[b, i] and head h:
    out[b, t, h] = softmax(scale * q[b, t, h] . k[b, j, h // (H / Hk)]) @ v over keys
    j <= t + (S - T) (bottom-right aligned; S == T for self-attention).

    Args:
        q: (B, T, H, D); float16/bfloat16 on CUDA (D in {64, 128}), also float32/float64 on CPU.
        k, v: (B, S, Hk, D), same dtype, H % Hk == 0, S >= T.
        index, counts: the routing, as `route` returns it ((B, T) and (B,) int32).
        softmax_scale: defaults to D ** -0.5.
        deterministic: make the gradients bitwise identical run to run (same device,
            same inputs); the outputs always are. With False (the default, as in
            flash-attn) the CUDA backward sums dQ inside its dK/dV kernel, with bulk float
            reductions whose order varies; with True a separate dQ kernel recomputes the
            scores: forward+backward at density 1 took 6-18% longer on an H100
            (docs/benchmarks.md). The CPU backward is deterministic either way, and so is
            the CUDA backward before Hopper (the fused dQ needs sm_90's bulk reductions).

    Returns:
        out: (B, T, H, D) in q.dtype, exactly 0 at rows that were not routed.
        lse: (B, H, T) log-sum-exp of the scaled scores in float32 (float64 for float64
        inputs), -inf at rows that were not routed. Not differentiable.

    Differentiable in q, k and v. Any strides and storage offsets (the CUDA kernels read
    strided rows and copy only what is not 16-byte aligned). Tensors past 2**31 elements
    work; B, T, S and H must each fit in int32. A malformed routing can give a wrong result
    but never an out-of-bounds access; `set_debug(True)` validates it first.

    Non-finite values: rows that are not routed are never read as queries, so a NaN in q
    or in the incoming gradient there changes nothing. A NaN or Inf in k or v at key j may
    reach any routed query of the same sequence and key/value head group (as in
    FlashAttention, a masked key can still enter P @ V as 0 * NaN within its key tile), and
    never another sequence or head group.
    """
    if not isinstance(deterministic, bool):
        raise TypeError(f"routed_attention: deterministic must be a bool, got {type(deterministic).__name__}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if _debug:
        check_route(index, counts, q.shape[1])
    return torch.ops.cram.routed_attention.default(q, k, v, index, counts, scale, deterministic)


def routed_attention_kernel(device: torch.device | str, head_dim: int, which: str = "forward") -> str:
    """Which kernel `routed_attention`'s forward (which="forward") or its backward's dK/dV
    ("backward") runs for this head dim on `device`, as things stand now: "sm90a" (warpgroup
    MMAs, Hopper with a build for "9.0a", head dim 128), "sm80" (the kernel of every other
    CUDA case), or "cpu".

    Setting the environment variable CRAM_ROUTED_ATTENTION_SM80=1 makes the CUDA kernels run
    their SM80 versions on Hopper too (read at every call), e.g. to compare the two.
    """
    return torch.ops.cram.routed_attention_kernel(torch.device(device), int(head_dim), str(which))


_SM80_SWITCH = "CRAM_ROUTED_ATTENTION_SM80"


@contextlib.contextmanager
def routed_attention_sm80(enabled: bool = True) -> Iterator[None]:
    """Inside, `routed_attention`'s CUDA forward and backward run the SM80 kernels
    (enabled=True) or their default choice (False), whatever CRAM_ROUTED_ATTENTION_SM80 said
    before; it says that again after. For comparing the kernels on Hopper (the process
    environment: not for use from several threads at once)."""
    before = os.environ.get(_SM80_SWITCH)
    os.environ[_SM80_SWITCH] = "1" if enabled else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[_SM80_SWITCH]
        else:
            os.environ[_SM80_SWITCH] = before


@torch.library.register_fake("cram::routed_attention")
def _(q, k, v, index, counts, softmax_scale, deterministic=False):
    _check_same_device("routed_attention", q=q, k=k, v=v, index=index, counts=counts)
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=accumulate_dtype(q.dtype))


@torch.library.register_fake("cram::routed_attention_backward")
def _(grad_out, q, k, v, out, lse, index, counts, softmax_scale, deterministic=False):
    _check_same_device("routed_attention_backward", grad_out=grad_out, q=q, k=k, v=v, out=out, lse=lse,
                       index=index, counts=counts)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _routed_attention_setup_context(ctx, inputs, output):
    q, k, v, index, counts, softmax_scale, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, index, counts)
    ctx.softmax_scale = softmax_scale
    ctx.deterministic = bool(rest[0]) if rest else False
    ctx.mark_non_differentiable(lse)


def _routed_attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, index, counts = ctx.saved_tensors
    grad_q, grad_k, grad_v = torch.ops.cram.routed_attention_backward.default(
        grad_out, q, k, v, out, lse, index, counts, ctx.softmax_scale, ctx.deterministic
    )
    return grad_q, grad_k, grad_v, None, None, None, None


torch.library.register_autograd(
    "cram::routed_attention", _routed_attention_backward, setup_context=_routed_attention_setup_context
)


# ------------------------------------------------------------- routed_decode


def routed_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens: Tensor,
    routed: Tensor,
    softmax_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One decoding step of routed attention: each row's new query token attends over its own
    KV cache, only in the rows the router sent to attention.

    For every row b with routed[b] and n = clamp(seqlens[b], 0, S) > 0, and head h:
    out[b, h] = softmax(scale * q[b, h] . k_cache[b, j, h // (H / Hk)]) @ v_cache over j < n.
    The new token's own key and value must already be in the cache (at position n - 1).

    Args:
        q: (B, H, D), the new tokens' queries; float16/bfloat16/float32 on CUDA (D in {64,
            128}), also float64 on CPU.
        k_cache, v_cache: (B, S, Hk, D) buffers of a static length S (a `KVCache`'s), same
            dtype, H % Hk == 0. Only the first seqlens[b] positions of row b are read.
        seqlens: (B,) int32, the keys valid in each row (rows may differ), read on the device.
        routed: (B,) bool, the rows whose attention is computed.
        softmax_scale: defaults to D ** -0.5.

    Returns:
        out: (B, H, D) in q.dtype, exactly 0 in rows not routed or with no keys.
        lse: (B, H) log-sum-exp of the scaled scores, float32 (float64 for float64 inputs),
        -inf in those rows.

    Inference only (not differentiable). No host sync, and the work plan depends on the
    shapes alone, so a step can be captured in a CUDA graph with seqlens and routed updated
    in place. On CUDA the cache is split along S over the multiprocessors (FlashDecoding)
    and the splits merged through their log-sum-exps; a row that is not routed costs reading
    its flag. Strided views are read as they are when each row of D elements is contiguous
    and (CUDA) 16-byte aligned; anything else is copied first (the whole cache: allocate
    caches contiguous). Values of seqlens outside [0, S] are clamped, never read past.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return torch.ops.cram.routed_decode.default(q, k_cache, v_cache, seqlens, routed, scale)


@torch.library.register_fake("cram::routed_decode")
def _(q, k_cache, v_cache, seqlens, routed, softmax_scale):
    _check_same_device("routed_decode", q=q, k_cache=k_cache, v_cache=v_cache, seqlens=seqlens, routed=routed)
    return (q.new_empty(q.shape),
            q.new_empty(q.shape[:2], dtype=accumulate_dtype(q.dtype)))


# ---------------------------------------------------------- metaplastic_scan


def _metaplastic_scale(q: Tensor, scale: float | None) -> float:
    if scale is not None:
        return float(scale)
    # A q without a positive d_k is the launcher's to reject, naming q (not a ZeroDivisionError here).
    return q.shape[-1] ** -0.5 if q.dim() > 0 and q.shape[-1] > 0 else 1.0


def _metaplastic_prior(prior: Tensor | float, q: Tensor, heads: int) -> Tensor:
    if isinstance(prior, Tensor):
        return prior.expand(heads) if prior.dim() == 0 else prior
    # A fill kernel, not a host-to-device copy: capturable in a CUDA graph.
    return torch.full((heads,), float(prior), dtype=accumulate_dtype(q.dtype), device=q.device)


def metaplastic_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    b: Tensor,
    log_alpha: Tensor,
    prior: Tensor | float,
    state: tuple[Tensor, Tensor] | None = None,
    scale: float | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The metaplastic working memory (Palimpsa) over a sequence, per batch row and head:

        M_t    = a_t M_{t-1}    + v_t k_t^T              a_t = exp(log_alpha_t)
        Ibar_t = a_t Ibar_{t-1} + b_t (k_t * k_t)^T
        o_t    = scale * (M_t / (Ibar_t + prior)) q_t    (elementwise division, then a mat-vec)

    docs/metaplastic.md is the contract; `cram_ext.reference_metaplastic` the plain loop.

    Args:
        q, k: (B, T, H, d_k); v, b: (B, T, H, d_v), b >= 0. float32/float16/bfloat16 (float64
            on the CPU), one dtype; d_k, d_v <= 128 on CUDA.
        log_alpha: (B, T, H), the log of the decay, <= 0 (-inf is an exact reset); any float dtype.
        prior: I_p > 0 per head, (H,) or a scalar tensor or a number.
        state: the initial (M, Ibar), each (B, H, d_v, d_k) in float32 (float64 for float64
            inputs), or None for zeros (mean 0, importance = the prior).
        scale: multiplies the read-out; d_k ** -0.5 when None.

    Returns:
        o: (B, T, H, d_v) in q.dtype, accumulated in float32 (float64).
        (M, Ibar): the final state, float32 (float64).

    Differentiable in q, k, v, b, log_alpha, prior and the initial state. Any strides (inputs
    are made contiguous). The backward recomputes the states: the forward keeps only its inputs.
    """
    H = q.shape[2] if q.dim() == 4 else 0
    M0, ibar0 = (None, None) if state is None else state
    o, M, ibar = torch.ops.cram.metaplastic_scan.default(
        q, k, v, b, log_alpha, _metaplastic_prior(prior, q, H), M0, ibar0, _metaplastic_scale(q, scale))
    return o, (M, ibar)


def metaplastic_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    b: Tensor,
    log_alpha: Tensor,
    prior: Tensor | float,
    state: tuple[Tensor, Tensor],
    scale: float | None = None,
) -> Tensor:
    """One decoding token of `metaplastic_scan`, updating `state` in place.

    q, k: (B, H, d_k); v, b: (B, H, d_v); log_alpha: (B, H); state: (M, Ibar), each a
    contiguous (B, H, d_v, d_k) float32 (float64 for float64 inputs) tensor, overwritten with
    the new state. Returns o (B, H, d_v) in q.dtype: what `metaplastic_scan` gives on a
    one-token sequence. Inference only (not differentiable); no host sync.
    """
    H = q.shape[1] if q.dim() == 3 else 0
    M, ibar = state
    return torch.ops.cram.metaplastic_step.default(
        q, k, v, b, log_alpha, _metaplastic_prior(prior, q, H), M, ibar, _metaplastic_scale(q, scale))


@torch.library.register_fake("cram::metaplastic_scan")
def _(q, k, v, b, log_alpha, prior, M0, Ibar0, scale):
    _check_same_device("metaplastic_scan", q=q, k=k, v=v, b=b, log_alpha=log_alpha, prior=prior, M0=M0,
                       Ibar0=Ibar0)
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    acc = accumulate_dtype(q.dtype)
    return (q.new_empty((B, T, H, dv)), q.new_empty((B, H, dv, dk), dtype=acc),
            q.new_empty((B, H, dv, dk), dtype=acc))


@torch.library.register_fake("cram::metaplastic_scan_backward")
def _(grad_o, grad_M, grad_Ibar, q, k, v, b, log_alpha, prior, M0, Ibar0, scale):
    _check_same_device("metaplastic_scan_backward", grad_o=grad_o, grad_M=grad_M, grad_Ibar=grad_Ibar, q=q, k=k,
                       v=v, b=b, log_alpha=log_alpha, prior=prior, M0=M0, Ibar0=Ibar0)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), b.new_empty(b.shape),
            log_alpha.new_empty(log_alpha.shape), prior.new_empty(prior.shape), grad_M.new_empty(grad_M.shape),
            grad_M.new_empty(grad_M.shape))


@torch.library.register_fake("cram::metaplastic_step")
def _(q, k, v, b, log_alpha, prior, M, Ibar, scale):
    _check_same_device("metaplastic_step", q=q, k=k, v=v, b=b, log_alpha=log_alpha, prior=prior, M=M, Ibar=Ibar)
    return q.new_empty(v.shape)


def _metaplastic_setup_context(ctx, inputs, output):
    q, k, v, b, log_alpha, prior, M0, Ibar0, scale = inputs
    ctx.save_for_backward(q, k, v, b, log_alpha, prior, M0, Ibar0)
    ctx.scale = scale


def _metaplastic_backward(ctx, grad_o, grad_M, grad_Ibar):
    q, k, v, b, log_alpha, prior, M0, Ibar0 = ctx.saved_tensors
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    acc = accumulate_dtype(q.dtype)
    if grad_o is None:
        grad_o = q.new_zeros((B, T, H, dv))
    if grad_M is None:
        grad_M = q.new_zeros((B, H, dv, dk), dtype=acc)
    if grad_Ibar is None:
        grad_Ibar = q.new_zeros((B, H, dv, dk), dtype=acc)
    grads = torch.ops.cram.metaplastic_scan_backward.default(
        grad_o, grad_M, grad_Ibar, q, k, v, b, log_alpha, prior, M0, Ibar0, ctx.scale)
    grad_q, grad_k, grad_v, grad_b, grad_log_alpha, grad_prior, grad_M0, grad_Ibar0 = grads
    return (grad_q, grad_k, grad_v, grad_b, grad_log_alpha, grad_prior,
            grad_M0 if M0 is not None else None, grad_Ibar0 if Ibar0 is not None else None, None)


torch.library.register_autograd(
    "cram::metaplastic_scan", _metaplastic_backward, setup_context=_metaplastic_setup_context
)
