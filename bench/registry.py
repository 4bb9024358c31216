"""The registry of the benches: what each one measures, with which implementations, at which
shapes, densities and dtypes, and how each result is checked.

A bench module (bench/attention.py, scan.py, router.py) declares one `Bench` and registers it;
bench/runner.py runs any of them the same way, and bench/report.py reads each one's baselines
from here. The pieces:

  Bench  the op measured: its record name, implementations, default shapes / dtypes /
         densities per (device type, quick), the inputs of one case (`setup`), the minimal
         bytes or useful FLOPs of a result, the baselines cram is compared with.
  Impl   one implementation: a name and `build(case) -> Call`.
  Call   the code of one implementation for one case: fn(*inputs), timed as a forward under
         no_grad and as a forward+backward from fresh leaves; the check of its output.
  Case   one shape and dtype (and density, for routed implementations) with the tensors
         `setup` made for it.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, ContextManager

import torch

# (device type, quick) -> a default: ("cuda", False) is the full GPU run, ("cpu", True) the CPU smoke test.
Key = tuple[str, bool]
Check = Callable[[Any], tuple[str, bool]]  # forward output -> (what was compared, within tolerance)


def per_device(cuda: list, cpu: list) -> dict[Key, list]:
    """The same default with and without --quick."""
    return {("cuda", False): cuda, ("cuda", True): cuda, ("cpu", False): cpu, ("cpu", True): cpu}


def btc(B: int, T: int, C: int) -> dict:
    return {"B": B, "T": T, "C": C}


# The sizes and dtypes of the memory-bound ops on (B, T, C) inputs (gated_scan, route).
SEQUENCE_SHAPES: dict[Key, list[dict]] = {
    ("cuda", False): [btc(8, 4096, 2048), btc(2, 16384, 4096), btc(64, 1024, 1024), btc(1, 65536, 512)],
    ("cuda", True): [btc(2, 1024, 256)],
    ("cpu", False): [btc(4, 4096, 256), btc(2, 1024, 512)],
    ("cpu", True): [btc(2, 256, 64), btc(1, 512, 32)],
}
SEQUENCE_DTYPES: dict[Key, list[torch.dtype]] = {
    ("cuda", False): [torch.bfloat16, torch.float32],
    ("cuda", True): [torch.bfloat16],  # GPU smoke test: every compiled impl compiles once per shape, dtype, pass
    ("cpu", False): [torch.float32],
    ("cpu", True): [torch.float32],
}
# What those ops' Benches share: the sizes and dtypes above, --shape B,T,C, minimal bytes read
# against a device-to-device copy measured in the same run.
MEMORY_BOUND = dict(shapes=SEQUENCE_SHAPES, dtypes=SEQUENCE_DTYPES, shape_keys=("B", "T", "C"), make_shape=btc,
                    copy_bandwidth=True, table="bandwidth")


# Routing densities of the benches whose rows are routed whole (a decoding step's rows, a layer's
# fixed budget): 0.05, the sparse end the issues' targets name, 0.25 and every row.
ROW_DENSITIES: dict[Key, list[float]] = {
    ("cuda", False): [0.05, 0.25, 1.0],
    ("cuda", True): [0.25, 1.0],
    ("cpu", False): [0.25, 1.0],
    ("cpu", True): [0.5, 1.0],
}


class Case(SimpleNamespace):
    """One measured configuration. The runner sets shape, dtype, device, density (None unless
    routed), label (printed beside each time), tol (the relative error allowed at this dtype)
    and args (the parsed flags); the bench's setup adds its tensors."""

    def derive(self, **changes) -> "Case":
        """A copy with some fields changed (the case at one routing density)."""
        return Case(**{**vars(self), **changes})


@dataclass
class Call:
    """One implementation's code for one case.

    Pass fwd times fn(*inputs) under torch.no_grad(); pass fwd_bwd times fn on fresh leaves
    (inputs detached, requiring grad) and torch.autograd.grad of its output (output[out] when
    fn returns a tuple) against `grad`, into every input.
    """

    fn: Callable[..., Any]
    inputs: tuple[torch.Tensor, ...]
    grad: torch.Tensor | None = None
    out: int | None = None
    label: str = ""  # printed after the case's label, e.g. "(k/v repeated)"
    check: Check | None = None  # compares a forward output with the reference
    context: Callable[[], ContextManager] = contextlib.nullcontext  # entered around probe and timing
    fallback: "Call | None" = None  # taken when this call fails its first run (e.g. k/v repeated for GQA)
    no_backward: str | None = None  # why fwd_bwd is not measured for this case

    def forward(self) -> Any:
        with torch.no_grad():
            return self.fn(*self.inputs)

    def forward_backward(self) -> tuple[torch.Tensor, ...]:
        leaves = tuple(x.detach().requires_grad_() for x in self.inputs)
        y = self.fn(*leaves)
        return torch.autograd.grad(y if self.out is None else y[self.out], leaves, self.grad)

    def runner(self, pass_: str) -> Callable[[], Any]:
        return self.forward if pass_ == "fwd" else self.forward_backward


