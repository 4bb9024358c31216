"""MetaplasticMemory: a working memory whose matrix state carries a per-entry importance
(Palimpsa, arXiv 2602.09075), on the fused cram.metaplastic_scan op."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import metaplastic_scan, metaplastic_step
from ..reference import accumulate_dtype
from ..reference_metaplastic import MetaplasticState
from .cache import compute_dtype, initial_state
from .padding import Padding

__all__ = ["MetaplasticCache", "MetaplasticMemory"]


@dataclass
class MetaplasticCache:
    """The state of one MetaplasticMemory between calls (cram_ext/nn/cache.py's conventions:
    allocated once, zero-filled, written in place, for inference under torch.no_grad()).

    Attributes:
        M, Ibar: (B, H, d_v, d_k) the scanned state (docs/metaplastic.md §1: M = mu * I,
            Ibar = I - I_p), in the accumulation dtype (float32, float64 for float64); zeros
            before the first token (mu_0 = 0, I_0 = I_p).
        conv: (B, K - 1, C) the last K - 1 inputs of the short convolution (the q, k, v
            projections, C = H * (2 d_k + d_v) channels), in the dtype the layer computes in;
            zeros before the first token, as the forward's left padding.
        position: tokens the memory has read.
    """

    M: Tensor
    Ibar: Tensor
    conv: Tensor
    position: int = 0

    @classmethod
    def zeros(cls, batch_size: int, num_heads: int, key_dim: int, value_dim: int, conv_channels: int,
              conv_size: int, *, dtype: torch.dtype = torch.float32, state_dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> MetaplasticCache:
        """An empty state: what a forward without a cache starts from."""
        state_dtype = accumulate_dtype(dtype) if state_dtype is None else state_dtype
        shape = (batch_size, num_heads, value_dim, key_dim)
        return cls(torch.zeros(shape, dtype=state_dtype, device=device),
                   torch.zeros(shape, dtype=state_dtype, device=device),
                   torch.zeros(batch_size, conv_size - 1, conv_channels, dtype=dtype, device=device))

    @property
    def batch_size(self) -> int:
        return self.M.shape[0]

    @property
    def state(self) -> MetaplasticState:
        return MetaplasticState(self.M, self.Ibar)

    def reset(self) -> None:
        """Back to the empty state, in place (for a new sequence in the same buffers)."""
        self.M.zero_()
        self.Ibar.zero_()
        self.conv.zero_()
        self.position = 0


class MetaplasticMemory(nn.Module):
    """Metaplastic working memory, (B, T, E) -> (B, T, E): H heads, each a d_v x d_k matrix
    memory whose entries carry an importance that grows with what was written into them and
    decays to a prior, so that what was learned resists being overwritten.

    The recurrence (docs/metaplastic.md §1; Palimpsa, arXiv 2602.09075, appendix eqs. 25-26 of
    its ICLR-2026 version, in the (M, Ibar) form of its authors' code; /work/shared/PALIMPSA.md
    §1 summarises both), per head:

        M_t    = a_t M_{t-1}    + (beta_t * v_t) k_t^T          a_t = exp(log_alpha_t)
        Ibar_t = a_t Ibar_{t-1} + beta_t (k_t * k_t)^T
        o_t    = d_k^-1/2 (M_t / (Ibar_t + I_p)) q_t

    i.e. the paper's mean mu = M / I and importance I = Ibar + I_p,
    I_t = a_t I_{t-1} + (1 - a_t) I_p + beta_t k_t^2, mu_t = a_t (I_{t-1} / I_t) mu_{t-1} + (beta_t v_t) k_t^T / I_t.
    Computed by the fused ops `cram_ext.metaplastic_scan` (a sequence) and `metaplastic_step`
    (one decoded token, in place in the cache).

    The layer around it, after the authors' (PALIMPSA.md §1):
        q, k, v = SiLU(causal depthwise conv_K(W_q x, W_k x, W_v x))   (K = conv_size, 4)
        q, k    L2-normalised per head
        log_alpha_t = -exp(A_log) * softplus(w_D x_t + b_D) * dt_t      (per head, < 0; dt the time gaps)
        beta_t  = sigmoid(w_s x_t) * sigmoid(W_2 W_1 x_t + b_2)         (per head and value row, in (0, 1))
        I_p     = softplus(p)                                           (per head, learned, 1 at init)
        y_t     = W_o GatedRMSNorm(o_t + D * v_t, gate W_g x_t)         (RMSNorm over d_v, times SiLU(gate))
    The numerator is the paper's per-row beta * v and the importance increment the same beta
    (the Gaussian-likelihood update). In that form a common factor of beta and I_p cancels in
    mu, so the prior is the one scale of the evidence, learned (the authors' code froze I_p = 1
    and learned a scale of b instead, the same freedom). The decay and its initialisation
    (A in [1, 16], softplus(b_D) log-uniform in [1e-3, 1e-1]: horizons of 1 to 1000 tokens) are
    Mamba2's, as in the authors' layer.

    Args:
        embed_dim: E.
        num_heads: H.
        head_dim: default E // H; the key dim d_k defaults to it and the value dim d_v to twice
            it (the authors' expand_v = 2: d_k 16, d_v 32 at E = 128, H = 8 in their MQAR runs).
        key_dim, value_dim: d_k, d_v, overriding those defaults.
        beta_rank: rank of W_2 W_1 (8, as in their MQAR runs).
        conv_size: K, the short convolution's taps (1 = none).
        learn_prior: False keeps I_p at `prior_init` (the authors' choice).
        prior_init: I_p at initialisation.
        metaplastic: False drops the importance (b = 0, I_p = 1 fixed): the same layer around
            scalar-decay gated linear attention (GLA / Mamba2's SSD), the special case the
            metaplastic memory is compared with at the same parametrisation.
        norm_eps: the RMSNorm's epsilon.

    forward(x, dt=None, h0=None): dt (B, T) holds the time gaps of irregularly sampled inputs
    (they multiply log_alpha, ones when None); h0 an initial state (M_0, Ibar_0), each
    (B, H, d_v, d_k) (the convolution still starts from zeros). The final state of the last
    forward is kept in `last_state` (a MetaplasticState).

    forward(x, attention_mask=mask): mask (B, T) bool (or 0/1), True at real tokens, each row's
    real tokens one contiguous run (left or right padding): every row is computed as if it held
    its real tokens alone (the state passes pads unchanged, the convolution never reads one, the
    output is 0 at pads), with a cache too.

    forward(x, dt=None, cache=cache) continues from a `MetaplasticCache` (`allocate_cache`):
    the scan starts from its state and the convolution from its tail, both written back in
    place, and returns (output, cache). Feeding a sequence in pieces gives what one forward
    over it gives.
    """

    def __init__(self, embed_dim: int, num_heads: int = 4, head_dim: int | None = None, *,
                 key_dim: int | None = None, value_dim: int | None = None, beta_rank: int = 8, conv_size: int = 4,
                 learn_prior: bool = True, prior_init: float = 1.0, metaplastic: bool = True,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"MetaplasticMemory: embed_dim {embed_dim} is not a multiple of num_heads "
                                 f"{num_heads}: pass head_dim")
            head_dim = embed_dim // num_heads
        self.num_heads = H = num_heads
        self.key_dim = dk = head_dim if key_dim is None else key_dim
        self.value_dim = dv = 2 * head_dim if value_dim is None else value_dim
        if min(dk, dv, beta_rank, conv_size) < 1 or prior_init <= 0:
            raise ValueError("MetaplasticMemory: dims, beta_rank and conv_size must be >= 1 and prior_init > 0")
        if not metaplastic:
            learn_prior, prior_init = False, 1.0
        self.conv_size, self.metaplastic, self.norm_eps = conv_size, metaplastic, norm_eps
        channels = H * (2 * dk + dv)
        self.qkv = nn.Linear(embed_dim, channels, bias=False)
        self.conv = nn.Conv1d(channels, channels, conv_size, groups=channels, bias=False)  # applied causally
        self.decay = nn.Linear(embed_dim, H)  # pre-softplus Delta; its bias is b_D
        self.write_gate = nn.Linear(embed_dim, H)  # w_s
        self.beta_down = nn.Linear(embed_dim, beta_rank, bias=False)  # W_1
        self.beta_up = nn.Linear(beta_rank, H * dv)  # W_2, b_2
        self.out_gate = nn.Linear(embed_dim, H * dv, bias=False)  # W_g
        self.out = nn.Linear(H * dv, embed_dim, bias=False)  # W_o
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(H))
        self.norm_weight = nn.Parameter(torch.ones(dv))
        inv_softplus = math.log(math.expm1(prior_init))
        self.prior_raw = nn.Parameter(torch.full((H,), inv_softplus), requires_grad=learn_prior)
        with torch.no_grad():  # Delta = softplus(b_D) log-uniform in [1e-3, 1e-1] (Mamba2's)
            delta = torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)).exp()
            self.decay.bias.copy_(delta + torch.log(-torch.expm1(-delta)))
        self.last_state: MetaplasticState | None = None

    @property
    def prior(self) -> Tensor:
        """I_p, (H,), > 0."""
        return F.softplus(self.prior_raw)

    def _conv(self, u: Tensor, tail: Tensor | None, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Causal depthwise convolution of u (B, T, C) after `tail` (B, K-1, C) (zeros when None),
        then SiLU; returns it and the new tail: the last K-1 inputs, or with `lengths` (B,) (rows
        whose real tokens come first) the K-1 inputs before each row's first pad."""
        K = self.conv_size
        if tail is None:
            padded = F.pad(u, (0, 0, K - 1, 0))
        else:
            padded = torch.cat([tail.to(u.dtype), u], dim=1)
        # K shifted multiply-adds in (B, T, C), not F.conv1d: no transposed copies, and its
        # backward is elementwise (the CPU's depthwise convolution backward cost more than the
        # metaplastic scan's backward in the main job's profile).
        taps = self.conv.weight[:, 0].t().to(u.dtype)  # (K, C)
        T = u.shape[1]
        y = padded[:, :T] * taps[0]
        for j in range(1, K):
            y = torch.addcmul(y, padded[:, j:j + T], taps[j])
        if lengths is None:
            return F.silu(y), padded[:, padded.shape[1] - (K - 1):]
        # Row b's real inputs sit at [K-1, K-1+lengths[b]) of `padded`.
        index = lengths[:, None] + torch.arange(K - 1, device=u.device)
        return F.silu(y), padded.gather(1, index[..., None].expand(-1, -1, padded.shape[-1]))

    def forward(self, x: Tensor, dt: Tensor | None = None, h0: tuple[Tensor, Tensor] | None = None,
                cache: MetaplasticCache | None = None,
                attention_mask: Tensor | None = None) -> Tensor | tuple[Tensor, MetaplasticCache]:
        h0 = initial_state("MetaplasticMemory", x, h0, cache)
        B, T, _ = x.shape
        H, dk, dv = self.num_heads, self.key_dim, self.value_dim
        pad = None
        if attention_mask is not None:
            # Rows rotated so that their real tokens come first: the convolution then reads no
            # pad before a real token, and the pads after them neither write nor decay the state.
            pad = Padding.from_mask("MetaplasticMemory", attention_mask, B, T, x.device)
            x = pad.shift(x)
            dt = None if dt is None else pad.shift(dt)
        # Pads (after the real tokens now) reach no real token through the causal convolution,
        # and below they neither write nor decay the state: their inputs need no masking.
        qkv, tail = self._conv(self.qkv(x), None if cache is None else cache.conv, None if pad is None else pad.lengths)
        q, k, v = qkv.split([H * dk, H * dk, H * dv], dim=-1)
        v = v.view(B, T, H, dv)
        # CUDA autocast runs the norm in float32, so normalize returns float32 beside a bf16 v.
        q = F.normalize(q.view(B, T, H, dk), dim=-1).to(v.dtype)
        k = F.normalize(k.view(B, T, H, dk), dim=-1).to(v.dtype)
        acc = accumulate_dtype(x.dtype)  # gates, decays and the norm: float32 (float64 for float64)
        log_alpha = -self.A_log.to(acc).exp() * F.softplus(self.decay(x).to(acc))  # (B, T, H)
        if dt is not None:
            log_alpha = log_alpha * dt.unsqueeze(-1)
        beta = torch.sigmoid(self.write_gate(x)).unsqueeze(-1) * torch.sigmoid(self.beta_up(self.beta_down(x))).view(
            B, T, H, dv)
        if pad is not None:  # pads: a = 1, nothing written
            log_alpha = log_alpha * pad.valid.unsqueeze(-1)
            beta = beta * pad.valid[:, :, None, None]
        beta = beta.to(v.dtype)
        prior = self.prior.to(acc)
        b = beta if self.metaplastic else torch.zeros_like(beta)
        stepped = cache is not None and T == 1 and not torch.is_grad_enabled() and pad is None
        if stepped:  # the cache's state is updated in place
            o = metaplastic_step(q[:, 0], k[:, 0], beta[:, 0] * v[:, 0], b[:, 0], log_alpha[:, 0], prior,
                                 (cache.M, cache.Ibar)).unsqueeze(1)
            state = cache.state
        else:
            o, state = metaplastic_scan(q, k, beta * v, b, log_alpha, prior, h0)
            state = MetaplasticState(*state)
        self.last_state = state
        o = o + self.D.to(v.dtype)[:, None] * v
        # Gated RMSNorm over each head's d_v channels, in float32 (float64).
        of = o.to(acc)
        of = of * torch.rsqrt(of.square().mean(-1, keepdim=True) + self.norm_eps) * self.norm_weight.to(acc)
        gate = self.out_gate(x).view(B, T, H, dv)
        y = self.out((of.to(gate.dtype) * F.silu(gate)).reshape(B, T, H * dv))
        if pad is not None:
            y = pad.unshift(y)
        if cache is None:
            return y
        # In place: the buffers keep their addresses across steps (CUDA graphs).
        if not stepped:
            cache.M.copy_(state.M)
            cache.Ibar.copy_(state.Ibar)
        cache.conv.copy_(tail)
        cache.position += T
        return y, cache

    def allocate_cache(self, batch_size: int, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> MetaplasticCache:
        """A zero state for `batch_size` rows. `dtype` is the dtype the layer computes in
        (default its parameters', or the autocast dtype where autocast is on): the convolution's
        tail is held in it, the (M, Ibar) state in its accumulation dtype (float32, or float64
        for float64)."""
        weight = self.qkv.weight
        dtype = dtype or compute_dtype(weight)
        return MetaplasticCache.zeros(batch_size, self.num_heads, self.key_dim, self.value_dim, weight.shape[0],
                                      self.conv_size, dtype=dtype, device=weight.device if device is None else device)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"conv_size={self.conv_size}, metaplastic={self.metaplastic}")
