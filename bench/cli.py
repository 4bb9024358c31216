"""The command line every bench shares (see bench/README.md), built from a bench's spec."""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

if TYPE_CHECKING:
    from .registry import Bench

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


def parser(spec: "Bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m bench.{spec.name}", description=spec.description)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few runs (CI smoke test)")
    p.add_argument("--dtype", default=None, help="comma list (bf16,fp16,fp32,fp64); default depends on the device")
    p.add_argument("--pass", dest="passes", default="both", choices=["fwd", "fwd_bwd", "both"])
    p.add_argument("--impl", default=None,
                   help=f"comma list of implementations to run (default: all that apply): {','.join(spec.impl_names)}")
    p.add_argument("--shape", action="append", default=None,
                   help=f"override the shapes (repeatable): {spec.shape_syntax}")
    if spec.densities:
        p.add_argument("--densities", default=None, help="comma list of routing densities")
    p.add_argument("--rep-ms", type=float, default=None, help="time budget of the timed runs per measurement")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", default=None,
                       help="JSON output path (default: a new file bench/runs/<bench>_<device>_<time>.json)")
    where.add_argument("--record", action="store_true",
                       help="write bench/results/<bench>_<device>.json, the records bench.report reads "
                            "(..._quick.json with --quick)")
    p.add_argument("--append", action="store_true",
                   help="keep the records already in the output file (--out or --record) and add this run's")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every measurement this many times, the impls' order alternating round by round, "
                        "and record the median of each (a shared CPU's speed drifts between measurements)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the accuracy check of every impl against the reference")
    for flags, kwargs in spec.flags:
        p.add_argument(*flags, **kwargs)
    return p


def parse_args(spec: "Bench", argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(spec)
    args = p.parse_args(argv)
    if args.append and not (args.out or args.record):
        p.error("--append adds to an existing file: give it --out PATH or --record")
    return args


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


def parse_shapes(args_shape: list[str], keys: Sequence[str], optional: Sequence[str] = ()) -> list[dict]:
    """--shape '2,16,8192,128' -> dict(zip(keys, ints)); the optional keys may follow."""
    all_keys = list(keys) + list(optional)
    shapes = []
    for s in args_shape:
        vals = [int(v) for v in re.split(r"[,x ]+", s.strip()) if v]
        if not len(keys) <= len(vals) <= len(all_keys):
            raise SystemExit(f"--shape {s!r}: expected {len(keys)} to {len(all_keys)} ints ({','.join(all_keys)})")
        shapes.append(dict(zip(all_keys, vals)))
    return shapes


def parse_floats(arg: str) -> list[float]:
    return [float(x) for x in arg.split(",") if x.strip()]
