"""The result type of the router, shared by the op and its reference."""

from __future__ import annotations

from typing import NamedTuple

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
