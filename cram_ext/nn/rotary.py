"""Rotary position embedding (RoPE, Su et al., 2021) of queries and keys."""

from __future__ import annotations

import torch
from torch import Tensor


def apply_rotary(x: Tensor, base: float = 10000.0, offset: int | Tensor = 0) -> Tensor:
    """x (B, T, H, D), D even, with channel pairs (i, i + D/2) rotated by the angle
    t * base^(-2i/D) at position t = offset + (index along T) (the "rotate half" pairing of
    GPT-NeoX and Llama), so that a query-key product depends on positions only through their
    difference. `offset` is the position of x's first token: the tokens already in a KV cache when
    decoding; a (B,) integer tensor gives each row its own (rows of different lengths), read on
    the device. Computed in float32, returned in x's dtype; `apply_rotary(x[:, o:], offset=o)` is
    bitwise `apply_rotary(x)[:, o:]` (positions below 2**24 are exact in float32)."""
    T, D = x.shape[1], x.shape[-1]
    if D % 2:
        raise ValueError(f"apply_rotary: the head dim must be even, got {D}")
    inv_freq = base ** (-torch.arange(0, D // 2, device=x.device, dtype=torch.float32) * (2.0 / D))
    if isinstance(offset, Tensor):
        position = offset.to(torch.float32).view(-1, 1) + torch.arange(T, device=x.device, dtype=torch.float32)
    else:
        position = torch.arange(offset, offset + T, device=x.device, dtype=torch.float32)
    angle = position[..., None] * inv_freq
    cos, sin = angle.cos().unsqueeze(-2), angle.sin().unsqueeze(-2)  # ([B,] T, 1, D/2): broadcast over heads
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
