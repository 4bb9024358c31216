"""The instruction mix of a CUDA file's kernels, read from the SASS here, without a GPU.

    python scripts/sass_mix.py csrc/metaplastic_scan/metaplastic_scan_fwd.cu [--kernel fwd_kernel]
        [--match bfloat16] [--arch sm_90a] [--top 12]

Compiles FILE with the build's flags (setup.py: -O3, --use_fast_math, -lineinfo) to a cubin,
disassembles it with cuobjdump, and prints for each kernel whose mangled name contains every
--kernel / --match string: its registers and spills (ptxas), its instruction count, and for each
loop (a backward branch: the unrolled time loops of the scan kernels) its length and its most
frequent opcodes. A static count: it says what a loop body issues per iteration, not how often
each loop runs or where the warps stall (that is ncu's, on the device:
scripts/device_check.sh profile_metaplastic).

cuobjdump is not part of every CUDA install; `pip install nvidia-cuda-cuobjdump` brings it
(found on PATH, or in that package's nvidia/cu13/bin).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["-std=c++17", "-O3", "-lineinfo", "--use_fast_math", "--expt-relaxed-constexpr", "-DCRAM_WITH_CUDA"]


def find_cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for path in glob.glob(os.path.join(site, "nvidia", "cu*", "bin", "cuobjdump")):
            return path
    sys.exit("no cuobjdump: pip install nvidia-cuda-cuobjdump (or put the CUDA toolkit's bin on PATH)")


def compile_cubin(source: Path, arch: str, out: Path) -> dict[str, str]:
    """Builds the cubin; returns ptxas's register and spill line for each kernel."""
    # The csrc/ the file is in (a worktree's, when comparing two versions), else this repository's.
    csrc = next((d for d in source.resolve().parents if d.name == "csrc"), ROOT / "csrc")
    cmd = ["nvcc", *FLAGS, f"-arch={arch}", f"-I{csrc}", "-Xptxas", "-v", "-cubin", "-o", str(out), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-4000:])
    usage, current = {}, None
    for line in proc.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
        elif current and ("spill" in line or "Used" in line):
            usage[current] = (usage.get(current, "") + " " + line.split(":", 1)[-1].strip()).strip()
    return usage


def functions(sass: str):
    """(mangled name, [(address, instruction text)]) for each kernel in cuobjdump's output."""
    for block in sass.split("Function : ")[1:]:
        name = block.split("\n", 1)[0].strip()
        yield name, [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,6})\*/\s+(.*?) ;", block)]


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P[0-9T] ", "", text).split()[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path)
    p.add_argument("--kernel", default="", help="a part of the kernels' mangled names (e.g. fwd_kernel)")
    p.add_argument("--match", action="append", default=[], help="more parts the names must contain (e.g. bfloat16)")
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--top", type=int, default=12, help="opcodes shown per loop")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        usage = compile_cubin(a.source, a.arch, cubin)
        sass = subprocess.run([find_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    for name, code in functions(sass):
        if a.kernel not in name or not all(m in name for m in a.match):
            continue
        print(f"{name}\n  {usage.get(name, '')}\n  {len(code)} instructions")
        index = {addr: i for i, (addr, _) in enumerate(code)}
        for i, (addr, text) in enumerate(code):
            m = re.search(r"BRA (0x[0-9a-f]+)", text)
            if not m or int(m.group(1), 16) >= addr or int(m.group(1), 16) not in index:
                continue
            start = index[int(m.group(1), 16)]
            mix = collections.Counter(opcode(t) for _, t in code[start:i + 1])
            top = ", ".join(f"{op} {n}" for op, n in mix.most_common(a.top))
            print(f"  loop [{start}, {i}]: {i + 1 - start} instructions: {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
