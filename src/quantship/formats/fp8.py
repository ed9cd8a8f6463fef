"""FP8 E4M3 per-tensor quantization (W8A8 weights, activations, KV cache) as pure torch functions.

Convention (consumers: ``export/`` writers, serving engines): ``scale`` is a multiplier,
real = fp8 value * scale, with ``scale = amax / 448`` in float32.

Compared with Model Optimizer 0.47. Its export (``export/quant_utils.py``,
``to_quantized_weight``) computes ``scale = amax.float() / 448`` and
``(weight / scale).to(float8_e4m3fn)``; with a bf16/fp16 weight and a 0-dim float32 scale torch
evaluates the quotient in float32 and rounds it to the *weight's* dtype before the e4m3 cast. That
double rounding moves about 2% of bf16 elements by one e4m3 step (bf16 rounding lands values
exactly on e4m3 ties). We reproduce it on purpose, so our bytes equal its checkpoints bit for bit
(``test_modelopt_oracle.py`` checks bf16, fp16 and fp32 against ``FP8QTensor.quantize``).
Remaining differences:

- ``FP8QTensor.quantize(w)`` without a scale computes ``amax / 448`` in the weight's dtype (a
  bf16-rounded scale); we always keep the float32 scale that its export path and the
  checkpoint use.
- An all-zero tensor: Model Optimizer's scale is 0 (0/0 = NaN codes); ours is 1/448.
- A scale never goes below the smallest normal float32 (amax under ~5e-36, fp32 subnormals).
- Saturation is an explicit clamp at ±448 rather than the cast's own overflow behaviour.
- Dequantize: Model Optimizer multiplies in the target dtype (scale rounded to bf16 first); we
  multiply in float32 and round once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantship.formats.exact import div_const
from quantship.formats.kernels import use_kernels

FP8_MAX = 448.0


def scale_from_amax(amax: Tensor) -> Tensor:
    """``amax / 448`` in float32, elementwise. An amax of 0 gets the scale of amax 1.0: any
    positive scale reproduces zeros exactly, and a zero scale would turn them into 0/0 = NaN."""
    amax = torch.as_tensor(amax).float()
    amax = torch.where(amax == 0, torch.ones_like(amax), amax)
    # Floored at the smallest normal float32: a subnormal amax (fp32 tensors under ~5e-36) would
    # give a zero scale (0/0 = NaN) or one of a few bits that the tensor's own amax overflows.
    return div_const(amax, FP8_MAX).clamp_min(torch.finfo(torch.float32).smallest_normal)


def _as_scalar_scale(scale: Tensor, device: torch.device) -> Tensor:
    s = torch.as_tensor(scale, device=device).float()
    if s.numel() != 1:
        raise ValueError(f"per-tensor FP8 needs a single scale, got shape {tuple(s.shape)}")
    return s.reshape(())


def quantize_fp8(w: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-tensor E4M3: returns ``(q float8_e4m3fn, scale float32 0-dim)``.

    ``q = e4m3(clamp(w / scale, -448, 448))``, the division done in float32 and, as in Model
    Optimizer's export, rounded to ``w.dtype`` before the e4m3 cast (see the module docstring).
    The clamp comes first so an fp16 quotient cannot overflow to inf.
    """
    if scale is None:
        amax = w.abs().amax()
        if not torch.isfinite(amax):
            raise ValueError(f"tensor of shape {tuple(w.shape)} contains NaN or inf")
        scale = scale_from_amax(amax)
    scale = _as_scalar_scale(scale, w.device)
    if use_kernels(w):  # same bytes, one pass on the GPU (formats/kernels/)
        from quantship.formats.kernels import fp8_triton

        return fp8_triton.quantize(w, scale), scale
    quotient = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX)
    if w.dtype in (torch.bfloat16, torch.float16):
        quotient = quotient.to(w.dtype)
    return quotient.to(torch.float8_e4m3fn), scale


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``q * scale`` in float32 (exact e4m3 -> float32, one rounding), then cast to ``dtype``."""
    if use_kernels(q):
        from quantship.formats.kernels import fp8_triton

        return fp8_triton.dequantize(q, _as_scalar_scale(scale, q.device), dtype)
    return (q.float() * _as_scalar_scale(scale, q.device)).to(dtype)


def fake_quantize_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """Quantize-dequantize round trip in ``x.dtype`` (static per-tensor scale)."""
    if use_kernels(x):  # fused: one read, one write
        from quantship.formats.kernels import fp8_triton

        return fp8_triton.fake_quantize(x, _as_scalar_scale(scale, x.device))
    q, s = quantize_fp8(x, scale)
    return dequantize_fp8(q, s, dtype=x.dtype)


def fake_quantize_fp8_rows(x: Tensor, scales: Tensor) -> Tensor:
    """:func:`fake_quantize_fp8` with one scale per row of ``x`` [R, n] (rows of many experts at
    once): the reference's float32 operations, broadcast, so each row equals its own call."""
    s = scales.to(device=x.device, dtype=torch.float32).reshape(-1, 1)
    if x.ndim != 2 or s.shape[0] != x.shape[0]:
        raise ValueError(f"need x [R, n] and R scales, got {tuple(x.shape)} and {tuple(scales.shape)}")
    quotient = (x.float() / s).clamp(-FP8_MAX, FP8_MAX)
    if x.dtype in (torch.bfloat16, torch.float16):
        quotient = quotient.to(x.dtype)
    return (quotient.to(torch.float8_e4m3fn).float() * s).to(x.dtype)


def quantize_fp8_experts(w: Tensor, scale: Tensor) -> Tensor:
    """Fused experts ``[E, ...]`` with one per-tensor scale each: e4m3 codes, as
    :func:`quantize_fp8` on every expert (one launch on the GPU)."""
    scale = torch.as_tensor(scale, device=w.device).float().reshape(-1)
    if scale.numel() != w.shape[0]:
        raise ValueError(f"need one scale per expert ({w.shape[0]}), got {scale.numel()}")
    if use_kernels(w):
        from quantship.formats.kernels import fp8_triton

        return fp8_triton.quantize(w, scale)
    return torch.stack([quantize_fp8(e, s)[0] for e, s in zip(w, scale, strict=True)])


def dequantize_fp8_experts(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Inverse of :func:`quantize_fp8_experts`."""
    scale = torch.as_tensor(scale, device=q.device).float().reshape(-1)
    if scale.numel() != q.shape[0]:
        raise ValueError(f"need one scale per expert ({q.shape[0]}), got {scale.numel()}")
    if use_kernels(q):
        from quantship.formats.kernels import fp8_triton

        return fp8_triton.dequantize(q, scale, dtype)
    return torch.stack([dequantize_fp8(e, s, dtype) for e, s in zip(q, scale, strict=True)])


def _absmax(x: Tensor) -> Tensor:
    """``|x|.max()`` as float32; one read on the GPU (NaN reads as inf there, NaN here:
    non-finite either way)."""
    if use_kernels(x):
        from quantship.formats.kernels import amax

        return amax.tensor_amax(x)
    return x.abs().amax().float()
