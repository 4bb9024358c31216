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
