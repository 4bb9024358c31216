"""scripts/run_many.py: runs side by side, each recorded with its status and curve; the
trade-off plot of analysis reads its results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cram_ext.analysis import plot_tradeoff, routing_kind

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--task", "lm", "--model", "transformer", "--layers", "1", "--d-model", "16", "--heads", "2", "--seq-len",
        "16", "--batch-size", "2", "--steps", "4", "--eval-every", "2", "--eval-examples", "4", "--device", "cpu",
        "--no-transfer"]


def _run_many(tmp_path: Path, runs: list[dict], *flags: str) -> list[dict]:
    """scripts/run_many.py over `runs` with `flags`; its results.json."""
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    subprocess.run([sys.executable, "scripts/run_many.py", str(spec), "--out", str(tmp_path / "out"), *flags],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    return json.loads((tmp_path / "out" / "results.json").read_text())


def test_runs_are_collected_with_status_and_curve(tmp_path):
    runs = [{"name": "dense", "args": TINY + ["--attention", "sdpa"]},
            {"name": "static", "args": TINY + ["--routing", "static", "--budget", "0.5"]},
            {"name": "broken", "args": TINY + ["--steps", "0"]}]
    results = {r["name"]: r for r in _run_many(tmp_path, runs, "--jobs", "2")}
    assert results["dense"]["status"] == "ok" and results["static"]["status"] == "ok"
    assert results["broken"]["status"] == "exit 2" and "positive" in results["broken"]["log_tail"]
    assert [e["step"] for e in results["static"]["eval"]] == [0, 2, 4]
    assert results["static"]["eval"][-1]["eval_utilization"] == 0.5
    assert results["dense"]["summary"]["eval_bpb"] > 0
    png = plot_tradeoff(list(results.values()), tmp_path / "tradeoff.png")
    assert png.stat().st_size > 1000


def test_only_runs_the_named_runs(tmp_path):
    runs = [{"name": "dense-s0", "args": TINY + ["--attention", "sdpa"]},
            {"name": "dense-s1", "args": TINY + ["--attention", "sdpa", "--seed", "1"]},
            {"name": "none-s0", "args": TINY + ["--routing", "none"]}]
    assert sorted(r["name"] for r in _run_many(tmp_path, runs, "--only", "*-s0")) == ["dense-s0", "none-s0"]


def test_routing_kind_from_the_command():
    assert routing_kind("python -m cram_ext.train --attention sdpa") == "dense"
    assert routing_kind("python -m cram_ext.train --routing static --budget 0.2") == "static"
    assert routing_kind("python -m cram_ext.train --routing none") == "none"
    assert routing_kind("python -m cram_ext.train --target loss") == "learned"
