"""Several processes, one model: `torchrun --nproc-per-node N -m cram_ext.train ...`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. Without them (or with WORLD_SIZE=1) the
trainer is one process and every helper here is the identity. With them:

- Each process holds the whole model, wrapped in DistributedDataParallel (gloo on the CPU;
  nccl on CUDA, one GPU per process: cuda:LOCAL_RANK), which averages the gradients.
- The global batch, --batch-size, is split: of the batch the single process draws for a
  step, rank r takes rows [r B/N, (r+1) B/N) (`Dist.rows`), so that a step sees the same
  examples whatever N is. Each rank draws the whole batch on the CPU and keeps its rows (a
  generator draws a batch from one seed in one stream: a rank's rows cannot be drawn alone),
  so the host's data time per step stays the single process's, not 1/N of it.
- Every loss term is weighted so that the averaged gradient is the gradient of the global
  batch's mean (`losses`); the step then is the single process's, up to float rounding.
- Rank 0 alone evaluates, writes metrics.jsonl, config.json, the checkpoints and the
  summary. The training numbers it logs (loss, aux_loss, utilization, attn_flop_fraction,
  the loss's parts) are means over all ranks, i.e. over the global batch.
- Random draws inside the model (RoutedAttention's exploration and probe tokens) come from
  each rank's own generator (seeded apart), so they are not the single process's draws:
  a run with them matches a single-process run statistically, not number for number.
  Checkpoints keep every rank's generator and its RoutedAttention probe labels, so that a
  resumption on as many processes is exact.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .nn import RoutedAttention, aux_losses
from .tasks import routing_stats

RANK_SEED_STRIDE = 1_000_003  # rank r > 0 draws from seed + r * this


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks (Dist(): a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice | None:
        """This rank's rows of the global batch (None: all of them)."""
        if not self.on:
            return None
        n = batch_size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)


def from_env() -> Dist:
    """The ranks torchrun's environment describes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(d: Dist, device: torch.device) -> torch.device:
    """Join the process group (nothing for a single process); returns this rank's device."""
    if not d.on:
        return device
    if device.type == "cuda":
        if d.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {d.local_rank}: only {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", rank=d.rank, world_size=d.world,
                                device_id=device if cuda else None)
    return device


def seed_rank(d: Dist, seed: int) -> None:
    """After the model is built (the same on every rank): ranks other than 0 draw their own
    exploration and probe tokens, from their own seed."""
    if d.rank > 0:
        torch.manual_seed(seed + RANK_SEED_STRIDE * d.rank)


