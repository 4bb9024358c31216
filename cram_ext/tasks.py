"""The training tasks of `python -m cram_ext.train`: batches, loss and evaluation of each.

- srcd: sparse retrieval in continuous dynamics (docs/tasks.md), continuous inputs.
- mqar: multi-query associative recall with recurring pairs, tokens.
- lm: byte-level language modelling on the Python standard library's source (data/text.py).

A task's `evaluate` returns its quality metrics (the one summaries lead with named in
`quality`) and the routing's: eval_utilization (mean over layers and per layer) and
eval_attn_flop_fraction, measured in eval mode (no exploration or probes).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import IGNORE, mqar, srcd, srcd_input_dim
from .data.text import even_windows, random_windows, stdlib_corpus

EVAL_SEED = 1_000_000_007  # evaluation examples come from seeds no training step uses


def to_device(batch: Any, device: torch.device, rows: slice | None = None) -> dict[str, Tensor]:
    """The tensor fields of a task's batch dataclass (only `rows` of them, when given), moved
    to device. On CUDA through pinned memory without blocking, so that the host does not wait
    for the GPU at every field."""
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    if rows is not None:
        fields = {k: v[rows] for k, v in fields.items()}
    if device.type != "cuda":
        return {k: v.to(device) for k, v in fields.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in fields.items()}


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def routing_stats(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Per routed layer: utilization and attention FLOP fraction of the last forward."""
    layers = model.routed_attention_layers()
    return [m.last_stats["utilization"] for m in layers], [m.last_stats["attn_flop_fraction"] for m in layers]


