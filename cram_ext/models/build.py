"""The models of `python -m cram_ext.train` runs: built from a run's arguments, or rebuilt
from the model config its config.json records."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch
from torch import nn

from .cram import CRAMConfig, CRAMModel
from .transformer import TransformerConfig, TransformerLM

MODELS = {"cram": (CRAMConfig, CRAMModel), "transformer": (TransformerConfig, TransformerLM)}  # --model
WORKING_MEMORY = {"scan": "scan", "metaplastic": "metaplastic", "gla": "gla", "none": None}  # --working-memory -> CRAMConfig.memory


def build_model(args: argparse.Namespace, shape: dict[str, Any], routed: dict[str, Any]) -> tuple[nn.Module, dict]:
    """The model the arguments describe (--model, --d-model, --layers, --heads, --working-memory,
    --attention, --positions) for a task of this shape (Task.model_config), its RoutedAttention layers
    taking the keyword arguments `routed`; and its config, as config.json records it."""
    common = dict(d_model=args.d_model, n_layers=args.layers, num_heads=args.heads, routed=routed)
    if args.model == "cram":  # no position embeddings: the working memory orders the inputs
        memory = WORKING_MEMORY[getattr(args, "working_memory", "scan")]  # a Namespace from before the flag: scan
        cfg: Any = CRAMConfig(**common, **{k: v for k, v in shape.items() if k != "max_len"}, memory=memory)
    else:
        cfg = TransformerConfig(**common, attention=args.attention, positions=args.positions, **shape)
        if getattr(args, "init_like_dense", False):
            return transformer_like_dense(cfg), dataclasses.asdict(cfg)
    return MODELS[args.model][1](cfg), dataclasses.asdict(cfg)


def transformer_like_dense(cfg: TransformerConfig) -> TransformerLM:
    """A TransformerLM of this (routed) config whose parameters shared with the dense model
    (attention="sdpa") are those the dense model draws from the same random state; only the
    RoutedAttention extras (router, semantic memory) are its own draws. The random state after
    it is the dense model's, so what the run draws next matches the dense run too."""
    state = torch.random.get_rng_state()
    model = TransformerLM(cfg)
    torch.random.set_rng_state(state)
    dense = TransformerLM(dataclasses.replace(cfg, attention="sdpa"))
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(".attn." in k for k in missing), (missing, unexpected)
    return model


def model_from_config(model: str, model_config: dict[str, Any]) -> nn.Module:
    """The (untrained) model of a run whose config.json says "model": `model` and
    "model_config": `model_config` (a CRAM config without "memory", from before that key, is the
    gated scan: CRAMConfig's default)."""
    config_cls, model_cls = MODELS[model]
    return model_cls(config_cls(**model_config))
