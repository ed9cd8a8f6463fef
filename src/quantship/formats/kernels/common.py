"""Triton building blocks shared by the format kernels, and launch helpers.

The numerics mirror ``quantship.formats.nvfp4`` / ``fp8`` operation for operation. Two rules
keep them bit-exact with the torch reference:

- divisions use ``tl.div_rn`` (IEEE round-to-nearest), never ``/``, which Triton may lower to
  an approximate division;
- no ``a * b + c`` on a value that matters, so the compiler cannot contract it into an FMA
  (one rounding instead of the reference's two).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

E2M1_MAX: tl.constexpr = tl.constexpr(6.0)
E4M3_MAX: tl.constexpr = tl.constexpr(448.0)
E4M3_MIN_SCALE: tl.constexpr = tl.constexpr(2.0**-9)


@triton.jit
def div_rn(a, b):
    """IEEE ``a / b``, operands broadcast first (``tl.div_rn`` does not broadcast)."""
    a, b = tl.broadcast(a, b)
    return tl.div_rn(a, b)


@triton.jit
def reciprocal(d):
    """``RN(1 / d)`` elementwise."""
    return tl.div_rn(tl.full(d.shape, 1.0, tl.float32), d)


@triton.jit
def e2m1_codes(q):
    """E2M1 codes (uint8 0..15) of values already divided by their scale.

    The count of rounding bounds below |q| is ``searchsorted(left)`` of the reference; ``>=``
    on 0.75, 1.75 and 3.5 sends those ties up to the even code, ``>`` on the others keeps
    them down. Saturates at 6 (inf included); the sign bit comes from ``q < 0`` as in the
    reference, so -0.0 gives code 0."""
    a = tl.abs(q)
    idx = (
        (a > 0.25).to(tl.uint8)
        + (a >= 0.75).to(tl.uint8)
        + (a > 1.25).to(tl.uint8)
        + (a >= 1.75).to(tl.uint8)
        + (a > 2.5).to(tl.uint8)
        + (a >= 3.5).to(tl.uint8)
        + (a > 5.0).to(tl.uint8)
    )
    return idx | tl.where(q < 0, 8, 0).to(tl.uint8)


@triton.jit
def e2m1_round(q):
    """|E2M1 value| of ``q`` (float32) without comparisons against every bound: adding and
    subtracting ``c = step * 2**23`` rounds to a multiple of ``step`` with ties to an even
    multiple, which is the even code on each of the three grids (0.5 below 2, 1 below 4, 2
    above); 6 saturates. ``(a + c) - c`` stays as written: Triton does not reassociate."""
    a = tl.abs(q)
    c = tl.where(a < 2.0, 4194304.0, tl.where(a < 4.0, 8388608.0, 16777216.0))
    return tl.minimum((a + c) - c, 6.0)


@triton.jit
def e2m1_codes_fma(q):
    """Same codes as :func:`e2m1_codes` (int32), with three FMAs and three minimums, no compare.

    ``2**23 + o + |q| * m`` rounds ``|q| * m`` to an integer (ties to even: ``o`` is even) and
    adds ``o``, the integer sitting in the low mantissa bits. With ``(m, o)`` = (2, 0), (1, 2),
    (1/2, 4) that integer is the code wherever its grid applies (below 2, below 4, above) and
    larger elsewhere, since ``2a <= a + 2`` exactly when ``a <= 2`` and ``a + 2 <= a/2 + 4``
    exactly when ``a <= 4``; so the code is the minimum of the three, saturated at 7 (inf and
    NaN included). ``|q| * m`` is exact, so fused or not, each sum is rounded once."""
    a = tl.abs(q)
    t = tl.minimum(tl.minimum(a * 2.0 + 8388608.0, a + 8388610.0), tl.minimum(a * 0.5 + 8388612.0, 8388615.0))
    mag = t.to(tl.int32, bitcast=True) - 0x4B000000
    return tl.where(q < 0, mag + 8, mag)


@triton.jit
def e2m1_decode(codes):
    """float32 value of int32 codes by building the bits: 1.0 .. 6.0 are ``(m + 252) << 22``
    for magnitudes m >= 2, 0.5 and 0 are constants, bit 3 of the code is the sign bit (code 8
    is -0.0 like the reference table)."""
    m = codes & 7
    bits = tl.where(m >= 2, (m + 252) << 22, tl.where(m == 1, 0x3F000000, 0))
    return (bits | ((codes & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def quotient(x, d, r, DIV: tl.constexpr, SIGNED_ZERO: tl.constexpr = False):
    """``RN(x / d)``. DIV=0: IEEE division. DIV=1: ``q0 = x * r`` with ``r = RN(1/d)``, then
    one FMA residual step ``q0 + (x - q0*d) * r`` (Markstein), correctly rounded for normal
    results (zeros keep their sign); the GPU tests check it against the reference, all bf16
    values included."""
    x, d = tl.broadcast(x, d)
    if DIV == 0:
        return tl.div_rn(x, d)
    else:
        x, r = tl.broadcast(x, r)
        q0 = x * r
        q1 = tl.fma(tl.fma(q0, -d, x), r, q0)
        # -0.0 / d is -0.0, the FMAs give +0.0: only FP8 stores the sign of a zero.
        return tl.where(q0 == 0.0, q0, q1) if SIGNED_ZERO else q1


@triton.jit
def e2m1_values(codes):
    """float32 value of each code; code 8 is -0.0 like the reference table. Exact arithmetic
    only (halves and powers of two), so no rounding happens here."""
    c = codes.to(tl.int32)
    m = c & 7
    e = m >> 1
    mant = (m & 1).to(tl.float32)
    low = mant * 0.5  # codes 0, 1: 0.0, 0.5
    pow2 = tl.where(e == 1, 1.0, tl.where(e == 2, 2.0, 4.0))
    high = (1.0 + mant * 0.5) * pow2  # codes 2..7: 1, 1.5, 2, 3, 4, 6
    v = tl.where(e == 0, low, high)
    # A product, not `-v`: Triton negates as `0 - v`, which turns code 8 into +0.0.
    return v * tl.where((c & 8) != 0, -1.0, 1.0)


@triton.jit
def e4m3_block_scale(block_amax, scale):
    """``e4m3(clamp(block_amax / (6 * scale), 2**-9, 448))`` with zero blocks at 1.0, as
    float8e4nv; ``scale`` broadcasts against ``block_amax``."""
    s = div_rn(block_amax, scale * E2M1_MAX)
    s = tl.where(s == 0.0, 1.0, s)
    s = tl.minimum(tl.maximum(s, E4M3_MIN_SCALE), E4M3_MAX)
    return s.to(tl.float8e4nv)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (4 for the CPU interpreter, which has none)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def tile_for(n_cols: int, max_cols: int = 256, rows: int = 16) -> tuple[int, int]:
    """(rows, cols) of a 2-D tile: as wide as the row allows (up to ``max_cols``, a power of two
    multiple of 16) so loads are long contiguous runs; narrow rows get more of them."""
    cols = min(max_cols, max(16, next_pow2(n_cols)))
    return max(rows, (rows * 256) // cols), cols


def launch_device(t: torch.Tensor):
    """Context that makes ``t``'s GPU current for a launch (no-op on the CPU interpreter)."""
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
