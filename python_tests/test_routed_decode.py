"""cram_ext.routed_decode: one query token per row over that row's KV cache, only in routed rows,
against cram_ext.reference.routed_decode and against routed_attention at the last position;
per-row lengths, GQA, strided and misaligned caches, many splits of a long cache, CUDA-graph
capture, torch.compile, opcheck and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import ATTN_DTYPES, DEVICES, DTYPE_NAMES, TOLERANCE, assert_close_rel, at_offset, reference_dtype

import cram_ext
from cram_ext import reference

DECODE_DTYPES = {"cpu": ATTN_DTYPES["cpu"], "cuda": [torch.float32, torch.float16, torch.bfloat16]}


def decode_params():
    out = []
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA test")] if device == "cuda" else []
        for dtype in DECODE_DTYPES[device]:
            for d in ([16, 5] if device == "cpu" else [64, 128]):
                out.append(pytest.param(device, dtype, d, id=f"{device}-{DTYPE_NAMES[dtype]}-D{d}", marks=marks))
    return out


def _inputs(device, dtype, B, H, Hk, D, S, seqlens, routed):
    q = torch.randn(B, H, D, device=device, dtype=dtype)
    k = torch.randn(B, S, Hk, D, device=device, dtype=dtype)
    v = torch.randn(B, S, Hk, D, device=device, dtype=dtype)
    return (q, k, v, torch.tensor(seqlens, dtype=torch.int32, device=device),
            torch.tensor(routed, dtype=torch.bool, device=device))


def _check(q, k, v, seqlens, routed, scale=None):
    out, lse = cram_ext.routed_decode(q, k, v, seqlens, routed, scale)
    ref_dtype = reference_dtype(q.dtype)
    ref_out, ref_lse = reference.routed_decode(q.to(ref_dtype), k.to(ref_dtype), v.to(ref_dtype), seqlens, routed,
                                               scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == q.shape[:2] and lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    empty = ~(routed & (seqlens > 0))
    assert (out[empty] == 0).all(), "rows not routed (or with no keys) must be exactly 0"
    assert (lse[empty] == float("-inf")).all()
    tol = TOLERANCE[q.dtype]
    if (~empty).any():
        assert_close_rel(out[~empty], ref_out[~empty], tol)
        assert_close_rel(lse[~empty], ref_lse[~empty], max(tol, 1e-6), "lse")
    return out, lse


@pytest.mark.parametrize("device, dtype, D", decode_params())
@pytest.mark.parametrize("B, H, Hk, S", [(1, 1, 1, 1), (3, 4, 2, 37), (5, 6, 1, 131), (2, 8, 8, 257), (4, 12, 3, 61)])
def test_matches_reference(device, dtype, D, B, H, Hk, S):
    # Per-row lengths: full, one key, none, odd, past S (clamped), negative (clamped to 0).
    lengths = [S, 1, 0, max(S // 3, 1), S + 5, -2]
    seqlens = [lengths[b % len(lengths)] for b in range(B)]
    routed = [b % 4 != 3 for b in range(B)]
    _check(*_inputs(device, dtype, B, H, Hk, D, S, seqlens, routed))


@pytest.mark.parametrize("device", DEVICES)
def test_no_row_routed_and_every_row_routed(device):
    D = 64 if device == "cuda" else 8
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for routed in ([False] * 3, [True] * 3):
        _check(*_inputs(device, dtype, 3, 4, 2, D, 50, [50, 20, 7], routed))


@pytest.mark.parametrize("device", DEVICES)
def test_equals_routed_attention_at_the_last_position(device):
    """The decode step of a token at position n - 1 is routed attention's output for that query
    over the first n keys (self-attention with a cache: S = n, T = 1)."""
    D = 64 if device == "cuda" else 16
    dtype = torch.bfloat16 if device == "cuda" else torch.float64
    B, H, Hk, n, S = 2, 4, 2, 45, 64
    q, k, v, seqlens, routed = _inputs(device, dtype, B, H, Hk, D, S, [n, n], [True, True])
    out, lse = cram_ext.routed_decode(q, k, v, seqlens, routed)
    index = torch.zeros(B, 1, dtype=torch.int32, device=device)
    counts = torch.ones(B, dtype=torch.int32, device=device)
    ref, ref_lse = cram_ext.routed_attention(q[:, None], k[:, :n], v[:, :n], index, counts)
    assert_close_rel(out, ref[:, 0], TOLERANCE[dtype])
    assert_close_rel(lse, ref_lse[:, :, 0], max(TOLERANCE[dtype], 1e-6), "lse")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_misaligned_inputs(device):
    """A cache that is a slice of a larger buffer (the heads of one layer among others), a q
    taken from a (B, 1, H, D) tensor, buffers starting one element into their storage."""
    D = 64 if device == "cuda" else 16
    dtype = torch.float16 if device == "cuda" else torch.float32
    B, H, Hk, S = 3, 4, 2, 70
    big_k = torch.randn(B, S, 2 * Hk, D, device=device, dtype=dtype)
    big_v = torch.randn(B, S + 3, Hk, D, device=device, dtype=dtype)
    k, v = big_k[:, :, 1:1 + Hk], big_v[:, 2:2 + S]
    q = torch.randn(B, 1, H, D, device=device, dtype=dtype)[:, 0]
    seqlens = torch.tensor([70, 33, 1], dtype=torch.int32, device=device)
    routed = torch.tensor([True, True, True], device=device)
    _check(q, k, v, seqlens, routed)
    _check(at_offset(q), at_offset(k.contiguous()), at_offset(v.contiguous()), seqlens, routed)
    # A q whose head dim is not contiguous is copied.
    qt = torch.randn(B, D, H, device=device, dtype=dtype).transpose(1, 2)
    _check(qt, k, v, seqlens, routed, scale=0.37)


@pytest.mark.parametrize("device", DEVICES)
def test_long_cache_many_splits(device):
    """Long rows split over many blocks on CUDA, with lengths that end inside, at and just past
    a split's boundary; one row alone (the most splits)."""
    D = 128 if device == "cuda" else 16
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    S = 4099
    _check(*_inputs(device, dtype, 1, 2, 1, D, S, [S], [True]))
    _check(*_inputs(device, dtype, 4, 8, 2, D, S, [S, 256, 257, 1000], [True, True, True, True]))


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_values_stay_in_their_row(device):
    """NaN in the cache of a row that is not routed, or past a routed row's length, reaches no
    output."""
    D = 64 if device == "cuda" else 8
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, seqlens, routed = _inputs(device, dtype, 3, 2, 1, D, 40, [40, 10, 40], [True, True, False])
    k[2], v[2] = float("nan"), float("nan")
    k[1, 10:], v[1, 10:] = float("nan"), float("nan")
    out, lse = _check(q, k, v, seqlens, routed)
    assert torch.isfinite(out).all() and torch.isfinite(lse[:2]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    D = 64 if device == "cuda" else 8
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args = _inputs(device, dtype, 3, 4, 2, D, 19, [19, 4, 0], [True, False, True])
    torch.library.opcheck(torch.ops.cram.routed_decode.default, (*args, 0.125))


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_fullgraph(device):
    D = 64 if device == "cuda" else 8
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, seqlens, routed = _inputs(device, dtype, 2, 4, 4, D, 23, [23, 9], [True, True])

    def step(q, k, v, seqlens, routed):
        out, _ = cram_ext.routed_decode(q * 2, k, v, seqlens, routed)
        return out.float().sum(-1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    torch.testing.assert_close(compiled(q, k, v, seqlens, routed), step(q, k, v, seqlens, routed))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA test")
def test_cuda_graph_replays_with_new_lengths_and_routing():
    """A decode step captured once and replayed with seqlens, routed and q written in place
    (the cache grows by one token a step), as a decode loop under a CUDA graph runs."""
    B, H, Hk, D, S = 4, 8, 2, 128, 300
    dtype = torch.bfloat16
    q, k, v, seqlens, routed = _inputs("cuda", dtype, B, H, Hk, D, S, [1, 1, 1, 1], [True] * 4)
    cram_ext.routed_decode(q, k, v, seqlens, routed)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = cram_ext.routed_decode(q, k, v, seqlens, routed)
    for step, (lengths, flags) in enumerate([([5, 17, 299, 300], [True, False, True, True]),
                                             ([6, 18, 300, 1], [False, True, True, True])]):
        q.copy_(torch.randn_like(q))
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        routed.copy_(torch.tensor(flags))
        graph.replay()
        ref_out, ref_lse = reference.routed_decode(q.float(), k.float(), v.float(), seqlens, routed)
        assert (out[~routed] == 0).all(), step
        assert_close_rel(out[routed], ref_out[routed], TOLERANCE[dtype])
        assert_close_rel(lse[routed], ref_lse[routed], TOLERANCE[dtype], "lse")


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_names_the_argument(device):
    D = 64 if device == "cuda" else 8
    q, k, v, seqlens, routed = _inputs(device, torch.float32, 2, 4, 2, D, 9, [9, 3], [True, True])
    cases = [
        ((q[:, None], k, v, seqlens, routed), ValueError, "q: expected a 3-d tensor"),
        ((q, k[0], v, seqlens, routed), ValueError, "k_cache"),
        ((q, k, v[:, :5], seqlens, routed), ValueError, "v_cache"),
        ((q, k.double(), v, seqlens, routed), TypeError, "k_cache"),
        ((q, k, v, seqlens.long(), routed), TypeError, "seqlens"),
        ((q, k, v, seqlens[:1], routed), ValueError, "seqlens"),
        ((q, k, v, seqlens, routed.int()), TypeError, "routed"),
        ((q[:, :3], k, v, seqlens, routed), ValueError, "multiple of the number of key/value heads"),
        ((q, k, v, seqlens.to("meta"), routed), ValueError, "seqlens"),
    ]
    if device == "cuda":
        cases.append(((q[..., :32], k[..., :32], v[..., :32], seqlens, routed), ValueError, "head dim D must be 64 or 128"))
        cases.append(((q.double(), k.double(), v.double(), seqlens, routed), TypeError, "q: expected dtype"))
    for args, error, words in cases:
        with pytest.raises(error, match=words):
            cram_ext.routed_decode(*args)
