"""Train a small CRAM model on SRCD or MQAR and watch attention use fall.

    python -m cram_ext.train [--task srcd|mqar] [--device auto|cpu|cuda] [--out DIR]
                             [--routing learned|dense|static|none] [--budget 0.02] [--steps N] ...

Writes DIR/config.json, DIR/metrics.jsonl (one record per logged step: step, loss,
utilization, attn_flop_fraction, ...; evaluation steps add retrieval_acc,
retrieval_acc_novel, retrieval_acc_recurring, eval_utilization, ...), DIR/checkpoint.pt
(every --ckpt-every steps and at the end; --resume continues from it exactly), and at the
end DIR/summary.json and DIR/utilization.png. docs/results.md says what the numbers mean.

Routing baselines (same model, same data): dense (every token attends), static
(Mixture-of-Depths-style top-k of the router score at a fixed --budget), none (no
attention: the semantic MLP everywhere). The default, learned, is CRAM's router.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import analysis, checkpoint
from .data import IGNORE, mqar, srcd, srcd_input_dim
from .models import CRAMConfig, CRAMModel
from .nn import aux_losses

EVAL_SEED = 1_000_000_007  # evaluation examples come from seeds no training step uses
ROUTING = {"learned": "learned", "dense": "dense", "static": "topk", "none": "none"}


# ----------------------------------------------------------------------------- tasks


def to_device(batch: Any, device: torch.device) -> dict[str, Tensor]:
    """The tensor fields of a task's batch dataclass, moved to device. On CUDA through pinned
    memory without blocking, so that the host does not wait for the GPU at every field."""
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    if device.type != "cuda":
        return {k: v.to(device) for k, v in fields.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in fields.items()}


class SRCDTask:
    """Sparse retrieval in continuous dynamics (docs/tasks.md): the model reads the input
    channels and predicts the next observation and, at query steps, the value."""

    def __init__(self, args: argparse.Namespace, **variant: Any) -> None:
        self.kw = dict(
            seq_len=args.seq_len, obs_dim=args.obs_dim, num_keys=args.num_keys, num_values=args.num_values,
            num_stores=args.num_stores, num_queries=args.num_queries, recurring_frac=args.recurring_frac,
            num_recurring_pairs=args.num_recurring_pairs, table_seed=args.table_seed,
        )
        self.kw.update(variant)
        self.mse_weight = args.mse_weight

    def model_config(self) -> dict:
        kw = self.kw
        return {"input_dim": srcd_input_dim(kw["obs_dim"], kw["num_keys"], kw["num_values"]),
                "output_dim": kw["obs_dim"] + kw["num_values"]}

    def batch(self, n: int, seed: int, device: torch.device) -> dict[str, Tensor]:
        return to_device(srcd(n, seed=seed, **self.kw), device)

    def forward(self, model: CRAMModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = model(batch["inputs"], batch["dt"]).float()
        d = self.kw["obs_dim"]
        return out[..., d:], out[..., :d]  # value logits, next-observation prediction

    def loss(self, logits: Tensor, pred: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
        sq, count = self.squared_error(pred, batch)
        mse = sq / count.clamp_min(1)
        return ce + self.mse_weight * mse, {"ce": ce.detach(), "mse": mse.detach()}

    @staticmethod
    def squared_error(pred: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Sum of the next-observation squared errors over the steps that have a target, and
        the number of terms summed."""
        m = batch["target_mask"].unsqueeze(-1).float()
        return ((pred - batch["targets"]).pow(2) * m).sum(), m.sum() * pred.shape[-1]


