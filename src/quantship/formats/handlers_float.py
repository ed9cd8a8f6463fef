"""Handlers (see `handlers.py`) for the floating-point formats beyond per-tensor FP8 and plain
NVFP4: per-channel and block FP8, MXFP8 / MXFP4, NVFP4 with AWQ, W4A8 NVFP4-FP8, NVFP4 4-over-6.

Tensor names per module as Model Optimizer 0.47 writes them (`export/unified_export_hf.py`
`_export_quantized_weight`): `weight`, `weight_scale` (per-channel FP8 float32 `[out]`; block
FP8 float32 `[out/128, 1, in/128, 1]`; MX uint8 biased exponents `[out, in/32]`; NVFP4 family
e4m3 `[out, in/block]`), `weight_scale_2` and `input_scale` (0-dim float32) for the NVFP4
family, `pre_quant_scale` for AWQ. Dynamic activations (per token, MX blocks) store no
`input_scale`; `scales()` still returns one for the pipeline's fake-quant path, never exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantship.errors import QuantshipError
from quantship.formats import fp4_blocks, fp8, fp8_variants, mxfp, nvfp4, nvfp4_four_over_six
from quantship.formats.exact import div_const
from quantship.formats.handlers_int import select_rows_default, with_pre_quant_scale


def _unused_input_scale(input_amax: Tensor) -> dict[str, Tensor]:
    return {"input_scale": torch.as_tensor(input_amax).float()}


def _blocks_sum(x: Tensor, block: int) -> Tensor:
    return x.reshape(*x.shape[:-1], -1, block).sum(-1)


# --------------------------------------------------------------------------- FP8 variants


@dataclass(frozen=True)
class FP8PerChannelHandler:
    """FP8_PER_CHANNEL_PER_TOKEN: e4m3 weights with one scale per output row; activations
    quantized per token at run time (no input_scale)."""

    name: str = "fp8_pc_pt"
    block_size: int | None = None
    per_tensor: frozenset[str] = frozenset()

    def scales(self, weight_amax: Tensor, input_amax: Tensor) -> dict[str, Tensor]:
        return _unused_input_scale(input_amax)

    def quantize(self, weight: Tensor, scales: dict[str, Tensor]) -> dict[str, Tensor]:
        q, scale = fp8_variants.quantize_fp8_per_channel(weight)
        return {"weight": q, "weight_scale": scale}

    def dequantize(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return fp8_variants.dequantize_fp8_per_channel(tensors["weight"], tensors["weight_scale"], dtype)

    def fake_quant_input(self, x: Tensor, input_scale: Tensor) -> Tensor:
        return fp8_variants.fake_quantize_fp8_per_token(x)


@dataclass(frozen=True)
class FP8BlockHandler:
    """fp8_pb_wo: weight-only e4m3 with one scale per 128x128 tile (edge tiles zero-padded)."""

    name: str = "fp8_pb_wo"
    block_size: int | None = None  # partial edge tiles are allowed
    per_tensor: frozenset[str] = frozenset()
    tile: int = fp8_variants.PB_BLOCK

    def scales(self, weight_amax: Tensor, input_amax: Tensor) -> dict[str, Tensor]:
        return _unused_input_scale(input_amax)

    def block_amax(self, weight: Tensor) -> Tensor:
        return fp8_variants.block_amax(weight, self.tile)

    def block_sum(self, x: Tensor) -> Tensor:
        p = fp8_variants._padded(x, self.tile)
        r, c = p.shape[-2] // self.tile, p.shape[-1] // self.tile
        return p.reshape(*p.shape[:-2], r, self.tile, c, self.tile).sum(dim=(-3, -1), keepdim=True)

    def quantize(self, weight: Tensor, scales: dict[str, Tensor], block_amax: Tensor | None = None
                 ) -> dict[str, Tensor]:
        scale = None if block_amax is None else fp8_variants._scale(block_amax)
        q, scale = fp8_variants.quantize_fp8_blocks(weight, self.tile, scale)
        return {"weight": q, "weight_scale": scale}

    def dequantize(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return fp8_variants.dequantize_fp8_blocks(tensors["weight"], tensors["weight_scale"], self.tile, dtype)

    def fake_quant_input(self, x: Tensor, input_scale: Tensor) -> Tensor:
        return x

    def select_rows(self, suffix: str, value: Tensor, rows: Tensor) -> Tensor:
        if suffix != "weight_scale":
            return select_rows_default(suffix, value, rows)
        first, n = int(rows[0]), rows.numel()
        end_tile = -(-(first + n) // self.tile)
        contiguous = torch.equal(rows.cpu(), torch.arange(first, first + n))
        if not contiguous or first % self.tile or ((first + n) % self.tile and end_tile != value.shape[0]):
            raise QuantshipError(
                "fp8_pb_wo scales whole 128-row tiles, but this checkpoint tensor takes rows that split a "
                "tile of a fused weight; keep the module in high precision with --exclude"
            )
        return value[first // self.tile : end_tile]


# --------------------------------------------------------------------------- MX


@dataclass(frozen=True)
class MXHandler:
    """MXFP8 / MXFP4: E8M0 shared exponents per 32 inputs; activations MX-quantized at run time."""

    name: str = "mxfp8"
    block_size: int | None = mxfp.MX_BLOCK
    per_tensor: frozenset[str] = frozenset()

    @property
    def _fp4(self) -> bool:
        return self.name == "mxfp4"

    def scales(self, weight_amax: Tensor, input_amax: Tensor) -> dict[str, Tensor]:
        return _unused_input_scale(input_amax)

    def block_amax(self, weight: Tensor) -> Tensor:
        return fp4_blocks.block_amax(weight, mxfp.MX_BLOCK)

    def block_sum(self, x: Tensor) -> Tensor:
        return _blocks_sum(x, mxfp.MX_BLOCK)

    def quantize(self, weight: Tensor, scales: dict[str, Tensor], block_amax: Tensor | None = None
                 ) -> dict[str, Tensor]:
        q, s = (mxfp.quantize_mxfp4 if self._fp4 else mxfp.quantize_mxfp8)(weight, block_amax)
        return {"weight": q, "weight_scale": s}

    def dequantize(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        fn = mxfp.dequantize_mxfp4 if self._fp4 else mxfp.dequantize_mxfp8
        return fn(tensors["weight"], tensors["weight_scale"], dtype)

    def fake_quant_input(self, x: Tensor, input_scale: Tensor) -> Tensor:
        return mxfp.fake_quantize_mxfp4(x) if self._fp4 else mxfp.fake_quantize_mxfp8(x)


# --------------------------------------------------------------------------- NVFP4 family


@dataclass(frozen=True)
class NVFP4AWQHandler:
    """NVFP4 numerics (block 16, `nvfp4.py`, bit-identical to the `nvfp4` handler) plus the
    module's AWQ `pre_quant_scale`. With `block_amax` given (scale search) the block scales
    follow Model Optimizer's static-quantizer export formula (`fp4_blocks.quantize_static`)."""

    name: str = "nvfp4_awq"
    block_size: int | None = nvfp4.BLOCK_SIZE
    per_tensor: frozenset[str] = frozenset({"weight_scale_2", "input_scale"})

    def scales(self, weight_amax: Tensor, input_amax: Tensor) -> dict[str, Tensor]:
        return {"weight_scale_2": nvfp4.global_scale_from_amax(weight_amax),
                "input_scale": nvfp4.input_scale_from_amax(input_amax),
                "global_amax": torch.as_tensor(weight_amax).float()}  # for static block scales

    def block_amax(self, weight: Tensor) -> Tensor:
        return fp4_blocks.block_amax(weight, nvfp4.BLOCK_SIZE)

    def block_sum(self, x: Tensor) -> Tensor:
        return _blocks_sum(x, nvfp4.BLOCK_SIZE)

    def quantize(self, weight: Tensor, scales: dict[str, Tensor], block_amax: Tensor | None = None
                 ) -> dict[str, Tensor]:
        if block_amax is None:
            q = nvfp4.quantize_nvfp4(weight, scales["weight_scale_2"])
            packed, bs, s2 = q.packed, q.block_scale, q.scale_2
        else:
            packed, bs, s2 = fp4_blocks.quantize_static(weight, block_amax, scales["global_amax"],
                                                        nvfp4.BLOCK_SIZE, nvfp4.E4M3_MAX)
        out = {"weight": packed, "weight_scale": bs, "weight_scale_2": s2,
               "input_scale": scales["input_scale"].float()}
        return with_pre_quant_scale(out, scales)

    def dequantize(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return nvfp4.dequantize_nvfp4(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"], dtype)

    def fake_quant_input(self, x: Tensor, input_scale: Tensor) -> Tensor:
        return nvfp4.fake_quantize_nvfp4_activation(x, input_scale)

    def select_rows(self, suffix: str, value: Tensor, rows: Tensor) -> Tensor:
        return select_rows_default(suffix, value, rows)


@dataclass(frozen=True)
class W4A8NVFP4Handler(NVFP4AWQHandler):
    """W4A8_NVFP4_FP8: FP4 weights in blocks of 32 with `weight_scale_2 = amax / 448` (block
    scales up to 448/6), static FP8 per-tensor activations (`input_scale = amax / 448`)."""

    name: str = "w4a8_nvfp4_fp8"
    block_size: int | None = 32

    def scales(self, weight_amax: Tensor, input_amax: Tensor) -> dict[str, Tensor]:
        return {"weight_scale_2": fp4_blocks.global_scale(weight_amax, fp8.FP8_MAX),
                "input_scale": div_const(input_amax, fp8.FP8_MAX)}

    def block_amax(self, weight: Tensor) -> Tensor:
        return fp4_blocks.block_amax(weight, self.block_size)

    def block_sum(self, x: Tensor) -> Tensor:
        return _blocks_sum(x, self.block_size)

    def quantize(self, weight: Tensor, scales: dict[str, Tensor], block_amax: Tensor | None = None
                 ) -> dict[str, Tensor]:
        s2 = scales["weight_scale_2"].float().expand(weight.shape[:-2]).clone()
        amax = self.block_amax(weight) if block_amax is None else block_amax
        bs = fp4_blocks.scales_from_amax(amax, s2)
        return {"weight": fp4_blocks.encode(weight, bs, s2, self.block_size), "weight_scale": bs,
                "weight_scale_2": s2, "input_scale": scales["input_scale"].float()}

    def dequantize(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return fp4_blocks.decode(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"],
                                 self.block_size, dtype)

    def fake_quant_input(self, x: Tensor, input_scale: Tensor) -> Tensor:
        return fp8.fake_quantize_fp8(x, input_scale)


@dataclass(frozen=True)
class FourOverSixHandler(NVFP4AWQHandler):
    """NVFP4 checkpoint whose block scales map each block's max to 4 or 6 (smaller MSE)."""

    name: str = "nvfp4_four_over_six"

    def scales(self, weight_amax: Tensor, input_amax: Tensor) -> dict[str, Tensor]:
        g = torch.as_tensor(weight_amax).float()
        return {"weight_scale_2": fp4_blocks.global_scale(g, nvfp4.E2M1_MAX * nvfp4_four_over_six.NORMALISER),
                "input_scale": nvfp4.input_scale_from_amax(input_amax), "global_amax": g}

    def quantize(self, weight: Tensor, scales: dict[str, Tensor], block_amax: Tensor | None = None
                 ) -> dict[str, Tensor]:
        packed, bs, s2 = nvfp4_four_over_six.quantize_four_over_six(weight, scales["global_amax"])
        return {"weight": packed, "weight_scale": bs, "weight_scale_2": s2,
                "input_scale": scales["input_scale"].float()}


FLOAT_HANDLERS = (FP8PerChannelHandler(), FP8BlockHandler(), MXHandler(), MXHandler(name="mxfp4"),
                  NVFP4AWQHandler(), W4A8NVFP4Handler(), FourOverSixHandler())
