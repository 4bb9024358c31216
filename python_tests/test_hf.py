"""cram_ext.hf: transformers models (Llama with grouped-query heads, GPT-2) with routed attention.

Tiny models built from configs (random weights, nothing downloaded), on the CPU.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import DEVICES

transformers = pytest.importorskip("transformers")

import cram_ext  # noqa: E402
from cram_ext import hf  # noqa: E402

V, T = 100, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                   vocab_size=V, intermediate_size=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2(**kw):
    cfg = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=V, n_positions=64, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {
    "llama": _llama,
    "gpt2": _gpt2,
    # scaling = D ** -0.5 / (layer + 1): the attention function's `scaling` is honoured
    "gpt2-layer-scaled": lambda: _gpt2(scale_attn_by_inverse_layer_idx=True),
}


def _pair(name, device="cpu", **routed):
    """(the model with sdpa attention, a copy of it with routed attention)."""
    ref = MODELS[name]().to(device)
    ref.set_attn_implementation("sdpa")
    return ref, hf.enable_routed_attention(copy.deepcopy(ref), **routed)


def _routings(model):
    return [m for m in model.modules() if isinstance(m, hf.HFRouting)]


def _is_routing_param(name):
    return f".{hf.ATTR}." in name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODELS))
def test_everything_routed_at_init_equals_sdpa(name, device):
    ref, model = _pair(name, device)
    assert model.config._attn_implementation == hf.ATTN_IMPLEMENTATION
    assert len(_routings(model)) == 2
    ref.eval(), model.eval()
    ids = torch.randint(0, V, (2, T), device=device)
    # On CUDA a float32 model attends in bfloat16 (RoutedAttention does).
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, **tol)
        # An all-ones mask is no mask.
        torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(ids)).logits, ref(ids).logits, **tol)
    assert all(float(m.last_stats["utilization"]) == 1.0 for m in _routings(model))
    # Decoding with a KV cache: new queries against the cached and new keys (bottom-right causal).
    gen = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids[:, :6]))
    out = model.generate(ids[:, :6], **gen)
    if device == "cpu":  # greedy decoding may pick another token where bfloat16 attention rounds differently
        assert torch.equal(out, ref.generate(ids[:, :6], **gen))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_training_step_gives_every_parameter_a_gradient_and_aux_losses_move_no_attention_weight(name, device):
    _, model = _pair(name, device, warmup=0)  # no warm-up: the router learns from the first step
    model.train()
    ids = torch.randint(0, V, (2, T), device=device)
    out = model(ids, labels=ids)
    aux = cram_ext.aux_losses(model)
    assert aux.requires_grad and torch.isfinite(aux)
    assert all(m.aux_loss is not None for m in _routings(model))

    others = [(n, p) for n, p in model.named_parameters() if not _is_routing_param(n)]
    grads = torch.autograd.grad(aux, [p for _, p in others], allow_unused=True, retain_graph=True)
    moved = [n for (n, _), g in zip(others, grads) if g is not None and g.abs().max() > 0]
    assert not moved, f"the aux losses reach {moved}"

    (out.loss + aux).backward()
    names = [n for n, _ in model.named_parameters()]
    assert any(n.endswith("cram.router_weight") for n in names) and any(".cram.semantic." in n for n in names)
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{n} has a non-finite gradient"
    assert all(m.trained_steps == 1 for m in _routings(model))


def _route_about_half(model):
    for m in _routings(model):
        torch.nn.init.normal_(m.router_weight)
        torch.nn.init.constant_(m.router_bias, 0.0)
    return model.eval()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_each_row_alone(name, side):
    """A padded batch (pads hold random tokens) gives each row's real tokens the logits and the
    routing of the row alone; pads count in no statistic."""
    torch.manual_seed(0)
    _, model = _pair(name, warmup=0)
    model = _route_about_half(model)
    lengths = [T, 5, 11]
    ids = torch.randint(1, V, (3, T))
    t = torch.arange(T)
    mask = (t >= T - torch.tensor(lengths)[:, None]) if side == "left" else (t < torch.tensor(lengths)[:, None])
    position_ids = (mask.long().cumsum(1) - 1).clamp_min(0)  # GPT-2's positions are absolute
    with torch.no_grad():
        logits = model(ids, attention_mask=mask.long(), position_ids=position_ids).logits
        masks = [m.last_mask.clone() for m in _routings(model)]
        for m, r in zip(masks, _routings(model)):
            assert float(r.last_stats["utilization"]) == pytest.approx(float(m[mask].float().mean()))
        for b in range(3):
            alone = model(ids[b:b + 1, mask[b]]).logits[0]
            torch.testing.assert_close(logits[b, mask[b]], alone, rtol=1e-4, atol=1e-4)
            for m, r in zip(masks, _routings(model)):
                assert torch.equal(m[b, mask[b]], r.last_mask[0]) and not m[b, ~mask[b]].any()
    decided = torch.cat([m[mask] for m in masks])
    assert decided.any() and not decided.all(), "the routers should route some tokens and drop others"


def test_generate_from_left_padded_prompts_equals_each_row_alone():
    """transformers' generate with a KV cache: a left-padded batch continues each row as the row
    alone does (the padded prompt, then one-token steps over each row's real keys)."""
    torch.manual_seed(0)
    _, model = _pair("llama", warmup=0)
    model = _route_about_half(model)
    lengths = [9, 4, 6]
    ids = torch.randint(1, V, (3, 9))
    mask = (torch.arange(9) >= 9 - torch.tensor(lengths)[:, None]).long()
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **gen)
        for b, n in enumerate(lengths):
            alone = model.generate(ids[b:b + 1, 9 - n:], attention_mask=torch.ones(1, n, dtype=torch.long), **gen)
            assert torch.equal(out[b, 9:], alone[0, n:]), f"row {b}"
        with pytest.raises(NotImplementedError, match="one token per call"):
            past = model(ids, attention_mask=mask, use_cache=True).past_key_values
            model(ids[:, :2], attention_mask=torch.cat([mask, torch.ones(3, 2, dtype=torch.long)], 1),
                  past_key_values=past, use_cache=True)


