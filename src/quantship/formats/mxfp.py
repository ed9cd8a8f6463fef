"""MX formats (OCP microscaling): blocks of 32 along the input dimension sharing one E8M0
power-of-two scale, elements FP8 E4M3 (MXFP8) or FP4 E2M1 (MXFP4), as pure CPU functions.

Bit-for-bit what Model Optimizer 0.47 writes (`quantization/qtensor/mxfp8_tensor.py`
`MXFP8QTensor`, `mxfp4_tensor.py` `MXFP4QTensor`; export through `quant_utils.py`
`get_weight_scaling_factor` / `to_quantized_weight`), consumer: vLLM / TensorRT-LLM MX kernels.
The `weight_scale` is the *biased* exponent, uint8 `[out, in / 32]`: scale = 2**(byte - 127).

- MXFP8: `exponent = clamp(ceil(log2(block_amax / 448)), -127, 127)` (ceil: the block maximum
  never clips), zero blocks -127; `q = e4m3(clamp(w * 2**-exponent, -448, 448))`.
- MXFP4: `exponent = ceil(max(log2(block_amax / 6), -127))`; `x = w / 2**exponent` and codes by
  counting the E2M1 midpoints strictly below |x|, so a value exactly on a midpoint rounds
  *down* (not to even, unlike NVFP4), and the sign bit is set for zeros (Model Optimizer's
  `(2 - sign(x)) // 2`): +0 and -0 both become code 8 (-0.0). Packed two per byte, even
  element in the low nibble (as NVFP4).

Divergence, only at the top of the weight's dtype: a power-of-two scale can put a block maximum
just under the dtype's max on an element grid point above it (fp16 65504 -> 256 * 2**8 = 65536 =
inf; bf16 max -> 2**128). Such codes are moved one step towards zero, to the largest finite
representation (`scale_bounds.no_overflow`); Model Optimizer writes the code that dequantizes to
inf. Every code whose value is finite in the weight's dtype is Model Optimizer's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantship.formats.exact import div_const
from quantship.formats.nvfp4 import e2m1_values, pack_fp4, unpack_fp4
from quantship.formats.scale_bounds import no_overflow

MX_BLOCK = 32
E8M0_BIAS = 127
FP8_MAX = 448.0
E2M1_MAX = 6.0
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def _blocks(x: Tensor) -> Tensor:
    if x.shape[-1] % MX_BLOCK:
        raise ValueError(f"MX formats need a last dim divisible by {MX_BLOCK}, got shape {tuple(x.shape)}")
    return x.reshape(*x.shape[:-1], -1, MX_BLOCK)


def _amax(x: Tensor) -> Tensor:
    amax = _blocks(x).float().abs().amax(-1)
    if not torch.isfinite(amax).all():
        raise ValueError(f"tensor of shape {tuple(x.shape)} contains NaN or inf")
    return amax


def _per_element(scale: Tensor) -> Tensor:
    return scale.repeat_interleave(MX_BLOCK, dim=-1)


# --------------------------------------------------------------------------- MXFP8


def mxfp8_exponent(amax: Tensor) -> Tensor:
    """Unbiased E8M0 exponents (float32) for block amaxes, as `MXFP8QTensor._compute_e8m0_exponent`."""
    descale = div_const(amax, FP8_MAX)
    log2 = torch.where(descale > 0, torch.log2(descale), torch.full_like(descale, -127.0))
    return torch.ceil(log2).clamp(-127, 127)


def quantize_mxfp8(w: Tensor, amax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`[..., in]` -> (e4m3 `[..., in]`, biased uint8 exponents `[..., in / 32]`). `amax`
    overrides the per-block amax (scale search)."""
    amax = _amax(w) if amax is None else amax
    biased = (mxfp8_exponent(amax) + E8M0_BIAS).to(torch.uint8)
    factor = torch.exp2(E8M0_BIAS - biased.float())
    q = (_blocks(w) * factor.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    values = q.float() * torch.exp2(biased.float() - E8M0_BIAS).unsqueeze(-1)  # as dequantize_mxfp8
    bits = no_overflow(q.view(torch.uint8), values, w.dtype, lambda b: b - 1)  # e4m3: magnitude - 1 ulp
    return bits.view(torch.float8_e4m3fn).reshape(w.shape), biased


def dequantize_mxfp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    return (q.float() * _per_element(torch.exp2(scale.float() - E8M0_BIAS))).to(dtype)


def fake_quantize_mxfp8(x: Tensor) -> Tensor:
    q, s = quantize_mxfp8(x)
    return dequantize_mxfp8(q, s, x.dtype)


# --------------------------------------------------------------------------- MXFP4


def mxfp4_exponent(amax: Tensor) -> Tensor:
    """Unbiased exponents as `MXFP4QTensor.quantize`: `ceil(max(log2(amax / 6), -127))`."""
    return torch.ceil(torch.maximum(torch.log2(div_const(amax, E2M1_MAX)), torch.tensor(-127.0)))


def mxfp4_codes(x: Tensor) -> Tensor:
    """E2M1 codes of already-scaled values, Model Optimizer's MXFP4 rounding (module docstring)."""
    mag = x.abs()
    order = (mag.unsqueeze(-1) > _E2M1_BOUNDS.to(x.device)).sum(-1)
    sign_bit = (x <= 0) & ~(x.isnan())  # sign(x) is 0 for zeros: (2 - 0) // 2 = 1
    return (order + 8 * sign_bit).to(torch.uint8)


def quantize_mxfp4(w: Tensor, amax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`[..., in]` -> (packed uint8 `[..., in / 2]`, biased uint8 exponents `[..., in / 32]`)."""
    amax = _amax(w) if amax is None else amax
    exponent = mxfp4_exponent(amax)
    scaled = _blocks(w) / torch.exp2(exponent).unsqueeze(-1)
    codes = mxfp4_codes(scaled)
    values = e2m1_values(codes) * torch.exp2(exponent).unsqueeze(-1)  # as dequantize_mxfp4
    codes = no_overflow(codes, values, w.dtype, lambda c: c - 1)  # E2M1: next magnitude down
    return pack_fp4(codes.reshape(w.shape)), (exponent + E8M0_BIAS).to(torch.uint8)


def dequantize_mxfp4(packed: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    values = e2m1_values(unpack_fp4(packed))
    return (values * _per_element(torch.exp2(scale.float() - E8M0_BIAS))).to(dtype)


def fake_quantize_mxfp4(x: Tensor) -> Tensor:
    q, s = quantize_mxfp4(x)
    return dequantize_mxfp4(q, s, x.dtype)
