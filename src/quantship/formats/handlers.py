"""One dispatch table from a recipe's weight format to what it means for one weight tensor.

Each handler turns (weight, weight amax, input amax) into the exact tensors a Model Optimizer
unified checkpoint stores under a module's name, and knows the matching fake-quant for
evaluation. Weights are 2-D `[out, in]` or fused experts `[E, out, in]`; for the latter the
amaxes and per-tensor scales are vectors with one entry per expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from quantship.formats import fp8, nvfp4
from quantship.formats.exact import div_const


def _precomputed(scales: dict[str, Tensor], keys: tuple[str, ...], per_tensor: frozenset[str]) -> dict[str, Tensor]:
    """Tensors a weight algorithm (GPTQ) already chose, passed in `scales` under their checkpoint
    names ("weight", block scales): returned as they are, since requantizing the compensated
    weight could pick other codes than the ones the algorithm compensated for."""
    return {k: scales[k].float() if k in per_tensor else scales[k] for k in keys}


class FormatHandler(Protocol):
    name: str
    block_size: int | None
    per_tensor: frozenset[str]

    def scales(self, weight_amax: Tensor, input_amax: Tensor) -> dict[str, Tensor]: ...
    def quantize(self, weight: Tensor, scales: dict[str, Tensor]) -> dict[str, Tensor]: ...
    def dequantize(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor: ...
    def fake_quant_input(self, x: Tensor, input_scale: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class NVFP4Handler:
    """W4A4 NVFP4: packed uint8 weight, e4m3 block scales, fp32 global and input scales."""

    name: str = "nvfp4"
    block_size: int | None = nvfp4.BLOCK_SIZE
    # Tensors holding one value per weight tensor (per expert when fused); the rest are rows.
    per_tensor: frozenset[str] = frozenset({"weight_scale_2", "input_scale"})

    def scales(self, weight_amax: Tensor, input_amax: Tensor) -> dict[str, Tensor]:
        return {
            "weight_scale_2": nvfp4.global_scale_from_amax(weight_amax),
            "input_scale": nvfp4.input_scale_from_amax(input_amax),
        }

    def quantize(self, weight: Tensor, scales: dict[str, Tensor]) -> dict[str, Tensor]:
        if "weight" in scales:
            return _precomputed(scales, ("weight", "weight_scale", "weight_scale_2", "input_scale"), self.per_tensor)
        q = nvfp4.quantize_nvfp4(weight, scales["weight_scale_2"])
        return {
            "weight": q.packed,
            "weight_scale": q.block_scale,
            "weight_scale_2": q.scale_2,
            "input_scale": scales["input_scale"].float(),
        }

    def dequantize(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return nvfp4.dequantize_nvfp4(
            tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"], dtype=dtype
        )

    def fake_quant_input(self, x: Tensor, input_scale: Tensor) -> Tensor:
        return nvfp4.fake_quantize_nvfp4_activation(x, input_scale)

    def fake_quant_input_rows(self, x: Tensor, input_scales: Tensor) -> Tensor:
        """One scale per row (optional handler method: fused experts' rows in one call)."""
        return nvfp4.fake_quantize_nvfp4_activation_rows(x, input_scales)


@dataclass(frozen=True)
class FP8Handler:
    """W8A8 per-tensor FP8 E4M3: float8 weight, fp32 weight and input scales."""

    name: str = "fp8"
    block_size: int | None = None
    per_tensor: frozenset[str] = frozenset({"weight_scale", "input_scale"})

    def scales(self, weight_amax: Tensor, input_amax: Tensor) -> dict[str, Tensor]:
        return {
            "weight_scale": fp8.scale_from_amax(weight_amax),
            "input_scale": div_const(input_amax, fp8.FP8_MAX),
        }

    def quantize(self, weight: Tensor, scales: dict[str, Tensor]) -> dict[str, Tensor]:
        if "weight" in scales:
            return _precomputed(scales, ("weight", "weight_scale", "input_scale"), self.per_tensor)
        scale = scales["weight_scale"]
        if weight.dim() == 3:  # fused experts: one per-tensor scale per expert
            q = fp8.quantize_fp8_experts(weight, scale)
        else:
            q, scale = fp8.quantize_fp8(weight, scale)
        return {"weight": q, "weight_scale": scale.float(), "input_scale": scales["input_scale"].float()}

    def dequantize(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        q, scale = tensors["weight"], tensors["weight_scale"]
        if q.dim() == 3:
            return fp8.dequantize_fp8_experts(q, scale, dtype)
        return fp8.dequantize_fp8(q, scale, dtype)

    def fake_quant_input(self, x: Tensor, input_scale: Tensor) -> Tensor:
        return fp8.fake_quantize_fp8(x, input_scale)

    def fake_quant_input_rows(self, x: Tensor, input_scales: Tensor) -> Tensor:
        return fp8.fake_quantize_fp8_rows(x, input_scales)


FORMAT_HANDLERS: dict[str, FormatHandler] = {h.name: h for h in (NVFP4Handler(), FP8Handler())}


def _register_more_formats() -> None:
    """The rest of hf_ptq's formats (own modules: `handlers_int.py`, `handlers_float.py`), and an
    MSE weight-scale-searched variant `<name>+mse` of every block format. Optional hook a handler
    may define: `select_rows(suffix, value, rows)`, how a tensor is cut when a fused weight
    splits into checkpoint tensors (default: `index_select(0, rows)`)."""
    from quantship.algorithms.mse_scale_search import with_mse
    from quantship.formats.handlers_float import FLOAT_HANDLERS, NVFP4AWQHandler
    from quantship.formats.handlers_int import INT_HANDLERS

    for h in (*INT_HANDLERS, *FLOAT_HANDLERS):
        FORMAT_HANDLERS[h.name] = h
    # nvfp4 with searched block scales: nvfp4_awq's numerics without a pre_quant_scale.
    for h in (NVFP4AWQHandler(name="nvfp4"), *INT_HANDLERS, *FLOAT_HANDLERS):
        if hasattr(h, "block_amax") and h.name != "nvfp4_four_over_six":  # 4/6 is a search itself
            FORMAT_HANDLERS[f"{h.name}+mse"] = with_mse(h)


_register_more_formats()
