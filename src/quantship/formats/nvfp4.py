"""NVFP4 (E2M1 values, E4M3 block scales of 16, one fp32 global scale) as pure CPU torch functions.

This is the reference every kernel and exporter builds on. The numerics follow the definition in
DESIGN.md ("Formats — exact definitions") and reproduce Model Optimizer 0.47
(``modelopt/torch/quantization/qtensor/nvfp4_tensor.py``) bit for bit: packed bytes, e4m3 block
scales and ``weight_scale_2``. ``tests/formats/test_modelopt_oracle.py`` proves it.

Conventions defined here, once (consumers: ``export/`` writers and the serving engines):

- ``scale_2`` (Model Optimizer's ``weight_scale_2``) is a *multiplier*: real = value * block_scale
  * scale_2. compressed-tensors stores its reciprocal as ``weight_global_scale``.
- Nibble order: the even element of a pair sits in the low nibble (``byte = c[2i] | c[2i+1] << 4``).

Known divergences from Model Optimizer (all deliberate):

- An all-zero tensor: Model Optimizer computes ``scale_2 = 0`` and then 0/0 = NaN block scales
  (and codes 7, i.e. +6.0); we use the scale of ``amax = 1.0`` so everything stays finite and
  dequantizes to exact zeros.
- ``scale_2`` never goes below the smallest normal float32 (amax under ~3e-35: fp32 subnormals),
  where Model Optimizer's underflows to 0 or to a few-bit subnormal.
- Code 8 (sign bit alone) dequantizes to ``-0.0`` here and to ``+0.0`` in Model Optimizer's table.
  The two compare equal; only ``signbit`` tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantship.formats.exact import div_const
from quantship.formats.kernels import use_kernels

E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK_SIZE = 16
# Smallest positive e4m3 (a subnormal): a block scale below it would cast to 0 and make the
# block's codes infinite; clamping keeps every stored scale positive.
E4M3_MIN_SCALE = 2.0**-9

_WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Magnitudes by code (bits 0-2); bit 3 is the sign. Code 8 is "-0.0" so that a negative value
# that rounds to zero keeps its sign when dequantized.
_E2M1_TABLE = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)
# Midpoints between neighbouring magnitudes. searchsorted(left) counts the bounds strictly
# below |x|, so a value exactly on a bound goes to the lower neighbour ...
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
# ... which is the even code for 0.25, 1.25, 2.5 and 5; on these three bounds the upper neighbour
# (1.0, 2.0, 4.0) has the even code, so ties there must go up (round half to even).
_TIES_UP = (0.75, 1.75, 3.5)


@dataclass(frozen=True)
class NVFP4Weight:
    """One quantized weight: ``packed`` uint8 [..., in/2], ``block_scale`` float8_e4m3fn
    [..., in/16], ``scale_2`` float32, 0-dim or one per leading matrix (fused experts)."""

    packed: Tensor
    block_scale: Tensor
    scale_2: Tensor


# --------------------------------------------------------------------------- E2M1 codes


def round_to_e2m1_codes(x: Tensor) -> Tensor:
    """Round values already divided by their block scale to 4-bit E2M1 codes (uint8, 0..15).

    Nearest magnitude, ties to the even code, saturating at 6 (inf included). The sign bit is
    taken from ``x < 0`` as Model Optimizer does, so ``-0.0`` gives code 0 while ``-0.1`` (which
    rounds to zero) gives code 8.
    """
    x = x.float()
    mag = x.abs()
    bounds = _E2M1_BOUNDS.to(x.device)
    idx = torch.searchsorted(bounds, mag)  # 0..7; a value beyond 5 (or inf) saturates at 7
    for tie in _TIES_UP:
        idx += mag == tie
    sign = (x < 0).to(torch.uint8) << 3
    return idx.to(torch.uint8) | sign


def e2m1_values(codes: Tensor) -> Tensor:
    """Decode E2M1 codes to float32 (code 0 -> +0.0, code 8 -> -0.0)."""
    return _E2M1_TABLE.to(codes.device)[codes.long()]


def pack_fp4(codes: Tensor) -> Tensor:
    """Pack uint8 codes two per byte along the last dim: ``byte = c[2i] | c[2i+1] << 4``."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_fp4 expects uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dim, got shape {tuple(codes.shape)}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_fp4`: uint8 [..., m] -> codes [..., 2m]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_fp4 expects uint8, got {packed.dtype}")
    pairs = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


# --------------------------------------------------------------------------- scales


