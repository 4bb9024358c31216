"""The optimisation of `python -m cram_ext.train`: AdamW with the routers' parameters in a
group of their own, and the learning-rate schedule, a linear warm-up and then a cosine decay
to a floor (the routing settles while the learning rate is small)."""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; the routers' parameters in their own group (--router-lr-scale). Each group's
    "lr_scale" is its learning rate relative to the schedule's (WarmupCosine)."""
    router = {id(p) for m in model.routed_attention_layers() for p in (m.router_weight, m.router_bias)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in router], "lr_scale": 1.0},
              {"params": [p for p in model.parameters() if id(p) in router], "lr_scale": args.router_lr_scale}]
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """The learning rate of `step` (from 0): linear warm-up to `peak` over `warmup` steps,
    then cosine decay to min_ratio x peak at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


class WarmupCosine(LRScheduler):
    """`lr_at` as a torch scheduler: for step t (its last_epoch), each parameter group's learning
    rate is lr_at(t, the group's initial lr, ...) x the group's "lr_scale". (LambdaLR's initial
    lr x factor would round differently from this formula, which the trainer has always used.)

    Its state is its position alone: a resumed run follows the schedule of its current
    arguments from there on (--steps may grow), whatever the saved one was."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio
        super().__init__(optimizer)

    @classmethod
    def from_args(cls, optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> WarmupCosine:
        """The schedule of --warmup, --steps and --min-lr-ratio (the peak, --lr, is the optimizer's)."""
        return cls(optimizer, args.warmup, args.steps, args.min_lr_ratio)

    def get_lr(self) -> list[float]:
        return [lr_at(self.last_epoch, base, self.warmup, self.total, self.min_ratio) * group.get("lr_scale", 1.0)
                for base, group in zip(self.base_lrs, self.optimizer.param_groups)]

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Move to the saved position and set the learning rates of that step (load the
        optimizer's state first: it holds the learning rates it was saved with)."""
        self.last_epoch = state_dict["last_epoch"]
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr
