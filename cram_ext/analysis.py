"""Analysis of a training run's utilization curve: transition step, power-law fit, summary, plots.

Definitions (docs/results.md uses them):
  transition step: the first evaluated step whose utilization is at or below the geometric
      mean of the first and the last evaluated utilization (half-way on a log scale).
  gamma: the exponent of the power law u(step) = a * step^(-gamma), fitted by least squares
      on log u against log step over the evaluated steps from the transition step on, with
      its 95% confidence interval and the fit's r2 (below 0.8 the fit is called poor).

  routing breakdown (SRCD): which kinds of token the trained model sends to attention, in
      eval mode on the run's evaluation examples: novel-key queries, recurring-key queries,
      stores, the two steps right after a query, and the other (observe) steps.

    python -m cram_ext.analysis RUN_DIR            # (re)draws RUN_DIR/utilization.png and .pdf from metrics.jsonl
    python -m cram_ext.analysis RUN_DIR --baseline DENSE_RUN_DIR --baseline "name=1.126"  # quality baselines
    python -m cram_ext.analysis RUN_DIR --routing  # prints the routing breakdown as JSON
    python -m cram_ext.analysis RESULTS.json ... --tradeoff PNG  # quality against utilization of run_many runs
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


def quality_key(records: list[dict]) -> str | None:
    """The quality metric (QUALITY) of a run's records; None if no evaluation has one."""
    ev = [r for r in records if "eval_utilization" in r]
    return next((k for k in QUALITY if ev and k in ev[0]), None)


