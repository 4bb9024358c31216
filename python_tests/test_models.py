"""CRAMModel: token and continuous inputs, gradients through every block, eval determinism."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

from cram_ext import CRAMConfig, CRAMModel, aux_losses


def _config(device, **kw):
    # CUDA attention needs head dims of 64 or 128.
    d, heads = (32, 4) if device == "cpu" else (128, 2)
    return CRAMConfig(d_model=d, num_heads=heads, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_token_model_trains_every_parameter(device):
    model = CRAMModel(_config(device, vocab_size=50, n_layers=2, num_kv_heads=1)).to(device)
    with torch.no_grad():
        for layer in model.routed_attention_layers():
            layer.router_weight.normal_(std=0.5)
            layer.router_bias.zero_()
    tokens = torch.randint(0, 50, (3, 27), device=device)
    logits = model(tokens)
    assert logits.shape == (3, 27, 50) and torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + aux_losses(model)
    loss.backward()
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
