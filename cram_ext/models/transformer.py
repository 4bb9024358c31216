"""A plain GPT-style language model whose causal self-attention is a constructor choice:
dense (torch's scaled_dot_product_attention) or cram_ext.RoutedAttention. No working memory
outside the attention layer: the drop-in check of RoutedAttention."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..generation import GenerateOutput, generate
from ..nn import BlockCache, KVCache, ModelCache, RoutedAttention
from ..nn.cache import compute_dtype
from ..nn.attention_inputs import attention_inputs
from ..nn.padding import as_bool_mask

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
    F.scaled_dot_product_attention. With `cache` (a KVCache from `allocate_cache`), the T new
    tokens attend over every cached token and their own past (bottom-right causal), and
    (output, cache) is returned; `attention_mask` marks real tokens: both as RoutedAttention."""

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

    def forward(self, x: Tensor, cache: KVCache | None = None,
                attention_mask: Tensor | None = None) -> Tensor | tuple[Tensor, KVCache]:
        T = x.shape[1]
        inputs = attention_inputs("CausalSelfAttention", self, x, cache, attention_mask)
        x, pad, step, q, k, v = inputs.x, inputs.pad, inputs.step, inputs.q, inputs.k, inputs.v
        gqa = self.num_kv_heads != self.num_heads
        mask = None
        if step:
            # Every row over its own keys, in the whole buffer: shapes fixed for CUDA graphs.
            cache.append(k, v)
            k, v = cache.k, cache.v
            mask = (torch.arange(cache.max_len, device=x.device) < cache.lengths[:, None])[:, None, None]
        elif cache is not None:
            k, v = cache.update(k, v, None if pad is None else pad.lengths.to(torch.int32))
            S = k.shape[1]
            # SDPA's is_causal aligns the mask top-left (query i sees keys <= i) when S > T; the new
            # tokens come after the cached ones, so query i sees keys <= i + S - T (bottom-right).
            mask = torch.arange(S, device=x.device) <= torch.arange(S - T, S, device=x.device)[:, None]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           is_causal=mask is None, enable_gqa=gqa)
        out = self.out_proj(y.transpose(1, 2).flatten(2))
        if pad is not None:
            out = pad.unshift(out)
        return out if cache is None else (out, cache)

    def allocate_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> KVCache:
        """An empty KVCache for `batch_size` rows of up to `max_len` tokens; `dtype` and `device`
        default to the layer's parameters' (the dtype to the autocast dtype where autocast is on)."""
        weight = self.k_proj.weight
        return KVCache.zeros(batch_size, max_len, self.num_kv_heads, self.head_dim,
                             dtype=dtype or compute_dtype(weight), device=weight.device if device is None else device)


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

    def forward(self, x: Tensor, cache: BlockCache | None = None,
                attention_mask: Tensor | None = None) -> Tensor | tuple[Tensor, BlockCache]:
        """(B, T, E) -> (B, T, E); with `cache`, (output, cache) after the T new tokens;
        `attention_mask` (B, T), True at real tokens."""
        if cache is None:
            x = x + self.attn(self.norm_attn(x), attention_mask=attention_mask)
            return x + self.mlp(self.norm_mlp(x))
        x = x + self.attn(self.norm_attn(x), cache=cache.attn, attention_mask=attention_mask)[0]
        return x + self.mlp(self.norm_mlp(x)), cache

    def allocate_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> BlockCache:
        """An empty BlockCache (the attention layer's KVCache)."""
        return BlockCache(self.attn.allocate_cache(batch_size, max_len, dtype=dtype, device=device))


class TransformerLM(nn.Module):
    """(B, T) tokens -> (B, T, vocab_size) next-token logits. Positions learned and absolute
    (as GPT-2) or rotary (as Llama), by `cfg.positions`; T <= max_len; the output layer tied
    to the token embedding.

    Decoding: `cache = model.allocate_cache(B)`, then `logits, cache = model(tokens, cache=cache)`
    for the prompt and for each next token (or chunk); the logits equal the full forward's at
    those positions. `model.generate(prompt, max_new_tokens, ...)` samples (cram_ext.generate).

    Rows of different lengths: `attention_mask` (B, T), True (or 1) at real tokens, each row's
    real tokens one run (left padding, or right): every row's logits are those of the row
    alone, positions counting from its first real token; the logits at pads are not meaningful.
    With a cache the mask goes with the prompt, and the rows then advance one token per call,
    each from its own length (a step can be captured in a CUDA graph: nothing in it syncs).
    """

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
        # Linear layers keep PyTorch's default init; embeddings (and the tied head) are drawn
        # from N(0, 1/d). GPT-2's N(0, 0.02) everywhere left MQAR recall at chance at small
        # widths (2 x 64: 27% of 4 novel pairs after 1000 steps, against 100% with this init;
        # changing either scale alone was not enough; docs/results.md).
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=m.embedding_dim**-0.5)

    def forward(self, tokens: Tensor, cache: ModelCache | None = None,
                attention_mask: Tensor | None = None) -> Tensor | tuple[Tensor, ModelCache]:
        """Logits (B, T, vocab_size); with `cache` (from `allocate_cache`), (logits, cache) for the
        T tokens that follow the cached ones. `attention_mask` (B, T): True/1 at real tokens."""
        B, T = tokens.shape
        mask = None if attention_mask is None else as_bool_mask("TransformerLM", attention_mask)
        if cache is None:
            if T > self.cfg.max_len:
                raise ValueError(f"TransformerLM: sequence of {T} tokens, more than max_len={self.cfg.max_len}")
        else:
            cache.check(B, T)
        x = self.embed(tokens)
        if self.pos is not None:
            # Read before the blocks run: the first one advances the cache's lengths in place.
            x = x + self.pos(self._positions(T, tokens.device, cache, mask))
        if cache is None:
            for block in self.blocks:
                x = block(x, attention_mask=mask)
            return self.head(self.norm(x))
        for block, block_cache in zip(self.blocks, cache.layers, strict=True):
            x = block(x, block_cache, attention_mask=mask)[0]
        cache.position += T
        return self.head(self.norm(x)), cache

    @staticmethod
    def _positions(T: int, device: torch.device, cache: ModelCache | None, mask: Tensor | None) -> Tensor:
        """The learned positions of the T tokens: (T,), or (B, T) when rows differ."""
        if mask is not None:  # from each row's first real token (pads get 0)
            return (mask.long().cumsum(1) - 1).clamp_min(0)
        if cache is None:
            return torch.arange(T, device=device)
        if T == 1:  # each row's own length, on the device (rows may differ; CUDA graphs)
            return cache.lengths.long()[:, None]
        return torch.arange(cache.position, cache.position + T, device=device)

    def allocate_cache(self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> ModelCache:
        """An empty ModelCache for `batch_size` rows of up to `max_len` tokens (default and at most
        cfg.max_len: the positions the model has). `dtype` is the dtype attention computes in
        (default the parameters', or the autocast dtype where autocast is on now)."""
        max_len = self.cfg.max_len if max_len is None else max_len
        if max_len > self.cfg.max_len:
            raise ValueError(f"TransformerLM: a cache of max_len={max_len} is longer than the model's "
                             f"max_len={self.cfg.max_len}")
        return ModelCache([b.allocate_cache(batch_size, max_len, dtype=dtype, device=device) for b in self.blocks])

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs: Any) -> GenerateOutput:
        """`cram_ext.generate(self, input_ids, max_new_tokens, **kwargs)`."""
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def routed_attention_layers(self) -> list[RoutedAttention]:
        return [b.attn for b in self.blocks if isinstance(b.attn, RoutedAttention)]
