"""Multi-query associative recall (MQAR), as Zoology (Arora et al., 2023) defines it,
plus a variant where some key-value pairs recur across the whole data set.

docs/tasks.md gives the definition; this module is its implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .common import IGNORE, key_value_table, keys_outside, uniform_subset


@dataclass
class MQARBatch:
    """inputs (N, L) int64 tokens; labels (N, L) int64, the value at query positions and
    IGNORE elsewhere; recurring (N, L) bool, True at queries of recurring pairs."""

    inputs: Tensor
    labels: Tensor
    recurring: Tensor


def recurring_table(vocab_size: int, num_pairs: int, seed: int) -> tuple[Tensor, Tensor]:
    """The data set's fixed key -> value pairs: distinct keys in [1, V/2), values in [V/2, V).
    The shared table drawn over MQAR's ranges (keys shifted past the filler token 0)."""
    half = vocab_size // 2
    if num_pairs > half - 1:
        raise ValueError(f"num_pairs={num_pairs} recurring pairs need more than vocab_size/2 - 1 = {half - 1} keys")
    keys, values = key_value_table(half - 1, vocab_size - half, num_pairs, seed)
    return keys + 1, values + half


def mqar(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    power_a: float = 0.01,
    recurring_frac: float = 0.0,
    num_recurring_pairs: int = 0,
    seed: int = 0,
    table_seed: int = 1234,
) -> MQARBatch:
    """Generate MQAR examples.

    Each example opens with its num_kv_pairs pairs (key, value) interleaved; then each
    key is queried once, at an even offset of the rest of the sequence, offsets drawn
    without replacement with probability proportional to (offset/2 + 1)^(power_a - 1)
    (queries close to the context are likelier). The label at a query's position is
    its value, which follows it in the sequence. Filler tokens are 0.

    With recurring_frac > 0, round(recurring_frac * num_kv_pairs) pairs of each example
    come from a table of num_recurring_pairs pairs fixed for the data set (by
    table_seed), so they can be learnt into weights; the other keys are drawn from
    keys outside that table, with fresh values.
    """
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"MQAR needs 4 * num_kv_pairs <= seq_len, got {num_kv_pairs} pairs and seq_len={seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"MQAR needs vocab_size > seq_len, got vocab_size={vocab_size}, seq_len={seq_len}")
    n_rec = round(recurring_frac * num_kv_pairs)
    if n_rec > num_recurring_pairs:
        raise ValueError(f"{n_rec} recurring pairs per example need num_recurring_pairs >= {n_rec}")
    g = torch.Generator().manual_seed(seed)
    N, kv, half = num_examples, num_kv_pairs, vocab_size // 2
    table_keys, table_values = recurring_table(vocab_size, num_recurring_pairs, table_seed)
    novel_pool = keys_outside(half - 1, table_keys - 1) + 1  # keys of [1, V/2) outside the table
    n_novel = kv - n_rec
    if n_novel > novel_pool.numel():
        raise ValueError("not enough keys outside the recurring table for the novel pairs")

    context = 2 * kv
    slots = torch.arange((seq_len - context) // 2)  # query offsets 0, 2, 4, ... after the context
    slot_weight = (slots + 1).double() ** (power_a - 1)

    pick = uniform_subset(N, num_recurring_pairs, n_rec, g)
    novel = novel_pool[uniform_subset(N, novel_pool.numel(), n_novel, g)]
    keys = torch.cat([table_keys[pick], novel], dim=1)
    values = torch.cat([table_values[pick], torch.randint(half, vocab_size, (N, n_novel), generator=g)], dim=1)
    is_rec = (torch.arange(kv) < n_rec).expand(N, -1)
    order = uniform_subset(N, kv, kv, g)
    keys, values, is_rec = keys.gather(1, order), values.gather(1, order), is_rec.gather(1, order)
    where = context + 2 * slots[torch.multinomial(slot_weight.expand(N, -1), kv, replacement=False, generator=g)]

    rows = torch.arange(N)[:, None]
    seq = torch.zeros(N, seq_len + 1, dtype=torch.long)
    labels = torch.full((N, seq_len + 1), IGNORE, dtype=torch.long)
    recurring = torch.zeros(N, seq_len + 1, dtype=torch.bool)
    seq[:, 0:context:2], seq[:, 1:context:2] = keys, values
    seq[rows, where], seq[rows, where + 1] = keys, values
    labels[rows, where + 1] = values
    recurring[rows, where] = is_rec
    # Inputs are tokens 0..L-1; a query's label sits at the key's position (the next token).
    return MQARBatch(seq[:, :-1], labels[:, 1:], recurring[:, :-1])
