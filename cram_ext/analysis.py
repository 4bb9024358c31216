"""Analysis of a training run's utilization curve: transition step, power-law fit, plot.

Definitions (docs/results.md uses them):
  transition step: the first evaluated step whose utilization is at or below the geometric
      mean of the first and the last evaluated utilization (half-way on a log scale).
  gamma: the exponent of the power law u(step) = a * step^(-gamma), fitted by least squares
      on log u against log step over the evaluated steps from the transition step on.

  routing breakdown (SRCD): which kinds of token the trained model sends to attention, in
      eval mode on the run's evaluation examples: novel-key queries, recurring-key queries,
      stores, the two steps right after a query, and the other (observe) steps.

    python -m cram_ext.analysis RUN_DIR            # (re)draws RUN_DIR/utilization.png from metrics.jsonl
    python -m cram_ext.analysis RUN_DIR --routing  # prints the routing breakdown as JSON
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def transition_step(steps: list[int], utilization: list[float]) -> int | None:
    """First step with utilization <= sqrt(u[0] * u[-1]); None without a fall."""
    if len(steps) < 2 or utilization[0] <= 0 or utilization[-1] <= 0 or utilization[-1] >= utilization[0]:
        return None
    mid = math.sqrt(utilization[0] * utilization[-1])
    return next(s for s, u in zip(steps, utilization) if u <= mid)


def power_law_fit(steps: list[int], utilization: list[float], from_step: int | None) -> tuple[float, float] | None:
    """(gamma, a) of u = a * step^-gamma over steps >= from_step (and > 0, u > 0); None if
    fewer than 3 points."""
    if from_step is None:
        return None
    pts = [(math.log(s), math.log(u)) for s, u in zip(steps, utilization) if s >= max(from_step, 1) and u > 0]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return -slope, math.exp(my - slope * mx)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl. A last line cut short (the trainer was killed
    while writing it) is dropped; a bad line before it is an error."""
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return records


def eval_curve(records: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """(steps, eval utilization, retrieval accuracy) of the evaluation records."""
    ev = [r for r in records if "retrieval_acc" in r]
    return [r["step"] for r in ev], [r["eval_utilization"] for r in ev], [r["retrieval_acc"] for r in ev]


def fit_curve(steps: list[int], utilization: list[float]) -> tuple[int | None, tuple[float, float] | None]:
    """(transition step, power-law fit (gamma, a) from it on) of a utilization curve."""
    t = transition_step(steps, utilization)
    return t, power_law_fit(steps, utilization, t)


def plot_run(run_dir: Path, title: str = "") -> Path:
    """Utilization (log scale) and retrieval accuracy over steps, with the power-law fit and
    the transition step; written to run_dir/utilization.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if "utilization" in r]
    steps, util, acc = eval_curve(records)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([r["step"] for r in train], [max(r["utilization"], 1e-4) for r in train], color="0.75", lw=0.8,
                label="utilization (training, with exploration)")
    ax.plot(steps, [max(u, 1e-4) for u in util], "o-", color="C0", ms=3, label="utilization (eval)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of tokens routed to attention")
    t, fit = fit_curve(steps, util)
    if t is not None:
        ax.axvline(t, color="C3", ls="--", lw=1, label=f"transition step {t}")
    if fit is not None:
        gamma, a = fit
        xs = [s for s in steps if s >= t and s > 0]
        ax.plot(xs, [a * s ** -gamma for s in xs], color="C3", lw=1.5, label=f"power law, gamma = {gamma:.2f}")
    ax2 = ax.twinx()
    ax2.plot(steps, acc, "s-", color="C2", ms=3, label="retrieval accuracy (eval)")
    ax2.set_ylabel("retrieval accuracy")
    ax2.set_ylim(0, 1.02)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="center right", fontsize=8)
    ax.set_title(title or run_dir.name)
    fig.tight_layout()
    out = run_dir / "utilization.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def routing_breakdown(run_dir: Path, examples: int = 512) -> dict:
    """The routing breakdown (module docstring) of the SRCD run in run_dir, from its
    config.json and checkpoint.pt, on the CPU: per kind of token, tokens per sequence,
    the fraction of them routed and routed tokens per sequence (first layer)."""
    import torch

    from . import train
    from .data import IGNORE
    from .data.srcd import STORE
    from .models import CRAMConfig, CRAMModel

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    if cfg["task"] != "srcd":
        raise ValueError(f"routing_breakdown: SRCD runs only, {run_dir} is a {cfg['task']!r} run")
    args = argparse.Namespace(**{k: v for k, v in cfg.items() if k != "model"})
    model = CRAMModel(CRAMConfig(**cfg["model"]))
    model.load_state_dict(torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model"])
    model.eval()
    task = train.make_task(args)
    batch = task.batch(examples, train.EVAL_SEED + args.seed, torch.device("cpu"))
    with torch.no_grad():
        task.forward(model, batch)
    mask = model.routed_attention_layers()[0].last_mask

    query = batch["labels"] != IGNORE
    store = batch["inputs"][..., args.obs_dim + STORE] == 1  # the event one-hot follows the observation
    after_query = torch.zeros_like(query)
    after_query[:, 1:] |= query[:, :-1]
    after_query[:, 2:] |= query[:, :-2]
    after_query &= ~query & ~store
    kinds = {
        "novel_query": query & ~batch["recurring"],
        "recurring_query": batch["recurring"],
        "store": store,
        "after_query": after_query,
        "other": ~query & ~store & ~after_query,
    }
    n = mask.shape[0]
    out = {"utilization": mask.float().mean().item(), "examples": n}
    for name, sel in kinds.items():
        count = sel.sum().item()
        out[name] = {
            "tokens_per_seq": count / n,
            "routed_fraction": (mask & sel).sum().item() / max(count, 1),
            "routed_per_seq": (mask & sel).sum().item() / n,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--routing", action="store_true", help="print the routing breakdown (SRCD) instead of plotting")
    args = p.parse_args(argv)
    if args.routing:
        print(json.dumps(routing_breakdown(args.run_dir), indent=1))
    else:
        print(plot_run(args.run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
