"""Build of cram_ext: C++ CPU ops always, CUDA ops when torch has CUDA and nvcc is found.

Environment:
  CRAM_FORCE_CPU=1         skip the CUDA ops even where they could be built
  TORCH_CUDA_ARCH_LIST     CUDA archs to build ("9.0a", "8.0;9.0a", "+PTX" suffix honoured);
                           default: the visible GPUs' archs, or 9.0a when none is visible
  CUTLASS_PATH             a CUTLASS checkout to use instead of the nvidia-cutlass package
  MAX_JOBS                 parallel compile jobs (ninja)
"""

import glob
import os
import re
import subprocess
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "cram_ext builds against an installed PyTorch, and none was found.\n"
        "Install torch first (pip install torch), then build cram_ext without build isolation:\n"
        "    pip install --no-build-isolation ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "**", pattern), recursive=True))


def _want_cuda() -> bool:
    if os.environ.get("CRAM_FORCE_CPU", "0") not in ("", "0"):
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _cuda_archs() -> list[str]:
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if arch_list:
        return [a for a in re.split(r"[;\s,]+", arch_list) if a]
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        # Hopper gets its arch-specific target (wgmma, setmaxnreg live only in sm_90a).
        return sorted(f"{major}.{minor}{'a' if (major, minor) == (9, 0) else ''}" for major, minor in caps)
    return ["9.0a"]


def _gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _nvcc_version() -> str:
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


def _cutlass_include() -> tuple[list[str], str]:
    """CUTLASS/CuTe include dirs and version, from CUTLASS_PATH or the nvidia-cutlass package."""
    root = os.environ.get("CUTLASS_PATH")
    if not root:
        try:
            import cutlass_library

            root = cutlass_library.source_path
        except (ImportError, AttributeError):
            return [], ""
    include = os.path.join(root, "include")
    version_h = os.path.join(include, "cutlass", "version.h")
    if not os.path.exists(version_h):
        return [], ""
    text = open(version_h).read()
    parts = [re.search(rf"#define CUTLASS_{k} (\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    version = ".".join(m.group(1) for m in parts if m)
    return [include, os.path.join(root, "tools", "util", "include")], version


def _extension():
    # -fno-trapping-math lets gcc if-convert (and so vectorise) loops with float compares.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if not _want_cuda():
        return cpp_extension.CppExtension(
            "cram_ext._C",
            _sources("*.cpp"),
            include_dirs=[CSRC],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    archs = _cuda_archs()
    cutlass_dirs, cutlass_version = _cutlass_include()
    if not cutlass_dirs:  # the CUDA kernels include CuTe: say so here, not as a missing header mid-build
        raise RuntimeError("the CUDA build needs the CUTLASS/CuTe headers: pip install nvidia-cutlass (on a machine "
                           "without internet, install its wheel from a local folder), or set CUTLASS_PATH to a "
                           "CUTLASS checkout; CRAM_FORCE_CPU=1 builds the CPU ops only")
    defines = [
        "-DCRAM_WITH_CUDA",
        f'-DCRAM_CUDA_ARCHS="{";".join(archs)}"',
        f'-DCRAM_CUDA_VERSION="{_nvcc_version()}"',
        f'-DCRAM_CUTLASS_VERSION="{cutlass_version}"',
    ]
    nvcc_flags = [
        "-O3",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "--use_fast_math",
        f"--threads={os.environ.get('NVCC_THREADS', '4')}",
        *_gencode_flags(archs),
    ]
    return cpp_extension.CUDAExtension(
        "cram_ext._C",
        _sources("*.cpp") + _sources("*.cu"),
        include_dirs=[CSRC, *cutlass_dirs],
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags + defines},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
