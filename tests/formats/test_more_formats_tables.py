"""Written-down tables for the formats beyond NVFP4/FP8: exact codes, ties, signed zeros, zero
blocks, saturation, packing order, scale layouts; and the MSE block-scale search against a
float64 brute force."""

from __future__ import annotations

import pytest
import torch

from quantship.algorithms.mse_scale_search import candidates, search_block_amax, search_multipliers
from quantship.formats import fp4_blocks, fp8_variants, int4, int8, mxfp, nvfp4
from quantship.formats.handlers import FORMAT_HANDLERS
from quantship.formats.nvfp4_four_over_six import choose_block_amax, quantize_four_over_six


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


# --------------------------------------------------------------------------- INT4


def test_int4_codes_ties_to_even_and_clamp():
    # one group of 128 with amax 7 -> scale exactly 1.0, so codes are round-half-even of the values
    w = torch.zeros(2, 128, dtype=torch.float32)
    w[0, :10] = torch.tensor([7.0, -7.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.49, 6.5, -6.6])
    w[1] = 0.0  # an all-zero group: scale 1.0, codes 0
    packed, scale = int4.quantize_int4(w)
    assert scale.tolist() == [[1.0], [1.0]]
    codes = int4.unpack_out_pairs(packed)
    assert codes[0, :10].tolist() == [7, -7, 0, 2, 2, 0, -2, 3, 6, -7]
    assert (codes[1] == 0).all()
    # packing pairs output rows: byte = row 0 (low nibble) | row 1 (high nibble)
    assert packed.shape == (1, 128) and packed[0, 0].item() == (7 & 0xF) | (0 << 4)
    assert packed[0, 1].item() == ((-7) & 0xF) | (0 << 4) == 0x9


def test_int4_minus_eight_reachable_only_by_clamping():
    w = torch.full((2, 128), 0.0)
    w[0, 0], w[0, 1] = 7.0, -8.4  # amax 8.4 -> scale 1.2; -8.4 / 1.2 = -7 exactly
    q = int4.codes(w, int4.scale_from_amax(int4.group_amax(w)))
    assert q[0, 0].item() == 6 and q[0, 1].item() == -7  # 7 / 1.2 = 5.83 -> 6
    assert int4.codes(torch.full((2, 128), -9.0), torch.ones(2, 1)).min().item() == -8


def test_int4_round_trip_of_fused_experts_and_odd_rows_refused():
    w = torch.randn(3, 8, 256).to(torch.bfloat16)
    packed, scale = int4.quantize_int4(w)
    assert packed.shape == (3, 4, 256) and scale.shape == (3, 8, 2)
    assert torch.equal(int4.dequantize_int4(packed, scale, dtype=torch.bfloat16), int4.fake_quantize_int4(w))
    with pytest.raises(ValueError, match="odd"):
        int4.quantize_int4(torch.randn(7, 128))
    with pytest.raises(ValueError, match="multiple of the group size"):
        int4.quantize_int4(torch.randn(8, 100))


# --------------------------------------------------------------------------- INT8, FP8 variants


