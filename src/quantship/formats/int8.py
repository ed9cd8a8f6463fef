"""INT8: per-channel weights (W8A8 SmoothQuant, W8A16) and per-tensor static activations.

Conventions, read from Model Optimizer 0.47 `modelopt/torch/export/quant_utils.py` (consumer:
TensorRT-LLM's W8A8_SQ_PER_CHANNEL / W8A16 loaders):

- `weight_scale = row_amax / 127` float32 `[out]` (`get_scaling_factor`, maxbound 127);
- codes `round(w / weight_scale[:, None]).clamp(-128, 127)` int8, the division in float32
  (`to_quantized_weight`, `QUANTIZATION_INT8_SQ` / `INT8_WO`);
- `input_scale = input_amax / 127` float32 0-dim (activations per tensor, static).

Divergences: an all-zero row gets scale 1/127 instead of Model Optimizer's assertion failure;
scales stay in [smallest normal float32, largest with 127 s finite] (`scale_bounds.py`: at
float32's max, 127 * (amax / 127) rounded past it to inf).
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantship.formats.scale_bounds import bounded_scale

INT8_MAX = 127.0


def scale_from_amax(amax: Tensor) -> Tensor:
    """`amax / 127` float32, elementwise; amax 0 gets the scale of amax 1; bounded at both
    ends of float32 (`scale_bounds.bounded_scale`)."""
    return bounded_scale(amax, INT8_MAX)


def quantize_int8_per_channel(w: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Weight `[..., out, in]` -> (int8 codes, float32 scales `[..., out]`)."""
    if w.ndim < 2:
        raise ValueError(f"per-channel int8 expects [out, in] or [E, out, in], got shape {tuple(w.shape)}")
    if scale is None:
        amax = w.abs().amax(-1)
        if not torch.isfinite(amax).all():
            raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or inf")
        scale = scale_from_amax(amax)
    q = (w.float() / scale.float()[..., None]).round().clamp(-128, 127).to(torch.int8)
    return q, scale.float()


def dequantize_int8_per_channel(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)


def fake_quantize_int8_activation(x: Tensor, input_scale: Tensor) -> Tensor:
    """Static per-tensor activation int8 (symmetric, narrow range ±127 as engines quantize
    activations), dequantized back to `x.dtype`."""
    s = torch.as_tensor(input_scale, device=x.device).float().reshape(())
    return ((x.float() / s).round().clamp(-INT8_MAX, INT8_MAX) * s).to(x.dtype)
