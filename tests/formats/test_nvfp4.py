"""NVFP4 reference numerics against written-down tables and an independent float64 reference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from quantship.formats import nvfp4
from quantship.formats.nvfp4 import (
    BLOCK_SIZE,
    E4M3_MIN_SCALE,
    NVFP4Weight,
    block_scales,
    dequantize_nvfp4,
    e2m1_values,
    fake_quantize_nvfp4_activation,
    fake_quantize_nvfp4_weight,
    global_scale_from_amax,
    input_scale_from_amax,
    pack_fp4,
    quantize_nvfp4,
    round_to_e2m1_codes,
    unpack_fp4,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]



# Every E2M1 code and the value it decodes to, written out (bit 3 = sign).
CODE_TABLE = [
    (0b0000, 0.0), (0b0001, 0.5), (0b0010, 1.0), (0b0011, 1.5),
    (0b0100, 2.0), (0b0101, 3.0), (0b0110, 4.0), (0b0111, 6.0),
    (0b1000, -0.0), (0b1001, -0.5), (0b1010, -1.0), (0b1011, -1.5),
    (0b1100, -2.0), (0b1101, -3.0), (0b1110, -4.0), (0b1111, -6.0),
]  # fmt: skip

# Values exactly between two magnitudes go to the neighbour with the even code.
TIE_TABLE = [
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),
    (-0.25, 8), (-0.75, 10), (-1.25, 10), (-1.75, 12), (-2.5, 12), (-3.5, 14), (-5.0, 14),
]  # fmt: skip

# bound -> (code just below it, code just above it): one float32 ulp either side.
NEAR_TIE_TABLE = [
    (0.25, 0, 1), (0.75, 1, 2), (1.25, 2, 3), (1.75, 3, 4), (2.5, 4, 5), (3.5, 5, 6), (5.0, 6, 7),
]  # fmt: skip

SATURATION_TABLE = [
    (6.0, 7), (6.5, 7), (7.0, 7), (100.0, 7), (1e30, 7), (math.inf, 7),
    (-6.0, 15), (-7.0, 15), (-100.0, 15), (-1e30, 15), (-math.inf, 15),
]  # fmt: skip


def codes_of(q: NVFP4Weight) -> torch.Tensor:
    return unpack_fp4(q.packed)


# --------------------------------------------------------------------------- float64 reference

_MAGS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _e4m3_positive_table() -> torch.Tensor:
    """All finite non-negative e4m3fn values by code 0..126 (0x7F is NaN), from the bit layout."""
    vals = []
    for code in range(0x7F):
        e, m = code >> 3, code & 7
        vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


E4M3_TABLE = _e4m3_positive_table()


def f32(t: torch.Tensor) -> torch.Tensor:
    """Round float64 to float32 and back: one IEEE float32 rounding of an f64-exact result."""
    return t.to(torch.float32).to(torch.float64)


def nearest_even(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry to each x >= 0; on a tie, the even index."""
    dist = (x.unsqueeze(-1) - table).abs()
    best = dist == dist.min(dim=-1, keepdim=True).values
    even = torch.arange(table.numel()) % 2 == 0
    # Prefer an even index among the (at most two) nearest entries.
    score = best.to(torch.int64) * 2 + (best & even).to(torch.int64)
    return score.argmax(dim=-1)


def ref_e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    codes = nearest_even(y.abs(), _MAGS)
    return (codes + 8 * (y < 0).to(torch.int64)).to(torch.uint8)


def ref_quantize(w: torch.Tensor, scale_2: float | None = None):
    """Straightforward NVFP4 in float64, rounded to float32 exactly where the format says fp32."""
    x = w.double()
    if scale_2 is None:
        amax = x.abs().max()
        s2 = f32(torch.tensor(1.0 if amax == 0 else amax.item(), dtype=torch.float64) / 2688.0)
    else:
        s2 = torch.tensor(scale_2, dtype=torch.float64)
    blocks = x.reshape(*x.shape[:-1], -1, 16)
    raw = f32(blocks.abs().amax(dim=-1) / f32(6.0 * s2))
    raw = torch.where(raw == 0, torch.ones_like(raw), raw).clamp(2.0**-9, 448.0)
    bs = E4M3_TABLE[nearest_even(raw, E4M3_TABLE)]
    denom = f32(bs * s2)
    codes = ref_e2m1_codes(f32(blocks / denom.unsqueeze(-1)))
    signed = torch.cat([_MAGS, -_MAGS])
    deq = f32(signed[codes.long()] * denom.unsqueeze(-1))
    return codes.reshape(w.shape), bs, s2, deq.reshape(w.shape)


def random_weight(gen: torch.Generator, shape, dtype, log10_amax: float) -> torch.Tensor:
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (w / w.abs().max() * 10.0**log10_amax).to(dtype)


# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize(("code", "value"), CODE_TABLE)
def test_code_to_value(code, value):
    got = e2m1_values(torch.tensor([code], dtype=torch.uint8))
    assert got.dtype == torch.float32
    assert got.item() == value
    assert torch.signbit(got).item() == (math.copysign(1.0, value) < 0)


@pytest.mark.parametrize(("code", "value"), CODE_TABLE)
def test_value_to_code(code, value):
    got = round_to_e2m1_codes(torch.tensor([value])).item()
    # -0.0 is not < 0, so it encodes as +0 (Model Optimizer's rule); code 8 comes from small
    # negatives instead (see test_negative_zero_told_apart).
    assert got == (0 if code == 8 else code)


@pytest.mark.parametrize(("value", "code"), TIE_TABLE)
def test_ties_to_even(value, code):
    assert round_to_e2m1_codes(torch.tensor([value])).item() == code


@pytest.mark.parametrize(("bound", "below", "above"), NEAR_TIE_TABLE)
def test_near_ties(bound, below, above):
    b = torch.tensor([bound])
    lo = torch.nextafter(b, torch.tensor([0.0]))
    hi = torch.nextafter(b, torch.tensor([10.0]))
    assert round_to_e2m1_codes(lo).item() == below
    assert round_to_e2m1_codes(hi).item() == above
    assert round_to_e2m1_codes(-lo).item() == below | 8
    assert round_to_e2m1_codes(-hi).item() == above | 8


@pytest.mark.parametrize(("value", "code"), SATURATION_TABLE)
def test_saturation_at_six(value, code):
    assert round_to_e2m1_codes(torch.tensor([value])).item() == code


def test_rounding_grid_matches_brute_force():
    # Every multiple of 1/16 in [-8, 8]: all ties, near values and saturation in one sweep.
    grid = torch.arange(-128, 129, dtype=torch.float32) / 16
    assert torch.equal(round_to_e2m1_codes(grid), ref_e2m1_codes(grid.double()))


def test_negative_zero_told_apart():
    codes = round_to_e2m1_codes(torch.tensor([-0.0, 0.0, -0.1, 0.1]))
    assert codes.tolist() == [0, 0, 8, 0]
    vals = e2m1_values(codes)
    assert vals.tolist() == [0.0, 0.0, 0.0, 0.0]  # == cannot tell them apart ...
    assert torch.signbit(vals).tolist() == [False, False, True, False]  # ... signbit can

    # Through the whole pipeline (scale_2 = 2**-8 and block amax 6 give a divisor of exactly
    # 1.0): -0.0 comes back as +0.0, a small negative as -0.0.
    w = torch.zeros(1, 16)
    w[0, 0], w[0, 1], w[0, 2] = 6.0, -0.0, -0.1
    q = quantize_nvfp4(w, torch.tensor(2.0**-8))
    assert codes_of(q)[0, :3].tolist() == [7, 0, 8]
    dq = dequantize_nvfp4(q.packed, q.block_scale, q.scale_2, dtype=torch.float32)
    assert torch.signbit(dq[0, :3]).tolist() == [False, False, True]


def test_ties_through_quantize():
    # scale_2 = 2**-8 and block amax 6 give block scale 256 and a divisor of exactly 1.0, so the
    # weight values reach the rounding step unchanged.
    ties = [v for v, _ in TIE_TABLE]
    w = torch.tensor([[6.0, *ties, -6.0]])
    q = quantize_nvfp4(w, torch.tensor(2.0**-8))
    assert q.block_scale.float().item() == 256.0
    assert codes_of(q)[0].tolist() == [7, *[c for _, c in TIE_TABLE], 15]


# --------------------------------------------------------------------------- scales


def test_global_scale_from_amax_elementwise():
    amax = torch.tensor([2688.0, 0.0, 1.0, 1e4])
    got = global_scale_from_amax(amax)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx([1.0, 1 / 2688, 1 / 2688, 1e4 / 2688], rel=1e-7)
    assert torch.isfinite(got).all() and (got > 0).all()
    assert input_scale_from_amax(torch.tensor(2688.0)).item() == 1.0


def test_block_scale_saturates_at_448():
    w = torch.ones(2, 32)
    bs = block_scales(w, torch.tensor(1e-6))  # 1 / 6e-6 ~ 1.7e5
    assert bs.dtype == torch.float8_e4m3fn
    assert (bs.float() == 448.0).all()


