"""Hugging Face transformers adapter: run a transformers model's self-attention as CRAM
routed attention (docs/design.md §1, steps 2-5).

    model = transformers.LlamaForCausalLM(config)          # or GPT-2, Mistral, Qwen2, ...
    cram_ext.hf.enable_routed_attention(model, warmup=100)  # any RoutedAttention argument
    loss = model(ids, labels=ids).loss + cram_ext.aux_losses(model)

The model keeps its own projections, positions (RoPE included) and KV cache; only the
attention function changes. `enable_routed_attention` registers the attention function
"cram_routed" with transformers' AttentionInterface (and a mask function of the same name
with its AttentionMaskInterface), attaches to every self-attention module a submodule
`cram` (a `HFRouting`, a RoutedAttention without q/k/v/out projections) that holds the
router, the semantic-memory MLP, the routing state (warm-up count, last_stats, aux_loss),
and sets the model's attention implementation to "cram_routed". A forward pre-hook on each
attention module hands the module's input (the hidden states, already normalised by the
block) to the router and the semantic MLP, which read it layer-normalised and detached,
exactly as RoutedAttention does; a forward hook drops it again if the forward raised before the
attention function took it.

Masks: causal, with or without a KV cache (bottom-right aligned, as after a DynamicCache;
with memory=True or routing="topk" without one: use_cache=False, since the cache holds no scan
state and top-k is not causal), and padding: a 2D attention_mask whose real tokens form one run
per row (left padding, as `generate` pads a batch, or right padding) on a forward without a
cache, on the prompt, and on the one-token steps after it; each row is computed as if alone
(RoutedAttention's attention_mask). A 4D mask, packed sequences, a sliding window shorter than
the keys, a static cache, a chunk of several tokens after a padded prompt, or any other mask
that hides more than the future and the pads raise NotImplementedError. Attention dropout is
not applied (a warning says so when it is asked for).

Checkpoints: `save_pretrained` saves each `cram` submodule (its extra state serialised into a
uint8 tensor, as safetensors needs); `from_pretrained` drops those keys as unexpected, so a
checkpoint is loaded by enabling routed attention on the loaded model and then
`model.load_state_dict(safetensors.torch.load_file(path))`.

This module imports transformers; `import cram_ext` does not.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

try:
    from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
    from transformers.masking_utils import causal_mask_function
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "cram_ext.hf needs Hugging Face transformers (>= 4.57): pip install transformers"
    ) from e

from .nn.padding import Padding
from .nn.routed_attention import RoutedAttention

__all__ = ["ATTN_IMPLEMENTATION", "HFRouting", "enable_routed_attention", "register", "routed_attention_forward",
           "self_attention_modules"]

ATTN_IMPLEMENTATION = "cram_routed"
ATTR = "cram"  # the submodule's name on each attention module


class HFRouting(RoutedAttention):
    """What a RoutedAttention owns besides its q/k/v/out projections: the router, the
    semantic-memory MLP (and, with memory=True, its working memory), the warm-up count and
    the last forward's stats and aux loss. It is a RoutedAttention, so `cram_ext.aux_losses`
    collects it. The transformers attention module it is attached to owns the projections;
    the attention function calls `attend`.

    Args: hidden_size (the attention module's input width), num_heads, num_kv_heads,
    head_dim (the model's, which may differ from hidden_size // num_heads), and any
    RoutedAttention keyword argument but rope_base (the model applies its own positions).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, **routed_kwargs) -> None:
        if "rope_base" in routed_kwargs:
            raise ValueError("rope_base: the transformers model applies its own positions to q and k")
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, projections=False, **routed_kwargs)
        self.hidden_size = hidden_size
        self._input: Tensor | None = None  # set by the pre-hook, taken by the attention function

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, routing={self.routing!r}, warmup={self.warmup}")

    def forward(self, *args, **kwargs):
        raise RuntimeError("HFRouting is called through the attention function 'cram_routed' "
                           "(cram_ext.hf.enable_routed_attention), not directly")

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None,
               padding: Tensor | None = None) -> Tensor:
        """RoutedAttention.mix, with a warning when a training forward cannot train the router.
        Raises NotImplementedError when the keys include cached ones (k longer than q) and the
        routing cannot continue from a cache: memory=True (the transformers cache holds no scan
        state, so the scan would restart from zeros at every step) or routing="topk" (not causal).
        `padding` (B, S) bool, True at the real keys (the model's 2D attention_mask): the rows
        are rotated so that their real tokens come first, as RoutedAttention does with its
        attention_mask; a one-token step then attends over each row's real keys only."""
        if k.shape[1] != q.shape[1] and (self.memory is not None or self.routing == "topk"):
            what = "memory=True" if self.memory is not None else "routing='topk'"
            raise NotImplementedError(
                f"{ATTN_IMPLEMENTATION!r} with {what} cannot decode from a KV cache ({k.shape[1] - q.shape[1]} cached "
                "tokens): the transformers cache holds no working-memory state (and top-k routing looks at whole "
                "rows), so the routing would differ from the full forward's. Pass use_cache=False")
        if self.training and not torch.is_grad_enabled():
            warnings.warn("a training forward without gradients (torch.no_grad, or reentrant activation "
                          "checkpointing: use gradient_checkpointing_kwargs={'use_reentrant': False}): "
                          "its aux losses cannot train the router and the semantic memory", stacklevel=3)
        if padding is None:
            return self.mix(x, q, k, v, softmax_scale)
        B, T, S = q.shape[0], q.shape[1], k.shape[1]
        keys = Padding.from_mask(ATTN_IMPLEMENTATION, padding, B, S, k.device)
        # A copy of the keys and values per call, as the transformers cache's own concatenation makes.
        k, v = keys.shift(k), keys.shift(v)
        if T == S:  # no cache: the queries are the keys' tokens
            mixed = self.mix(keys.shift(x), keys.shift(q), k, v, softmax_scale, valid=keys.valid)
            self._unshift_records(keys)
            return keys.unshift(mixed)
        if T > 1 or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
            raise NotImplementedError(f"{ATTN_IMPLEMENTATION!r}: after a padded prompt, decode one token per call "
                                      "under torch.no_grad() (rows of different lengths)")
        return self.mix(x, q, k, v, softmax_scale, seqlens=keys.lengths.to(torch.int32))


