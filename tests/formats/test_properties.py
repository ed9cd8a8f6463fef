"""Property tests (hypothesis) for every format: error bounds per block, identity on representable
values, nothing non-finite from finite input — bf16, fp16 and fp32, subnormals and ±max included.

The bounds, exactly:

- NVFP4, block b with effective scale ``s = float32(block_scale * scale_2)`` (the product both
  encode and decode use) and ``y = x / s``: for ``|y| <= 6`` the error is at most half the gap
  between the neighbouring E2M1 magnitudes around ``|y|`` (0.5 below 2, 1 in [2, 4), 2 in [4, 6]),
  times ``s``. For ``|y| > 6`` the element saturates to exactly ``±6 s``; in a block whose scales are
  in the normal ranges (scale_2 a normal float32, the ideal block scale ``block_amax / (6 scale_2)``
  between 2**-6, the smallest normal e4m3, and 448, so not clamped: always so for weights, not
  for activations above their static scale) that happens only through the e4m3 rounding of the
  block scale: ``|y| <= 6 (1 + 2**-4)``.
- FP8 (per tensor, ``y = x / scale``): for ``|y| <= 448`` half the gap between neighbouring e4m3
  values around ``|y|`` (2**-9 below 2**-6, else 2**(floor(log2 |y|) - 3)), plus, for bf16/fp16
  inputs, half an ulp of the input dtype at ``y``: the quotient is rounded to the input dtype
  before the e4m3 cast, as Model Optimizer does (see fp8.py). Beyond 448 it saturates to ``±448 s``.

The tolerances added on top are float32 rounding of the quotient and of the dequantized value
(2**-22 relative) and half the smallest float32 subnormal.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantship.formats.fp8 import dequantize_fp8, fake_quantize_fp8, quantize_fp8, scale_from_amax
from quantship.formats.nvfp4 import (
    block_scales,
    dequantize_nvfp4,
    e2m1_values,
    fake_quantize_nvfp4_activation,
    input_scale_from_amax,
    quantize_nvfp4,
    unpack_fp4,
)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
TINY32 = 2.0**-149  # smallest float32 subnormal
PROFILE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- inputs


def _from_bits(dtype: torch.dtype, bits: int) -> float:
    if dtype == torch.float32:
        return struct.unpack("<f", struct.pack("<I", bits))[0]
    if dtype == torch.float16:
        return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]  # bfloat16: the top half of fp32


def _specials(dtype: torch.dtype) -> list[float]:
    fi = torch.finfo(dtype)
    sub = fi.smallest_normal * 2.0 ** -MANTISSA_BITS[dtype]
    base = [0.0, fi.max, fi.smallest_normal, sub, 2 * sub, fi.max / 3, 1.0, 6.0, 448.0]
    return base + [-v for v in base]


@st.composite
def tensors(draw, dtypes=DTYPES, max_rows: int = 3, max_blocks: int = 2, multiple: int = 16,
            even_rows: bool = False) -> torch.Tensor:
    """[rows, multiple * blocks] of finite values of one dtype: a common magnitude 2**e (anywhere in
    the dtype's range, subnormal included), the dtype's special values, and raw bit patterns.
    `even_rows`: an even row count (packed INT4 pairs rows)."""
    dtype = draw(st.sampled_from(dtypes))
    rows, blocks = draw(st.integers(1, max_rows)), draw(st.integers(1, max_blocks))
    rows += rows % 2 if even_rows else 0
    fi = torch.finfo(dtype)
    e = draw(st.integers(int(math.log2(fi.smallest_normal)) - MANTISSA_BITS[dtype], int(math.log2(fi.max))))
    nbits = 32 if dtype == torch.float32 else 16
    element = st.one_of(
        st.floats(-2.0, 2.0).map(lambda f: f * 2.0**e),
        st.sampled_from(_specials(dtype)),
        st.integers(0, 2**nbits - 1).map(lambda b: _from_bits(dtype, b)).filter(math.isfinite),
    )
    n = rows * blocks * multiple
    values = draw(st.lists(element, min_size=n, max_size=n))
    t = torch.tensor(values, dtype=torch.float64).clamp(-fi.max, fi.max).to(dtype)
    return t.reshape(rows, blocks * multiple)


# --------------------------------------------------------------------------- bounds


def _e2m1_half_gap(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m < 2, 0.25, torch.where(m < 4, 0.5, 1.0)).double()


def _e4m3_half_gap(m: torch.Tensor) -> torch.Tensor:
    exp = torch.floor(torch.log2(m.clamp_min(2.0**-6)))
    return 0.5 * torch.exp2(exp - 3)


def _half_ulp(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half an ulp of `dtype` at |y| (its subnormal spacing below the smallest normal)."""
    if dtype == torch.float32:
        return torch.zeros_like(m)
    fi = torch.finfo(dtype)
    exp = torch.floor(torch.log2(m.clamp_min(fi.smallest_normal)))
    return 0.5 * torch.exp2(exp - MANTISSA_BITS[dtype])


def _check_nvfp4_blocks(x: torch.Tensor, block_scale: torch.Tensor, s2: torch.Tensor, deq: torch.Tensor) -> None:
    """The per-block bound of the module docstring; `deq` is the float32 dequantization."""
    rows = x.shape[0]
    assert torch.isfinite(deq).all() and torch.isfinite(block_scale.float()).all()
    s32 = block_scale.float() * s2.float()  # the float32 product that encode and decode use
    s = s32.double()[..., None]
    x64 = x.double().reshape(rows, -1, 16)
    d = deq.double().reshape(rows, -1, 16)
    y = x64 / s
    m = y.abs()
    err = (d - x64).abs()
    tol = m * s * 2.0**-22 + d.abs() * 2.0**-22 + TINY32
    inside = m <= 6
    bound = _e2m1_half_gap(m) * s + tol
    bad = inside & (err > bound)
    assert not bad.any(), f"x={x64[bad][:4].tolist()} deq={d[bad][:4].tolist()} s={s.expand_as(d)[bad][:4].tolist()}"
    six = torch.where(y < 0, -1.0, 1.0) * (6.0 * s32).double()[..., None]
    assert torch.equal(d[~inside], six[~inside]), "saturation must give exactly ±6 s"
    block_amax = x64.abs().amax(-1)
    ideal = block_amax / (6 * s2.double())
    normal = (s2.double() >= 2.0**-126) & (ideal >= 2.0**-6) & (ideal <= 448) & (s32.double() >= 2.0**-126)
    overshoot = block_amax / s.squeeze(-1)
    assert (overshoot[normal] <= 6 * (1 + 2.0**-4) * (1 + 2.0**-21)).all(), overshoot[normal].max()


def _check_fp8(x: torch.Tensor, scale: torch.Tensor, deq: torch.Tensor) -> None:
    assert torch.isfinite(deq).all()
    s = scale.double()
    x64, d = x.double(), deq.double()
    y = x64 / s
    m = y.abs()
    err = (d - x64).abs()
    inside = m <= 448
    bound = (_e4m3_half_gap(m) + _half_ulp(m, x.dtype)) * s + m * s * 2.0**-22 + d.abs() * 2.0**-22 + TINY32
    bad = inside & (err > bound)
    assert not bad.any(), f"x={x64[bad][:4].tolist()} deq={d[bad][:4].tolist()} scale={s.item()}"
    sat = torch.where(y < 0, -1.0, 1.0) * (448.0 * scale.float()).double()
    assert torch.equal(d[~inside], sat[~inside]), "saturation must give exactly ±448 scale"


# --------------------------------------------------------------------------- NVFP4


@PROFILE
@given(tensors(), st.integers(0, 12))
def test_nvfp4_weight_error_within_half_a_step_per_block(x, shared_boost):
    """scale_2 from the tensor itself, or a larger one shared with fused siblings."""
    q = quantize_nvfp4(x)
    _check_nvfp4_blocks(x, q.block_scale, q.scale_2, dequantize_nvfp4(q.packed, q.block_scale, q.scale_2, torch.float32))
    assert torch.isfinite(q.scale_2).all() and (q.scale_2 > 0).all()
    assert torch.isfinite(dequantize_nvfp4(q.packed, q.block_scale, q.scale_2, x.dtype)).all()
    shared = q.scale_2 * 2.0**shared_boost  # a sibling with a larger amax sets the group's scale_2
    if torch.isfinite(shared * 2688).all():
        g = quantize_nvfp4(x, shared)
        _check_nvfp4_blocks(x, g.block_scale, g.scale_2, dequantize_nvfp4(g.packed, g.block_scale, g.scale_2, torch.float32))


@PROFILE
@given(tensors(), st.floats(0.0, 1.0))
def test_nvfp4_activation_error_within_half_a_step_per_block(x, where):
    """A static input scale from a calibration amax in x's dtype: inputs in range or saturating."""
    fi = torch.finfo(x.dtype)
    lo, hi = math.log2(max(2688 * 2.0**-126, fi.smallest_normal)), math.log2(fi.max)
    amax = torch.tensor(2.0 ** (lo + where * (hi - lo))).to(x.dtype).float()
    s = input_scale_from_amax(amax)
    assert torch.isfinite(fake_quantize_nvfp4_activation(x, s)).all()
    # In float32 (x is exact there): the engine's numbers before the cast back to x.dtype.
    _check_nvfp4_blocks(x, block_scales(x, s), s, fake_quantize_nvfp4_activation(x.float(), s))


@st.composite
def representable_nvfp4(draw):
    """(x, codes, block scales, k): x = e2m1(code) * block_scale * 2**k exactly, with one ±6 per
    block and one block at scale 448, so that quantization must find exactly these scales."""
    dtype = draw(st.sampled_from(DTYPES))
    rows, blocks = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    fi = torch.finfo(dtype)
    k = draw(st.integers(math.ceil(math.log2(fi.smallest_normal)) + 10, math.floor(math.log2(fi.max / 2688))))
    codes = torch.tensor(draw(st.lists(st.integers(0, 15), min_size=rows * blocks * 16, max_size=rows * blocks * 16)),
                         dtype=torch.uint8).reshape(rows, blocks, 16)
    six = draw(st.lists(st.sampled_from([7, 15]), min_size=rows * blocks, max_size=rows * blocks))
    at = draw(st.lists(st.integers(0, 15), min_size=rows * blocks, max_size=rows * blocks))
    codes.view(-1, 16)[torch.arange(rows * blocks), torch.tensor(at)] = torch.tensor(six, dtype=torch.uint8)
    scale_bytes = draw(st.lists(st.integers(0x01, 0x7E), min_size=rows * blocks, max_size=rows * blocks))
    scale_bytes[draw(st.integers(0, rows * blocks - 1))] = 0x7E  # 448
    bs = torch.tensor(scale_bytes, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(rows, blocks)
    x = e2m1_values(codes).double() * bs.double()[..., None] * 2.0**k
    return x.reshape(rows, -1).to(dtype), codes.reshape(rows, -1), bs, k


@PROFILE
@given(representable_nvfp4())
def test_nvfp4_quantizing_representable_values_is_the_identity(case):
    x, codes, bs, k = case
    assert torch.equal(x.double().reshape(codes.shape[0], -1, 16),
                       e2m1_values(codes).double().reshape(codes.shape[0], -1, 16) * bs.double()[..., None] * 2.0**k)
    q = quantize_nvfp4(x)
    assert q.scale_2.item() == 2.0**k
    assert torch.equal(q.block_scale.view(torch.uint8), bs.view(torch.uint8))
    # Code 8 (-0) comes back as code 0: -0.0 is not < 0 (Model Optimizer's sign rule, nvfp4.py).
    assert torch.equal(unpack_fp4(q.packed), torch.where(codes == 8, 0, codes).to(torch.uint8))
    assert torch.equal(dequantize_nvfp4(q.packed, q.block_scale, q.scale_2, x.dtype), x)


# --------------------------------------------------------------------------- FP8


@PROFILE
@given(tensors())
def test_fp8_weight_error_within_half_a_step(x):
    q, scale = quantize_fp8(x)
    assert torch.isfinite(scale) and scale > 0
    _check_fp8(x, scale, dequantize_fp8(q, scale, torch.float32))
    assert torch.isfinite(dequantize_fp8(q, scale, x.dtype)).all()


@PROFILE
@given(tensors(), st.floats(0.0, 1.0))
def test_fp8_static_activation_scale_error_or_saturation(x, where):
    """A static scale from a calibration amax in x's dtype; inputs above it saturate."""
    fi = torch.finfo(x.dtype)
    amax = 2.0 ** (-126 + 9 + where * (math.log2(fi.max) + 126 - 9))
    scale = scale_from_amax(torch.tensor(amax).to(x.dtype).float())
    out = fake_quantize_fp8(x, scale)
    assert torch.isfinite(out).all()
    q, s = quantize_fp8(x, scale)
    _check_fp8(x, s, dequantize_fp8(q, s, torch.float32))


@st.composite
def representable_fp8(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 48))
    fi = torch.finfo(dtype)
    k = draw(st.integers(math.ceil(math.log2(fi.smallest_normal)) + 9, math.floor(math.log2(fi.max / 448))))
    codes = draw(st.lists(st.one_of(st.integers(0x00, 0x7E), st.integers(0x80, 0xFE)), min_size=n, max_size=n))
    codes[draw(st.integers(0, n - 1))] = draw(st.sampled_from([0x7E, 0xFE]))  # ±448 sets the scale
    q = torch.tensor(codes, dtype=torch.uint8).view(torch.float8_e4m3fn)
    return (q.double() * 2.0**k).to(dtype), q, k


@PROFILE
@given(representable_fp8())
def test_fp8_quantizing_representable_values_is_the_identity(case):
    x, q_expected, k = case
    q, scale = quantize_fp8(x)
    assert scale.item() == 2.0**k
    assert torch.equal(q.view(torch.uint8), q_expected.view(torch.uint8))  # -0 (0x80) included
    assert torch.equal(dequantize_fp8(q, scale, x.dtype), x)


@pytest.mark.parametrize("which", ["max", "-max", "tiny", "subnormal", "zero"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extremes_of_every_dtype_stay_finite(dtype, which):
    """Whole tensors at one extreme: the scales stay finite and > 0, and nothing dequantizes
    to NaN or inf (fp32 subnormals once gave a zero scale: 0/0 in FP8)."""
    fi = torch.finfo(dtype)
    v = {"max": fi.max, "-max": -fi.max, "tiny": fi.smallest_normal, "zero": 0.0,
         "subnormal": fi.smallest_normal * 2.0 ** -MANTISSA_BITS[dtype]}[which]
    x = torch.zeros(2, 32, dtype=torch.float64)
    x[0, ::3] = v
    x = x.to(dtype)
    q = quantize_nvfp4(x)
    assert torch.isfinite(q.scale_2).all() and (q.scale_2 > 0).all()
    _check_nvfp4_blocks(x, q.block_scale, q.scale_2, dequantize_nvfp4(q.packed, q.block_scale, q.scale_2, torch.float32))
    assert torch.isfinite(dequantize_nvfp4(q.packed, q.block_scale, q.scale_2, dtype)).all()
    q8, s = quantize_fp8(x)
    assert torch.isfinite(s) and s > 0
    _check_fp8(x, s, dequantize_fp8(q8, s, torch.float32))
    assert torch.isfinite(dequantize_fp8(q8, s, dtype)).all()
