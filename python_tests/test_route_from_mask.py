"""cram_ext.route_from_mask: the (index, counts) that cram_ext.route returns for the same mask.

The op is made to route exactly a given mask through `force` (threshold 1: no probability
exceeds it), so its compaction is compared with the helper's on the same decision.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, routing_mask

import cram_ext

PATTERNS = ["random", "none", "all", "first", "last", "mixed"]


def routed_by_op(mask: torch.Tensor) -> cram_ext.Route:
    B, T = mask.shape
    hidden = torch.randn(B, T, 8, device=mask.device)
    weight = torch.randn(8, device=mask.device)
    return cram_ext.route(hidden, weight, 0.0, threshold=1.0, force=mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("B, T", [(1, 1), (3, 17), (6, 300)])
def test_matches_route(device, pattern, B, T):
    mask = routing_mask(B, T, pattern, device, density=0.3)
    r = routed_by_op(mask)
    assert torch.equal(r.mask, mask), "force with threshold 1 must route exactly the mask"
    index, counts = cram_ext.route_from_mask(mask)
    assert index.dtype == counts.dtype == torch.int32
    assert index.shape == (B, T) and counts.shape == (B,) and index.is_contiguous()
    assert index.device == counts.device == mask.device
    assert torch.equal(counts, r.counts)
    assert torch.equal(index, r.index)


@pytest.mark.parametrize("device", DEVICES)
def test_layout(device):
    mask = torch.tensor([[False, True, False, True], [False, False, False, False], [True, True, True, True]],
                        device=device)
    index, counts = cram_ext.route_from_mask(mask)
    assert counts.tolist() == [2, 0, 4]
    assert index.tolist() == [[1, 3, 4, 4], [4, 4, 4, 4], [0, 1, 2, 3]]
    cram_ext.check_route(index, counts, 4)


def test_feeds_routed_attention():
    B, T, H, D = 2, 33, 2, 16
    mask = routing_mask(B, T, "random", "cpu", density=0.4)
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3))
    out, _ = cram_ext.routed_attention(q, k, v, *cram_ext.route_from_mask(mask))
    ref, _ = cram_ext.reference.routed_attention(q, k, v, *cram_ext.route_from_mask(mask))
    torch.testing.assert_close(out, ref)
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3, 4, dtype=torch.bool)])
def test_rejects_non_mask(bad):
    with pytest.raises(ValueError, match="route_from_mask"):
        cram_ext.route_from_mask(bad)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_mask_gives_a_contiguous_index(device):
    """A transposed or sliced mask: the index is still contiguous (as documented) and the same."""
    base = routing_mask(17, 5, "random", device, density=0.4)
    for mask in (base.t(), routing_mask(5, 34, "random", device, density=0.4)[:, ::2]):
        index, counts = cram_ext.route_from_mask(mask)
        assert index.is_contiguous() and counts.is_contiguous()
        ref_index, ref_counts = cram_ext.route_from_mask(mask.contiguous())
        assert torch.equal(index, ref_index) and torch.equal(counts, ref_counts)
