"""A small CRAM model: a stack of blocks, each working memory + routed attention + MLP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..generation import GenerateOutput, RolloutOutput, generate, rollout
from ..nn import BlockCache, MetaplasticMemory, ModelCache, RoutedAttention, WorkingMemory
from ..nn.padding import as_bool_mask

MEMORIES = ("scan", "metaplastic", "gla", None)  # CRAMConfig.memory


@dataclass
class CRAMConfig:
    """Shape and routing of a CRAMModel.

    Token inputs when `vocab_size` is set (logits over it come out), continuous
    inputs of `input_dim` channels otherwise (`output_dim` channels come out). `routed`
    holds RoutedAttention keyword arguments beyond its shape (empty: the layer's defaults).

    `memory` is each block's working memory: "scan" (WorkingMemory, the gated scan, of
    `state_dim` channels), "metaplastic" (MetaplasticMemory with `num_heads` heads and its
    default dims; `state_dim` unused), "gla" (the same layer without the importance: gated
    linear attention, the metaplastic memory's special case) or None (no working memory). A config without the key
    (config.json of runs from before it existed) means "scan".
    """

    d_model: int = 64
    n_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    vocab_size: int | None = None
    input_dim: int | None = None
    output_dim: int | None = None
    state_dim: int | None = None
    mlp_ratio: int = 4
    routed: dict[str, Any] = field(default_factory=dict)
    memory: str | None = "scan"

    def __post_init__(self) -> None:
        if self.memory not in MEMORIES:
            raise ValueError(f"CRAMConfig: memory must be one of {MEMORIES}, got {self.memory!r}")
        if (self.vocab_size is None) == (self.input_dim is None):
            raise ValueError("CRAMConfig: set exactly one of vocab_size (tokens) and input_dim (continuous)")
        if self.input_dim is not None and self.output_dim is None:
            self.output_dim = self.input_dim


class CRAMBlock(nn.Module):
    """Pre-norm residual block: x + working memory (cfg.memory: WorkingMemory, MetaplasticMemory,
    or none), x + RoutedAttention, x + MLP."""

    def __init__(self, cfg: CRAMConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.memory: WorkingMemory | MetaplasticMemory | None
        if cfg.memory is None:
            self.norm_attn, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d)
            self.memory = None
        else:
            self.norm_memory, self.norm_attn, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
            if cfg.memory == "scan":
                self.memory = WorkingMemory(d, cfg.state_dim)
            else:
                self.memory = MetaplasticMemory(d, cfg.num_heads, metaplastic=cfg.memory == "metaplastic")
        self.attn = RoutedAttention(d, cfg.num_heads, cfg.num_kv_heads, **cfg.routed)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d))

    def forward(self, x: Tensor, dt: Tensor | None = None, cache: BlockCache | None = None,
                attention_mask: Tensor | None = None) -> Tensor | tuple[Tensor, BlockCache]:
        """(B, T, E) -> (B, T, E); with `cache` (from `allocate_cache`), (output, cache) for the
        T tokens that follow the cached ones; `attention_mask` (B, T), True at real tokens."""
        masked = {} if attention_mask is None else {"attention_mask": attention_mask}
        if cache is None:
            if self.memory is not None:
                x = x + self.memory(self.norm_memory(x), dt, **masked)
            x = x + self.attn(self.norm_attn(x), attention_mask=attention_mask)
            return x + self.mlp(self.norm_mlp(x))
        # Before the working memory advances: an overflow leaves the cache as it was.
        cache.attn.check_room(x.shape[1])
        if self.memory is not None:
            x = x + self.memory(self.norm_memory(x), dt, cache=cache.memory, **masked)[0]
        x = x + self.attn(self.norm_attn(x), cache=cache.attn, attention_mask=attention_mask)[0]
        return x + self.mlp(self.norm_mlp(x)), cache

    def allocate_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> BlockCache:
        """An empty BlockCache: the attention layer's KVCache and the working memory's state
        (a ScanCache, a MetaplasticCache, or None without a working memory)."""
        memory = None if self.memory is None else self.memory.allocate_cache(batch_size, dtype=dtype, device=device)
        return BlockCache(self.attn.allocate_cache(batch_size, max_len, dtype=dtype, device=device), memory)


class CRAMModel(nn.Module):
    """(B, T) tokens or (B, T, input_dim) values, optional time gaps dt (B, T) ->
    (B, T, vocab_size) logits or (B, T, output_dim) predictions.

    `routed_attention_layers()` lists the RoutedAttention modules, whose `last_stats`
    give per-layer utilization; `cram_ext.aux_losses(model)` their training losses.

    Decoding: `cache = model.allocate_cache(B, max_len)`, then
    `out, cache = model(inputs, dt, cache=cache)` for the prompt and for each next token (or
    chunk): the outputs equal the full forward's at those positions. Token models also have
    `generate` (cram_ext.generate).
    """

    def __init__(self, cfg: CRAMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.vocab_size is not None:
            self.embed: nn.Module = nn.Embedding(cfg.vocab_size, cfg.d_model)
            out_dim = cfg.vocab_size
        else:
            self.embed = nn.Linear(cfg.input_dim, cfg.d_model)
            out_dim = cfg.output_dim
        self.blocks = nn.ModuleList(CRAMBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, out_dim)

    def forward(self, inputs: Tensor, dt: Tensor | None = None, cache: ModelCache | None = None,
                attention_mask: Tensor | None = None) -> Tensor | tuple[Tensor, ModelCache]:
        """Outputs (B, T, vocab_size or output_dim); with `cache`, (outputs, cache) for the T
        inputs that follow the cached ones (dt: their time gaps). `attention_mask` (B, T), True/1
        at real tokens: rows of different lengths, as TransformerLM takes them."""
        mask = None if attention_mask is None else as_bool_mask("CRAMModel", attention_mask)
        if cache is None:
            x = self.embed(inputs)
            for block in self.blocks:
                x = block(x, dt, attention_mask=mask)
            return self.head(self.norm(x))
        cache.check(inputs.shape[0], inputs.shape[1])
        x = self.embed(inputs)
        for block, block_cache in zip(self.blocks, cache.layers, strict=True):
            x = block(x, dt, block_cache, attention_mask=mask)[0]
        cache.position += inputs.shape[1]
        return self.head(self.norm(x)), cache

    def allocate_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> ModelCache:
        """An empty ModelCache for `batch_size` rows of up to `max_len` tokens. `dtype` is the
        dtype attention computes in (default the parameters', or the autocast dtype where autocast
        is on now); the working memories' states are held in float32 (float64 for a float64 model)."""
        return ModelCache([b.allocate_cache(batch_size, max_len, dtype=dtype, device=device) for b in self.blocks])

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs: Any) -> GenerateOutput:
        """`cram_ext.generate(self, input_ids, max_new_tokens, **kwargs)`; token models only
        (cfg.vocab_size set)."""
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def rollout(self, inputs: Tensor, steps: int, **kwargs: Any) -> RolloutOutput:
        """`cram_ext.rollout(self, inputs, steps, **kwargs)`; continuous-input models only
        (cfg.input_dim set)."""
        return rollout(self, inputs, steps, **kwargs)

    def routed_attention_layers(self) -> list[RoutedAttention]:
        return [block.attn for block in self.blocks]
