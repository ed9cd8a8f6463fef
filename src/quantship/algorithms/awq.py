"""AWQ-lite (Lin et al. 2023, arXiv:2306.00978, "activation-aware weight quantization"), the
variant Model Optimizer 0.47 runs for `int4_awq`, `w4a8_awq` and `nvfp4_awq`
(`modelopt/torch/quantization/model_calib.py` `awq_lite`), as tensor functions.

Per input channel c of a linear, a scale s_c moves difficulty from the weight to the
activation: y = (x / s) (W * s)^T, with the weight quantized after scaling. AWQ-lite searches
one exponent alpha in {0, 0.1, ..., 1}:

    s = x_mean^alpha / w_mean^(1 - alpha),  clamped to [1e-4, 1e4], divided by sqrt(max(s) min(s))

where x_mean is the mean |x| per channel (averaged over calibration forward calls) and w_mean
the mean over rows of |w| / (amax of its quantization block). The alpha whose quantized
output has the smallest mean squared error to the unquantized output, summed over the
calibration calls, wins. The checkpoint then stores `pre_quant_scale = 1 / s` and the weight
`W * s`. Each step follows Model Optimizer's arithmetic (its dtypes and roundings), so on the
same inputs the same alpha and the same scales come out (tests/algorithms/test_awq_smoothquant.py).

A linear that saw no token (an expert calibration never routed to) or whose statistics are
not finite gets the neutral scale 1, never NaN: Model Optimizer does the same ("Forcing
pre_quant_scale=1").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from quantship.formats import int4, nvfp4

# Model Optimizer's alphas: float32 arange(0, 1.1, 0.1) read back as Python floats.
ALPHAS = tuple(a.item() for a in torch.arange(0, 1.0 + 0.1, 0.1))
_TINY_F32 = torch.finfo(torch.float32).tiny


def act_scale(x: Tensor) -> Tensor:
    """Mean |x| per input channel of one forward call (a mean in x's dtype, then float32)."""
    return x.abs().reshape(-1, x.shape[-1]).mean(0).to(torch.float32)


def weight_scale(w: Tensor, block: int | None) -> Tensor:
    """Mean over rows of |w| / block amax, per input channel (float32), in w's dtype like
    Model Optimizer's `get_weight_scale` (blocks of `block` inputs; None: whole rows)."""
    shape = w.shape
    blocks = w.reshape(-1, block) if block else w
    a = blocks.abs()
    scale = a / (a.amax(dim=1, keepdim=True) + torch.finfo(w.dtype).tiny)
    return scale.reshape(shape).mean(0).to(torch.float32)


def awq_scale(x_mean: Tensor, w_mean: Tensor, alpha: float) -> Tensor:
    """The per-channel scale s for one alpha (module docstring)."""
    s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + _TINY_F32)).clamp(min=1e-4, max=1e4).view(-1)
    return (s / (s.max() * s.min()).sqrt()).view(-1)


# ---------------------------------------------------------------- the weight quantizer the search uses


def int4_search_fake_quant(w: Tensor, block: int = int4.DEFAULT_GROUP) -> Tensor:
    """Model Optimizer's INT4 fake quant with a per-block amax from the weight itself
    (`tensor_quant.py` `_tensor_quant`: multiply by 7 / amax, round, clamp to [-8, 7], divide)."""
    blocks = w.float().reshape(-1, block)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    scale = 7.0 / amax
    zero = amax <= 1.0 / (1 << 24)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    q = (blocks * scale).round().clamp(-8, 7)
    return (q / torch.where(zero, torch.ones_like(scale), scale)).reshape(w.shape).to(w.dtype)


def nvfp4_search_fake_quant(w: Tensor) -> Tensor:
    """NVFP4 round trip with scales from the (scaled) weight."""
    q = nvfp4.quantize_nvfp4(w)
    return nvfp4.dequantize_nvfp4(q.packed, q.block_scale, q.scale_2, dtype=w.dtype)


# Weight format -> (block of the weight statistic, weight fake quant used while searching).
# W4A8's FP8 second stage is off during the search (Model Optimizer converts its
# SequentialQuantizer to the single INT4 quantizer for AWQ).
SEARCH_QUANTIZERS: dict[str, tuple[int, Callable[[Tensor], Tensor]]] = {
    "int4_awq": (int4.DEFAULT_GROUP, int4_search_fake_quant),
    "w4a8_awq": (int4.DEFAULT_GROUP, int4_search_fake_quant),
    "nvfp4_awq": (nvfp4.BLOCK_SIZE, nvfp4_search_fake_quant),
}


def search_quantizer(weight_format: str) -> tuple[int, Callable[[Tensor], Tensor]]:
    return SEARCH_QUANTIZERS[weight_format.split("+", 1)[0]]


class AWQSearch:
    """The alpha search of one linear: feed it the layer's inputs with :meth:`observe`."""

    def __init__(self, weight: Tensor, x_mean: Tensor, block: int, fake_quant: Callable[[Tensor], Tensor]):
        self.weight = weight
        self.x_mean = x_mean
        self.w_mean = weight_scale(weight, block)
        self.fake_quant = fake_quant
        self.loss = {a: torch.zeros((), dtype=torch.float32) for a in ALPHAS}
        self.steps = 0

    @torch.no_grad()
    def observe(self, x: Tensor, bias: Tensor | None = None) -> None:
        if x.numel() == 0:
            return
        actual = F.linear(x, self.weight, bias)
        for alpha in ALPHAS:
            s = awq_scale(self.x_mean, self.w_mean, alpha)
            # The quantizers apply their pre_quant_scales in the model dtype.
            xs = x * (1 / s).to(x.dtype)
            ws = self.fake_quant(self.weight * s.to(self.weight.dtype))
            out = F.linear(xs, ws, bias)
            self.loss[alpha] += (out - actual).float().pow(2).mean().cpu()
        self.steps += 1

    def best_alpha(self) -> float | None:
        if not self.steps:
            return None
        losses = {a: float(v) for a, v in self.loss.items()}
        return min(losses, key=losses.get)

    def pre_quant_scale(self) -> Tensor:
        """float32 `1 / s` at the best alpha; ones where there is nothing to search on."""
        alpha = self.best_alpha()
        if alpha is None or not (torch.isfinite(self.x_mean).all() and torch.isfinite(self.w_mean).all()):
            return torch.ones(self.weight.shape[-1], dtype=torch.float32)
        return 1.0 / awq_scale(self.x_mean, self.w_mean, alpha)