def eval_curve(records: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """(steps, eval utilization, the task's quality metric) of the evaluation records."""
    ev = [r for r in records if "eval_utilization" in r]
    key = quality_key(ev)
    return [r["step"] for r in ev], [r["eval_utilization"] for r in ev], [r[key] if key else math.nan for r in ev]


def fit_curve(steps: list[int], utilization: list[float]) -> tuple[int | None, PowerLawFit | None]:
    """(transition step, power-law fit from it on) of a utilization curve."""
    t = transition_step(steps, utilization)
    return t, power_law_fit(steps, utilization, t)


QUALITY_KEYS = ("retrieval_acc", "retrieval_acc_novel", "retrieval_acc_recurring", "eval_mse", "eval_bpb")


def summarize(run_dir: Path, args: argparse.Namespace, quality: str, wall_s: float) -> dict:
    """summary.json of a finished `python -m cram_ext.train` run (its transfer evaluation
    aside): the utilization's start, end and reduction, the last evaluation's quality metrics
    (`quality`, the task's, first), the transition step and the power-law fit."""
    records = read_metrics(run_dir)
    last = [r for r in records if "eval_utilization" in r][-1]
    steps, util, _ = eval_curve(records)
    t, fit = fit_curve(steps, util)
    u0, u1 = util[0], util[-1]
    return {
        "task": args.task, "model": args.model, "routing": args.routing, "steps": args.steps,
        "utilization_start": u0, "utilization_end": u1, "reduction": u0 / u1 if u1 > 0 else math.inf,
        "attn_flop_fraction_end": last["eval_attn_flop_fraction"], "quality": quality,
        **{k: last[k] for k in QUALITY_KEYS if k in last},
        "gamma": fit.gamma if fit else None, "gamma_ci95": fit.gamma_ci95 if fit else None,
        "gamma_fit_r2": fit.r2 if fit else None, "gamma_fit_poor": fit.poor if fit else None,
        "transition_step": t, "wall_s": wall_s,
    }


def summary_line(s: dict, path: Path) -> str:
    """The line the trainer prints at the end of a run, of its summary `s` (at `path`)."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    result = (f"validation {s['eval_bpb']:.3f} bits per byte" if "eval_bpb" in s else
              f"retrieval accuracy {pct(s['retrieval_acc'])} (novel {pct(s.get('retrieval_acc_novel'))}, "
              f"recurring {pct(s.get('retrieval_acc_recurring'))})")
    return (f"utilization {s['utilization_start']:.4f} -> {s['utilization_end']:.4f} ({s['reduction']:.1f}x "
            f"reduction); {result}; {s['wall_s']:.0f} s; summary in {path}")


# Figures: a PNG at PNG_DPI and a PDF beside it; utilization in percent on a log axis, retrieval
# accuracy in percent, bits per byte as they are; legends right of the panels, off the curves.
PNG_DPI = 200
QUALITY_LABELS = {"retrieval_acc": "retrieval accuracy", "eval_bpb": "validation bits per byte"}
UTIL_FLOOR = 0.01  # percent: utilization 0 (no attention) is drawn here on the log axis


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _percent(value: float, _pos: int | None = None) -> str:
    """A tick label of a value in percent: 0.1%, 1%, 10%, 100%."""
    return f"{value:g}%"


def _is_percent(key: str) -> bool:
    """Whether the quality metric `key` is a fraction shown in percent (accuracies) rather than as it is (bpb)."""
    return key.startswith("retrieval_acc")


def _utilization_axis(ax, lowest: float) -> None:
    """The y axis of ax: utilization in percent, log scale from a decade at or below `lowest`
    (and 10% at most) to 100%; labels at the decades, and at 2x and 5x when the axis spans
    two decades or less."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    bottom = min(10.0 ** math.floor(math.log10(max(lowest, UTIL_FLOOR))), 10.0)
    ax.set_yscale("log")
    ax.set_ylim(bottom, 130.0)
    few_decades = math.log10(130.0 / bottom) <= 2.2

    def minor(value: float, _pos: int | None = None) -> str:
        mantissa = round(value / 10 ** math.floor(math.log10(value)))
        return _percent(value) if few_decades and mantissa in (2, 5) else ""

    ax.yaxis.set_major_locator(LogLocator(base=10.0))
    ax.yaxis.set_major_formatter(FuncFormatter(_percent))
    ax.yaxis.set_minor_locator(LogLocator(base=10.0, subs=tuple(range(2, 10))))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _quality_axis(ax, key: str) -> None:
    """The y axis of ax: the quality metric `key`, accuracies in percent (0 to 100%)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_ylabel(QUALITY_LABELS.get(key, key.replace("_", " ")))
    if _is_percent(key):
        ax.set_ylim(0, 102)
        ax.yaxis.set_major_formatter(FuncFormatter(_percent))


def _legend_outside(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False)


def _save(fig, png: Path) -> Path:
    """png at PNG_DPI and the same figure as a PDF beside it; returns png."""
    png = Path(png)
    fig.savefig(png, dpi=PNG_DPI, bbox_inches="tight")
    fig.savefig(png.with_suffix(".pdf"), bbox_inches="tight", metadata={"CreationDate": None})
    _pyplot().close(fig)
    return png


def gamma_label(fit: PowerLawFit) -> str:
    lo, hi = fit.gamma_ci95
    return (f"power law, γ = {fit.gamma:.2f} (95% CI {lo:.2f} to {hi:.2f}), r² = {fit.r2:.2f}"
            + (" (poor fit)" if fit.poor else ""))


def run_figure(run_dir: Path, title: str = "", baselines: dict[str, float] | None = None):
    """The figure of `plot_run` (a matplotlib Figure): above, the share of tokens routed to
    attention (percent, log scale) over training steps, in training (with exploration) and
    evaluation, with the transition step and the power-law fit from it on (gamma and its 95%
    confidence interval in the legend); below, on the same steps, the task's quality
    (retrieval accuracy in percent, novel and recurring keys apart; or validation bits per
    byte), and each of `baselines` (name: the quality another model reached, e.g.
    {"dense attention": 1.126}, in the metric's own unit) as a horizontal line."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(run_dir)
    train = [r for r in records if "utilization" in r]
    ev = [r for r in records if "eval_utilization" in r]
    steps, util, _ = eval_curve(records)
    key = quality_key(ev)
    fig, (ax_u, ax_q) = plt.subplots(2, 1, sharex=True, figsize=(7.0, 6.0), gridspec_kw={"height_ratios": [3, 2]})
    pct = lambda values: [max(100 * u, UTIL_FLOOR) for u in values]  # noqa: E731
    if train:
        ax_u.plot([r["step"] for r in train], pct(r["utilization"] for r in train), color="0.75", lw=0.8,
                  label="training (with exploration)")
    ax_u.plot(steps, pct(util), "o-", color="C0", ms=3, label="evaluation")
    t, fit = fit_curve(steps, util)
    if fit is not None:
        xs = [s for s in steps if s >= t and s > 0]
        ax_u.plot(xs, pct(fit.a * s**-fit.gamma for s in xs), color="C3", lw=1.5, label=gamma_label(fit))
    if t is not None:
        ax_u.axvline(t, color="C3", ls="--", lw=1, label=f"transition step {t}")
        ax_q.axvline(t, color="C3", ls="--", lw=1)
    _utilization_axis(ax_u, min(pct(util + [r["utilization"] for r in train]), default=100.0))
    ax_u.set_ylabel("tokens routed to attention")
    ax_u.set_title(title or run_dir.name)
    if key is not None:
        scale = 100.0 if _is_percent(key) else 1.0
        curves = [(key, "all keys" if _is_percent(key) else "evaluation", "s-", "C2")]
        if _is_percent(key):
            curves += [(f"{key}_novel", "novel keys", ".--", "C1"), (f"{key}_recurring", "recurring keys", ".:", "C4")]
        for k, label, style, color in curves:
            values = [math.nan if r.get(k) is None else scale * r[k] for r in ev]
            if any(not math.isnan(v) for v in values):
                ax_q.plot(steps, values, style, color=color, ms=3, lw=1.5 if k == key else 1.0, label=label)
        for i, (name, value) in enumerate((baselines or {}).items()):
            ax_q.axhline(scale * value, color=f"C{5 + i}", ls="-.", lw=1.2, label=name)
        _quality_axis(ax_q, key)
        _legend_outside(ax_q)
    ax_q.set_xlabel("training step")
    ax_q.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_u, ax_q):
        ax.grid(alpha=0.3, which="major")
    _legend_outside(ax_u)
    fig.align_ylabels((ax_u, ax_q))
    return fig


def plot_run(run_dir: Path, title: str = "", baselines: dict[str, float] | None = None) -> Path:
    """`run_figure`, written to run_dir/utilization.png (200 dpi) and utilization.pdf."""
    return _save(run_figure(run_dir, title, baselines), run_dir / "utilization.png")


def baseline_of(run_dir: Path) -> tuple[str, float]:
    """(name, final quality) of a finished run, from its summary.json: a baseline of plot_run."""
    s = json.loads((Path(run_dir) / "summary.json").read_text())
    return f"{s['routing']} routing ({s['model']})", s[s["quality"]]


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


def tradeoff_figure(results: list[dict], quality: str = "eval_bpb"):
    """The figure of `plot_tradeoff` (a matplotlib Figure)."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, SymmetricalLogLocator

    series: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        last = r["eval"][-1] if r.get("eval") else None
        if last is not None and quality in last:
            series.setdefault(routing_kind(r["command"]), []).append((last["eval_utilization"], last[quality]))
    scale = 100.0 if _is_percent(quality) else 1.0
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {"learned": "o-", "static": "s--", "dense": "D", "none": "X"}
    for kind, points in sorted(series.items()):
        points.sort()
        (line,) = ax.plot([100 * u for u, _ in points], [scale * q for _, q in points], styles.get(kind, "o"), ms=6,
                          label=kind)
        if kind == "dense":
            for i, (_, q) in enumerate(points):
                ax.axhline(scale * q, color=line.get_color(), ls="-.", lw=1, label="dense quality" if i == 0 else None)
    ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
    ax.set_xlim(-0.3, 130)  # 0% (routing none) off the frame
    ax.xaxis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=1.0))
    ax.xaxis.set_minor_locator(SymmetricalLogLocator(base=10, linthresh=1.0, subs=tuple(range(2, 10))))
    ax.xaxis.set_major_formatter(FuncFormatter(_percent))
    ax.set_xlabel("tokens routed to attention (mean over layers, evaluation)")
    _quality_axis(ax, quality)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def plot_tradeoff(results: list[dict], out: Path, quality: str = "eval_bpb") -> Path:
    """Final quality against final eval utilization (mean over layers; percent, on a scale
    linear up to 1% and logarithmic above, so that routing none's 0% shows) of the runs of
    scripts/run_many.py results, one series per kind of routing, dense attention's quality
    also as a horizontal line; written to out (a PNG, 200 dpi) and a PDF beside it."""
    return _save(tradeoff_figure(results, quality), out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, nargs="+", help="a run folder; with --tradeoff, run_many results files")
    p.add_argument("--routing", action="store_true",
                   help="print the routing breakdown (SRCD, MQAR) instead of plotting")
    p.add_argument("--tradeoff", type=Path, metavar="PNG",
                   help="plot final bits per byte against utilization of the runs in the results files")
    p.add_argument("--baseline", action="append", default=[], metavar="RUN_DIR|NAME=VALUE",
                   help="a quality to draw as a horizontal line: a finished run's (its summary.json) or a value")
    args = p.parse_args(argv)
    if args.tradeoff:
        results = [r for f in args.run_dir for r in json.loads(f.read_text())]
        print(plot_tradeoff(results, args.tradeoff))
        return 0
    args.run_dir = args.run_dir[0]
    if args.routing:
        print(json.dumps(routing_breakdown(args.run_dir), indent=1))
    else:
        baselines = dict(b.split("=", 1) if "=" in b else baseline_of(Path(b)) for b in args.baseline)
        print(plot_run(args.run_dir, baselines={k: float(v) for k, v in baselines.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
