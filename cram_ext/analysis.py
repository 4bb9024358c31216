"""Analysis of a training run's utilization curve: transition step, power-law fit, plot.

Definitions (docs/results.md uses them):
  transition step: the first evaluated step whose utilization is at or below the geometric
      mean of the first and the last evaluated utilization (half-way on a log scale).
  gamma: the exponent of the power law u(step) = a * step^(-gamma), fitted by least squares
      on log u against log step over the evaluated steps from the transition step on, with
      its 95% confidence interval and the fit's r2 (below 0.8 the fit is called poor).

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def transition_step(steps: list[int], utilization: list[float]) -> int | None:
    """First step with utilization <= sqrt(u[0] * u[-1]); None without a fall."""
    if len(steps) < 2 or utilization[0] <= 0 or utilization[-1] <= 0 or utilization[-1] >= utilization[0]:
        return None
    mid = math.sqrt(utilization[0] * utilization[-1])
    return next(s for s, u in zip(steps, utilization) if u <= mid)


@dataclass(frozen=True)
class PowerLawFit:
    """u = a * step^-gamma by least squares on (log step, log u): gamma with its 95%
    confidence interval (Student t, n - 2 degrees of freedom), the coefficient of
    determination r2 of the log-log fit, and the number of points. `poor` when r2 < 0.8:
    the curve is not a power law there."""

    gamma: float
    a: float
    gamma_ci95: tuple[float, float]
    r2: float
    points: int

    @property
    def poor(self) -> bool:
        return self.r2 < 0.8


def power_law_fit(steps: list[int], utilization: list[float], from_step: int | None) -> PowerLawFit | None:
    """The power-law fit over steps >= from_step (and > 0, u > 0); None if fewer than 3 points."""
    if from_step is None:
        return None
    pts = [(s, u) for s, u in zip(steps, utilization) if s >= max(from_step, 1) and u > 0]
    if len(pts) < 3 or len({s for s, _ in pts}) < 2:
        return None
    from scipy import stats

    x = np.log([s for s, _ in pts])
    y = np.log([u for _, u in pts])
    fit = stats.linregress(x, y)
    n = len(pts)
    half = float(stats.t.ppf(0.975, n - 2) * fit.stderr)
    r2 = float(fit.rvalue**2) if np.ptp(y) > 0 else 1.0  # a flat curve is fitted exactly
    return PowerLawFit(float(-fit.slope), float(math.exp(fit.intercept)), (-fit.slope - half, -fit.slope + half), r2, n)


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


QUALITY = ("retrieval_acc", "eval_bpb")  # the metric a task's curve shows: retrieval tasks, language modelling


def eval_curve(records: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """(steps, eval utilization, the task's quality metric) of the evaluation records."""
    ev = [r for r in records if "eval_utilization" in r]
    key = next((k for k in QUALITY if ev and k in ev[0]), None)
    return [r["step"] for r in ev], [r["eval_utilization"] for r in ev], [r[key] if key else math.nan for r in ev]


def fit_curve(steps: list[int], utilization: list[float]) -> tuple[int | None, PowerLawFit | None]:
    """(transition step, power-law fit from it on) of a utilization curve."""
    t = transition_step(steps, utilization)
    return t, power_law_fit(steps, utilization, t)


def plot_run(run_dir: Path, title: str = "") -> Path:
    """Utilization (log scale) and the task's quality over steps, with the power-law fit and
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
        xs = [s for s in steps if s >= t and s > 0]
        ci = f"[{fit.gamma_ci95[0]:.2f}, {fit.gamma_ci95[1]:.2f}]"
        ax.plot(xs, [fit.a * s**-fit.gamma for s in xs], color="C3", lw=1.5,
                label=f"power law, gamma = {fit.gamma:.2f} {ci}, r2 = {fit.r2:.2f}" + (" (poor fit)" if fit.poor else ""))
    ax2 = ax.twinx()
    name = "validation bits per byte" if records and any("eval_bpb" in r for r in records) else "retrieval accuracy"
    ax2.plot(steps, acc, "s-", color="C2", ms=3, label=f"{name} (eval)")
    ax2.set_ylabel(name)
    if name == "retrieval accuracy":
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
    """The routing breakdown (module docstring) of the SRCD or MQAR run in run_dir, from its
    config.json and checkpoint.pt, on the CPU: per kind of token, tokens per sequence, the
    fraction of them routed and routed tokens per sequence; for the first routed layer at
    the top level, for every routed layer under "layers"."""
    import torch

    from . import tasks
    from .checkpoint import load_run
    from .data import IGNORE
    from .data.srcd import STORE

    model, cfg = load_run(run_dir)
    if cfg["task"] not in ("srcd", "mqar"):
        raise ValueError(f"routing_breakdown: SRCD and MQAR runs only, {run_dir} is a {cfg['task']!r} run")
    args = argparse.Namespace(**{k: v for k, v in cfg.items() if k not in ("model", "model_config")})
    task = tasks.make_task(args)
    batch = task.eval_batch(examples, args.seed, torch.device("cpu"))
    with torch.no_grad():
        task.forward(model, batch)

    query = batch["labels"] != IGNORE
    if cfg["task"] == "srcd":
        store = batch["inputs"][..., args.obs_dim + STORE] == 1  # the event one-hot follows the observation
        after_query = torch.zeros_like(query)
        after_query[:, 1:] |= query[:, :-1]
        after_query[:, 2:] |= query[:, :-2]
        after_query &= ~query & ~store
        kinds = {"novel_query": query & ~batch["recurring"], "recurring_query": batch["recurring"], "store": store,
                 "after_query": after_query, "other": ~query & ~store & ~after_query}
    else:  # MQAR: the context's keys and values, then queries among filler tokens
        pos = torch.arange(query.shape[1]).expand_as(query)
        context = pos < 2 * args.num_kv_pairs
        kinds = {"novel_query": query & ~batch["recurring"], "recurring_query": batch["recurring"],
                 "context_key": context & (pos % 2 == 0), "context_value": context & (pos % 2 == 1),
                 "other": ~context & ~query}

    def breakdown(mask):
        n = mask.shape[0]
        out = {"utilization": mask.float().mean().item(), "examples": n}
        for name, sel in kinds.items():
            count = sel.sum().item()
            out[name] = {"tokens_per_seq": count / n, "routed_fraction": (mask & sel).sum().item() / max(count, 1),
                         "routed_per_seq": (mask & sel).sum().item() / n}
        return out

    layers = [breakdown(m.last_mask) for m in model.routed_attention_layers()]
    if not layers:
        raise ValueError(f"routing_breakdown: {run_dir} has no routed attention layers")
    return {**layers[0], "layers": layers}


def routing_kind(command: str) -> str:
    """dense, static, none or learned, from a train command line."""
    flags = command.split()
    if "sdpa" in flags:
        return "dense"
    if "--routing" in flags:
        return {"topk": "static"}.get(flags[flags.index("--routing") + 1], flags[flags.index("--routing") + 1])
    return "learned"


def plot_tradeoff(results: list[dict], out: Path, quality: str = "eval_bpb") -> Path:
    """Final quality against final eval utilization (averaged over layers) of the runs of
    scripts/run_many.py results, one series per kind of routing; written to out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        last = r["eval"][-1] if r.get("eval") else None
        if last is not None and quality in last:
            series.setdefault(routing_kind(r["command"]), []).append((last["eval_utilization"], last[quality]))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {"learned": "o-", "static": "s--", "dense": "D", "none": "X"}
    for kind, points in sorted(series.items()):
        points.sort()
        ax.plot(*zip(*points), styles.get(kind, "o"), ms=6, label=kind)
    ax.set_xlabel("utilization (fraction of tokens attending, mean over layers, eval)")
    ax.set_ylabel(quality.replace("eval_", "validation ").replace("bpb", "bits per byte"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, nargs="+", help="a run folder; with --tradeoff, run_many results files")
    p.add_argument("--routing", action="store_true",
                   help="print the routing breakdown (SRCD, MQAR) instead of plotting")
    p.add_argument("--tradeoff", type=Path, metavar="PNG",
                   help="plot final bits per byte against utilization of the runs in the results files")
    args = p.parse_args(argv)
    if args.tradeoff:
        results = [r for f in args.run_dir for r in json.loads(f.read_text())]
        print(plot_tradeoff(results, args.tradeoff))
        return 0
    args.run_dir = args.run_dir[0]
    if args.routing:
        print(json.dumps(routing_breakdown(args.run_dir), indent=1))
    else:
        print(plot_run(args.run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
