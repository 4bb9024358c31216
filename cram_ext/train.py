"""Train a small model with routed attention on SRCD, MQAR or real text, and watch attention use fall.

    python -m cram_ext.train [--task srcd|mqar|lm] [--model cram|transformer] [--device auto|cpu|cuda]
                             [--routing learned|dense|static|none] [--out DIR] [--steps N] ...

Writes DIR/config.json, DIR/metrics.jsonl (one record per logged step: step, loss,
utilization, attn_flop_fraction, ...; evaluation steps add the task's quality metrics
(retrieval accuracy, or validation bits per byte) and eval_utilization), DIR/checkpoint.pt
(every --ckpt-every steps and at the end; --resume continues from it exactly), and at the
end DIR/summary.json and DIR/utilization.png (and .pdf). docs/results.md says what the numbers mean.

Models: cram (blocks of working memory, routed attention and an MLP) or transformer (a plain
GPT-style model, attention --attention routed or sdpa). Routing baselines (same model, same
data): dense (every token attends), static (Mixture-of-Depths-style top-k of the router
score at a fixed --budget), none (no attention: the semantic MLP everywhere). The default,
learned, is CRAM's router.

Under `torchrun --nproc-per-node N` the same command trains on N processes with
DistributedDataParallel, the global --batch-size split between them (cram_ext.distributed).

This module is the training loop. Its pieces: the command line (cram_ext.train_args), the
model (cram_ext.models.build), AdamW and the learning-rate schedule (cram_ext.optim), the
tasks (cram_ext.tasks), the run folder and its checkpoints (cram_ext.checkpoint), the
summary and the figure (cram_ext.analysis).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

from . import analysis, checkpoint, distributed
from .models.build import build_model
from .optim import WarmupCosine, make_optimizer
from .tasks import autocast, evaluate_transfer, make_task
from .train_args import ROUTED_DEFAULTS, ROUTING, build_parser, check_args, resolve_device, routed_options, run_dir

__all__ = ["ROUTED_DEFAULTS", "ROUTING", "build_parser", "check_args", "main", "run"]


def run(args: argparse.Namespace) -> dict | None:
    """Train as args say; returns the summary (also written to OUT/summary.json); None on
    ranks other than 0 of a torchrun (cram_ext.distributed)."""
    d = distributed.from_env()
    check_args(args, d.world)
    device = distributed.setup(d, resolve_device(args.device))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = run_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    task = make_task(args)
    net, model_cfg = build_model(args, task.model_config(), routed_options(args))
    net.to(device)
    distributed.seed_rank(d, args.seed)
    optimizer = make_optimizer(net, args)
    scheduler = WarmupCosine.from_args(optimizer, args)
    start, wall_before = checkpoint.restore(out, args, net, optimizer, scheduler, d)
    model = distributed.wrap(net, d, device)  # what trains; `net` is the model itself
    if d.main:
        checkpoint.write_config(out, args, device, model_cfg, task.data_info(), d)
    eval_batch = task.eval_batch(args.eval_examples, args.seed, device) if d.main else None
    progress = None
    if not args.no_progress and d.main:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=start, desc=f"{args.task}/{args.routing}", file=sys.stdout,
                        dynamic_ncols=True)
    t0 = time.perf_counter()
    model.train()
    # Rank 0 alone evaluates and logs (the other ranks' records go to the null device).
    with open(out / "metrics.jsonl" if d.main else os.devnull, "a") as log:
        for step in range(start, args.steps + 1):
            record: dict[str, Any] = {}
            evaluating = step % args.eval_every == 0 or step == args.steps
            if evaluating and d.main:
                record.update(task.evaluate(net, eval_batch, device))
            if step == args.steps:  # the final evaluation; no update
                log.write(json.dumps({**record, "step": step, "wall_s": wall_before + time.perf_counter() - t0}) + "\n")
                break
            batch = task.batch(args.batch_size, args.seed * 1_000_003 + step, device, d.rows(args.batch_size))
            with autocast(device):
                out_, pred = task.forward(model, batch)
            loss, parts, aux = distributed.losses(task, out_, pred, batch, net, d)
            optimizer.zero_grad(set_to_none=True)
            (loss + aux).backward()
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # this step's (the first group's scale is 1)
            scheduler.step()

            if step % args.log_every == 0 or evaluating:
                means, part_means = distributed.logged_means(loss, aux, parts, net, d)
                record.update(step=step, **means, lr=lr, wall_s=wall_before + time.perf_counter() - t0, **part_means)
                log.write(json.dumps(record) + "\n")
                log.flush()
                if progress is not None:
                    progress.set_postfix(loss=f"{means['loss']:.3f}", util=f"{means['utilization']:.3f}", refresh=False)
            if (step + 1) % args.ckpt_every == 0:
                wall_s = wall_before + time.perf_counter() - t0
                checkpoint.save_training(out / "checkpoint.pt", net, optimizer, scheduler, step, wall_s, d)
                if args.keep_checkpoints and d.main:
                    checkpoint.copy(out / "checkpoint.pt", out / f"checkpoint-{step + 1}.pt")
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    wall_s = wall_before + time.perf_counter() - t0
    checkpoint.save_training(out / "checkpoint.pt", net, optimizer, scheduler, args.steps - 1, wall_s, d)
    if not d.main:
        return None

    summary = analysis.summarize(out, args, task.quality, wall_s)
    transfer = evaluate_transfer(args, net, device) if args.transfer else None
    if transfer is not None:
        summary["transfer"] = transfer
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    try:
        analysis.plot_run(out, title=f"{args.task}, {args.model}, routing {args.routing}")
    except ImportError:  # matplotlib is optional
        print("matplotlib is not installed: no utilization.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    completed = False
    try:
        summary = run(args)
        completed = True
    except checkpoint.RunError as e:
        if distributed.from_env().main:
            print(f"python -m cram_ext.train: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.finish(completed)
    if summary is not None:  # rank 0
        print(analysis.summary_line(summary, run_dir(args) / "summary.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
