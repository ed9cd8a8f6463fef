"""The NVFP4 family with a free block size and normaliser: E2M1 codes, e4m3 block scales, one
float32 global scale. `nvfp4.py` is the W4A4 member with block 16 and normaliser 448; this
module serves the other members Model Optimizer 0.47 exports through the same NVFP4 code
(`quantization/qtensor/nvfp4_tensor.py` `NVFP4QTensor`, `export/quant_utils.py`):

- W4A8_NVFP4_FP8: block 32, `weight_scale_2 = amax / 448` (`get_weight_scaling_factor_2`: "the
  kernel dequantizes weight to fp8, which is in range 448"), so block scales reach 448 / 6;
- scale search (MSE, 4-over-6): *static* block scales from a chosen per-block amax, as
  `NVFP4QTensor.get_weights_scaling_factor_from_quantizer` computes them for a static
  quantizer: `e4m3(clamp((block_amax / 6) * m / (global_amax / 6), 2**-9, 448))` with
  `weight_scale_2 = global_amax / (6 * m)`, `m` the FP8 normaliser (448, or 256 for 4-over-6).

Codes, packing and the order of float32 operations are `nvfp4.py`'s (division by the float32
product `block_scale * scale_2`), so every member is bit-identical to Model Optimizer's bytes.
Only at float32's ends do we differ: `scale_2` never goes below the smallest normal float32 (a
subnormal amax gave 0 and NaN codes), and a static block scale whose `amax * normaliser`
overflows float32 is computed as `(amax / scale_max) * normaliser` instead (was: inf, clamped
to 448 where 256 was meant).
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantship.formats.exact import div_const
from quantship.formats.nvfp4 import (
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MIN_SCALE,
    e2m1_values,
    pack_fp4,
    round_to_e2m1_codes,
    unpack_fp4,
)
from quantship.formats.scale_bounds import SMALLEST_NORMAL


def _blocks(x: Tensor, block: int) -> Tensor:
    if x.ndim == 0 or x.shape[-1] % block:
        raise ValueError(f"last dim must be a multiple of {block}, got shape {tuple(x.shape)}")
    return x.reshape(*x.shape[:-1], -1, block)


def block_amax(w: Tensor, block: int) -> Tensor:
    """float32 |w| max per block of `block` along the last dim."""
    return _blocks(w, block).abs().amax(-1).float()


def global_scale(amax: Tensor, divisor: float) -> Tensor:
    """`amax / divisor` float32 (NVFP4: 2688; W4A8_NVFP4_FP8: 448); amax 0 -> amax 1; never below
    the smallest normal float32 (as `nvfp4.global_scale_from_amax`)."""
    amax = torch.as_tensor(amax).float()
    return div_const(torch.where(amax == 0, torch.ones_like(amax), amax), divisor).clamp_min(SMALLEST_NORMAL)


def _per_matrix(s: Tensor, w: Tensor) -> Tensor:
    s = torch.as_tensor(s, device=w.device).float()
    return s if s.ndim == 0 else s.reshape(*s.shape, 1, 1)


def scales_from_amax(amax: Tensor, scale_2: Tensor) -> Tensor:
    """`e4m3(clamp(amax / (6 * scale_2), 2**-9, 448))` per block, zero blocks 1.0
    (`NVFP4QTensor.get_weights_scaling_factor`); `scale_2` 0-dim or one per matrix."""
    scale = amax.float() / (E2M1_MAX * _per_matrix(scale_2, amax))
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale.clamp(E4M3_MIN_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)


def dynamic_block_scales(w: Tensor, scale_2: Tensor, block: int) -> Tensor:
    """Block scales from the weight's own block amaxes."""
    return scales_from_amax(block_amax(w, block), scale_2)


def static_block_scales(per_block_amax: Tensor, global_amax: Tensor, normaliser: float) -> Tensor:
    """Block scales of a static quantizer from chosen per-block amaxes
    (`get_weights_scaling_factor_from_quantizer` + `_cast_per_block_scale_to_fp8`)."""
    scale = div_const(per_block_amax, E2M1_MAX)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale_max = div_const(torch.as_tensor(global_amax, device=scale.device), E2M1_MAX)
    if scale_max.ndim:
        scale_max = scale_max.reshape(*scale_max.shape, 1, 1)
    # Model Optimizer's order, (scale * normaliser) / scale_max, where that product is finite; past
    # float32's max (amax above ~2**122 for 256) the other order, equal wherever both are finite.
    product = scale * normaliser
    ratio = torch.where(torch.isinf(product), (scale / scale_max) * normaliser, product / scale_max)
    return ratio.clamp(E4M3_MIN_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)


def encode(w: Tensor, block_scale: Tensor, scale_2: Tensor, block: int) -> Tensor:
    """uint8 packed codes of `round(w / (float(block_scale) * scale_2))`."""
    denom = block_scale.float() * _per_matrix(scale_2, w)
    codes = round_to_e2m1_codes(_blocks(w.float(), block) / denom.unsqueeze(-1)).reshape(w.shape)
    return pack_fp4(codes)


def decode(packed: Tensor, block_scale: Tensor, scale_2: Tensor, block: int,
           dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """`value * (block_scale * scale_2)` in float32, then `dtype`."""
    codes = unpack_fp4(packed)
    step = block_scale.float() * _per_matrix(scale_2, codes)
    values = _blocks(e2m1_values(codes), block)
    return (values * step.unsqueeze(-1)).reshape(codes.shape).to(dtype)


def quantize_dynamic(w: Tensor, block: int, divisor: float, scale_2: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """(packed, e4m3 block scales, scale_2 per matrix) with block scales from the weight."""
    if scale_2 is None:
        amax = w.abs().amax(dim=(-2, -1)).float()
        if not torch.isfinite(amax).all():
            raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or inf")
        scale_2 = global_scale(amax, divisor)
    scale_2 = torch.as_tensor(scale_2).float().expand(w.shape[:-2]).clone()
    bs = dynamic_block_scales(w, scale_2, block)
    return encode(w, bs, scale_2, block), bs, scale_2


def quantize_static(w: Tensor, per_block_amax: Tensor, global_amax: Tensor, block: int,
                    normaliser: float) -> tuple[Tensor, Tensor, Tensor]:
    """(packed, e4m3 block scales, scale_2) from chosen per-block amaxes (scale search)."""
    g = torch.as_tensor(global_amax).float().expand(w.shape[:-2]).clone()
    # amax 0 -> 1; a subnormal one is raised until scale_2 is a normal float32 (else 0: NaN codes).
    g = torch.where(g == 0, torch.ones_like(g), g).clamp_min(SMALLEST_NORMAL * E2M1_MAX * normaliser)
    scale_2 = div_const(g, E2M1_MAX * normaliser)
    bs = static_block_scales(per_block_amax, g, normaliser)
    return encode(w, bs, scale_2, block), bs, scale_2


def fake_quantize_fp4_activation(x: Tensor, input_scale: Tensor, block: int = 16) -> Tensor:
    """Dynamic NVFP4 activation blocks under a static global `input_scale` (as `nvfp4.py`)."""
    s = torch.as_tensor(input_scale, device=x.device).float().reshape(())
    bs = dynamic_block_scales(x, s, block)
    return decode(encode(x, bs, s, block), bs, s, block, x.dtype)
