"""Shared fixtures and helpers of the cram_ext test suite.

Every test that touches tensors takes a `device` ("cpu" always, "cuda" skipped when
torch.cuda.is_available() is False), so the same files test the CUDA kernels on a
GPU machine. Dtypes and head dims depend on the device (docs/design.md §2): the helpers
below build the (device, dtype[, head dim]) parameter lists.

Inputs are random and differ per test, but are reproducible: each test is seeded
from its node id (and CRAM_TEST_SEED, default 0, to draw other inputs).
"""

from __future__ import annotations

import itertools
import os
import zlib

import pytest
import torch

import cram_ext
from cram_ext import route_from_mask  # noqa: F401 - the tests' (index, counts) of a mask, in plain PyTorch

HAS_CUDA = torch.cuda.is_available()
DTYPE_NAMES = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
CUDA_SKIP = pytest.mark.skipif(not HAS_CUDA, reason="CUDA test: torch.cuda.is_available() is False on this machine")


def cuda_only(*values, id=None):
    """A pytest.param for a CUDA-only case (skipped, with the reason, without a GPU).
    The id defaults to the values joined by "-", dtypes by their short names."""
    if id is None:
        id = "-".join(DTYPE_NAMES.get(v, str(v)) if isinstance(v, torch.dtype) else str(v) for v in values
                      if isinstance(v, (str, int, float, torch.dtype)))
    return pytest.param(*values, marks=CUDA_SKIP, id=id or None)


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA_SKIP)]

# Dtypes each op supports per device (docs/design.md §2).
SCAN_DTYPES = {
    "cpu": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    "cuda": [torch.float32, torch.float16, torch.bfloat16],
}
ATTN_DTYPES = {
    "cpu": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    "cuda": [torch.float16, torch.bfloat16],
}
# Head dims: small on the CPU (fast), the supported ones on CUDA.
ATTN_HEAD_DIMS = {"cpu": [16], "cuda": [64, 128]}


# Relative-error bounds ||out - ref|| / ||ref|| (docs/design.md §5). float64 is compared with a
# float64 reference; the others with the reference run in float32 on the same inputs.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def _marks(device):
    return [CUDA_SKIP] if device == "cuda" else []


def device_dtype_params(dtypes_per_device):
    """[(device, dtype)] params over every device, each with that device's dtypes."""
    return [
        pytest.param(device, dtype, id=f"{device}-{DTYPE_NAMES[dtype]}", marks=_marks(device))
        for device in ("cpu", "cuda")
        for dtype in dtypes_per_device[device]
    ]


def attention_params():
    """[(device, dtype, head_dim)] params for routed attention."""
    return [
        pytest.param(device, dtype, d, id=f"{device}-{DTYPE_NAMES[dtype]}-D{d}", marks=_marks(device))
        for device in ("cpu", "cuda")
        for dtype, d in itertools.product(ATTN_DTYPES[device], ATTN_HEAD_DIMS[device])
    ]


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference runs in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rel_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||out - ref|| / max(||ref||, floor) in float64; 0 when both are zero, inf when only ref is.

    `floor` is the scale below which the reference counts as zero (an absolute
    tolerance): a gradient that is exactly 0 in exact arithmetic comes out as rounding
    noise, whose size relative to 0 means nothing. NaN anywhere gives NaN, which fails
    every `<= tol` comparison.
    """
    out = out.detach().to("cpu", torch.float64)  # a CUDA result may be checked against a CPU reference
    ref = ref.detach().to("cpu", torch.float64)
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    num = torch.linalg.vector_norm(out - ref).item()
    den = max(torch.linalg.vector_norm(ref).item(), floor)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def assert_close_rel(
    out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output", floor: float = 0.0
) -> None:
    """Relative-norm comparison with the reference (see rel_error), with a readable failure."""
    assert torch.isfinite(out).all() or not torch.isfinite(ref).all(), f"{what}: non-finite values"
    err = rel_error(out, ref, floor)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def grad_floor(grad_out: torch.Tensor) -> float:
    """Scale below which a gradient counts as 0: a query that sees a single key has a
    constant softmax, so the exact gradients of q and of that key are 0 and the ops return
    rounding noise, whose size relative to 0 means nothing. Typical gradients are about 0.3
    of ||grad_out||; a tenth of it is the floor."""
    return 0.1 * torch.linalg.vector_norm(grad_out.double()).item()


def assert_same_state(a, b, where: str = "") -> None:
    """Bitwise equality of two state dicts, or of anything in them (tensors, a module's extra
    state: dicts, tuples, numbers, None)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}" if where else str(k))
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def at_offset(t: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """A contiguous copy of t whose data starts `offset` elements into its storage: a
    pointer that is not 16-byte aligned, for kernels with vectorised loads."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t.detach())
    assert view.is_contiguous() and view.storage_offset() == offset
    return view


def poison_allocator(device: str, nbytes: int = 1 << 24) -> None:
    """Leave NaN-filled memory in the allocator's cache, so that an output the op
    allocates but forgets to write is likely to hold NaN rather than zeros.

    Effective with the CUDA caching allocator; on the CPU the next allocation may or
    may not reuse the block (large ones come fresh, zeroed, from the OS).
    """
    junk = torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device)
    del junk


def routing_mask(B: int, T: int, pattern: str, device: str, density: float = 0.5) -> torch.Tensor:
    """A (B, T) routing mask.

    pattern: "random" (each token with probability `density`, at least one per row),
    "none" (counts = 0), "all" (counts = T), "first" (only position 0), "last" (only T-1),
    "mixed" (rows cycle through none, all, first, last, first+last, random).
    """
    if pattern == "random":
        mask = torch.rand(B, T, device=device) < density
        empty = ~mask.any(dim=1)
        mask[empty, torch.randint(T, (1,)).item()] = True
        return mask
    if pattern == "none":
        return torch.zeros(B, T, dtype=torch.bool, device=device)
    if pattern == "all":
        return torch.ones(B, T, dtype=torch.bool, device=device)
    if pattern in ("first", "last"):
        mask = torch.zeros(B, T, dtype=torch.bool, device=device)
        mask[:, 0 if pattern == "first" else T - 1] = True
        return mask
    if pattern == "mixed":
        rows = []
        kinds = ["none", "all", "first", "last", "ends", "random"]
        for b in range(B):
            kind = kinds[b % len(kinds)]
            if kind == "ends":
                row = torch.zeros(1, T, dtype=torch.bool, device=device)
                row[0, 0] = row[0, T - 1] = True
            else:
                row = routing_mask(1, T, kind, device, density)
            rows.append(row)
        return torch.cat(rows)
    raise ValueError(pattern)


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch from the test's node id: fresh inputs per test, reproducible runs."""
    base = int(os.environ.get("CRAM_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) + base)
    yield


@pytest.fixture
def debug_mode():
    """Turn cram_ext's index validation on for one test and restore it afterwards."""
    from cram_ext import ops

    saved = ops._debug
    cram_ext.set_debug(True)
    try:
        yield
    finally:
        cram_ext.set_debug(saved)


@pytest.fixture(autouse=True)
def _debug_untouched():
    """No test may leave the debug flag changed."""
    from cram_ext import ops

    saved = ops._debug
    yield
    assert ops._debug == saved, "a test left cram_ext.set_debug changed"