def test_masks_other_than_padding_raise_not_implemented():
    _, model = _pair("llama")
    ids = torch.randint(0, V, (2, T))
    with pytest.raises(NotImplementedError, match="mask"):  # a prepared 4D mask
        model(ids, attention_mask=torch.ones(2, 1, T, T, dtype=torch.bool))
    mask = torch.ones_like(ids)
    mask[0, 5] = 0  # a hole: not padding
    with pytest.raises(ValueError, match="contiguous"):
        model(ids, attention_mask=mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routed", [dict(warmup=1, threshold=0.99), dict(warmup=0, routing="none")],
                         ids=["learned-after-warmup", "none"])
def test_after_warmup_tokens_skip_attention(routed, device):
    _, model = _pair("llama", device, **routed)
    ids = torch.randint(0, V, (2, T), device=device)
    if routed["warmup"]:
        model.eval()
        with torch.no_grad():
            model(ids)
        assert all(float(m.last_stats["utilization"]) == 1.0 for m in _routings(model)), "warming: all routed"
        model.train()
        (model(ids, labels=ids).loss + cram_ext.aux_losses(model)).backward()
        assert not any(m.warming for m in _routings(model))
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # The router's probability starts at sigmoid(3) = 0.95, under the threshold 0.99.
    assert all(float(m.last_stats["utilization"]) < 1.0 for m in _routings(model))


def test_gradient_checkpointing_counts_a_step_once_and_gives_the_same_gradients():
    _, a = _pair("llama", warmup=1)  # the first step is the warm-up's last: the recomputation must warm too
    b = copy.deepcopy(a)
    b.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # 5.x's default
    ids = torch.randint(0, V, (2, T))
    for model in (a, b):
        model.train()
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (model(ids, labels=ids, use_cache=False).loss + cram_ext.aux_losses(model)).backward()
        assert all(m.trained_steps == 1 for m in _routings(model))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_save_pretrained_keeps_the_routing_state(tmp_path):
    _, model = _pair("llama", warmup=0, target="loss", probe=0.5)
    model.train()
    ids = torch.randint(0, V, (2, T))
    for _ in range(2):  # the second step reads the first step's probe labels
        (model(ids, labels=ids).loss + cram_ext.aux_losses(model)).backward()
    model.save_pretrained(tmp_path)  # safetensors: the extra state must be a tensor
    safetensors = pytest.importorskip("safetensors.torch")
    loaded = hf.enable_routed_attention(_llama(), warmup=0, target="loss", probe=0.5)
    loaded.load_state_dict(safetensors.load_file(tmp_path / "model.safetensors"))
    from conftest import assert_same_state

    assert_same_state(loaded.state_dict(), model.state_dict())
    assert all(m.trained_steps == 2 and m._probe_labels is not None for m in _routings(loaded))


