"""Plain-PyTorch references of the metaplastic working memory (Palimpsa, arXiv 2602.09075).

Written to be read, not to be fast; docs/metaplastic.md is the contract they implement and
that the C++/CUDA kernels will be checked against. Per batch row and head, the state is two
d_v x d_k matrices in the accumulation dtype (float64 for float64 inputs, else float32):

    M_t    = a_t M_{t-1}    + v_t k_t^T              a_t = exp(log_alpha_t), a scalar
    Ibar_t = a_t Ibar_{t-1} + b_t (k_t * k_t)^T
    o_t    = scale * (M_t / (Ibar_t + I_p)) q_t      elementwise division, then a mat-vec

which is the paper's (mean mu, importance I) recurrence rewritten with M = mu * I and
Ibar = I - I_p (no state: mu_0 = 0, I_0 = I_p, i.e. M_0 = Ibar_0 = 0). Both updates are
linear with a scalar decay per token; only the read-out divides.

Functions:
    metaplastic_scan_reference  the recurrent loop over T (the reference)
    metaplastic_scan_chunked    the chunked form the kernels implement
    metaplastic_step            one decoding step
    gla_reference               scalar-decay gated linear attention (the b = 0 special case)
    state_from_mean_importance / state_to_mean_importance: (mu, I) <-> (M, Ibar)

Tensors are (B, T, H, d) like the rest of cram_ext: q, k (B, T, H, d_k); v, b (B, T, H, d_v);
log_alpha (B, T, H); prior (H,) or a number; the state (M, Ibar), each (B, H, d_v, d_k).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import accumulate_dtype

__all__ = [
    "MetaplasticState",
    "gla_reference",
    "metaplastic_scan_chunked",
    "metaplastic_scan_reference",
    "metaplastic_step",
    "state_from_mean_importance",
    "state_to_mean_importance",
]


class MetaplasticState(NamedTuple):
    """The scanned state of a metaplastic memory, each (B, H, d_v, d_k).

    M:    importance-weighted mean, mu * I.
    Ibar: importance above the prior, I - I_p (it may be negative, down to > -I_p).
    """

    M: Tensor
    Ibar: Tensor


def state_from_mean_importance(mu: Tensor, importance: Tensor, prior: Tensor | float) -> MetaplasticState:
    """(mu, I) of the paper -> the scanned state: M = mu * I, Ibar = I - I_p (I_p per head)."""
    ip = _prior_per_head(prior, mu.shape[1], mu.dtype, mu.device)
    return MetaplasticState(mu * importance, importance - ip)


def state_to_mean_importance(state: tuple[Tensor, Tensor], prior: Tensor | float) -> tuple[Tensor, Tensor]:
    """The scanned state -> (mu, I) of the paper: I = Ibar + I_p, mu = M / I."""
    M, ibar = state
    ip = _prior_per_head(prior, M.shape[1], M.dtype, M.device)
    importance = ibar + ip
    return M / importance, importance


# ---------------------------------------------------------------- helpers


def _prior_per_head(prior: Tensor | float, H: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """I_p as an (H, 1, 1) tensor that broadcasts against (B, H, d_v, d_k)."""
    if not torch.is_tensor(prior):
        prior = torch.tensor(float(prior), dtype=dtype, device=device)
    if prior.dim() == 0:
        prior = prior.expand(H)
    if prior.shape != (H,):
        raise ValueError(f"prior: expected shape ({H},) or a scalar, got {tuple(prior.shape)}")
    return prior.to(dtype).view(H, 1, 1)


def _check(q: Tensor, k: Tensor, v: Tensor, b: Tensor, log_alpha: Tensor, state) -> None:
    """Shapes of a scan's arguments, with q (B, T, H, d_k) as the model."""
    if q.dim() != 4:
        raise ValueError(f"q: expected (B, T, H, d_k), got shape {tuple(q.shape)}")
    B, T, H, _ = q.shape
    dv = v.shape[-1]
    expected = {"k": (k, q.shape), "v": (v, (B, T, H, dv)), "b": (b, (B, T, H, dv)),
                "log_alpha": (log_alpha, (B, T, H))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if state is not None:
        for name, t in zip(("M", "Ibar"), state):
            if tuple(t.shape) != (B, H, dv, q.shape[3]):
                raise ValueError(f"state.{name}: expected shape {(B, H, dv, q.shape[3])}, got {tuple(t.shape)}")


def _initial_state(state, B: int, H: int, dv: int, dk: int, acc: torch.dtype, device) -> MetaplasticState:
    if state is None:
        zeros = torch.zeros(B, H, dv, dk, dtype=acc, device=device)
        return MetaplasticState(zeros, zeros)
    M, ibar = state
    return MetaplasticState(M.to(acc), ibar.to(acc))


def _step(M: Tensor, ibar: Tensor, q: Tensor, k: Tensor, v: Tensor, b: Tensor, a: Tensor, ip: Tensor,
          scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """One token for every (batch, head): q, k (B, H, d_k); v, b (B, H, d_v); a (B, H); ip (H, 1, 1).
    Returns o (B, H, d_v) and the new M, Ibar (B, H, d_v, d_k). Nothing in place."""
    a = a[..., None, None]
    M = a * M + v[..., :, None] * k[..., None, :]
    ibar = a * ibar + b[..., :, None] * (k * k)[..., None, :]
    mu = M / (ibar + ip)
    o = scale * (mu * q[..., None, :]).sum(-1)  # mu_t q_t
    return o, M, ibar


# ---------------------------------------------------------------- the recurrent reference


def metaplastic_scan_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    b: Tensor,
    log_alpha: Tensor,
    prior: Tensor | float,
    state: tuple[Tensor, Tensor] | None = None,
    scale: float | None = None,
) -> tuple[Tensor, MetaplasticState]:
    """The metaplastic memory as a plain loop over T (docs/metaplastic.md §1).

    Args:
        q, k: (B, T, H, d_k); v, b: (B, T, H, d_v), b >= 0; log_alpha: (B, T, H), <= 0
            (-inf is an exact reset); prior: I_p > 0, (H,) or a number;
        state: (M_0, Ibar_0), each (B, H, d_v, d_k), or None for zeros (mu_0 = 0, I_0 = I_p);
        scale: multiplies the read-out, d_k ** -0.5 when None.

    Returns o (B, T, H, d_v) in q.dtype and the final state (M_T, Ibar_T) in the accumulation
    dtype (float64 for float64 q, else float32). Differentiable in every tensor argument.
    """
    _check(q, k, v, b, log_alpha, state)
    acc = accumulate_dtype(q.dtype)
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else float(scale)
    ip = _prior_per_head(prior, H, acc, q.device)
    M, ibar = _initial_state(state, B, H, dv, dk, acc, q.device)
    # unbind, not x[:, t]: each indexing's backward would write a whole (B, T, ...) gradient.
    qs, ks, vs, bs = (x.to(acc).unbind(1) for x in (q, k, v, b))
    alphas = log_alpha.to(acc).exp().unbind(1)
    outs = []
    for t in range(T):
        o, M, ibar = _step(M, ibar, qs[t], ks[t], vs[t], bs[t], alphas[t], ip, scale)
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else q.new_empty(B, 0, H, dv, dtype=acc)
    return o.to(q.dtype), MetaplasticState(M, ibar)


def metaplastic_step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    b_t: Tensor,
    log_alpha_t: Tensor,
    prior: Tensor | float,
    state: tuple[Tensor, Tensor] | None = None,
    scale: float | None = None,
) -> tuple[Tensor, MetaplasticState]:
    """One decoding step: q_t, k_t (B, H, d_k); v_t, b_t (B, H, d_v); log_alpha_t (B, H).

    Returns o_t (B, H, d_v) in q_t.dtype and the new state (a new tensor pair; the state
    passed in is not modified). Equal to metaplastic_scan_reference on a length-1 sequence.
    """
    o, new_state = metaplastic_scan_reference(
        q_t.unsqueeze(1), k_t.unsqueeze(1), v_t.unsqueeze(1), b_t.unsqueeze(1), log_alpha_t.unsqueeze(1),
        prior, state, scale)
    return o.squeeze(1), new_state