@dataclass
class Impl:
    name: str
    build: Callable[[Case], Call]  # may raise Skip (does not apply) or fail (a note: setup failed)
    passes: tuple[str, ...] = ("fwd", "fwd_bwd")
    routed: bool = False  # built once per routing density (Bench.at_density), else once per case
    compiles: bool = False  # uses torch.compile: the run raises dynamo's recompile limits
    requires: Callable[[], Any] | None = None  # called once a run: an exception disables the impl


@dataclass
class Target:
    """A target of the issue, printed PASS/FAIL by runs on `device`: cram's `pass_` at `shape`
    (and `density`) at least `factor` times faster than `baseline` (same shape, dtype and pass)."""

    shape: dict
    baseline: str
    factor: float
    what: str  # the baseline in words
    density: float | None = None
    dtype: str | None = None  # None: any
    pass_: str = "fwd"
    device: str = "cpu"


@dataclass
class Bench:
    name: str  # the module (python -m bench.<name>) and the prefix of its JSON files
    record: str  # the records' "bench" field
    doc: str  # the module's docstring; its first line is --help's description
    impls: list[Impl]
    defaults: dict[Key, list[str]]  # impls run without --impl
    shapes: dict[Key, list[dict]]
    dtypes: dict[Key, list[torch.dtype]]
    setup: Callable[[Case], Case]  # makes the case's inputs (may raise Skip)
    tolerance: tuple[float, float]  # relative error allowed: float32/float64, 16-bit dtypes
    baselines: list[str]  # compared with cram (speedup tables here and in bench.report), in order
    title: str  # of the table of all results
    table: str = "bandwidth"  # "bandwidth": GB/s and share of the copy; "flops": TFLOP/s
    shape_keys: tuple[str, ...] = ("B", "T", "C")  # what --shape takes, in order
    shape_optional: tuple[str, ...] = ()  # ... and may add
    make_shape: Callable[..., dict] = dict  # --shape's dict -> a full shape
    densities: dict[Key, list[float]] | None = None  # routing densities of the routed impls
    at_density: Callable[[Case, float], Case] | None = None
    bytes: Callable[[Case, str], int] | None = None  # minimal bytes of (case, pass)
    flops: Callable[[Case, str], float | None] | None = None  # useful FLOPs of (case, pass)
    # (case, pass, impl) -> fields set on that record after the common ones: e.g. metaplastic's
    # flops_model, peak_flops (the device's peak FLOP/s of the counted work: tables print
    # flops / time / peak_flops) and flops None for a baseline the count does not describe
    record_fields: Callable[[Case, str, str], dict] | None = None
    copy_bandwidth: bool = False  # measure a device-to-device copy first (a "copy" record)
    match_density: tuple[str, ...] = ()  # baselines matched with cram on density too
    targets: list[Target] = field(default_factory=list)
    flags: list[tuple[tuple, dict]] = field(default_factory=list)  # extra argparse arguments

    @property
    def description(self) -> str:
        return self.doc.strip().split("\n")[0]

    @property
    def impl_names(self) -> list[str]:
        return [i.name for i in self.impls]

    def impl(self, name: str) -> Impl:
        return next(i for i in self.impls if i.name == name)

    @property
    def shape_syntax(self) -> str:
        return ",".join(self.shape_keys) + "".join(f"[,{k}]" for k in self.shape_optional)

    def tol(self, dtype: torch.dtype) -> float:
        return self.tolerance[0] if dtype in (torch.float32, torch.float64) else self.tolerance[1]


BENCHES: dict[str, Bench] = {}


def register(spec: Bench) -> Bench:
    BENCHES[spec.name] = spec
    return spec


def get(name: str) -> Bench:
    """The Bench of bench/<name>.py (imported on first use)."""
    if name not in BENCHES:
        importlib.import_module(f"{__package__}.{name}")
    return BENCHES[name]


def once(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn() computed at the first call and kept; a failure is kept too and raised again (a
    reference that cannot be computed is tried once). What is kept of a failure is its type and
    message, not the exception: its traceback holds the frames of fn and of every caller it was
    raised through (the reference's intermediates, each checked output), which would stay
    allocated, on the GPU too, as long as the case lives."""
    box: list = []

    def get_value() -> Any:
        if not box:
            try:
                box.append((fn(), None))
            except Exception as e:  # noqa: BLE001
                box.append((None, (type(e), str(e))))
        value, error = box[0]
        if error is not None:
            kind, message = error
            try:
                fresh = kind(message)
            except Exception:  # noqa: BLE001 - a type that takes other arguments
                fresh = RuntimeError(f"{kind.__name__}: {message}")
            raise fresh
        return value

    return get_value


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
