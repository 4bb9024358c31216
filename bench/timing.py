"""Timing: the median of many runs of a call after a warm-up.

  * CUDA: our own CUDA-event loop (the same scheme as triton.testing.do_bench with
    return_mode="median": L2 flushed by zeroing a 256 MiB buffer before every run,
    events recorded around the call only), but with a floor on the number of runs
    so that slow configurations still get a real median.
  * CPU: time.perf_counter around each call, many repeats.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class TimingConfig:
    warmup_ms: float
    rep_ms: float
    min_reps: int
    max_reps: int


def timing_config(device: torch.device, quick: bool, rep_ms: float | None = None) -> TimingConfig:
    if device.type == "cuda":
        cfg = TimingConfig(warmup_ms=10, rep_ms=25, min_reps=5, max_reps=100) if quick else TimingConfig(
            warmup_ms=50, rep_ms=200, min_reps=10, max_reps=1000
        )
    else:
        cfg = TimingConfig(warmup_ms=0, rep_ms=40, min_reps=3, max_reps=20) if quick else TimingConfig(
            warmup_ms=100, rep_ms=600, min_reps=5, max_reps=200
        )
    if rep_ms is not None:
        cfg.rep_ms = rep_ms
    return cfg


_l2_flush_buffer: torch.Tensor | None = None


def _flush_buffer(device: torch.device) -> torch.Tensor:
    global _l2_flush_buffer
    if _l2_flush_buffer is None or _l2_flush_buffer.device != device:
        # 256 MiB: several times the L2 of an H100/H200 (50/60 MB); do_bench uses the same size.
        _l2_flush_buffer = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    return _l2_flush_buffer


def _median_cuda(fn: Callable[[], Any], device: torch.device, cfg: TimingConfig) -> float:
    cache = _flush_buffer(device)
    fn()
    torch.cuda.synchronize(device)
    # Estimate the time of one call (flush included: errs towards fewer runs).
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    n_warmup = max(1, int(cfg.warmup_ms / estimate))
    n_reps = min(cfg.max_reps, max(cfg.min_reps, int(cfg.rep_ms / estimate)))
    for _ in range(n_warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
    for i in range(n_reps):
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _median_cpu(fn: Callable[[], Any], cfg: TimingConfig) -> float:
    t0 = time.perf_counter()
    fn()  # first call: warm-up and estimate
    estimate_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(min(50, int(cfg.warmup_ms / estimate_ms))):
        fn()
    n_reps = min(cfg.max_reps, max(cfg.min_reps, int(cfg.rep_ms / estimate_ms)))
    times = []
    for _ in range(n_reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure_ms(fn: Callable[[], Any], device: torch.device, cfg: TimingConfig) -> float:
    """Median milliseconds of fn() after a warm-up (CUDA events on a GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        return _median_cuda(fn, device, cfg)
    return _median_cpu(fn, cfg)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
