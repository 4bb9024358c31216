"""Modules of a CRAM layer: routed attention (episodic + semantic memory) and working memory."""

from .rotary import apply_rotary
from .routed_attention import RoutedAttention, aux_losses
from .working_memory import WorkingMemory

__all__ = ["RoutedAttention", "WorkingMemory", "apply_rotary", "aux_losses"]
