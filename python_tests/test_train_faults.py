"""The trainer under faults: killed with SIGKILL and resumed it ends bitwise where an
uninterrupted run ends; a kill during a checkpoint write leaves the previous checkpoint
usable; a truncated or foreign checkpoint, a resume with other arguments and a new run
over an old one are refused with a message that says what to do."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import assert_same_state

from cram_ext import checkpoint, train

ARGS = ["--device", "cpu", "--no-progress", "--d-model", "32", "--heads", "2", "--seq-len", "48",
        "--num-stores", "4", "--num-queries", "2", "--num-keys", "24", "--num-recurring-pairs", "6",
        "--batch-size", "16", "--eval-examples", "64", "--log-every", "5", "--eval-every", "20",
        "--ckpt-every", "10", "--router-warmup", "15", "--no-transfer", "--steps", "60"]


def records(run):
    """metrics.jsonl without the wall-clock times."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def summary(run):
    return {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k != "wall_s"}


def assert_same_run(a, b):
    assert records(a) == records(b), "metrics differ"
    assert summary(a) == summary(b), "summaries differ"
    wa = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert_same_state(wa, wb)


def trainer(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return [sys.executable, "-m", "cram_ext.train", *ARGS, "--out", str(out), *extra], env


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    cmd, env = trainer(out)
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return out


def test_sigkill_and_resume_is_exact(tmp_path, whole):
    cmd, env = trainer(tmp_path)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    # Kill between checkpoints: after step 35 is logged (checkpoints at steps 9, 19, 29, ...).
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line).get("step", -1) >= 35 for line in
                                    metrics.read_text().splitlines()[:-1] if line.strip()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "summary.json").exists()
    subprocess.run(cmd + ["--resume"], env=env, check=True, capture_output=True)
    assert_same_run(whole, tmp_path)


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path, whole, monkeypatch):
    """The second checkpoint write dies half-way (the process "killed" inside torch.save):
    the first checkpoint is intact and resuming from it ends like the uninterrupted run."""
    real_save, calls = torch.save, []

    def dying_save(obj, f, *a, **kw):
        if isinstance(f, io.BytesIO):  # RoutedAttention's extra state, serialised in memory
            return real_save(obj, f, *a, **kw)
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint")
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, f, *a, **kw)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess runs (OMP_NUM_THREADS=1): same arithmetic
    try:
        monkeypatch.setattr(torch, "save", dying_save)
        with pytest.raises(KeyboardInterrupt):
            train.run(train.build_parser().parse_args(ARGS + ["--out", str(tmp_path)]))
        monkeypatch.setattr(torch, "save", real_save)
        assert checkpoint.load(tmp_path / "checkpoint.pt", "cpu")["step"] == 9
        train.run(train.build_parser().parse_args(ARGS + ["--out", str(tmp_path), "--resume"]))
    finally:
        torch.set_num_threads(threads)
    assert_same_run(whole, tmp_path)


def resume_error(out, *extra):
    cmd, env = trainer(out, "--resume", *extra)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


def test_truncated_checkpoint_is_a_clear_error(tmp_path, whole):
    for name in ("checkpoint.pt", "config.json", "metrics.jsonl"):
        (tmp_path / name).write_bytes((whole / name).read_bytes())
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert "truncated or not a torch checkpoint" in resume_error(tmp_path)


def test_foreign_checkpoint_is_a_clear_error(tmp_path, whole):
    (tmp_path / "config.json").write_bytes((whole / "config.json").read_bytes())
    torch.save({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "checkpoint.pt")
    assert "not a cram_ext training checkpoint" in resume_error(tmp_path)


def test_resume_with_other_arguments_is_refused(tmp_path, whole):
    for name in ("checkpoint.pt", "config.json", "metrics.jsonl"):
        (tmp_path / name).write_bytes((whole / name).read_bytes())
    err = resume_error(tmp_path, "--d-model", "64")
    assert "--d-model: 32 -> 64" in err


def test_new_run_over_an_old_one_needs_force(tmp_path, whole):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "checkpoint-500.pt").write_text("an old run's kept checkpoint")
    cmd, env = trainer(tmp_path, "--steps", "2")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    subprocess.run(cmd + ["--force"], env=env, check=True, capture_output=True)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    assert not (tmp_path / "checkpoint-500.pt").exists(), "the probe would read the old run's checkpoint"


def test_a_flag_newer_than_the_run_resumes_at_its_default(tmp_path, whole):
    """A run folder from before a flag existed (config.json without it) resumes when the flag
    is left at its default, and is refused when it is set to something else."""
    for name in ("checkpoint.pt", "metrics.jsonl"):
        (tmp_path / name).write_bytes((whole / name).read_bytes())
    config = json.loads((whole / "config.json").read_text())
    del config["working_memory"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "--working-memory: 'scan' -> 'metaplastic'" in resume_error(tmp_path, "--working-memory", "metaplastic")
    cmd, env = trainer(tmp_path, "--resume")
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 60
