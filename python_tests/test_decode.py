"""Decoding with a cache (issue 15): a prefill then one-token steps (or chunks) give the outputs
and the routing decisions of one full forward over the whole sequence, for every module that
takes a cache; generate() on top of it.

The routers are set to drop about half of the tokens (warmup=0, a random router weight and the
bias at the threshold's logit, so a token is routed when w . z > 0): a decode that routed
differently from the full forward, or attended over the wrong keys, would show. routing="topk"
is not causal (a row's k best tokens), so it cannot decode and is only checked to refuse.
Exactness is fp32 on the CPU (relative error <= 1e-5); on CUDA a float32 layer attends in
bfloat16, so the CUDA cases use everything-routed layers (no decision can flip) and a looser bound.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_close_rel

import cram_ext
from cram_ext import (CRAMBlock, CRAMConfig, CRAMModel, KVCache, ModelCache, RoutedAttention, ScanCache,
                      TransformerConfig, TransformerLM, WorkingMemory)
from cram_ext.nn import apply_rotary

E, H = 32, 4
TOL = 1e-5


def _routed_layers(module: torch.nn.Module) -> list[RoutedAttention]:
    return [m for m in module.modules() if isinstance(m, RoutedAttention)]


def _route_about_half(module: torch.nn.Module, *inputs) -> torch.nn.Module:
    """Set each routed layer's router so that it routes half of the tokens of `inputs`, with a
    margin: a random weight, and the bias placing the threshold in the widest gap between the
    middle scores w . z (z as the layer computes it), so float rounding cannot flip a decision.
    Layer by layer, as each one's routing changes the next one's input. Returns the module in
    eval mode."""
    module.eval()
    for layer in _routed_layers(module):
        seen = []
        hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        with torch.no_grad():
            module(*inputs)
            hook.remove()
            z = F.layer_norm(seen[0], (seen[0].shape[-1],))
            if layer.memory is not None:
                z = z + layer.memory(z)
            layer.router_weight.normal_()
            score = (z @ layer.router_weight).flatten().sort().values
            n = score.numel()
            lo, hi = (n * 2) // 5, max((n * 3) // 5, (n * 2) // 5 + 1)
            gap = (score[lo + 1:hi + 1] - score[lo:hi]).argmax() + lo
            cut = (score[gap] + score[gap + 1]) / 2
            # prob > threshold exactly where w . z > cut
            layer.router_bias.fill_(math.log(layer.threshold / (1 - layer.threshold)) - float(cut))
    return module


def _full(module: torch.nn.Module, *args) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward over the whole sequence: the output and each routed layer's mask."""
    with torch.no_grad():
        out = module(*args)
    return out, [layer.last_mask.clone() for layer in _routed_layers(module)]


def _pieces(T: int, prefill: int, chunk: int = 1) -> list[slice]:
    """The prompt [0, prefill), then chunks of `chunk` tokens."""
    bounds = [0, *range(prefill, T, chunk), T]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _decode(module: torch.nn.Module, cache, pieces: list[slice], call) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Feed the pieces in order through `call(piece, cache) -> (out, cache)`: the outputs and the
    routed layers' masks, concatenated along T."""
    outs, masks = [], [[] for _ in _routed_layers(module)]
    with torch.no_grad():
        for piece in pieces:
            out, returned = call(piece, cache)
            assert returned is cache
            outs.append(out)
            for rows, layer in zip(masks, _routed_layers(module)):
                rows.append(layer.last_mask)
    return torch.cat(outs, dim=1), [torch.cat(rows, dim=1) for rows in masks]


def _assert_same(decoded, full, tol: float = TOL) -> None:
    (out, masks), (ref, ref_masks) = decoded, full
    for layer, (m, r) in enumerate(zip(masks, ref_masks)):
        assert torch.equal(m, r), f"layer {layer}: routing differs from the full forward"
    assert_close_rel(out, ref, tol)
    # Elementwise too: a relative norm over the whole sequence could hide one wrong step.
    torch.testing.assert_close(out, ref, rtol=100 * tol, atol=10 * tol)


