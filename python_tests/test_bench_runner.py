"""bench/runner.py and bench/registry.py: failures become notes, and a failed reference keeps
nothing of the computation that failed. Tiny synthetic benches on the CPU (no timing asserted)."""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.environment import Env  # noqa: E402
from bench.records import Sink  # noqa: E402
from bench.registry import Bench, Call, Case, Impl, once  # noqa: E402
from bench.runner import Runner, run_case  # noqa: E402
from bench.timing import TimingConfig  # noqa: E402


def test_once_reraises_a_failure_without_keeping_its_frames():
    alive = []

    def reference():
        intermediate = torch.ones(16)  # what a reference holds when it fails (on a GPU: memory)
        alive.append(weakref.ref(intermediate))
        raise ValueError("reference failed")

    get = once(reference)
    for _ in range(3):
        with pytest.raises(ValueError, match="reference failed"):
            get()
    gc.collect()
    assert len(alive) == 1, "computed once"
    assert alive[0]() is None, "the failed reference's frame is still alive"
    assert once(lambda: 7)() == 7


def _bench(at_density) -> Bench:
    def setup(case: Case) -> Case:
        case.x = torch.ones(case.shape["B"], case.shape["T"], case.shape["C"])
        return case

    def build(case: Case) -> Call:
        return Call(lambda x: x * 2, (case.x,), label=f"rho={case.density}")

    return Bench(name="synthetic", record="synthetic", doc="synthetic", impls=[Impl("twice", build, ("fwd",), routed=True)],
                 defaults={}, shapes={}, dtypes={}, setup=setup, tolerance=(1e-5, 1e-2), baselines=[], title="",
                 at_density=at_density)


def test_a_routing_that_cannot_be_made_is_a_note_and_the_next_density_runs(tmp_path):
    def at_density(case: Case, density: float) -> Case:
        if density == 0.5:
            raise RuntimeError("out of memory making the routing")
        return case.derive(density=density, label=f"rho={density}")

    device = torch.device("cpu")
    runner = Runner(Env(device, "cpu", torch.__version__, "test"), Sink(tmp_path / "r.json"),
                    TimingConfig(warmup_ms=0, rep_ms=1, min_reps=1, max_reps=2))
    run_case(_bench(at_density), {"B": 1, "T": 4, "C": 2}, torch.float32, _bench(at_density).impls, ["fwd"],
             [0.5, 1.0], runner, SimpleNamespace(check=False))
    assert any("out of memory making the routing" in n for n in runner.notes)
    assert [r["density"] for r in runner.sink.records] == [1.0]


def test_mirrored_rounds_run_the_routed_densities_first_and_from_the_last(tmp_path):
    spec = _bench(lambda case, density: case.derive(density=density, label=f"rho={density}"))
    spec.impls.append(Impl("dense", lambda case: Call(lambda x: x + 1, (case.x,)), ("fwd",), routed=False))
    runner = Runner(Env(torch.device("cpu"), "cpu", torch.__version__, "test"), Sink(tmp_path / "r.json"),
                    TimingConfig(warmup_ms=0, rep_ms=1, min_reps=1, max_reps=2))
    for mirrored in (False, True):
        run_case(spec, {"B": 1, "T": 4, "C": 2}, torch.float32, spec.impls, ["fwd"], [0.1, 1.0], runner,
                 SimpleNamespace(check=False), mirrored)
    order = [(r["impl"], r["density"]) for r in runner.sink.records]
    assert order == [("dense", None), ("twice", 0.1), ("twice", 1.0), ("twice", 1.0), ("twice", 0.1), ("dense", None)]


def test_record_fields_are_set_on_each_record(tmp_path):
    """A Bench's record_fields(case, pass, impl) adds fields to that record, and may replace its own
    (bench.metaplastic: flops None for fla's GLA, the device's peak beside the count)."""
    spec = _bench(None)
    spec.impls[0].routed = False
    spec.flops = lambda case, pass_: 100.0
    spec.record_fields = lambda case, pass_, impl: {"peak_flops": 1e12, "flops": None if impl == "twice" else 1.0}
    runner = Runner(Env(torch.device("cpu"), "cpu", torch.__version__, "test"), Sink(tmp_path / "r.json"),
                    TimingConfig(warmup_ms=0, rep_ms=1, min_reps=1, max_reps=2))
    run_case(spec, {"B": 1, "T": 4, "C": 2}, torch.float32, spec.impls, ["fwd"], [], runner,
             SimpleNamespace(check=False))
    (rec,) = runner.sink.records
    assert rec["peak_flops"] == 1e12 and rec["flops"] is None


