"""Fuzz the CUDA ops at scale: seeded random cases from fuzz_space.py, each checked against
the reference, in many processes, optionally each under compute-sanitizer.

    # 10,000 cases per op in 14 processes under memcheck; JSON summary to fuzz.json
    python python_tests/cuda_fuzz.py --cases 10000 --jobs 14 --sanitizer memcheck --out fuzz.json
    # a time budget per op instead: stop starting cases after 150 s, report how many ran
    python python_tests/cuda_fuzz.py --cases 100000 --jobs 14 --time-budget 150
    # reproduce case 1234 of op attention, seed 0, in this process
    python python_tests/cuda_fuzz.py --ops attention --case 1234

Case i of an op is drawn from random.Random(f"{op}-{seed}-{i}"), so it is the same in every
process. Each worker process stops at its first failure (a CUDA error is sticky: it poisons
every later call in the process); the driver records it and starts a fresh worker at the
next case. One case in --malformed-rate of routed_attention gets a malformed routing (no
reference to match: under memcheck it checks that no kernel touches memory out of bounds).
Under a sanitizer, PyTorch's caching allocator is off, so every tensor is its own
allocation and an access past its end is reported. Exits 1 on any mismatch, exception or
sanitizer error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SANITIZER_SUMMARY = re.compile(r"(?:ERROR|RACECHECK) SUMMARY: (\d+) (?:errors?|hazards?)")


def draw(op: str, seed: int, i: int, malformed_rate: int, device: str):
    """Case i of op for this seed: the same in every process."""
    from fuzz_space import OPS, RandomDraw, draw_attention_case

    d = RandomDraw(f"{op}-{seed}-{i}")
    return draw_attention_case(d, device, malformed_rate) if op == "attention" else OPS[op][0](d, device)


def worker(args: argparse.Namespace) -> int:
    """Run cases args.first, args.first + args.step, ... < args.cases of one op, writing
    `start i`, `ok i` or `fail i <json>` lines to args.status. Exit 1 at the first failure."""
    import torch

    from fuzz_space import OPS

    torch.set_num_threads(1)  # many workers share the host's cores
    check = OPS[args.ops][1]
    deadline = time.time() + args.time_budget if args.time_budget else None
    with open(args.status, "a", buffering=1) as status:
        for i in range(args.first, args.cases, args.step):
            if deadline is not None and time.time() > deadline:
                break
            status.write(f"start {i}\n")
            case = draw(args.ops, args.seed, i, args.malformed_rate, args.device)
            try:
                check(case, args.device)
                if args.device == "cuda":
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001  (a failure of any kind is a finding)
                record = {"op": args.ops, "case": i, "seed": args.seed, "what": str(case),
                          "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                status.write(f"fail {i} {json.dumps(record)}\n")
                return 1
            status.write(f"ok {i}\n")
    return 0


def run_shard(args, op: str, shard: int, tmp: Path, deadline: float | None) -> dict:
    """Drive one shard (cases shard, shard + jobs, ...) to its end, restarting the worker
    after each failure. Returns counts and failures."""
    status = tmp / f"{op}-{shard}.status"
    log = tmp / f"{op}-{shard}.log"
    first, result = shard, {"ok": 0, "failures": [], "sanitizer_errors": 0, "sanitizer_reports": 0, "logs": []}
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    prefix = []
    if args.sanitizer != "none":
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
        prefix = ["compute-sanitizer", "--tool", args.sanitizer, "--error-exitcode", "3"]
        if args.sanitizer == "memcheck":
            prefix += ["--leak-check", "no"]
    while first < args.cases:
        budget = [] if deadline is None else ["--time-budget", str(max(1.0, deadline - time.time()))]
        if deadline is not None and time.time() > deadline:
            break
        status.write_text("")
        cmd = prefix + [sys.executable, __file__, "--worker", "--device", args.device, "--ops", op,
                        "--seed", str(args.seed),
                        "--cases", str(args.cases), "--first", str(first), "--step", str(args.jobs),
                        "--malformed-rate", str(args.malformed_rate), "--status", str(status), *budget]
        with open(log, "a") as out:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        lines = status.read_text().splitlines()
        result["ok"] += sum(line.startswith("ok ") for line in lines)
        started = [int(line.split()[1]) for line in lines if line.startswith("start ")]
        failed = [json.loads(line.split(" ", 2)[2]) for line in lines if line.startswith("fail ")]
        text = log.read_text(errors="replace")
        reports = SANITIZER_SUMMARY.findall(text)  # one per worker process of the shard (one log)
        result["sanitizer_errors"] = sum(int(n) for n in reports)
        result["sanitizer_reports"] = len(reports)
        if rc == 0 and not failed:
            break
        if failed:
            result["failures"].extend(failed)
        elif started and f"ok {started[-1]}" in lines:  # every case passed; the exit came after them
            result["failures"].append({"op": op, "case": None, "error": f"worker exit code {rc} after its last case",
                                       "log_tail": text[-1500:]})
            result["logs"].append(text[-4000:])
            break
        elif started:  # killed by the sanitizer or a crash while running a case
            i = started[-1]
            result["failures"].append({"op": op, "case": i, "seed": args.seed, "error": f"worker exit code {rc}",
                                        "what": str(draw(op, args.seed, i, args.malformed_rate, args.device))})
        else:
            result["failures"].append({"op": op, "case": None, "error": f"worker exit code {rc} before any case"})
            break
        result["logs"].append(text[-4000:])
        first = (started[-1] if started else first) + args.jobs
    return result


def driver(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    ops = args.ops.split(",")
    t0 = time.time()
    summary = {"seed": args.seed, "cases_asked": args.cases, "jobs": args.jobs, "sanitizer": args.sanitizer,
               "malformed_rate": args.malformed_rate, "ops": {}}
    with tempfile.TemporaryDirectory() as d, ThreadPoolExecutor(args.jobs) as pool:
        for op in ops:  # op after op: each gets the whole machine for up to --time-budget seconds
            deadline = time.time() + args.time_budget if args.time_budget else None
            shards = list(pool.map(lambda s: run_shard(args, op, s, Path(d), deadline), range(args.jobs)))
            failures = [f for s in shards for f in s["failures"]]
            summary["ops"][op] = {
                "passed": sum(s["ok"] for s in shards),
                "failed": len(failures),
                "sanitizer_errors": sum(s["sanitizer_errors"] for s in shards),
                # worker processes whose sanitizer printed its summary: proof that it ran
                "sanitizer_reports": sum(s["sanitizer_reports"] for s in shards),
                "failures": failures[:50],
                "logs": [log for s in shards for log in s["logs"]][:5],
            }
            r = summary["ops"][op]
            print(f"{op:10s} passed {r['passed']:6d}  failed {r['failed']:4d}  sanitizer errors "
                  f"{r['sanitizer_errors']:4d}  ({time.time() - t0:.0f} s)", flush=True)
            for f in failures[:10]:
                print(f"  case {f['case']}: {f.get('what', '')}\n    {f['error'][:500]}")
                if "log_tail" in f:  # the worker's own words, in case the JSON never gets written
                    print("    " + f["log_tail"].replace("\n", "\n    "))
    summary["wall_s"] = round(time.time() - t0, 1)
    try:
        import torch

        import cram_ext

        summary["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        summary["torch"], summary["cuda"] = torch.__version__, torch.version.cuda
        summary["build"] = cram_ext.build_info()
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bench.environment import git_commit  # CRAM_COMMIT names the commit of a copy without .git

        summary["commit"] = git_commit()
    except Exception as e:  # noqa: BLE001
        summary["environment_error"] = repr(e)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))
    bad = any(r["failed"] or r["sanitizer_errors"] for r in summary["ops"].values())
    if args.sanitizer != "none" and not all(r["sanitizer_reports"] for r in summary["ops"].values()):
        print(f"no {args.sanitizer} summary was found in the workers' output: the sanitizer did not run")
        bad = True
    return 1 if bad else 0


def reproduce(args: argparse.Namespace) -> int:
    from fuzz_space import OPS

    case = draw(args.ops, args.seed, args.case, args.malformed_rate, args.device)
    print(case)
    OPS[args.ops][1](case, args.device)
    print("passed")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", default="scan,route,attention,decode,metaplastic", help="comma-separated: scan, route, attention, decode, metaplastic")
    p.add_argument("--cases", type=int, default=1000, help="cases per op (ids 0 .. cases-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the same cases on the CPU ops")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="worker processes")
    p.add_argument("--sanitizer", choices=["none", "memcheck", "racecheck"], default="none")
    p.add_argument("--malformed-rate", type=int, default=8, help="one attention case in N has a malformed routing")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds per op after which no case of that op is started")
    p.add_argument("--out", help="JSON summary")
    p.add_argument("--case", type=int, default=None, help="run this one case here and print it")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--step", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--status", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.case is not None:
        return reproduce(args)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