def global_scale_from_amax(amax: Tensor) -> Tensor:
    """``scale_2 = amax / (6 * 448)`` in float32, elementwise (amax may be per expert).

    The global scale puts the largest block's scale at the top of e4m3 (448). An amax of 0 (an
    all-zero tensor) gets the scale of amax 1.0: any positive scale reproduces zeros exactly,
    while a zero scale makes every block scale 0/0 = NaN (what Model Optimizer writes).
    """
    amax = torch.as_tensor(amax).float()
    amax = torch.where(amax == 0, torch.ones_like(amax), amax)
    # A subnormal amax (fp32 weights under ~3e-35) would give a zero or few-bit scale_2: zero
    # scales, 0/0 block scales. Floored at the smallest normal float32, such a tensor
    # quantizes to its nearest codes under that scale, never to NaN.
    return div_const(amax, E2M1_MAX * E4M3_MAX).clamp_min(torch.finfo(torch.float32).smallest_normal)


def input_scale_from_amax(amax: Tensor) -> Tensor:
    """Static activation scale ``amax / (6 * 448)`` (float32); the per-tensor level under which
    the serving engine computes dynamic per-block e4m3 scales. No zero fix-up here: a zero input
    amax means calibration saw nothing, which ``verify`` must flag rather than hide."""
    return div_const(amax, E2M1_MAX * E4M3_MAX)


def _check_last_dim(x: Tensor, what: str) -> None:
    if x.ndim == 0 or x.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"{what}: last dim must be a multiple of {BLOCK_SIZE}, got shape {tuple(x.shape)}")


def _per_block(scale: Tensor, x: Tensor, what: str) -> Tensor:
    """Shape a 0-dim or per-matrix (``x.shape[:-2]``) scale to broadcast over ``[..., rows, nb]``."""
    scale = torch.as_tensor(scale, device=x.device).float()
    if scale.ndim == 0:
        return scale
    if x.ndim < 2 or scale.shape != x.shape[:-2]:
        raise ValueError(
            f"{what} must be 0-dim or have shape {tuple(x.shape[:-2])} (one per matrix of a "
            f"tensor of shape {tuple(x.shape)}), got {tuple(scale.shape)}"
        )
    return scale[..., None, None]


def _block_scales(x: Tensor, s2: Tensor) -> Tensor:
    """e4m3 block scales for ``x`` [..., n] given a scale already broadcastable to [..., n/16]."""
    blocks = x.reshape(*x.shape[:-1], -1, BLOCK_SIZE)
    # |x| is exact in every input dtype, so taking the max before or after .float() is the same.
    block_amax = blocks.abs().amax(dim=-1).float()
    # Same float32 op order as Model Optimizer: block_amax / (6 * scale_2), one rounding each.
    scale = block_amax / (E2M1_MAX * s2)
    # Zero blocks (and, as in Model Optimizer, blocks whose ratio underflows to 0) get 1.0: any
    # positive scale encodes zeros exactly, and 1.0 is what Model Optimizer writes.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    # Clamp before the cast: below 2**-9 the cast would give 0 (infinite codes), and above 448
    # we do not rely on the cast's own overflow behaviour.
    return scale.clamp(E4M3_MIN_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)


def block_scales(w: Tensor, scale_2: Tensor) -> Tensor:
    """Per-block e4m3 scales ``e4m3(clamp(block_amax / (6 * scale_2), 2**-9, 448))``, shape
    [..., n/16]; ``scale_2`` is 0-dim or has shape ``w.shape[:-2]`` (one per expert matrix)."""
    _check_last_dim(w, "block_scales")
    return _block_scales(w, _per_block(scale_2, w, "scale_2"))


# --------------------------------------------------------------------------- quantize


def _encode(x: Tensor, block_scale: Tensor, s2: Tensor) -> Tensor:
    """Codes for ``x`` [..., n]: ``round(x / (float(block_scale) * s2))``.

    Division by the float32 product (not multiplication by a reciprocal) is Model Optimizer's
    order; any other order changes codes at rounding ties, so the bytes would differ."""
    denom = block_scale.float() * s2
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK_SIZE)
    return round_to_e2m1_codes(blocks / denom.unsqueeze(-1)).reshape(x.shape)


def _decode(codes: Tensor, block_scale: Tensor, s2: Tensor, dtype: torch.dtype) -> Tensor:
    # value * (block_scale * scale_2): Model Optimizer forms the product of the two scales first
    # (one float32 rounding), then multiplies; keeping that grouping keeps the result bit-equal.
    values = e2m1_values(codes).reshape(*codes.shape[:-1], -1, BLOCK_SIZE)
    step = block_scale.float() * s2
    return (values * step.unsqueeze(-1)).reshape(codes.shape).to(dtype)


