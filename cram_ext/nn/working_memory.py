"""WorkingMemory: the gated-scan layer of docs/design.md §1, step 1."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import gated_scan


class WorkingMemory(nn.Module):
    """h[t] = exp(log_a[t]) * h[t-1] + W_u x[t] with log_a[t] = -dt[t] * softplus(W_a x[t] + b_a),
    per channel; returns W_o h, (B, T, E) -> (B, T, E).

    Args:
        embed_dim: E.
        state_dim: channels C of the recurrence, default E.
        conv_width: when > 0, x is first replaced by silu(a causal depthwise convolution of
            x over the last conv_width steps), as Mamba does ahead of its scan: the scan's
            decay blurs the last few inputs together, the convolution keeps them apart.

    forward(x, dt=None, h0=None): dt (B, T) holds the time gaps of irregularly sampled
    inputs (ones when None); h0 (B, C) float32 is the initial state. The final state
    of the last forward is kept in `last_state`.
    """

    def __init__(self, embed_dim: int, state_dim: int | None = None, conv_width: int = 0) -> None:
        super().__init__()
        state_dim = embed_dim if state_dim is None else state_dim
        self.conv = (nn.Conv1d(embed_dim, embed_dim, conv_width, groups=embed_dim, padding=conv_width - 1)
                     if conv_width > 0 else None)
        self.gate = nn.Linear(embed_dim, state_dim)
        self.inp = nn.Linear(embed_dim, state_dim, bias=False)
        self.out = nn.Linear(state_dim, embed_dim, bias=False)
        self.last_state: Tensor | None = None

    def forward(self, x: Tensor, dt: Tensor | None = None, h0: Tensor | None = None) -> Tensor:
        if self.conv is not None:  # padding on both sides; the first T outputs are the causal ones
            x = F.silu(self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2))
        u = self.inp(x)
        log_a = -F.softplus(self.gate(x))
        if dt is not None:
            log_a = log_a * dt.unsqueeze(-1)
        h, self.last_state = gated_scan(u, log_a.to(u.dtype), h0)
        return self.out(h)
