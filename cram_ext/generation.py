"""Autoregressive generation for the language models (TransformerLM, token CRAMModel): one prefill
of the prompt into a pre-allocated cache, then one token per step
(`python -m cram_ext.sample RUN_DIR` does it from the command line); and `rollout`, the same for
models of continuous inputs, each prediction fed back as the next input.

The model is duck-typed: `model.allocate_cache(batch_size, max_len)`, `model(tokens, cache=cache)
-> (logits, cache)` and `model.routed_attention_layers()`, with `model.cfg.vocab_size` set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .nn.padding import as_bool_mask

__all__ = ["GenerateOutput", "RolloutOutput", "generate", "rollout"]


@dataclass
class GenerateOutput:
    """What `generate` returns.

    Attributes:
        tokens: (B, T0 + n) the prompt then the n generated tokens (n <= max_new_tokens: fewer
            when every row reached eos_token_id). A row that has produced eos holds eos after it.
        routed: (L, B, n) bool, one row per RoutedAttention layer (model.routed_attention_layers()):
            whether layer l attended at the position whose logits gave generated token i (the
            prompt's last token for i = 0, generated token i - 1 after); False once the row
            has finished.
        utilization: per RoutedAttention layer, the fraction of the generated tokens routed
            (over routed[l], counting each row up to and including its eos); empty for a
            dense model.
        prompt_utilization: per RoutedAttention layer, the fraction of the prompt's (real) tokens routed.
    """

    tokens: Tensor
    routed: Tensor
    utilization: list[float]
    prompt_utilization: list[float]


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: Tensor | None = None,
) -> GenerateOutput:
    """Continue each row of `input_ids` by up to `max_new_tokens` tokens.

    Args:
        model: a TransformerLM, or a CRAMModel with vocab_size.
        input_ids: (B, T0) int64 prompts, T0 >= 1; padded when `attention_mask` is given.
        max_new_tokens: how many tokens to generate per row, >= 1.
        temperature: 0 picks the most likely token (greedy); > 0 samples from
            softmax(logits / temperature).
        top_k: when sampling, only from the k most likely tokens (None: all).
        eos_token_id: a row stops at this token (and holds it afterwards); generation stops
            when every row has produced it.
        generator: the random generator of the sampling (on the model's device).
        attention_mask: (B, T0) bool or 0/1, True at the prompts' real tokens, for prompts of
            different lengths (each row's real tokens one run: left padding, as Hugging Face
            generates, or right padding). Each row continues from its own last real token, as
            if alone; the generated tokens follow the whole padded row in `tokens`.

    Returns:
        A GenerateOutput: the tokens and the per-layer routing during generation.

    Runs in eval mode (no exploration or probes: the routing of a full forward), under
    torch.no_grad(); the model's training mode is restored afterwards. The cache is allocated
    for T0 + max_new_tokens - 1 tokens, which a TransformerLM's cfg.max_len must allow.
    """
    vocab_size = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab_size is None:
        raise ValueError(f"generate: {type(model).__name__} has no vocab_size: generate needs a model of token inputs")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"generate: input_ids must be (B, T0) integer tokens with T0 >= 1, got "
                         f"{tuple(input_ids.shape)} {input_ids.dtype}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k must be >= 1 or None, got {top_k}")
    B, T0 = input_ids.shape
    layers = model.routed_attention_layers()
    rows = torch.arange(B, device=input_ids.device)
    if attention_mask is None:
        last, real = torch.full((B,), T0 - 1, device=input_ids.device), None
    else:
        real = as_bool_mask("generate", attention_mask)
        if real.shape != input_ids.shape:
            raise ValueError(f"generate: attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(real.shape)}")
        # Each row's last real token, whose logits give its first new token.
        last = torch.where(real, torch.arange(T0, device=real.device), -1).max(1).values.clamp_min(0)
    was_training = model.training
    model.eval()
    try:
        # The last generated token is never fed back: it needs no room in the cache.
        cache = model.allocate_cache(B, T0 + max_new_tokens - 1)
        prefill = {} if real is None else {"attention_mask": real}
        logits, cache = model(input_ids, cache=cache, **prefill)
        logits = logits[rows, last][:, None]
        n_real = input_ids.numel() if real is None else real.sum()
        prompt_utilization = [float(layer.last_mask.sum() / n_real) for layer in layers]
        decisions = [[layer.last_mask[rows, last]] for layer in layers]
        new_tokens: list[Tensor] = []
        active: list[Tensor] = []  # (B,) per generated token: the row had not finished before it
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            token = _next_token(logits[:, -1], temperature, top_k, generator).to(input_ids.dtype)
            active.append(~finished)
            if eos_token_id is not None:
                token = torch.where(finished, eos_token_id, token)
                finished = finished | (token == eos_token_id)
            new_tokens.append(token)
            # One host sync per step, only when rows can finish early.
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            logits, cache = model(token[:, None], cache=cache)
            for layer, rows in zip(layers, decisions):
                rows.append(layer.last_mask[:, -1])
    finally:
        model.train(was_training)
    n = len(new_tokens)
    counted = torch.stack(active, dim=1)
    routed = (torch.stack([torch.stack(rows, dim=1) for rows in decisions]) & counted if layers
              else torch.zeros(0, B, n, dtype=torch.bool, device=input_ids.device))
    utilization = [float(r.sum() / counted.sum()) for r in routed]
    return GenerateOutput(torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1), routed, utilization,
                          prompt_utilization)


def _next_token(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """(B, V) logits -> (B,) tokens: greedy at temperature 0, else sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)



@dataclass
class RolloutOutput:
    """What `rollout` returns.

    Attributes:
        predictions: (B, steps, output_dim): prediction 0 is the model's output at the context's
            last input, prediction i its output at the i-th input fed back.
        inputs: (B, steps - 1, input_dim), the inputs fed back (next_input of predictions 0 ..
            steps - 2).
        routed: (L, B, steps) bool, per RoutedAttention layer: whether the position whose output
            is prediction i attended.
        utilization: per RoutedAttention layer, the fraction of those positions routed.
    """

    predictions: Tensor
    inputs: Tensor
    routed: Tensor
    utilization: list[float]


@torch.no_grad()
def rollout(
    model: nn.Module,
    inputs: Tensor,
    steps: int,
    *,
    dt: Tensor | None = None,
    next_input: Callable[[Tensor, int], Tensor] | None = None,
    next_dt: Tensor | float | None = None,
) -> RolloutOutput:
    """Continue a model of continuous inputs (a CRAMModel with input_dim) by feeding back what it
    predicts, `steps` predictions long: one prefill of the context into a cache, then one input a
    step, as `generate` does for tokens.

    Args:
        model: a CRAMModel with input_dim (duck-typed: allocate_cache, model(x, dt, cache=cache),
            routed_attention_layers()).
        inputs: (B, T0, input_dim) the context, T0 >= 1.
        steps: predictions to make, >= 1.
        dt: (B, T0) the context's time gaps (None: the model's default, no gaps).
        next_input: (prediction (B, output_dim), i) -> the next input (B, input_dim). Default:
            the prediction itself (output_dim == input_dim). For SRCD, whose outputs are the next
            observation and the value logits:
            `lambda y, i: cram_ext.data.srcd_observation_input(y[:, :obs_dim], num_keys, num_values)`.
        next_dt: the time gap before each fed-back input: a float, (B,) or (B, steps - 1). Default:
            the context's last gap (None without dt).

    Returns:
        A RolloutOutput. Runs in eval mode under torch.no_grad(), restoring the training mode; a
        rollout equals full forwards over the context and the inputs fed back so far.
    """
    if getattr(getattr(model, "cfg", None), "input_dim", None) is None:
        raise ValueError(f"rollout: {type(model).__name__} has no input_dim: rollout is for models of continuous "
                         "inputs (generate continues token models)")
    if inputs.dim() != 3 or inputs.shape[1] < 1 or inputs.shape[2] != model.cfg.input_dim:
        raise ValueError(f"rollout: inputs must be (B, T0 >= 1, input_dim={model.cfg.input_dim}), got "
                         f"{tuple(inputs.shape)}")
    if steps < 1:
        raise ValueError(f"rollout: steps must be >= 1, got {steps}")
    if next_input is None:
        if model.cfg.output_dim != model.cfg.input_dim:
            raise ValueError(f"rollout: the model predicts {model.cfg.output_dim} channels and reads "
                             f"{model.cfg.input_dim}: pass next_input to make the next input of a prediction")
        next_input = _prediction_itself
    B, T0 = inputs.shape[:2]
    gaps = _gaps(dt, next_dt, B, steps - 1, inputs)
    layers = model.routed_attention_layers()
    was_training = model.training
    model.eval()
    try:
        cache = model.allocate_cache(B, T0 + steps - 1)
        out, cache = model(inputs, dt, cache=cache)
        predictions, fed = [out[:, -1]], []
        decisions = [[layer.last_mask[:, -1]] for layer in layers]
        for i in range(steps - 1):
            x = next_input(predictions[-1], i).to(inputs.dtype)
            fed.append(x)
            out, cache = model(x[:, None], None if gaps is None else gaps[:, i:i + 1], cache=cache)
            predictions.append(out[:, 0])
            for layer, rows in zip(layers, decisions):
                rows.append(layer.last_mask[:, 0])
    finally:
        model.train(was_training)
    routed = (torch.stack([torch.stack(rows, dim=1) for rows in decisions]) if layers
              else torch.zeros(0, B, steps, dtype=torch.bool, device=inputs.device))
    fed_inputs = torch.stack(fed, dim=1) if fed else inputs.new_zeros(B, 0, inputs.shape[2])
    return RolloutOutput(torch.stack(predictions, dim=1), fed_inputs, routed, [float(r.float().mean()) for r in routed])


def _prediction_itself(prediction: Tensor, i: int) -> Tensor:
    return prediction


def _gaps(dt: Tensor | None, next_dt: Tensor | float | None, B: int, n: int, like: Tensor) -> Tensor | None:
    """(B, n) time gaps of the fed-back inputs, or None when the model gets none."""
    if next_dt is None:
        return None if dt is None else dt[:, -1:].expand(B, n)
    gaps = torch.as_tensor(next_dt, dtype=like.dtype, device=like.device)
    return (gaps.view(-1, 1) if gaps.dim() == 1 else gaps).expand(B, n)
