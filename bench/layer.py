"""One whole RoutedAttention layer, a training step's forward and backward, beside the dense
attention layer it replaces and the same layer with attention removed: the end-to-end gain.

    python -m bench.layer [--device auto|cpu|cuda] [--quick] [--pass fwd|fwd_bwd|both]
                          [--impl cram,sdpa,none] [--shape B,T,E,H] [--densities 0.05,1]
                          [--out PATH | --record] [--append] [--no-check] [--threads N]

Implementations (impl), each in training mode with its parameters in the case's dtype:
  cram   RoutedAttention(E, H, routing="topk", budget=rho, warmup=0): each row routes its
         round(rho * T) tokens of highest router score (a fixed density, so that the time is the
         layer's at that density); projections, router, routed attention, semantic-memory MLP and
         the aux losses
  none   the same layer with routing="none": no token attends (the semantic MLP everywhere)
  cram_scan, cram_metaplastic   cram with memory="scan" / "metaplastic": the router and the
         semantic MLP read a working memory run inside the layer (not run unless named)
  sdpa   the dense causal self-attention layer it replaces: the same q/k/v/out projections around
         F.scaled_dot_product_attention(is_causal=True), the backend PyTorch picks (cuDNN on Hopper)

What is timed: loss = sum(layer(x) * g) (+ the aux losses), its forward under no_grad (fwd), or
forward and gradients into x and every parameter (fwd_bwd), as a training step computes them.

Check: at rho = 1 the routed layer's output equals the dense layer's with the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import runner
from .failures import Skip
from .registry import ROW_DENSITIES, Bench, Call, Case, Impl, per_device, register, rel_err


def _shape(B, T, E, H):
    return {"B": B, "T": T, "E": E, "H": H}


def setup(case: Case) -> Case:
    B, T, E = (case.shape[k] for k in ("B", "T", "E"))
    if E % case.shape["H"]:
        raise Skip(f"E={E} is not a multiple of H={case.shape['H']}")
    case.x = torch.randn(B, T, E, device=case.device, dtype=case.dtype)
    case.g = torch.randn(B, T, E, device=case.device, dtype=case.dtype)
    return case


def at_density(case: Case, density: float) -> Case:
    return case.derive(density=density, label=f"rho={density}")


def _routed_layer(case: Case, routing: str, budget: float = 1.0, memory: str | bool = False):
    import cram_ext

    E, H = case.shape["E"], case.shape["H"]
    torch.manual_seed(0)  # the same weights in every implementation
    layer = cram_ext.RoutedAttention(E, H, routing=routing, budget=budget, warmup=0, memory=memory)
    return layer.to(case.device, case.dtype)


def _dense_layer(case: Case):
    from cram_ext.models.transformer import CausalSelfAttention

    E, H = case.shape["E"], case.shape["H"]
    torch.manual_seed(0)
    return CausalSelfAttention(E, H).to(case.device, case.dtype)


def _step_call(layer: torch.nn.Module, case: Case, label: str, check=None) -> Call:
    """The loss of one training step as a function of (x, *parameters)."""
    import cram_ext

    names = [n for n, _ in layer.named_parameters()]
    layer.train()

    def loss(x, *params):
        y = torch.func.functional_call(layer, dict(zip(names, params)), (x,))
        return (y.float() * case.g.float()).sum() + cram_ext.aux_losses(layer)

    return Call(loss, (case.x, *[p.detach() for p in layer.parameters()]), label=label, check=check)


def cram(case: Case, memory: str | bool = False) -> Call:
    layer = _routed_layer(case, "topk", case.density, memory)

    def check(_) -> tuple[str, bool]:
        if case.density != 1.0:
            return "not compared (rho < 1)", True
        dense = _dense_layer(case)
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                getattr(dense, name).weight.copy_(getattr(layer, name).weight)
            err = rel_err(layer(case.x), dense(case.x))
        return f"rel err {err:.2e} vs the dense layer", err <= case.tol

    return _step_call(layer, case, "topk" if not memory else f"topk, memory={memory}", check)


def cram_scan(case: Case) -> Call:
    return cram(case, "scan")


def cram_metaplastic(case: Case) -> Call:
    return cram(case, "metaplastic")


def none(case: Case) -> Call:
    return _step_call(_routed_layer(case, "none"), case, "no attention")


def sdpa(case: Case) -> Call:
    return _step_call(_dense_layer(case), case, "dense")


SPEC = register(Bench(
    name="layer",
    record="routed_layer",
    doc=__doc__,
    impls=[Impl("cram", cram, routed=True), Impl("cram_scan", cram_scan, routed=True),
           Impl("cram_metaplastic", cram_metaplastic, routed=True), Impl("none", none), Impl("sdpa", sdpa)],
    defaults=per_device(cuda=["cram", "none", "sdpa"], cpu=["cram", "none", "sdpa"]),
    shapes={
        ("cuda", False): [_shape(1, T, 2048, 16) for T in (8192, 32768)],
        ("cuda", True): [_shape(1, 2048, 512, 4)],
        ("cpu", False): [_shape(1, 2048, 256, 4)],
        ("cpu", True): [_shape(1, 256, 64, 2)],
    },
    densities=ROW_DENSITIES,
    dtypes=per_device(cuda=[torch.bfloat16], cpu=[torch.float32]),
    shape_keys=("B", "T", "E", "H"),
    make_shape=_shape,
    setup=setup,
    at_density=at_density,
    table="flops",
    tolerance=(1e-4, 2e-2),
    baselines=["sdpa", "none"],
    title="routed_layer: one RoutedAttention layer, a training step (all results)",
))


def main(argv: list[str] | None = None) -> int:
    return runner.main(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
