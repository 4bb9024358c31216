"""CRAMModel: token and continuous inputs, gradients through every block, eval determinism."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

from cram_ext import CRAMConfig, CRAMModel, aux_losses
from cram_ext.nn import apply_rotary
from cram_ext.models import TransformerConfig, TransformerLM


def _config(device, **kw):
    # CUDA attention needs head dims of 64 or 128.
    d, heads = (32, 4) if device == "cpu" else (128, 2)
    return CRAMConfig(d_model=d, num_heads=heads, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_token_model_trains_every_parameter(device):
    model = CRAMModel(_config(device, vocab_size=50, n_layers=2, num_kv_heads=1, routed={"warmup": 0, "probe": 0.5})).to(device)
    with torch.no_grad():
        for layer in model.routed_attention_layers():
            layer.router_weight.normal_(std=0.5)
            layer.router_bias.zero_()
    tokens = torch.randint(0, 50, (3, 27), device=device)
    for _ in range(2):  # target="loss": the router learns from the previous step's probes
        model.zero_grad(set_to_none=True)
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + aux_losses(model)
        loss.backward()
    assert logits.shape == (3, 27, 50) and torch.isfinite(logits).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    stats = [layer.last_stats for layer in model.routed_attention_layers()]
    assert len(stats) == 2 and all(0.0 <= float(s["utilization"]) <= 1.0 for s in stats)


@pytest.mark.parametrize("device", DEVICES)
def test_continuous_model_with_time_gaps(device):
    cfg = _config(device, input_dim=5, output_dim=3, n_layers=1)
    model = CRAMModel(cfg).to(device).eval()
    x = torch.randn(2, 31, 5, device=device)
    dt = torch.rand(2, 31, device=device) + 0.1
    with torch.no_grad():
        y1, y2 = model(x, dt), model(x, dt)
        y_unit = model(x)
    assert y1.shape == (2, 31, 3)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y_unit)  # the gaps reach the working memory


def test_config_needs_exactly_one_input_kind():
    with pytest.raises(ValueError, match="exactly one"):
        CRAMConfig()
    with pytest.raises(ValueError, match="exactly one"):
        CRAMConfig(vocab_size=10, input_dim=3)
    assert CRAMConfig(input_dim=4).output_dim == 4


def _transformer(device, attention, **kw):
    d, heads = (32, 4) if device == "cpu" else (128, 2)
    return TransformerLM(TransformerConfig(vocab_size=61, d_model=d, n_layers=2, num_heads=heads, max_len=40,
                                           attention=attention, **kw)).to(device)


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("device", DEVICES)
def test_transformer_routed_at_init_equals_dense(device, positions):
    """Everything is routed at initialisation, so the routed TransformerLM computes what the
    dense one does with the same weights (eval, no probes), with learned positions or with
    rotary ones inside both attentions."""
    routed, dense = _transformer(device, "routed", positions=positions), _transformer(device, "sdpa", positions=positions)
    assert (routed.pos is None) == (positions == "rope")
    dense.load_state_dict(routed.state_dict(), strict=False)
    routed.eval(), dense.eval()
    tokens = torch.randint(0, 61, (3, 40), device=device)
    with torch.no_grad():
        a, b = routed(tokens), dense(tokens)
    tol = {"rtol": 1e-4, "atol": 1e-4} if device == "cpu" else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(a, b, **tol)
    assert all(float(m.last_stats["utilization"]) == 1.0 for m in routed.routed_attention_layers())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attention", ["routed", "sdpa"])
def test_transformer_trains_every_parameter(device, attention):
    model = _transformer(device, attention, routed={"target": "loss", "warmup": 0})
    tokens = torch.randint(0, 61, (2, 33), device=device)
    for _ in range(2):  # the second step's router loss uses the first step's probe labels
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + aux_losses(model)
        model.zero_grad()
        loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.head.weight is model.embed.weight
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 41, dtype=torch.long, device=device))


def test_transformer_config_rejects_unknown_attention():
    with pytest.raises(ValueError, match="attention"):
        TransformerConfig(vocab_size=10, attention="flash")


def test_rotary_scores_depend_on_the_offset_only():
    """<R_s q, R_t k> is a function of t - s: shifting both positions leaves every score unchanged,
    while the scores themselves do change with the offset."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 2, 16, dtype=torch.float64), torch.randn(1, 1, 2, 16, dtype=torch.float64)

    def score(s: int, t: int) -> torch.Tensor:
        T = max(s, t) + 1
        qs = torch.zeros(1, T, 2, 16, dtype=torch.float64)
        ks = torch.zeros_like(qs)
        qs[:, s], ks[:, t] = q[:, 0], k[:, 0]
        return (apply_rotary(qs)[:, s] * apply_rotary(ks)[:, t]).sum(-1)

    tol = {"rtol": 1e-5, "atol": 1e-5}  # the angles are float32
    torch.testing.assert_close(score(3, 1), score(10, 8), **tol)
    torch.testing.assert_close(score(0, 0), (q * k).sum(-1)[:, 0], **tol)
    assert not torch.allclose(score(3, 1), score(3, 2))
    with pytest.raises(ValueError, match="even"):
        apply_rotary(torch.randn(1, 2, 1, 5))


def test_transformer_config_rejects_unknown_positions():
    with pytest.raises(ValueError, match="positions"):
        TransformerConfig(vocab_size=10, positions="alibi")
