"""Models built from the cram_ext modules."""

from .cram import CRAMBlock, CRAMConfig, CRAMModel
from .transformer import CausalSelfAttention, TransformerConfig, TransformerLM

__all__ = ["CRAMBlock", "CRAMConfig", "CRAMModel", "CausalSelfAttention", "TransformerConfig", "TransformerLM"]