def routed_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The attention function "cram_routed", as transformers calls it: query (B, H, T, D),
    key and value (B, Hk, S, D) with positions applied (and the cache's keys first);
    returns the attention output (B, T, H, D) and no attention weights."""
    routing = getattr(module, ATTR, None)
    if not isinstance(routing, HFRouting):
        raise RuntimeError(f"{type(module).__name__} has no routing state: attn_implementation="
                           f"{ATTN_IMPLEMENTATION!r} is set by cram_ext.hf.enable_routed_attention(model)")
    x, routing._input = routing._input, None
    B, H, T, D = query.shape
    if x is None or x.shape[:2] != (B, T):
        raise RuntimeError(f"{type(module).__name__}: the hidden states of this call were not captured "
                           f"(got {None if x is None else tuple(x.shape)} for a query of {T} tokens); the "
                           "attention module must be called with the hidden states as its first argument")
    if attention_mask is not None and not (attention_mask.dim() == 2 and attention_mask.dtype == torch.bool
                                           and attention_mask.shape == (B, key.shape[2])):
        raise NotImplementedError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} takes causal attention with a 2D padding mask only "
            f"(got a {attention_mask.dim()}D {attention_mask.dtype} mask of shape {tuple(attention_mask.shape)})")
    if kwargs.get("is_causal") is False and T > 1:  # one query against its past is causal anyway
        raise NotImplementedError(f"attn_implementation={ATTN_IMPLEMENTATION!r} is causal only (is_causal=False given)")
    for name in ("softcap", "s_aux", "position_bias"):  # logit soft-capping, attention sinks, relative bias
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attn_implementation={ATTN_IMPLEMENTATION!r} computes plain softmax "
                                      f"attention: this model's {name}= is not supported")
    if dropout and module.training:
        warnings.warn(f"attn_implementation={ATTN_IMPLEMENTATION!r} does not apply attention dropout "
                      f"(dropout={dropout} ignored)", stacklevel=2)
    mixed = routing.attend(x, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scaling,
                           attention_mask)
    return mixed.view(B, T, H, D), None


def _causal_mask(batch_size: int, *args, mask_function=None, attention_mask: Tensor | None = None,
                 kv_length: int | None = None, **kwargs) -> Tensor | None:
    """The mask function "cram_routed": checks that the mask the model asks for is causal
    attention over every cached and new token, and returns None (no mask), or with padding
    the (B, kv_length) bool mask of the real keys, which the attention function passes to
    HFRouting.attend. Raises NotImplementedError for a mask function that masks more than
    causality (a sliding window shorter than the keys, packed sequences, a custom mask), and
    for caches whose keys are not exactly the past and the new tokens (a static cache)."""
    what = f"attn_implementation={ATTN_IMPLEMENTATION!r}"
    padding = None
    if attention_mask is not None and not bool(attention_mask.all()):
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_length:
            raise NotImplementedError(f"{what}: a padding mask must be 2D with one entry per key ({kv_length}), "
                                      f"got shape {tuple(attention_mask.shape)}")
        padding = attention_mask.bool()
    if "q_length" in kwargs:  # transformers >= 5: queries at q_offset ..., keys at kv_offset ...
        q_length, q_offset, kv_offset = kwargs["q_length"], kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)
    else:  # transformers 4.x: the queries' positions in cache_position
        cache_position = kwargs["cache_position"]
        q_length, q_offset, kv_offset = cache_position.shape[0], cache_position[0], kwargs.get("kv_offset", 0)
    if kv_offset != 0 or q_offset + q_length != kv_length:
        raise NotImplementedError(f"{what} needs the keys to be exactly the past and the new tokens "
                                  f"(got {q_length} queries from position {int(q_offset)} against {kv_length} keys "
                                  f"from {int(kv_offset)}): use a DynamicCache, not a static or sliding one")
    if mask_function is not causal_mask_function and not _masks_like_causal(
            mask_function, batch_size, kv_length - q_length, q_length, kv_length, kwargs.get("device", "cpu")):
        raise NotImplementedError(f"{what} computes causal attention only: this model's mask also masks other keys "
                                  "(a sliding window shorter than the sequence, packed sequences, or a custom mask)")
    return padding


def _masks_like_causal(mask_function, batch_size: int, q_offset: int, q_length: int, kv_length: int,
                       device, chunk: int = 256) -> bool:
    """Whether transformers' mask_function(batch, head, q, kv) keeps exactly the keys kv <= q
    here. Evaluated on index tensors (as transformers does without vmap), `chunk` queries at a
    time. transformers 4.x asks for it with packed-sequence detection on every training forward
    without a cache; a sliding window longer than the sequence passes too."""
    b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    kv = torch.arange(kv_length, device=device).view(1, 1, 1, -1)
    try:
        for start in range(0, q_length, chunk):
            q = torch.arange(q_offset + start, q_offset + min(start + chunk, q_length), device=device).view(1, 1, -1, 1)
            causal = (kv <= q).expand(batch_size, 1, -1, -1)
            keep = torch.as_tensor(mask_function(b, h, q, kv), device=device)
            if not torch.equal(keep.expand_as(causal), causal):
                return False
    except Exception:  # a mask function written for vmap only: not ours to judge
        return False
    return True


def register() -> None:
    """Registers "cram_routed" with transformers' AttentionInterface and AttentionMaskInterface
    (idempotent; enable_routed_attention calls it)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, routed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _causal_mask)