class Task:
    """What the trainer needs of a task."""

    quality: str  # the metric summaries lead with

    def model_config(self) -> dict: ...

    def data_info(self) -> dict | None:
        """What config.json records of the task's data ("data"); None for generated data."""
        return None

    def batch(self, n: int, seed: int, device: torch.device, rows: slice | None = None) -> dict[str, Tensor]:
        """n training examples drawn from `seed`; of them only `rows` when given (a rank's
        share of the global batch: the same examples whatever the number of processes)."""

    def eval_batch(self, n: int, seed: int, device: torch.device) -> dict[str, Tensor]:
        """Held-out examples: from seeds no training step uses (a task with a validation
        split reads that instead)."""
        return self.batch(n, EVAL_SEED + seed, device)
    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]: ...
    def loss(self, out: Tensor, pred: Tensor | None, batch: dict[str, Tensor],
             weights: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss and its parts (detached, for the log). `weights`, by part name,
        multiplies each term and its part (several processes: distributed.losses)."""

    def loss_counts(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """For each term of `loss` (by its part's name), the number of elements it is a mean
        over in `batch`. With several processes, each rank's term is weighted by its share of
        the global count, so that the averaged gradient is that of the global batch's mean."""

    def _metric_sums(self, out: Tensor, pred: Tensor | None, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sums over one chunk of evaluation examples; `_finish` turns their totals into metrics."""
        raise NotImplementedError

    def _finish(self, sums: dict[str, float]) -> dict[str, Any]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: dict[str, Tensor], device: torch.device, chunk: int = 128) -> dict:
        was_training = model.training
        model.eval()
        n = next(iter(batch.values())).shape[0]
        sums: dict[str, Tensor] = {}
        util, flops = [], []
        for i in range(0, n, chunk):
            part = {k: v[i : i + chunk] for k, v in batch.items()}
            with autocast(device):
                out, pred = self.forward(model, part)
            for k, v in self._metric_sums(out, pred, part).items():
                sums[k] = sums.get(k, 0) + v
            u, f = routing_stats(model)
            w = part[next(iter(part))].shape[0] / n
            if u:
                util.append(torch.stack(u) * w)
                flops.append(torch.stack(f) * w)
        model.train(was_training)
        result = self._finish({k: float(v) for k, v in sums.items()})
        per_layer = torch.stack(util).sum(0) if util else torch.ones(1)
        result.update(eval_utilization=float(per_layer.mean()),
                      eval_utilization_per_layer=[round(float(u), 6) for u in per_layer],
                      eval_attn_flop_fraction=float(torch.stack(flops).sum(0).mean()) if flops else 1.0)
        return result


class RetrievalTask(Task):
    """Accuracy at query positions (labels != IGNORE), novel and recurring keys apart."""

    quality = "retrieval_acc"

    def _metric_sums(self, out, pred, batch):
        q = batch["labels"] != IGNORE
        correct = (out.argmax(-1) == batch["labels"]) & q
        rec = batch["recurring"] & q
        return {"correct": correct.sum(), "queries": q.sum(), "correct_rec": (correct & rec).sum(),
                "queries_rec": rec.sum()}

    def _finish(self, s):
        novel = s["queries"] - s["queries_rec"]
        return {
            "retrieval_acc": s["correct"] / max(s["queries"], 1),
            "retrieval_acc_novel": (s["correct"] - s["correct_rec"]) / novel if novel else None,
            "retrieval_acc_recurring": s["correct_rec"] / s["queries_rec"] if s["queries_rec"] else None,
        }


class SRCDTask(RetrievalTask):
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

    def batch(self, n, seed, device, rows=None):
        return to_device(srcd(n, seed=seed, **self.kw), device, rows)

    def forward(self, model, batch):
        out = model(batch["inputs"], batch["dt"]).float()
        d = self.kw["obs_dim"]
        return out[..., d:], out[..., :d]  # value logits, next-observation prediction

    def loss(self, logits, pred, batch, weights=None):
        ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
        sq, count = self.squared_error(pred, batch)
        mse = sq / count.clamp_min(1)
        if weights is not None:
            ce, mse = ce * weights["ce"], mse * weights["mse"]
        return ce + self.mse_weight * mse, {"ce": ce.detach(), "mse": mse.detach()}

    def loss_counts(self, batch):
        return {"ce": (batch["labels"] != IGNORE).sum(), "mse": batch["target_mask"].sum()}

    @staticmethod
    def squared_error(pred: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Sum of the next-observation squared errors over the steps that have a target, and
        the number of terms summed."""
        m = batch["target_mask"].unsqueeze(-1).float()
        return ((pred - batch["targets"]).pow(2) * m).sum(), m.sum() * pred.shape[-1]

    def _metric_sums(self, out, pred, batch):
        sq, count = self.squared_error(pred, batch)
        return {**super()._metric_sums(out, pred, batch), "sq": sq, "sq_count": count}

    def _finish(self, s):
        return {**super()._finish(s), "eval_mse": s["sq"] / max(s["sq_count"], 1)}


class MQARTask(RetrievalTask):
    """Multi-query associative recall, with recurring pairs (docs/tasks.md)."""

    def __init__(self, args: argparse.Namespace, **variant: Any) -> None:
        self.kw = dict(
            seq_len=args.seq_len, num_kv_pairs=args.num_kv_pairs, vocab_size=args.vocab_size,
            recurring_frac=args.recurring_frac, num_recurring_pairs=args.num_recurring_pairs, table_seed=args.table_seed,
        )
        self.kw.update(variant)

    def model_config(self) -> dict:
        return {"vocab_size": self.kw["vocab_size"], "max_len": self.kw["seq_len"]}

    def batch(self, n, seed, device, rows=None):
        return to_device(mqar(n, seed=seed, **self.kw), device, rows)

    def forward(self, model, batch):
        return model(batch["inputs"]).float(), None

    def loss(self, logits, pred, batch, weights=None):
        ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
        if weights is not None:
            ce = ce * weights["ce"]
        return ce, {"ce": ce.detach()}

    def loss_counts(self, batch):
        return {"ce": (batch["labels"] != IGNORE).sum()}


class LMTask(Task):
    """Next-byte prediction on the standard library's source; quality: validation bits per byte."""

    quality = "eval_bpb"

    def __init__(self, args: argparse.Namespace, **variant: Any) -> None:
        self.seq_len = variant.get("seq_len", args.seq_len)
        self.corpus = stdlib_corpus()

    def model_config(self) -> dict:
        return {"vocab_size": 256, "max_len": self.seq_len}

    def data_info(self) -> dict:
        return self.corpus.meta  # the corpus' source, Python version, files and bytes

    def batch(self, n, seed, device, rows=None):
        return to_device(random_windows(self.corpus.train, n, self.seq_len, seed), device, rows)

    def eval_batch(self, n, seed, device):
        """Fixed windows spread over the validation files (the same for every seed)."""
        return to_device(even_windows(self.corpus.valid, n, self.seq_len), device)

    def forward(self, model, batch):
        return model(batch["inputs"]).float(), None

    def loss(self, logits, pred, batch, weights=None):
        ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        if weights is not None:
            ce = ce * weights["bpb"]
        return ce, {"bpb": ce.detach() / math.log(2)}

    def loss_counts(self, batch):
        # new_full fills on the device; torch.tensor(n, device="cuda") is a blocking copy from
        # the host, which waits for the step's forward at every step.
        labels = batch["labels"]
        return {"bpb": labels.new_full((), labels.numel())}

    def _metric_sums(self, out, pred, batch):
        ce = F.cross_entropy(out.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
        return {"nats": ce, "bytes": torch.tensor(batch["labels"].numel())}

    def _finish(self, s):
        return {"eval_bpb": s["nats"] / s["bytes"] / math.log(2)}


TASKS = {"srcd": SRCDTask, "mqar": MQARTask, "lm": LMTask}


def make_task(args: argparse.Namespace, **variant: Any) -> Task:
    return TASKS[args.task](args, **variant)


def transfer_variant(args: argparse.Namespace) -> dict[str, Any] | None:
    """An unseen variant of the task for the transfer evaluation (None: the task has none).
    SRCD: twice the sequence length, stores and queries, and faster, less damped dynamics.
    MQAR: twice the key-value pairs (as far as the sequence holds them), the recurring ones
    as many as the fixed table holds."""
    if args.task == "srcd":
        return {"seq_len": 2 * args.seq_len, "num_stores": 2 * args.num_stores, "num_queries": 2 * args.num_queries,
                "freq_range": (3.0, 6.0), "damping_range": (0.005, 0.02)}
    if args.task == "mqar":
        kv = min(2 * args.num_kv_pairs, args.seq_len // 4)
        return {"num_kv_pairs": kv, "recurring_frac": min(args.recurring_frac, args.num_recurring_pairs / kv)}
    return None


def evaluate_transfer(args: argparse.Namespace, model: nn.Module, device: torch.device) -> dict[str, Any] | None:
    """The transfer evaluation of a trained model (summary.json's "transfer"): the variant and
    the task's evaluation on it; None when the task has no variant."""
    variant = transfer_variant(args)
    if variant is None:
        return None
    task = make_task(args, **variant)
    return {"variant": variant, **task.evaluate(model, task.eval_batch(args.eval_examples, 1, device), device)}