def quantize_nvfp4(w: Tensor, scale_2: Tensor | None = None) -> NVFP4Weight:
    """Quantize a weight [out, in] or fused experts [E, out, in] to NVFP4.

    ``scale_2=None`` derives it from the amax of each matrix (0-dim for 2-D, shape [E] for 3-D,
    so every expert is quantized as if alone). A given ``scale_2`` (e.g. the max over a fused
    q/k/v group) is 0-dim or has shape ``w.shape[:-2]``. The returned ``scale_2`` always has
    shape ``w.shape[:-2]``.
    """
    if w.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"quantize_nvfp4 expects bf16/fp16/fp32, got {w.dtype}")
    if w.ndim not in (2, 3):
        raise ValueError(f"quantize_nvfp4 expects [out, in] or [E, out, in], got shape {tuple(w.shape)}")
    _check_last_dim(w, "quantize_nvfp4")
    if use_kernels(w):  # same bytes, one pass on the GPU (formats/kernels/)
        from quantship.formats.kernels import nvfp4_triton

        return nvfp4_triton.quantize(w, scale_2)
    if scale_2 is None:
        amax = w.abs().amax(dim=(-2, -1))
        if not torch.isfinite(amax).all():
            raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or inf")
        scale_2 = global_scale_from_amax(amax)
    s2 = _per_block(scale_2, w, "scale_2")
    scale = _block_scales(w, s2)
    codes = _encode(w, scale, s2)
    # Stored with one value per matrix even when a single scale was given, so that an exporter
    # splitting fused experts can always index scale_2[e].
    per_matrix = s2.reshape(s2.shape[: w.ndim - 2]).expand(w.shape[:-2]).clone()
    return NVFP4Weight(pack_fp4(codes), scale, per_matrix)


def dequantize_nvfp4(
    packed: Tensor, block_scale: Tensor, scale_2: Tensor, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """``value * block_scale * scale_2`` computed in float32, then cast to ``dtype``."""
    if use_kernels(packed):
        from quantship.formats.kernels import nvfp4_triton

        return nvfp4_triton.dequantize(packed, block_scale, scale_2, dtype)
    codes = unpack_fp4(packed)
    _check_last_dim(codes, "dequantize_nvfp4")
    return _decode(codes, block_scale, _per_block(scale_2, codes, "scale_2"), dtype)


def fake_quantize_nvfp4_weight(w: Tensor, scale_2: Tensor | None = None) -> Tensor:
    """``dequantize(quantize(w))`` in ``w.dtype``: what the served model will compute with."""
    q = quantize_nvfp4(w, scale_2)
    return dequantize_nvfp4(q.packed, q.block_scale, q.scale_2, dtype=w.dtype)


def fake_quantize_nvfp4_activation_rows(x: Tensor, input_scales: Tensor) -> Tensor:
    """:func:`fake_quantize_nvfp4_activation` with one input scale per row of ``x`` [R, n]: the
    rows of many experts in one pass (GPTQ's Hessian collection), each row exactly what a call
    with its own scale gives (the same float32 operations, broadcast). Scales are not checked
    here (reading them back would be a device sync): callers pass planned, positive scales."""
    _check_last_dim(x, "fake_quantize_nvfp4_activation_rows")
    s = input_scales.to(device=x.device, dtype=torch.float32).reshape(-1, 1)
    if x.ndim != 2 or s.shape[0] != x.shape[0]:
        raise ValueError(f"need x [R, n] and R scales, got {tuple(x.shape)} and {tuple(input_scales.shape)}")
    scale = _block_scales(x, s)
    return _decode(_encode(x, scale, s), scale, s, x.dtype)


def fake_quantize_nvfp4_activation(x: Tensor, input_scale: Tensor) -> Tensor:
    """Model the serving engine's activation quantization under a static per-tensor scale.

    Per block of 16 along the last dim: ``block_scale = e4m3(clamp(block_amax / (6 *
    input_scale), 2**-9, 448))`` (zero blocks 1.0), E2M1 codes, then dequantized back to
    ``x.dtype``. Any leading shape. Engines' kernels multiply by reciprocals and may differ
    from this in the last bit at rounding ties; this is the definition, not a kernel replica.
    """
    _check_last_dim(x, "fake_quantize_nvfp4_activation")
    s = torch.as_tensor(input_scale, device=x.device).float()
    if s.numel() != 1:
        raise ValueError(f"input_scale must be a single value, got shape {tuple(s.shape)}")
    s = s.reshape(())
    if not (torch.isfinite(s) and s > 0):
        raise ValueError(f"input_scale must be finite and positive, got {s.item()}")
    if use_kernels(x):
        from quantship.formats.kernels import nvfp4_triton

        return nvfp4_triton.fake_quantize_activation(x, s)
    scale = _block_scales(x, s)
    return _decode(_encode(x, scale, s), scale, s, x.dtype)
