"""RoutedAttention: a causal self-attention layer whose attention runs only for routed tokens.

One layer of docs/design.md §1, steps 2-5: a router on the normalised input decides per
token whether to attend; routed tokens get causal softmax attention (episodic memory), the
others get the prediction of a small MLP (semantic memory). In training the MLP is
distilled towards attention's output where attention was computed, and the router learns
to send to attention only the tokens that still need it: those the MLP still gets wrong
(target="predict"), or those where the MLP instead of attention would cost task loss
(target="loss", measured on probe tokens).

The router and the MLP read the input through a stop-gradient: their losses train them and
nothing upstream. With gradients flowing back, the MLP's distillation reshaped the
representation that attention reads (on SRCD at T=512 attention reached 29-93% on novel
keys after 1000 steps instead of 100%) and the router's decisions collapsed right after
its warm-up, novel queries included (docs/results.md).
"""

from __future__ import annotations

import io

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..ops import route, routed_attention, routed_decode
from ..route_types import Route
from .cache import KVCache, ScanCache, compute_dtype
from .padding import Padding
from .attention_inputs import attention_inputs
from .metaplastic_memory import MetaplasticMemory
from .working_memory import WorkingMemory

ROUTING_MODES = ("learned", "dense", "none", "topk")
TARGETS = ("predict", "loss")
MEMORIES = (False, None, True, "scan", "metaplastic")  # memory=: none, none, scan, scan, metaplastic


