"""NVFP4 kernels: weight quantize+pack, dequantize, activation fake-quant.

Bit-exact with ``quantship.formats.nvfp4`` (the definition); each kernel is one pass over
memory: a 2-D tile of rows x (a multiple of 16) columns is loaded once, its blocks of 16 are
reduced, scaled, rounded and packed in registers, and packed codes plus e4m3 scales are
stored. Fused experts ``[E, out, in]`` are the third grid axis, each matrix with its own
``scale_2`` (a scalar per program, so no per-row index arithmetic). Packed codes travel as
int32 words of 8 codes (little-endian: the byte layout ``c[2i] | c[2i+1] << 4``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantship.formats import nvfp4 as ref
from quantship.formats.kernels.amax import matrix_amax
from quantship.formats.kernels.common import (
    e2m1_codes,
    e2m1_codes_fma,
    e2m1_decode,
    e2m1_round,
    e2m1_values,
    e4m3_block_scale,
    launch_device,
    quotient,
    reciprocal,
    sm_count,
    tile_for,
)

BLOCK_SIZE = 16
# Arithmetic variants, all bit-exact with the reference (tests/formats/test_kernels_gpu.py runs
# each): DIV 0 = IEEE division per element, 1 = reciprocal per block + one FMA correction;
# CODE 0 = compare against the 7 rounding bounds, 1 = round with a power-of-two addition
# (quantize: one FMA per code; fake-quant: the grid value directly).
# persistent: 0 = one tile per program; k = k programs per multiprocessor walking the tiles.
VARIANT = {"div": 1, "code": 1, "persistent": 0}


def _variant(div: int | None, code: int | None) -> dict[str, int]:
    return {"DIV": VARIANT["div"] if div is None else div, "CODE": VARIANT["code"] if code is None else code}


@triton.jit
def _load_tile(x_ptr, mat, rt, ct, rows_per_mat, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    grow = mat.to(tl.int64) * rows_per_mat + rows
    mask = (rows < rows_per_mat)[:, None] & (cols < n_cols)[None, :]
    return tl.load(x_ptr + grow[:, None] * n_cols + cols[None, :], mask=mask, other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _quantize_tile(x, s2_ptr, words_ptr, scale_ptr, mat, rt, ct, rows_per_mat, n_cols,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, DIV: tl.constexpr, CODE: tl.constexpr):
    """Block scales, codes and packed words of one loaded tile, stored."""
    NB: tl.constexpr = BLOCK_C // 16
    s2 = tl.load(s2_ptr + mat)
    xb = tl.reshape(x.to(tl.float32), (BLOCK_R, NB, 16))
    sc8 = e4m3_block_scale(tl.max(tl.abs(xb), axis=2), s2)
    # Reference order: x / (float(block_scale) * scale_2), the product rounded once.
    denom = sc8.to(tl.float32) * s2
    recip = reciprocal(denom) if DIV == 1 else denom
    q = quotient(xb, denom[:, :, None], recip[:, :, None], DIV)
    codes = e2m1_codes(q).to(tl.int32) if CODE == 0 else e2m1_codes_fma(q)
    # Eight codes per int32 word; the bit fields do not overlap, so the sum is an OR.
    nibble = tl.arange(0, 8) * 4
    words = tl.sum(tl.reshape(codes, (BLOCK_R, BLOCK_C // 8, 8)) << nibble[None, None, :], axis=2)

    rows = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < rows_per_mat
    grow = mat.to(tl.int64) * rows_per_mat + rows
    wcols = ct * (BLOCK_C // 8) + tl.arange(0, BLOCK_C // 8)
    wmask = rmask[:, None] & (wcols < n_cols // 8)[None, :]
    tl.store(words_ptr + grow[:, None] * (n_cols // 8) + wcols[None, :], words, mask=wmask)
    bcols = ct * NB + tl.arange(0, NB)
    bmask = rmask[:, None] & (bcols < n_cols // 16)[None, :]
    tl.store(scale_ptr + grow[:, None] * (n_cols // 16) + bcols[None, :], sc8, mask=bmask)


@triton.jit
def _quantize_kernel(x_ptr, s2_ptr, words_ptr, scale_ptr, rows_per_mat, n_cols,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, DIV: tl.constexpr, CODE: tl.constexpr):
    """One tile per program; grid (row tiles, column tiles, matrices)."""
    rt, ct, mat = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    x = _load_tile(x_ptr, mat, rt, ct, rows_per_mat, n_cols, BLOCK_R, BLOCK_C)
    _quantize_tile(x, s2_ptr, words_ptr, scale_ptr, mat, rt, ct, rows_per_mat, n_cols, BLOCK_R, BLOCK_C, DIV, CODE)


@triton.jit
def _quantize_persistent_kernel(x_ptr, s2_ptr, words_ptr, scale_ptr, rows_per_mat, n_cols, n_rt, n_ct, n_tiles,
                                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, DIV: tl.constexpr,
                                CODE: tl.constexpr):
    """A few programs per multiprocessor walk the tiles; each loads its next tile before
    working on the current one, so the loads of one overlap the arithmetic of the other."""
    step = tl.num_programs(0)
    t = tl.program_id(0)
    x = _load_tile(x_ptr, t // (n_rt * n_ct), (t // n_ct) % n_rt, t % n_ct, rows_per_mat, n_cols, BLOCK_R, BLOCK_C)
    for _ in range(tl.program_id(0), n_tiles, step):
        nxt = t + step  # past the last tile the mask is all false: no memory is touched
        x_next = _load_tile(x_ptr, nxt // (n_rt * n_ct), (nxt // n_ct) % n_rt, nxt % n_ct,
                            tl.where(nxt < n_tiles, rows_per_mat, 0), n_cols, BLOCK_R, BLOCK_C)
        _quantize_tile(x, s2_ptr, words_ptr, scale_ptr, t // (n_rt * n_ct), (t // n_ct) % n_rt, t % n_ct,
                       rows_per_mat, n_cols, BLOCK_R, BLOCK_C, DIV, CODE)
        x = x_next
        t = nxt


@triton.jit
def _dequantize_kernel(words_ptr, scale_ptr, s2_ptr, out_ptr, rows_per_mat, n_cols,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    NB: tl.constexpr = BLOCK_C // 16
    mat = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < rows_per_mat
    grow = mat.to(tl.int64) * rows_per_mat + rows
    wcols = tl.program_id(1) * (BLOCK_C // 8) + tl.arange(0, BLOCK_C // 8)
    wmask = rmask[:, None] & (wcols < n_cols // 8)[None, :]
    words = tl.load(words_ptr + grow[:, None] * (n_cols // 8) + wcols[None, :], mask=wmask, other=0)
    codes = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 15
    values = tl.reshape(e2m1_decode(codes), (BLOCK_R, NB, 16))
    bcols = tl.program_id(1) * NB + tl.arange(0, NB)
    bmask = rmask[:, None] & (bcols < n_cols // 16)[None, :]
    bs = tl.load(scale_ptr + grow[:, None] * (n_cols // 16) + bcols[None, :], mask=bmask, other=1.0)
    step = bs.to(tl.float32) * tl.load(s2_ptr + mat)  # the scales' product first, as the reference
    out = tl.reshape(values * step[:, :, None], (BLOCK_R, BLOCK_C))
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = rmask[:, None] & (cols < n_cols)[None, :]
    tl.store(out_ptr + grow[:, None] * n_cols + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fake_quant_kernel(x_ptr, scale_ptr, out_ptr, n_rows, n_cols,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, DIV: tl.constexpr, CODE: tl.constexpr):
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
    recip = reciprocal(step) if DIV == 1 else step
    q = quotient(xb, step[:, :, None], recip[:, :, None], DIV)
    # CODE 1: the signed grid value directly (a product keeps -0.0 for negatives rounding to 0).
    value = e2m1_values(e2m1_codes(q)) if CODE == 0 else e2m1_round(q) * tl.where(q < 0, -1.0, 1.0)
    out = tl.reshape(value * step[:, :, None], (BLOCK_R, BLOCK_C))
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _matrices(shape: torch.Size) -> int:
    n = 1
    for d in shape[:-2]:
        n *= d
    return n


def _grid(n_mat: int, rows: int, cols: int, tile: tuple[int, int]) -> tuple[int, int, int]:
    return triton.cdiv(rows, tile[0]), triton.cdiv(cols, tile[1]), n_mat


def quantize(w: torch.Tensor, scale_2: torch.Tensor | None = None, tile: tuple[int, int] | None = None,
             num_warps: int = 4, div: int | None = None, code: int | None = None,
             persistent: int | None = None) -> ref.NVFP4Weight:
    """``quantize_nvfp4`` on the GPU: amax (when ``scale_2`` is None), block scales, codes, packing.

    Same contract as the reference: ``w`` [out, in] or [E, out, in] (validated by the caller),
    ``scale_2`` 0-dim or one per matrix; the returned ``scale_2`` has shape ``w.shape[:-2]``.
    Without ``scale_2`` the NaN/inf check runs after the launches, so the GPU never waits for
    the host between the amax pass and the quantize pass."""
    w = w.contiguous()
    lead, rows, cols = w.shape[:-2], w.shape[-2], w.shape[-1]
    n_mat = _matrices(w.shape)
    amax = None
    if scale_2 is None:
        amax = matrix_amax(w, n_mat)
        s2 = ref.global_scale_from_amax(amax)
    else:
        ref._per_block(scale_2, w, "scale_2")  # the reference's shape rules
        s2 = torch.as_tensor(scale_2, device=w.device).float().reshape(-1).expand(n_mat).contiguous()
    packed = torch.empty((*w.shape[:-1], cols // 2), dtype=torch.uint8, device=w.device)
    scales = torch.empty((*w.shape[:-1], cols // BLOCK_SIZE), dtype=torch.float8_e4m3fn, device=w.device)
    # 16x512 tiles measured best on an H100 (bench/NOTES-kernels.md), where rows divide evenly.
    tile = tile or tile_for(cols, max_cols=512 if cols % 512 == 0 else 256)
    grid = _grid(n_mat, rows, cols, tile)
    args = (w, s2, packed.view(torch.int32), scales, rows, cols)
    meta = dict(BLOCK_R=tile[0], BLOCK_C=tile[1], num_warps=num_warps, **_variant(div, code))
    per_sm = VARIANT["persistent"] if persistent is None else persistent
    with launch_device(w):
        if per_sm:
            n_tiles = grid[0] * grid[1] * grid[2]
            programs = min(n_tiles, per_sm * sm_count(w.device))
            _quantize_persistent_kernel[(programs,)](*args, grid[0], grid[1], n_tiles, **meta)
        else:
            _quantize_kernel[grid](*args, **meta)
    if amax is not None and not bool(torch.isfinite(amax).all()):
        raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or inf")
    return ref.NVFP4Weight(packed, scales, s2.reshape(lead))


def dequantize(packed: torch.Tensor, block_scale: torch.Tensor, scale_2: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``dequantize_nvfp4`` on the GPU (float32 products, one rounding to ``dtype``)."""
    packed, block_scale = packed.contiguous(), block_scale.contiguous()
    cols = packed.shape[-1] * 2
    if block_scale.shape != (*packed.shape[:-1], cols // BLOCK_SIZE):
        raise ValueError(f"block_scale shape {tuple(block_scale.shape)} does not match packed {tuple(packed.shape)}")
    out = torch.empty((*packed.shape[:-1], cols), dtype=dtype, device=packed.device)
    ref._per_block(scale_2, out, "scale_2")  # the reference's shape rules
    n_mat = _matrices(out.shape) if out.ndim >= 2 else 1
    rows = out.shape[-2] if out.ndim >= 2 else 1
    s2 = torch.as_tensor(scale_2, device=packed.device).float().reshape(-1).expand(n_mat).contiguous()
    tile = tile_for(cols)
    with launch_device(packed):
        _dequantize_kernel[_grid(n_mat, rows, cols, tile)](
            packed.view(torch.int32), block_scale, s2, out, rows, cols, BLOCK_R=tile[0], BLOCK_C=tile[1], num_warps=4)
    return out


def fake_quantize_activation(x: torch.Tensor, input_scale: torch.Tensor, tile: tuple[int, int] | None = None,
                             num_warps: int = 4, div: int | None = None, code: int | None = None) -> torch.Tensor:
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
            _fake_quant_kernel[grid](x, s, out, n_rows, cols, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
                                     **_variant(div, code))
    return out
