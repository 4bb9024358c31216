"""Shared pieces of the benchmarks: timing, records, environment, flags, tables, JSON.

Timing: the median of many runs after a warm-up.
  * CUDA: our own CUDA-event loop (the same scheme as triton.testing.do_bench with
    return_mode="median": L2 flushed by zeroing a 256 MiB buffer before every run,
    events recorded around the call only), but with a floor on the number of runs
    so that slow configurations still get a real median.
  * CPU: time.perf_counter around each call, many repeats.

Records (one dict per measurement, the exact schema of bench/README.md):
  bench, impl, pass, shape, density, dtype, ms, bytes, flops, device, torch, commit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16', 'float32', ... (torch.bfloat16 -> 'bfloat16')."""
    return str(dtype).removeprefix("torch.")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------- environment


def resolve_device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if arg == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    return torch.device(arg)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


def git_commit() -> str:
    """git rev-parse HEAD, plus '-dirty' when the tree has changes (bench/results/ excluded).

    CRAM_COMMIT overrides it, for copies of the tree without .git (the device machine)."""
    if os.environ.get("CRAM_COMMIT"):
        return os.environ["CRAM_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_DIR, capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return sha + "-dirty?"
    changed = [line for line in status.splitlines() if line.strip() and "bench/results/" not in line]
    return sha + ("-dirty" if changed else "")


@dataclass
class Env:
    device: torch.device
    device_name: str
    torch: str
    commit: str

    @classmethod
    def detect(cls, device: torch.device) -> "Env":
        return cls(device, device_name(device), torch.__version__, git_commit())


# ---------------------------------------------------------------------- timing


@dataclass
class TimingConfig:
    warmup_ms: float
    rep_ms: float
    min_reps: int
    max_reps: int


def timing_config(device: torch.device, quick: bool, rep_ms: float | None = None) -> TimingConfig:
    if device.type == "cuda":
        cfg = TimingConfig(warmup_ms=10, rep_ms=25, min_reps=5, max_reps=100) if quick else TimingConfig(
            warmup_ms=50, rep_ms=200, min_reps=10, max_reps=1000
        )
    else:
        cfg = TimingConfig(warmup_ms=0, rep_ms=40, min_reps=3, max_reps=20) if quick else TimingConfig(
            warmup_ms=100, rep_ms=600, min_reps=5, max_reps=200
        )
    if rep_ms is not None:
        cfg.rep_ms = rep_ms
    return cfg


_l2_flush_buffer: torch.Tensor | None = None


def _flush_buffer(device: torch.device) -> torch.Tensor:
    global _l2_flush_buffer
    if _l2_flush_buffer is None or _l2_flush_buffer.device != device:
        # 256 MiB: several times the L2 of an H100/H200 (50/60 MB); do_bench uses the same size.
        _l2_flush_buffer = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    return _l2_flush_buffer


def _median_cuda(fn: Callable[[], Any], device: torch.device, cfg: TimingConfig) -> float:
    cache = _flush_buffer(device)
    fn()
    torch.cuda.synchronize(device)
    # Estimate the time of one call (flush included: errs towards fewer runs).
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    n_warmup = max(1, int(cfg.warmup_ms / estimate))
    n_reps = min(cfg.max_reps, max(cfg.min_reps, int(cfg.rep_ms / estimate)))
    for _ in range(n_warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
    for i in range(n_reps):
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _median_cpu(fn: Callable[[], Any], cfg: TimingConfig) -> float:
    t0 = time.perf_counter()
    fn()  # first call: warm-up and estimate
    estimate_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(min(50, int(cfg.warmup_ms / estimate_ms))):
        fn()
    n_reps = min(cfg.max_reps, max(cfg.min_reps, int(cfg.rep_ms / estimate_ms)))
    times = []
    for _ in range(n_reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure_ms(fn: Callable[[], Any], device: torch.device, cfg: TimingConfig) -> float:
    """Median milliseconds of fn() after a warm-up (CUDA events on a GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        return _median_cuda(fn, device, cfg)
    return _median_cpu(fn, cfg)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------- records


def make_record(
    env: Env,
    *,
    bench: str,
    impl: str,
    pass_: str,
    shape: dict,
    density: float | None,
    dtype: torch.dtype | str,
    ms: float,
    bytes_: int | None = None,
    flops: float | None = None,
) -> dict:
    return {
        "bench": bench,
        "impl": impl,
        "pass": pass_,
        "shape": dict(shape),
        "density": None if density is None else float(density),
        "dtype": dtype if isinstance(dtype, str) else dtype_name(dtype),
        "ms": float(ms),
        "bytes": None if bytes_ is None else int(bytes_),
        "flops": None if flops is None else float(flops),
        "device": env.device_name,
        "torch": env.torch,
        "commit": env.commit,
    }


def copy_bandwidth_record(env: Env, cfg: TimingConfig, quick: bool) -> dict:
    """One large device-to-device copy (dst.copy_(src)); bytes = read + written."""
    if env.device.type == "cuda":
        n = (64 if quick else 1024) * 1024 * 1024  # 1 GiB buffer: 2 GiB moved
    else:
        n = (32 if quick else 256) * 1024 * 1024
    src = torch.empty(n, dtype=torch.uint8, device=env.device).random_(0, 256)
    dst = torch.empty_like(src)
    ms = measure_ms(lambda: dst.copy_(src), env.device, cfg)
    rec = make_record(
        env, bench="copy", impl="torch_copy", pass_="fwd", shape={"N": n}, density=None,
        dtype=torch.uint8, ms=ms, bytes_=2 * n, flops=None,
    )
    del src, dst
    return rec


def gbps(rec: dict) -> float | None:
    if rec.get("bytes") is None or not rec["ms"]:
        return None
    return rec["bytes"] / (rec["ms"] * 1e-3) / 1e9


def tflops(rec: dict) -> float | None:
    if rec.get("flops") is None or not rec["ms"]:
        return None
    return rec["flops"] / (rec["ms"] * 1e-3) / 1e12


class Sink:
    """Collects a run's records and rewrites the whole list to the JSON file after each one,
    so that a run cut short (timeout, crash) still leaves everything measured so far."""

    def __init__(self, path: Path, append: bool = False):
        self.path = Path(path)
        self.records: list[dict] = []
        self.t0 = time.perf_counter()
        if append and self.path.exists():
            with open(self.path) as f:
                self.records = list(json.load(f))
            print(f"--append: {len(self.records)} earlier records from {self.path}")

    def add(self, rec: dict) -> dict:
        self.records.append(rec)
        self.write()
        return rec

    def write(self) -> None:
        write_json(self.records, self.path)


def write_json(records: list[dict], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def default_out_path(bench_file: str, env: Env, quick: bool) -> Path:
    """bench/results/<bench>_<device-slug>.json (…_quick.json for --quick, so smoke runs
    never overwrite real results)."""
    suffix = "_quick" if quick else ""
    return RESULTS_DIR / f"{bench_file}_{device_slug(env.device_name)}{suffix}.json"


# ----------------------------------------------------------------------- flags


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few runs (CI smoke test)")
    p.add_argument("--dtype", default=None, help="comma list (bf16,fp16,fp32,fp64); default depends on the device")
    p.add_argument("--pass", dest="passes", default="both", choices=["fwd", "fwd_bwd", "both"])
    p.add_argument("--impl", default=None, help="comma list of implementations to run (default: all that apply)")
    p.add_argument("--shape", action="append", default=None, help="override the shapes (repeatable), see --help of each bench")
    p.add_argument("--rep-ms", type=float, default=None, help="time budget of the timed runs per measurement")
    p.add_argument("--out", default=None, help="JSON output path (default bench/results/<bench>_<device>.json)")
    p.add_argument("--append", action="store_true",
                   help="keep the records already in the output file and add this run's (split a long run)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    return p


def parse_passes(arg: str) -> list[str]:
    return ["fwd", "fwd_bwd"] if arg == "both" else [arg]


def parse_dtypes(arg: str | None, default: Sequence[torch.dtype]) -> list[torch.dtype]:
    if not arg:
        return list(default)
    out = []
    for name in arg.split(","):
        name = name.strip().lower()
        if name not in DTYPES:
            raise SystemExit(f"--dtype: unknown dtype {name!r}; choose from {sorted(DTYPES)}")
        out.append(DTYPES[name])
    return out


def parse_impls(arg: str | None, default: Sequence[str], known: Iterable[str]) -> list[str]:
    if not arg:
        return list(default)
    known = list(known)
    out = [s.strip() for s in arg.split(",") if s.strip()]
    bad = [s for s in out if s not in known]
    if bad:
        raise SystemExit(f"--impl: unknown {bad}; choose from {known}")
    return out


def parse_shapes(args_shape: list[str] | None, keys: Sequence[str], default: list[dict],
                 optional: dict | None = None) -> list[dict]:
    """--shape '2,16,8192,128' -> dict(zip(keys, ints)); extra optional keys may follow."""
    if not args_shape:
        return default
    optional = optional or {}
    all_keys = list(keys) + list(optional)
    shapes = []
    for s in args_shape:
        vals = [int(v) for v in re.split(r"[,x ]+", s.strip()) if v]
        if not len(keys) <= len(vals) <= len(all_keys):
            raise SystemExit(f"--shape {s!r}: expected {len(keys)} to {len(all_keys)} ints ({','.join(all_keys)})")
        shapes.append(dict(zip(all_keys, vals)))
    return shapes


def setup_torch(threads: int | None = None, compiling: bool = False) -> None:
    """Thread count; when torch.compile will be used, many recompiles allowed (one per
    shape/dtype/pass). Dynamo is imported only then (importing it costs ~1.5 s)."""
    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*TF32.*")
    if not compiling:
        return
    try:
        import torch._dynamo.config as dconf

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dconf, name):
                setattr(dconf, name, max(256, getattr(dconf, name)))
        if hasattr(dconf, "accumulated_recompile_limit"):
            dconf.accumulated_recompile_limit = max(4096, dconf.accumulated_recompile_limit)
    except Exception:  # torch without dynamo config: nothing to raise
        pass


# ------------------------------------------------------------------ robustness


class Fatal(RuntimeError):
    """A device error after which nothing else can run (the CUDA context is poisoned)."""


_DEVICE_ERROR_MARKERS = ("CUDA error", "illegal memory access", "unspecified launch failure", "device-side assert",
                         "misaligned address", "illegal instruction", "CUBLAS_STATUS_EXECUTION_FAILED")


def is_fatal(exc: BaseException) -> bool:
    """A device error that left the CUDA context unusable (sticky: illegal address, device assert,
    ...). A non-sticky CUDA error (e.g. a bad launch configuration) is not fatal: we probe the
    device with a tiny kernel and a sync, and only a failing probe stops the run."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accel = getattr(torch, "AcceleratorError", None)
    looks = (accel is not None and isinstance(exc, accel)) or any(m in str(exc) for m in _DEVICE_ERROR_MARKERS)
    if not looks or not torch.cuda.is_available():
        return False
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
        torch.cuda.synchronize()
        return False
    except Exception:  # noqa: BLE001
        return True


def short_error(exc: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(exc).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(exc).__name__}: {msg}"


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class Runner:
    """Runs one implementation's measurement, turning failures into notes.

    - NotImplementedError (e.g. no CUDA kernel registered for a cram op, or no backward):
      that (impl, pass) is disabled for the rest of the run, one note printed.
    - another exception (OOM, a compile failure, an unsupported shape): that one
      measurement is skipped with a note.
    - a device error that poisons the CUDA context: Fatal, the run stops (the JSON
      written so far stays).
    """

    def __init__(self, env: Env, sink: Sink, cfg: TimingConfig):
        self.env, self.sink, self.cfg = env, sink, cfg
        self.disabled: dict[tuple[str, str], str] = {}
        self.notes: list[str] = []

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        print(f"  note: {msg}", flush=True)

    def enabled(self, impl: str, pass_: str | None = None) -> bool:
        """Whether (impl, pass_) may still run; pass_=None: whether any pass of impl may."""
        if pass_ is not None:
            return (impl, pass_) not in self.disabled
        return not all((impl, p) in self.disabled for p in ("fwd", "fwd_bwd"))

    def disable(self, impl: str, pass_: str | None, why: str) -> None:
        """Disable (impl, pass_) for the rest of the run; pass_=None: every pass."""
        for p in ("fwd", "fwd_bwd") if pass_ is None else (pass_,):
            if (impl, p) not in self.disabled:
                self.disabled[(impl, p)] = why
                self.note(f"{impl} {p}: disabled for this run ({why})")

    def time(self, impl: str, pass_: str, label: str, fn: Callable[[], Any],
             make: Callable[[float], dict]) -> dict | None:
        """Probe fn once, time it, add make(ms) to the sink. Returns the record or None."""
        if not self.enabled(impl, pass_):
            return None
        label = f"{pass_} {label}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
                synchronize(self.env.device)
                ms = measure_ms(fn, self.env.device, self.cfg)
        except NotImplementedError as e:
            self.disable(impl, pass_, short_error(e))
            return None
        except Exception as e:  # noqa: BLE001 - every failure becomes a note
            if is_fatal(e):
                raise Fatal(f"{impl} {label}: {short_error(e, 400)}") from e
            self.note(f"{impl} {label}: skipped ({short_error(e)})")
            try:
                free_memory(self.env.device)
            except Exception as e2:  # noqa: BLE001
                raise Fatal(f"{impl} {label}: device unusable after error ({short_error(e2)})") from e2
            return None
        rec = self.sink.add(make(ms))
        print(f"  {impl:<26} {label:<44} {ms:10.4f} ms{_rate(rec)}", flush=True)
        return rec


def _rate(rec: dict) -> str:
    parts = []
    t = tflops(rec)
    if t is not None:
        parts.append(f"{t:8.4g} TFLOP/s")
    g = gbps(rec)
    if g is not None:
        parts.append(f"{g:8.4g} GB/s")
    return ("  " + "  ".join(parts)) if parts else ""


# ---------------------------------------------------------------------- tables


def fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return format(v, spec)
    return str(v)


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    print(line)
    for r in cells[1:]:
        print("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


def _numeric(s: str) -> bool:
    try:
        float(s.rstrip("x%"))
        return True
    except ValueError:
        return False


def print_bandwidth_table(records: list[dict], title: str) -> None:
    """Every non-copy record with ms, GB/s and the fraction of the copy bandwidth of the run."""
    copy = [r for r in records if r["bench"] == "copy"]
    copy_bw = gbps(copy[-1]) if copy else None  # the latest copy record (--append may bring older ones)
    rows = []
    for r in records:
        if r["bench"] == "copy":
            continue
        bw = gbps(r)
        frac = (bw / copy_bw) if (bw is not None and copy_bw) else None
        rows.append([shape_str(r["shape"]), r["dtype"], r["pass"], r["impl"], fmt(r["ms"], ".4f"),
                     fmt(bw, ".4g"), "-" if frac is None else f"{100 * frac:.1f}%"])
    if copy_bw is not None:
        title += f"   (copy bandwidth {copy_bw:.1f} GB/s, {copy[-1]['bytes'] / 2**30:.2f} GiB moved)"
    print_table(["shape", "dtype", "pass", "impl", "ms", "GB/s", "of copy"], rows, title)


def print_speedups(records: list[dict], bench: str, baselines: Sequence[str], title: str,
                   match_density: Sequence[str] = ()) -> None:
    """For every cram record: baseline_ms / cram_ms (> 1: cram faster) for each baseline of the
    same shape, dtype and pass. Baselines in match_density are matched on density too
    (e.g. flex_gathered); the others are dense (density None)."""
    cram = [r for r in records if r["bench"] == bench and r["impl"] == "cram"]
    if not cram:
        return
    present = [b for b in baselines if any(r["impl"] == b for r in records)]
    if not present:
        return
    with_density = any(c["density"] is not None for c in cram)
    rows = []
    for c in cram:
        row = [shape_str(c["shape"]), c["dtype"], c["pass"]] + ([fmt(c["density"])] if with_density else []) + [
            fmt(c["ms"], ".4f")]
        for b in present:
            match = [r for r in records if r["bench"] == bench and r["impl"] == b and r["shape"] == c["shape"]
                     and r["dtype"] == c["dtype"] and r["pass"] == c["pass"]
                     and (r["density"] == c["density"] if b in match_density else True)]
            row.append(f"{match[0]['ms'] / c['ms']:.2f}x" if match else "-")
        rows.append(row)
    headers = ["shape", "dtype", "pass"] + (["density"] if with_density else []) + ["cram ms"]
    print_table(headers + [f"{b}/cram" for b in present], rows, title)


def finish(sink: Sink, runner: Runner) -> None:
    sink.write()
    print(f"\nwrote {len(sink.records)} records to {sink.path} ({time.perf_counter() - sink.t0:.0f} s)")
    if runner.disabled:
        for (impl, pass_), why in runner.disabled.items():
            print(f"not measured: {impl} {pass_} ({why})")
