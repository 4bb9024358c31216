"""The one runner of every bench: `main(spec)` parses the flags, walks the cases of a
registered Bench (shapes x dtypes, then densities for its routed implementations), times
each implementation's passes, checks its output, writes the records and prints the tables.

Failures become notes (see Runner); only a device error that poisons the CUDA context
stops a run (exit status 1), and the JSON written so far stays.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Sequence

import torch

from . import cli
from .environment import Env, resolve_device, setup_torch
from .failures import Fatal, Skip, free_memory, is_fatal, short_error
from .records import Sink, dtype_name, gbps, make_record, median_of_rounds, output_path
from .registry import Bench, Call, Case, Impl
from .summary import rate, shape_str, summarize
from .timing import TimingConfig, measure_ms, synchronize, timing_config

PASSES = ("fwd", "fwd_bwd")


def words(*parts: str) -> str:
    """The non-empty parts joined by spaces (labels are often empty)."""
    return " ".join(p for p in parts if p)


class Runner:
    """Runs the measurements of one bench run, turning failures into notes.

    - NotImplementedError (e.g. no CUDA kernel registered for a cram op, or no backward):
      that (impl, pass) is disabled for the rest of the run, one note printed.
    - another exception (OOM, a compile failure, an unsupported shape): that one
      measurement (or setup, or check) is skipped with a note.
    - a device error that poisons the CUDA context: Fatal, the run stops.
    """

    def __init__(self, env: Env, sink: Sink, cfg: TimingConfig):
        self.env, self.sink, self.cfg = env, sink, cfg
        self.disabled: dict[tuple[str, str], str] = {}
        self.notes: list[str] = []

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        print(f"  note: {msg}", flush=True)

    def enabled(self, impl: str, pass_: str | None = None) -> bool:
        """Whether (impl, pass_) may still run; pass_=None: whether any pass of impl may."""
        if pass_ is not None:
            return (impl, pass_) not in self.disabled
        return not all((impl, p) in self.disabled for p in PASSES)

    def disable(self, impl: str, pass_: str | None, why: str) -> None:
        """Disable (impl, pass_) for the rest of the run; pass_=None: every pass."""
        for p in PASSES if pass_ is None else (pass_,):
            if (impl, p) not in self.disabled:
                self.disabled[(impl, p)] = why
                self.note(f"{impl} {p}: disabled for this run ({why})")

    def attempt(self, what: str, fn: Callable[..., Any], *args, failed: str = "failed") -> Any:
        """fn(*args), or None with a note when it raises Skip (its reason) or fails."""
        try:
            return fn(*args)
        except Skip as e:
            self.note(f"{what}: {e}")
        except Exception as e:  # noqa: BLE001 - every failure becomes a note
            if is_fatal(e):
                raise Fatal(f"{what}: {short_error(e, 400)}") from e
            self.note(f"{what}: {failed} ({short_error(e)})")
            try:
                free_memory(self.env.device)
            except Exception as e2:  # noqa: BLE001
                raise Fatal(f"{what}: device unusable after error ({short_error(e2)})") from e2
        return None

    def _first_working(self, call: Call, pass_: str) -> Call:
        """call, or the first of its fallbacks whose pass runs once here (the last one's error is raised)."""
        while True:
            try:
                with call.context():
                    call.runner(pass_)()
                    synchronize(self.env.device)
                return call
            except Exception as e:  # noqa: BLE001
                if call.fallback is None or is_fatal(e):
                    raise
                call = call.fallback

    def time(self, impl: str, pass_: str, label: str, call: Call, make: Callable[[float], dict]) -> Call | None:
        """Run call's pass once (falling back as it says), time it, add make(ms) to the sink.
        Returns the call that was timed, or None."""
        if not self.enabled(impl, pass_):
            return None

        def measure() -> tuple[Call, float] | None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    chosen = self._first_working(call, pass_)
                    with chosen.context():
                        return chosen, measure_ms(chosen.runner(pass_), self.env.device, self.cfg)
            except NotImplementedError as e:
                self.disable(impl, pass_, short_error(e))
                return None

        label = words(pass_, label)
        timed = self.attempt(f"{impl} {label}", measure, failed="skipped")
        if timed is None:
            return None
        call, ms = timed
        rec = self.sink.add(make(ms))
        print(f"  {impl:<26} {words(label, call.label):<44} {ms:10.4f} ms{rate(rec)}", flush=True)
        return call

    def check(self, impl: str, label: str, call: Call) -> None:
        """Print how the call's forward output compares with the reference."""

        def run():
            with call.context():
                text, ok = call.check(call.forward())
            print(f"  check {words(impl, label):<40} {text}{'' if ok else '   <-- WARNING'}", flush=True)

        self.attempt(words(impl, label, "check"), run)

    def copy_bandwidth(self, quick: bool) -> dict:
        """One large device-to-device copy (dst.copy_(src)); bytes = read + written."""
        device = self.env.device
        if device.type == "cuda":
            n = (64 if quick else 1024) * 1024 * 1024  # 1 GiB buffer: 2 GiB moved
        else:
            n = (32 if quick else 256) * 1024 * 1024
        src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 256)
        dst = torch.empty_like(src)
        ms = measure_ms(lambda: dst.copy_(src), device, self.cfg)
        del src, dst
        rec = self.sink.add(make_record(self.env, bench="copy", impl="torch_copy", pass_="fwd", shape={"N": n},
                                        density=None, dtype=torch.uint8, ms=ms, bytes_=2 * n, flops=None))
        print(f"  copy bandwidth: {gbps(rec):.1f} GB/s ({rec['bytes'] / 2**30:.2f} GiB moved, {ms:.3f} ms)", flush=True)
        return rec


