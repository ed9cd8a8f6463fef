"""MSE weight scale search (`--weight-scale-search mse`) for every block format.

Per block, the amax a block scale is derived from is searched over multiples of the block's
own amax, keeping the one whose dequantized block has the smallest sum of squared errors to
the original (float32). Candidates are Model Optimizer 0.47's `MseCalibrator` defaults
(`quantization/calib/mse.py`; `mse_calibrate`: `torch.linspace(0.25, 4.0, 39)`, a step of
0.0987 that misses 1.0) preceded by 1.0 itself, so a block keeps its plain max scale unless
another one is strictly better; ties go to the first candidate, as `argmin` picks. Below 1 a block clips its
largest values to resolve the rest more finely; above 1 it can move the grid so that values
land closer to representable points (coarse formats: E2M1, INT4).

Weight scales only: the global / per-tensor scales stay those of the plain recipe (fused
siblings keep sharing them), so a searched checkpoint has the same layout and loads the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

START, STOP, STEP = 0.25, 4.0, 0.1


def candidates(start: float = START, stop: float = STOP, step: float = STEP) -> Tensor:
    """Model Optimizer's multipliers (`MseCalibrator._generate_candidates`)."""
    return torch.linspace(start, stop, steps=math.ceil((stop - start) / step) + 1)


def search_multipliers() -> Tensor:
    """1.0 (the plain max scale) first, then Model Optimizer's candidates."""
    return torch.cat([torch.ones(1), candidates()])


class BlockFormat(Protocol):
    """What a block-format handler offers the search (see `formats/handlers_*.py`)."""

    name: str

    def block_amax(self, weight: Tensor) -> Tensor: ...
    def block_sum(self, x: Tensor) -> Tensor: ...
    def quantize(self, weight: Tensor, scales: dict[str, Tensor], block_amax: Tensor | None = None
                 ) -> dict[str, Tensor]: ...
    def dequantize(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor: ...


def search_block_amax(fmt: BlockFormat, weight: Tensor, scales: dict[str, Tensor],
                      multipliers: Tensor | None = None) -> Tensor:
    """The per-block amax (same layout as `fmt.block_amax`) minimizing each block's MSE."""
    multipliers = search_multipliers() if multipliers is None else multipliers
    base = fmt.block_amax(weight)
    w = weight.float()
    best_err = best = None
    for m in multipliers.tolist():
        amax = base * m
        fq = fmt.dequantize(fmt.quantize(weight, scales, amax), torch.float32)
        err = fmt.block_sum((w - fq).pow(2))
        if best is None:
            best_err, best = err, amax
        else:
            better = err < best_err  # strict: ties keep the earlier (smaller) multiplier
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, amax, best)
    return best


@dataclass(frozen=True)
class MSESearched:
    """A block-format handler whose weight block scales come from :func:`search_block_amax`;
    everything else (tensor names, per-tensor scales, activations) is the base handler's."""

    base: BlockFormat
    name: str = ""
    multipliers: tuple[float, ...] = field(default_factory=lambda: tuple(search_multipliers().tolist()))

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", f"{self.base.name}+mse")

    def __getattr__(self, attr: str):
        # Only reached for attributes this class lacks: block_size, per_tensor, scales, ...
        if attr == "base":  # not set yet (copy/unpickle): no recursion
            raise AttributeError(attr)
        return getattr(self.base, attr)

    def quantize(self, weight: Tensor, scales: dict[str, Tensor]) -> dict[str, Tensor]:
        amax = search_block_amax(self.base, weight, scales, torch.tensor(self.multipliers))
        return self.base.quantize(weight, scales, amax)


def with_mse(handler: BlockFormat) -> MSESearched:
    return MSESearched(handler)
