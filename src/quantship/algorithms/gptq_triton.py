"""GPTQ's column loop as one Triton kernel per batch of matrices.

Why: the torch loop in `gptq.py` launches ~10 small kernels per column (3264 columns in a
SmolLM2 layer: ~1 s on an H100, ~400 forward passes of the layer). GPTQ treats rows
independently — a row's rounding errors only move that row's later columns — so one program
owns a tile of rows for the whole matrix: per lazy-batch block of `BS` columns it loads the
block into registers, quantizes its columns one after another (round, error / [H⁻¹]ᵢᵢ, rank-1
update of the block's later columns), stores the values, and applies the block's errors to the
row tile's remaining columns with one `tl.dot` per column tile (the lazy-batch GEMM). One launch
per matrix batch instead of tens of thousands.

The rounding is the format modules' float32 arithmetic: IEEE division (`tl.div_rn`), E2M1
nearest value saturating at 6, INT4 codes round-half-even clamped to [-8, 7], E4M3 nearest value
after clamping to ±448, each written with additions of a power of two (round half to even) so
Triton's CPU interpreter computes the same values as the GPU. Only Triton builtins are called (no
`tl.sum` / `tl.zeros`, which are jit functions of Triton's standard library), so a copy of this
module built under TRITON_INTERPRET=1 runs inside a process that imported Triton for the GPU, as
the tests do. Only NVFP4 block scales fixed before compensation ("static", "static_mse") run
here; the "dynamic" modes derive a block scale mid-loop and keep the torch loop. The
compensation arithmetic (FMA contraction, the GEMM's summation order) differs from cuBLAS/ATen,
so the result equals the torch loop's up to float rounding: tests compare both with a float64
GPTQ (same values for > 95% of the elements, objective within 2%).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from quantship.formats.kernels.common import launch_device

KIND = {"e2m1": 0, "int4": 1, "e4m3": 2}


@triton.jit
def _grid_value(x, KIND: tl.constexpr):
    """Nearest grid value of x = weight / step (float32), with the format's sign rule: E2M1
    negative for x < 0 (so -0.0 gives code 0, as `formats/nvfp4.py`), E4M3 the sign bit (a cast
    keeps -0.0)."""
    if KIND == 2:  # noqa: SIM108 (a constexpr branch, one per compiled kernel)
        negative = x.to(tl.int32, bitcast=True) < 0
    else:
        negative = x < 0.0
    a = tl.abs(x)
    if KIND == 0:  # E2M1: multiples of 0.5 below 2, of 1 below 4, of 2 above; saturate at 6
        c = tl.where(a < 2.0, 4194304.0, tl.where(a < 4.0, 8388608.0, 16777216.0))
        mag = tl.minimum((a + c) - c, 6.0)
    elif KIND == 1:  # INT4 code magnitude: integers, half to even; clamped below
        a = tl.minimum(a, 16.0)
        mag = (a + 8388608.0) - 8388608.0
    else:  # E4M3: 3 mantissa bits, subnormal step 2^-9, clamped to 448 first
        a = tl.minimum(a, 448.0)
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        k = tl.maximum(e, -6) - 3  # log2 of the E4M3 step at a
        up = ((127 - k) << 23).to(tl.float32, bitcast=True)
        down = ((127 + k) << 23).to(tl.float32, bitcast=True)
        mag = ((a * up + 8388608.0) - 8388608.0) * down  # exact scalings by powers of two
    v = mag * tl.where(negative, -1.0, 1.0)
    if KIND == 1:
        v = tl.minimum(tl.maximum(v, -8.0), 7.0)
    return v


@triton.jit
def _gptq_rows_kernel(w_ptr, q_ptr, hinv_ptr, inv_diag_ptr, step_ptr, rows, cols,
                      step_sb, step_sr, step_sc,
                      KIND: tl.constexpr, BR: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Program (row tile, matrix): GPTQ of rows [BR] of one matrix over all its columns.
    `w_ptr` is a float32 scratch copy [B, rows, cols] (updated in place), `q_ptr` receives the
    quantized values, `hinv_ptr` [B, cols, cols] the upper Cholesky factor of H⁻¹, `inv_diag_ptr`
    [B, cols] 1 / its diagonal."""
    b = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = r < rows
    cb = tl.arange(0, BS)
    cn = tl.arange(0, BN)
    row_off = b * rows * cols + r.to(tl.int64)[:, None] * cols
    h_base = hinv_ptr + b * cols * cols
    step_base = step_ptr + b * step_sb + r.to(tl.int64)[:, None] * step_sr
    for i1 in range(0, cols, BS):
        c = i1 + cb
        cmask = c < cols
        m2 = rmask[:, None] & cmask[None, :]
        block = tl.load(w_ptr + row_off + c[None, :], mask=m2, other=0.0)
        step = tl.load(step_base + c[None, :] * step_sc, mask=m2, other=1.0)
        # The block's part of H⁻¹'s factor, strictly above the diagonal, and 1 / its diagonal:
        # in registers, so the serial loop below waits on no memory.
        h_block = tl.load(h_base + c[:, None] * cols + c[None, :], mask=cmask[:, None] & (cb[None, :] > cb[:, None]),
                          other=0.0)
        inv_d = tl.load(inv_diag_ptr + b * cols + c, mask=cmask, other=0.0)
        qb = tl.full([BR, BS], 0.0, tl.float32)
        eb = tl.full([BR, BS], 0.0, tl.float32)
        for i in range(0, BS):
            here = cb[None, :] == i
            pick = tl.full([BR, 1], i, tl.int32)
            wi = tl.reshape(tl.gather(block, pick, 1), [BR])  # column i, out of registers
            si = tl.reshape(tl.gather(step, pick, 1), [BR])
            qi = _grid_value(tl.div_rn(wi, si), KIND) * si
            # Past the last column (a partial block) wi is 0 and inv_d 0, so err is 0.
            err = (wi - qi) * tl.gather(inv_d, tl.full([1], i, tl.int32), 0)
            h_row = tl.gather(h_block, tl.full([1, BS], i, tl.int32), 0)  # [1, BS]
            block = block - err[:, None] * h_row
            qb = tl.where(here, qi[:, None], qb)
            eb = tl.where(here, err[:, None], eb)
        tl.store(q_ptr + row_off + c[None, :], qb, mask=m2)
        # Lazy batch: the block's errors reach every later column of these rows.
        for j0 in range(i1 + BS, cols, BN):
            cj = j0 + cn
            jmask = cj < cols
            mj = rmask[:, None] & jmask[None, :]
            wt = tl.load(w_ptr + row_off + cj[None, :], mask=mj, other=0.0)
            ht = tl.load(h_base + c[:, None] * cols + cj[None, :], mask=cmask[:, None] & jmask[None, :], other=0.0)
            wt = wt - tl.dot(eb, ht, input_precision=PRECISION)
            tl.store(w_ptr + row_off + cj[None, :], wt, mask=mj)
        tl.debug_barrier()  # the next block reads columns other threads of this program just wrote


