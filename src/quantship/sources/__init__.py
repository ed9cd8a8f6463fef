"""Quantized sources read as their BF16 twin, tensor by tensor (FP8-block, INT4 and NVFP4)."""

from quantship.sources.extras import SourceExtras, extras_of, find_extras
from quantship.sources.load import load_dequantized_model
from quantship.sources.reader import PLAIN, SourceCheckpoint

__all__ = ["PLAIN", "SourceCheckpoint", "SourceExtras", "extras_of", "find_extras", "load_dequantized_model"]
