"""Rows of different lengths in one batch (attention_mask, True at real tokens): every row gets what
it gets alone, in a full forward, in training's statistics, losses and gradients, and through a
padded prompt then one-token decoding steps (issue 15's per-row lengths, issue 16's padding mask);
a decoding step of a whole model captured in a CUDA graph replays as the eager steps do.

Pads hold random values (never zeros): a pad that leaked into a real token's output would show.
The routers drop about half of the tokens (test_decode's _route_about_half), so a row decoded
with another row's length or positions would route differently too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from conftest import assert_close_rel
from test_decode import E, H, TOL, _cram, _route_about_half, _routed_layers, _transformer

from cram_ext import CRAMConfig, CRAMModel, MetaplasticMemory, RoutedAttention, WorkingMemory
from cram_ext.models.transformer import CausalSelfAttention

LENGTHS = (7, 3, 5, 1)  # a full row, a row of one token, and two in between
T0 = 7


def _mask(lengths: tuple[int, ...], T: int, side: str) -> torch.Tensor:
    t, n = torch.arange(T), torch.tensor(lengths)[:, None]
    return t >= T - n if side == "left" else t < n


def _attention_layers() -> dict:
    return {
        "routed": lambda x: _route_about_half(RoutedAttention(E, H, warmup=0), x),
        "routed-memory-gqa-rope": lambda x: _route_about_half(
            RoutedAttention(E, H, 2, warmup=0, memory=True, rope_base=10000.0), x),
        "routed-metaplastic": lambda x: _route_about_half(RoutedAttention(E, H, warmup=0, memory="metaplastic"), x),
        "dense-gqa-rope": lambda x: CausalSelfAttention(E, H, 2, rope_base=10000.0).eval(),
    }


MEMORIES = {"working-memory": lambda: WorkingMemory(E, 24), "metaplastic-memory": lambda: MetaplasticMemory(E, H)}


def _drops_some(masks: list[torch.Tensor], real: torch.Tensor) -> None:
    for m in masks:
        assert 0.1 < m[real].float().mean() < 0.9, "the router should drop some of the real tokens"


# ---------------------------------------------------------------------- full forward


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", [*_attention_layers(), *MEMORIES])
def test_padded_rows_equal_each_row_alone(kind, side):
    B = len(LENGTHS)
    mask = _mask(LENGTHS, T0, side)
    x = torch.randn(B, T0, E)
    layer = MEMORIES[kind]() if kind in MEMORIES else _attention_layers()[kind](x)
    routed = _routed_layers(layer)
    with torch.no_grad():
        out = layer(x, attention_mask=mask)
        masks = [r.last_mask.clone() for r in routed]
        stats = [dict(r.last_stats) for r in routed]
    _drops_some(masks, mask)
    for b in range(B):
        real = mask[b].nonzero().flatten()
        with torch.no_grad():
            alone = layer(x[b:b + 1, real])
        assert_close_rel(out[b, real], alone[0], TOL)
        for m, r in zip(masks, routed):
            assert torch.equal(m[b, real], r.last_mask[0]), f"row {b}: routing differs from the row alone"
            assert not m[b, ~mask[b]].any(), "a pad counted as attended"
        if kind != "working-memory":  # the scan's output at a pad is its state's read-out there
            assert not out[b, ~mask[b]].any(), "outputs at pads are zeros"
    for m, s in zip(masks, stats):
        assert float(s["utilization"]) == pytest.approx(float(m[mask].float().mean()))
    # Integer masks (Hugging Face's) mean the same.
    with torch.no_grad():
        torch.testing.assert_close(layer(x, attention_mask=mask.long()), out, rtol=0, atol=0)


@pytest.mark.parametrize("target", ["predict", "loss"])
def test_pads_take_no_part_in_training(target):
    """Two batches that differ only at their pads: the same outputs at real tokens, the same
    statistics and aux losses, and the same gradients, over two training steps (the second reads
    the probe labels of the first, with target="loss")."""
    B = len(LENGTHS)
    mask = _mask(LENGTHS, T0, "left")
    x = torch.randn(B, T0, E)
    other = torch.where(mask[..., None], x, 10 * torch.randn(B, T0, E))
    torch.manual_seed(0)
    base = RoutedAttention(E, H, warmup=0, memory=True, target=target, router_bias_init=0.0, probe=0.3)
    runs = []
    for inp in (x, other):
        layer = copy.deepcopy(base)
        torch.manual_seed(1)
        record = []
        for _ in range(2):
            layer.zero_grad()
            out = layer(inp, attention_mask=mask)
            (out.pow(2).sum(-1)[mask].mean() + layer.aux_loss).backward()
            record.append((out[mask], layer.aux_loss.detach(), {k: v.clone() for k, v in layer.last_stats.items()},
                           {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}))
        runs.append(record)
    for (out_a, aux_a, stats_a, grads_a), (out_b, aux_b, stats_b, grads_b) in zip(*runs):
        torch.testing.assert_close(out_b, out_a)
        torch.testing.assert_close(aux_b, aux_a)
        for k in stats_a:
            torch.testing.assert_close(stats_b[k], stats_a[k])
        assert grads_a.keys() == grads_b.keys() and "router_weight" in grads_a
        for n in grads_a:
            torch.testing.assert_close(grads_b[n], grads_a[n], msg=n)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_padding_gives_every_row_what_it_gets_alone(data):
    """Any batch size, length, head layout and run of real tokens per row (left, right, both, none):
    a padded prompt then two steps give each row the outputs and routing of the row alone."""
    B = data.draw(st.integers(1, 4), "B")
    T = data.draw(st.integers(1, 11), "T")
    H = data.draw(st.sampled_from([1, 2, 4]), "H")
    Hk = data.draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]), "Hk")
    D = data.draw(st.sampled_from([2, 6, 8]), "D")
    memory, rope = data.draw(st.booleans(), "memory"), data.draw(st.booleans(), "rope")
    runs = [sorted(data.draw(st.lists(st.integers(0, T), min_size=2, max_size=2), f"row {b}")) for b in range(B)]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (lo, hi) in enumerate(runs):
        mask[b, lo:hi] = True
    note(f"mask {mask.int().tolist()}")
    torch.manual_seed(data.draw(st.integers(0, 2**16), "seed"))
    layer = RoutedAttention(H * D, H, Hk, warmup=0, memory=memory, rope_base=10000.0 if rope else None,
                            router_bias_init=0.0).eval()
    torch.nn.init.normal_(layer.router_weight)
    x, steps = torch.randn(B, T, H * D), torch.randn(B, 2, H * D)
    cache = layer.allocate_cache(B, T + 2)
    with torch.no_grad():
        out, _ = layer(x, cache=cache, attention_mask=mask)
        prompt_mask = layer.last_mask.clone()
        step_out, step_mask = [], []
        for i in range(2):
            step_out.append(layer(steps[:, i:i + 1], cache=cache)[0])
            step_mask.append(layer.last_mask[:, 0].clone())
        for b in range(B):
            real = mask[b].nonzero().flatten()
            alone = layer(torch.cat([x[b:b + 1, real], steps[b:b + 1]], 1))
            n = len(real)
            torch.testing.assert_close(out[b, real], alone[0, :n], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(torch.cat([s[b] for s in step_out]), alone[0, n:], rtol=1e-4, atol=1e-5)
            assert torch.equal(prompt_mask[b, real], layer.last_mask[0, :n])
            assert torch.equal(torch.stack([m[b] for m in step_mask]), layer.last_mask[0, n:])
            assert not out[b, ~mask[b]].any() and not prompt_mask[b, ~mask[b]].any()
    assert cache.lengths.tolist() == [int(m.sum()) + 2 for m in mask]


# ------------------------------------------------------------ padded prompt, then steps


def _models() -> dict:
    return {
        "transformer-learned": lambda tokens: _transformer("routed", "learned", tokens),
        "transformer-rope": lambda tokens: _transformer("routed", "rope", tokens),
        "transformer-dense-learned": lambda tokens: _transformer("sdpa", "learned", tokens),
        "cram": lambda tokens: _cram(tokens, vocab_size=29, routed=dict(warmup=0, memory=True)),
        "cram-metaplastic": lambda tokens: _cram(tokens, vocab_size=29, memory="metaplastic",
                                                 routed=dict(warmup=0, memory="metaplastic")),
    }


def _padded_prompt(rows: list[torch.Tensor], mask: torch.Tensor, filler: torch.Tensor) -> torch.Tensor:
    """Each row's first lengths[b] elements placed at its real positions, `filler` at the pads."""
    prompt = filler.clone()
    for b, row in enumerate(rows):
        prompt[b, mask[b]] = row[:int(mask[b].sum())]
    return prompt


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", [*_attention_layers(), *_models()])
def test_padded_prompt_then_steps_equal_each_row_alone(kind, side):
    B, N = len(LENGTHS), 4
    mask = _mask(LENGTHS, T0, side)
    if kind in _models():
        rows = [torch.randint(0, 29, (n + N,)) for n in LENGTHS]
        filler = torch.randint(0, 29, (B, T0))
        module = _models()[kind](torch.randint(0, 29, (2, T0 + N)))
    else:
        rows = [torch.randn(n + N, E) for n in LENGTHS]
        filler = torch.randn(B, T0, E)
        module = _attention_layers()[kind](torch.randn(2, T0 + N, E))
    prompt = _padded_prompt(rows, mask, filler)
    routed = _routed_layers(module)
    cache = module.allocate_cache(B, T0 + N)
    with torch.no_grad():
        out, returned = module(prompt, cache=cache, attention_mask=mask)
        assert returned is cache
        prompt_masks = [r.last_mask.clone() for r in routed]
        steps, step_masks = [], []
        for i in range(N):
            step = torch.stack([row[n + i] for row, n in zip(rows, LENGTHS)])[:, None]
            steps.append(module(step, cache=cache)[0])
            step_masks.append([r.last_mask.clone() for r in routed])
    lengths = cache.lengths if hasattr(cache, "lengths") else None
    assert lengths is not None and lengths.tolist() == [n + N for n in LENGTHS]
    for b, (row, n) in enumerate(zip(rows, LENGTHS)):
        real = mask[b].nonzero().flatten()
        with torch.no_grad():
            alone = module(row[None])
        assert_close_rel(out[b, real], alone[0, :n], TOL, what=f"row {b}'s prompt")
        for i in range(N):
            assert_close_rel(steps[i][b], alone[0, n + i:n + i + 1], TOL, what=f"row {b}, step {i}")
        for layer, r in enumerate(routed):
            ref = r.last_mask[0]
            assert torch.equal(prompt_masks[layer][b, real], ref[:n]), f"row {b}, layer {layer}: prompt routing"
            assert torch.equal(torch.stack([m[layer][b, 0] for m in step_masks]), ref[n:]), \
                f"row {b}, layer {layer}: step routing"
    for layer in range(len(routed)):
        decided = torch.cat([prompt_masks[layer][mask], torch.cat([m[layer] for m in step_masks], 1).flatten()])
        assert decided.any() and not decided.all(), "the router should route some tokens and drop others"


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["transformer-learned", "transformer-rope", "cram", "cram-metaplastic"])
def test_generate_from_padded_prompts_equals_each_row_alone(kind, side):
    lengths = (5, 2, 4)
    mask = _mask(lengths, 5, side)
    model = _models()[kind](torch.randint(0, 29, (2, 12)))
    prompt = torch.randint(0, 29, (3, 5))
    out = model.generate(prompt, 6, attention_mask=mask)
    assert out.tokens.shape == (3, 11) and torch.equal(out.tokens[:, :5], prompt)
    routed_prompt = torch.zeros(len(out.prompt_utilization))
    for b, n in enumerate(lengths):
        alone = model.generate(prompt[b:b + 1, mask[b]], 6)
        assert torch.equal(out.tokens[b, 5:], alone.tokens[0, n:]), f"row {b}"
        assert torch.equal(out.routed[:, b], alone.routed[:, 0]), f"row {b}"
        routed_prompt += torch.tensor(alone.prompt_utilization) * n
    assert out.prompt_utilization == pytest.approx((routed_prompt / sum(lengths)).tolist())