# Launch shape and the lazy-batch GEMM's arithmetic; bench/gptq_cost.py measures the choices.
# "tf32x3" (three TF32 tensor-core products, float32 accuracy) or "ieee" (float32 FMAs).
# H100 (bench/results/2026-11-27-*-gptq-cost.json, kernel_sweep): 16 rows x 4 warps is best or
# within 6 % everywhere; 128-column GEMM tiles save 5-10 % on dense shapes (6 % slower on experts);
# "tf32x3" saved nothing (the loop is bound by the serial column work and H⁻¹ reads, not FLOPs).
VARIANT = {"block_rows": 16, "tile_cols": 128, "num_warps": 4, "precision": "ieee"}


def gptq_columns(w: Tensor, hinv: Tensor, steps: Tensor, kind: str, block_size: int) -> Tensor:
    """Quantized values [B, rows, cols] (float32) of GPTQ on `w` [B, rows, cols] (processing
    order) with `hinv` [B, cols, cols] (upper Cholesky factor of the dampened H⁻¹) and per-element
    steps `steps` (broadcastable to w: the format's scale of each value, in processing order)."""
    n_batch, rows, cols = w.shape
    work = w.float().contiguous().clone()
    q = torch.empty_like(work)
    hinv = hinv.float().contiguous()
    inv_diag = (1.0 / torch.diagonal(hinv, dim1=-2, dim2=-1)).contiguous()
    steps = steps.float().expand(n_batch, rows, cols)
    v = VARIANT
    grid = (triton.cdiv(rows, v["block_rows"]), n_batch)
    with launch_device(work):
        _gptq_rows_kernel[grid](work, q, hinv, inv_diag, steps, rows, cols,
                                steps.stride(0), steps.stride(1), steps.stride(2),
                                KIND=KIND[kind], BR=v["block_rows"], BS=block_size, BN=v["tile_cols"],
                                PRECISION=v["precision"], num_warps=v["num_warps"])
    return q
