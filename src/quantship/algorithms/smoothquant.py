"""SmoothQuant (Xiao et al. 2022, arXiv:2211.10438) for `int8_sq`, as Model Optimizer 0.47
computes it (`modelopt/torch/quantization/model_calib.py` `smoothquant`, alpha 1.0 in
`INT8_SMOOTHQUANT_CFG`).

Per input channel, `pre_quant_scale = w_amax^(1 - alpha) / x_amax^alpha` (w_amax: the column's
|w| max, x_amax: the channel's calibration |x| max), clamped to [1e-4, 1e4]; channels that never
saw a non-zero activation get 1. The activation is multiplied by it and the weight divided, so
with alpha 1 every channel of the smoothed input has amax 1 and per-tensor INT8 loses nothing to
outlier channels. A linear that saw no token gets the neutral scale 1, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_ALPHA = 1.0
_EPSILON = 1.0 / (1 << 31)


def smoothquant_scale(weight: Tensor, x_amax: Tensor | None, alpha: float = DEFAULT_ALPHA) -> Tensor:
    """float32 per-input-channel pre_quant_scale of one linear."""
    n = weight.shape[-1]
    if x_amax is None or not torch.isfinite(x_amax).all():
        return torch.ones(n, dtype=torch.float32)
    act = x_amax.float()
    w_amax = weight.abs().amax(dim=0, keepdim=True)  # in the weight dtype, as Model Optimizer
    scale = (w_amax.pow(1 - alpha) / act.pow(alpha)).squeeze().float()
    if scale.min() <= _EPSILON or not torch.isfinite(scale).all():
        scale = torch.where((act <= _EPSILON) | ~torch.isfinite(scale), torch.ones_like(scale), scale)
    return scale.clamp(min=1e-4, max=1e4)
