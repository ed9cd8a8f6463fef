"""Handlers (see `handlers.py`) for the integer formats: INT4 AWQ (W4A16, W4A8) and INT8
(SmoothQuant W8A8, weight-only W8A16).

Tensor names per module, as Model Optimizer 0.47 writes them (`export/unified_export_hf.py`
`_export_quantized_weight`, `export/quant_utils.py`): `weight` (INT4 uint8 `[out/2, in]`, INT8
int8 `[out, in]`), `weight_scale` (INT4 float32 `[out, in/128]`, INT8 float32 `[out]`), W4A8's
`weight_scale_2` and `input_scale` (0-dim float32, FP8 per-tensor: `amax / 448`), INT8 SQ's
`input_scale` (`amax / 127`), and `pre_quant_scale` (`[in]`, the model dtype) where AWQ /
SmoothQuant left one on the module (`quant_utils.py` `_KV_CACHE_REPLACEMENTS` renames
`input_quantizer._pre_quant_scale` to it).

`scales()` also returns an `input_scale` for weight-only formats: the pipeline's fake-quant
path asks every target for one; these handlers neither export nor use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantship.errors import QuantshipError
from quantship.formats import fp8, int4, int8
from quantship.formats.exact import div_const

PQS = "pre_quant_scale"


def with_pre_quant_scale(out: dict[str, Tensor], scales: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add the AWQ / SmoothQuant `pre_quant_scale` when the module keeps one (not folded away)."""
    if scales.get(PQS) is not None:
        out[PQS] = scales[PQS]
    return out


def select_rows_default(suffix: str, value: Tensor, rows: Tensor) -> Tensor:
    """Row-aligned tensors take the slice's rows; per-input vectors (pre_quant_scale) are whole."""
    if suffix == PQS:
        return value
    return value.index_select(0, rows.to(value.device))


def pair_rows(rows: Tensor) -> Tensor:
    """Packed-row indices of output rows that come in aligned pairs (2k, 2k+1)."""
    even, odd = rows[0::2], rows[1::2]
    if rows.numel() % 2 or (even % 2).any() or not torch.equal(odd, even + 1):
        raise QuantshipError(
            "an INT4 weight packs pairs of output rows, but this checkpoint tensor takes an unaligned "
            "slice of a fused weight; keep the module in high precision with --exclude"
        )
    return even // 2


@dataclass(frozen=True)
class Int4AWQHandler:
    """W4A16 AWQ: packed int4 weights in groups of 128, no activation quantization."""

    name: str = "int4_awq"
    block_size: int | None = int4.DEFAULT_GROUP
    per_tensor: frozenset[str] = frozenset()

    def scales(self, weight_amax: Tensor, input_amax: Tensor) -> dict[str, Tensor]:
        return {"input_scale": torch.as_tensor(input_amax).float()}  # not exported (module docstring)

    def block_amax(self, weight: Tensor) -> Tensor:
        return int4.group_amax(weight, self.block_size)

    def block_sum(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[:-1], -1, self.block_size).sum(-1)

    def _int4(self, weight: Tensor, block_amax: Tensor | None) -> dict[str, Tensor]:
        amax = self.block_amax(weight) if block_amax is None else block_amax
        packed, scale = int4.quantize_int4(weight, self.block_size, int4.scale_from_amax(amax))
        return {"weight": packed, "weight_scale": scale}

    def quantize(self, weight: Tensor, scales: dict[str, Tensor], block_amax: Tensor | None = None
                 ) -> dict[str, Tensor]:
        if "weight" in scales:  # chosen by a weight algorithm (GPTQ): returned as they are
            return with_pre_quant_scale({"weight": scales["weight"], "weight_scale": scales["weight_scale"]}, scales)
        return with_pre_quant_scale(self._int4(weight, block_amax), scales)

    def dequantize(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return int4.dequantize_int4(tensors["weight"], tensors["weight_scale"], self.block_size, dtype)

    def fake_quant_input(self, x: Tensor, input_scale: Tensor) -> Tensor:
        return x

    def select_rows(self, suffix: str, value: Tensor, rows: Tensor) -> Tensor:
        if suffix == "weight":
            return value.index_select(0, pair_rows(rows.to(value.device)))
        return select_rows_default(suffix, value, rows)


@dataclass(frozen=True)
class W4A8AWQHandler(Int4AWQHandler):
    """W4A8 AWQ: the INT4 weight above, then FP8 per tensor (`weight_scale_2 = amax / 448`
    over the INT4-dequantized weight, whose max equals the weight's max), FP8 activations."""

    name: str = "w4a8_awq"
    per_tensor: frozenset[str] = frozenset({"weight_scale_2", "input_scale"})

    def scales(self, weight_amax: Tensor, input_amax: Tensor) -> dict[str, Tensor]:
        return {"weight_scale_2": fp8.scale_from_amax(weight_amax),
                "input_scale": div_const(input_amax, fp8.FP8_MAX)}

    def quantize(self, weight: Tensor, scales: dict[str, Tensor], block_amax: Tensor | None = None
                 ) -> dict[str, Tensor]:
        out = self._int4(weight, block_amax)
        out["weight_scale_2"] = scales["weight_scale_2"].float().expand(weight.shape[:-2]).clone()
        out["input_scale"] = scales["input_scale"].float()
        return with_pre_quant_scale(out, scales)

    def dequantize(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        # Model Optimizer's SequentialQuantizer: INT4 fake quant, then FP8 per tensor on top.
        w = super().dequantize(tensors, torch.float32)
        s2 = tensors["weight_scale_2"].float()
        s2 = s2.reshape(*s2.shape, 1, 1) if s2.ndim else s2
        return ((w / s2).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(torch.float8_e4m3fn).float() * s2).to(dtype)

    def fake_quant_input(self, x: Tensor, input_scale: Tensor) -> Tensor:
        return fp8.fake_quantize_fp8(x, input_scale)


@dataclass(frozen=True)
class Int8Handler:
    """INT8 per-channel weights; `static_input`: W8A8 SmoothQuant with a static per-tensor
    INT8 activation scale, else weight-only W8A16."""

    name: str = "int8_sq"
    static_input: bool = True
    block_size: int | None = None
    per_tensor: frozenset[str] = frozenset({"input_scale"})

    def scales(self, weight_amax: Tensor, input_amax: Tensor) -> dict[str, Tensor]:
        return {"input_scale": div_const(input_amax, int8.INT8_MAX)}

    def quantize(self, weight: Tensor, scales: dict[str, Tensor]) -> dict[str, Tensor]:
        q, scale = int8.quantize_int8_per_channel(weight)
        out = {"weight": q, "weight_scale": scale}
        if self.static_input:
            out["input_scale"] = scales["input_scale"].float()
        return with_pre_quant_scale(out, scales)

    def dequantize(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return int8.dequantize_int8_per_channel(tensors["weight"], tensors["weight_scale"], dtype)

    def fake_quant_input(self, x: Tensor, input_scale: Tensor) -> Tensor:
        return int8.fake_quantize_int8_activation(x, input_scale) if self.static_input else x

    def select_rows(self, suffix: str, value: Tensor, rows: Tensor) -> Tensor:
        return select_rows_default(suffix, value, rows)


INT_HANDLERS = (Int4AWQHandler(), W4A8AWQHandler(), Int8Handler(),
                Int8Handler(name="int8_wo", static_input=False, per_tensor=frozenset()))