def test_int8_per_channel_table():
    w = torch.tensor([[127.0, 0.5, 1.5, -2.5, -127.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    q, scale = int8.quantize_int8_per_channel(w)
    assert torch.equal(scale, torch.tensor([1.0, 1.0]) / 127 * torch.tensor([127.0, 1.0]))
    assert q.tolist() == [[127, 0, 2, -2, -127], [0, 0, 0, 0, 0]]
    x = torch.tensor([1.0, -300.0, 0.6])
    assert int8.fake_quantize_int8_activation(x, torch.tensor(1.0)).tolist() == [1.0, -127.0, 1.0]


def test_fp8_per_channel_scales_rows_and_quotient_in_float32():
    w = torch.tensor([[448.0, -1.0], [0.0, 0.0], [2.0, 1.0]], dtype=torch.bfloat16)
    q, scale = fp8_variants.quantize_fp8_per_channel(w)
    assert scale.dtype == torch.float32 and torch.equal(scale, torch.tensor([448.0, 1.0, 2.0]) / 448)
    assert q.float().tolist() == [[448.0, -1.0], [0.0, 0.0], [448.0, 224.0]]
    x = torch.tensor([[896.0, 1.0], [0.0, 0.0]])
    assert fp8_variants.fake_quantize_fp8_per_token(x).tolist() == [[896.0, 1.0], [0.0, 0.0]]


def test_fp8_blocks_scale_layout_and_padding():
    w = torch.zeros(200, 300)
    w[0, 0], w[150, 0], w[0, 290], w[199, 299] = 448.0, 4.48, -44.8, 0.448
    q, scale = fp8_variants.quantize_fp8_blocks(w)
    assert scale.shape == (2, 1, 3, 1)  # ceil(200/128), ceil(300/128): edge tiles zero-padded
    assert torch.equal(scale[:, 0, :, 0], torch.tensor([[448.0, 1.0, 44.8], [4.48, 1.0, 0.448]]) / 448)
    assert q.shape == w.shape and q[0, 0].item() == 448 and q[150, 0].item() == 448 and q[0, 290].item() == -448
    assert torch.equal(fp8_variants.dequantize_fp8_blocks(q, scale, dtype=torch.float32)[199, 299], torch.tensor(0.448))


# --------------------------------------------------------------------------- MX


def test_mxfp8_exponent_table():
    amax = torch.tensor([448.0, 449.0, 224.0, 1.0, 0.0, 1e-45, 3e38])
    # ceil(log2(amax / 448)): the block max never exceeds 448 after scaling
    assert mxfp.mxfp8_exponent(amax).tolist() == [0.0, 1.0, -1.0, -8.0, -127.0, -127.0, 120.0]
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 32] = 449.0, 1.0
    q, s = mxfp.quantize_mxfp8(w)
    assert s.tolist() == [[128, 119]]
    assert q[0, 0].float().item() == 224.0 and q[0, 32].float().item() == 256.0


def test_mxfp4_rounds_midpoints_down_and_zero_is_code_8():
    w = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.0, -0.0, -0.75, 5.1] + [0.0] * 20])
    packed, s = mxfp.quantize_mxfp4(w)
    assert s.tolist() == [[127]]  # amax 6 -> exponent 0
    codes = nvfp4.unpack_fp4(packed)[0, :12].tolist()
    assert codes == [7, 0, 1, 2, 3, 4, 5, 6, 8, 8, 9, 7]
    assert torch.signbit(mxfp.dequantize_mxfp4(packed, s, torch.float32)[0, 8])  # zeros decode to -0.0


# --------------------------------------------------------------------------- NVFP4 family


def test_w4a8_nvfp4_blocks_of_32_under_amax_over_448():
    w = torch.randn(4, 64).to(torch.bfloat16)
    h = FORMAT_HANDLERS["w4a8_nvfp4_fp8"]
    t = h.quantize(w, h.scales(w.abs().amax().float(), torch.tensor(2.0)))
    assert t["weight_scale"].shape == (4, 2) and t["weight"].shape == (4, 32)
    assert torch.equal(t["weight_scale_2"], w.abs().amax().float() / 448)
    assert torch.equal(t["input_scale"], torch.tensor(2.0) / 448)
    assert t["weight_scale"].float().max() <= 448 / 6 + 0.5  # the block max lands on 6 in e4m3 at most 74.67


def test_nvfp4_awq_numerics_equal_nvfp4():
    w = torch.randn(3, 16, 64).to(torch.bfloat16)
    amax = w.abs().amax(dim=(1, 2)).float()
    a, b = FORMAT_HANDLERS["nvfp4"], FORMAT_HANDLERS["nvfp4_awq"]
    ta, tb = a.quantize(w, a.scales(amax, amax)), b.quantize(w, b.scales(amax, amax))
    assert set(tb) == set(ta) and all(torch.equal(bits(ta[k]), bits(tb[k])) for k in ta)
    pqs = torch.ones(3, 64, dtype=torch.bfloat16)
    assert torch.equal(b.quantize(w, {**b.scales(amax, amax), "pre_quant_scale": pqs})["pre_quant_scale"], pqs)