class RoutedAttention(nn.Module):
    """Drop-in causal self-attention, (B, T, E) -> (B, T, E), with consolidation routing.

    Args:
        embed_dim: E.
        num_heads: query heads H; the head dim is E // H.
        num_kv_heads: key/value heads Hk (grouped-query attention), default H.
        threshold: a token is routed when the router's probability exceeds this. With
            target="loss" the router's probability estimates P(gain > loss_tol) under
            cost-weighted labels, so 0.5 routes where the expected gain exceeds loss_tol; a
            lower threshold keeps tokens the router is unsure of (docs/results.md).
        semantic_hidden: hidden width of the semantic-memory MLP, default 2 * E.
        explore: fraction of tokens force-routed in training (never in eval), so that the
            router keeps seeing consolidated tokens and attention keeps learning at tokens
            the router has dropped.
        tol: relative error ||s - attn||^2 / ||attn||^2 above which the router's
            target says "still needs attention".
        router_bias_init: initial router bias; high, so everything starts routed and
            attention use has to fall as consolidation succeeds.
        warmup: training forwards during which the router does not learn (its parameters
            get no gradient) and, with routing="learned", every token attends (in training
            and in eval, no probes), so that attention learns what it is for before the
            router may drop it. The count, `trained_steps`, is saved with the state dict.
        routing: "learned" (the CRAM router above); or a baseline: "dense" (every token
            attends), "none" (no token attends: the semantic MLP everywhere), "topk" (each
            row routes its round(budget * T) tokens of highest router score, a fixed
            budget as in Mixture-of-Depths; the router still learns from the router loss,
            and the choice looks at the whole row, so it is not causal).
        budget: the fraction of tokens "topk" routes.
        target: what the router learns to predict (docs/design.md). The default, "loss", is
            the one that consolidates on every task measured (SRCD, MQAR, text, with the CRAM
            model and with a plain transformer) with these same defaults; "predict" keeps
            every token a plain transformer's semantic memory cannot imitate, nearly all of
            them on text (docs/results.md). "predict": the token still
            needs attention while the semantic memory's relative error exceeds `tol`.
            "loss": the token needs attention when using the semantic memory instead would
            raise the task loss by more than `loss_tol` nats per token. It is measured on
            probe tokens: in training a random `probe` fraction of the tokens get attention
            computed but the semantic memory's output used, so the task loss's gradient
            there is taken where attention is missing (not where the prediction is already
            right, where it vanishes), and <gradient, attention - semantic> estimates what
            restoring attention would gain. The router learns from the last training
            step's probes, each weighted by |gain - loss_tol| (what the wrong decision would
            cost), so that it routes where the expected gain exceeds loss_tol. `loss_tol` assumes a task loss averaged over the batch's tokens.
        probe, loss_tol: see target="loss".
        rope_base: when given, queries and keys get rotary position embeddings of this base
            (apply_rotary), as in Llama-style models; None: no positions inside the layer.
        head_dim: D, default E // H (a model whose heads are not E // H wide sets it).
        projections: False for a model that owns its q/k/v/out projections and calls `mix`
            (cram_ext.hf); `forward` then refuses to run.
        memory: the router and the semantic memory read the normalised input plus a working
            memory over it (a causal summary of the past): True or "scan", a gated scan
            (WorkingMemory); "metaplastic", a MetaplasticMemory with `num_heads` heads; False
            or None, none. The memory learns through the semantic memory (its distillation,
            and the task loss where its output is used), never through the layer's input.

    After each forward, `last_stats` holds `utilization` (routed / all tokens) and
    `attn_flop_fraction` (sum of (t+1) over routed t / over all t) as detached 0-dim
    tensors (no host sync; call float() to log them), `last_mask` the (B, T) bool mask of
    the tokens whose attention was computed, `last_probe` that of the probe tokens
    (target="loss", training; else None), and in training `aux_loss` holds the
    consolidation + router loss (see `aux_losses`).

    Decoding: `forward(x, cache=cache)` with a `KVCache` from `allocate_cache` takes the next T
    tokens (a prompt, one token, or any chunk), writes every new token's key and value into
    the cache, routes the new tokens with the same router as the full forward, attends the
    routed ones over all cached keys (bottom-right causal: new token i sees keys <= i + the
    cache's position) and returns (output, cache). Prefill then steps give the full
    forward's outputs and routing (eval mode only; routing="topk" looks at whole rows, so it
    cannot decode). A one-token step reads the cache's per-row lengths on the device (no host
    sync), so a decoding step of a whole model can be captured in a CUDA graph.

    Rows of different lengths: `forward(x, attention_mask=mask)`, mask (B, T) bool (or 0/1
    integers) True at real tokens, as Hugging Face's attention_mask (nn.MultiheadAttention's
    key_padding_mask marks the pads instead), each row's real tokens one contiguous run (left
    padding, as generation uses, or right padding). Each row is computed as if it held its real tokens alone: no token
    attends to a pad, rotary positions count from the row's first real token, and pads take
    no part in the statistics or the training losses (their outputs are zeros). With a cache,
    the mask belongs to the first call (the prompt); the rows then continue one token per call,
    each from its own length.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        threshold: float = 0.5,
        semantic_hidden: int | None = None,
        explore: float = 0.05,
        tol: float = 0.3,
        router_bias_init: float = 3.0,
        warmup: int = 1000,
        routing: str = "learned",
        budget: float = 0.1,
        target: str = "loss",
        probe: float = 0.05,
        loss_tol: float = 0.2,
        memory: bool | str | None = False,
        rope_base: float | None = None,
        head_dim: int | None = None,
        projections: bool = True,
    ) -> None:
        super().__init__()
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if not 0.0 <= probe < 1.0:
            raise ValueError(f"probe must be in [0, 1), got {probe}")
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"budget must be in [0, 1], got {budget}")
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"RoutedAttention: {name} must be a positive int, got {value!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] (a router probability: 1 routes no token), got {threshold}")
        if not 0.0 <= explore <= 1.0:
            raise ValueError(f"explore must be in [0, 1], got {explore}")
        self.routing, self.budget = routing, budget
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim is None and embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads if head_dim is None else head_dim
        self.threshold, self.explore, self.tol = threshold, explore, tol
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = warmup
        self.trained_steps = 0
        self.target, self.probe, self.loss_tol = target, probe, loss_tol
        if rope_base is not None and self.head_dim % 2:
            raise ValueError(f"rope_base needs an even head dim, got {self.head_dim}")
        self.rope_base = rope_base
        inner, kv_inner = num_heads * self.head_dim, num_kv_heads * self.head_dim
        self.embed_dim = embed_dim
        if projections:
            self.q_proj = nn.Linear(embed_dim, inner, bias=False)
            self.k_proj = nn.Linear(embed_dim, kv_inner, bias=False)
            self.v_proj = nn.Linear(embed_dim, kv_inner, bias=False)
            self.out_proj = nn.Linear(inner, embed_dim, bias=False)
        self.router_weight = nn.Parameter(torch.zeros(embed_dim))
        self.router_bias = nn.Parameter(torch.tensor(float(router_bias_init)))
        hidden = 2 * embed_dim if semantic_hidden is None else semantic_hidden
        self.semantic = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, inner))
        if memory not in MEMORIES:
            raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
        self.memory: WorkingMemory | MetaplasticMemory | None = None
        if memory is True or memory == "scan":
            self.memory = WorkingMemory(embed_dim)
        elif memory == "metaplastic":
            self.memory = MetaplasticMemory(embed_dim, num_heads, head_dim=self.head_dim)
        self.last_stats: dict[str, Tensor] = {}
        self.last_mask: Tensor | None = None
        self.last_probe: Tensor | None = None
        self.aux_loss: Tensor | None = None
        # target="loss": (router input, needs attention, weight) of the last training step,
        # weight > 0 at its probes only (dense tensors: no host sync to select them).
        self._probe_labels: tuple[Tensor, Tensor, Tensor] | None = None

    def forward(self, x: Tensor, cache: KVCache | None = None,
                attention_mask: Tensor | None = None) -> Tensor | tuple[Tensor, KVCache]:
        """(B, T, E) -> (B, T, E); with `cache`, (output, cache) after writing the T new
        tokens into it; `attention_mask` (B, T) bool, True at real tokens (see the class
        docstring)."""
        if not hasattr(self, "q_proj"):
            raise RuntimeError("RoutedAttention(projections=False) has no forward: call mix(x, q, k, v)")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"RoutedAttention: expected x of shape (B, T, E={self.embed_dim}), got "
                             f"{tuple(x.shape)}" + (" (add a batch dimension: x.unsqueeze(0))" if x.dim() == 2 else ""))
        inputs = attention_inputs("RoutedAttention", self, x, cache, attention_mask)
        if cache is not None:
            self._check_decoding(cache)
        x, pad, step, q, k, v = inputs.x, inputs.pad, inputs.step, inputs.q, inputs.k, inputs.v
        if cache is not None and cache.k.shape[-1] != self.head_dim:  # a cache kept at the kernels' head dim
            k, v = (F.pad(t, (0, cache.k.shape[-1] - self.head_dim)) for t in (k, v))
        seqlens = None
        if step:
            cache.append(k, v)
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
                # Differentiable: causal attention over the keys so far (routed_decode has no backward).
                if cache.ragged:
                    raise NotImplementedError("RoutedAttention: a decoding step over rows of different lengths "
                                              "has no backward: run it under torch.no_grad()")
                k, v = cache.k[:, :cache.position], cache.v[:, :cache.position]
            else:
                k, v, seqlens = cache.k, cache.v, cache.lengths
        elif cache is not None:
            k, v = cache.update(k, v, None if pad is None else pad.lengths.to(torch.int32))
        out = self.out_proj(self.mix(x, q, k, v, memory_cache=None if cache is None else cache.memory,
                                     valid=None if pad is None else pad.valid, seqlens=seqlens))
        if pad is not None:
            out = pad.unshift(out)
            self._unshift_records(pad)
        return out if cache is None else (out, cache)

    def _unshift_records(self, pad: Padding) -> None:
        """last_mask and last_probe of a forward over `pad.shift`ed rows, back in the caller's
        (padded) token order, False at the pads."""
        self.last_mask = pad.unshift(self.last_mask)
        if self.last_probe is not None:
            self.last_probe = pad.unshift(self.last_probe)

    def allocate_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> KVCache:
        """An empty KVCache for `batch_size` rows of up to `max_len` tokens (with the state of
        the layer's working memory when it has one). `dtype` is the dtype the layer computes
        its keys in: default its parameters', or the autocast dtype where autocast is on now.
        On CUDA a head dim the kernels do not take (64 and 128) is stored zero-padded to the next
        one, so that a decoding step reads the cache as it is instead of padding a copy of it."""
        weight = self.router_weight
        dtype = compute_dtype(weight) if dtype is None else dtype
        device = torch.device(weight.device if device is None else device)
        memory = None if self.memory is None else self.memory.allocate_cache(batch_size, dtype=dtype, device=device)
        return KVCache.zeros(batch_size, max_len, self.num_kv_heads, _kernel_head_dim(self.head_dim, device),
                             dtype=dtype, device=device, memory=memory)

    def _check_decoding(self, cache: KVCache) -> None:
        if self.training:
            raise RuntimeError("RoutedAttention: decoding with a cache needs eval mode (call model.eval()): a "
                               "training forward explores, probes and counts warm-up steps")
        if self.routing == "topk":
            raise NotImplementedError("RoutedAttention: routing='topk' chooses among a whole row's tokens, "
                                      "which is not causal, so it cannot decode token by token")
        if (self.memory is None) != (cache.memory is None):
            raise ValueError(f"RoutedAttention: the cache {'lacks' if cache.memory is None else 'has'} a working-memory "
                             f"state and the layer has memory={self.memory is not None}: allocate the cache with "
                             "the layer's allocate_cache")

    def mix(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None,
            memory_cache: ScanCache | None = None, *, valid: Tensor | None = None,
            seqlens: Tensor | None = None) -> Tensor:
        """The layer between its projections, for models that own them (cram_ext.hf): x (B, T, E)
        the layer's input, which the router and the semantic memory read; q (B, T, H, D), k and
        v (B, S, Hk, D), positions applied (S > T: the first S - T keys are past tokens', as from
        a KV cache). Returns (B, T, H * D): attention where routed, the semantic memory's
        prediction elsewhere. Sets last_stats, last_mask, last_probe and aux_loss, and counts
        the training step. `memory_cache`: with memory=True, the working memory's state before
        x's first token, advanced in place (without it the scan starts from zeros).
        `valid` (B, T) bool: x's real tokens, each row's first (padded rows, shifted): only they
        count in the statistics and the losses. `seqlens` (B,) int32, with T = 1: row b's query
        attends over k[b, :seqlens[b]] only (a cache whose rows differ in length)."""
        if self.training and torch.compiler.is_compiling():
            return self._mix_eager(x, q, k, v, softmax_scale, memory_cache, valid=valid, seqlens=seqlens)
        return self._mix_and_record(x, q, k, v, softmax_scale, memory_cache, valid=valid, seqlens=seqlens)

    def _mix_and_record(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None,
                        memory_cache: ScanCache | None = None, *, valid: Tensor | None = None,
                        seqlens: Tensor | None = None) -> Tensor:
        if self.training and _in_backward():
            # Activation checkpointing runs the forward again inside the backward: the same
            # computation (with the warm-up count the first run saw), nothing counted or kept.
            steps = self.trained_steps
            self.trained_steps -= 1
            try:
                return self._mix(x, q, k, v, softmax_scale, None, valid)[0]
            finally:
                self.trained_steps = steps
        mixed, mask, probe, aux_loss = self._mix(x, q, k, v, softmax_scale, memory_cache, valid, seqlens)
        if seqlens is not None:  # 1-based positions of the queries
            positions = seqlens[:, None]
        else:
            offset = k.shape[1] - q.shape[1]
            positions = torch.arange(offset + 1, offset + q.shape[1] + 1, device=mask.device)[None]
        self.last_stats = self._stats(mask, positions, valid)
        self.last_mask, self.last_probe, self.aux_loss = mask, probe, aux_loss
        if self.training:
            self.trained_steps += 1
        return mixed

    # In training the layer keeps Python-side state that changes every step (the warm-up count,
    # the probe labels its backward hook writes): dynamo would guard on it and recompile every
    # step until it gave up on the frame. Under torch.compile a training step's mixing runs
    # eagerly instead (one graph break); the projections and the rest of the model compile.
    _mix_eager = torch.compiler.disable(_mix_and_record)

    def _mix(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None,
             memory_cache: ScanCache | None = None, valid: Tensor | None = None, seqlens: Tensor | None = None):
        """(mixed output, mask of the real tokens attended, probe mask or None, aux loss or None)."""
        B, T, _ = x.shape
        # No affine: the router's and the MLP's first linear maps absorb one.
        z = F.layer_norm(x.detach(), (x.shape[-1],))
        if self.memory is not None:
            if memory_cache is None:
                z = z + self.memory(z, attention_mask=valid)
            else:
                z = z + self.memory(z, cache=memory_cache, attention_mask=valid)[0]
        probe = None
        learning = self.training and self.routing == "learned" and not self.warming
        if learning and self.target == "loss" and self.probe > 0:
            probe = torch.rand(B, T, device=x.device) < self.probe
            if valid is not None:
                probe = probe & valid
        r = self._route(z, probe, valid)
        attn = self._attend(q, k, v, r, softmax_scale, seqlens)
        semantic = self.semantic(z)
        # Probes: attention computed, the semantic memory's output used (see target="loss").
        use_attn = r.mask if probe is None else r.mask & ~probe
        mixed = torch.where(use_attn.unsqueeze(-1), attn, semantic.to(attn.dtype))
        if probe is not None and mixed.requires_grad:
            self._measure_on_backward(mixed, attn, semantic, z, probe, probe.numel() if valid is None else valid.sum())
        # Pads may be routed (they cost attention, never change a real token's): they count nowhere.
        attended = r.mask if valid is None else r.mask & valid
        aux_loss = self._consolidation_losses(semantic, attn, r.prob, attended, z) if self.training else None
        return mixed, attended, probe, aux_loss

    @property
    def warming(self) -> bool:
        """True during the warm-up: the router frozen, and with routing="learned" every token routed."""
        return self.trained_steps < self.warmup

    def get_extra_state(self) -> Tensor:
        """The warm-up count and the probe labels the next training step's router loss reads,
        so that a resumed run continues exactly (of the router's input, the probes' rows only),
        serialised into one uint8 tensor: a state dict of tensors only, which safetensors (and
        transformers' save_pretrained) can write. `decode_extra_state` reads it back."""
        labels = None
        if self._probe_labels is not None:
            z, needed, weight = (t.detach().cpu() for t in self._probe_labels)
            labels = {"z_probes": z[weight > 0], "needed": needed, "weight": weight}
        buf = io.BytesIO()
        torch.save({"trained_steps": self.trained_steps, "probe_labels": labels}, buf)
        return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)

    @staticmethod
    def decode_extra_state(state: Tensor | dict) -> dict:
        """{"trained_steps": int, "probe_labels": None or {"z_probes", "needed", "weight"}} from
        what get_extra_state wrote (a dict as it is: checkpoints written before the tensor form)."""
        if torch.is_tensor(state):
            state = torch.load(io.BytesIO(state.cpu().numpy().tobytes()), weights_only=True)
        return state

    def set_extra_state(self, state: Tensor | dict) -> None:
        state = self.decode_extra_state(state)
        self.trained_steps = int(state["trained_steps"])
        labels, self._probe_labels = state.get("probe_labels"), None
        if labels is not None:
            # Zero rows elsewhere: their weight is 0, so the router loss is the same sum.
            weight = labels["weight"]
            z = labels["z_probes"].new_zeros(*weight.shape, labels["z_probes"].shape[-1])
            z[weight > 0] = labels["z_probes"]
            self._probe_labels = (z, labels["needed"], weight)

    def _measure_on_backward(self, mixed: Tensor, attn: Tensor, semantic: Tensor, z: Tensor, probe: Tensor,
                             n_tokens: int | Tensor) -> None:
        """When the task loss's gradient g reaches `mixed`, label every probe token: restoring
        attention there changes the loss by about <g, attn - semantic>; the token needs
        attention when that lowers the per-token loss by more than loss_tol. `n_tokens`: the
        real tokens the task loss averages over."""
        attn, semantic, z = attn.detach(), semantic.detach(), z.detach()

        def hook(grad: Tensor) -> None:
            with torch.no_grad():
                gain = -((attn.float() - semantic.float()) * grad.float()).sum(-1) * n_tokens
                # Each label weighs what the wrong decision would cost, |gain - loss_tol|: the
                # router's p > 1/2 then estimates E[gain | z] > loss_tol (cost-sensitive logistic
                # regression), so that a rare token worth nats outweighs many worth nothing.
                regret = (gain - self.loss_tol).abs() * probe
                self._probe_labels = (z, gain > self.loss_tol, regret)

        mixed.register_hook(hook)

    def _route(self, z: Tensor, probe: Tensor | None = None, valid: Tensor | None = None) -> Route:
        B, T, _ = z.shape
        threshold, force = self.threshold, None
        if self.routing == "learned":
            if self.training and self.explore > 0:
                force = torch.rand(B, T, device=z.device) < self.explore
            if probe is not None:
                force = probe if force is None else force | probe
            if self.warming:
                threshold = -1.0  # as "dense"
        elif self.routing == "dense":
            threshold = -1.0  # prob > -1 always
        elif self.routing == "none":
            threshold = 2.0  # prob > 2 never
        else:  # topk: the k best scores of each row, passed as forced tokens
            threshold = 2.0
            k = round(self.budget * T)
            force = torch.zeros(B, T, dtype=torch.bool, device=z.device)
            if k > 0:
                with torch.no_grad():
                    score = z.float() @ self.router_weight.float()
                    if valid is not None:
                        score = score.masked_fill(~valid, float("-inf"))
                force.scatter_(1, score.topk(k, dim=1).indices, True)
        return route(z, self.router_weight, self.router_bias, threshold, force)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, r: Route, softmax_scale: float | None = None,
                seqlens: Tensor | None = None) -> Tensor:
        """routed_attention on (q, k, v), (B, T, H*D) back in q's dtype. The CUDA kernels
        take float16/bfloat16 and head dims 64 and 128: on CUDA a float32 layer attends in
        bfloat16 (as flash-attention users do), and a smaller head dim is zero-padded to
        the next supported one (zeros add nothing to q.k or to the output; the softmax
        scale, default D ** -0.5, is the unpadded D's)."""
        D, out_dtype = q.shape[-1], q.dtype
        if seqlens is not None or (q.shape[1] == 1 and not (torch.is_grad_enabled()
                                                             and (q.requires_grad or k.requires_grad))):
            return self._decode(q, k, v, r, softmax_scale, seqlens)
        if q.is_cuda:
            if q.dtype == torch.float32:
                q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
            q, k, v = _pad_head_dim((q, k, v), _kernel_head_dim(D, q.device))
        scale = D**-0.5 if softmax_scale is None else softmax_scale
        attn, _ = routed_attention(q, k, v, r.index, r.counts, scale)
        return attn[..., :D].flatten(2).to(out_dtype)

    def _decode(self, q: Tensor, k: Tensor, v: Tensor, r: Route, softmax_scale: float | None,
                seqlens: Tensor | None = None) -> Tensor:
        """One new token per row over its cached keys (k, v: (B, S, Hk, D); row b's first
        seqlens[b], default all S): routed_decode, which skips the rows not routed and reads the
        cache in its own dtype (float32 included, so a float32 cache is not cast every step)."""
        B, _, H, D = q.shape
        q, k, v = _pad_head_dim((q, k, v), max(_kernel_head_dim(D, q.device), k.shape[-1]))
        if seqlens is None:
            seqlens = torch.full((B,), k.shape[1], dtype=torch.int32, device=q.device)
        scale = D**-0.5 if softmax_scale is None else softmax_scale
        out, _ = routed_decode(q[:, 0], k, v, seqlens, r.mask[:, 0], scale)
        return out[..., :D].reshape(B, 1, H * D)

    def _consolidation_losses(self, semantic: Tensor, attn: Tensor, prob: Tensor, mask: Tensor, z: Tensor) -> Tensor:
        """L_cons + L_route. The semantic memory is distilled towards attention on the tokens
        where attention was computed; the router learns from its target's labels."""
        target = attn.detach().float()
        err = (semantic.float() - target).pow(2).sum(-1)
        weight = mask.float()
        n = weight.sum().clamp_min(1.0)
        cons = (err * weight).sum() / n / semantic.shape[-1]
        if self.warming:  # the router's parameters get no gradient (None, so AdamW leaves them as they are)
            return cons
        if self.target == "loss":
            return cons + self._router_loss_from_probes(z.dtype)
        still_wrong = (err.detach() / (target.pow(2).sum(-1) + 1e-6) > self.tol).float()
        return cons + (_bce(prob, still_wrong) * weight).sum() / n

    def _router_loss_from_probes(self, dtype: torch.dtype) -> Tensor:
        """The router's BCE on the last training step's probe labels, weighted by their regret
        (0 before the first step)."""
        if self._probe_labels is None:
            # Zero, but reaching both router parameters: every parameter gets a gradient at
            # every step (DDP without find_unused_parameters needs that).
            return (self.router_weight.sum() + self.router_bias) * 0.0
        z, needed, weight = (t.to(self.router_weight.device) for t in self._probe_labels)
        prob = torch.sigmoid((z.to(dtype) @ self.router_weight.to(dtype)).float() + self.router_bias)
        return (_bce(prob, needed.float()) * weight).sum() / weight.sum().clamp_min(1.0)

    @staticmethod
    def _stats(mask: Tensor, positions: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
        # positions: the tokens' 1-based positions, (B or 1, T): the keys a routed token reads.
        m = mask.float()
        t = positions.to(torch.float32).expand(m.shape)
        w = torch.ones_like(m) if valid is None else valid.float()
        return {
            "utilization": (m * w).sum() / w.sum().clamp_min(1.0),
            "attn_flop_fraction": (m * t * w).sum() / (t * w).sum().clamp_min(1.0),
        }


def _kernel_head_dim(D: int, device: torch.device) -> int:
    """The head dim the kernels of `device` compute D at: on CUDA 64 or 128 (D zero-padded up;
    larger D as it is, for the op to refuse), D itself on the CPU."""
    if device.type != "cuda" or D in (64, 128) or D > 128:
        return D
    return 64 if D < 64 else 128


def _pad_head_dim(tensors: tuple[Tensor, ...], D: int) -> tuple[Tensor, ...]:
    """Each tensor zero-padded along its last dim to D (zeros add nothing to q.k or to the output);
    those already D wide as they are."""
    return tuple(F.pad(t, (0, D - t.shape[-1])) if t.shape[-1] < D else t for t in tensors)


def _in_backward() -> bool:
    """True inside an autograd backward pass (where activation checkpointing recomputes)."""
    return torch._C._current_graph_task_id() != -1


def _bce(prob: Tensor, target: Tensor) -> Tensor:
    # Written out: F.binary_cross_entropy refuses to run under autocast.
    p = prob.float().clamp(1e-6, 1 - 1e-6)
    return -(target * p.log() + (1 - target) * (1 - p).log())


def aux_losses(model: nn.Module) -> Tensor:
    """Sum of the consolidation and router losses of every RoutedAttention in `model`
    from its last training forward (0 when there is none)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, RoutedAttention) and m.aux_loss is not None]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return torch.stack(losses).sum()
