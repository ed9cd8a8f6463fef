"""FP8 E4M3 per-tensor kernels: quantize, dequantize and fake-quant, one pass each.

Bit-exact with ``quantship.formats.fp8``: ``x / scale`` in float32 (IEEE division), clamp to
±448, the quotient rounded to the input's dtype for bf16/fp16 inputs (Model Optimizer's double
rounding, see that module), then round-to-nearest-even to e4m3. Fused experts ``[E, out, in]``
use one scale per matrix (``scale[i // per_matrix]`` for flat element ``i``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantship.formats.kernels.common import launch_device, quotient

BLOCK = 2048
DIV = 0  # 0: IEEE division per element; 1: reciprocal + FMA correction (see common.quotient)


@triton.jit
def _to_e4m3(x, scale, recip, ROUND_TO: tl.constexpr, DIV: tl.constexpr):
    q = quotient(x.to(tl.float32), scale, recip, DIV, True)
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    if ROUND_TO == 1:
        q = q.to(tl.bfloat16).to(tl.float32)
    elif ROUND_TO == 2:
        q = q.to(tl.float16).to(tl.float32)
    return q.to(tl.float8e4nv)


@triton.jit
def _fp8_kernel(x_ptr, scale_ptr, recip_ptr, out_ptr, per_matrix,
                MODE: tl.constexpr, ROUND_TO: tl.constexpr, BLOCK: tl.constexpr, DIV: tl.constexpr):
    """MODE 0: quantize (out is e4m3); 1: dequantize (x is e4m3); 2: fake-quant.
    Grid: (chunks of one matrix, matrices); each matrix has its own scale."""
    m = tl.program_id(1)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < per_matrix
    offs = m.to(tl.int64) * per_matrix + idx
    scale = tl.load(scale_ptr + m)
    recip = tl.load(recip_ptr + m)  # RN(1 / scale), used when DIV == 1
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if MODE == 0:
        y = _to_e4m3(x, scale, recip, ROUND_TO, DIV)
    elif MODE == 1:
        y = x.to(tl.float32) * scale
    else:
        y = _to_e4m3(x, scale, recip, ROUND_TO, DIV).to(tl.float32) * scale
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


_ROUND_TO = {torch.bfloat16: 1, torch.float16: 2}


def _launch(x: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, mode: int, round_to: int,
            div: int | None = None) -> torch.Tensor:
    scale = torch.as_tensor(scale, device=x.device).float().reshape(-1).contiguous()
    numel = x.numel()
    if numel == 0:
        return out
    per_matrix = numel // scale.numel()
    if per_matrix * scale.numel() != numel:
        raise ValueError(f"{scale.numel()} scales do not split a tensor of shape {tuple(x.shape)} into equal matrices")
    with launch_device(x):
        _fp8_kernel[(triton.cdiv(per_matrix, BLOCK), scale.numel())](
            x, scale, torch.reciprocal(scale), out, per_matrix, MODE=mode, ROUND_TO=round_to, BLOCK=BLOCK, num_warps=4,
            DIV=DIV if div is None else div)
    return out


def quantize(x: torch.Tensor, scale: torch.Tensor, div: int | None = None) -> torch.Tensor:
    """e4m3 codes of ``x`` under one scale, or one scale per leading matrix."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    return _launch(x, scale, out, 0, _ROUND_TO.get(x.dtype, 0), div)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``float(q) * scale`` in float32, rounded once to ``dtype``."""
    q = q.contiguous()
    return _launch(q, scale, torch.empty(q.shape, dtype=dtype, device=q.device), 1, 0)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, div: int | None = None) -> torch.Tensor:
    """Quantize-dequantize round trip in ``x.dtype``, one read and one write."""
    x = x.contiguous()
    return _launch(x, scale, torch.empty_like(x), 2, _ROUND_TO.get(x.dtype, 0), div)