class MQARTask:
    """Multi-query associative recall, with recurring pairs (docs/tasks.md)."""

    def __init__(self, args: argparse.Namespace, **variant: Any) -> None:
        self.kw = dict(
            seq_len=args.seq_len, num_kv_pairs=args.num_kv_pairs, vocab_size=args.vocab_size,
            recurring_frac=args.recurring_frac, num_recurring_pairs=args.num_recurring_pairs, table_seed=args.table_seed,
        )
        self.kw.update(variant)

    def model_config(self) -> dict:
        return {"vocab_size": self.kw["vocab_size"]}

    def batch(self, n: int, seed: int, device: torch.device) -> dict[str, Tensor]:
        return to_device(mqar(n, seed=seed, **self.kw), device)

    def forward(self, model: CRAMModel, batch: dict[str, Tensor]) -> tuple[Tensor, None]:
        return model(batch["inputs"]).float(), None

    def loss(self, logits: Tensor, pred: None, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
        return ce, {"ce": ce.detach()}


def make_task(args: argparse.Namespace, **variant: Any) -> SRCDTask | MQARTask:
    return SRCDTask(args, **variant) if args.task == "srcd" else MQARTask(args, **variant)


def transfer_variant(args: argparse.Namespace) -> dict[str, Any]:
    """An unseen variant of the task for the transfer evaluation. SRCD: twice the
    sequence length, stores and queries, and faster, less damped dynamics. MQAR: twice
    the key-value pairs (as far as the sequence holds them; the vocabulary is the model's)."""
    if args.task == "srcd":
        return {"seq_len": 2 * args.seq_len, "num_stores": 2 * args.num_stores, "num_queries": 2 * args.num_queries,
                "freq_range": (3.0, 6.0), "damping_range": (0.005, 0.02)}
    return {"num_kv_pairs": min(2 * args.num_kv_pairs, args.seq_len // 4)}


# ------------------------------------------------------------------------ helpers


def layer_stats(model: CRAMModel) -> tuple[list[Tensor], list[Tensor]]:
    layers = model.routed_attention_layers()
    return [m.last_stats["utilization"] for m in layers], [m.last_stats["attn_flop_fraction"] for m in layers]


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model: CRAMModel, task, batch: dict[str, Tensor], device: torch.device, chunk: int = 128) -> dict:
    """Retrieval accuracy (all, novel, recurring queries), utilization and attention FLOP
    fraction in eval mode (no exploration), and the next-observation MSE for SRCD."""
    was_training = model.training
    model.eval()
    n = batch["inputs"].shape[0]
    correct, is_query, util, flops, sq, cnt = [], [], [], [], [], []
    for i in range(0, n, chunk):
        part = {k: v[i : i + chunk] for k, v in batch.items()}
        with autocast(device):
            logits, pred = task.forward(model, part)
        q = part["labels"] != IGNORE
        correct.append((logits.argmax(-1) == part["labels"])[q])
        is_query.append(part["recurring"][q])
        u, f = layer_stats(model)
        w = part["inputs"].shape[0] / n
        util.append(torch.stack(u) * w)
        flops.append(torch.stack(f) * w)
        if pred is not None:
            s, c = task.squared_error(pred, part)
            sq.append(s)
            cnt.append(c)
    model.train(was_training)
    correct, recurring = torch.cat(correct).float(), torch.cat(is_query)
    per_layer = torch.stack(util).sum(0)
    out = {
        "retrieval_acc": float(correct.mean()),
        "retrieval_acc_novel": float(correct[~recurring].mean()) if (~recurring).any() else None,
        "retrieval_acc_recurring": float(correct[recurring].mean()) if recurring.any() else None,
        "eval_utilization": float(per_layer.mean()),
        "eval_utilization_per_layer": [round(float(u), 6) for u in per_layer],
        "eval_attn_flop_fraction": float(torch.stack(flops).sum(0).mean()),
    }
    if cnt:
        out["eval_mse"] = float(torch.stack(sq).sum() / torch.stack(cnt).sum())
    return out


def save_checkpoint(path: Path, model, optimizer, step: int, wall_s: float) -> None:
    checkpoint.save(path, {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "wall_s": wall_s,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    })


def set_router_trainable(model: CRAMModel, trainable: bool) -> None:
    for m in model.routed_attention_layers():
        m.router_weight.requires_grad_(trainable)
        m.router_bias.requires_grad_(trainable)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over --warmup steps, then cosine decay to --min-lr-ratio x --lr at the
    last step (the routing settles while the learning rate is small)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# --------------------------------------------------------------------------- train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cram_ext.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=["srcd", "mqar"], default="srcd")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<task>-<routing>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its checkpoint.pt (exactly, with the run's own arguments)")
    p.add_argument("--force", action="store_true", help="replace the run already in OUT")
    p.add_argument("--routing", choices=list(ROUTING), default="learned")
    p.add_argument("--budget", type=float, default=0.0625, help="fraction of tokens --routing static routes")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--min-lr-ratio", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-examples", type=int, default=512)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--transfer", action=argparse.BooleanOptionalAction, default=True,
                   help="at the end, evaluate on an unseen task variant (no retraining)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs only)")
    m = p.add_argument_group("model")
    m.add_argument("--d-model", type=int, default=64)
    m.add_argument("--layers", type=int, default=1)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--threshold", type=float, default=0.3,
                   help="a token is routed when the router's probability exceeds this; below 0.5, a "
                        "token the router is unsure of still goes to attention")
    m.add_argument("--explore", type=float, default=0.02)
    m.add_argument("--tol", type=float, default=0.3)
    m.add_argument("--router-bias-init", type=float, default=3.0)
    m.add_argument("--router-lr-scale", type=float, default=1.0,
                   help="the router's learning rate relative to --lr")
    m.add_argument("--router-warmup", type=int, default=1000,
                   help="steps with the router frozen (everything routed) while attention learns to retrieve")
    t = p.add_argument_group("task")
    t.add_argument("--seq-len", type=int, default=64)
    t.add_argument("--recurring-frac", type=float, default=0.5)
    t.add_argument("--num-recurring-pairs", type=int, default=16)
    t.add_argument("--table-seed", type=int, default=1234)
    t.add_argument("--obs-dim", type=int, default=4, help="SRCD")
    t.add_argument("--num-keys", type=int, default=64, help="SRCD")
    t.add_argument("--num-values", type=int, default=16, help="SRCD")
    t.add_argument("--num-stores", type=int, default=8, help="SRCD")
    t.add_argument("--num-queries", type=int, default=8, help="SRCD")
    t.add_argument("--mse-weight", type=float, default=1.0, help="SRCD: weight of the next-observation MSE")
    t.add_argument("--num-kv-pairs", type=int, default=8, help="MQAR")
    t.add_argument("--vocab-size", type=int, default=256, help="MQAR")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device(name)


