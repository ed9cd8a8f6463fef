"""FP8 E4M3 beyond per-tensor: per-channel weights with per-token dynamic activations
(`fp8_pc_pt`) and 128x128 block-wise weights (`fp8_pb_wo`), as pure CPU functions.

Read from Model Optimizer 0.47 `modelopt/torch/export/quant_utils.py` (`to_quantized_weight`,
`get_scaling_factor`) and `quantization/qtensor/fp8_tensor.py` (`FP8QTensor.quantize`):

- per channel (`FP8_PER_CHANNEL_PER_TOKEN`): `weight_scale = row_amax / 448` float32 `[out]`;
  `q = e4m3(w / weight_scale[:, None])`. The scale has a dimension, so torch computes the
  quotient in float32 and casts it once (unlike per-tensor FP8's 0-dim scale, see `fp8.py`).
  Activations are quantized per token at run time: no `input_scale` in the checkpoint.
- per block (`fp8_pb_wo`, weight-only): `weight_scale = block_amax / 448` float32 with the
  shape Model Optimizer writes, `[ceil(out/128), 1, ceil(in/128), 1]` (the block quantizer's
  amax layout); partial edge blocks are blocks of the zero-padded weight, as
  `reduce_block_padding` pads. `q = e4m3(w / scale)` elementwise over each block.

Divergences: a zero row/block gets scale 1/448 (Model Optimizer: 0, then NaN codes); quotients
are clamped to ±448 before the cast instead of relying on the cast's overflow; scales stay in
[smallest normal float32, largest with 448 s finite] (`scale_bounds.py`: a subnormal amax gave
scale 0 and NaN codes), so only fp32 extremes differ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantship.formats.scale_bounds import bounded_scale

FP8_MAX = 448.0
PB_BLOCK = 128


def _scale(amax: Tensor) -> Tensor:
    """`amax / 448` per row / tile / token, bounded (`scale_bounds.bounded_scale`)."""
    return bounded_scale(amax, FP8_MAX)


def _cast(quotient: Tensor) -> Tensor:
    return quotient.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


# --------------------------------------------------------------------------- per channel


def quantize_fp8_per_channel(w: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Weight `[..., out, in]` -> (e4m3 weight, float32 scales `[..., out]`)."""
    if scale is None:
        amax = w.abs().amax(-1)
        if not torch.isfinite(amax).all():
            raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or inf")
        scale = _scale(amax)
    return _cast(w.float() / scale.float()[..., None]), scale.float()


def dequantize_fp8_per_channel(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)


def fake_quantize_fp8_per_token(x: Tensor) -> Tensor:
    """Dynamic per-token activation quantization (scale = token amax / 448), in `x.dtype`."""
    scale = _scale(x.detach().abs().amax(-1, keepdim=True))
    return (_cast(x.float() / scale).float() * scale).to(x.dtype)


# --------------------------------------------------------------------------- 128x128 blocks


def _padded(w: Tensor, block: int) -> Tensor:
    rows, cols = w.shape[-2:]
    pad_r, pad_c = -rows % block, -cols % block
    if pad_r or pad_c:
        w = torch.nn.functional.pad(w, (0, pad_c, 0, pad_r))
    return w


def block_amax(w: Tensor, block: int = PB_BLOCK) -> Tensor:
    """float32 amax per `block x block` tile of the zero-padded weight, `[..., R, 1, C, 1]`."""
    p = _padded(w, block)
    r, c = p.shape[-2] // block, p.shape[-1] // block
    tiles = p.abs().reshape(*p.shape[:-2], r, block, c, block)
    return tiles.amax(dim=(-3, -1), keepdim=True).float()


def _expand(scale: Tensor, shape: torch.Size, block: int) -> Tensor:
    """`[..., R, 1, C, 1]` block scales -> per element `[..., rows, cols]` (cropped)."""
    r, c = scale.shape[-4], scale.shape[-2]
    full = scale.expand(*scale.shape[:-4], r, block, c, block).reshape(*scale.shape[:-4], r * block, c * block)
    return full[..., : shape[-2], : shape[-1]]


def quantize_fp8_blocks(w: Tensor, block: int = PB_BLOCK, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Weight `[..., out, in]` -> (e4m3 weight, float32 scales `[..., ceil(out/b), 1, ceil(in/b), 1]`)."""
    if w.ndim < 2:
        raise ValueError(f"block FP8 expects [out, in] or [E, out, in], got shape {tuple(w.shape)}")
    if scale is None:
        amax = block_amax(w, block)
        if not torch.isfinite(amax).all():
            raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or inf")
        scale = _scale(amax)
    return _cast(w.float() / _expand(scale.float(), w.shape, block)), scale.float()


def dequantize_fp8_blocks(q: Tensor, scale: Tensor, block: int = PB_BLOCK,
                          dtype: torch.dtype = torch.bfloat16) -> Tensor:
    return (q.float() * _expand(scale.float(), q.shape, block)).to(dtype)
