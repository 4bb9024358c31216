"""What both causal self-attention layers (RoutedAttention and the dense CausalSelfAttention)
compute before they attend: the rows with their real tokens first, whether the call is a
one-token decoding step, and the projected queries, keys and values with their positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .cache import KVCache
from .padding import Padding
from .rotary import apply_rotary


@dataclass
class AttentionInputs:
    """x: (B, T, E), the rows shifted so that their real tokens come first (as given without a
    mask); pad: that padding, or None; step: a one-token call through the cache's per-row
    lengths (rows may differ); q (B, T, H, D), k and v (B, T, Hk, D), rotated to their positions
    when the layer has rope_base."""

    x: Tensor
    pad: Padding | None
    step: bool
    q: Tensor
    k: Tensor
    v: Tensor


def attention_inputs(what: str, layer: nn.Module, x: Tensor, cache: KVCache | None,
                     attention_mask: Tensor | None) -> AttentionInputs:
    """The inputs of `layer` (with q_proj, k_proj, v_proj, num_heads, num_kv_heads, head_dim,
    rope_base) for x (B, T, E) after the tokens `cache` holds; `what` names the layer in errors:
    a cache that is not a KVCache (a mask passed positionally), x in another dtype than the
    projections outside autocast."""
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(f"{what}: cache must be a KVCache (from allocate_cache), got {type(cache).__name__}; "
                        "a padding mask goes in as attention_mask=mask")
    weight = layer.q_proj.weight
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{what}: x is {x.dtype} and the layer's parameters are {weight.dtype}: "
                        f"convert one (layer.to({x.dtype})) or run under torch.autocast")
    B, T, _ = x.shape
    pad = None
    if attention_mask is not None:
        pad = Padding.from_mask(what, attention_mask, B, T, x.device)
        x = pad.shift(x)
    step = cache is not None and T == 1 and pad is None
    offset = cache.lengths if step else (0 if cache is None else cache.position)
    q = layer.q_proj(x).view(B, T, layer.num_heads, layer.head_dim)
    k = layer.k_proj(x).view(B, T, layer.num_kv_heads, layer.head_dim)
    v = layer.v_proj(x).view(B, T, layer.num_kv_heads, layer.head_dim)
    if layer.rope_base is not None:
        q, k = apply_rotary(q, layer.rope_base, offset), apply_rotary(k, layer.rope_base, offset)
    return AttentionInputs(x, pad, step, q, k, v)
