"""Bit-exactness against NVIDIA Model Optimizer 0.47, the producer our checkpoints must equal.

Model Optimizer is a required test extra (``pip install -e '.[test]'``): when it is missing
these tests fail with that message; they never skip.

Documented divergences, each pinned by its own test below:
- an all-zero tensor: Model Optimizer's scale_2 is 0 and its block scales NaN; ours stay finite;
- code 8 (a negative value that rounds to zero) dequantizes to -0.0 here, +0.0 there (equal
  values; only the sign bit differs).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from quantship.formats.fp8 import quantize_fp8
from quantship.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4, unpack_fp4

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
N_CASES = 240
N_EXPERT_CASES = 30



@pytest.fixture(scope="module")
def modelopt():
    """(NVFP4QTensor, FP8QTensor), or a test failure that says how to install them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its "transformers version not tested" notice
            from modelopt.torch.quantization.qtensor.fp8_tensor import FP8QTensor
            from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    except ImportError as exc:
        pytest.fail(
            f"nvidia-modelopt==0.47.0 is a required test extra for the bit-exactness oracle; "
            f"install it with `pip install -e '.[test]'` ({exc})",
            pytrace=False,
        )
    return NVFP4QTensor, FP8QTensor


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, so -0.0 and +0.0 (and NaN payloads) are told apart."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def make_case(i: int, shape: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Seeded weight: 2-D, in-dim a multiple of 16, amax log-uniform in [1e-8, 1e4] (fp16:
    [1e-4, 1e4], its normal range), with zero blocks, outliers and signed zeros mixed in."""
    gen = torch.Generator().manual_seed(10_000 + i)
    dtype = dtype or DTYPES[i % 3]
    rows = int(torch.randint(1, 65, (1,), generator=gen))
    cols = 16 * int(torch.randint(1, 17, (1,), generator=gen))
    if shape is not None:
        rows, cols = shape
    lo = -4.0 if dtype == torch.float16 else -8.0
    amax = 10 ** (lo + (4.0 - lo) * torch.rand(1, generator=gen).item())
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    w = w / w.abs().max() * amax
    variant = i % 6
    if variant in (1, 5):  # all-zero blocks
        mask = torch.rand(rows, cols // 16, 1, generator=gen) < 0.3
        w = w.view(rows, -1, 16).masked_fill(mask, 0.0).view(rows, cols)
    if variant in (2, 5):  # one large outlier; the rest two decades below it
        w = w / 100
        w.view(-1)[int(torch.randint(0, w.numel(), (1,), generator=gen))] = -amax
    if variant in (3, 5):  # ±0 and negatives small enough to round to code 8
        w.view(-1)[::5] = 0.0
        w.view(-1)[1::7] = -0.0
        w.view(-1)[2::9] = -amax * 1e-3
    if variant == 4:  # heavy tails
        w = w**3 / amax**2
    w = w.to(dtype)
    if w.abs().max() == 0:  # the all-zero tensor is a documented divergence, tested apart
        w[0, 0] = 1.0
    return w


def test_cases_cover_special_values():
    codes = torch.cat([quantize_nvfp4(make_case(i)).packed.view(-1) for i in range(0, N_CASES, 6)])
    nibbles = torch.cat([codes & 0xF, codes >> 4])
    assert (nibbles == 8).any() and (nibbles == 7).any() and (nibbles == 15).any()


@pytest.mark.parametrize("i", range(N_CASES))
def test_nvfp4_bit_exact(modelopt, i):
    NVFP4QTensor, _ = modelopt
    w = make_case(i)
    qt, their_bs, their_s2 = NVFP4QTensor.quantize(w.clone(), 16)
    ours = quantize_nvfp4(w)

    assert torch.equal(ours.packed, qt._quantized_data)
    assert torch.equal(bits(ours.block_scale), bits(their_bs))
    assert their_s2.dtype == ours.scale_2.dtype == torch.float32
    assert torch.equal(bits(ours.scale_2), bits(their_s2))

    theirs = qt.dequantize(dtype=w.dtype, scale=their_bs, double_scale=their_s2, block_sizes={-1: 16})
    mine = dequantize_nvfp4(ours.packed, ours.block_scale, ours.scale_2, dtype=w.dtype)
    assert theirs.dtype == mine.dtype == w.dtype
    code8 = unpack_fp4(ours.packed) == 8
    assert torch.equal(bits(mine)[~code8], bits(theirs)[~code8])
    # The one difference: code 8 is -0.0 here, +0.0 in Model Optimizer's decode table.
    assert (mine[code8] == 0).all() and torch.signbit(mine[code8]).all()
    assert (theirs[code8] == 0).all() and not torch.signbit(theirs[code8]).any()


@pytest.mark.parametrize("i", range(N_EXPERT_CASES))
def test_nvfp4_experts_bit_exact(modelopt, i):
    # Model Optimizer's export quantizes fused experts with scale_2 viewed as [E, 1, 1]
    # (export/quant_utils.py, to_quantized_weight); each expert's scale_2 is its own amax.
    NVFP4QTensor, _ = modelopt
    n_experts = 2 + i % 3
    dtype = DTYPES[i % 3]
    # Experts differ in amax (and variant); make_case keeps each one not all-zero.
    w = torch.stack([make_case(N_CASES + i * 4 + e, (8, 32), dtype) for e in range(n_experts)])
    their_s2 = torch.stack([NVFP4QTensor.get_weights_scaling_factor_2(w[e]) for e in range(n_experts)])
    qt, their_bs, _ = NVFP4QTensor.quantize(w.clone(), 16, weights_scaling_factor_2=their_s2.view(-1, 1, 1))
    ours = quantize_nvfp4(w)
    assert torch.equal(bits(ours.scale_2), bits(their_s2))
    assert torch.equal(bits(ours.block_scale), bits(their_bs))
    assert torch.equal(ours.packed, qt._quantized_data)


def test_nvfp4_all_zero_tensor_divergence(modelopt):
    NVFP4QTensor, _ = modelopt
    w = torch.zeros(4, 32, dtype=torch.bfloat16)
    _, their_bs, their_s2 = NVFP4QTensor.quantize(w.clone(), 16)
    # Model Optimizer: scale_2 = 0, block scales 0/0 = NaN. If this starts failing, it has been
    # fixed upstream; revisit the divergence note in formats/nvfp4.py.
    assert their_s2.item() == 0.0 and torch.isnan(their_bs.float()).all()

    ours = quantize_nvfp4(w)
    assert torch.isfinite(ours.scale_2) and ours.scale_2 > 0
    assert (ours.block_scale.float() == 1.0).all() and (ours.packed == 0).all()
    dq = dequantize_nvfp4(ours.packed, ours.block_scale, ours.scale_2)
    assert (dq == 0).all() and not torch.signbit(dq).any()


@pytest.mark.parametrize("i", range(0, N_CASES, 4))
def test_fp8_bit_exact(modelopt, i):
    # Model Optimizer's FP8 export: scale = amax.float() / 448, then (w / scale).to(e4m3).
    _, FP8QTensor = modelopt
    w = make_case(i)
    q, scale = quantize_fp8(w)
    assert torch.equal(bits(scale), bits(w.abs().amax().float() / 448.0))
    qt, _ = FP8QTensor.quantize(w.clone(), scales=scale)
    assert torch.equal(bits(q), bits(qt._quantized_data))
    if w.dtype == torch.float32:  # without a given scale its scale is in w.dtype: same only here
        qt2, their_scale = FP8QTensor.quantize(w.clone())
        assert torch.equal(bits(their_scale), bits(scale))
        assert torch.equal(bits(q), bits(qt2._quantized_data))
