"""NVFP4 "four over six": each block of 16 is scaled so its maximum lands on 4 or on 6,
whichever reconstructs the block with the smaller squared error, under an FP8 normaliser of 256.

Why: E2M1's top step (4 -> 6) is coarse; for blocks whose large values sit between 4 and 6,
mapping the maximum to 4 keeps them on the finer 3-4 grid. The normaliser 256 (instead of 448)
leaves e4m3 headroom for the 1.5x larger block scales of M=4 blocks (256 * 1.5 = 384 <= 448).

Model Optimizer 0.47 (`NVFP4_FOUR_OVER_SIX_CFG`: MSE calibration over per-block amax
multipliers {1.0, 1.5}, `numeric_utils.fp8_max_for_normalization` = 256) exports it as a plain
NVFP4 checkpoint (`quant_algo` "NVFP4", through `NVFP4QTensor.get_weights_scaling_factor_from_quantizer`'s
static path): `weight_scale_2 = global_amax / (6 * 256)` and block scales
`e4m3((chosen_amax / 6) * 256 / (global_amax / 6))`; so does this module (`fp4_blocks.py`).
The choice itself runs on Triton there; here it is the same rule in plain torch: per block,
the candidate with the smaller sum of squared errors in float32, ties to M=6 (the first candidate);
where those sums overflow (weights near float32's max) they are taken on the weight scaled by a
power of two, which leaves the comparison unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantship.formats import fp4_blocks
from quantship.formats.scale_bounds import SMALLEST_NORMAL

BLOCK = 16
NORMALISER = 256.0
# Per-block amax multipliers: 1.0 maps the block max to 6, 1.5 maps it to 4.
MULTIPLIERS = (1.0, 1.5)


def global_amax_of(w: Tensor) -> Tensor:
    return w.abs().amax(dim=(-2, -1)).float()


def choose_block_amax(w: Tensor, global_amax: Tensor | None = None) -> Tensor:
    """Per-block amax after the 4-or-6 choice, float32 `[..., out, in / 16]`."""
    g = global_amax_of(w) if global_amax is None else torch.as_tensor(global_amax).float()
    base = fp4_blocks.block_amax(w, BLOCK)
    x = w.float().reshape(*w.shape[:-1], -1, BLOCK)
    amaxes, diffs = [], []
    for m in MULTIPLIERS:
        amax = base * m
        packed, bs, s2 = fp4_blocks.quantize_static(w, amax, g, BLOCK, NORMALISER)
        amaxes.append(amax)
        diffs.append(x - fp4_blocks.decode(packed, bs, s2, BLOCK, torch.float32).reshape(x.shape))
    errs = [d.pow(2).sum(-1) for d in diffs]
    overflow = torch.stack(errs).isinf().any(0)
    if overflow.any():
        # Squares of values near float32's max overflow (every candidate inf: a false tie). Scaled
        # by 2**-exponent(global amax), exact for powers of two, the comparison is the same one.
        _, exp = torch.frexp(g.clamp_min(SMALLEST_NORMAL))
        unit = torch.exp2(-exp.float())
        unit = unit.reshape(*unit.shape, 1, 1, 1) if unit.ndim else unit
        errs = [torch.where(overflow, (d * unit).pow(2).sum(-1), e) for d, e in zip(diffs, errs, strict=True)]
    best_err, best = errs[0], amaxes[0]
    for err, amax in zip(errs[1:], amaxes[1:], strict=True):  # ties stay with the first (M=6)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, amax, best)
    return best


def quantize_four_over_six(w: Tensor, global_amax: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(packed uint8, e4m3 block scales, `weight_scale_2` per matrix)."""
    if w.ndim not in (2, 3):
        raise ValueError(f"expects [out, in] or [E, out, in], got shape {tuple(w.shape)}")
    g = global_amax_of(w) if global_amax is None else torch.as_tensor(global_amax).float()
    if not torch.isfinite(g).all():
        raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or inf")
    return fp4_blocks.quantize_static(w, choose_block_amax(w, g), g, BLOCK, NORMALISER)
