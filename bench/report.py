"""Markdown summary of the JSON records in bench/results/, for the README.

    python -m bench.report            # every device found in bench/results/
    python -m bench.report --device cpu

Each table compares records of one run: cram beside its baselines (each registered Bench's
`baselines`, in order) at the same shape, dtype, pass (and density), and reads bandwidth
against the run's own copy record. Runs of bench/runs/ are not read: a run reaches
these tables with --record.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from . import registry
from .records import RESULTS_DIR as RESULTS


def load(device: str | None) -> dict[str, list[dict]]:
    """Records by device name, skipping --quick smoke runs."""
    by_device: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(RESULTS.glob("*.json")):
        if path.stem.endswith("_quick"):
            continue
        for rec in json.loads(path.read_text()):
            if device is None or rec["device"] == device:
                by_device[rec["device"]].append(rec)
    return by_device


def shape_str(shape: dict) -> str:
    return "×".join(str(v) for v in shape.values())


def key(rec: dict) -> tuple:
    return (rec["bench"], json.dumps(rec["shape"]), rec["dtype"], rec["pass"], rec["density"])


def copy_gbps(records: list[dict]) -> float | None:
    copies = [r for r in records if r["bench"] == "copy"]
    return copies[0]["bytes"] / copies[0]["ms"] / 1e6 if copies else None


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def memory_bound_table(records: list[dict], bench: str, baselines: list[str]) -> str | None:
    """cram's time, its share of copy bandwidth, and each baseline's time over cram's."""
    gbps = copy_gbps(records)
    cram = [r for r in records if r["bench"] == bench and r["impl"] == "cram"]
    if not cram:
        return None
    index = {(key(r), r["impl"]): r for r in records if r["bench"] == bench}
    present = [b for b in baselines if any(i == b for _, i in index)]
    rows = []
    for r in cram:
        row = [shape_str(r["shape"]), r["dtype"], r["pass"], f"{r['ms']:.3f}"]
        # A CPU's copy record measures DRAM while these sizes partly sit in cache: no ratio there.
        if gbps and r["bytes"] and r["device"] != "cpu":
            row.append(f"{r['bytes'] / r['ms'] / 1e6 / gbps:.0%}")
        else:
            row.append("–")
        for b in present:
            base = index.get((key(r), b))
            row.append(f"{base['ms'] / r['ms']:.2f}×" if base else "–")
        rows.append(row)
    header = ["shape (B×T×C)", "dtype", "pass", "cram ms", "of copy BW"] + [f"{b} / cram" for b in present]
    return table(header, rows)


def attention_table(records: list[dict]) -> str | None:
    """cram at each density beside the dense baselines (no density) and FlexAttention at it."""
    cram = [r for r in records if r["bench"] == "routed_attention" and r["impl"] == "cram"]
    if not cram:
        return None
    dense = {(json.dumps(r["shape"]), r["dtype"], r["pass"], r["impl"]): r
             for r in records if r["bench"] == "routed_attention" and r["density"] is None}
    flex = {key(r): r for r in records if r["impl"] == "flex_gathered"}
    deterministic = {key(r): r for r in records if r["impl"] == "cram_deterministic"}
    dense_impls = sorted({i for *_, i in dense})
    rows = []
    for r in cram:
        s = json.dumps(r["shape"])
        row = [shape_str(r["shape"]), r["pass"], f"{r['density']:g}", f"{r['ms']:.3f}"]
        row.append(f"{r['flops'] / r['ms'] / 1e9:.3g}" if r["flops"] else "–")
        for impl in dense_impls:
            base = dense.get((s, r["dtype"], r["pass"], impl))
            row.append(f"{r['ms'] / base['ms']:.3f}" if base else "–")
        base = flex.get(key(r))
        row.append(f"{r['ms'] / base['ms']:.2f}" if base else "–")
        det = deterministic.get(key(r))
        row.append(f"{det['ms']:.3f}" if det else "–")
        rows.append(row)
    header = ["shape (B×H×Hk×T×S×D)", "pass", "ρ", "cram ms", "cram TFLOP/s"]
    header += [f"cram / {impl}" for impl in dense_impls] + ["cram / flex_gathered", "deterministic=True ms"]
    return table(header, rows)


def decode_table(records: list[dict]) -> str | None:
    """cram's decoding step at each density beside dense SDPA's at the same shape: time, tokens
    a second, the routed rows' cache reads against the copy bandwidth."""
    gbps = copy_gbps(records)
    cram = [r for r in records if r["bench"] == "routed_decode" and r["impl"] == "cram"]
    if not cram:
        return None
    dense = {json.dumps(r["shape"]): r for r in records if r["bench"] == "routed_decode" and r["impl"] == "sdpa"}
    rows = []
    for r in cram:
        base = dense.get(json.dumps(r["shape"]))
        share = f"{r['bytes'] / r['ms'] / 1e6 / gbps:.0%}" if gbps and r["device"] != "cpu" else "–"
        rows.append([shape_str(r["shape"]), f"{r['density']:.3g}", f"{r['ms']:.4f}",
                     f"{r['shape']['B'] / r['ms'] * 1e3:,.0f}", share,
                     f"{base['ms']:.4f}" if base else "–", f"{r['ms'] / base['ms']:.3f}" if base else "–"])
    header = ["shape (B×S×H×Hk×D)", "ρ (rows)", "cram ms", "tokens/s", "of copy BW", "sdpa ms", "cram / sdpa"]
    return table(header, rows)