# --------------------------------------------------------------------------- errors


def test_bad_masks_and_what_padding_cannot_do():
    x = torch.randn(2, 5, E)
    layer = RoutedAttention(E, H).eval()
    with pytest.raises(ValueError, match="attention_mask.*contiguous.*rows \\[1\\]"):
        layer(x, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B=2, T=5\)"):
        layer(x, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool or integer"):
        layer(x, attention_mask=torch.ones(2, 5))
    cache = layer.allocate_cache(2, 8)
    mask = _mask((5, 2), 5, "left")
    with torch.no_grad():
        layer(x, cache=cache, attention_mask=mask)
        assert cache.ragged and cache.lengths.tolist() == [5, 2]
        with pytest.raises(NotImplementedError, match="one token per call"):
            layer(x[:, :2], cache=cache)
        with pytest.raises(ValueError, match="empty cache"):
            layer(x[:, :1], cache=cache, attention_mask=torch.ones(2, 1, dtype=torch.bool))
        layer(x[:, :1], cache=cache)
        assert cache.lengths.tolist() == [6, 3] and cache.position == 6
        cache.reset()
        assert not cache.ragged and not cache.lengths.any()
    # A decoding step with gradients is causal attention over the cache so far: rows must agree.
    with pytest.raises(NotImplementedError, match="no_grad"):
        layer(x[:, :5], cache=cache, attention_mask=mask)
        layer(x[:, :1], cache=cache)
    with pytest.raises(ValueError, match="MetaplasticMemory: attention_mask.*contiguous"):
        MetaplasticMemory(E, H)(x, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 1]]))


