"""FP8 E4M3 per-tensor numerics against written-down tables and a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from quantship.formats.fp8 import (
    FP8_MAX,
    dequantize_fp8,
    fake_quantize_fp8,
    quantize_fp8,
    scale_from_amax,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]



# value (with scale 1.0, float32 input) -> e4m3fn bit pattern (sign | 4 exponent | 3 mantissa).
E4M3_TABLE = [
    (0.0, 0x00), (-0.0, 0x80),
    (2.0**-9, 0x01), (-(2.0**-9), 0x81),  # smallest subnormal
    (3 * 2.0**-9, 0x03), (7 * 2.0**-9, 0x07),  # subnormals up to the largest
    (2.0**-6, 0x08), (0.5, 0x30), (1.0, 0x38), (1.5, 0x3C), (-1.5, 0xBC),
    (240.0, 0x77), (256.0, 0x78), (448.0, 0x7E), (-448.0, 0xFE),
]  # fmt: skip

# Rounding to nearest, ties to the even mantissa, and saturation at ±448.
E4M3_ROUNDING_TABLE = [
    (2.0**-11, 0x00), (2.0**-10, 0x00),  # below / exactly half the smallest subnormal
    (3 * 2.0**-10, 0x02),  # tie between 0x01 and 0x02 -> even
    (1.0625, 0x38), (1.1875, 0x3A),  # ties in the normal range
    (464.0, 0x7E), (480.0, 0x7E), (1e6, 0x7E), (math.inf, 0x7E),  # saturate, never NaN
    (-480.0, 0xFE), (-1e30, 0xFE), (-math.inf, 0xFE),
]  # fmt: skip


def bits(q: torch.Tensor) -> list[int]:
    return q.view(torch.uint8).tolist()


# --------------------------------------------------------------------------- float64 reference


def _e4m3_positive_values() -> torch.Tensor:
    vals = []
    for code in range(0x7F):  # 0x7F is NaN
        e, m = code >> 3, code & 7
        vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


E4M3_VALUES = _e4m3_positive_values()


def ref_quantize_fp8(w: torch.Tensor, scale: float) -> torch.Tensor:
    """Float64 reference returning the e4m3 values as float64 (signed zeros kept)."""
    y = (w.double() / scale).to(torch.float32).clamp(-448, 448)  # one float32 rounding
    if w.dtype != torch.float32:
        y = y.to(w.dtype)  # Model Optimizer's rounding to the weight dtype
    y = y.double()
    dist = (y.abs().unsqueeze(-1) - E4M3_VALUES).abs()
    best = dist == dist.min(dim=-1, keepdim=True).values
    even = torch.arange(E4M3_VALUES.numel()) % 2 == 0
    idx = (best.to(torch.int64) * 2 + (best & even).to(torch.int64)).argmax(dim=-1)
    return torch.copysign(E4M3_VALUES[idx], y)


# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize(("value", "code"), E4M3_TABLE + E4M3_ROUNDING_TABLE)
def test_e4m3_table(value, code):
    q, s = quantize_fp8(torch.tensor([value]), torch.tensor(1.0))
    assert q.dtype == torch.float8_e4m3fn
    assert bits(q) == [code]


def test_scale_from_amax():
    got = scale_from_amax(torch.tensor([448.0, 896.0, 0.0, 1.0]))
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx([1.0, 2.0, 1 / 448, 1 / 448], rel=1e-7)
    assert FP8_MAX == 448.0


def test_scale_from_data_maps_amax_to_448():
    w = torch.tensor([[-3.0, 1.0], [0.5, 2.0]])
    q, s = quantize_fp8(w)
    assert s.shape == () and s.dtype == torch.float32
    assert s.item() == pytest.approx(3.0 / 448)
    assert q[0, 0].float().item() == -448.0


def test_saturation_with_given_scale():
    w = torch.tensor([1.0, -1.0, 0.5])
    q, _ = quantize_fp8(w, torch.tensor(1 / 1000))  # 1000 and 500 are beyond 448
    assert q.float().tolist() == [448.0, -448.0, 448.0]


def test_all_zero_tensor():
    w = torch.zeros(4, 4, dtype=torch.bfloat16)
    q, s = quantize_fp8(w)
    assert s.item() == pytest.approx(1 / 448) and s > 0
    dq = dequantize_fp8(q, s)
    assert (dq == 0).all() and not torch.signbit(dq).any()


def test_round_trip_every_e4m3_value():
    vals = torch.cat([E4M3_VALUES, -E4M3_VALUES[1:]]).float()
    scale = torch.tensor(2.0**-5)  # a power of two keeps w = value * scale exact
    q, s = quantize_fp8(vals * scale, scale)
    assert torch.equal(q.float(), vals)
    assert torch.equal(dequantize_fp8(q, s, dtype=torch.float32), vals * scale)


def test_subnormal_range():
    scale = torch.tensor(0.25)
    w = torch.tensor([1, 2, 3, 7], dtype=torch.float32) * 2.0**-9 * 0.25
    q, _ = quantize_fp8(w, scale)
    assert bits(q) == [0x01, 0x02, 0x03, 0x07]


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_dtypes(dtype):
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(7)).to(dtype)
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == ()
    fq = fake_quantize_fp8(w, s)
    assert fq.dtype == dtype
    assert torch.equal(fq, dequantize_fp8(q, s, dtype=dtype))
    assert torch.equal(q.float().double(), ref_quantize_fp8(w, s.item()))


def test_bf16_rounds_quotient_like_model_optimizer():
    # 1.0625 / (1 - 2**-20) lies just above the e4m3 tie 1.0625 (between 1.0 and 1.125). In
    # float32 it rounds up to 1.125; Model Optimizer first rounds the quotient to bf16, which
    # lands exactly on the tie, and the tie goes to the even mantissa, 1.0. We match it.
    scale = torch.tensor(1 - 2.0**-20)
    q32, _ = quantize_fp8(torch.tensor([1.0625]), scale)
    q16, _ = quantize_fp8(torch.tensor([1.0625], dtype=torch.bfloat16), scale)
    assert bits(q32) == [0x39]
    assert bits(q16) == [0x38]


def test_matches_float64_reference():
    gen = torch.Generator().manual_seed(99)
    for i in range(60):
        dtype = DTYPES[i % 3]
        lo, hi = (-3.0, 3.0) if dtype == torch.float16 else (-20.0, 20.0)
        amax = 10 ** (lo + (hi - lo) * torch.rand(1, generator=gen).item())
        w = torch.randn(16, 48, generator=gen, dtype=torch.float64)
        w = (w / w.abs().max() * amax).to(dtype)
        w.view(-1)[::13] = -0.0
        q, s = quantize_fp8(w)
        ref = ref_quantize_fp8(w, s.item())
        assert torch.equal(q.float().double(), ref)
        assert torch.equal(torch.signbit(q.float()), torch.signbit(ref))
        # Round-trip error is at most half an e4m3 step (relative 2**-4) or half the smallest
        # subnormal step (absolute 2**-10 * scale), whichever is larger, plus the half ulp of
        # the intermediate rounding to bf16/fp16.
        dq = dequantize_fp8(q, s, dtype=torch.float64)
        a = w.double().abs()
        bound = torch.maximum(a * 2.0**-4, torch.tensor(2.0**-10 * s.item()))
        if dtype != torch.float32:
            bound = bound + a * torch.finfo(dtype).eps / 2
        assert ((dq - w.double()).abs() <= bound * (1 + 1e-6)).all()


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="single scale"):
        quantize_fp8(torch.ones(4), torch.ones(2))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_fp8(torch.tensor([1.0, math.nan]))
