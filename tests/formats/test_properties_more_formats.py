"""Property tests (hypothesis) for the formats beyond NVFP4 / per-tensor FP8 (issue 7): INT4
groups, INT8 channels and static activations, MXFP8 / MXFP4, FP8 per channel and per block,
the NVFP4 family with a free block size (W4A8) and NVFP4 four-over-six.

The step of each block, exactly (``s`` the float32 scale the decoder multiplies by, ``y = x / s``):

- uniform int (INT4, INT8): the grid is ``k * s``, so the bound is ``s / 2`` while ``y`` lies in
  ``[min_code - 1/2, max_code + 1/2]``; beyond, the code saturates to exactly ``min_code s`` or
  ``max_code s``. For weights that happens only when the float32 scale ``amax / maxbound`` is a
  subnormal (its relative error is no longer 2**-24).
- MX (``s = 2**shared_exponent``): half the element grid spacing at ``|y|`` times ``s``: E4M3
  2**-10 below 2**-6, else 2**(floor(log2 |y|) - 4); E2M1 0.25 below 2, 0.5 in [2, 4), 1 in
  [4, 6]. The exponent is a ceil, so ``|y|`` exceeds the element max only by the float32
  rounding of ``log2(amax / max)``: ``<= max (1 + 2**-20)``, saturating to exactly ``±max s``.
  At the top of the dtype (bf16/fp16/fp32 max) the grid point above may overflow it: the one
  below is taken, a full gap.
- FP8 per channel / per block (``s = amax / 448``): the E4M3 half gap, saturating at ``±448 s``
  (only by the rounding of ``s``, while ``s`` is a normal float32).
- FP4 blocks (``s = float32(block_scale * scale_2)``): the E2M1 half gap, saturation exactly
  ``±6 s``, overshoot ``<= 6 (1 + 2**-4)`` where the scales are normal (as test_properties.py).

Tolerances on top: float32 rounding of the quotient and of the dequantized value (2**-22
relative) and half the smallest float32 subnormal times the step.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.formats.test_properties import DTYPES, MANTISSA_BITS, PROFILE, TINY32
from tests.formats.test_properties import tensors as base_tensors

from quantship.formats import fp4_blocks, fp8_variants, int4, int8, mxfp, nvfp4_four_over_six
from quantship.formats.nvfp4 import e2m1_values

PROFILE = settings(PROFILE, max_examples=25)  # 16 property tests: keep the file near 10 s
HALF = 0.5  # the half in "half a step"; every bound below is written with it
def tensors(multiple: int = 16, max_rows: int = 4, max_blocks: int = 2, even_rows: bool = False):
    """test_properties.py's `tensors`, up to 4 rows by default, in blocks of `multiple` columns."""
    return base_tensors(DTYPES, max_rows, max_blocks, multiple, even_rows)


def _sign(y: torch.Tensor) -> torch.Tensor:
    return torch.where(y < 0, -1.0, 1.0).double()


