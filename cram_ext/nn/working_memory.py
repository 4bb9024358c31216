"""WorkingMemory: the gated-scan layer of docs/design.md §1, step 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import gated_scan
from ..reference import accumulate_dtype
from .cache import ScanCache, compute_dtype, initial_state
from .padding import as_bool_mask


class WorkingMemory(nn.Module):
    """h[t] = exp(log_a[t]) * h[t-1] + W_u x[t] with log_a[t] = -dt[t] * softplus(W_a x[t] + b_a),
    per channel; returns W_o h, (B, T, E) -> (B, T, E).

    Args:
        embed_dim: E.
        state_dim: channels C of the recurrence, default E.

    forward(x, dt=None, h0=None): dt (B, T) holds the time gaps of irregularly sampled
    inputs (ones when None); h0 (B, C) float32 is the initial state. The final state
    of the last forward is kept in `last_state`.

    forward(x, dt=None, cache=cache) continues from a `ScanCache` (`allocate_cache`): the scan
    starts from `cache.state`, writes its final state back there (in place) and returns
    (output, cache). Feeding a sequence in pieces gives what one forward over it gives.

    attention_mask (B, T) bool (or 0/1), True at real tokens: the state passes pads unchanged (no
    input, no decay), so a left-padded row starts from h0 at its first real token and a
    right-padded row ends with the state of its last one (the state a cache keeps).
    """

    def __init__(self, embed_dim: int, state_dim: int | None = None) -> None:
        super().__init__()
        state_dim = embed_dim if state_dim is None else state_dim
        self.gate = nn.Linear(embed_dim, state_dim)
        self.inp = nn.Linear(embed_dim, state_dim, bias=False)
        self.out = nn.Linear(state_dim, embed_dim, bias=False)
        self.last_state: Tensor | None = None

    def forward(self, x: Tensor, dt: Tensor | None = None, h0: Tensor | None = None,
                cache: ScanCache | None = None,
                attention_mask: Tensor | None = None) -> Tensor | tuple[Tensor, ScanCache]:
        h0 = initial_state("WorkingMemory", x, h0, cache)
        u = self.inp(x)
        log_a = -F.softplus(self.gate(x))
        if dt is not None:
            log_a = log_a * dt.unsqueeze(-1)
        if attention_mask is not None:
            real = as_bool_mask("WorkingMemory", attention_mask)
            if real.shape != x.shape[:2]:
                raise ValueError(f"WorkingMemory: attention_mask must have shape (B, T) = {tuple(x.shape[:2])}, got "
                                 f"{tuple(real.shape)}")
            real = real.unsqueeze(-1)
            u, log_a = u * real, log_a * real
        h, self.last_state = gated_scan(u, log_a.to(u.dtype), h0)
        if cache is None:
            return self.out(h)
        # In place: the state keeps its address across steps (CUDA graphs).
        cache.state.copy_(self.last_state)
        cache.position += x.shape[1]
        return self.out(h), cache

    def allocate_cache(self, batch_size: int, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> ScanCache:
        """A zero state for `batch_size` rows. `dtype` is the dtype the layer computes in
        (default its parameters', or the autocast dtype where autocast is on); the state is held
        in its accumulation dtype (float32, or float64 for float64)."""
        weight = self.inp.weight
        return ScanCache.zeros(batch_size, weight.shape[0], dtype=accumulate_dtype(dtype or compute_dtype(weight)),
                               device=weight.device if device is None else device)
