"""The command line of `python -m cram_ext.train`: its parser, the checks of its arguments
before anything is built or written, and what they resolve to (the device, the run folder,
the RoutedAttention options)."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint import RunError
from .nn import RoutedAttention

DESCRIPTION = "Train a small model with routed attention on SRCD, MQAR or real text, and watch attention use fall."
# --routing: the RoutedAttention routing each choice runs.
ROUTING = {"learned": "learned", "dense": "dense", "static": "topk", "none": "none"}
ROUTED_DEFAULTS = {k: v.default for k, v in inspect.signature(RoutedAttention).parameters.items()
                   if v.default is not inspect.Parameter.empty}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cram_ext.train", description=DESCRIPTION,
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
    m.add_argument("--working-memory", choices=["scan", "metaplastic", "gla", "none"], default="scan",
                   help="--model cram: each block's working memory: the gated scan, the metaplastic memory "
                        "(Palimpsa, docs/metaplastic.md; --heads heads), the same layer as gated linear attention "
                        "(no importance), or none")
    m.add_argument("--attention", choices=["routed", "sdpa"], default="routed",
                   help="--model transformer: RoutedAttention or dense scaled_dot_product_attention")
    m.add_argument("--positions", choices=["learned", "rope"], default="learned",
                   help="--model transformer: learned absolute position embeddings or rotary ones in attention")
    m.add_argument("--init-like-dense", action="store_true",
                   help="--model transformer --attention routed: every parameter the dense model also has starts "
                        "as the dense model of the same --seed would (the router and semantic memory are drawn "
                        "apart): routed against dense from one initialisation")
    # RoutedAttention's arguments: left out, each takes the layer's own default (ROUTED_DEFAULTS).
    m.add_argument("--threshold", type=float, help="a token is routed when the router's probability exceeds this")
    m.add_argument("--explore", type=float, help="fraction of tokens force-routed in training")
    m.add_argument("--target", choices=["predict", "loss"], help="what the router learns")
    m.add_argument("--tol", type=float, help="target predict: the semantic memory's relative error")
    m.add_argument("--probe", type=float, help="target loss: fraction of probe tokens")
    m.add_argument("--loss-tol", type=float, help="target loss: nats per token")
    m.add_argument("--memory", nargs="?", const="scan", choices=["scan", "metaplastic"],
                   help="the router and the semantic memory read a working memory of the input too: the gated "
                        "scan (--memory alone) or the metaplastic memory")
    m.add_argument("--no-memory", dest="memory", action="store_const", const=False,
                   help="no working memory inside the layer")
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
        raise RunError(f"these must be positive: {', '.join(bad)}")
    if args.batch_size % world:
        raise RunError(f"--batch-size {args.batch_size} is the global batch: it must be a multiple of the "
                       f"{world} processes")
    if args.task == "srcd" and args.model != "cram":
        raise RunError("--task srcd has continuous inputs: it needs --model cram")
    if getattr(args, "working_memory", "scan") != "scan" and args.model != "cram":
        raise RunError("--working-memory is a choice of --model cram (the transformer has no working memory)")
    if args.positions != "learned" and args.model != "transformer":
        raise RunError("--positions is a choice of --model transformer (the CRAM model's working memory "
                       "orders its inputs)")
    if args.attention == "sdpa" and (args.model != "transformer" or args.routing != "learned"):
        raise RunError("--attention sdpa is the dense transformer: use it with --model transformer and the default "
                       "--routing learned only (the routing baselines are RoutedAttention's)")
    if getattr(args, "init_like_dense", False) and (args.model != "transformer" or args.attention != "routed"):
        raise RunError("--init-like-dense is a choice of --model transformer --attention routed")
    warmup = ROUTED_DEFAULTS["warmup"] if args.router_warmup is None else args.router_warmup
    if args.routing == "learned" and args.attention == "routed" and warmup >= args.steps:
        print(f"warning: --router-warmup {warmup} >= --steps {args.steps}: the router never trains and every "
              "token stays routed", file=sys.stderr)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is visible")
    return torch.device(name)


def run_dir(args: argparse.Namespace) -> Path:
    """The run folder: --out, or runs/<task>-<routing>."""
    return args.out or Path("runs") / f"{args.task}-{args.routing}"


def routed_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of the model's RoutedAttention layers: the flags given, the
    layer's defaults for the others, and the --routing baseline (no exploration but learned's)."""
    given = dict(threshold=args.threshold, explore=args.explore, tol=args.tol, router_bias_init=args.router_bias_init,
                 target=args.target, probe=args.probe, loss_tol=args.loss_tol, memory=args.memory,
                 warmup=args.router_warmup)
    routed = {k: ROUTED_DEFAULTS[k] if v is None else v for k, v in given.items()}
    routed.update(routing=ROUTING[args.routing], budget=args.budget)
    if args.routing != "learned":
        routed["explore"] = 0.0
    return routed
