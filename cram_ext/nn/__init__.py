"""Modules of a CRAM layer: routed attention (episodic + semantic memory) and working memory (the
gated scan, or the metaplastic memory), and the caches that carry their state between decoding calls."""

from .cache import BlockCache, KVCache, ModelCache, ScanCache
from .metaplastic_memory import MetaplasticCache, MetaplasticMemory
from .rotary import apply_rotary
from .routed_attention import RoutedAttention, aux_losses
from .working_memory import WorkingMemory

__all__ = ["BlockCache", "KVCache", "MetaplasticCache", "MetaplasticMemory", "ModelCache", "RoutedAttention",
           "ScanCache", "WorkingMemory", "apply_rotary", "aux_losses"]
