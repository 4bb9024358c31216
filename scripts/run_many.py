"""Run many `python -m cram_ext.train` runs side by side on one machine and collect them.

    python scripts/run_many.py RUNS.json --out DIR [--jobs 8] [--time-budget 500] [--only 'mqar512-*' ...] [--resume]

RUNS.json is a list of {"name": ..., "args": [...train flags...]}. Each run writes to
DIR/<name> (with --force --no-progress added); DIR/results.json gathers every run's
command, summary and evaluation curve, and the log's tail when it failed. A run still going
when the budget ends is killed and recorded as such, with the curve it had. Each process
gets OMP_NUM_THREADS=1 (the trainer's --threads 1): many small runs share a GPU well, and
the host's cores go to the Python side of each.

--resume continues the runs of an earlier call in DIR (a run killed at its budget, from its
last checkpoint: pass the trainer's --ckpt-every in the runs' args to lose little) and leaves
the finished ones as they are, so that a set of runs longer than one call's time can go on in
the next call on the same machine.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cram_ext.analysis import read_metrics


def collect(name: str, args: list[str], run_dir: Path, status: str, wall_s: float) -> dict:
    record: dict = {"name": name, "command": "python -m cram_ext.train " + " ".join(args), "status": status,
                    "wall_s": round(wall_s, 1)}
    summary = run_dir / "summary.json"
    if summary.exists():
        record["summary"] = json.loads(summary.read_text())
    if (run_dir / "metrics.jsonl").exists():
        rows = read_metrics(run_dir)  # a run killed at the budget may have cut its last line short
        record["eval"] = [{k: v for k, v in r.items() if k == "step" or k.startswith(("eval_", "retrieval_"))}
                          for r in rows if "eval_utilization" in r]
        record["train_last"] = next((r for r in reversed(rows) if "loss" in r), None)
    if status != "ok":
        log = run_dir / "log.txt"
        record["log_tail"] = log.read_text()[-3000:] if log.exists() else ""
    return record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; then every run left is killed")
    p.add_argument("--only", nargs="+", metavar="PATTERN", help="run only the runs whose name matches a pattern")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished runs in --out from their checkpoints; keep the finished ones")
    a = p.parse_args()
    runs = json.loads(a.runs.read_text())
    if a.only:
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r["name"], pat) for pat in a.only)]
    a.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    pending, active, results = list(runs), {}, []
    while pending or active:
        while pending and len(active) < a.jobs:
            run = pending.pop(0)
            run_dir = a.out / run["name"]
            if a.resume and (run_dir / "summary.json").exists():
                results.append(collect(run["name"], run["args"], run_dir, "ok (finished before)", 0.0))
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "cram_ext.train", *run["args"], "--out", str(run_dir),
                   "--resume" if a.resume else "--force", "--no-progress"]
            log = open(run_dir / "log.txt", "a" if a.resume else "w")
            active[run["name"]] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), run, log,
                                   time.monotonic())
        time.sleep(1.0)
        over = time.monotonic() - t0 > a.time_budget
        for name, (proc, run, log, started) in list(active.items()):
            if proc.poll() is None and not over:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                status = "killed at the time budget"
            else:
                status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            log.close()
            del active[name]
            results.append(collect(name, run["args"], a.out / name, status, time.monotonic() - started))
            print(f"{name}: {status}, {results[-1]['wall_s']} s", flush=True)
        if over:
            for run in pending:
                results.append({"name": run["name"], "status": "not started (time budget)"})
            pending = []
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