def run(args: argparse.Namespace) -> dict:
    """Train as args say; returns the summary (also written to OUT/summary.json)."""
    device = resolve_device(args.device)
    out = args.out or Path("runs") / f"{args.task}-{args.routing}"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    task = make_task(args)
    cfg = CRAMConfig(
        d_model=args.d_model, n_layers=args.layers, num_heads=args.heads, threshold=args.threshold,
        explore=args.explore if args.routing == "learned" else 0.0, tol=args.tol,
        router_bias_init=args.router_bias_init, routing=ROUTING[args.routing], budget=args.budget,
        **task.model_config(),
    )
    model = CRAMModel(cfg).to(device)
    router = {id(p) for m in model.routed_attention_layers() for p in (m.router_weight, m.router_bias)}
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if id(p) not in router], "lr_scale": 1.0},
         {"params": [p for p in model.parameters() if id(p) in router], "lr_scale": args.router_lr_scale}],
        lr=args.lr, weight_decay=args.weight_decay)
    eval_batch = task.batch(args.eval_examples, EVAL_SEED + args.seed, device)

    metrics_path, ckpt_path = out / "metrics.jsonl", out / "checkpoint.pt"
    config = {**vars(args), "out": str(out), "device": str(device), "model": dataclasses.asdict(cfg)}
    start, wall_before = 0, 0.0
    resume_from = checkpoint.prepare_run_folder(out, {k: v for k, v in config.items() if k != "model"},
                                                args.resume, args.force)
    if resume_from is not None:
        # On the CPU: the RNG states must stay there; load_state_dict moves the rest.
        state = checkpoint.load(resume_from, map_location="cpu")
        saved_steps = json.loads((out / "config.json").read_text()).get("steps")
        if saved_steps is not None and saved_steps != args.steps:
            print(f"--resume: --steps changed from {saved_steps} to {args.steps}: the learning-rate schedule "
                  f"follows the new total from step {state['step'] + 1} on", file=sys.stderr)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        start, wall_before = state["step"] + 1, state["wall_s"]
        # Drop what was logged after the checkpoint: those steps run again.
        kept = [r for r in analysis.read_metrics(out) if r["step"] < start] if metrics_path.exists() else []
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    else:
        metrics_path.write_text("")
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))

    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=start, desc=f"{args.task}/{args.routing}", file=sys.stdout,
                        dynamic_ncols=True)
    t0 = time.perf_counter()
    last_eval: dict = {}
    model.train()
    with open(metrics_path, "a") as log:
        for step in range(start, args.steps + 1):
            record: dict[str, Any] = {}
            if step % args.eval_every == 0 or step == args.steps:
                last_eval = evaluate(model, task, eval_batch, device)
                record.update(last_eval)
            if step == args.steps:  # the final evaluation; no update
                record["step"] = step
                record["wall_s"] = wall_before + time.perf_counter() - t0
                log.write(json.dumps(record) + "\n")
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args) * group["lr_scale"]
            set_router_trainable(model, step >= args.router_warmup)
            batch = task.batch(args.batch_size, args.seed * 1_000_003 + step, device)
            with autocast(device):
                logits, pred = task.forward(model, batch)
            loss, parts = task.loss(logits, pred, batch)
            aux = aux_losses(model)
            optimizer.zero_grad(set_to_none=True)
            (loss + aux).backward()
            optimizer.step()

            if step % args.log_every == 0 or record:
                u, f = layer_stats(model)
                # One device-to-host copy for every logged number.
                values = torch.stack([loss.detach().float(), aux.detach().float(), torch.stack(u).mean(),
                                      torch.stack(f).mean(), *(v.float() for v in parts.values())]).tolist()
                loss_v, aux_v, util_v, flop_v, *part_v = values
                record.update(step=step, loss=loss_v, aux_loss=aux_v, utilization=util_v, attn_flop_fraction=flop_v,
                              lr=lr_at(step, args), wall_s=wall_before + time.perf_counter() - t0,
                              **dict(zip(parts, part_v)))
                log.write(json.dumps(record) + "\n")
                log.flush()
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{last_eval.get('retrieval_acc', 0):.3f}",
                                         util=f"{record['utilization']:.3f}", refresh=False)
            if (step + 1) % args.ckpt_every == 0:
                save_checkpoint(ckpt_path, model, optimizer, step, wall_before + time.perf_counter() - t0)
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    wall_s = wall_before + time.perf_counter() - t0
    save_checkpoint(ckpt_path, model, optimizer, args.steps - 1, wall_s)

    summary = summarize(out, args, wall_s)
    if args.transfer:
        variant = make_task(args, **transfer_variant(args))
        summary["transfer"] = {"variant": transfer_variant(args),
                               **evaluate(model, variant, variant.batch(args.eval_examples, EVAL_SEED + 1, device), device)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    try:
        analysis.plot_run(out, title=f"{args.task}, routing {args.routing}")
    except ImportError:  # matplotlib is optional
        print("matplotlib is not installed: no utilization.png")
    return summary


def summarize(out: Path, args: argparse.Namespace, wall_s: float) -> dict:
    records = analysis.read_metrics(out)
    last = [r for r in records if "retrieval_acc" in r][-1]
    steps, util, _ = analysis.eval_curve(records)
    t, fit = analysis.fit_curve(steps, util)
    u0, u1 = util[0], util[-1]
    return {
        "task": args.task,
        "routing": args.routing,
        "steps": args.steps,
        "utilization_start": u0,
        "utilization_end": u1,
        "reduction": u0 / u1 if u1 > 0 else math.inf,
        "attn_flop_fraction_end": last["eval_attn_flop_fraction"],
        "retrieval_acc": last["retrieval_acc"],
        "retrieval_acc_novel": last["retrieval_acc_novel"],
        "retrieval_acc_recurring": last["retrieval_acc_recurring"],
        "eval_mse": last.get("eval_mse"),
        "gamma": fit[0] if fit else None,
        "transition_step": t,
        "wall_s": wall_s,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = run(args)
    except checkpoint.RunError as e:
        print(f"python -m cram_ext.train: error: {e}", file=sys.stderr)
        return 2
    acc = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"utilization {s['utilization_start']:.4f} -> {s['utilization_end']:.4f} "
          f"({s['reduction']:.1f}x reduction); retrieval accuracy {acc(s['retrieval_acc'])} "
          f"(novel {acc(s['retrieval_acc_novel'])}, recurring {acc(s['retrieval_acc_recurring'])}); "
          f"{s['wall_s']:.0f} s; summary in {(args.out or Path('runs') / f'{args.task}-{args.routing}') / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
