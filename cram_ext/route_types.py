"""The result type of the router, shared by the op and its reference, and the compaction
of a routing mask into the (index, counts) that routed_attention takes."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Route(NamedTuple):
    """What `cram_ext.route` returns.

    prob:   (B, T) float32 (float64 for float64 input), sigmoid(hidden @ weight + bias)
    mask:   (B, T) bool, prob > threshold or forced
    index:  (B, T) int32, row b holds its routed positions ascending in index[b, :counts[b]], then T
    counts: (B,) int32, routed tokens per row
    """

    prob: Tensor
    mask: Tensor
    index: Tensor
    counts: Tensor


def route_from_mask(mask: Tensor) -> tuple[Tensor, Tensor]:
    """The (index, counts) of a routing mask, laid out as `cram_ext.route` returns them.

    Use it to route attention by any rule of your own (top-k, a fixed pattern, a mask
    computed elsewhere): `routed_attention(q, k, v, *route_from_mask(mask))`.

    Args:
        mask: (B, T) bool, True where a token is routed.

    Returns:
        index: (B, T) int32, contiguous; row b holds its routed positions ascending in
            index[b, :counts[b]], then T.
        counts: (B,) int32, routed tokens per row.

    Plain PyTorch on the mask's device (a sort per row), no host-device sync, traceable by
    torch.compile(fullgraph=True). `cram_ext.route(...)` gives the same index and counts for
    its own mask: `route_from_mask(r.mask) == (r.index, r.counts)`.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"route_from_mask: mask: expected a (B, T) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    B, T = mask.shape
    counts = mask.sum(dim=1, dtype=torch.int32)
    positions = torch.arange(T, device=mask.device).expand(B, T)
    # Unrouted slots hold T, so sorting puts the routed positions first, in order. The sort keeps
    # the layout of a strided mask (a transposed one gives a transposed index): hence contiguous().
    index = torch.where(mask, positions, T).sort(dim=1).values.to(torch.int32).contiguous()
    return index, counts