def test_four_over_six_picks_four_where_it_is_exact():
    w = torch.zeros(2, 16)
    w[0, :4] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # M=4: scale 1 reproduces exactly; M=6: 3 -> 4.5 rounds
    w[1, :4] = torch.tensor([6.0, 4.0, 3.0, 2.0])  # M=6 exact
    amax = choose_block_amax(w)
    assert amax[:, 0].tolist() == [6.0, 6.0]  # 4 * 1.5 (M=4) and 6 * 1.0 (M=6)
    packed, bs, s2 = quantize_four_over_six(w)
    assert s2.item() == pytest.approx(6.0 / (6 * 256))
    dq = nvfp4.dequantize_nvfp4(packed, bs, s2, torch.float32)
    assert torch.equal(dq[0, :4], w[0, :4]) and torch.equal(dq[1, :4], w[1, :4])


@pytest.mark.parametrize("seed", range(3))
def test_four_over_six_choice_is_the_smaller_float64_error(seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(8, 64, generator=g) * 0.1).to(torch.bfloat16)
    g_amax = w.abs().amax().float()
    chosen = choose_block_amax(w, g_amax)
    base = fp4_blocks.block_amax(w, 16)
    errs = []
    for m in (1.0, 1.5):
        packed, bs, s2 = fp4_blocks.quantize_static(w, base * m, g_amax, 16, 256.0)
        dq = fp4_blocks.decode(packed, bs, s2, 16, torch.float64).reshape(8, 4, 16)
        errs.append((w.double().reshape(8, 4, 16) - dq).pow(2).sum(-1))
    expected = torch.where(errs[1] < errs[0], base * 1.5, base)
    assert torch.equal(chosen, expected)
    assert (chosen == base * 1.5).any() and (chosen == base).any()


# --------------------------------------------------------------------------- MSE search


BLOCK_FORMATS = sorted(n.removesuffix("+mse") for n in FORMAT_HANDLERS if n.endswith("+mse"))


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_mse_search_never_worse_than_max_and_keeps_the_layout(name):
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(128, 256, generator=g) * torch.exp(torch.randn(256, generator=g))).to(torch.bfloat16)
    searched = FORMAT_HANDLERS[f"{name}+mse"]
    base = searched.base
    scales = base.scales(w.abs().amax().float(), torch.tensor(1.0))
    plain, found = base.quantize(w, scales), searched.quantize(w, scales)
    assert {k: (v.dtype, v.shape) for k, v in plain.items()} == {k: (v.dtype, v.shape) for k, v in found.items()}
    err = {k: base.block_sum((base.dequantize(t, torch.float64) - w.double()).pow(2))
           for k, t in (("max", plain), ("mse", found))}
    assert (err["mse"] <= err["max"] * (1 + 1e-9)).all()
    if name != "mxfp8":  # E4M3 elements have constant relative precision: a power-of-two rescale never helps
        assert err["mse"].sum() < err["max"].sum()


def test_mse_search_is_the_float64_argmin_first_on_ties():
    h = FORMAT_HANDLERS["int4_awq"]
    g = torch.Generator().manual_seed(6)
    w = torch.randn(4, 256, generator=g).to(torch.bfloat16)
    w[3] = 0.0  # all candidates tie on a zero group: the first (smallest) multiplier is kept
    found = search_block_amax(h, w, {})
    base = h.block_amax(w)
    errors = torch.stack([
        h.block_sum((h.dequantize(h.quantize(w, {}, base * m), torch.float64) - w.double()).pow(2))
        for m in search_multipliers().tolist()])
    first_min = torch.argmin(errors, dim=0)
    assert torch.equal(found, base * search_multipliers()[first_min])
    assert first_min[3, 0] == 0 and torch.equal(found[3], base[3])  # tie: the plain max scale
    # Model Optimizer's 39 candidates (linspace misses 1.0), preceded by 1.0
    assert len(candidates()) == 39 and candidates()[0] == 0.25 and candidates()[-1] == 4.0
    assert not (candidates() == 1.0).any() and search_multipliers()[0] == 1.0
