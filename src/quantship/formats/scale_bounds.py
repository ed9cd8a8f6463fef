"""Scales that stay usable at both ends of float32: never below the smallest normal, never so
large that the block's own maximum code dequantizes to inf.

Why both ends: a scale ``amax / maxbound`` of a subnormal amax (fp32 tensors under ~1e-36)
rounds to 0 or to a few-bit subnormal, and ``x / 0`` is NaN; near float32's max, the rounded
scale times ``maxbound`` can round past the max (inf). Inside those bounds every result equals
the plain ``amax / maxbound``, so Model Optimizer's bytes are unchanged in the ordinary range.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from quantship.formats.exact import div_const

SMALLEST_NORMAL = torch.finfo(torch.float32).smallest_normal


@functools.cache
def largest_finite_scale(maxbound: float) -> float:
    """The largest float32 ``s`` with ``float32(s * maxbound)`` finite."""
    big, inf = torch.tensor(torch.finfo(torch.float32).max), torch.tensor(float("inf"))
    s = div_const(big, maxbound)
    while torch.isinf(s * maxbound):
        s = torch.nextafter(s, torch.zeros_like(s))
    while not torch.isinf(torch.nextafter(s, inf) * maxbound):
        s = torch.nextafter(s, inf)
    return float(s)


def bounded_scale(amax: Tensor, maxbound: float) -> Tensor:
    """``amax / maxbound`` in float32 (exact division on every device, ``exact.div_const``),
    elementwise, clamped into [smallest normal, :func:`largest_finite_scale`]. An amax of 0 gets
    the scale of amax 1: any positive scale reproduces zeros, a zero scale makes them 0/0."""
    amax = torch.as_tensor(amax).float()
    amax = torch.where(amax == 0, torch.ones_like(amax), amax)
    return div_const(amax, maxbound).clamp(SMALLEST_NORMAL, largest_finite_scale(maxbound))


def no_overflow(codes: Tensor, values: Tensor, dtype: torch.dtype, step_down) -> Tensor:
    """Codes whose dequantized value overflows ``dtype`` moved one step towards zero.

    A power-of-two (MX) scale can put a block maximum just under the dtype's max on a grid point
    just above it (bf16 max 3.39e38 -> 256 * 2**120 = 2**128 = inf): the next code down is the
    largest finite representation. ``values`` are the float32 dequantized values (inf allowed),
    ``step_down`` maps codes to the next smaller magnitude; other codes are returned as they are."""
    over = torch.isinf(values.to(dtype))
    return torch.where(over, step_down(codes), codes) if over.any() else codes
