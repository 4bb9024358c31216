"""cram_ext: fused ops for consolidation-routed hybrid models (gated scan, router, routed attention)."""

from __future__ import annotations

import json

import torch

from . import models, nn, reference
from ._version import __version__
from .checkpoint import load_run
from .generation import GenerateOutput, RolloutOutput, generate, rollout
from .models import CRAMBlock, CRAMConfig, CRAMModel, TransformerConfig, TransformerLM
from .nn import (BlockCache, KVCache, MetaplasticCache, MetaplasticMemory, ModelCache, RoutedAttention, ScanCache,
                 WorkingMemory, aux_losses)
from .ops import (check_route, gated_scan, metaplastic_scan, metaplastic_step, route, routed_attention,
                  routed_attention_kernel, routed_attention_sm80, routed_decode, set_debug)
from .route_types import Route, route_from_mask

__all__ = [
    "BlockCache",
    "CRAMBlock",
    "CRAMConfig",
    "CRAMModel",
    "GenerateOutput",
    "KVCache",
    "MetaplasticCache",
    "MetaplasticMemory",
    "ModelCache",
    "Route",
    "ScanCache",
    "TransformerConfig",
    "TransformerLM",
    "RoutedAttention",
    "WorkingMemory",
    "aux_losses",
    "build_info",
    "check_route",
    "gated_scan",
    "generate",
    "rollout",
    "RolloutOutput",
    "load_run",
    "metaplastic_scan",
    "metaplastic_step",
    "models",
    "nn",
    "reference",
    "route",
    "route_from_mask",
    "routed_attention",
    "routed_attention_kernel",
    "routed_attention_sm80",
    "routed_decode",
    "set_debug",
]


def build_info() -> dict:
    """What this build of cram_ext contains.

    Returns a dict with "backends" (["cpu"] or ["cpu", "cuda"]), "cuda_archs",
    "cuda_version" and "cutlass_version" (empty strings when not built), and
    "torch" (the torch it is running under).
    """
    info = json.loads(torch.ops.cram.build_info())
    info["torch"] = torch.__version__
    return info
