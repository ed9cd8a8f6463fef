"""Numeric formats as pure tensor functions (CPU reference; kernels and export build on them)."""

from . import fp8, nvfp4
from .fp8 import dequantize_fp8, fake_quantize_fp8, quantize_fp8
from .nvfp4 import (
    NVFP4Weight,
    dequantize_nvfp4,
    fake_quantize_nvfp4_activation,
    fake_quantize_nvfp4_weight,
    quantize_nvfp4,
)

__all__ = [
    "NVFP4Weight",
    "dequantize_fp8",
    "dequantize_nvfp4",
    "fake_quantize_fp8",
    "fake_quantize_nvfp4_activation",
    "fake_quantize_nvfp4_weight",
    "fp8",
    "nvfp4",
    "quantize_fp8",
    "quantize_nvfp4",
]
