"""Models built from the cram_ext modules."""

from .cram import CRAMBlock, CRAMConfig, CRAMModel

__all__ = ["CRAMBlock", "CRAMConfig", "CRAMModel"]
