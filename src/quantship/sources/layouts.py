"""How each quantized source layout stores one weight, and how to rebuild rows of it (a dispatch table).

A layout names the leaf that marks a quantized module (`weight_scale_inv`, `weight_packed`, ...), the
companion leaves it reads, the leaves that only served the source's own quantization (input and KV
scales: requantization replaces them), the dequantized shape, and a function that dequantizes a row
range from the stored tensors. Row ranges keep the transient memory to a stripe of the weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from quantship.export import compressed_tensors as ctm
from quantship.formats.handlers import FORMAT_HANDLERS
from quantship.sources import compressed_int4, fp8_block

# Reads rows [r0, r1) of a stored tensor by leaf (None: the whole tensor).
RowReader = Callable[[str, int | None, int | None], Tensor]

# Leaves of a source's own activation / KV-cache quantization; the export computes its own.
SOURCE_RUNTIME_SCALES = ("input_scale", "input_global_scale", "input_zero_point", "output_scale",
                         "output_zero_point", "k_scale", "v_scale")


@dataclass(frozen=True)
class Layout:
    """One stored form of a quantized weight `M.weight`."""

    name: str
    marker: str  # the leaf whose presence (with `requires`) makes M a module of this layout
    requires: tuple[str, ...]  # other leaves that must be stored
    optional: tuple[str, ...]  # leaves read when present
    stripe_rows: int  # rows per dequantization step (a multiple of any row blocking)
    shape: Callable[[dict[str, tuple[int, ...]], RowReader], tuple[int, ...]]
    dequantize: Callable[[RowReader, int, int, dict, torch.dtype], Tensor]

    @property
    def leaves(self) -> tuple[str, ...]:
        return (self.marker, *self.requires, *self.optional)


# --------------------------------------------------------------------------- FP8 block (DeepSeek-V3)


def fp8_block_layout(block: tuple[int, int]) -> Layout:
    def dequantize(read: RowReader, r0: int, r1: int, params: dict, dtype: torch.dtype) -> Tensor:
        scale = read("weight_scale_inv", r0 // block[0], -(-r1 // block[0]))
        return fp8_block.dequantize_fp8_block(read("weight", r0, r1), scale, block, dtype)

    return Layout("fp8-block", "weight_scale_inv", ("weight",), (), block[0] * max(1, 512 // block[0]),
                  lambda shapes, read: shapes["weight"], dequantize)


# --------------------------------------------------------------------------- compressed-tensors


def _int_shape(shapes: dict, read: RowReader) -> tuple[int, ...]:
    shape = tuple(int(v) for v in read("weight_shape", None, None).tolist())
    if len(shape) != 2:
        raise ValueError(f"packed weight of shape {shape}: only 2-D pack-quantized weights are supported")
    return shape


def _int_dequantize(read: RowReader, r0: int, r1: int, params: dict, dtype: torch.dtype) -> Tensor:
    rows, cols = params["shape"]
    bits = params["num_bits"]
    scale = read("weight_scale", None, None)
    scale = scale if scale.numel() == 1 else scale[r0:r1]
    zp = params.get("zero_point")  # unpacked once per tensor (small: one entry per group)
    if zp is not None and zp.numel() != 1:
        zp = zp[r0:r1]
    return compressed_int4.dequantize_packed(read("weight_packed", r0, r1), scale, cols, bits, zp, dtype)


INT_PACKED = Layout("pack-quantized", "weight_packed", ("weight_scale", "weight_shape"), ("weight_zero_point",),
                    512, _int_shape, _int_dequantize)


def _nvfp4_ct_dequantize(read: RowReader, r0: int, r1: int, params: dict, dtype: torch.dtype) -> Tensor:
    tensors = {"weight_packed": read("weight_packed", r0, r1), "weight_scale": read("weight_scale", r0, r1),
               "weight_global_scale": read("weight_global_scale", None, None)}
    return ctm.dequantize(tensors, "NVFP4", dtype)


NVFP4_CT = Layout("nvfp4-pack-quantized", "weight_packed", ("weight_scale", "weight_global_scale"), (), 512,
                  lambda shapes, read: (shapes["weight_packed"][0], shapes["weight_packed"][1] * 2),
                  _nvfp4_ct_dequantize)


# --------------------------------------------------------------------------- Model Optimizer


def _modelopt_dequantize(handler_name: str):
    handler = FORMAT_HANDLERS[handler_name]

    def dequantize(read: RowReader, r0: int, r1: int, params: dict, dtype: torch.dtype) -> Tensor:
        per_tensor = {leaf: read(leaf, None, None) for leaf in handler.per_tensor if leaf != "input_scale"}
        rows = {leaf: read(leaf, r0, r1) for leaf in ("weight", "weight_scale") if leaf not in per_tensor}
        return handler.dequantize({**rows, **per_tensor}, dtype)

    return dequantize


MODELOPT_NVFP4 = Layout("modelopt-nvfp4", "weight_scale_2", ("weight", "weight_scale"), (), 512,
                        lambda shapes, read: (shapes["weight"][0], shapes["weight"][1] * 2),
                        _modelopt_dequantize("nvfp4"))
MODELOPT_FP8 = Layout("modelopt-fp8", "weight_scale", ("weight",), (), 512,
                      lambda shapes, read: shapes["weight"], _modelopt_dequantize("fp8"))