def run_impl(spec: Bench, impl: Impl, case: Case, passes: Sequence[str], runner: Runner) -> None:
    """Build the impl for the case, time each of its passes, check the first output measured."""
    todo = [p for p in passes if p in impl.passes and runner.enabled(impl.name, p)]
    if not todo:
        return
    call = runner.attempt(words(impl.name, case.label), impl.build, case)
    if call is None:
        return
    checked = not case.args.check
    for pass_ in todo:
        if pass_ == "fwd_bwd" and call.no_backward:
            runner.note(f"{words(impl.name, 'fwd_bwd', case.label)}: skipped ({call.no_backward})")
            continue

        def make(ms: float, pass_: str = pass_) -> dict:
            rec = make_record(runner.env, bench=spec.record, impl=impl.name, pass_=pass_, shape=case.shape,
                              density=case.density, dtype=case.dtype, ms=ms,
                              bytes_=spec.bytes(case, pass_) if spec.bytes else None,
                              flops=spec.flops(case, pass_) if spec.flops else None)
            if spec.record_fields is not None:
                rec.update(spec.record_fields(case, pass_, impl.name))
            return rec

        ran = runner.time(impl.name, pass_, case.label, call, make)
        if ran is not None and not checked:
            checked = True
            if ran.check is not None:
                runner.check(impl.name, case.label, ran)


def run_case(spec: Bench, shape: dict, dtype: torch.dtype, impls: Sequence[Impl], passes: Sequence[str],
             densities: Sequence[float], runner: Runner, args, mirrored: bool = False) -> None:
    """One shape and dtype: the impls that run once per case, then the routed ones at each density;
    `mirrored`, the same in the opposite order (routed first, the densities from the last, each
    density's impls reversed). The case (and its tensors) lives only here: freed before the next
    one is made."""
    print(f"\n== {shape_str(shape)}  {dtype_name(dtype)}", flush=True)
    case = Case(shape=shape, dtype=dtype, device=runner.env.device, density=None, label="", tol=spec.tol(dtype),
                args=args)
    case = runner.attempt(f"shape {shape_str(shape)}", spec.setup, case)
    if case is None:
        return

    def run_once() -> None:
        for impl in impls:
            if not impl.routed:
                run_impl(spec, impl, case, passes, runner)

    def run_routed() -> None:
        routed = [i for i in impls if i.routed]
        for density in (densities[::-1] if mirrored else densities) if routed else ():
            at = runner.attempt(f"rho={density} {shape_str(shape)}", spec.at_density, case, density)
            if at is None:  # the routing could not be made (e.g. out of memory): a note, the next density
                continue
            for impl in routed:
                run_impl(spec, impl, at, passes, runner)
            del at

    for part in ((run_routed, run_once) if mirrored else (run_once, run_routed)):
        part()
    del case
    free_memory(runner.env.device)


