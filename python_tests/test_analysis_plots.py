"""The figures of cram_ext.analysis: a run's utilization and quality in separate panels
(utilization in percent on a log axis, retrieval accuracy in percent, bits per byte as they
are), the power law's gamma with its 95% interval in the legend, baselines as lines, legends
off the curves, and a PNG at 200 dpi with a PDF beside it; the trade-off plot alike."""

from __future__ import annotations

import json
import math

import pytest

from cram_ext import analysis

pytest.importorskip("matplotlib")
pytest.importorskip("scipy")


def write_run(run_dir, task="srcd"):
    """metrics.jsonl of a run whose utilization falls from 100% as 3 step^-0.43 after step 200."""
    lines = []
    for step in range(0, 2001, 20):
        u = 1.0 if step < 200 else 3.0 * step**-0.43 * math.exp(0.03 * math.sin(step))
        r = {"step": step, "loss": 1.0, "utilization": min(1.0, 1.1 * u), "attn_flop_fraction": u}
        if step % 100 == 0:
            q = ({"eval_bpb": 2.0 + math.exp(-step / 500)} if task == "lm" else
                 {"retrieval_acc": 1 - 0.9 * math.exp(-step / 400), "retrieval_acc_novel": None if step == 0 else 0.5,
                  "retrieval_acc_recurring": 0.9})
            r = {**q, "eval_utilization": u, **r}
        lines.append(json.dumps(r))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def labels(axis, minor=False):
    """The non-empty tick labels of a matplotlib axis inside its view (after a draw)."""
    lo, hi = sorted(axis.get_view_interval())
    locs = axis.get_minorticklocs() if minor else axis.get_majorticklocs()
    return [t.get_text() for loc, t in zip(locs, axis.get_ticklabels(minor=minor)) if lo <= loc <= hi and t.get_text()]


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def assert_legend_outside(fig, ax):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1, "legend over the panel"


def test_run_plot_files(tmp_path):
    png = analysis.plot_run(write_run(tmp_path), title="srcd", baselines={"dense attention": 0.97})
    assert png == tmp_path / "utilization.png" and png.stat().st_size > 10_000
    pdf = tmp_path / "utilization.pdf"
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000
    Image = pytest.importorskip("PIL.Image")
    assert Image.open(png).info["dpi"] == pytest.approx((200, 200), abs=0.01)


def test_run_plot_retrieval_panels(tmp_path):
    fig = analysis.run_figure(write_run(tmp_path), baselines={"dense attention": 0.97})
    ax_u, ax_q = fig.axes
    fig.canvas.draw()
    # Utilization: percent on a log axis, the decades labelled (and 2x, 5x: it spans under two decades).
    assert ax_u.get_yscale() == "log"
    major = labels(ax_u.yaxis)
    assert {"10%", "100%"} <= set(major) and all(t.endswith("%") for t in major), major
    assert {"20%", "50%"} <= set(labels(ax_u.yaxis, minor=True))
    assert ax_u.get_ylim()[1] > 100 and ax_u.get_ylim()[0] <= 10
    t, fit = analysis.fit_curve(*analysis.eval_curve(analysis.read_metrics(tmp_path))[:2])
    assert t == 200 and fit.gamma == pytest.approx(0.43, abs=0.02)
    lo, hi = fit.gamma_ci95
    assert f"power law, γ = {fit.gamma:.2f} (95% CI {lo:.2f} to {hi:.2f})" in " ".join(legend_texts(ax_u))
    assert "transition step 200" in legend_texts(ax_u)
    # Quality: accuracy in percent in its own panel, novel and recurring keys, the baseline.
    assert ax_q.get_yscale() == "linear" and ax_q.get_ylabel() == "retrieval accuracy"
    quality = labels(ax_q.yaxis)
    assert "0%" in quality and "100%" in quality and all(t.endswith("%") for t in quality), quality
    assert {"all keys", "novel keys", "recurring keys", "dense attention"} <= set(legend_texts(ax_q))
    dense = next(line for line in ax_q.get_lines() if line.get_label() == "dense attention")
    assert dense.get_ydata()[0] == pytest.approx(97.0)
    assert ax_q.get_xlabel() == "training step"
    for ax in (ax_u, ax_q):
        assert_legend_outside(fig, ax)
    analysis._pyplot().close(fig)


def test_run_plot_text_quality_in_bits_per_byte(tmp_path):
    fig = analysis.run_figure(write_run(tmp_path, task="lm"), baselines={"dense attention": 1.126})
    ax_u, ax_q = fig.axes
    fig.canvas.draw()
    assert all(t.endswith("%") for t in labels(ax_u.yaxis))
    assert ax_q.get_ylabel() == "validation bits per byte"
    assert labels(ax_q.yaxis) and not any("%" in t for t in labels(ax_q.yaxis))
    dense = next(line for line in ax_q.get_lines() if line.get_label() == "dense attention")
    assert dense.get_ydata()[0] == pytest.approx(1.126)
    analysis._pyplot().close(fig)


def test_analysis_cli_baseline_from_a_run(tmp_path):
    run, dense = tmp_path / "run", tmp_path / "dense"
    run.mkdir()
    dense.mkdir()
    write_run(run)
    (dense / "summary.json").write_text(json.dumps({"routing": "dense", "model": "cram", "quality": "retrieval_acc",
                                                    "retrieval_acc": 0.93}))
    assert analysis.baseline_of(dense) == ("dense routing (cram)", 0.93)
    assert analysis.main([str(run), "--baseline", str(dense), "--baseline", "static top-k=0.8"]) == 0
    assert (run / "utilization.png").exists() and (run / "utilization.pdf").exists()


def test_tradeoff_plot_axes(tmp_path):
    results = [{"command": "python -m cram_ext.train --attention sdpa", "eval": [{"eval_utilization": 1.0,
                                                                                  "eval_bpb": 1.126}]},
               {"command": "python -m cram_ext.train --routing none", "eval": [{"eval_utilization": 0.0,
                                                                                "eval_bpb": 1.56}]}]
    results += [{"command": f"python -m cram_ext.train {flags}", "eval": [{"eval_utilization": u, "eval_bpb": b}]}
                for flags, u, b in [("--target loss", 0.05, 1.3), ("--target loss", 0.2, 1.22),
                                    ("--routing static", 0.2, 1.5)]]
    png = analysis.plot_tradeoff(results, tmp_path / "tradeoff.png")
    assert png.stat().st_size > 10_000 and (tmp_path / "tradeoff.pdf").read_bytes()[:5] == b"%PDF-"
    Image = pytest.importorskip("PIL.Image")
    assert Image.open(png).info["dpi"] == pytest.approx((200, 200), abs=0.01)
    # The figure itself: percent on the utilization axis (0% included), legend outside.
    fig = analysis.tradeoff_figure(results)
    (ax,) = fig.axes
    fig.canvas.draw()
    assert labels(ax.xaxis) == ["0%", "1%", "10%", "100%"]
    assert ax.get_ylabel() == "validation bits per byte"
    assert {"dense", "dense quality", "learned", "static", "none"} <= set(legend_texts(ax))
    assert_legend_outside(fig, ax)
    analysis._pyplot().close(fig)
