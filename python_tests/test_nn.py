"""The nn modules: RoutedAttention as a drop-in causal attention, its routing and losses,
and WorkingMemory against a plain recurrence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES

import cram_ext
from cram_ext import MetaplasticMemory, RoutedAttention, WorkingMemory, aux_losses

E, H = 32, 4


def _dense_attention(layer: RoutedAttention, x: torch.Tensor) -> torch.Tensor:
    """Causal SDPA through the layer's own projections, before out_proj: every token routed."""
    B, T, _ = x.shape
    q = layer.q_proj(x).view(B, T, layer.num_heads, -1).transpose(1, 2)
    k = layer.k_proj(x).view(B, T, layer.num_kv_heads, -1).transpose(1, 2)
    v = layer.v_proj(x).view(B, T, layer.num_kv_heads, -1).transpose(1, 2)
    rep = layer.num_heads // layer.num_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)


def _dense_reference(layer: RoutedAttention, x: torch.Tensor) -> torch.Tensor:
    return layer.out_proj(_dense_attention(layer, x))


def _z(x: torch.Tensor) -> torch.Tensor:
    """What the router and the semantic MLP read: the input, normalised, no affine."""
    return F.layer_norm(x, (x.shape[-1],))


def _tol(device):
    """On CUDA a float32 layer attends in bfloat16 (the kernels' dtypes)."""
    return {"rtol": 1e-4, "atol": 1e-5} if device == "cpu" else {"rtol": 2e-2, "atol": 2e-2}


