"""cram_ext.build_info() describes what this binary contains, and the ops are registered
for exactly the backends it names."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA_SKIP

import cram_ext

OPS = [
    "gated_scan",
    "gated_scan_backward",
    "route",
    "route_backward",
    "routed_attention",
    "routed_attention_backward",
]


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"cram::{op}", key)


def test_keys_and_types():
    info = cram_ext.build_info()
    assert set(info) == {"backends", "cuda_archs", "cuda_version", "cutlass_version", "torch"}
    assert isinstance(info["backends"], list) and all(isinstance(b, str) for b in info["backends"])
    for key in ("cuda_archs", "cuda_version", "cutlass_version", "torch"):
        assert isinstance(info[key], str), key
    assert info["torch"] == torch.__version__


def test_cpu_always_built():
    info = cram_ext.build_info()
    assert info["backends"][0] == "cpu"
    assert set(info["backends"]) <= {"cpu", "cuda"} and len(set(info["backends"])) == len(info["backends"])
    for op in OPS:
        assert _has_kernel(op, "CPU"), f"cram::{op} has no CPU kernel"


def test_cuda_listed_iff_compiled():
    """"cuda" is listed exactly when the binary holds CUDA kernels, and then for every op;
    the CUDA fields are filled in exactly then."""
    info = cram_ext.build_info()
    with_cuda = "cuda" in info["backends"]
    registered = {op: _has_kernel(op, "CUDA") for op in OPS}
    if with_cuda:
        missing = [op for op, has in registered.items() if not has]
        assert not missing, f"build_info lists cuda but these ops have no CUDA kernel: {missing}"
        assert info["cuda_archs"] and info["cuda_version"] and info["cutlass_version"]
        assert torch.version.cuda is not None, "a CUDA build of cram_ext under a CPU-only torch"
    else:
        extra = [op for op, has in registered.items() if has]
        assert not extra, f"build_info omits cuda but these ops have a CUDA kernel: {extra}"
        assert info["cuda_archs"] == info["cuda_version"] == info["cutlass_version"] == ""


def test_version():
    """One version: cram_ext/_version.py, which the installed metadata (pyproject.toml's dynamic
    version) and cram_ext.__version__ both read."""
    import importlib.metadata
    from pathlib import Path

    from cram_ext import _version

    assert isinstance(cram_ext.__version__, str) and cram_ext.__version__.count(".") == 2
    assert cram_ext.__version__ == _version.__version__ == importlib.metadata.version("cram_ext")
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.exists():  # a source checkout
        config = tomllib.loads(pyproject.read_text())
        assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
        assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cram_ext._version.__version__"}


@CUDA_SKIP
def test_cuda_built_where_a_gpu_is_visible():
    """On a GPU machine the CUDA tests must exercise CUDA kernels, not fail for want of them."""
    assert "cuda" in cram_ext.build_info()["backends"], "cram_ext was built without CUDA on a machine with a GPU"
