"""`torchrun --nproc-per-node 2 -m cram_ext.train` (DDP over gloo on the CPU) trains as the
single process does: the same examples per step, the gradient of the global batch's mean
(also when the ranks route different numbers of tokens), so the logged losses, the routing
and the evaluations match up to float rounding; a resumption under DDP is bitwise exact, with
each rank's random draws (exploration, probes) and probe labels carried over."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICES

import cram_ext
from cram_ext import checkpoint, distributed, train
from cram_ext.data import IGNORE
from cram_ext.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
# A router that starts just above its threshold and learns to drop tokens (--tol 1) right after
# a 5-step warm-up: the ranks route different numbers of tokens, which the loss weights cover.
TINY = ["--task", "mqar", "--model", "transformer", "--layers", "1", "--d-model", "32", "--heads", "2",
        "--seq-len", "32", "--num-kv-pairs", "4", "--vocab-size", "64", "--batch-size", "8", "--eval-examples", "64",
        "--eval-every", "15", "--log-every", "1", "--router-warmup", "5", "--router-bias-init", "-0.75", "--tol", "1",
        "--threads", "1", "--no-progress", "--device", "cpu", "--no-transfer", "--steps", "30"]
# No random tokens (no exploration, and target="predict": no probes): the single process's
# draws could not be split between ranks.
EXACT = ["--explore", "0", "--target", "predict"]
RANDOM = ["--target", "loss", "--ckpt-every", "15", "--keep-checkpoints"]  # exploration and probes: per-rank draws


def torchrun(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cram_ext.train", *TINY, *args, "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_ddp_matches_single_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    s = train.run(train.build_parser().parse_args(TINY + EXACT + ["--out", str(single)]))
    torchrun(ddp, *EXACT)
    a, b = records(single), records(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(31))
    diff = {k: max(abs(x[k] - y[k]) for x, y in zip(a, b) if isinstance(x.get(k), float))
            for k in ("loss", "ce", "aux_loss", "utilization", "attn_flop_fraction", "retrieval_acc",
                      "eval_utilization")}
    print("max |single - ddp| per metric:", diff)
    assert max(diff.values()) < 1e-5, diff
    # The router did drop tokens, and differently on the two ranks' rows (else the aux-loss
    # weights were not exercised).
    assert min(r["utilization"] for r in a if "utilization" in r) < 0.5
    assert json.loads((ddp / "summary.json").read_text())["retrieval_acc"] == pytest.approx(s["retrieval_acc"], abs=1e-6)
    wa, wb = weights(single), weights(ddp)
    assert wa.keys() == wb.keys()
    wdiff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print("max |single - ddp| weight:", wdiff)
    assert wdiff < 1e-5
    assert json.loads((ddp / "config.json").read_text())["world_size"] == 2
    assert "ranks" in torch.load(ddp / "checkpoint.pt", weights_only=True)


def test_ddp_resume_is_exact(tmp_path):
    """30 steps under DDP with exploration and target="loss" probes, against the same run
    resumed from its step-15 checkpoint (as after a kill): bitwise the same metrics, weights
    and routing."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    torchrun(whole, *RANDOM)
    resumed.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(whole / name, resumed / name)
    shutil.copy(whole / "checkpoint-15.pt", resumed / "checkpoint.pt")
    torchrun(resumed, *RANDOM, "--resume")
    assert records(whole) == records(resumed)
    wa, wb = weights(whole), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Per-rank probe labels: each rank's own rows.
    ranks = torch.load(whole / "checkpoint.pt", weights_only=True)["ranks"]
    decode = cram_ext.RoutedAttention.decode_extra_state
    labels = [decode(r["extra"]["blocks.0.attn._extra_state"])["probe_labels"]["needed"] for r in ranks]
    assert len(labels) == 2 and all(t.shape == (4, 32) for t in labels)


def test_batch_size_must_split_evenly():
    args = train.build_parser().parse_args(TINY)
    train.check_args(args, world=2)
    with pytest.raises(checkpoint.RunError, match="multiple of the 3 processes"):
        train.check_args(args, world=3)


@pytest.mark.parametrize("task", ["mqar", "srcd", "lm"])
def test_weighted_rank_losses_average_to_the_global_mean(task):
    """The weights of distributed.losses: with queries spread unevenly over the ranks, the
    mean over ranks of each rank's weighted loss is the global batch's loss (what DDP's
    gradient averaging needs), where the plain mean of the ranks' losses is not."""
    model = "cram" if task == "srcd" else "transformer"
    args = train.build_parser().parse_args(["--task", task, "--model", model, "--seq-len", "32", "--num-kv-pairs", "4",
                                            "--vocab-size", "64", "--num-stores", "4", "--num-queries", "2"])
    t = make_task(args)
    batch = t.batch(8, 0, torch.device("cpu"))
    if "recurring" in batch:  # drop queries of the first rows: rank 0 has fewer than rank 1
        batch["labels"][:3] = torch.where(batch["recurring"][:3], IGNORE, batch["labels"][:3])
        batch["labels"][0] = IGNORE
    g = torch.Generator().manual_seed(0)
    shape = batch["labels"].shape
    n_out = 256 if task == "lm" else 64 if task == "mqar" else args.num_values
    logits = torch.randn(*shape, n_out, generator=g)
    pred = torch.randn(*shape, args.obs_dim, generator=g) if task == "srcd" else None
    whole, _ = t.loss(logits, pred, batch)
    halves = [slice(0, 4), slice(4, 8)]
    parts = [({k: v[h] for k, v in batch.items()}, logits[h], None if pred is None else pred[h]) for h in halves]
    counts = [torch.stack([c.double() for c in t.loss_counts(b).values()]) for b, _, _ in parts]
    total = counts[0] + counts[1]
    weighted = [t.loss(lg, pr, b, weights=dict(zip(t.loss_counts(b), distributed.shares(c, total, 2))))[0]
                for (b, lg, pr), c in zip(parts, counts)]
    assert float(sum(weighted) / 2) == pytest.approx(float(whole), rel=1e-6)
    if task != "lm":  # uneven queries: the plain mean of the ranks' means is off
        plain = sum(t.loss(lg, pr, b)[0] for b, lg, pr in parts) / 2
        assert abs(float(plain) - float(whole)) > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_lm_loss_counts_are_made_on_the_device_without_a_host_sync(device):
    """distributed.losses reads the counts at every step: on CUDA, torch.tensor(n, device=...) was
    a blocking host-to-device copy (the host waited for the step's forward)."""
    from cram_ext.tasks import LMTask

    labels = torch.randint(0, 256, (4, 32), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        counts = LMTask.loss_counts(None, {"labels": labels})  # reads nothing of the task
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert counts["bpb"].device == labels.device and counts["bpb"].dim() == 0 and int(counts["bpb"]) == 128
