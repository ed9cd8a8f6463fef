"""INT4 weights in groups along the input dimension (W4A16 / W4A8 AWQ) as pure CPU functions.

Conventions, read from Model Optimizer 0.47 (consumer: TensorRT-LLM's W4A16_AWQ / W4A8_AWQ
loaders), `modelopt/torch/export/quant_utils.py`:

- `weight_scale = group_amax / 7` in float32, shape `[out, in / group]` (`get_scaling_factor`:
  `amax.float() / maxbound`, maxbound 7 for signed 4 bits);
- codes `round(w / scale)` (round half to even, `torch.round`) clamped to [-8, 7], the division
  in float32 (a bf16 weight divided by the float32 scale tensor promotes), as
  `pack_int4_in_uint8` computes them;
- packing pairs *output rows*, not input columns: `packed[r, c] = q[2r, c] & 0xF |
  (q[2r + 1, c] & 0xF) << 4`, shape `[out / 2, in]` (the same function; the engine's kernels
  read column-interleaved int4).

Divergences: an all-zero group gets scale 1.0 (Model Optimizer's `get_scaling_factor` asserts the
scale is positive and stops); any positive scale encodes zeros exactly. Other scales stay in
[smallest normal float32, largest with 7 s finite] (`scale_bounds.py`), so only fp32 extremes
differ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantship.formats.scale_bounds import bounded_scale

INT4_MAX = 7.0  # symmetric signed 4-bit: codes -8..7, scale maps the group max to 7
INT4_MIN_CODE, INT4_MAX_CODE = -8, 7
DEFAULT_GROUP = 128


def _check(w: Tensor, group: int) -> None:
    if w.ndim not in (2, 3):
        raise ValueError(f"int4 expects [out, in] or [E, out, in], got shape {tuple(w.shape)}")
    if w.shape[-1] % group:
        raise ValueError(f"int4: input dim {w.shape[-1]} is not a multiple of the group size {group}")
    if w.shape[-2] % 2:
        raise ValueError(f"int4 packs pairs of output rows; out dim {w.shape[-2]} is odd")


def group_amax(w: Tensor, group: int = DEFAULT_GROUP) -> Tensor:
    """|w| max per group of `group` inputs, float32 `[..., out, in / group]`."""
    return w.abs().reshape(*w.shape[:-1], -1, group).amax(-1).float()


def scale_from_amax(amax: Tensor) -> Tensor:
    """`amax / 7` in float32, bounded (`scale_bounds.bounded_scale`); a zero group gets 1.0
    (see the module docstring)."""
    amax = torch.as_tensor(amax).float()
    return torch.where(amax == 0, torch.ones_like(amax), bounded_scale(amax, INT4_MAX))


def codes(w: Tensor, scale: Tensor, group: int = DEFAULT_GROUP) -> Tensor:
    """int8 codes in [-8, 7]: `round(w / scale)` with the division in float32."""
    step = scale.float().repeat_interleave(group, dim=-1)
    return (w.float() / step).round().clamp(INT4_MIN_CODE, INT4_MAX_CODE).to(torch.int8)


def pack_out_pairs(q: Tensor) -> Tensor:
    """int8 codes `[..., out, in]` -> uint8 `[..., out / 2, in]`, even row in the low nibble."""
    low = q[..., 0::2, :].to(torch.uint8) & 0x0F
    high = q[..., 1::2, :].to(torch.uint8) & 0x0F
    return low | (high << 4)


def unpack_out_pairs(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_out_pairs`: uint8 `[..., out / 2, in]` -> int8 `[..., out, in]`."""
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-2)  # [..., out/2, 2, in]
    signed = nibbles.to(torch.int8)
    signed = torch.where(signed >= 8, signed - 16, signed)
    return signed.reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1])


def quantize_int4(w: Tensor, group: int = DEFAULT_GROUP, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Weight `[out, in]` or experts `[E, out, in]` -> (packed uint8, float32 scales)."""
    _check(w, group)
    if scale is None:
        amax = group_amax(w, group)
        if not torch.isfinite(amax).all():
            raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or inf")
        scale = scale_from_amax(amax)
    return pack_out_pairs(codes(w, scale, group)), scale.float()


def dequantize_int4(packed: Tensor, scale: Tensor, group: int = DEFAULT_GROUP,
                    dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """`code * scale` in float32, then `dtype`."""
    q = unpack_out_pairs(packed).float()
    return (q * scale.float().repeat_interleave(group, dim=-1)).to(dtype)


def fake_quantize_int4(w: Tensor, group: int = DEFAULT_GROUP, scale: Tensor | None = None) -> Tensor:
    """The weight the served model computes with, in `w.dtype`."""
    if scale is None:
        scale = scale_from_amax(group_amax(w, group))
    return (codes(w, scale, group).float() * scale.float().repeat_interleave(group, dim=-1)).to(w.dtype)
