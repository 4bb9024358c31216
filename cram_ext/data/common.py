"""What the task generators share: the ignored label, the fixed key -> value table of the
recurring variants, and batched random draws (one generator, no per-example loop)."""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100  # label of positions that are not queries (torch's cross-entropy default)


def key_value_table(num_keys: int, num_values: int, num_pairs: int, seed: int) -> tuple[Tensor, Tensor]:
    """num_pairs distinct keys in [0, num_keys) (in random order) and values in
    [0, num_values), both int64 of shape (num_pairs,), fixed by seed."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randperm(num_keys, generator=g)[:num_pairs]
    values = torch.randint(0, num_values, (num_pairs,), generator=g)
    return keys, values


def uniform_subset(n: int, pool: int, k: int, g: torch.Generator) -> Tensor:
    """(n, k) int64: per row, k distinct indices of [0, pool), a uniform random subset in random order."""
    return torch.rand(n, pool, generator=g).argsort(dim=1, stable=True)[:, :k]


def keys_outside(num_keys: int, table_keys: Tensor) -> Tensor:
    """The keys of [0, num_keys) that are not in table_keys, ascending."""
    outside = torch.ones(num_keys, dtype=torch.bool)
    outside[table_keys] = False
    return outside.nonzero().squeeze(1)
