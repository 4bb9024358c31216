"""The JSON records of a run and where they are written.

One dict per measurement, the exact schema of bench/README.md:
  bench, impl, pass, shape, density, dtype, ms, bytes, flops, device, torch, commit.

A run writes to a new file of bench/runs/ (git-ignored) unless told otherwise:
--record writes bench/results/<bench>_<device>.json, the files `python -m bench.report`
reads; --out PATH writes PATH.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from .environment import Env

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RUNS_DIR = BENCH_DIR / "runs"


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16', 'float32', ... (torch.bfloat16 -> 'bfloat16')."""
    return str(dtype).removeprefix("torch.")


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


def gbps(rec: dict) -> float | None:
    if rec.get("bytes") is None or not rec["ms"]:
        return None
    return rec["bytes"] / (rec["ms"] * 1e-3) / 1e9


def tflops(rec: dict) -> float | None:
    if rec.get("flops") is None or not rec["ms"]:
        return None
    return rec["flops"] / (rec["ms"] * 1e-3) / 1e12


def output_path(name: str, env: Env, quick: bool, out: str | None = None, record: bool = False) -> Path:
    """out if given; with record, bench/results/<name>_<device-slug>.json (…_quick.json for
    --quick, which bench.report skips); else bench/runs/<name>_<device-slug>[_quick]_<time>.json."""
    if out:
        return Path(out)
    stem = f"{name}_{env.slug}" + ("_quick" if quick else "")
    if record:
        return RESULTS_DIR / f"{stem}.json"
    return RUNS_DIR / f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}.json"


def write_json(records: list[dict], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


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
        self.appended = len(self.records)  # records of earlier runs, before this run's

    def add(self, rec: dict) -> dict:
        self.records.append(rec)
        self.write()
        return rec

    def write(self) -> None:
        write_json(self.records, self.path)


def record_key(rec: dict) -> tuple:
    """What a record measured: two records with the same key are repeats of one measurement."""
    return (rec.get("bench"), rec.get("impl"), rec.get("pass"), json.dumps(rec.get("shape"), sort_keys=True),
            rec.get("density"), rec.get("dtype"))


def median_of_rounds(records: list[dict]) -> list[dict]:
    """One record per measurement, its ms the median over the rounds that measured it (in the
    order first measured); `ms_rounds` keeps every round's time. Rates derived from ms (bytes,
    flops) stay valid: they are per call, not per second."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault(record_key(rec), []).append(rec)
    merged = []
    for recs in groups.values():
        times = [r["ms"] for r in recs]
        rec = dict(recs[0], ms=statistics.median(times))
        if len(recs) > 1:
            rec["ms_rounds"] = times
        merged.append(rec)
    return merged