def _tol(x64: torch.Tensor, d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x64.abs() * 2.0**-22 + d.abs() * 2.0**-22 + TINY32 * (1 + s)


# --------------------------------------------------------------------------- bounds


def _check_uniform(x: torch.Tensor, s32: torch.Tensor, deq: torch.Tensor, lo: int, hi: int,
                   weight: bool) -> None:
    """Uniform int grid ``k * s`` (``s32`` per element, float32): half a step inside, the clamp
    code times ``s`` outside; for weights, outside only under a subnormal float32 scale."""
    assert torch.isfinite(deq).all() and torch.isfinite(s32).all() and (s32 > 0).all()
    s, x64, d = s32.double(), x.double(), deq.double()
    y = x64 / s
    inside = (y >= lo - HALF) & (y <= hi + HALF)
    err = (d - x64).abs()
    bad = inside & (err > HALF * s + _tol(x64, d, s))
    assert not bad.any(), f"x={x64[bad][:4].tolist()} deq={d[bad][:4].tolist()} s={s[bad][:4].tolist()}"
    sat = (torch.where(y < 0, float(lo), float(hi)) * s32).double()
    assert torch.equal(d[~inside], sat[~inside]), "saturation must give exactly the end code times s"
    if weight:
        assert (s[~inside] < 2.0**-126).all(), "a normal scale never saturates its own weight"


def _e4m3_half_gap(m: torch.Tensor) -> torch.Tensor:
    return HALF * torch.exp2(torch.floor(torch.log2(m.clamp_min(2.0**-6))) - 3)


def _e2m1_half_gap(m: torch.Tensor) -> torch.Tensor:
    return HALF * torch.where(m < 2, 0.5, torch.where(m < 4, 1.0, 2.0)).double()


def _check_grid(x: torch.Tensor, s32: torch.Tensor, deq: torch.Tensor, half_gap, vmax: float,
                normal: torch.Tensor | None, overshoot: float, dtype_top: bool = False) -> None:
    """A minifloat element grid under a per-element float32 scale ``s32``: the half gap at
    ``|y|`` inside ``[-vmax, vmax]``, exactly ``±vmax s`` outside, and where ``normal`` the
    overshoot ``|y| <= vmax * overshoot``. ``dtype_top`` (MX): where the grid point above ``|x|``
    may lie past the dtype's max, the one below is allowed (never beyond ``|x|``): a full gap."""
    assert torch.isfinite(deq).all() and torch.isfinite(s32).all() and (s32 > 0).all()
    s, x64, d = s32.double(), x.double(), deq.double()
    y = x64 / s
    m = y.abs()
    top = torch.zeros_like(m, dtype=torch.bool)
    if dtype_top:
        top = x64.abs() + 2 * half_gap(m.clamp_max(vmax)) * s > torch.finfo(x.dtype).max
        assert (d[top].abs() <= x64[top].abs() + _tol(x64, d, s)[top]).all(), "stepped past |x| at the top"
    inside = m <= vmax
    err = (d - x64).abs()
    bad = inside & (err > half_gap(m) * s * torch.where(top, 2.0, 1.0) + _tol(x64, d, s))
    assert not bad.any(), f"x={x64[bad][:4].tolist()} deq={d[bad][:4].tolist()} s={s[bad][:4].tolist()}"
    sat = _sign(y) * (vmax * s32).double()
    out = ~inside & ~top
    assert torch.equal(d[out], sat[out]), f"saturation must give exactly ±{vmax} s"
    if normal is not None:
        assert (m[normal] <= vmax * overshoot).all(), m[normal].max()


def _per_element(scale: torch.Tensor, block: int) -> torch.Tensor:
    return scale.float().repeat_interleave(block, dim=-1)


# --------------------------------------------------------------------------- INT4 / INT8


@PROFILE
@given(tensors(even_rows=True), st.sampled_from([16, 32]))
def test_int4_error_within_half_a_step_per_group(x, group):
    if x.shape[-1] % group:
        group = 16
    packed, scale = int4.quantize_int4(x, group)
    s32 = _per_element(scale, group)
    _check_uniform(x, s32, int4.dequantize_int4(packed, scale, group, torch.float32), -8, 7, weight=True)
    assert torch.isfinite(int4.dequantize_int4(packed, scale, group, x.dtype)).all()
    assert torch.isfinite(int4.fake_quantize_int4(x, group)).all()


@PROFILE
@given(tensors())
def test_int8_per_channel_error_within_half_a_step_per_row(x):
    q, scale = int8.quantize_int8_per_channel(x)
    s32 = scale[:, None].expand_as(x)
    _check_uniform(x, s32, int8.dequantize_int8_per_channel(q, scale, torch.float32), -128, 127, weight=True)
    assert torch.isfinite(int8.dequantize_int8_per_channel(q, scale, x.dtype)).all()


@PROFILE
@given(tensors(), st.floats(0.0, 1.0))
def test_int8_static_activation_error_or_saturation(x, where):
    fi = torch.finfo(x.dtype)
    lo, hi = math.log2(fi.smallest_normal) + 7, math.log2(fi.max)
    s = int8.scale_from_amax(torch.tensor(min(2.0 ** (lo + where * (hi - lo)), fi.max)).to(x.dtype).float())
    assert torch.isfinite(int8.fake_quantize_int8_activation(x, s)).all()
    _check_uniform(x, s.expand(x.shape), int8.fake_quantize_int8_activation(x.float(), s), -127, 127, weight=False)


@st.composite
def representable_int(draw, bits: int):
    """(x, group): codes in the full range times one power-of-two scale per group, each group
    holding a ±maxbound so that `amax / maxbound` is that power of two again."""
    dtype = draw(st.sampled_from(DTYPES))
    rows, group, groups = 2 * draw(st.integers(1, 2)), draw(st.sampled_from([16, 32])), draw(st.integers(1, 2))
    top = 7 if bits == 4 else 127
    fi = torch.finfo(dtype)
    n_scales = rows * groups if bits == 4 else rows
    ks = draw(st.lists(st.integers(math.ceil(math.log2(fi.smallest_normal)), math.floor(math.log2(fi.max / 128))),
                       min_size=n_scales, max_size=n_scales))
    c = torch.tensor(draw(st.lists(st.integers(-top - 1, top), min_size=rows * groups * group,
                                   max_size=rows * groups * group)), dtype=torch.float64).reshape(n_scales, -1)
    c[:, 0] = torch.tensor(draw(st.lists(st.sampled_from([-top, top]), min_size=n_scales, max_size=n_scales)))
    c[c == -top - 1] = -top  # -8 / -128 would set a larger amax
    x = (c * torch.exp2(torch.tensor(ks, dtype=torch.float64))[:, None]).reshape(rows, groups * group)
    return x.to(dtype), group


@PROFILE
@given(representable_int(4))
def test_int4_quantizing_representable_values_is_the_identity(case):
    x, group = case
    packed, scale = int4.quantize_int4(x, group)
    assert torch.equal(int4.dequantize_int4(packed, scale, group, x.dtype), x)


@PROFILE
@given(representable_int(8))
def test_int8_quantizing_representable_values_is_the_identity(case):
    x, _ = case
    q, scale = int8.quantize_int8_per_channel(x)
    assert torch.equal(int8.dequantize_int8_per_channel(q, scale, x.dtype), x)


# --------------------------------------------------------------------------- MX


@PROFILE
@given(tensors(multiple=32))
def test_mxfp8_error_within_half_a_step_per_block(x):
    q, e = mxfp.quantize_mxfp8(x)
    s32 = _per_element(torch.exp2(e.float() - 127), 32)
    _check_grid(x, s32, mxfp.dequantize_mxfp8(q, e, torch.float32), _e4m3_half_gap, 448.0,
                torch.ones_like(x, dtype=torch.bool), 1 + 2.0**-20, dtype_top=True)
    assert torch.isfinite(mxfp.fake_quantize_mxfp8(x)).all()


@PROFILE
@given(tensors(multiple=32))
def test_mxfp4_error_within_half_a_step_per_block(x):
    packed, e = mxfp.quantize_mxfp4(x)
    s32 = _per_element(torch.exp2(e.float() - 127), 32)
    _check_grid(x, s32, mxfp.dequantize_mxfp4(packed, e, torch.float32), _e2m1_half_gap, 6.0,
                torch.ones_like(x, dtype=torch.bool), 1 + 2.0**-20, dtype_top=True)
    assert torch.isfinite(mxfp.fake_quantize_mxfp4(x)).all()


@st.composite
def representable_mx(draw, fp8: bool):
    """x = element * 2**k per block of 32, one ±max per block, so the exponent is k again."""
    dtype = draw(st.sampled_from(DTYPES))
    rows, blocks = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    fi = torch.finfo(dtype)
    vmax = 448.0 if fp8 else 6.0
    kmin = math.ceil(math.log2(fi.smallest_normal)) + (9 if fp8 else 1)
    ks = draw(st.lists(st.integers(kmin, math.floor(math.log2(fi.max / vmax))), min_size=rows * blocks,
                       max_size=rows * blocks))
    n = rows * blocks * 32
    if fp8:
        codes = draw(st.lists(st.one_of(st.integers(0x00, 0x7E), st.integers(0x80, 0xFE)), min_size=n, max_size=n))
        el = torch.tensor(codes, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    else:
        el = e2m1_values(torch.tensor(draw(st.lists(st.integers(0, 15), min_size=n, max_size=n)))).double()
    el = el.reshape(rows * blocks, 32)
    el[:, draw(st.integers(0, 31))] = torch.tensor(draw(st.lists(st.sampled_from([-vmax, vmax]),
                                                                 min_size=rows * blocks, max_size=rows * blocks)))
    x = el * torch.exp2(torch.tensor(ks, dtype=torch.float64))[:, None]
    return x.reshape(rows, blocks * 32).to(dtype), torch.tensor(ks) + 127


@PROFILE
@given(representable_mx(fp8=True))
def test_mxfp8_quantizing_representable_values_is_the_identity(case):
    x, biased = case
    q, e = mxfp.quantize_mxfp8(x)
    assert torch.equal(e.flatten().long(), biased.long())
    assert torch.equal(mxfp.dequantize_mxfp8(q, e, x.dtype), x)


@PROFILE
@given(representable_mx(fp8=False))
def test_mxfp4_quantizing_representable_values_is_the_identity(case):
    x, biased = case
    packed, e = mxfp.quantize_mxfp4(x)
    assert torch.equal(e.flatten().long(), biased.long())
    assert torch.equal(mxfp.dequantize_mxfp4(packed, e, x.dtype), x)


# --------------------------------------------------------------------------- FP8 variants


@PROFILE
@given(tensors())
def test_fp8_per_channel_error_within_half_a_step_per_row(x):
    q, scale = fp8_variants.quantize_fp8_per_channel(x)
    s32 = scale[:, None].expand_as(x)
    _check_grid(x, s32, fp8_variants.dequantize_fp8_per_channel(q, scale, torch.float32), _e4m3_half_gap, 448.0,
                s32 >= 2.0**-126, 1 + 2.0**-22)
    assert torch.isfinite(fp8_variants.dequantize_fp8_per_channel(q, scale, x.dtype)).all()
    assert torch.isfinite(fp8_variants.fake_quantize_fp8_per_token(x)).all()
    s_tok = fp8_variants._scale(x.abs().amax(-1, keepdim=True)).expand_as(x)
    _check_grid(x, s_tok, fp8_variants.fake_quantize_fp8_per_token(x.float()), _e4m3_half_gap, 448.0,
                s_tok >= 2.0**-126, 1 + 2.0**-22)


@PROFILE
@given(tensors(max_rows=20, max_blocks=2), st.sampled_from([16, 32]))
def test_fp8_blocks_error_within_half_a_step_per_tile(x, block):
    """Tiles of block x block, the edge ones partial (zero-padded)."""
    q, scale = fp8_variants.quantize_fp8_blocks(x, block)
    s32 = fp8_variants._expand(scale, x.shape, block)
    _check_grid(x, s32, fp8_variants.dequantize_fp8_blocks(q, scale, block, torch.float32), _e4m3_half_gap, 448.0,
                s32 >= 2.0**-126, 1 + 2.0**-22)
    assert torch.isfinite(fp8_variants.dequantize_fp8_blocks(q, scale, block, x.dtype)).all()


# --------------------------------------------------------------------------- FP4 blocks


def _fp4_normal(x: torch.Tensor, bs: torch.Tensor, s2: torch.Tensor, block: int, normaliser: float) -> torch.Tensor:
    """Per element: the block's ideal scale is in e4m3's normal range and scale_2 is normal."""
    ideal = x.double().abs().reshape(x.shape[0], -1, block).amax(-1) / (6 * s2.double())
    s32 = bs.float() * s2.float()
    ok = (s2.double() >= 2.0**-126) & (ideal >= 2.0**-6) & (ideal <= normaliser) & (s32 >= 2.0**-126)
    return ok.repeat_interleave(block, dim=-1)


@PROFILE
@given(tensors(multiple=32))
def test_fp4_blocks_w4a8_error_within_half_a_step_per_block(x):
    """W4A8_NVFP4_FP8: blocks of 32, scale_2 = amax / 448."""
    packed, bs, s2 = fp4_blocks.quantize_dynamic(x, 32, 448.0)
    s32 = _per_element(bs.float() * s2.float(), 32)
    deq = fp4_blocks.decode(packed, bs, s2, 32, torch.float32)
    _check_grid(x, s32, deq, _e2m1_half_gap, 6.0, _fp4_normal(x, bs, s2, 32, 448.0), (1 + 2.0**-4) * (1 + 2.0**-21))
    assert torch.isfinite(fp4_blocks.decode(packed, bs, s2, 32, x.dtype)).all()


@PROFILE
@given(tensors())
def test_four_over_six_error_within_half_a_step_and_never_worse_than_six(x):
    """Blocks mapped to 4 or 6: each within its own half step, and its squared error no larger
    than the plain M=6 choice (the rule the format is for)."""
    packed, bs, s2 = nvfp4_four_over_six.quantize_four_over_six(x)
    s32 = _per_element(bs.float() * s2.float(), 16)
    deq = fp4_blocks.decode(packed, bs, s2, 16, torch.float32)
    _check_grid(x, s32, deq, _e2m1_half_gap, 6.0, _fp4_normal(x, bs, s2, 16, 256.0), (1 + 2.0**-4) * (1 + 2.0**-21))
    assert torch.isfinite(fp4_blocks.decode(packed, bs, s2, 16, x.dtype)).all()
    g = nvfp4_four_over_six.global_amax_of(x)
    p6, b6, s6 = fp4_blocks.quantize_static(x, fp4_blocks.block_amax(x, 16), g, 16, 256.0)
    x32 = x.float().reshape(x.shape[0], -1, 16)
    sse = (x32 - deq.reshape(x32.shape)).pow(2).sum(-1)
    sse6 = (x32 - fp4_blocks.decode(p6, b6, s6, 16, torch.float32).reshape(x32.shape)).pow(2).sum(-1)
    assert (sse <= sse6).all()


@st.composite
def representable_fp4_blocks(draw, block: int, max_byte: int):
    """x = e2m1(code) * block_scale * 2**k, a ±6 in every block and one block at the largest
    scale byte: scale_2 = 2**k and the block scales come back exactly."""
    dtype = draw(st.sampled_from(DTYPES))
    rows, blocks = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    nb = rows * blocks
    fi = torch.finfo(dtype)
    # Up to the top: (amax / 6) * 256 overflows float32 above ~2**122, which static_block_scales
    # must survive (it computes that ratio in the other order there).
    k = draw(st.integers(math.ceil(math.log2(fi.smallest_normal)) + 10, math.floor(math.log2(fi.max / 2688))))
    codes = torch.tensor(draw(st.lists(st.integers(0, 15), min_size=nb * block, max_size=nb * block))).reshape(nb, block)
    codes[:, draw(st.integers(0, block - 1))] = torch.tensor(draw(st.lists(st.sampled_from([7, 15]), min_size=nb,
                                                                           max_size=nb)))
    sb = draw(st.lists(st.integers(0x01, max_byte), min_size=nb, max_size=nb))
    sb[draw(st.integers(0, nb - 1))] = max_byte
    bs = torch.tensor(sb, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    x = e2m1_values(codes).double() * bs[:, None] * 2.0**k
    return x.reshape(rows, blocks * block).to(dtype), k


@PROFILE
@given(representable_fp4_blocks(32, 0x7E))
def test_fp4_blocks_quantizing_representable_values_is_the_identity(case):
    """With the group's scale_2 = 2**k passed in (fused siblings), as W4A8 exports it."""
    x, k = case
    packed, bs, s2 = fp4_blocks.quantize_dynamic(x, 32, 448.0, torch.tensor(2.0**k))
    assert torch.equal(fp4_blocks.decode(packed, bs, s2, 32, x.dtype), x)


@PROFILE
@given(representable_fp4_blocks(16, 0x78))
def test_four_over_six_quantizing_representable_values_is_the_identity(case):
    """Global amax 1536 * 2**k (block scale 256 at the normaliser): scale_2 = 2**k."""
    x, k = case
    packed, bs, s2 = nvfp4_four_over_six.quantize_four_over_six(x)
    assert s2.item() == 2.0**k
    assert torch.equal(fp4_blocks.decode(packed, bs, s2, 16, x.dtype), x)


# --------------------------------------------------------------------------- extremes


def _all_formats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every format's dequantization of `x`, in float32 and in x.dtype."""
    out = {}
    for dt in (torch.float32, x.dtype):
        p, s = int4.quantize_int4(x, 32)
        out[f"int4 {dt}"] = int4.dequantize_int4(p, s, 32, dt)
        q, s = int8.quantize_int8_per_channel(x)
        out[f"int8 {dt}"] = int8.dequantize_int8_per_channel(q, s, dt)
        q, e = mxfp.quantize_mxfp8(x)
        out[f"mxfp8 {dt}"] = mxfp.dequantize_mxfp8(q, e, dt)
        p, e = mxfp.quantize_mxfp4(x)
        out[f"mxfp4 {dt}"] = mxfp.dequantize_mxfp4(p, e, dt)
        q, s = fp8_variants.quantize_fp8_per_channel(x)
        out[f"fp8 channel {dt}"] = fp8_variants.dequantize_fp8_per_channel(q, s, dt)
        q, s = fp8_variants.quantize_fp8_blocks(x, 16)
        out[f"fp8 blocks {dt}"] = fp8_variants.dequantize_fp8_blocks(q, s, 16, dt)
        p, b, s2 = fp4_blocks.quantize_dynamic(x, 32, 448.0)
        out[f"w4a8 {dt}"] = fp4_blocks.decode(p, b, s2, 32, dt)
        p, b, s2 = nvfp4_four_over_six.quantize_four_over_six(x)
        out[f"four over six {dt}"] = fp4_blocks.decode(p, b, s2, 16, dt)
    out["fp8 per token"] = fp8_variants.fake_quantize_fp8_per_token(x)
    out["int8 activation"] = int8.fake_quantize_int8_activation(x, int8.scale_from_amax(x.abs().amax().float()))
    return out


@pytest.mark.parametrize("which", ["max", "-max", "tiny", "subnormal", "zero"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extremes_of_every_dtype_stay_finite(dtype, which):
    """Whole rows at one extreme (±max, smallest normal, smallest subnormal, 0) next to zeros."""
    fi = torch.finfo(dtype)
    v = {"max": fi.max, "-max": -fi.max, "tiny": fi.smallest_normal, "zero": 0.0,
         "subnormal": fi.smallest_normal * 2.0 ** -MANTISSA_BITS[dtype]}[which]
    x = torch.zeros(2, 64, dtype=torch.float64)
    x[0, ::3] = v
    x = x.to(dtype)
    bad = [name for name, d in _all_formats(x).items() if not torch.isfinite(d).all()]
    assert not bad, f"non-finite output from {bad}"