def _layer(device, dtype=torch.float32, **kw):
    # Head dims of 64 on CUDA: the kernels' own size (others are padded; tested below).
    # No warm-up unless a test asks: these test the routing itself.
    kw.setdefault("warmup", 0)
    e = E if device == "cpu" else 2 * 64
    return RoutedAttention(e, num_heads=e // (8 if device == "cpu" else 64), **kw).to(device, dtype), e


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_everything_routed_at_init_equals_dense_causal_attention(device, num_kv_heads):
    layer, e = _layer(device)
    if num_kv_heads:
        layer, e = _layer(device, num_kv_heads=num_kv_heads)
    layer.eval()
    x = torch.randn(2, 37, e, device=device)
    with torch.no_grad():
        y = layer(x)
        ref = _dense_reference(layer, x)
    assert float(layer.last_stats["utilization"]) == 1.0
    assert float(layer.last_stats["attn_flop_fraction"]) == pytest.approx(1.0)
    torch.testing.assert_close(y, ref, **_tol(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [16, 96])
def test_any_head_dim(device, head_dim):
    """Head dims the CUDA kernels do not have (16, 96) are zero-padded to 64 / 128 inside
    the layer: the result is still dense causal attention with scale head_dim ** -0.5."""
    layer = RoutedAttention(2 * head_dim, num_heads=2).to(device)
    layer.eval()
    x = torch.randn(2, 45, 2 * head_dim, device=device)
    with torch.no_grad():
        y = layer(x)
        ref = _dense_reference(layer, x)
    assert float(layer.last_stats["utilization"]) == 1.0
    torch.testing.assert_close(y, ref, **_tol(device))


@pytest.mark.parametrize("device", DEVICES)
def test_unrouted_tokens_take_the_semantic_memory(device):
    layer, e = _layer(device, threshold=1.0)  # prob never exceeds 1: nothing routed in eval
    layer.eval()
    x = torch.randn(2, 19, e, device=device)
    with torch.no_grad():
        y = layer(x)
        ref = layer.out_proj(layer.semantic(_z(x)))
    assert float(layer.last_stats["utilization"]) == 0.0
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_routing_matches_per_token_choice(device):
    layer, e = _layer(device)
    with torch.no_grad():
        layer.router_weight.normal_()
        layer.router_bias.zero_()
    layer.eval()
    x = torch.randn(3, 29, e, device=device)
    with torch.no_grad():
        y = layer(x)
        prob = torch.sigmoid(_z(x) @ layer.router_weight + layer.router_bias)
        routed = (prob > layer.threshold).unsqueeze(-1)
        dense = _dense_reference(layer, x)
        semantic = layer.out_proj(layer.semantic(_z(x)))
    u = float(layer.last_stats["utilization"])
    assert 0.0 < u < 1.0
    assert u == pytest.approx(routed.float().mean().item())
    torch.testing.assert_close(y, torch.where(routed, dense, semantic), **_tol(device))


def _training_step_inputs(device, **kw):
    """A layer in training mode whose router routes some tokens and not others, and an
    input that requires grad."""
    layer, e = _layer(device, **kw)
    with torch.no_grad():
        layer.router_weight.normal_(std=0.5)
        layer.router_bias.fill_(0.2)
    layer.train()
    return layer, torch.randn(2, 33, e, device=device, requires_grad=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", ["predict", "loss"])
def test_training_losses_reach_every_parameter(device, target):
    layer, x = _training_step_inputs(device, target=target, probe=0.5)
    if target == "loss":  # the router learns from the previous training step's probes
        layer(x).square().mean().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None
    y = layer(x)
    aux = aux_losses(layer)
    assert aux.dim() == 0 and torch.isfinite(aux) and aux > 0
    (y.square().mean() + aux).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target, memory", [("predict", False), ("loss", False), ("loss", True),
                                            ("loss", "metaplastic")])
def test_router_and_semantic_losses_train_only_themselves(device, target, memory):
    """The consolidation and router losses reach the router and the semantic MLP (and the
    layer's own working memory), and neither the layer's input nor attention's projections
    (they read a stop-gradient)."""
    layer, x = _training_step_inputs(device, target=target, memory=memory, probe=0.5)
    for _ in range(2):  # target="loss": the router learns from the previous step's probes
        y = layer(x)
        y.square().sum().backward(inputs=[x])
    untouched = [x, layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight, layer.out_proj.weight]
    trained = [layer.router_weight, layer.router_bias, *layer.semantic.parameters()]
    if memory:
        trained += list(layer.memory.parameters())
    grads = torch.autograd.grad(aux_losses(layer), untouched + trained, allow_unused=True)
    assert all(g is None for g in grads[: len(untouched)])
    for g in grads[len(untouched):]:
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_eval_is_deterministic_and_explores_only_in_training(device):
    layer, e = _layer(device, threshold=1.0, explore=0.5)
    x = torch.randn(2, 64, e, device=device)
    layer.eval()
    with torch.no_grad():
        y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    assert float(layer.last_stats["utilization"]) == 0.0
    assert layer.aux_loss is None and float(aux_losses(layer)) == 0.0
    layer.train()
    with torch.no_grad():
        layer(x)
    assert 0.2 < float(layer.last_stats["utilization"]) < 0.8  # the forced half


def test_memory_kinds():
    assert isinstance(RoutedAttention(32, 4, memory=True).memory, WorkingMemory)
    assert isinstance(RoutedAttention(32, 4, memory="scan").memory, WorkingMemory)
    memory = RoutedAttention(32, 4, memory="metaplastic").memory
    assert isinstance(memory, MetaplasticMemory) and memory.num_heads == 4
    assert RoutedAttention(32, 4, memory=False).memory is None and RoutedAttention(32, 4, memory=None).memory is None
    with pytest.raises(ValueError, match="memory must be one of"):
        RoutedAttention(32, 4, memory="gla")


def test_bad_head_configuration():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        RoutedAttention(30, num_heads=4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        RoutedAttention(32, num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize("device", DEVICES)
def test_working_memory_matches_plain_recurrence(device):
    wm = WorkingMemory(E, state_dim=24).to(device)
    x = torch.randn(2, 21, E, device=device)
    dt = torch.rand(2, 21, device=device) * 2
    h0 = torch.randn(2, 24, device=device)
    y = wm(x, dt=dt, h0=h0)
    with torch.no_grad():
        a = torch.exp(-dt.unsqueeze(-1) * F.softplus(wm.gate(x)))
        u = wm.inp(x)
        h, states = h0, []
        for t in range(x.shape[1]):
            h = a[:, t] * h + u[:, t]
            states.append(h)
        ref = wm.out(torch.stack(states, 1))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wm.last_state, h, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in wm.parameters())


def test_exports():
    assert cram_ext.RoutedAttention is RoutedAttention and cram_ext.aux_losses is aux_losses


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_training_step(device):
    layer, e = _layer(device, probe=0.5)
    wm = WorkingMemory(e).to(device)
    with torch.no_grad():
        layer.router_weight.normal_(std=0.5)
        layer.router_bias.zero_()
    x = torch.randn(2, 40, e, device=device)
    for _ in range(2):  # target="loss": the router learns from the previous step's probes
        layer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            y = layer(wm(x))
            loss = y.float().square().mean() + aux_losses(layer)
        loss.backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_loss_target_labels_probes_by_the_loss_they_would_gain(device):
    """target="loss" on a hand-built loss L = sum(c * y): its gradient at the layer's mixed
    output is c @ W_out, so a probe token's label is known in closed form:
    needed = -<c W_out, attn - semantic> * B * T > loss_tol, weighted by |gain - loss_tol|.
    The next step's router loss is the router's BCE on those labels with those weights."""
    layer, e = _layer(device, target="loss", probe=0.5, loss_tol=0.05)
    with torch.no_grad():
        layer.router_weight.normal_(std=0.3)
    layer.train()
    B, T = 2, 31
    x = torch.randn(B, T, e, device=device)
    c = torch.randn(B, T, e, device=device)
    y = layer(x)
    probe = layer.last_probe
    assert probe is not None and probe.any() and (~probe).any()
    assert layer.last_mask[probe].all(), "attention must be computed at every probe token"
    (c * y).sum().backward()
    with torch.no_grad():
        z = _z(x)
        g = c @ layer.out_proj.weight
        gain = -((_dense_attention(layer, x) - layer.semantic(z)) * g).sum(-1) * B * T
    z_all, needed_all, weight = layer._probe_labels
    assert (weight[~probe] == 0).all()
    torch.testing.assert_close(weight[probe], (gain[probe] - layer.loss_tol).abs(), rtol=1e-3, atol=1e-3 * gain.abs().max())
    torch.testing.assert_close(z_all, z)
    z_probe, needed = z[probe], needed_all[probe]
    near = (gain[probe] - layer.loss_tol).abs() < 1e-3 * gain.abs().max()  # rounding may flip a tie
    assert torch.equal(needed[~near], (gain[probe] > layer.loss_tol)[~near])
    assert needed.any() and (~needed).any()
    # The next training forward's aux loss holds the router's BCE on these labels.
    layer.eval()
    with torch.no_grad():
        prob = torch.sigmoid(z_probe @ layer.router_weight + layer.router_bias)
        w = weight[probe]
        expected = -((needed * prob.log() + (~needed) * (1 - prob).log()) * w).sum() / w.sum()
        layer.train()
        torch.manual_seed(0)
        layer(x)
        semantic_only = layer.aux_loss - layer._router_loss_from_probes(z.dtype)
        assert semantic_only >= 0
    torch.testing.assert_close(layer._router_loss_from_probes(z.dtype), expected.float())


@pytest.mark.parametrize("device", DEVICES)
def test_loss_target_eval_has_no_probes(device):
    layer, e = _layer(device, target="loss", probe=0.5)
    x = torch.randn(2, 40, e, device=device)
    layer.eval()
    with torch.no_grad():
        y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2) and layer.last_probe is None
    assert float(layer.last_stats["utilization"]) == 1.0  # the router still routes everything at init


def test_bad_target_and_probe():
    with pytest.raises(ValueError, match="target"):
        RoutedAttention(32, num_heads=4, target="usefulness")
    with pytest.raises(ValueError, match="probe"):
        RoutedAttention(32, num_heads=4, probe=1.0)
    with pytest.raises(ValueError, match="warmup"):
        RoutedAttention(32, num_heads=4, warmup=-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", ["predict", "loss"])
def test_warmup_routes_everything_and_freezes_the_router(device, target):
    """A router that would drop every token (bias -8, threshold 0.3) is overruled for the
    first `warmup` training forwards, in training and in eval, and gets no gradient then;
    from the next forward on it decides, and learns."""
    layer, e = _layer(device, warmup=2, router_bias_init=-8.0, explore=0.0, target=target)
    x = torch.randn(2, 33, e, device=device)

    def train_step() -> float:
        layer.train()
        layer.zero_grad(set_to_none=True)
        (layer(x).square().mean() + layer.aux_loss).backward()
        return float(layer.last_stats["utilization"])

    def eval_utilization() -> float:
        layer.eval()
        with torch.no_grad():
            layer(x)
        return float(layer.last_stats["utilization"])

    for step in range(2):
        assert layer.warming and eval_utilization() == 1.0
        assert train_step() == 1.0 and layer.last_probe is None  # no probes: every token attends
        assert layer.router_weight.grad is None and layer.router_bias.grad is None, step
        assert layer.semantic[0].weight.grad is not None  # the semantic memory learns meanwhile
    assert layer.trained_steps == 2 and not layer.warming
    assert eval_utilization() == 0.0  # eval forwards do not count
    train_step()
    if target == "predict":
        assert layer.router_bias.grad is not None
    train_step()  # target="loss" learns from the previous step's probes
    assert layer.router_bias.grad is not None and layer.trained_steps == 4


@pytest.mark.parametrize("device", DEVICES)
def test_warmup_freezes_the_topk_router_too(device):
    """routing="topk" keeps its budget during the warm-up, and its router gets no gradient
    until the warm-up is over."""
    layer, e = _layer(device, warmup=1, routing="topk", budget=0.25, target="predict")
    layer.train()
    x = torch.randn(2, 32, e, device=device)
    for frozen in (True, False):
        layer.zero_grad(set_to_none=True)
        (layer(x).square().mean() + layer.aux_loss).backward()
        assert float(layer.last_stats["utilization"]) == 0.25
        assert (layer.router_weight.grad is None) == frozen


def test_probe_labels_are_saved_with_the_state_dict():
    """The labels the next step's router loss reads travel with the state dict (only the
    probes' rows), so a resumed run adds the same router loss as one never stopped."""
    torch.manual_seed(0)
    layer = RoutedAttention(32, num_heads=4, target="loss", probe=0.3, warmup=0)
    x = torch.randn(2, 21, 32)
    layer(x).square().sum().backward()
    copy = RoutedAttention(32, num_heads=4, target="loss", probe=0.3, warmup=0)
    copy.load_state_dict(layer.state_dict())
    probe = layer.last_probe
    z, needed, weight = copy._probe_labels
    assert torch.equal(weight, layer._probe_labels[2]) and (weight[~probe] == 0).all()
    assert torch.equal(needed, layer._probe_labels[1])
    assert torch.equal(z[probe], layer._probe_labels[0][probe]) and not z[~probe].any()
    assert torch.equal(copy._router_loss_from_probes(torch.float32), layer._router_loss_from_probes(torch.float32))


def test_state_dict_is_tensors_only_and_round_trips_through_safetensors(tmp_path):
    """The extra state (warm-up count, probe labels) is one uint8 tensor, so a model's state
    dict goes through safetensors (as transformers' Trainer saves), and a dict written by
    earlier versions still loads."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    layer = RoutedAttention(32, num_heads=4, target="loss", probe=0.3, warmup=0)
    layer(torch.randn(2, 21, 32)).square().sum().backward()
    state = layer.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())
    safetensors_torch.save_file(state, tmp_path / "layer.safetensors")
    copy = RoutedAttention(32, num_heads=4, target="loss", probe=0.3, warmup=0)
    copy.load_state_dict(safetensors_torch.load_file(tmp_path / "layer.safetensors"))
    assert copy.trained_steps == 1
    (z, needed, weight), (z0, needed0, weight0) = copy._probe_labels, layer._probe_labels
    assert torch.equal(weight, weight0) and torch.equal(needed, needed0) and (weight > 0).any()
    assert torch.equal(z[weight > 0], z0[weight > 0])
    old = RoutedAttention(32, num_heads=4)
    old.set_extra_state({"trained_steps": 7, "probe_labels": None})  # a checkpoint's dict
    assert old.trained_steps == 7 and old._probe_labels is None


def test_warmup_count_is_saved_with_the_state_dict():
    layer = RoutedAttention(32, num_heads=4, warmup=5)
    x = torch.randn(1, 9, 32)
    for _ in range(3):
        layer(x)
    copy = RoutedAttention(32, num_heads=4, warmup=5)
    copy.load_state_dict(layer.state_dict())
    assert copy.trained_steps == 3 and copy.warming
    for _ in range(2):
        copy(x)
    assert not copy.warming


def test_activation_checkpointing_counts_one_step_and_gives_the_same_grads():
    """torch.utils.checkpoint runs the forward again inside the backward: the layer computes
    the same thing there (same warm-up state) and counts the step once."""
    torch.manual_seed(0)
    layer = RoutedAttention(32, num_heads=4, warmup=1)
    x = torch.randn(2, 9, 32, requires_grad=True)
    grads = []
    for checkpointed in (False, True):
        layer.trained_steps = 0
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(1)  # the same exploration draw
        if checkpointed:
            y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        else:
            y = layer(x)
        y.square().sum().backward()
        assert layer.trained_steps == 1
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_projections_false_needs_mix():
    layer = RoutedAttention(32, num_heads=4, head_dim=6, projections=False)
    assert not hasattr(layer, "q_proj") and layer.semantic[-1].out_features == 24
    with pytest.raises(RuntimeError, match="mix"):
        layer(torch.randn(1, 3, 32))
    q, k, v = torch.randn(1, 3, 4, 6), torch.randn(1, 3, 2, 6), torch.randn(1, 3, 2, 6)
    layer = RoutedAttention(32, num_heads=4, num_kv_heads=2, head_dim=6, projections=False)
    assert layer.mix(torch.randn(1, 3, 32), q, k, v).shape == (1, 3, 24)
