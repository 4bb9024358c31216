"""Multi-query associative recall (MQAR), as Zoology (Arora et al., 2023) defines it,
plus a variant where some key-value pairs recur across the whole data set.

docs/tasks.md gives the definition; this module is its implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100  # label of positions that are not queries (torch's cross-entropy default)


@dataclass
class MQARBatch:
    """inputs (N, L) int64 tokens; labels (N, L) int64, the value at query positions and
    IGNORE elsewhere; recurring (N, L) bool, True at queries of recurring pairs."""

    inputs: Tensor
    labels: Tensor
    recurring: Tensor


def recurring_table(vocab_size: int, num_pairs: int, seed: int) -> tuple[Tensor, Tensor]:
    """The data set's fixed key -> value pairs: distinct keys in [1, V/2), values in [V/2, V)."""
    g = torch.Generator().manual_seed(seed)
    half = vocab_size // 2
    if num_pairs > half - 1:
        raise ValueError(f"num_pairs={num_pairs} recurring pairs need more than vocab_size/2 - 1 = {half - 1} keys")
    keys = torch.randperm(half - 1, generator=g)[:num_pairs] + 1
    values = torch.randint(half, vocab_size, (num_pairs,), generator=g)
    return keys, values


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
    half = vocab_size // 2
    table_keys, table_values = recurring_table(vocab_size, num_recurring_pairs, table_seed)
    novel_pool = torch.ones(half, dtype=torch.bool)
    novel_pool[0] = False
    novel_pool[table_keys] = False
    novel_keys_all = novel_pool.nonzero().squeeze(1)
    n_novel = num_kv_pairs - n_rec
    if n_novel > novel_keys_all.numel():
        raise ValueError("not enough keys outside the recurring table for the novel pairs")

    context = 2 * num_kv_pairs
    slots = torch.arange((seq_len - context) // 2)  # query offsets 0, 2, 4, ... after the context
    slot_weight = (slots + 1).double() ** (power_a - 1)

    seq = torch.zeros(num_examples, seq_len + 1, dtype=torch.long)
    labels = torch.full((num_examples, seq_len + 1), IGNORE, dtype=torch.long)
    recurring = torch.zeros(num_examples, seq_len + 1, dtype=torch.bool)
    for n in range(num_examples):
        pick = torch.randperm(num_recurring_pairs, generator=g)[:n_rec]
        novel = novel_keys_all[torch.randperm(novel_keys_all.numel(), generator=g)[:n_novel]]
        keys = torch.cat([table_keys[pick], novel])
        values = torch.cat([table_values[pick], torch.randint(half, vocab_size, (n_novel,), generator=g)])
        is_rec = torch.arange(num_kv_pairs) < n_rec
        order = torch.randperm(num_kv_pairs, generator=g)
        keys, values, is_rec = keys[order], values[order], is_rec[order]
        seq[n, 0:context:2], seq[n, 1:context:2] = keys, values
        where = context + 2 * slots[torch.multinomial(slot_weight, num_kv_pairs, replacement=False, generator=g)]
        seq[n, where], seq[n, where + 1] = keys, values
        labels[n, where + 1] = values
        recurring[n, where] = is_rec
    # Inputs are tokens 0..L-1; a query's label sits at the key's position (the next token).
    return MQARBatch(seq[:, :-1], labels[:, 1:], recurring[:, :-1])