def test_block_scale_floor_at_2_pow_minus_9():
    w = torch.zeros(1, 32)
    w[0, 0] = 1e4  # huge amax in block 0
    w[0, 16] = 1e-6  # tiny amax in block 1: ratio ~ 4.5e-8, far below the e4m3 range
    q = quantize_nvfp4(w)
    assert q.block_scale.float().tolist() == [[448.0, E4M3_MIN_SCALE]]
    assert codes_of(q)[0, 16].item() == 0  # rounds to zero, stays finite


@pytest.mark.parametrize("log10_amax", [-30, -8, 0, 8, 30])
def test_tiny_and_huge_amax(log10_amax):
    gen = torch.Generator().manual_seed(log10_amax + 100)
    w = random_weight(gen, (8, 64), torch.float32, log10_amax)
    q = quantize_nvfp4(w)
    assert torch.isfinite(q.scale_2) and q.scale_2 > 0
    assert q.block_scale.float().max().item() == 448.0  # the block holding amax
    dq = dequantize_nvfp4(q.packed, q.block_scale, q.scale_2, dtype=torch.float32)
    assert torch.isfinite(dq).all()
    assert dq.abs().max().item() == pytest.approx(w.abs().max().item(), rel=0.07)


def test_all_zero_block():
    w = torch.randn(4, 48, generator=torch.Generator().manual_seed(1))
    w[:, 16:32] = 0.0
    q = quantize_nvfp4(w)
    assert (q.block_scale[:, 1].float() == 1.0).all()
    assert (codes_of(q)[:, 16:32] == 0).all()
    assert (q.packed[:, 8:16] == 0).all()


def test_all_zero_tensor():
    w = torch.zeros(3, 32, dtype=torch.bfloat16)
    q = quantize_nvfp4(w)
    assert q.scale_2.item() == pytest.approx(1 / 2688) and q.scale_2 > 0
    assert (q.block_scale.float() == 1.0).all()
    assert (q.packed == 0).all()
    dq = dequantize_nvfp4(q.packed, q.block_scale, q.scale_2)
    assert (dq == 0).all() and not torch.signbit(dq).any()


# --------------------------------------------------------------------------- packing


def test_pack_hand_example():
    assert pack_fp4(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x21]
    codes = torch.tensor([[0xF, 0x0, 0x0, 0xF, 0x8, 0x7]], dtype=torch.uint8)
    assert pack_fp4(codes).tolist() == [[0x0F, 0xF0, 0x78]]
    assert unpack_fp4(torch.tensor([0x21, 0x78], dtype=torch.uint8)).tolist() == [1, 2, 8, 7]


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (3, 5, 64), generator=torch.Generator().manual_seed(2)).to(torch.uint8)
    packed = pack_fp4(codes)
    assert packed.shape == (3, 5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_fp4(packed), codes)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(TypeError):
        pack_fp4(torch.zeros(4, dtype=torch.int64))


# --------------------------------------------------------------------------- quantize API


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_dtypes(dtype):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    q = quantize_nvfp4(w)
    q32 = quantize_nvfp4(w.float())  # every bf16/fp16 value is exact in float32
    assert q.packed.shape == (16, 32) and q.block_scale.shape == (16, 4) and q.scale_2.shape == ()
    assert q.scale_2.dtype == torch.float32 and q.block_scale.dtype == torch.float8_e4m3fn
    assert torch.equal(q.packed, q32.packed)
    assert torch.equal(q.block_scale.view(torch.uint8), q32.block_scale.view(torch.uint8))
    fq = fake_quantize_nvfp4_weight(w)
    assert fq.dtype == dtype and fq.shape == w.shape
    assert torch.equal(fq, dequantize_nvfp4(q.packed, q.block_scale, q.scale_2, dtype=dtype))