def _assert_drops_some(masks: list[torch.Tensor]) -> None:
    for m in masks:
        assert 0.2 < m.float().mean() < 0.8, "the router should drop about half of the tokens"


# ------------------------------------------------------------------ the op and positions


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 4, 13])
def test_routed_attention_of_new_queries_is_bottom_right_aligned(device, T):
    """q of the T last tokens against S keys: query i sees keys j <= i + S - T, i.e. the last T
    rows of causal attention over all S tokens (SDPA), at the routed rows; 0 elsewhere."""
    B, S, Hk, D = 2, 13, 2, 16 if device == "cpu" else 64
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(B, S, n, D, device=device, dtype=dtype) for n in (H, Hk, Hk))
    q32, k32, v32 = (t.float().transpose(1, 2) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True, enable_gqa=True).transpose(1, 2)[:, S - T:]
    mask = torch.rand(B, T, device=device) < 0.5
    mask[0, -1] = True
    out, _ = cram_ext.routed_attention(q[:, S - T:], k, v, *cram_ext.route_from_mask(mask))
    assert_close_rel(out[mask], ref[mask], TOL if device == "cpu" else 1e-2)
    assert not out[~mask].any()


def test_rotary_offset_is_the_position_of_the_first_token():
    x = torch.randn(2, 11, 3, 8)
    full = apply_rotary(x, 500.0)
    for offset in (0, 1, 6, 10):
        assert torch.equal(apply_rotary(x[:, offset:], 500.0, offset=offset), full[:, offset:])
        assert torch.equal(apply_rotary(x[:, offset:offset + 1], 500.0, offset=offset), full[:, offset:offset + 1])


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("memory", [False, True], ids=["no-memory", "memory"])
@pytest.mark.parametrize("num_kv_heads", [None, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("rope_base", [None, 10000.0], ids=["no-rope", "rope"])
@pytest.mark.parametrize("prefill", [1, 5])
def test_routed_attention_decode_equals_full_forward(memory, num_kv_heads, rope_base, prefill):
    B, T = 2, 14
    x = torch.randn(B, T, E)
    layer = _route_about_half(RoutedAttention(E, H, num_kv_heads, warmup=0, memory=memory, rope_base=rope_base), x)
    full = _full(layer, x)
    _assert_drops_some(full[1])
    cache = layer.allocate_cache(B, T)
    assert isinstance(cache, KVCache) and (cache.memory is not None) == memory
    _assert_same(_decode(layer, cache, _pieces(T, prefill), lambda s, c: layer(x[:, s], cache=c)), full)
    assert cache.position == T and (not memory or cache.memory.position == T)
    # Every token wrote its key and value, routed or not.
    k = layer.k_proj(x).view(B, T, -1, layer.head_dim)
    k = k if rope_base is None else apply_rotary(k, rope_base)
    assert_close_rel(cache.k, k, TOL)


@pytest.mark.parametrize("memory", [True, "metaplastic"])
@pytest.mark.parametrize("device", DEVICES)
def test_routed_attention_decode_on_device(device, memory):
    """Everything routed (the warm-up): the same outputs on any device, within its precision."""
    e = E if device == "cpu" else 128
    layer = RoutedAttention(e, e // (8 if device == "cpu" else 64), memory=memory).to(device).eval()
    x = torch.randn(2, 9, e, device=device)
    full = _full(layer, x)
    cache = layer.allocate_cache(2, 12)
    assert cache.k.device.type == device
    _assert_same(_decode(layer, cache, _pieces(9, 3), lambda s, c: layer(x[:, s], cache=c)), full,
                 TOL if device == "cpu" else 2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels' head dims")
@pytest.mark.parametrize("head_dim", [16, 96])
def test_cuda_cache_holds_keys_at_the_kernels_head_dim(head_dim):
    """On CUDA a head dim the kernels do not take is kept zero-padded in the cache (to 64 or 128),
    so that a step reads the cache in place; decoding still gives the full forward's outputs."""
    e = 4 * head_dim
    layer = RoutedAttention(e, 4, 2, rope_base=10000.0).cuda().eval()
    x = torch.randn(2, 9, e, device="cuda")
    full = _full(layer, x)
    cache = layer.allocate_cache(2, 12)
    assert cache.k.shape[-1] == (64 if head_dim < 64 else 128)
    _assert_same(_decode(layer, cache, _pieces(9, 3), lambda s, c: layer(x[:, s], cache=c)), full, 2e-2)
    assert not cache.k[..., head_dim:].any() and not cache.v[..., head_dim:].any()
    assert cache.k[:, :9, :, :head_dim].abs().amax() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_working_memory_decode_equals_full_forward(device):
    memory = WorkingMemory(E, state_dim=24).to(device)
    B, T = 3, 12
    x, dt = torch.randn(B, T, E, device=device), torch.rand(B, T, device=device)
    ref = _full(memory, x, dt)
    ref_state = memory.last_state
    cache = memory.allocate_cache(B)
    assert isinstance(cache, ScanCache) and cache.state.dtype == torch.float32 and not cache.state.any()
    state = cache.state
    _assert_same(_decode(memory, cache, _pieces(T, 5), lambda s, c: memory(x[:, s], dt[:, s], cache=c)), ref)
    assert cache.state is state, "the state is written in place (a CUDA graph keeps its address)"
    assert_close_rel(cache.state, ref_state, TOL)
    assert cache.position == T
    with pytest.raises(ValueError, match="h0 or cache"):
        memory(x, h0=torch.zeros(B, 24, device=device), cache=cache)


def test_cram_block_decode_equals_full_forward():
    cfg = CRAMConfig(d_model=E, num_heads=H, num_kv_heads=2, vocab_size=7, routed=dict(warmup=0, memory=True))
    B, T = 2, 13
    x, dt = torch.randn(B, T, E), torch.rand(B, T)
    block = _route_about_half(CRAMBlock(cfg), x, dt)
    full = _full(block, x, dt)
    _assert_drops_some(full[1])
    cache = block.allocate_cache(B, T)
    _assert_same(_decode(block, cache, _pieces(T, 3), lambda s, c: block(x[:, s], dt[:, s], c)), full)


# --------------------------------------------------------------------------- models


def _transformer(attention: str = "routed", positions: str = "learned", tokens: torch.Tensor | None = None,
                 **kw) -> TransformerLM:
    """A TransformerLM (vocabulary 53, max_len 24) routing half of `tokens` (default: random ones)."""
    cfg = TransformerConfig(vocab_size=53, d_model=E, n_layers=2, num_heads=H, num_kv_heads=2, max_len=24,
                            attention=attention, positions=positions, routed=dict(warmup=0), **kw)
    tokens = torch.randint(0, 53, (2, 24)) if tokens is None else tokens
    return _route_about_half(TransformerLM(cfg), tokens)


def _cram(*inputs: torch.Tensor | None, **kw) -> CRAMModel:
    """A CRAMModel routing half of `inputs` (default: random tokens of a vocabulary of 29)."""
    kw.setdefault("routed", dict(warmup=0))
    model = CRAMModel(CRAMConfig(d_model=E, n_layers=2, num_heads=H, **kw))
    if not inputs:
        inputs = (torch.randint(0, 29, (2, 24)) if model.cfg.vocab_size else torch.randn(2, 24, model.cfg.input_dim),)
    return _route_about_half(model, *inputs)


@pytest.mark.parametrize("attention", ["routed", "sdpa"])
@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("prefill", [1, 7])
def test_transformer_decode_equals_full_forward(attention, positions, prefill):
    B, T = 2, 19
    tokens = torch.randint(0, 53, (B, T))
    model = _transformer(attention, positions, tokens)
    full = _full(model, tokens)
    _assert_drops_some(full[1])
    cache = model.allocate_cache(B)
    assert isinstance(cache, ModelCache) and cache.max_len == 24
    _assert_same(_decode(model, cache, _pieces(T, prefill), lambda s, c: model(tokens[:, s], cache=c)), full)
    assert cache.position == T and all(layer.attn.position == T for layer in cache.layers)


@pytest.mark.parametrize("inputs", ["tokens", "continuous"])
@pytest.mark.parametrize("prefill", [1, 5])
def test_cram_model_decode_equals_full_forward(inputs, prefill):
    B, T = 2, 15
    routed = dict(warmup=0, memory=True)
    if inputs == "tokens":
        x, dt = torch.randint(0, 29, (B, T)), None
        model = _cram(x, vocab_size=29, routed=routed)
    else:
        x, dt = torch.randn(B, T, 5), torch.rand(B, T)
        model = _cram(x, dt, input_dim=5, output_dim=3, routed=routed)
    full = _full(model, x, dt)
    _assert_drops_some(full[1])
    cache = model.allocate_cache(B, T)

    def call(s, c):
        return model(x[:, s], None if dt is None else dt[:, s], cache=c)

    _assert_same(_decode(model, cache, _pieces(T, prefill), call), full)
    # Chunks of 3 after the prompt: any chunk length continues the same way.
    _assert_same(_decode(model, model.allocate_cache(B, T), _pieces(T, prefill, chunk=3), call), full)


@pytest.mark.parametrize("make", [lambda: _transformer("routed", "rope"), lambda: _cram(vocab_size=29)],
                         ids=["transformer", "cram"])
def test_chunked_prefill_equals_one_prefill(make):
    model = make()
    B, T, split = 2, 11, 4
    tokens = torch.randint(0, 29, (B, T))
    one, two = model.allocate_cache(B, 16), model.allocate_cache(B, 16)
    with torch.no_grad():
        ref, _ = model(tokens, cache=one)
        ref_masks = [layer.last_mask for layer in _routed_layers(model)]
    decoded = _decode(model, two, [slice(0, split), slice(split, T)], lambda s, c: model(tokens[:, s], cache=c))
    _assert_same(decoded, (ref, ref_masks))
    assert one.position == two.position == T
    for a, b in zip(one.layers, two.layers):
        assert_close_rel(b.attn.k, a.attn.k, TOL)
        assert_close_rel(b.attn.v, a.attn.v, TOL)
        if a.memory is not None:
            assert_close_rel(b.memory.state, a.memory.state, TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["transformer", "cram"])
def test_model_decode_on_device(device, kind):
    """Everything routed (the layers' warm-up): decoding on any device, within its precision."""
    d, heads = (E, H) if device == "cpu" else (128, 2)
    if kind == "transformer":
        model = TransformerLM(TransformerConfig(vocab_size=31, d_model=d, n_layers=2, num_heads=heads, max_len=16,
                                                positions="rope"))
    else:
        model = CRAMModel(CRAMConfig(d_model=d, n_layers=2, num_heads=heads, vocab_size=31))
    model = model.to(device).eval()
    tokens = torch.randint(0, 31, (2, 10), device=device)
    full = _full(model, tokens)
    cache = model.allocate_cache(2, 16)
    _assert_same(_decode(model, cache, _pieces(10, 4), lambda s, c: model(tokens[:, s], cache=c)), full,
                 TOL if device == "cpu" else 2e-2)


def test_reset_starts_a_new_sequence_in_the_same_buffers():
    tokens = torch.randint(0, 29, (2, 9))
    model = _cram(tokens, vocab_size=29, routed=dict(warmup=0, memory=True))
    cache = model.allocate_cache(2, 9)
    buffers = [t.data_ptr() for c in cache.layers for t in (c.attn.k, c.attn.v, c.memory.state, c.attn.memory.state)]
    with torch.no_grad():
        model(torch.randint(0, 29, (2, 7)), cache=cache)
    cache.reset()
    assert cache.position == 0 and all(c.attn.position == 0 and not c.memory.state.any() for c in cache.layers)
    _assert_same(_decode(model, cache, _pieces(9, 4), lambda s, c: model(tokens[:, s], cache=c)), _full(model, tokens))
    assert buffers == [t.data_ptr() for c in cache.layers
                       for t in (c.attn.k, c.attn.v, c.memory.state, c.attn.memory.state)]


def test_decode_under_autocast():
    """Under autocast the cache takes the autocast dtype by default (the keys' dtype)."""
    model = TransformerLM(TransformerConfig(vocab_size=31, d_model=E, n_layers=2, num_heads=H, max_len=16,
                                            positions="rope", routed=dict(memory=True))).eval()
    tokens = torch.randint(0, 31, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = _full(model, tokens)
        cache = model.allocate_cache(2)
        assert cache.layers[0].attn.k.dtype == torch.bfloat16
        assert cache.layers[0].attn.memory.state.dtype == torch.float32
        decoded = _decode(model, cache, _pieces(10, 3), lambda s, c: model(tokens[:, s], cache=c))
        assert model.generate(tokens[:, :3], 5).tokens.shape == (2, 8)
    _assert_same(decoded, full, 2e-2)


# ----------------------------------------------------------------------- errors


def test_cache_overflow_raises_naming_max_len_and_leaves_the_cache_as_it_was():
    model = _cram(vocab_size=29, routed=dict(warmup=0, memory=True))
    cache = model.allocate_cache(2, 8)
    tokens = torch.randint(0, 29, (2, 9))
    with torch.no_grad():
        model(tokens[:, :6], cache=cache)
        states = [(c.attn.k.clone(), c.memory.state.clone(), c.attn.memory.state.clone()) for c in cache.layers]
        with pytest.raises(ValueError, match=r"max_len=8"):
            model(tokens[:, 6:9], cache=cache)
        assert cache.position == 6
        for c, (k, state, attn_state) in zip(cache.layers, states):
            assert c.attn.position == 6 and c.memory.position == 6
            assert torch.equal(c.attn.k, k) and torch.equal(c.memory.state, state)
            assert torch.equal(c.attn.memory.state, attn_state)
        model(tokens[:, 6:8], cache=cache)  # what fits still goes in
        for module, layer_cache in ((model.blocks[0], cache.layers[0]), (model.blocks[0].attn, cache.layers[0].attn)):
            with pytest.raises(ValueError, match=r"max_len=8"):
                module(torch.randn(2, 1, E), cache=layer_cache)
    lm = _transformer()
    with pytest.raises(ValueError, match=r"max_len=24"):
        lm.allocate_cache(1, 25)
    with pytest.raises(ValueError, match=r"max_len=24"), torch.no_grad():
        lm(torch.zeros(1, 25, dtype=torch.long), cache=lm.allocate_cache(1))


def test_decoding_refuses_what_it_cannot_do():
    x = torch.randn(2, 3, E)
    layer = RoutedAttention(E, H)
    with pytest.raises(RuntimeError, match="eval"):
        layer(x, cache=layer.allocate_cache(2, 8))
    topk = RoutedAttention(E, H, routing="topk").eval()
    with pytest.raises(NotImplementedError, match="topk"):
        topk(x, cache=topk.allocate_cache(2, 8))
    layer.eval()
    with pytest.raises(ValueError, match="memory"):
        layer(x, cache=RoutedAttention(E, H, memory=True).allocate_cache(2, 8))
    with pytest.raises(TypeError, match="dtype=torch.float32"):
        layer(x, cache=layer.allocate_cache(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="B=3"):
        layer(x, cache=layer.allocate_cache(3, 8))
    model = _transformer()
    with pytest.raises(ValueError, match="batch size 3"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=model.allocate_cache(3))


# --------------------------------------------------------------------- generate


def _naive_greedy(model, prompt, n):
    """Generation by full forwards over the whole sequence each step; the routing of the position
    that gave each token."""
    tokens, decisions = prompt, []
    with torch.no_grad():
        for _ in range(n):
            logits = model(tokens)
            decisions.append(torch.stack([layer.last_mask[:, -1] for layer in _routed_layers(model)]))
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens, torch.stack(decisions, dim=-1)


@pytest.mark.parametrize("make", [lambda: _transformer("routed", "rope"), lambda: _transformer("routed", "learned"),
                                  lambda: _cram(vocab_size=29, routed=dict(warmup=0, memory=True))],
                         ids=["transformer-rope", "transformer-learned", "cram"])
def test_greedy_generate_equals_full_forwards(make):
    model = make()
    prompt = torch.randint(0, 29, (3, 5))
    model.train()
    out = cram_ext.generate(model, prompt, 12)
    assert model.training, "generate restores the training mode"
    ref, decisions = _naive_greedy(model.eval(), prompt, 12)
    assert torch.equal(out.tokens, ref)
    assert torch.equal(out.routed, decisions)
    assert out.utilization == pytest.approx([float(d.float().mean()) for d in decisions])
    assert not out.routed.all(), "some generated tokens should skip attention"
    with torch.no_grad():
        model(prompt)
    assert out.prompt_utilization == pytest.approx([float(layer.last_mask.float().mean())
                                                    for layer in _routed_layers(model)])
    assert torch.equal(model.generate(prompt, 12).tokens, out.tokens)


def test_generate_stops_at_eos():
    model = _transformer()
    prompt = torch.randint(0, 53, (2, 4))
    free = model.generate(prompt, 10).tokens[:, 4:]
    eos = int(free[0, 2])  # row 0 ends at its third token at the latest
    out = model.generate(prompt, 10, eos_token_id=eos)
    for b in range(2):
        row = free[b].tolist()
        end = row.index(eos) + 1 if eos in row else 10
        assert out.tokens[b, 4:4 + end].tolist() == row[:end]
        assert (out.tokens[b, 4 + end:] == eos).all()
        assert not out.routed[:, b, end:].any()
    ends = [free[b].tolist().index(eos) + 1 if eos in free[b].tolist() else 10 for b in range(2)]
    assert out.tokens.shape[1] == 4 + max(ends)
    counted = sum(ends)
    assert out.utilization == pytest.approx([float(r.sum()) / counted for r in out.routed])


def test_sampling():
    model = _transformer()
    prompt = torch.randint(0, 53, (4, 3))
    greedy = model.generate(prompt, 6).tokens
    assert torch.equal(model.generate(prompt, 6, temperature=1.0, top_k=1).tokens, greedy)
    a = model.generate(prompt, 6, temperature=2.0, generator=torch.Generator().manual_seed(1)).tokens
    b = model.generate(prompt, 6, temperature=2.0, generator=torch.Generator().manual_seed(1)).tokens
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    sampled = model.generate(prompt, 6, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(2)).tokens
    with torch.no_grad():
        logits = model(sampled)[:, 2:-1]
    assert (logits.topk(3, dim=-1).indices == sampled[:, 3:, None]).any(-1).all()


def test_generate_dense_and_bad_arguments():
    model = _transformer("sdpa")
    out = model.generate(torch.randint(0, 53, (2, 3)), 4)
    assert out.tokens.shape == (2, 7) and out.routed.shape == (0, 2, 4) and out.utilization == []
    with pytest.raises(ValueError, match="vocab_size"):
        cram_ext.generate(_cram(input_dim=4), torch.zeros(1, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_len=24"):
        model.generate(torch.zeros(1, 20, dtype=torch.long), 6)


def test_sample_continues_a_prompt_of_a_trained_lm_run(tmp_path, capsys):
    """python -m cram_ext.sample: the bytes of a --task lm run's model after the prompt, and
    the utilization per layer; a run of another task is refused."""
    from cram_ext import sample, train

    train.main(["--task", "lm", "--model", "transformer", "--device", "cpu", "--no-progress", "--steps", "4",
                "--eval-every", "4", "--seq-len", "32", "--d-model", "32", "--heads", "2", "--layers", "2",
                "--batch-size", "4", "--eval-examples", "4", "--router-warmup", "2", "--out", str(tmp_path / "lm")])
    capsys.readouterr()
    assert sample.main([str(tmp_path / "lm"), "--prompt", "def f", "--max-new-tokens", "12"]) == 0
    text, utilization = capsys.readouterr().out.rsplit("\n", 2)[:2]
    assert text.startswith("def f") and len(text.encode()) >= 5
    assert utilization.startswith("attention utilization") and utilization.count("%") == 2
    train.main(["--steps", "2", "--eval-every", "2", "--no-progress", "--eval-examples", "8", "--batch-size", "4",
                "--out", str(tmp_path / "srcd")])
    with pytest.raises(SystemExit):
        sample.main([str(tmp_path / "srcd")])


def test_float64_model_decodes_under_autocast():
    """Autocast casts no float64 tensor: a float64 model's keys stay float64 under it, and so must
    the cache's default dtype (it was the autocast dtype, and the first step raised TypeError)."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=29, d_model=E, n_layers=1, num_heads=H, max_len=16, routed=dict(warmup=0))
    model = TransformerLM(cfg).double().eval()
    tokens = torch.randint(0, 29, (2, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.allocate_cache(2, 8)
        assert cache.layers[0].attn.k.dtype == torch.float64
        logits, _ = model(tokens, cache=cache)
        torch.testing.assert_close(logits, model(tokens))


def test_rope_odd_head_dim_error_names_the_head_dim():
    with pytest.raises(ValueError, match="even head dim, got 15"):
        RoutedAttention(64, 4, head_dim=15, rope_base=10000.0)


# ---------------------------------------------------------------------- rollout


def _naive_rollout(model, context, dt, steps, next_input, gap):
    """Full forwards over the context and the inputs fed back so far."""
    x, t, preds, decisions = context, dt, [], []
    with torch.no_grad():
        for i in range(steps):
            out = model(x, t)
            preds.append(out[:, -1])
            decisions.append(torch.stack([layer.last_mask[:, -1] for layer in _routed_layers(model)]))
            x = torch.cat([x, next_input(out[:, -1], i)[:, None]], dim=1)
            t = None if t is None else torch.cat([t, torch.full_like(t[:, :1], gap)], dim=1)
    return torch.stack(preds, dim=1), torch.stack(decisions, dim=-1)


@pytest.mark.parametrize("with_dt", [False, True], ids=["no-dt", "dt"])
def test_rollout_equals_full_forwards(with_dt):
    context, dt = torch.randn(3, 6, 5), (torch.rand(3, 6) + 0.1 if with_dt else None)
    model = _cram(context, dt, input_dim=5, output_dim=5, routed=dict(warmup=0, memory=True))
    model.train()
    out = cram_ext.rollout(model, context, 9, dt=dt, next_dt=0.3 if with_dt else None)
    assert model.training, "rollout restores the training mode"
    ref, decisions = _naive_rollout(model.eval(), context, dt, 9, lambda y, i: y, 0.3)
    assert_close_rel(out.predictions, ref, TOL)
    assert torch.equal(out.routed, decisions)
    assert out.routed.any() and not out.routed.all(), "the router should route some steps and drop others"
    assert torch.equal(out.inputs, out.predictions[:, :-1])
    assert out.utilization == pytest.approx([float(d.float().mean()) for d in decisions])


def test_srcd_rollout_feeds_back_predicted_observations():
    """An SRCD model predicts [next observation | value logits]: the rollout feeds the predicted
    observation back as an observe step."""
    from cram_ext.data import srcd, srcd_input_dim, srcd_observation_input

    batch = srcd(2, seq_len=16, num_keys=8, num_values=4, num_stores=2, num_queries=1, num_recurring_pairs=2)
    obs_dim = batch.obs_dim
    model = _cram(batch.inputs, batch.dt, input_dim=srcd_input_dim(obs_dim, 8, 4), output_dim=obs_dim + 4)

    def next_input(y, i):
        return srcd_observation_input(y[:, :obs_dim], 8, 4, next_dt=0.1)

    out = model.rollout(batch.inputs, 5, dt=batch.dt, next_input=next_input, next_dt=0.1)
    ref, decisions = _naive_rollout(model, batch.inputs, batch.dt, 5, next_input, 0.1)
    assert_close_rel(out.predictions, ref, TOL)
    assert torch.equal(out.routed, decisions)
    x = out.inputs[0, 0]
    assert torch.equal(x[:obs_dim], out.predictions[0, 0, :obs_dim]) and x[obs_dim] == 1 and x[obs_dim + 1:-1].sum() == 0
    assert x[-1] == pytest.approx(math.log(0.1))
    with pytest.raises(ValueError, match="next_input"):
        model.rollout(batch.inputs, 2, dt=batch.dt)
    with pytest.raises(ValueError, match="input_dim"):
        cram_ext.rollout(_transformer(), torch.zeros(1, 2, 5), 2)
