"""Modules of a CRAM layer: routed attention (episodic + semantic memory) and working memory."""

from .routed_attention import RoutedAttention, aux_losses
from .working_memory import WorkingMemory

__all__ = ["RoutedAttention", "WorkingMemory", "aux_losses"]