def _capture_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of an attention module: keep its input for the router and the MLP."""
    if getattr(module.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        getattr(module, ATTR)._input = args[0] if args else kwargs.get("hidden_states")


def _release_input(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    """Forward hook of an attention module, run even when its forward raised: drop an input
    the attention function did not take, which would keep the failed forward's activations
    (and their autograd graph) alive until the module's next call."""
    routing = getattr(module, ATTR, None)
    if routing is not None:
        routing._input = None


def self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The causal self-attention modules of a transformers model: modules named *Attention*
    with a config and is_causal=True, not cross-attention."""
    return [
        m for m in model.modules()
        if "Attention" in type(m).__name__ and not isinstance(m, PreTrainedModel)
        and getattr(m, "config", None) is not None and getattr(m, "is_causal", False) is True
        and not getattr(m, "is_cross_attention", False)
    ]


def enable_routed_attention(model: nn.Module, **routed_kwargs) -> nn.Module:
    """Make a transformers model's causal self-attention CRAM routed attention, in place.

    Every self-attention module gets a submodule `cram` (HFRouting: router, semantic-memory
    MLP, routing state) on its parameters' device and dtype, and the model's
    attn_implementation becomes "cram_routed". `routed_kwargs` are RoutedAttention's
    (threshold, warmup, routing, target, explore, ...; not rope_base). Add
    `cram_ext.aux_losses(model)` to the training loss; each `cram` holds `last_stats`.
    Returns the model.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    modules = self_attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__}: no causal self-attention module found")
    if any(hasattr(m, ATTR) for m in modules):
        raise ValueError(f"{type(model).__name__}: routed attention is already enabled")
    routings = []  # all built first: bad arguments leave the model as it was
    for m in modules:
        config = m.config
        num_heads = getattr(m, "num_heads", None) or config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(m, "head_dim", None) or config.hidden_size // num_heads
        param = next(m.parameters())
        routing = HFRouting(config.hidden_size, num_heads, num_kv_heads, head_dim, **routed_kwargs)
        routings.append(routing.to(device=param.device, dtype=param.dtype))
    register()
    hooks = []
    try:
        for m, routing in zip(modules, routings):
            m.add_module(ATTR, routing)
            hooks.append(m.register_forward_pre_hook(_capture_input, with_kwargs=True))
            hooks.append(m.register_forward_hook(_release_input, with_kwargs=True, always_call=True))
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"{type(model).__name__} does not take attention functions from transformers' "
                             "AttentionInterface, so its attention cannot be routed")
    except BaseException:
        for handle in hooks:
            handle.remove()
        for m in modules:
            if hasattr(m, ATTR):
                delattr(m, ATTR)
        raise
    return model
