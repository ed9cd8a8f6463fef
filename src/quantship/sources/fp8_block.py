"""FP8 block-quantized weights as DeepSeek-V3, DeepSeek-R1 and Kimi-K2 ship them.

`config.json`: `quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
"activation_scheme": "dynamic"}`. Per quantized Linear `X`: `X.weight` float8_e4m3fn `[M, N]` and
`X.weight_scale_inv` float32 `[ceil(M/128), ceil(N/128)]` — despite its name a *multiplier*.

Published definition (deepseek-ai/DeepSeek-V3, `inference/kernel.py` `weight_dequant_kernel`, used by
`inference/fp8_cast_bf16.py` to write the BF16 copy):

    x = load(fp8 block).to(float32);  s = scale_inv[i // 128, j // 128];  y = x * s
    stored into a tensor of the default dtype (bfloat16 in fp8_cast_bf16.py)

Blocks at the right and bottom edges are partial when M or N is not a multiple of 128 (the kernel masks
them; the scale grid is `ceil(M/128) x ceil(N/128)`), so the scale is indexed by `i // 128`, never by
reshaping into whole blocks. Quantization (`weight_quant_kernel`; tests/sources/helpers.py's converter
follows it): `s = amax(block) / 448` in float32, `fp8 = (x / s).to(float8_e4m3fn)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = (128, 128)


def scale_grid(shape: tuple[int, int], block: tuple[int, int] = BLOCK) -> tuple[int, int]:
    """The `weight_scale_inv` shape for a weight of `shape`: ceil division, edge blocks partial."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def dequantize_fp8_block(weight: Tensor, scale_inv: Tensor, block: tuple[int, int] = BLOCK,
                         dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """`weight.float() * scale_inv[i // bm, j // bn]`, one float32 product per element, rounded once to
    `dtype` (the published kernel's arithmetic). `weight` may be a row range of the full tensor that
    starts on a block boundary, with `scale_inv` the matching rows of the scale grid."""
    if weight.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(f"FP8 block weights and scales are 2-D, got {tuple(weight.shape)} and {tuple(scale_inv.shape)}")
    rows, cols = weight.shape
    if tuple(scale_inv.shape) != scale_grid((rows, cols), block):
        raise ValueError(f"weight {tuple(weight.shape)} with block {block} needs a scale grid of "
                         f"{scale_grid((rows, cols), block)}, got {tuple(scale_inv.shape)}")
    # One scale per column of each row block (the grid expanded along columns, edge block cut), then
    # broadcast over the block's rows: no per-element scale tensor. A last partial row block is its own view.
    col_scale = scale_inv.float().repeat_interleave(block[1], 1)[:, :cols]
    out = weight.float()
    full = rows // block[0]
    if full:
        out[: full * block[0]].view(full, block[0], cols).mul_(col_scale[:full].unsqueeze(1))
    if rows % block[0]:
        out[full * block[0]:].mul_(col_scale[full])
    return out.to(dtype)