def finish(sink: Sink, runner: Runner) -> None:
    sink.write()
    print(f"\nwrote {len(sink.records)} records to {sink.path} ({time.perf_counter() - sink.t0:.0f} s)")
    for (impl, pass_), why in runner.disabled.items():
        print(f"not measured: {impl} {pass_} ({why})")


def main(spec: Bench, argv: Sequence[str] | None = None) -> int:
    """python -m bench.<spec.name> [flags]: the whole run. Returns the exit status."""
    args = cli.parse_args(spec, argv)
    args.check = not args.no_check
    device = resolve_device(args.device)
    key = (device.type, args.quick)
    torch.manual_seed(0)
    env = Env.detect(device)
    cfg = timing_config(device, args.quick, args.rep_ms)
    passes = cli.parse_passes(args.passes)
    dtypes = cli.parse_dtypes(args.dtype, spec.dtypes[key])
    impls = [spec.impl(n) for n in cli.parse_impls(args.impl, spec.defaults[key], spec.impl_names)]
    setup_torch(args.threads, compiling=any(i.compiles for i in impls))
    if args.shape:
        shapes = [spec.make_shape(**s) for s in cli.parse_shapes(args.shape, spec.shape_keys, spec.shape_optional)]
    else:
        shapes = spec.shapes[key]
    densities = cli.parse_floats(args.densities) if getattr(args, "densities", None) else \
        (spec.densities or {}).get(key, [])
    sink = Sink(output_path(spec.name, env, args.quick, args.out, args.record), append=args.append)
    runner = Runner(env, sink, cfg)

    import cram_ext

    print(f"bench.{spec.name} on {env.device_name} (torch {env.torch}, commit {env.commit}, "
          f"{torch.get_num_threads()} CPU threads)")
    print(f"cram_ext build: {cram_ext.build_info().get('backends')}; impls: {[i.name for i in impls]}; "
          f"passes: {passes}; records to {sink.path}")
    for impl in impls:
        if impl.requires is not None:
            try:
                impl.requires()
            except Exception as e:  # noqa: BLE001 - ImportError, or e.g. triton failing to initialise
                runner.disable(impl.name, None, f"unavailable: {short_error(e)}")
    rounds = max(1, args.rounds)
    status = 0
    try:
        if spec.copy_bandwidth:
            runner.copy_bandwidth(args.quick)
        for round_ in range(rounds):
            if rounds > 1:
                print(f"\n-- round {round_ + 1} of {rounds}")
            # Every other round in the mirrored order, so that over the rounds each measurement
            # stands as near to its baseline as every other (a machine's speed drifts in minutes).
            mirrored = round_ % 2 == 1
            order = impls[::-1] if mirrored else impls
            for shape in shapes:
                for dtype in dtypes:
                    run_case(spec, shape, dtype, order, passes, densities, runner, args, mirrored)
            args.check = False  # the outputs are the same every round: checked in the first
    except Fatal as e:
        print(f"\nFATAL (device error, stopping): {e}")
        status = 1
    if rounds > 1:  # also what a run stopped by a device error measured
        sink.records = sink.records[:sink.appended] + median_of_rounds(sink.records[sink.appended:])
    if status == 0:
        summarize(spec, sink.records, device.type)
    finish(sink, runner)
    return status
