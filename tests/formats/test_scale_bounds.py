"""The ends of float32 and of each weight dtype, as tables (issue 6): scales stay in
[smallest normal, largest finite for their maxbound], MX codes never dequantize past the
weight's dtype, and NVFP4 4-over-6 block scales are the same at 2**120 as at 2**0."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from quantship.formats import fp4_blocks, fp8_variants, int4, int8, mxfp, nvfp4_four_over_six
from quantship.formats.scale_bounds import SMALLEST_NORMAL, largest_finite_scale

F32_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize("maxbound", [6.0, 7.0, 127.0, 448.0])
def test_largest_finite_scale_against_exact_rationals(maxbound):
    """float32(s * c) is finite iff the exact product is below max + half an ulp (2**128 - 2**103)."""
    limit = Fraction(2**128 - 2**103)
    s = largest_finite_scale(maxbound)
    up = float(torch.nextafter(torch.tensor(s), torch.tensor(float("inf"))))
    assert Fraction(s) * Fraction(maxbound) < limit <= Fraction(up) * Fraction(maxbound)


def test_mx_codes_at_the_dtype_max_step_down_to_the_largest_finite_value():
    # fp16 65504: MXFP8 scale 2**8, 255.875 rounds to 256 (65536 = inf) -> 240; MXFP4 scale 2**14,
    # 3.998 rounds to 4 -> 3. bf16 max: MXFP8 scale 2**120, 254.9 -> 256 (2**128) -> 240.
    for dtype, v, fp8_value, fp4_value in ((torch.float16, 65504.0, 61440.0, 49152.0),
                                           (torch.bfloat16, torch.finfo(torch.bfloat16).max, 240 * 2.0**120,
                                            3 * 2.0**126)):
        x = torch.zeros(1, 32, dtype=dtype)
        x[0, 0], x[0, 1], x[0, 2] = v, -v, 1.0
        q, e = mxfp.quantize_mxfp8(x)
        assert mxfp.dequantize_mxfp8(q, e, dtype)[0, :2].float().tolist() == [fp8_value, -fp8_value]
        p, e4 = mxfp.quantize_mxfp4(x)
        assert mxfp.dequantize_mxfp4(p, e4, dtype)[0, :2].float().tolist() == [fp4_value, -fp4_value]
        # The rest of the block keeps Model Optimizer's codes (1.0 under the same exponent).
        ref = x.clone()
        ref[0, :2] = 0
        assert torch.equal(q.view(torch.uint8)[0, 2:], mxfp.quantize_mxfp8(ref, mxfp._amax(x))[0].view(torch.uint8)[0, 2:])


def test_per_channel_scales_at_both_ends_of_float32():
    x = torch.zeros(3, 32)
    x[0, 0], x[1, 0], x[2, 0] = F32_MAX, torch.finfo(torch.float32).smallest_normal * 2.0**-23, 1.0
    q, s = int8.quantize_int8_per_channel(x)
    assert s[0].item() == largest_finite_scale(127.0) and s[1].item() == SMALLEST_NORMAL
    assert torch.isfinite(int8.dequantize_int8_per_channel(q, s, torch.float32)).all()
    assert s[2].item() == torch.tensor(1.0 / 127, dtype=torch.float32).item()  # ordinary rows unchanged
    q, s = fp8_variants.quantize_fp8_per_channel(x)
    assert s[1].item() == SMALLEST_NORMAL and s[2].item() == torch.tensor(1 / 448, dtype=torch.float32).item()
    assert torch.isfinite(fp8_variants.dequantize_fp8_per_channel(q, s, torch.float32)).all()
    assert torch.isfinite(fp8_variants.fake_quantize_fp8_per_token(x)).all()
    assert int4.scale_from_amax(torch.tensor([F32_MAX, 0.0, 7.0])).tolist() == [largest_finite_scale(7.0), 1.0, 1.0]


def test_w4a8_scale_2_of_a_subnormal_amax_is_the_smallest_normal():
    x = torch.zeros(2, 32)
    x[0, ::3] = 2.0**-149
    packed, bs, s2 = fp4_blocks.quantize_dynamic(x, 32, 448.0)
    assert s2.item() == SMALLEST_NORMAL
    assert torch.isfinite(fp4_blocks.decode(packed, bs, s2, 32, torch.float32)).all()


def test_four_over_six_is_scale_invariant_up_to_the_top_of_float32():
    """Scaling a weight by 2**120 scales scale_2 by 2**120 and leaves codes and block scales
    alone: (amax / 6) * 256 overflowed there before (block scale 448 instead of 256)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    small = nvfp4_four_over_six.quantize_four_over_six(w)
    big = nvfp4_four_over_six.quantize_four_over_six(w * 2.0**120)
    assert torch.equal(small[0], big[0])
    assert torch.equal(small[1].view(torch.uint8), big[1].view(torch.uint8))
    assert big[2].item() == small[2].item() * 2.0**120