def layer_table(records: list[dict]) -> str | None:
    """A RoutedAttention layer's training step at each density beside the dense attention layer
    and the layer without attention, at the same shape and pass."""
    cram = [r for r in records if r["bench"] == "routed_layer" and r["impl"] == "cram"]
    if not cram:
        return None
    others = {(r["impl"], json.dumps(r["shape"]), r["pass"]): r for r in records
              if r["bench"] == "routed_layer" and r["impl"] != "cram"}
    rows = []
    for r in cram:
        dense, none = (others.get((impl, json.dumps(r["shape"]), r["pass"])) for impl in ("sdpa", "none"))
        rows.append([shape_str(r["shape"]), r["pass"], f"{r['density']:.3g}", f"{r['ms']:.3f}",
                     f"{dense['ms']:.3f}" if dense else "–", f"{dense['ms'] / r['ms']:.2f}" if dense else "–",
                     f"{none['ms']:.3f}" if none else "–"])
    header = ["shape (B×T×E×H)", "pass", "ρ", "routed layer ms", "dense layer ms", "dense / routed",
              "no-attention layer ms"]
    return table(header, rows)


def metaplastic_table(records: list[dict], baselines: list[str]) -> str | None:
    """Per shape, dtype and pass: cram's time, its elementwise work against the device's fp32 peak
    (the records' flops / time / peak_flops), and each baseline's time over cram's."""
    mine = [r for r in records if r["bench"] == "metaplastic_scan"]
    if not mine:
        return None
    index = {(key(r), r["impl"]): r for r in mine}
    impls = ["cram"] + [b for b in baselines if any(r["impl"] == b for r in mine)]
    timed = [i for i in impls if i in ("cram", "compiled_ref")]  # time and share of the peak in columns
    rows = []
    for k in dict.fromkeys(key(r) for r in mine):  # first-seen order
        cram = index.get((k, "cram"))
        first = next(index[(k, i)] for i in impls if (k, i) in index)
        row = [shape_str(first["shape"]), first["dtype"], first["pass"]]
        for impl in timed:
            r = index.get((k, impl))
            row.append(f"{r['ms']:.3f}" if r else "–")
            share = r and r.get("flops") and r.get("peak_flops") and r["flops"] / (r["ms"] * 1e-3) / r["peak_flops"]
            row.append(f"{share:.1%}" if share else "–")
        for impl in impls[1:]:
            r = index.get((k, impl))
            row.append(f"{r['ms'] / cram['ms']:.2f}×" if r and cram else "–")
        rows.append(row)
    header = ["shape (B×T×H×dk×dv)", "dtype", "pass"]
    header += [h for impl in timed for h in (f"{impl} ms", f"{impl} of fp32 peak")]
    header += [f"{impl} / cram" for impl in impls[1:]]
    notes = sorted({r["peak_source"] for r in mine if r.get("peak_flops") and r.get("peak_source")})
    models = sorted({r["flops_model"] for r in mine if r.get("flops") and r.get("flops_model")})
    foot = []
    if models:
        foot.append(f"FLOPs: {'; '.join(models)}.")
    if notes:
        foot.append(f"fp32 peak: {'; '.join(notes)}.")
    if "fla_simple_gla" in impls:
        foot.append("fla_simple_gla is GLA (b = 0, I_p = 1) on tensor cores: the non-metaplastic baseline, "
                    "no FLOPs counted.")
    for note in sorted({r["note"] for r in mine if r.get("note")}):
        foot.append(f"Note: {note}.")
    return table(header, rows) + ("\n\n" + " ".join(foot) if foot else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="a device name as recorded (default: all)")
    args = p.parse_args()
    print(render(args.device), end="")


def render(device: str | None = None) -> str:
    """The whole report as markdown (docs/benchmarks.md is this, for every device)."""
    out = ["# Benchmark results\n", "Generated from bench/results/*.json by `python -m bench.report`; do not edit.\n"]
    for device_name, records in load(device).items():
        meta = records[0]
        commits = sorted({r["commit"][:10] for r in records})
        out.append(f"## {device_name} (torch {meta['torch']}; commits {', '.join(commits)})\n")
        gbps = copy_gbps(records)
        if gbps:
            out.append(f"Measured copy bandwidth: {gbps:.0f} GB/s (bytes read + written).\n")
        sections = [(spec.record, memory_bound_table(records, spec.record, spec.baselines))
                    for spec in map(registry.get, ("scan", "router"))]
        sections.append(("routed_attention (time relative to dense; < 1 is faster)", attention_table(records)))
        sections.append(("routed_decode (one decoding step, CUDA-graph replay on GPUs)", decode_table(records)))
        sections.append(("RoutedAttention layer, a training step (bench.layer)", layer_table(records)))
        sections.append(("metaplastic_scan (bench.metaplastic; baseline ms / cram ms: > 1, cram is faster)",
                         metaplastic_table(records, registry.get("metaplastic").baselines)))
        out += [f"**{title}**\n\n{body}\n" for title, body in sections if body]
    return "\n".join(out)


if __name__ == "__main__":
    main()
