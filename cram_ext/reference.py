"""Plain-PyTorch references of the cram ops, written to be read, not to be fast.

Each function computes exactly what docs/design.md §2 defines, in the accumulation dtype
(float32, or float64 for float64 inputs), and is differentiable by ordinary
autograd. Tests compare the fused ops with these on fresh random inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .route_types import Route, route_from_mask


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gated_scan(x: Tensor, log_a: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """h[:, t] = exp(log_a[:, t]) * h[:, t-1] + x[:, t], with h[:, -1] = h0 (zeros if None).

    Returns h (B, T, C) in x.dtype and the last state h_last (B, C) in the accumulation dtype.
    """
    acc = accumulate_dtype(x.dtype)
    B, T, C = x.shape
    state = torch.zeros(B, C, dtype=acc, device=x.device) if h0 is None else h0.to(acc)
    # unbind, not a[:, t]: each indexing's backward would write a whole (B, T, C) gradient.
    a, xs = log_a.to(acc).exp().unbind(1), x.to(acc).unbind(1)
    states = []
    for t in range(T):
        state = a[t] * state + xs[t]
        states.append(state)
    h = torch.stack(states, dim=1) if states else x.new_empty(B, 0, C, dtype=acc)
    return h.to(x.dtype), state


def route(
    hidden: Tensor, weight: Tensor, bias: Tensor, threshold: float = 0.5, force: Tensor | None = None
) -> Route:
    """The router decision and the compaction of each row's routed positions."""
    acc = accumulate_dtype(hidden.dtype)
    prob = torch.sigmoid(hidden.to(acc) @ weight.to(acc) + bias.to(acc))
    mask = prob > threshold
    if force is not None:
        mask = mask | force
    index, counts = route_from_mask(mask)
    return Route(prob, mask, index, counts)


def routed_mask(index: Tensor, counts: Tensor, T: int) -> Tensor:
    """(B, T) bool: True at the positions index[b, :counts[b]]."""
    B = index.shape[0]
    slot = torch.arange(index.shape[1], device=index.device).expand(B, -1)
    valid = slot < counts.unsqueeze(1).long()
    mask = torch.zeros(B, T + 1, dtype=torch.bool, device=index.device)
    mask.scatter_(1, torch.where(valid, index.long(), T), True)
    return mask[:, :T]


def routed_attention(
    q: Tensor, k: Tensor, v: Tensor, index: Tensor, counts: Tensor, softmax_scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Dense causal attention (bottom-right aligned, GQA), kept only at routed rows.

    q: (B, T, H, D); k, v: (B, S, Hk, D). Returns out (B, T, H, D) in q.dtype, zero where
    not routed, and lse (B, H, T) in the accumulation dtype, -inf where not routed.
    """
    acc = accumulate_dtype(q.dtype)
    B, T, H, D = q.shape
    S, Hk = k.shape[1], k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    kf = k.to(acc).repeat_interleave(H // Hk, dim=2)
    vf = v.to(acc).repeat_interleave(H // Hk, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.to(acc), kf) * scale
    t = torch.arange(T, device=q.device).unsqueeze(1)
    j = torch.arange(S, device=q.device).unsqueeze(0)
    scores = scores.masked_fill(j > t + (S - T), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhts,bshd->bthd", torch.softmax(scores, dim=-1), vf)
    routed = routed_mask(index, counts, T)
    out = torch.where(routed[:, :, None, None], out, 0.0)
    lse = torch.where(routed[:, None, :], lse, float("-inf"))
    return out.to(q.dtype), lse


def routed_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, routed: Tensor, softmax_scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """One query token per row over that row's first n = clamp(seqlens[b], 0, S) cached keys,
    in the rows where `routed` is True.

    q: (B, H, D); k_cache, v_cache: (B, S, Hk, D); seqlens (B,) int; routed (B,) bool.
    Returns out (B, H, D) in q.dtype, zero where not routed (or n = 0), and lse (B, H) in
    the accumulation dtype, -inf there.
    """
    acc = accumulate_dtype(q.dtype)
    B, H, D = q.shape
    S, Hk = k_cache.shape[1], k_cache.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    kf = k_cache.to(acc).repeat_interleave(H // Hk, dim=2)
    vf = v_cache.to(acc).repeat_interleave(H // Hk, dim=2)
    scores = torch.einsum("bhd,bshd->bhs", q.to(acc), kf) * scale
    n = torch.where(routed, seqlens.long().clamp(0, S), 0)
    valid = torch.arange(S, device=q.device) < n[:, None]  # (B, S)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    has_keys = (n > 0)[:, None]
    probs = torch.softmax(scores.masked_fill(~has_keys[..., None], 0.0), dim=-1)
    # Positions past a row's length are never read: 0 * NaN there must not reach the output.
    out = torch.einsum("bhs,bshd->bhd", probs, vf.masked_fill(~valid[:, :, None, None], 0.0))
    out = torch.where(has_keys[..., None], out, 0.0)
    lse = torch.where(has_keys, lse, float("-inf"))
    return out.to(q.dtype), lse
