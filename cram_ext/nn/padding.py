"""Batches of rows of different lengths: an attention_mask (B, T), True (or 1) at each row's real
tokens and False (0) at pads, as Hugging Face's (the opposite of nn.MultiheadAttention's
key_padding_mask, which marks the pads).

The attention layers compute on every row shifted so that its real tokens come first (right
padding): causal attention then never reaches a pad, the ops need no mask, positions count from
each row's first real token (as Hugging Face's position_ids = cumsum(mask) - 1), and a KV cache
holds row b's tokens at [0, lengths[b]), where its next token is written. A row's real tokens
must be one contiguous run: left padding (what generation uses), right padding, or both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Padding:
    """The padding of one batch.

    Attributes:
        mask: (B, T) bool, True at real tokens, as given.
        start: (B,) int64, the index of each row's first real token (0 for a row of pads only).
        lengths: (B,) int64, the real tokens of each row.
        valid: (B, T) bool, the real tokens of the shifted rows: t < lengths[b].
    """

    mask: Tensor
    start: Tensor
    lengths: Tensor
    valid: Tensor

    @classmethod
    def from_mask(cls, what: str, mask: Tensor, batch_size: int, seq_len: int, device: torch.device) -> Padding:
        """Check `mask` (a ValueError naming `what` and attention_mask otherwise) and find each
        row's run of real tokens. The check that the runs are contiguous syncs with the device; it
        is skipped inside torch.compile and CUDA-graph capture."""
        mask = as_bool_mask(what, mask)
        if tuple(mask.shape) != (batch_size, seq_len):
            raise ValueError(f"{what}: attention_mask must have shape (B={batch_size}, T={seq_len}), "
                             f"got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"{what}: attention_mask is on {mask.device}, the input on {device}")
        if not _capturing(mask):
            changes = (mask[:, 1:] != mask[:, :-1]).sum(1)
            broken = (changes > 2) | ((changes == 2) & mask[:, 0])
            if bool(broken.any()):
                rows = broken.nonzero().flatten().tolist()[:8]
                raise ValueError(f"{what}: attention_mask: each row's real tokens (True) must be one contiguous "
                                 f"run (left or right padding); rows {rows} are not")
        start = mask.to(torch.int8).argmax(1)
        lengths = mask.sum(1)
        valid = torch.arange(seq_len, device=device) < lengths[:, None]
        return cls(mask, start, lengths, valid)

    def shift(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> the same rows, each rotated so that its real tokens come first."""
        return _gather_rows(x, self.start, +1)

    def unshift(self, y: Tensor) -> Tensor:
        """The inverse of `shift`, with zeros at the pads."""
        y = _gather_rows(y, self.start, -1)
        return y.masked_fill(~self.mask.view(*self.mask.shape, *(1,) * (y.dim() - 2)), 0)


def as_bool_mask(what: str, mask: Tensor) -> Tensor:
    """`mask` as bool: bool as given, integers as mask != 0; anything else a ValueError naming `what`."""
    if isinstance(mask, Tensor) and mask.dtype == torch.bool:
        return mask
    if isinstance(mask, Tensor) and not mask.is_floating_point() and not mask.is_complex():
        return mask != 0
    raise ValueError(f"{what}: attention_mask must be a bool or integer tensor (True/1 at real tokens), got "
                     f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")


def _gather_rows(x: Tensor, start: Tensor, sign: int) -> Tensor:
    B, T = x.shape[0], x.shape[1]
    index = (torch.arange(T, device=x.device) + sign * start[:, None]) % T
    return x.gather(1, index.view(B, T, *(1,) * (x.dim() - 2)).expand(x.shape))


def _capturing(t: Tensor) -> bool:
    return torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())
