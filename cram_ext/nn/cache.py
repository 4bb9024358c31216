"""Inference state carried between calls: keys and values of every past token, the scan state of
working memories, and the position.

Every cache is allocated once, at a static maximum length (`allocate_cache` on each module), and
written in place: the buffers keep their addresses from the prompt to the last token, as a CUDA
graph of a decode step needs. A module called with `cache=` writes the new tokens' state into it,
advances its position and returns it (the same object). The buffers are zero-filled, never
`torch.empty`: a kernel that reads whole key tiles past the valid length (a masked key enters P @ V
as 0 * value) must find finite numbers there.

Caches are for inference: run under `torch.no_grad()`. After an exception inside a forward (an
overflow is checked before anything is written) the cache's contents are undefined.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # metaplastic_memory imports this module
    from .metaplastic_memory import MetaplasticCache

__all__ = ["BlockCache", "KVCache", "ModelCache", "ScanCache", "compute_dtype"]


def compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype a layer with this weight computes in now: the autocast dtype when autocast is on
    for its device, else the weight's. The default dtype of a cache's keys and values.
    Autocast leaves float64 alone (it casts no double tensor), so a float64 layer computes in
    float64 under it too."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type) and weight.is_floating_point() and weight.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


@dataclass
class ScanCache:
    """The state of one WorkingMemory between calls.

    Attributes:
        state: (B, C) the gated scan's last state, in the scan's accumulation dtype (float32,
            float64 for float64 inputs); zeros before the first token.
        position: tokens the memory has read.
    """

    state: Tensor
    position: int = 0

    @classmethod
    def zeros(cls, batch_size: int, state_dim: int, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> ScanCache:
        """An empty state: the scan starts from zeros, as a forward without a cache does."""
        return cls(torch.zeros(batch_size, state_dim, dtype=dtype, device=device))

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    def reset(self) -> None:
        """Back to the empty state, in place (for a new sequence in the same buffers)."""
        self.state.zero_()
        self.position = 0


@dataclass
class KVCache:
    """Keys and values of every past token of one attention layer, in buffers of a static length.

    Every token writes its key and value, routed or not (a later routed token attends to all of
    them). A RoutedAttention with a working memory (memory="scan" or "metaplastic") keeps its
    state (a ScanCache or a MetaplasticCache) in `memory`.

    Rows may hold different numbers of tokens: a prompt with a padding mask leaves row b
    with lengths[b] tokens at [0, lengths[b]) (the layers shift each row's real tokens to its
    start, nn/padding.py), and each later one-token step writes row b's token at lengths[b]. A
    one-token step reads and writes through `lengths` only, on the device, so it can be captured
    in a CUDA graph and replayed (the host-side `position` does not advance on replay).

    Attributes:
        k, v: (B, max_len, Hk, D) buffers; row b's positions [0, lengths[b]) hold its past
            tokens' keys and values (positions applied), the rest zeros or stale values never read.
            D is the layer's head dim (a RoutedAttention's on CUDA: the kernels' 64 or 128, the
            keys zero-padded).
        memory: the layer's own working-memory state, or None.
        position: columns of the buffers written so far (every row's length is at most this);
            the next token's position when the rows are of one length.
        lengths: (B,) int32 on the buffers' device, the tokens of each row.
        ragged: True once a padded prompt made the rows' lengths differ; such a cache then
            takes one token per row and call.
    """

    k: Tensor
    v: Tensor
    memory: ScanCache | MetaplasticCache | None = None
    position: int = 0
    lengths: Tensor | None = None
    ragged: bool = False

    def __post_init__(self) -> None:
        if self.lengths is None:
            self.lengths = torch.full((self.k.shape[0],), self.position, dtype=torch.int32, device=self.k.device)
        self._rows = torch.arange(self.k.shape[0], device=self.k.device)  # append's row index, made once

    @classmethod
    def zeros(cls, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
              device: torch.device | str | None = None,
              memory: ScanCache | MetaplasticCache | None = None) -> KVCache:
        """Buffers for `max_len` tokens, nothing written yet."""
        if max_len < 1:
            raise ValueError(f"KVCache: max_len must be >= 1, got {max_len}")
        shape = (batch_size, max_len, num_kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   memory)

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    def check_room(self, new_tokens: int) -> None:
        """Raise ValueError, naming max_len, unless `new_tokens` more tokens fit."""
        _check_room("KVCache", self.position, new_tokens, self.max_len)

    def reset(self) -> None:
        """Back to no tokens, in place. The old keys and values stay in the buffers: past the
        position they are never read."""
        self.position = 0
        self.lengths.zero_()
        self.ragged = False
        if self.memory is not None:
            self.memory.reset()

    def update(self, k: Tensor, v: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Write the new tokens' k and v (B, T, Hk, D) at positions [position, position + T),
        advance the position by T and return views of the keys and values of every token so
        far, (B, position + T, Hk, D): what attention of the T new queries reads (bottom-right
        aligned: new query i sees keys j <= i + position). `lengths` (B,): the real tokens of
        each row of a padded prompt (shifted to the rows' starts), on an empty cache only."""
        self._check_tokens(k, v)
        T = k.shape[1]
        if lengths is not None and self.position != 0:
            raise ValueError("KVCache: lengths (a padded prompt) can only start an empty cache")
        if self.ragged:
            raise NotImplementedError("KVCache: the rows hold different numbers of tokens (a padded prompt): "
                                      "continue them one token per call")
        self.check_room(T)
        end = self.position + T
        self.k[:, self.position:end] = k
        self.v[:, self.position:end] = v
        self.position = end
        if lengths is None:
            self.lengths.add_(T)
        else:
            self.lengths.copy_(lengths)
            self.ragged = True
        return self.k[:, :end], self.v[:, :end]

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write one new token per row, k and v (B, 1, Hk, D), at each row's length, and advance
        the lengths by one. No host sync: a step that calls it can be captured in a CUDA graph."""
        self._check_tokens(k, v)
        if k.shape[1] != 1:
            raise ValueError(f"KVCache.append: one token per row, got {k.shape[1]}")
        self.check_room(1)
        at = self.lengths.long()
        self.k.index_put_((self._rows, at), k[:, 0])
        self.v.index_put_((self._rows, at), v[:, 0])
        self.lengths.add_(1)
        self.position += 1

    def _check_tokens(self, k: Tensor, v: Tensor) -> None:
        if k.shape != v.shape or k.dim() != 4 or k.shape[0] != self.batch_size or k.shape[2:] != self.k.shape[2:]:
            raise ValueError(f"KVCache: expected k and v of shape (B={self.batch_size}, T, Hk={self.k.shape[2]}, "
                             f"D={self.k.shape[3]}), got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.dtype != self.k.dtype or v.dtype != self.v.dtype:
            # Casting the whole cache every step would cost a copy of it: allocate it in the
            # dtype the layer computes in (allocate_cache under the same autocast, or dtype=).
            raise TypeError(f"KVCache: the cache holds {self.k.dtype}, the layer's keys are {k.dtype}: "
                            f"allocate the cache with dtype={k.dtype} (or under the same autocast)")


@dataclass
class BlockCache:
    """The state of one residual block: its attention layer's keys and values, and, in a CRAMBlock,
    the scan state of the block's working memory."""

    attn: KVCache
    memory: ScanCache | MetaplasticCache | None = None

    def reset(self) -> None:
        """Back to no tokens, in place."""
        self.attn.reset()
        if self.memory is not None:
            self.memory.reset()


@dataclass
class ModelCache:
    """The state of a whole model (TransformerLM, CRAMModel) between calls: one BlockCache per
    block, and the position of the next token (learned and rotary positions start there)."""

    layers: list[BlockCache]
    position: int = 0

    @property
    def max_len(self) -> int:
        return min((layer.attn.max_len for layer in self.layers), default=sys.maxsize)

    @property
    def batch_size(self) -> int | None:
        return self.layers[0].attn.batch_size if self.layers else None

    @property
    def lengths(self) -> Tensor | None:
        """(B,) int32, the tokens of each row (the first layer's KVCache.lengths, advanced in place
        by each call)."""
        return self.layers[0].attn.lengths if self.layers else None

    def reset(self) -> None:
        """Back to no tokens, in place: the next call is a new sequence in the same buffers."""
        for layer in self.layers:
            layer.reset()
        self.position = 0

    def check(self, batch_size: int, new_tokens: int) -> None:
        """Raise ValueError unless a call with `new_tokens` tokens of `batch_size` rows fits:
        checked before any layer writes, so that an overflow leaves the cache as it was."""
        if self.layers and batch_size != self.batch_size:
            raise ValueError(f"ModelCache: allocated for batch size {self.batch_size}, got {batch_size} rows")
        _check_room("ModelCache", self.position, new_tokens, self.max_len)


def initial_state(layer: str, x: Tensor, h0: Any, cache: Any) -> Any:
    """The state a working memory starts x from: h0, or with a cache (for decoding) the
    cache's state, after checking the two are not both given and the batch sizes agree."""
    if cache is None:
        return h0
    if h0 is not None:
        raise ValueError(f"{layer}: pass h0 or cache, not both (the cache holds the initial state)")
    if x.shape[0] != cache.batch_size:
        raise ValueError(f"{layer}: the cache holds {cache.batch_size} rows, x has {x.shape[0]}")
    return cache.state


def _check_room(what: str, position: int, new_tokens: int, max_len: int) -> None:
    if position + new_tokens > max_len:
        raise ValueError(f"{what}: {new_tokens} new token(s) at position {position} overflow the cache's "
                         f"max_len={max_len}: allocate it with a larger max_len")
