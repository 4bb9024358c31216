"""A plain GPT-style language model whose causal self-attention is a constructor choice:
dense (torch's scaled_dot_product_attention) or cram_ext.RoutedAttention. No working memory
outside the attention layer: the drop-in check of RoutedAttention."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import RoutedAttention, apply_rotary

ATTENTION = ("routed", "sdpa")
POSITIONS = ("learned", "rope")
ROPE_BASE = 10000.0


@dataclass
class TransformerConfig:
    """Shape of a TransformerLM. `routed` holds RoutedAttention keyword arguments beyond its
    shape (empty: the layer's defaults, as a user dropping it in would have them)."""

    vocab_size: int
    d_model: int = 256
    n_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int | None = None
    max_len: int = 1024
    mlp_ratio: int = 4
    attention: str = "routed"
    positions: str = "learned"  # "learned": absolute embeddings (GPT-2); "rope": rotary inside attention (Llama)
    routed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ValueError(f"TransformerConfig: attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"TransformerConfig: positions must be one of {POSITIONS}, got {self.positions!r}")


class CausalSelfAttention(nn.Module):
    """Dense causal self-attention, (B, T, E) -> (B, T, E), with RoutedAttention's projections
    (no biases, grouped-query heads, optional rotary positions), through
    F.scaled_dot_product_attention."""

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 rope_base: float | None = None) -> None:
        super().__init__()
        self.rope_base = rope_base
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, self.num_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.rope_base is not None:
            q, k = apply_rotary(q, self.rope_base), apply_rotary(k, self.rope_base)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.out_proj(y.transpose(1, 2).flatten(2))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(LN x), x + MLP(LN x)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm_attn, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d)
        rope_base = ROPE_BASE if cfg.positions == "rope" else None
        if cfg.attention == "routed":
            self.attn: nn.Module = RoutedAttention(d, cfg.num_heads, cfg.num_kv_heads, rope_base=rope_base,
                                                   **cfg.routed)
        else:
            self.attn = CausalSelfAttention(d, cfg.num_heads, cfg.num_kv_heads, rope_base=rope_base)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm_attn(x))
        return x + self.mlp(self.norm_mlp(x))


class TransformerLM(nn.Module):
    """(B, T) tokens -> (B, T, vocab_size) next-token logits. Positions learned and absolute
    (as GPT-2) or rotary (as Llama), by `cfg.positions`; T <= max_len; the output layer tied
    to the token embedding."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        T = tokens.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(f"TransformerLM: sequence of {T} tokens, more than max_len={self.cfg.max_len}")
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(T, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def routed_attention_layers(self) -> list[RoutedAttention]:
        return [b.attn for b in self.blocks if isinstance(b.attn, RoutedAttention)]
