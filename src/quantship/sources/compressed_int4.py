"""compressed-tensors `pack-quantized` integer weights (Kimi-K2-Thinking: INT4, symmetric, group 32).

Per quantized Linear `X`: `X.weight_packed` int32 `[M, ceil(N * bits / 32)]`, `X.weight_scale`
`[M, N / group]` (bf16 in Kimi-K2-Thinking), `X.weight_shape` int `[2]` = `(M, N)`, and for asymmetric
schemes `X.weight_zero_point` (packed along dim 0). Read from compressed-tensors 0.20:

- `compressors/pack_quantized/helpers.py` `pack_to_int32`: each value gets `offset = 2**(bits-1)`
  added (int4 -8..7 -> 0..15) and the row is packed densely: element `j` at bit `j * bits` of the
  row's little-endian bit stream of int32 words (8 nibbles per word for int4, element 0 in the
  lowest nibble). `unpack_from_int32` reverses it and subtracts the offset.
- `compressors/pack_quantized/base.py` `decompress`: unpack to `weight_shape`, then
  `quantization/lifecycle/forward.py` `dequantize` with `dtype = scale.dtype`, which for the group
  strategy (`forward_helpers._process_group` / `_dequantize`) computes, per group of columns,
  `(x_q.to(scale.dtype) - zero_point.to(scale.dtype)) * scale` in the scale's dtype.

We follow the same operations in the same dtype (so the result is bit-identical, which the tests check
against the decompressor itself), then cast to the model dtype.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor


def unpack_int32(packed: Tensor, num_bits: int, cols: int) -> Tensor:
    """int32 `[rows, words]` -> signed int8 `[rows, cols]`: element `j` of a row is bits
    `[j*bits, (j+1)*bits)` of the row's words read as one little-endian bit stream, minus the offset."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights are int32, got {packed.dtype}")
    if not 1 <= num_bits <= 8:
        raise ValueError(f"num_bits must be in [1, 8], got {num_bits}")
    rows, words = packed.shape
    if words * 32 < cols * num_bits:
        raise ValueError(f"{words} int32 words per row cannot hold {cols} values of {num_bits} bits")
    offset = 1 << (num_bits - 1)
    if 8 % num_bits == 0 and sys.byteorder == "little":
        # Widths that divide 8 never straddle a byte: read the words' bytes in memory order (the
        # little-endian bit stream) and split each byte, lowest bits first.
        shifts = torch.arange(0, 8, num_bits, dtype=torch.uint8, device=packed.device)
        data = packed.contiguous().reshape(-1).view(torch.uint8).reshape(rows, words * 4)
        values = (data.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
        return (values.view(rows, -1)[:, :cols].to(torch.int16) - offset).to(torch.int8)
    # Each value lies within one 64-bit window made of the word it starts in and the next one.
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros(rows, 1, dtype=torch.int64, device=packed.device)], dim=1)
    start = torch.arange(cols, dtype=torch.int64, device=packed.device) * num_bits
    word = start // 32
    window = w[:, word] | (w[:, word + 1] << 32)
    values = (window >> (start % 32)) & ((1 << num_bits) - 1)
    return (values - offset).to(torch.int8)


def dequantize_packed(packed: Tensor, scale: Tensor, cols: int, num_bits: int,
                      zero_point: Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """One module's (or a row range's) weight: unpack, then `(q - zp) * scale` per group in the scale's
    dtype as compressed-tensors computes it, cast to `dtype`. `scale` is `[rows, groups]` (group or
    channel strategy) or one element (tensor strategy); `zero_point` is already unpacked, like `scale`."""
    q = unpack_int32(packed, num_bits, cols)
    rows = q.shape[0]
    if scale.numel() == 1:
        scale = scale.reshape(1, 1)
        zero_point = zero_point.reshape(1, 1) if zero_point is not None else None
    if scale.dim() != 2 or scale.shape[0] not in (1, rows) or cols % scale.shape[1]:
        raise ValueError(f"scale of shape {tuple(scale.shape)} does not group a weight of {rows} x {cols}")
    group = cols // scale.shape[1]
    x = q.to(scale.dtype).unflatten(-1, (scale.shape[1], group))
    if zero_point is not None:
        x = x - zero_point.to(scale.dtype).unsqueeze(-1)
    return (x * scale.unsqueeze(-1)).flatten(-2).to(dtype)


def unpack_zero_point(packed: Tensor, num_bits: int, rows: int) -> Tensor:
    """Asymmetric schemes pack the `[rows, groups]` zero points along dim 0 (`packed_dim=0`)."""
    return unpack_int32(packed.t().contiguous(), num_bits, rows).t()