def test_rejects_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"\(4, 24\)"):
        quantize_nvfp4(torch.randn(4, 24))
    with pytest.raises(ValueError, match=r"\(64,\)"):
        quantize_nvfp4(torch.randn(64))
    with pytest.raises(TypeError):
        quantize_nvfp4(torch.randn(4, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="scale_2"):
        quantize_nvfp4(torch.randn(2, 4, 32), torch.ones(3))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nvfp4(torch.tensor([[math.nan] * 16]))


def test_weight_is_frozen():
    q = quantize_nvfp4(torch.randn(2, 16))
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.packed = q.packed  # type: ignore[misc]


def test_experts_per_expert_scale_2():
    gen = torch.Generator().manual_seed(4)
    w = torch.stack([random_weight(gen, (8, 32), torch.float32, k) for k in (-3, 0, 2)]).bfloat16()
    q = quantize_nvfp4(w)
    assert q.scale_2.shape == (3,) and q.packed.shape == (3, 8, 16) and q.block_scale.shape == (3, 8, 2)
    for e in range(3):
        alone = quantize_nvfp4(w[e])
        assert torch.equal(q.packed[e], alone.packed)
        assert torch.equal(q.block_scale[e].view(torch.uint8), alone.block_scale.view(torch.uint8))
        assert q.scale_2[e] == alone.scale_2
    dq = dequantize_nvfp4(q.packed, q.block_scale, q.scale_2)
    for e in range(3):
        assert torch.equal(dq[e], fake_quantize_nvfp4_weight(w[e]))


def test_experts_given_scale_2():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(2, 4, 32, generator=gen)
    per = torch.tensor([0.01, 0.02])
    q = quantize_nvfp4(w, per)
    for e in range(2):
        assert torch.equal(q.packed[e], quantize_nvfp4(w[e], per[e]).packed)
    shared = quantize_nvfp4(w, torch.tensor(0.03))
    assert shared.scale_2.tolist() == pytest.approx([0.03, 0.03])  # one value per expert
    assert torch.equal(shared.packed[1], quantize_nvfp4(w[1], torch.tensor(0.03)).packed)


# --------------------------------------------------------------------------- float64 reference


def _reference_cases():
    gen = torch.Generator().manual_seed(1234)
    for i in range(60):
        dtype = DTYPES[i % 3]
        rows = int(torch.randint(1, 17, (1,), generator=gen))
        cols = 16 * int(torch.randint(1, 9, (1,), generator=gen))
        lo, hi = (-4.0, 3.0) if dtype == torch.float16 else (-12.0, 12.0)
        log10_amax = lo + (hi - lo) * torch.rand(1, generator=gen).item()
        w = random_weight(gen, (rows, cols), dtype, log10_amax)
        if i % 4 == 1:
            w.view(rows, -1, 16)[:, 0] = 0.0  # zero blocks
        if i % 4 == 2:
            w.view(-1)[int(torch.randint(0, w.numel(), (1,), generator=gen))] *= 50  # outlier (fits fp16)
        if i % 4 == 3:
            w.view(-1)[::7] = -0.0  # signed zeros ...
            w.view(-1)[3::11] = -w.abs().max() / 1e3  # ... and negatives that round to code 8
        yield w


def test_matches_float64_reference():
    for w in _reference_cases():
        q = quantize_nvfp4(w)
        codes, bs, s2, deq = ref_quantize(w)
        assert q.scale_2.double() == s2
        assert torch.equal(q.block_scale.double(), bs)
        assert torch.equal(codes_of(q), codes)
        dq = dequantize_nvfp4(q.packed, q.block_scale, q.scale_2, dtype=torch.float32)
        assert torch.equal(dq.double(), deq)
        assert torch.equal(torch.signbit(dq), torch.signbit(deq))


def test_dequant_error_within_half_step():
    for w in _reference_cases():
        q = quantize_nvfp4(w)
        dq = dequantize_nvfp4(q.packed, q.block_scale, q.scale_2, dtype=torch.float64)
        denom = (q.block_scale.double() * q.scale_2.double()).repeat_interleave(BLOCK_SIZE, dim=-1)
        y = w.double().abs() / denom
        # Spacing of the E2M1 grid around |y|; beyond 6 (block scale rounded down) the last gap.
        half_step = torch.where(y <= 2, 0.25, torch.where(y <= 4, 0.5, 1.0)) * denom
        assert ((w.double() - dq).abs() <= half_step * (1 + 1e-6)).all()


# --------------------------------------------------------------------------- activations


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_fake_quant(dtype):
    gen = torch.Generator().manual_seed(6)
    x = random_weight(gen, (2, 3, 64), dtype, 1.0)
    x[0, 0, :16] = 0.0
    s = input_scale_from_amax(x.abs().amax())
    got = fake_quantize_nvfp4_activation(x, s)
    assert got.dtype == dtype and got.shape == x.shape
    assert (got[0, 0, :16] == 0).all()
    # The same math as a weight quantized with scale_2 = input_scale, row by row.
    expected = fake_quantize_nvfp4_weight(x.reshape(6, 64), s).reshape(x.shape)
    assert torch.equal(got, expected)
    _, _, _, deq = ref_quantize(x.reshape(6, 64), s.item())
    assert torch.equal(got, deq.reshape(x.shape).to(dtype))


def test_activation_rejects_bad_scale():
    with pytest.raises(ValueError, match="positive"):
        fake_quantize_nvfp4_activation(torch.ones(16), torch.tensor(0.0))
    with pytest.raises(ValueError, match="single"):
        fake_quantize_nvfp4_activation(torch.ones(16), torch.ones(2))


def test_constants():
    assert (nvfp4.E2M1_MAX, nvfp4.E4M3_MAX, nvfp4.BLOCK_SIZE, nvfp4.E4M3_MIN_SCALE) == (
        6.0,
        448.0,
        16,
        2**-9,
    )
