"""The ops under torch.compile(fullgraph=True): route -> routed_attention -> gated_scan,
forward and backward, match eager (docs/design.md §2: no host sync, no data-dependent shapes).
Few tests: compiling is slow on a small CPU machine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCE, assert_close_rel, cuda_only

import cram_ext

PARAMS = [
    pytest.param("cpu", torch.float32, 8, id="cpu-f32-D8"),
    cuda_only("cuda", torch.bfloat16, 64),
]


def pipeline(x, weight, bias, force, k, v, log_a, h0, num_heads):
    """A CRAM-like layer: route on x, attend the routed queries (q = x split into heads),
    mix attention output with the router probability, run the scan over the result."""
    B, T, E = x.shape
    r = cram_ext.route(x, weight, bias, 0.5, force)
    q = x.view(B, T, num_heads, E // num_heads)
    out, lse = cram_ext.routed_attention(q, k, v, r.index, r.counts)
    mixed = out.reshape(B, T, E) * r.prob.unsqueeze(-1).to(out.dtype) + x
    h, h_last = cram_ext.gated_scan(mixed, log_a, h0)
    return h, h_last, lse, r.mask, r.index, r.counts


def make_inputs(device, dtype, D, B=2, T=37, H=4, Hk=2):
    E = H * D
    x = torch.randn(B, T, E, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(E, device=device) / E**0.5).requires_grad_()
    bias = torch.tensor(0.1, device=device, requires_grad=True)
    force = torch.rand(B, T, device=device) < 0.1
    k = torch.randn(B, T, Hk, D, device=device).to(dtype).requires_grad_()
    v = torch.randn(B, T, Hk, D, device=device).to(dtype).requires_grad_()
    log_a = (-F.softplus(torch.randn(B, T, E, device=device))).to(dtype).requires_grad_()
    h0 = torch.randn(B, E, device=device, requires_grad=True)
    return [x, weight, bias, force, k, v, log_a, h0]


def run_and_grad(fn, inputs, num_heads):
    h, h_last, lse, mask, index, counts = fn(*inputs, num_heads)
    loss = (h.float() ** 2).mean() + h_last.sum()
    grads = torch.autograd.grad(loss, [t for t in inputs if t.requires_grad])
    return (h, h_last, lse, mask, index, counts), grads


def compare(compiled, eager, tol):
    (h, h_last, lse, mask, index, counts), grads = compiled
    (h_e, h_last_e, lse_e, mask_e, index_e, counts_e), grads_e = eager
    assert torch.equal(mask, mask_e) and torch.equal(index, index_e) and torch.equal(counts, counts_e)
    assert_close_rel(h, h_e, tol, "h")
    assert_close_rel(h_last, h_last_e, tol, "h_last")
    routed = torch.isfinite(lse_e)
    assert torch.equal(routed, torch.isfinite(lse))
    assert_close_rel(lse[routed], lse_e[routed], tol, "lse")
    for i, (g, g_e) in enumerate(zip(grads, grads_e)):
        assert_close_rel(g, g_e, tol, f"grad {i}")


@pytest.mark.parametrize("device, dtype, D", PARAMS)
def test_compile_fullgraph_inductor(device, dtype, D):
    torch._dynamo.reset()
    inputs = make_inputs(device, dtype, D)
    compiled_fn = torch.compile(pipeline, fullgraph=True)
    compiled = run_and_grad(compiled_fn, inputs, 4)
    eager = run_and_grad(pipeline, inputs, 4)
    # Inductor may fuse the elementwise glue differently; the ops themselves are the same kernels.
    compare(compiled, eager, max(TOLERANCE[dtype], 1e-5))
    torch._dynamo.reset()


@pytest.mark.parametrize("device, dtype, D", PARAMS)
def test_compile_dynamic_shapes(device, dtype, D):
    """Symbolic B and T through the fake impls: one graph serves several sequence lengths."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_fn = torch.compile(pipeline, fullgraph=True, dynamic=True, backend="aot_eager")
    # Sizes other than 0/1 and distinct from the fixed dims (Hk=2, H=4, D, E), which
    # dynamo would otherwise specialise on or tie together (duck sizing).
    for B, T in [(3, 17), (5, 41), (6, 23)]:
        inputs = make_inputs(device, dtype, D, B=B, T=T)
        compare(run_and_grad(compiled_fn, inputs, 4), run_and_grad(pipeline, inputs, 4), max(TOLERANCE[dtype], 1e-5))
    assert counters["stats"]["unique_graphs"] == 1, "a new batch size or sequence length recompiled"
    torch._dynamo.reset()


def test_compiled_training_model_with_the_layer():
    """A model holding RoutedAttention, compiled and trained (warm-up ending on the way, the
    loss target's probes and router labels running): the layer's mixing runs eagerly under
    the compiled model (its per-step Python state would recompile every step), so graphs stop
    growing after the first steps, and the losses and parameters follow the eager model's."""
    from torch._dynamo.utils import counters

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 32)
            self.attention = cram_ext.RoutedAttention(32, 4, warmup=2, router_bias_init=0.0)
            self.head = torch.nn.Linear(32, 50)

        def forward(self, x):
            h = self.embed(x)
            return self.head(h + self.attention(h))

    def train(model, forward, steps=7):
        torch.manual_seed(1)
        opt = torch.optim.AdamW(model.parameters(), 1e-2)
        losses, graphs = [], []
        for _ in range(steps):
            x = torch.randint(0, 50, (4, 16))
            loss = F.cross_entropy(forward(x).flatten(0, 1), x.flatten()) + cram_ext.aux_losses(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            graphs.append(counters["stats"]["unique_graphs"])
        return torch.stack(losses), graphs

    torch.manual_seed(0)
    eager = Model()
    compiled = Model()
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    losses_c, graphs = train(compiled, torch.compile(compiled, backend="aot_eager"))
    losses_e, _ = train(eager, eager)
    assert compiled.attention.trained_steps == eager.attention.trained_steps == 7
    assert graphs[-1] == graphs[3], f"recompiled after the warm-up: unique graphs per step {graphs}"
    assert float(compiled.attention.last_stats["utilization"]) < 1, "the router never dropped a token"
    assert_close_rel(losses_c, losses_e, 1e-5, "losses")
    for (name, p), p_e in zip(compiled.named_parameters(), eager.parameters()):
        assert_close_rel(p.detach(), p_e.detach(), 1e-5, name)