class _WithAux(nn.Module):
    """The model, whose forward also returns its RoutedAttention layers' aux losses."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, list[Tensor]]:
        out = self.net(*args, **kwargs)
        layers = [m for m in self.net.modules() if isinstance(m, RoutedAttention)]
        return out, [m.aux_loss for m in layers if m.aux_loss is not None]


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP over _WithAux, returning the model's output alone. DDP finds the parameters a step
    leaves out of its graph by walking back from the forward's outputs, and a router's only
    path to the loss is its layer's aux loss (the routing mask is not differentiable): so the
    aux losses go out of the wrapped forward too, or DDP would count a learning router
    unused and then fail when its gradient arrives ("marked as ready twice")."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return super().forward(*args, **kwargs)[0]


def wrap(net: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """The model DDP trains (`net` itself for a single process).

    find_unused_parameters: a RoutedAttention's router gets no gradient during its warm-up,
    nor with target="loss" at the first step after it (no probe labels yet), so some steps
    leave parameters out of the graph; DDP then leaves their gradient None on every rank, as
    the single process does (AdamW skips them: the same optimizer state). static_graph would
    be wrong: the graph changes when the warm-up ends. A model without RoutedAttention (the
    dense sdpa transformer) uses every parameter at every step."""
    if not d.on:
        return net
    routed = any(isinstance(m, RoutedAttention) for m in net.modules())
    return _DDP(_WithAux(net), device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=routed)


def losses(task, out: Tensor, pred: Tensor | None, batch: dict[str, Tensor], net: nn.Module,
           d: Dist) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """(task loss, its parts, RoutedAttention aux loss) of this rank's forward; `net` is the
    model without its DDP wrapper (the layers hold their aux losses).

    Several processes: DDP averages the ranks' gradients, but each loss term is a mean over
    this rank's elements (query tokens, routed tokens), whose number varies between ranks.
    The mean of per-rank means is not the global batch's mean, so each rank's term is
    weighted by N * n_rank / n_global (counts all-reduced; each at least 1, as the losses'
    own denominators): the average of sum_rank / n_rank * N n_rank / n_global over the N
    ranks is sum / n_global, the single process's mean. The task's terms name their counts
    (Task.loss_counts); a RoutedAttention's consolidation loss and its target="predict"
    router loss are means over its routed tokens (last_mask). Its target="loss" router loss
    is a mean over the last step's probes weighted by their regret, which the layer does not
    expose: it gets the routed tokens' weight too, so with target="loss" the router's
    gradient is an approximation of the single process's (the other parameters' are not)."""
    if not d.on:
        loss, parts = task.loss(out, pred, batch)
        return loss, parts, aux_losses(net)
    layers = [m for m in net.modules() if isinstance(m, RoutedAttention) and m.aux_loss is not None]
    counts = task.loss_counts(batch)
    local = torch.stack([*(c.double() for c in counts.values()), *(m.last_mask.sum().double() for m in layers)])
    total = local.clone()
    dist.all_reduce(total)
    w = shares(local, total, d.world)
    loss, parts = task.loss(out, pred, batch, weights=dict(zip(counts, w)))
    if not layers:
        return loss, parts, aux_losses(net)
    aux = torch.stack([m.aux_loss * wl for m, wl in zip(layers, w[len(counts):])]).sum()
    return loss, parts, aux


def shares(local: Tensor, total: Tensor, world: int) -> Tensor:
    """The weights of `losses`: world * local / total, each count at least 1 (float32)."""
    return (world * local.clamp_min(1) / total.clamp_min(1)).float()


def mean(values: Tensor, d: Dist) -> Tensor:
    """The mean over the ranks of `values` (the same tensor for a single process)."""
    if not d.on:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / d.world


def logged_means(loss: Tensor, aux: Tensor, parts: dict[str, Tensor], net: nn.Module,
                 d: Dist) -> tuple[dict[str, float], dict[str, float]]:
    """The training numbers a step logs, as means over the ranks, in one device-to-host copy:
    loss, aux_loss, utilization and attn_flop_fraction (over the routed layers of `net`, 1
    without any), and the loss's parts."""
    util, flops = routing_stats(net)
    ones = torch.ones((), device=loss.device)
    values = torch.stack([loss.detach().float(), aux.detach().float(), torch.stack(util).mean() if util else ones,
                          torch.stack(flops).mean() if flops else ones, *(v.float() for v in parts.values())])
    loss_v, aux_v, util_v, flop_v, *part_v = mean(values, d).tolist()
    return ({"loss": loss_v, "aux_loss": aux_v, "utilization": util_v, "attn_flop_fraction": flop_v},
            dict(zip(parts, part_v)))


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's `obj`, on every rank."""
    if not d.on:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _cpu(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


def rank_states(net: nn.Module, d: Dist) -> list[dict] | None:
    """Every rank's random generators (the CPU's and its GPU's) and modules' extra state (a
    RoutedAttention's probe labels are of its own rows), for the checkpoint; None for a
    single process. All ranks must call it."""
    if not d.on:
        return None
    device = next(net.parameters()).device
    mine = {"rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "extra": _cpu({k: v for k, v in net.state_dict().items() if k.endswith("_extra_state")})}
    states: list[Any] = [None] * d.world
    dist.all_gather_object(states, mine)
    return states


def restore_rank_state(state: dict, net: nn.Module, d: Dist) -> None:
    """Set this rank's random generators (and extra state) from a checkpoint. One written by
    another number of processes gives rank 0 its rank 0's generators (or the single
    process's), and the other ranks keep their fresh seeds: the run goes on, with the same
    examples and gradients, but not the same random draws as it would have."""
    ranks = state.get("ranks")
    if ranks is not None and len(ranks) == d.world:
        mine = ranks[d.rank]
        torch.set_rng_state(mine["rng_cpu"])
        if mine["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["rng_cuda"])  # this rank's device (setup made it the current one)
        net.load_state_dict(mine["extra"], strict=False)
        return
    if (ranks is not None or d.on) and d.main:
        print(f"--resume: the checkpoint was written by {len(ranks) if ranks else 1} process(es), this run has "
              f"{d.world}: the random draws (exploration, probes) do not continue exactly", file=sys.stderr)
    if d.main:
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])


def finish(completed: bool = False) -> None:
    """Leave the process group, if this process joined one. After a completed run the ranks
    first meet at a barrier, so that none tears its connections down while another still
    works (rank 0 writes the summary after the others are done; a rank that left early made
    the other abort in gloo's teardown, once in many runs: "terminate called without an active
    exception"). After a failure nobody waits: the other ranks may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()
