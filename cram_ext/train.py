"""Train a small model with routed attention on SRCD, MQAR or real text, and watch attention use fall.

    python -m cram_ext.train [--task srcd|mqar|lm] [--model cram|transformer] [--device auto|cpu|cuda]
                             [--routing learned|dense|static|none] [--out DIR] [--steps N] ...

Writes DIR/config.json, DIR/metrics.jsonl (one record per logged step: step, loss,
utilization, attn_flop_fraction, ...; evaluation steps add the task's quality metrics
(retrieval accuracy, or validation bits per byte) and eval_utilization), DIR/checkpoint.pt
(every --ckpt-every steps and at the end; --resume continues from it exactly), and at the
end DIR/summary.json and DIR/utilization.png. docs/results.md says what the numbers mean.

Models: cram (blocks of working memory, routed attention and an MLP) or transformer (a plain
GPT-style model, attention --attention routed or sdpa). Routing baselines (same model, same
data): dense (every token attends), static (Mixture-of-Depths-style top-k of the router
score at a fixed --budget), none (no attention: the semantic MLP everywhere). The default,
learned, is CRAM's router.

Under `torchrun --nproc-per-node N` the same command trains on N processes with
DistributedDataParallel, the global --batch-size split between them (cram_ext.distributed).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import analysis, checkpoint, distributed
from .models import CRAMConfig, CRAMModel, TransformerConfig, TransformerLM
from .nn import RoutedAttention
from .tasks import Task, autocast, make_task, routing_stats, transfer_variant

ROUTING = {"learned": "learned", "dense": "dense", "static": "topk", "none": "none"}
ROUTED_DEFAULTS = {k: v.default for k, v in inspect.signature(RoutedAttention).parameters.items()
                   if v.default is not inspect.Parameter.empty}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cram_ext.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=["srcd", "mqar", "lm"], default="srcd")
    p.add_argument("--model", choices=["cram", "transformer"], default="cram",
                   help="cram: working memory + routed attention + MLP blocks; transformer: a plain GPT")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of torch (small models run fastest on one; 0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<task>-<routing>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its checkpoint.pt (exactly, with the run's own arguments)")
    p.add_argument("--force", action="store_true", help="replace the run already in OUT")
    p.add_argument("--routing", choices=list(ROUTING), default="learned")
    p.add_argument("--budget", type=float, default=0.0625, help="fraction of tokens --routing static routes")
    p.add_argument("--steps", type=int, default=5000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=50, help="steps of linear learning-rate warm-up")
    p.add_argument("--min-lr-ratio", type=float, default=0.02, help="final learning rate / --lr (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="steps between training-metric records")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    p.add_argument("--eval-examples", type=int, default=512, help="held-out examples of each evaluation")
    p.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="also keep each checkpoint as checkpoint-<step>.pt (for python -m cram_ext.probe)")
    p.add_argument("--transfer", action=argparse.BooleanOptionalAction, default=True,
                   help="at the end, evaluate on an unseen task variant (no retraining; SRCD and MQAR)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs only)")
    m = p.add_argument_group("model")
    m.add_argument("--d-model", type=int, default=64)
    m.add_argument("--layers", type=int, default=1)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--attention", choices=["routed", "sdpa"], default="routed",
                   help="--model transformer: RoutedAttention or dense scaled_dot_product_attention")
    m.add_argument("--positions", choices=["learned", "rope"], default="learned",
                   help="--model transformer: learned absolute position embeddings or rotary ones in attention")
    # RoutedAttention's arguments: left out, each takes the layer's own default (ROUTED_DEFAULTS).
    m.add_argument("--threshold", type=float, help="a token is routed when the router's probability exceeds this")
    m.add_argument("--explore", type=float, help="fraction of tokens force-routed in training")
    m.add_argument("--target", choices=["predict", "loss"], help="what the router learns")
    m.add_argument("--tol", type=float, help="target predict: the semantic memory's relative error")
    m.add_argument("--probe", type=float, help="target loss: fraction of probe tokens")
    m.add_argument("--loss-tol", type=float, help="target loss: nats per token")
    m.add_argument("--memory", action=argparse.BooleanOptionalAction,
                   help="the router and the semantic memory read a gated scan of the input too")
    m.add_argument("--router-bias-init", type=float)
    m.add_argument("--router-warmup", type=int,
                   help="training steps with every token routed while attention learns (the layer's warmup)")
    m.add_argument("--router-lr-scale", type=float, default=1.0, help="the router's learning rate relative to --lr")
    t = p.add_argument_group("task")
    t.add_argument("--seq-len", type=int, default=64)
    t.add_argument("--recurring-frac", type=float, default=0.5, help="SRCD, MQAR: fraction of recurring pairs")
    t.add_argument("--num-recurring-pairs", type=int, default=16, help="SRCD, MQAR: size of the fixed table")
    t.add_argument("--table-seed", type=int, default=1234, help="SRCD, MQAR: seed of the fixed table")
    t.add_argument("--obs-dim", type=int, default=4, help="SRCD")
    t.add_argument("--num-keys", type=int, default=64, help="SRCD")
    t.add_argument("--num-values", type=int, default=16, help="SRCD")
    t.add_argument("--num-stores", type=int, default=8, help="SRCD")
    t.add_argument("--num-queries", type=int, default=8, help="SRCD")
    t.add_argument("--mse-weight", type=float, default=1.0, help="SRCD: weight of the next-observation MSE")
    t.add_argument("--num-kv-pairs", type=int, default=8, help="MQAR")
    t.add_argument("--vocab-size", type=int, default=256, help="MQAR")
    return p


def check_args(args: argparse.Namespace, world: int = 1) -> None:
    """Refuse what cannot run, before anything is built or written (world: the processes)."""
    positive = ("steps", "batch_size", "log_every", "eval_every", "eval_examples", "ckpt_every", "seq_len",
                "d_model", "layers", "heads")
    bad = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in positive if getattr(args, k) <= 0]
    if bad:
        raise checkpoint.RunError(f"these must be positive: {', '.join(bad)}")
    if args.batch_size % world:
        raise checkpoint.RunError(f"--batch-size {args.batch_size} is the global batch: it must be a multiple of the "
                                  f"{world} processes")
    if args.task == "srcd" and args.model != "cram":
        raise checkpoint.RunError("--task srcd has continuous inputs: it needs --model cram")
    if args.positions != "learned" and args.model != "transformer":
        raise checkpoint.RunError("--positions is a choice of --model transformer (the CRAM model's working memory "
                                  "orders its inputs)")
    if args.attention == "sdpa" and (args.model != "transformer" or args.routing != "learned"):
        raise checkpoint.RunError("--attention sdpa is the dense transformer: use it with --model transformer only")
    warmup = ROUTED_DEFAULTS["warmup"] if args.router_warmup is None else args.router_warmup
    if args.routing == "learned" and args.attention == "routed" and warmup >= args.steps:
        print(f"warning: --router-warmup {warmup} >= --steps {args.steps}: the router never trains and every "
              "token stays routed", file=sys.stderr)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise checkpoint.RunError("--device cuda: no CUDA device is visible")
    return torch.device(name)


def build_model(args: argparse.Namespace, task: Task) -> tuple[nn.Module, dict]:
    """The model the arguments describe, and its config (as config.json records it)."""
    given = dict(threshold=args.threshold, explore=args.explore, tol=args.tol, router_bias_init=args.router_bias_init,
                 target=args.target, probe=args.probe, loss_tol=args.loss_tol, memory=args.memory,
                 warmup=args.router_warmup)
    routed = {k: ROUTED_DEFAULTS[k] if v is None else v for k, v in given.items()}
    routed.update(routing=ROUTING[args.routing], budget=args.budget)
    if args.routing != "learned":
        routed["explore"] = 0.0
    shape = task.model_config()
    if args.model == "cram":
        cfg = CRAMConfig(d_model=args.d_model, n_layers=args.layers, num_heads=args.heads, routed=routed,
                         **{k: v for k, v in shape.items() if k != "max_len"})
        return CRAMModel(cfg), dataclasses.asdict(cfg)
    tcfg = TransformerConfig(d_model=args.d_model, n_layers=args.layers, num_heads=args.heads,
                             attention=args.attention, positions=args.positions, routed=routed, **shape)
    return TransformerLM(tcfg), dataclasses.asdict(tcfg)


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; the routers' parameters in their own group (--router-lr-scale)."""
    router = {id(p) for m in model.routed_attention_layers() for p in (m.router_weight, m.router_bias)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in router], "lr_scale": 1.0},
              {"params": [p for p in model.parameters() if id(p) in router], "lr_scale": args.router_lr_scale}]
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over --warmup steps, then cosine decay to --min-lr-ratio x --lr at the
    last step (the routing settles while the learning rate is small)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def run(args: argparse.Namespace) -> dict | None:
    """Train as args say; returns the summary (also written to OUT/summary.json); None on
    ranks other than 0 of a torchrun (cram_ext.distributed)."""
    d = distributed.from_env()
    check_args(args, d.world)
    device = distributed.setup(d, resolve_device(args.device))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / f"{args.task}-{args.routing}"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    task = make_task(args)
    net, model_cfg = build_model(args, task)
    net.to(device)
    distributed.seed_rank(d, args.seed)
    optimizer = make_optimizer(net, args)
    start, wall_before = checkpoint.restore(out, args, net, optimizer, d)
    model = distributed.wrap(net, d, device)  # what trains; `net` is the model itself
    if d.main:
        meta = getattr(getattr(task, "corpus", None), "meta", None)  # the text corpus (its Python version)
        extra = {"world_size": d.world} if d.on else {}
        (out / "config.json").write_text(json.dumps({**vars(args), "out": str(out), "resolved_device": str(device),
                                                     "model_config": model_cfg, "data": meta, **extra}, indent=2,
                                                    default=str))
    eval_batch = task.eval_batch(args.eval_examples, args.seed, device) if d.main else None
    progress = None
    if not args.no_progress and d.main:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=start, desc=f"{args.task}/{args.routing}", file=sys.stdout,
                        dynamic_ncols=True)
    quality = task.quality
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
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args) * group["lr_scale"]
            batch = task.batch(args.batch_size, args.seed * 1_000_003 + step, device, d.rows(args.batch_size))
            with autocast(device):
                out_, pred = task.forward(model, batch)
            loss, parts, aux = distributed.losses(task, out_, pred, batch, net, d)
            optimizer.zero_grad(set_to_none=True)
            (loss + aux).backward()
            optimizer.step()

            if step % args.log_every == 0 or evaluating:
                u, f = routing_stats(net)
                ones = torch.ones((), device=device)
                # One device-to-host copy for every logged number (means over the ranks).
                values = torch.stack([loss.detach().float(), aux.detach().float(), torch.stack(u).mean() if u else ones,
                                      torch.stack(f).mean() if f else ones, *(v.float() for v in parts.values())])
                loss_v, aux_v, util_v, flop_v, *part_v = distributed.mean(values, d).tolist()
                record.update(step=step, loss=loss_v, aux_loss=aux_v, utilization=util_v, attn_flop_fraction=flop_v,
                              lr=lr_at(step, args), wall_s=wall_before + time.perf_counter() - t0,
                              **dict(zip(parts, part_v)))
                log.write(json.dumps(record) + "\n")
                log.flush()
                if progress is not None:
                    progress.set_postfix(loss=f"{loss_v:.3f}", util=f"{util_v:.3f}", refresh=False)
            if (step + 1) % args.ckpt_every == 0:
                wall_s = wall_before + time.perf_counter() - t0
                checkpoint.save_training(out / "checkpoint.pt", net, optimizer, step, wall_s, d)
                if args.keep_checkpoints and d.main:
                    checkpoint.copy(out / "checkpoint.pt", out / f"checkpoint-{step + 1}.pt")
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    wall_s = wall_before + time.perf_counter() - t0
    checkpoint.save_training(out / "checkpoint.pt", net, optimizer, args.steps - 1, wall_s, d)
    if not d.main:
        return None

    summary = summarize(out, args, quality, wall_s)
    variant = transfer_variant(args) if args.transfer else None
    if variant is not None:
        vtask = make_task(args, **variant)
        summary["transfer"] = {"variant": variant,
                               **vtask.evaluate(net, vtask.eval_batch(args.eval_examples, 1, device), device)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    try:
        analysis.plot_run(out, title=f"{args.task}, {args.model}, routing {args.routing}")
    except ImportError:  # matplotlib is optional
        print("matplotlib is not installed: no utilization.png")
    return summary


def summarize(out: Path, args: argparse.Namespace, quality: str, wall_s: float) -> dict:
    records = analysis.read_metrics(out)
    last = [r for r in records if "eval_utilization" in r][-1]
    steps, util, _ = analysis.eval_curve(records)
    t, fit = analysis.fit_curve(steps, util)
    u0, u1 = util[0], util[-1]
    quality_keys = ("retrieval_acc", "retrieval_acc_novel", "retrieval_acc_recurring", "eval_mse", "eval_bpb")
    return {
        "task": args.task, "model": args.model, "routing": args.routing, "steps": args.steps,
        "utilization_start": u0, "utilization_end": u1, "reduction": u0 / u1 if u1 > 0 else math.inf,
        "attn_flop_fraction_end": last["eval_attn_flop_fraction"], "quality": quality,
        **{k: last[k] for k in quality_keys if k in last},
        "gamma": fit.gamma if fit else None, "gamma_ci95": fit.gamma_ci95 if fit else None,
        "gamma_fit_r2": fit.r2 if fit else None, "gamma_fit_poor": fit.poor if fit else None,
        "transition_step": t, "wall_s": wall_s,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = run(args)
    except checkpoint.RunError as e:
        if distributed.from_env().main:
            print(f"python -m cram_ext.train: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.finish()
    if s is None:  # not rank 0
        return 0
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    result = (f"validation {s['eval_bpb']:.3f} bits per byte" if "eval_bpb" in s else
              f"retrieval accuracy {pct(s['retrieval_acc'])} (novel {pct(s.get('retrieval_acc_novel'))}, "
              f"recurring {pct(s.get('retrieval_acc_recurring'))})")
    out = args.out or Path("runs") / f"{args.task}-{args.routing}"
    print(f"utilization {s['utilization_start']:.4f} -> {s['utilization_end']:.4f} ({s['reduction']:.1f}x reduction); "
          f"{result}; {s['wall_s']:.0f} s; summary in {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
