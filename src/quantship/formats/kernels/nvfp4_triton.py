"""NVFP4 kernels: weight quantize+pack, dequantize, activation fake-quant.

Bit-exact with ``quantship.formats.nvfp4`` (the definition); each kernel is one pass over
memory: a 2-D tile of rows x (a multiple of 16) columns is loaded once, its blocks of 16 are
reduced, scaled, rounded and packed in registers, and packed bytes plus e4m3 scales are
stored. Fused experts ``[E, out, in]`` are seen as ``E * out`` rows whose global scale is
``scale_2[row // out]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantship.formats import nvfp4 as ref
from quantship.formats.kernels.amax import matrix_amax
from quantship.formats.kernels.common import (
    e2m1_codes,
    e2m1_values,
    e4m3_block_scale,
    launch_device,
    tile_for,
)

BLOCK_SIZE = 16


@triton.jit
def _quantize_kernel(x_ptr, s2_ptr, packed_ptr, scale_ptr, n_rows, n_cols, rows_per_s2,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    NB: tl.constexpr = BLOCK_C // 16
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < n_rows
    r64 = rows.to(tl.int64)
    mask = rmask[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + r64[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s2_ptr + rows // rows_per_s2, mask=rmask, other=1.0)

    xb = tl.reshape(x, (BLOCK_R, NB, 16))
    block_amax = tl.max(tl.abs(xb), axis=2)
    sc8 = e4m3_block_scale(block_amax, s2[:, None])
    # Reference order: x / (float(block_scale) * scale_2), the product rounded once.
    denom = sc8.to(tl.float32) * s2[:, None]
    codes = e2m1_codes(tl.div_rn(xb, denom[:, :, None]))

    lo, hi = tl.split(tl.reshape(codes, (BLOCK_R, BLOCK_C // 2, 2)))
    packed = lo | (hi << 4)
    pcols = tl.program_id(1) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
    pmask = rmask[:, None] & (pcols < n_cols // 2)[None, :]
    tl.store(packed_ptr + r64[:, None] * (n_cols // 2) + pcols[None, :], packed, mask=pmask)
    bcols = tl.program_id(1) * NB + tl.arange(0, NB)
    bmask = rmask[:, None] & (bcols < n_cols // 16)[None, :]
    tl.store(scale_ptr + r64[:, None] * (n_cols // 16) + bcols[None, :], sc8, mask=bmask)


@triton.jit
def _dequantize_kernel(packed_ptr, scale_ptr, s2_ptr, out_ptr, n_rows, n_cols, rows_per_s2,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    NB: tl.constexpr = BLOCK_C // 16
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    r64 = rows.to(tl.int64)
    pcols = tl.program_id(1) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
    pmask = rmask[:, None] & (pcols < n_cols // 2)[None, :]
    p = tl.load(packed_ptr + r64[:, None] * (n_cols // 2) + pcols[None, :], mask=pmask, other=0)
    codes = tl.reshape(tl.join(p & 0xF, p >> 4), (BLOCK_R, NB, 16))
    bcols = tl.program_id(1) * NB + tl.arange(0, NB)
    bmask = rmask[:, None] & (bcols < n_cols // 16)[None, :]
    bs = tl.load(scale_ptr + r64[:, None] * (n_cols // 16) + bcols[None, :], mask=bmask, other=1.0)
    s2 = tl.load(s2_ptr + rows // rows_per_s2, mask=rmask, other=1.0)
    step = bs.to(tl.float32) * s2[:, None]  # the scales' product first, as the reference
    out = tl.reshape(e2m1_values(codes) * step[:, :, None], (BLOCK_R, BLOCK_C))
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = rmask[:, None] & (cols < n_cols)[None, :]
    tl.store(out_ptr + r64[:, None] * n_cols + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fake_quant_kernel(x_ptr, scale_ptr, out_ptr, n_rows, n_cols,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    NB: tl.constexpr = BLOCK_C // 16
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r64 = rows.to(tl.int64)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offs = r64[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr)
    xb = tl.reshape(x, (BLOCK_R, NB, 16))
    sc8 = e4m3_block_scale(tl.max(tl.abs(xb), axis=2), s)
    step = sc8.to(tl.float32) * s
    codes = e2m1_codes(tl.div_rn(xb, step[:, :, None]))
    out = tl.reshape(e2m1_values(codes) * step[:, :, None], (BLOCK_R, BLOCK_C))
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows_cols(shape: torch.Size) -> tuple[int, int, int]:
    """(matrices, rows per matrix, cols) of a [..., rows, cols] tensor."""
    n_mat = 1
    for d in shape[:-2]:
        n_mat *= d
    return n_mat, shape[-2], shape[-1]


def _s2_vector(scale_2: torch.Tensor, n_mat: int, device: torch.device) -> torch.Tensor:
    s2 = torch.as_tensor(scale_2, device=device).float().reshape(-1)
    return (s2.expand(n_mat) if s2.numel() == 1 else s2).contiguous()


def quantize(w: torch.Tensor, scale_2: torch.Tensor | None = None, tile: tuple[int, int] | None = None,
             num_warps: int = 4) -> ref.NVFP4Weight:
    """``quantize_nvfp4`` on the GPU: amax (when ``scale_2`` is None), block scales, codes, packing.

    Same contract as the reference: ``w`` [out, in] or [E, out, in] (validated by the caller),
    ``scale_2`` 0-dim or one per matrix; the returned ``scale_2`` has shape ``w.shape[:-2]``."""
    w = w.contiguous()
    n_mat, rows, cols = _rows_cols(w.shape)
    if scale_2 is None:
        amax = matrix_amax(w, n_mat).reshape(w.shape[:-2])
        if not torch.isfinite(amax).all():
            raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or inf")
        scale_2 = ref.global_scale_from_amax(amax)
    s2_shaped = ref._per_block(scale_2, w, "scale_2")  # validates the shape like the reference
    per_matrix = s2_shaped.reshape(s2_shaped.shape[: w.ndim - 2]).expand(w.shape[:-2]).clone()
    s2 = _s2_vector(per_matrix, n_mat, w.device)
    packed = torch.empty((*w.shape[:-1], cols // 2), dtype=torch.uint8, device=w.device)
    scales = torch.empty((*w.shape[:-1], cols // BLOCK_SIZE), dtype=torch.float8_e4m3fn, device=w.device)
    block_r, block_c = tile or tile_for(cols)
    grid = (triton.cdiv(n_mat * rows, block_r), triton.cdiv(cols, block_c))
    with launch_device(w):
        _quantize_kernel[grid](w, s2, packed, scales, n_mat * rows, cols, rows,
                               BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return ref.NVFP4Weight(packed, scales, per_matrix)


def dequantize(packed: torch.Tensor, block_scale: torch.Tensor, scale_2: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``dequantize_nvfp4`` on the GPU (float32 products, one rounding to ``dtype``)."""
    packed, block_scale = packed.contiguous(), block_scale.contiguous()
    cols = packed.shape[-1] * 2
    if block_scale.shape != (*packed.shape[:-1], cols // BLOCK_SIZE):
        raise ValueError(f"block_scale shape {tuple(block_scale.shape)} does not match packed {tuple(packed.shape)}")
    out = torch.empty((*packed.shape[:-1], cols), dtype=dtype, device=packed.device)
    ref._per_block(scale_2, out, "scale_2")  # same shape rules as the reference
    n_mat, rows, _ = _rows_cols(out.shape) if out.ndim >= 2 else (1, 1, cols)
    s2 = _s2_vector(scale_2, n_mat, packed.device)
    block_r, block_c = tile_for(cols)
    grid = (triton.cdiv(n_mat * rows, block_r), triton.cdiv(cols, block_c))
    with launch_device(packed):
        _dequantize_kernel[grid](packed, block_scale, s2, out, n_mat * rows, cols, rows,
                                 BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out


def fake_quantize_activation(x: torch.Tensor, input_scale: torch.Tensor,
                             tile: tuple[int, int] | None = None, num_warps: int = 4) -> torch.Tensor:
    """``fake_quantize_nvfp4_activation`` on the GPU: one read, one write. ``input_scale`` is a
    validated single positive value."""
    x = x.contiguous()
    cols = x.shape[-1]
    n_rows = x.numel() // cols if cols else 0
    out = torch.empty_like(x)
    s = torch.as_tensor(input_scale, device=x.device).float().reshape(1)
    block_r, block_c = tile or tile_for(cols)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(cols, block_c))
    if n_rows:
        with launch_device(x):
            _fake_quant_kernel[grid](x, s, out, n_rows, cols, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return out
