"""Checkpoints of a training run, and the run folder's rules.

- A checkpoint is written to a temporary file, flushed to disk and renamed over the old
  one: a process killed at any moment leaves either the previous checkpoint or the new one,
  never a broken file.
- Reading one checks that it is a complete cram_ext training checkpoint; a truncated or
  foreign file gives a `RunError` that says so, not a traceback from inside torch.load.
- A run folder belongs to one configuration: resuming with arguments that change the model,
  the task or the optimisation is refused, and starting a new run over an existing one
  needs --force.
- Under torchrun (cram_ext.distributed) rank 0 reads and writes the run folder; a checkpoint
  then also holds every rank's random generators and extra state ("ranks"), so that a
  resumption on as many processes continues exactly. Its model is the single process's.
- A checkpoint holds the learning-rate scheduler's position ("scheduler"); one written before
  it did resumes from its step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from . import analysis, distributed

FORMAT = "cram_ext.train/1"
KEYS = ("format", "model", "optimizer", "step", "wall_s", "rng_cpu", "rng_cuda")  # and "scheduler"; "ranks" (torchrun)
# Arguments that may differ between a run and its resumption: where it runs, what it prints
# and how often it evaluates or saves. --steps may grow; the learning-rate schedule then
# follows the new total from the resumed step on (a warning says so).
RESUMABLE = {"resume", "force", "out", "device", "no_progress", "log_every", "eval_every", "ckpt_every",
             "eval_examples", "transfer", "threads", "steps", "keep_checkpoints"}


class RunError(ValueError):
    """A run folder or checkpoint that cannot be used as asked; the message says what to do."""


def save(path: Path, state: dict[str, Any]) -> None:
    """Write `state` (plus the format tag) to `path` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy(src: Path, dst: Path) -> None:
    """Copy a checkpoint, atomically like `save`."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load(path: Path, map_location: torch.device | str) -> dict[str, Any]:
    """The checkpoint at `path`, validated; RunError if it is truncated, corrupt or foreign."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch.load raises many kinds for a bad file)
        raise RunError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}): it is "
                       "truncated or not a torch checkpoint. Delete it to start the run over, or restore a copy.") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise RunError(f"{path} is not a cram_ext training checkpoint (format {FORMAT!r} expected; found {found}).")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise RunError(f"{path} is missing {missing}: it was not written by this version of cram_ext.train.")
    return state


def normalise(config: dict[str, Any]) -> dict[str, Any]:
    """The config as config.json stores it (paths and other objects as strings)."""
    return json.loads(json.dumps(config, default=str))


def mismatches(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The arguments, other than RESUMABLE ones, whose values differ, as 'name: saved -> given'."""
    saved, given = normalise(saved), normalise(given)
    if saved.get("memory") is True:  # --memory was on/off before it named the memory: on is the scan
        saved["memory"] = "scan"
    keys = sorted((saved.keys() | given.keys()) - RESUMABLE)
    return [f"--{k.replace('_', '-')}: {saved.get(k)!r} -> {given.get(k)!r}" for k in keys
            if saved.get(k) != given.get(k)]


def prepare_run_folder(out: Path, args: dict[str, Any], resume: bool, force: bool) -> Path | None:
    """Check `out` against the run's rules; returns the checkpoint to resume from, or None
    to start afresh. A new run over an existing one needs `force` (which replaces it)."""
    ckpt, config = out / "checkpoint.pt", out / "config.json"
    existing = [p.name for p in (ckpt, config, out / "metrics.jsonl") if p.exists()]
    if resume:
        if not ckpt.exists():
            return None
        if config.exists():
            from .train_args import build_parser  # here: train_args imports this module

            # A flag added after the run was made: the run had what is now its default.
            defaults = {k: v for k, v in vars(build_parser().parse_args([])).items() if k in args}
            saved = {**defaults, **{k: v for k, v in json.loads(config.read_text()).items() if k in args}}
            diff = mismatches(saved, args)
            if diff:
                raise RunError(f"--resume: {out} was run with other arguments ({'; '.join(diff)}). Resume with "
                               "the run's own arguments (its config.json), or start a new run in another folder.")
            if saved.get("steps") not in (None, args.get("steps")):
                print(f"--resume: --steps changed from {saved['steps']} to {args.get('steps')}: the learning-rate "
                      "schedule follows the new total from the resumed step on", file=sys.stderr)
        return ckpt
    if existing and not force:
        raise RunError(f"{out} already holds a run ({', '.join(existing)}): pass --resume to continue it, --force to "
                       "replace it, or --out to write elsewhere.")
    # Replacing: nothing of the old run may be resumed or probed as the new run's later.
    for path in [out / "checkpoint.pt", out / "checkpoint.pt.tmp", out / "summary.json", out / "probe.json",
                 *out.glob("checkpoint-*.pt")]:
        path.unlink(missing_ok=True)
    return None


def save_training(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
                  step: int, wall_s: float, d: distributed.Dist = distributed.Dist()) -> None:
    """The training checkpoint after `step`. Rank 0 writes it; with several processes every
    rank must call it (their random generators and probe labels go in too)."""
    ranks = distributed.rank_states(model, d)
    if d.main:
        save(path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "wall_s": wall_s,
            "rng_cpu": torch.get_rng_state(),  # under torchrun: rank 0's; its GPU's in "ranks"
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and not ranks else None,
            **({"ranks": ranks} if ranks else {}),
        })


def restore(out: Path, args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: LRScheduler, d: distributed.Dist = distributed.Dist()) -> tuple[int, float]:
    """Prepare OUT for the run `args` describe (rank 0); on --resume load its checkpoint into
    model, optimizer and scheduler (every rank, from rank 0's reading). Returns (first step,
    wall seconds already spent)."""
    state, error = None, None
    if d.main:
        try:
            resume_from = prepare_run_folder(out, {**vars(args), "out": str(out)}, args.resume, args.force)
            metrics = out / "metrics.jsonl"
            if resume_from is None:
                metrics.write_text("")
            else:  # on the CPU: the RNG states must stay there; load_state_dict moves the rest
                state = load(resume_from, map_location="cpu")
                # Drop what was logged after the checkpoint: those steps run again.
                kept = [r for r in analysis.read_metrics(out) if r["step"] <= state["step"]] if metrics.exists() else []
                metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        except RunError as e:
            error = e
    error, state = distributed.broadcast((error, state), d)
    if error is not None:
        raise error
    if state is None:
        return 0, 0.0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    # Checkpoints from before the scheduler was saved: its position is the step after theirs.
    scheduler.load_state_dict(state.get("scheduler", {"last_epoch": state["step"] + 1}))
    distributed.restore_rank_state(state, model, d)
    return state["step"] + 1, state["wall_s"]


def write_config(out: Path, args: argparse.Namespace, device: torch.device, model_config: dict[str, Any],
                 data: dict[str, Any] | None, d: distributed.Dist = distributed.Dist()) -> None:
    """OUT/config.json: the run's arguments, the device it resolved to, the model's config,
    the description of the task's data (Task.data_info) and, under torchrun, the processes."""
    extra = {"world_size": d.world} if d.on else {}
    config = {**vars(args), "out": str(out), "resolved_device": str(device), "model_config": model_config,
              "data": data, **extra}
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model of a `python -m cram_ext.train` run folder, rebuilt from its
    config.json and loaded from its checkpoint.pt, in eval mode; and the run's config."""
    from .models.build import model_from_config

    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    model = model_from_config(config["model"], config["model_config"])
    model.load_state_dict(load(run_dir / "checkpoint.pt", map_location="cpu")["model"])
    return model.to(device).eval(), config