def test_misuse_gets_clear_errors():
    _, model = _pair("llama")
    with pytest.raises(ValueError, match="already enabled"):
        hf.enable_routed_attention(model)
    with pytest.raises(ValueError, match="rope_base"):
        hf.enable_routed_attention(_llama(), rope_base=10000.0)
    untouched = _llama()
    with pytest.raises(ValueError, match="routing"):
        hf.enable_routed_attention(untouched, routing="bogus")
    assert not any(hasattr(m, hf.ATTR) for m in untouched.modules())
    assert untouched.config._attn_implementation != hf.ATTN_IMPLEMENTATION
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.enable_routed_attention(torch.nn.Linear(2, 2))
    plain = _llama()
    hf.register()
    plain.set_attn_implementation(hf.ATTN_IMPLEMENTATION)  # by hand, without the routing modules
    with pytest.raises(RuntimeError, match="enable_routed_attention"):
        plain(torch.randint(0, V, (1, T)))
    _, gpt2 = _pair("gpt2")
    gpt2.config.attn_pdrop = 0.1
    for m in gpt2.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    with pytest.warns(UserWarning, match="dropout"):
        gpt2.train()(torch.randint(0, V, (1, T)))


def test_import_cram_ext_does_not_import_transformers():
    code = "import sys, cram_ext; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("routed", [dict(memory=True), dict(routing="topk", budget=0.5)], ids=["memory", "topk"])
def test_decoding_from_a_kv_cache_refuses_what_cannot_continue_and_use_cache_false_works(routed):
    """memory=True: the transformers cache holds no scan state, so a cached step would restart the
    scan from zeros (routing and semantic output silently unlike the full forward's); top-k looks
    at whole rows. Both raise on a cached step; without the cache, decoding is the full forward's."""
    torch.manual_seed(0)
    _, model = _pair("llama", warmup=0, **routed)
    for m in _routings(model):  # about half the tokens routed, so the scan state matters
        torch.nn.init.normal_(m.router_weight)
        torch.nn.init.constant_(m.router_bias, 0.0)
        if m.memory is not None:
            torch.nn.init.normal_(m.memory.out.weight)
    model.eval()
    ids = torch.randint(1, V, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        past = model(ids[:, :11], use_cache=True).past_key_values
        with pytest.raises(NotImplementedError, match="use_cache=False"):
            model(ids[:, 11:], past_key_values=past, use_cache=True)
        assert all(m._input is None for m in _routings(model))
        gen = dict(max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids))
        with pytest.raises(NotImplementedError, match="use_cache=False"):
            model.generate(ids, **gen)
        out = model.generate(ids, use_cache=False, **gen)
        torch.testing.assert_close(model(ids[:, :12]).logits, full)
    assert out.shape == (2, 15)
    assert torch.equal(out[:, 12], full[:, -1].argmax(-1))


def test_a_forward_that_raises_leaves_no_captured_input():
    """A forward that fails between the pre-hook and the attention function must not keep its
    hidden states (and their graph) in the routing module."""
    _, model = _pair("llama")
    attn = hf.self_attention_modules(model)[1]

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    attn.q_proj.forward = broken
    ids = torch.randint(0, V, (2, T))
    with pytest.raises(RuntimeError, match="boom"):
        model(ids)
    assert all(m._input is None for m in _routings(model))
    del attn.q_proj.forward
    model(ids)  # and the model still runs
    assert all(m._input is None for m in _routings(model))
