"""routed_decode (cram) beside dense SDPA over the same KV cache: one decoding step.

    python -m bench.decode [--device auto|cpu|cuda] [--quick] [--impl cram,sdpa] [--shape B,S,H,Hk,D]
                           [--densities 0.05,1] [--out PATH | --record] [--append] [--no-check] [--threads N]

One step: a batch of B new tokens, each row attending over its own cache of S keys (all valid),
H query heads over Hk key/value heads (GQA). On CUDA each implementation's step is captured in a
CUDA graph once and the graph is replayed in the timing, as a decode loop runs it.

Implementations (impl):
  cram   cram_ext.routed_decode(q, k_cache, v_cache, seqlens, routed): only the routed rows
         read their cache
  sdpa   F.scaled_dot_product_attention(q (B,H,1,D), k, v (B,Hk,S,D) views of the cache,
         enable_gqa=True), the backend PyTorch picks: every row attends

Routing: for density rho, n = round(rho * B) rows routed, chosen at random (n = 0 measures the
fixed cost of a step that skips every row). The record's density is n / B.

Minimal bytes: the routed rows' keys and values read once, n * S * Hk * D * 2 * elt (sdpa: every
row's), plus q and out. The table gives their share of the copy bandwidth measured in the same
run: the bound a decode step can reach.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import runner
from .registry import ROW_DENSITIES, Bench, Call, Case, Impl, per_device, register, rel_err


def _shape(B, S, H, Hk, D):
    return {"B": B, "S": S, "H": H, "Hk": Hk, "D": D}


def setup(case: Case) -> Case:
    B, S, H, Hk, D = (case.shape[k] for k in ("B", "S", "H", "Hk", "D"))
    case.q = torch.randn(B, H, D, device=case.device, dtype=case.dtype)
    case.k = torch.randn(B, S, Hk, D, device=case.device, dtype=case.dtype)
    case.v = torch.randn(B, S, Hk, D, device=case.device, dtype=case.dtype)
    case.seqlens = torch.full((B,), S, dtype=torch.int32, device=case.device)
    case.routed = torch.ones(B, dtype=torch.bool, device=case.device)
    case.rows = B
    return case


def at_density(case: Case, density: float) -> Case:
    B = case.shape["B"]
    n = round(density * B)
    routed = torch.zeros(B, dtype=torch.bool, device=case.device)
    routed[torch.randperm(B, device=case.device)[:n]] = True
    return case.derive(density=n / B, label=f"rho={density} ({n} of {B} rows)", routed=routed, rows=n)


def decode_bytes(case: Case, pass_: str) -> int:
    B, S, H, Hk, D = (case.shape[k] for k in ("B", "S", "H", "Hk", "D"))
    elt = case.dtype.itemsize
    return case.rows * S * Hk * D * 2 * elt + 2 * B * H * D * elt


def graphed(step, device: torch.device | str):
    """step() captured in a CUDA graph (after a warm-up run), returned as a function that
    replays it and returns the captured output; step itself on the CPU."""
    if torch.device(device).type != "cuda":
        return step
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay():
        graph.replay()
        return out

    return replay


def _graph_label(case: Case, sep: str = "") -> str:
    return sep + "graph" if torch.device(case.device).type == "cuda" else ""


def sdpa_step(case: Case):
    q = case.q[:, :, None, :]
    k, v = case.k.transpose(1, 2), case.v.transpose(1, 2)
    gqa = case.shape["H"] != case.shape["Hk"]
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)[:, :, 0]


def cram(case: Case) -> Call:
    import cram_ext

    def step():
        return cram_ext.routed_decode(case.q, case.k, case.v, case.seqlens, case.routed)[0]

    def check(out: torch.Tensor) -> tuple[str, bool]:
        with torch.no_grad():
            ref = sdpa_step(case)()
        routed = case.routed
        zero = bool((out[~routed] == 0).all())
        err = rel_err(out[routed], ref[routed]) if bool(routed.any()) else 0.0
        return f"rel err {err:.2e} vs SDPA{'' if zero else ', unrouted rows not zero'}", err <= case.tol and zero

    return Call(graphed(step, case.device), (), label=_graph_label(case), check=check)


def sdpa(case: Case) -> Call:
    return Call(graphed(sdpa_step(case), case.device), (), label="dense" + _graph_label(case, ", "))


SPEC = register(Bench(
    name="decode",
    record="routed_decode",
    doc=__doc__,
    impls=[Impl("cram", cram, passes=("fwd",), routed=True), Impl("sdpa", sdpa, passes=("fwd",))],
    defaults=per_device(cuda=["cram", "sdpa"], cpu=["cram", "sdpa"]),
    shapes={
        ("cuda", False): [_shape(B, S, 16, 4, 128) for S in (4096, 32768) for B in (1, 16, 64)],
        ("cuda", True): [_shape(4, 4096, 16, 4, 128)],
        ("cpu", False): [_shape(B, 4096, 8, 2, 64) for B in (1, 8)],
        ("cpu", True): [_shape(2, 512, 4, 2, 32)],
    },
    densities=ROW_DENSITIES,
    dtypes=per_device(cuda=[torch.bfloat16], cpu=[torch.float32]),
    shape_keys=("B", "S", "H", "Hk", "D"),
    make_shape=_shape,
    setup=setup,
    at_density=at_density,
    bytes=decode_bytes,
    copy_bandwidth=True,
    tolerance=(1e-4, 2e-2),
    baselines=["sdpa"],
    title="routed_decode: one decoding step (all results)",
))


def main(argv=None) -> int:
    return runner.main(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