# ---------------------------------------------------------------- the chunked form


def _segment_log_decay(log_alpha: Tensor) -> Tensor:
    """(..., C) -> (..., C, C): L[..., t, s] = sum of log_alpha over s < r <= t (0 on the
    diagonal), -inf above it (s > t). Summed directly, not as a difference of cumulative
    sums: no cancellation, and a reset (-inf) gives -inf, never -inf - (-inf)."""
    C = log_alpha.shape[-1]
    after = torch.ones(C, C, dtype=torch.bool, device=log_alpha.device).tril(-1)  # r > s
    terms = torch.where(after, log_alpha.unsqueeze(-1).expand(*log_alpha.shape, C), 0.0)  # [r, s] = log_alpha_r
    causal = torch.ones(C, C, dtype=torch.bool, device=log_alpha.device).tril()  # s <= t
    return terms.cumsum(-2).masked_fill(~causal, float("-inf"))


def metaplastic_scan_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    b: Tensor,
    log_alpha: Tensor,
    prior: Tensor | float,
    state: tuple[Tensor, Tensor] | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, MetaplasticState]:
    """The same map as metaplastic_scan_reference, computed chunk by chunk
    (docs/metaplastic.md §3), the algorithm of the kernels. Same arguments and returns.

    T is split into N = ceil(T / C) chunks of C = chunk_size tokens (the last one padded
    with tokens that leave the state alone: a = 1, k = v = b = 0). Within chunk n, with
    g[t] = log_alpha summed over the chunk's tokens up to t and D[t, s] = exp(g[t] - g[s])
    for s <= t (0 otherwise):

      1. what the chunk adds to the state by its end, from its own tokens only (all chunks
         in parallel; two matrix products):
             dM[n]    = sum_s D[C-1, s] v_s k_s^T,   dIbar[n] = sum_s D[C-1, s] b_s (k_s*k_s)^T
      2. the entry states, sequentially over chunks (N steps, each a d_v x d_k axpy):
             S_0 = initial state,  S_{n+1} = exp(g[C-1]) S_n + dS[n]
      3. every token's state from its chunk's entry state (all chunks in parallel), and the
         read-out, the only non-linear step:
             M_t = exp(g[t]) M_entry + sum_{s<=t} D[t, s] v_s k_s^T   (Ibar_t likewise)
             o_t = scale * (M_t / (Ibar_t + I_p)) q_t
    """
    _check(q, k, v, b, log_alpha, state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    acc = accumulate_dtype(q.dtype)
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else float(scale)
    ip = _prior_per_head(prior, H, acc, q.device)
    M0, ibar0 = _initial_state(state, B, H, dv, dk, acc, q.device)
    C = chunk_size
    N = -(-T // C)
    if N == 0:
        return q.new_empty(B, 0, H, dv), MetaplasticState(M0, ibar0)

    def chunks(x: Tensor) -> Tensor:
        """(B, T, H, *d) -> (B, H, N, C, *d) in acc, padded with zeros after T."""
        x = x.to(acc).movedim(1, 2)  # (B, H, T, *d)
        tail = x.dim() - 3
        x = F.pad(x, (0, 0) * tail + (0, N * C - T))
        return x.reshape(B, H, N, C, *x.shape[3:])

    qc, kc, vc, bc, lac = (chunks(x) for x in (q, k, v, b, log_alpha))
    kk = kc * kc
    g = lac.cumsum(-1)  # (B, H, N, C): log decay from the chunk's entry to token t (inclusive)
    D = _segment_log_decay(lac).exp()  # (B, H, N, C, C): decay from token s to token t

    # 1. chunk summaries (the last row of D weights each token up to the chunk's end)
    w_end = D[..., -1, :].unsqueeze(-1)  # (B, H, N, C, 1)
    dM = (vc * w_end).transpose(-1, -2) @ kc  # (B, H, N, dv, dk)
    dI = (bc * w_end).transpose(-1, -2) @ kk
    chunk_decay = g[..., -1].exp()[..., None, None]  # (B, H, N, 1, 1)

    # 2. entry states, carried across chunks
    entry_M, entry_I = [], []
    M, ibar = M0, ibar0
    for n in range(N):
        entry_M.append(M)
        entry_I.append(ibar)
        M = chunk_decay[:, :, n] * M + dM[:, :, n]
        ibar = chunk_decay[:, :, n] * ibar + dI[:, :, n]
    entry_M = torch.stack(entry_M, dim=2)[:, :, :, None]  # (B, H, N, 1, dv, dk)
    entry_I = torch.stack(entry_I, dim=2)[:, :, :, None]

    # 3. per-token states inside each chunk, and the read-out
    def within(x: Tensor, y: Tensor) -> Tensor:
        """sum_{s<=t} D[t, s] x_s y_s^T for every t: (B, H, N, C, dv, dk)."""
        outer = (x[..., :, None] * y[..., None, :]).flatten(-2)  # (B, H, N, C, dv*dk)
        return (D @ outer).view(B, H, N, C, dv, dk)

    from_entry = g.exp()[..., None, None]  # (B, H, N, C, 1, 1)
    M_tok = from_entry * entry_M + within(vc, kc)
    I_tok = from_entry * entry_I + within(bc, kk)
    mu = M_tok / (I_tok + ip[:, None, None])  # ip (H, 1, 1) -> (H, 1, 1, 1, 1)
    o = scale * (mu * qc[..., None, :]).sum(-1)  # (B, H, N, C, dv)
    o = o.reshape(B, H, N * C, dv)[:, :, :T].movedim(2, 1)
    return o.to(q.dtype), MetaplasticState(M, ibar)


# ---------------------------------------------------------------- gated linear attention


def gla_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor,
    state: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Scalar-decay gated linear attention (Mamba2 / simple GLA), in its attention form:

        o_t = scale * ( sum_{s<=t} exp(G_t - G_s) (q_t . k_s) v_s + exp(G_t) S_0 q_t ),
        G_t = sum_{r<=t} log_alpha_r,

    i.e. the recurrence S_t = a_t S_{t-1} + v_t k_t^T, o_t = scale * S_t q_t, computed
    without it (an independent check). q, k (B, T, H, d_k); v (B, T, H, d_v); log_alpha
    (B, T, H), finite; state S_0 (B, H, d_v, d_k) or None. Returns o (B, T, H, d_v) in q.dtype
    and S_T (B, H, d_v, d_k) in the accumulation dtype. O(T^2) memory.
    """
    acc, out_dtype = accumulate_dtype(q.dtype), q.dtype
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else float(scale)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    G = log_alpha.to(acc).cumsum(1)  # (B, T, H)
    diff = G.unsqueeze(2) - G.unsqueeze(1)  # (B, t, s, H)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, :, :, None]
    decay = torch.where(causal, diff, float("-inf")).exp()
    scores = torch.einsum("bthd,bshd->btsh", q, k) * decay
    o = torch.einsum("btsh,bshe->bthe", scores, v)
    final = torch.einsum("bsh,bshe,bshd->bhed", (G[:, -1:] - G).exp(), v, k) if T else None
    if state is not None:
        S0 = state.to(acc)
        o = o + torch.einsum("bth,bhed,bthd->bthe", G.exp(), S0, q)
        final = S0 * G[:, -1, :, None, None].exp() + final if T else S0
    elif final is None:
        final = torch.zeros(B, H, dv, dk, dtype=acc, device=q.device)
    return (scale * o).to(out_dtype), final
