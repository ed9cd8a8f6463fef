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
    s = tl.div_rn(block_amax, scale * E2M1_MAX)
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


def tile_for(n_cols: int, elems: int = 4096, max_cols: int = 256) -> tuple[int, int]:
    """(rows, cols) of a 2-D tile of about ``elems`` elements: as wide as the row allows (up to
    ``max_cols``, a power of two multiple of 16) so loads are long contiguous runs."""
    cols = min(max_cols, max(16, next_pow2(n_cols)))
    return max(1, elems // cols), cols


def launch_device(t: torch.Tensor):
    """Context that makes ``t``'s GPU current for a launch (no-op on the CPU interpreter)."""
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