def test_metaplastic_fp32_peak_from_device_properties():
    from bench.metaplastic import fp32_peak_from

    def props(name, cc, sms, clock_khz=None):
        p = SimpleNamespace(name=name, major=cc[0], minor=cc[1], multi_processor_count=sms)
        if clock_khz is not None:
            p.clock_rate = clock_khz
        return p

    h100, how = fp32_peak_from(props("NVIDIA H100 80GB HBM3", (9, 0), 132, 1_980_000))
    assert h100 == pytest.approx(132 * 128 * 2 * 1.98e9) and "clock_rate" in how  # 66.9 TFLOP/s
    # No clock exposed: the datasheet boost of a known card.
    assert fp32_peak_from(props("NVIDIA H200", (9, 0), 132))[0] == pytest.approx(h100)
    assert fp32_peak_from(props("NVIDIA H100 PCIe", (9, 0), 114, 0))[0] == pytest.approx(114 * 128 * 2 * 1.755e9)
    assert fp32_peak_from(props("NVIDIA A100-SXM4-80GB", (8, 0), 108, 1_410_000))[0] == pytest.approx(19.49e12, 1e-3)
    assert fp32_peak_from(props("Some GPU", (9, 0), 100, 0))[0] is None  # unknown clock: no fraction printed
    assert fp32_peak_from(props("Some GPU", (11, 0), 100, 1_000_000))[0] is None  # unknown lanes per SM


def test_metaplastic_bench_case_checks_and_counts(tmp_path):
    """bench.metaplastic on a tiny CPU case: the chunked reference passes its own check, the
    records carry the elementwise count and no peak on the CPU, fla's GLA is not counted."""
    import bench.metaplastic as bm

    spec = bm.SPEC
    case = Case(shape=bm._shape(1, 70, 2, 8, 16), dtype=torch.float32, device=torch.device("cpu"), density=None,
                label="", tol=spec.tol(torch.float32), args=SimpleNamespace(check=True))
    case = spec.setup(case)
    call = spec.impl("eager_ref").build(case)
    text, ok = call.check(call.forward())
    assert ok, text
    assert spec.flops(case, "fwd") == 8 * 1 * 70 * 2 * 8 * 16
    assert spec.flops(case, "fwd_bwd") == 3 * spec.flops(case, "fwd")
    assert spec.record_fields(case, "fwd", "eager_ref")["peak_flops"] is None
    assert spec.record_fields(case, "fwd", "fla_simple_gla")["flops"] is None


def test_rounds_record_the_median_of_each_measurement():
    """--rounds N: the repeats of one measurement become one record, ms their median, in the
    order first measured; other measurements are not mixed in."""
    from bench.records import median_of_rounds

    def rec(impl, density, ms):
        return {"bench": "b", "impl": impl, "pass": "fwd", "shape": {"T": 4, "B": 1}, "density": density,
                "dtype": "float32", "ms": ms}

    rounds = [rec("sdpa", None, 10.0), rec("cram", 1.0, 12.0),   # round 1
              rec("cram", 1.0, 9.0), rec("sdpa", None, 30.0),    # round 2, order reversed
              rec("sdpa", None, 11.0), rec("cram", 1.0, 10.0),   # round 3
              rec("cram", 0.1, 2.0)]                             # measured once
    merged = median_of_rounds(rounds)
    assert [(r["impl"], r["density"]) for r in merged] == [("sdpa", None), ("cram", 1.0), ("cram", 0.1)]
    assert [r["ms"] for r in merged] == [11.0, 10.0, 2.0]
    assert merged[0]["ms_rounds"] == [10.0, 30.0, 11.0] and "ms_rounds" not in merged[2]
