"""The tables a run prints at its end: every result, cram's speedups, the issue's targets."""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, Sequence

from .records import gbps, tflops

if TYPE_CHECKING:
    from .registry import Bench


def fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return format(v, spec)
    return str(v)


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    print(line)
    for r in cells[1:]:
        print("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


def _numeric(s: str) -> bool:
    try:
        float(s.rstrip("x%"))
        return True
    except ValueError:
        return False


def peak_fraction(rec: dict) -> float | None:
    """flops / time / peak_flops, for records that carry the device's peak (bench.metaplastic)."""
    t = tflops(rec)
    if t is None or not rec.get("peak_flops"):
        return None
    return t * 1e12 / rec["peak_flops"]


def rate(rec: dict) -> str:
    """'  12.3 TFLOP/s (18.4% of peak)  456 GB/s' (what the record allows), for the line of each measurement."""
    parts = []
    t = tflops(rec)
    if t is not None:
        frac = peak_fraction(rec)
        parts.append(f"{t:8.4g} TFLOP/s" + ("" if frac is None else f" ({100 * frac:.1f}% of peak)"))
    g = gbps(rec)
    if g is not None:
        parts.append(f"{g:8.4g} GB/s")
    return ("  " + "  ".join(parts)) if parts else ""


def print_bandwidth_table(records: list[dict], bench: str, title: str) -> None:
    """Every record of the bench with ms, GB/s and the fraction of the copy bandwidth of the run."""
    copy = [r for r in records if r["bench"] == "copy"]
    copy_bw = gbps(copy[-1]) if copy else None  # the latest copy record (--append may bring older ones)
    rows = []
    for r in records:
        if r["bench"] != bench:
            continue
        bw = gbps(r)
        frac = (bw / copy_bw) if (bw is not None and copy_bw) else None
        rows.append([shape_str(r["shape"]), r["dtype"], r["pass"], r["impl"], fmt(r["ms"], ".4f"),
                     fmt(bw, ".4g"), "-" if frac is None else f"{100 * frac:.1f}%"])
    if copy_bw is not None:
        title += f"   (copy bandwidth {copy_bw:.1f} GB/s, {copy[-1]['bytes'] / 2**30:.2f} GiB moved)"
    print_table(["shape", "dtype", "pass", "impl", "ms", "GB/s", "of copy"], rows, title)


def print_flops_table(records: list[dict], bench: str, title: str) -> None:
    """Every record of the bench with ms and TFLOP/s, and its share of the device's peak where
    the records carry one (peak_flops)."""
    mine = [r for r in records if r["bench"] == bench]
    peaks = any(r.get("peak_flops") for r in mine)
    densities = any(r["density"] is not None for r in mine)
    rows = []
    for r in mine:
        row = [shape_str(r["shape"]), r["dtype"], r["pass"], r["impl"]] + ([fmt(r["density"])] if densities else [])
        row += [fmt(r["ms"], ".4f"), fmt(tflops(r), ".4g")]
        if peaks:
            frac = peak_fraction(r)
            row.append("-" if frac is None else f"{100 * frac:.1f}%")
        rows.append(row)
    headers = ["shape", "dtype", "pass", "impl"] + (["density"] if densities else []) + ["ms", "TFLOP/s"]
    headers += ["of peak"] if peaks else []
    sources = sorted({r["peak_source"] for r in mine if r.get("peak_flops") and r.get("peak_source")})
    if sources:
        title += f"   (peak: {'; '.join(sources)})"
    print_table(headers, rows, title)


def print_speedups(records: list[dict], bench: str, baselines: Sequence[str],
                   match_density: Sequence[str] = ()) -> None:
    """For every cram record: baseline_ms / cram_ms (> 1: cram faster) for each baseline of the
    same shape, dtype and pass. Baselines in match_density are matched on density too
    (e.g. flex_gathered); the others are dense (density None) or measured on the same inputs."""
    cram = [r for r in records if r["bench"] == bench and r["impl"] == "cram"]
    present = [b for b in baselines if any(r["bench"] == bench and r["impl"] == b for r in records)]
    if not cram or not present:
        return
    with_density = any(c["density"] is not None for c in cram)
    rows = []
    for c in cram:
        row = [shape_str(c["shape"]), c["dtype"], c["pass"]] + ([fmt(c["density"])] if with_density else []) + [
            fmt(c["ms"], ".4f")]
        for b in present:
            match = [r for r in records if r["bench"] == bench and r["impl"] == b and r["shape"] == c["shape"]
                     and r["dtype"] == c["dtype"] and r["pass"] == c["pass"]
                     and (r["density"] == c["density"] if b in match_density else True)]
            row.append(f"{match[0]['ms'] / c['ms']:.2f}x" if match else "-")
        rows.append(row)
    headers = ["shape", "dtype", "pass"] + (["density"] if with_density else []) + ["cram ms"]
    title = "speedup of cram: baseline ms / cram ms (> 1: cram faster)"
    matched = [b for b in present if b in match_density]
    if matched:
        title += f"; {', '.join(matched)} matched on density"
    print_table(headers + [f"{b}/cram" for b in present], rows, title)


def print_targets(spec: "Bench", records: list[dict], device_type: str) -> None:
    recs = [r for r in records if r["bench"] == spec.record]
    for t in spec.targets:
        if t.device != device_type:
            continue
        for c in recs:
            if not (c["impl"] == "cram" and c["pass"] == t.pass_ and c["shape"] == t.shape
                    and c["density"] == t.density and t.dtype in (None, c["dtype"])):
                continue
            base = [r for r in recs if r["impl"] == t.baseline and r["pass"] == t.pass_ and r["shape"] == c["shape"]
                    and r["dtype"] == c["dtype"]]
            if base:
                ratio = base[0]["ms"] / c["ms"]
                at = "" if t.density is None else f" at density {t.density:g}"
                print(f"\n{device_type.upper()} target ({shape_str(c['shape'])} {c['dtype']}): cram {t.pass_}{at} "
                      f">= {t.factor:g}x faster than {t.what}: {ratio:.2f}x  {'PASS' if ratio >= t.factor else 'FAIL'}")


def summarize(spec: "Bench", records: list[dict], device_type: str) -> None:
    if spec.table == "flops":
        print_flops_table(records, spec.record, spec.title)
    else:
        print_bandwidth_table(records, spec.record, spec.title)
    print_speedups(records, spec.record, spec.baselines, spec.match_density)
    print_targets(spec, records, device_type)