# ------------------------------------------------------------------------ CUDA graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("attention", ["routed", "sdpa"])
def test_decoding_step_of_a_model_replays_in_a_cuda_graph(attention):
    """A padded prompt, then a TransformerLM's one-token step captured once and replayed: the
    logits of each replay equal the eager step's, and the cache's lengths advance on the device."""
    torch.manual_seed(0)
    from cram_ext import TransformerConfig, TransformerLM

    model = TransformerLM(TransformerConfig(vocab_size=61, d_model=128, n_layers=2, num_heads=2, num_kv_heads=1,
                                            max_len=32, positions="rope", attention=attention,
                                            routed=dict(warmup=0))).cuda()
    B, N = 3, 5
    mask = _mask((6, 2, 4), 6, "left").cuda()
    prompt = torch.randint(0, 61, (B, 6), device="cuda")
    model = _route_about_half(model, torch.randint(0, 61, (2, 12), device="cuda"))
    tokens = torch.randint(0, 61, (B, N), device="cuda")
    with torch.no_grad():
        cache = model.allocate_cache(B, 6 + N + 1)
        model(prompt, cache=cache, attention_mask=mask)
        eager = copy.deepcopy(cache)
        ref = [model(tokens[:, i:i + 1], cache=eager)[0] for i in range(N)]
        static = torch.zeros(B, 1, dtype=torch.long, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture, on throwaway copies of the cache
            for _ in range(2):
                model(static, cache=copy.deepcopy(cache))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits, _ = model(static, cache=cache)
        replayed = []
        for i in range(N):
            static.copy_(tokens[:, i:i + 1])
            graph.replay()
            replayed.append(logits.clone())
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(replayed, ref)):
        torch.testing.assert_close(a, b, msg=f"step {i}")
    assert torch.equal(cache.lengths, eager.lengths) and cache.lengths.tolist() == [6 + N, 2 + N, 4 + N]
