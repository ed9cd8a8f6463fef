"""Division by a constant that rounds the same on every device."""

from __future__ import annotations

import torch
from torch import Tensor


def div_const(x: Tensor | float, c: float) -> Tensor:
    """``x / c`` in float32, rounded once, on CPU and GPU alike.

    torch's CUDA division by a Python number multiplies by the float32 reciprocal instead (a
    second rounding), so a scale computed on a GPU could differ from the CPU's in the last bit
    (seen: ``amax / 2688`` on an H100). Dividing by a tensor is a true division everywhere."""
    x = torch.as_tensor(x).float()
    return x / torch.full_like(x, c)
