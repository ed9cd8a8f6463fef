"""GPU kernels against the CPU reference: codes, scales and values bit for bit.

Fresh random inputs every run (the seed is in the failure message), with the hard cases mixed
in: zero blocks, outliers hundreds of times the typical value, values on the E2M1 grid (exact
rounding ties), rows of very different magnitude, shapes whose rows and columns are not tile
multiples, fused-expert 3-D tensors. Each test builds its inputs and the CPU reference first
and skips only then, through `on_gpu`, so on a machine without CUDA and Triton the reference
side still runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from quantship.errors import QuantshipError
from quantship.formats import fp8, nvfp4
from quantship.formats.kernels import require_kernels, use_kernels

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
WEIGHT_SHAPES = [(128, 256), (96, 272), (33, 48), (3, 64, 512), (4, 17, 160)]


def on_gpu(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors on the GPU, or skip (after the caller built its inputs and reference)."""
    try:
        require_kernels()
    except QuantshipError as e:
        pytest.skip(str(e))
    return [t.cuda() for t in tensors]


def each_variant() -> Iterator[str]:
    """Run the caller's loop body once per arithmetic variant of the kernels (all must be exact)."""
    from quantship.formats.kernels import fp8_triton, nvfp4_triton

    saved, saved_div = dict(nvfp4_triton.VARIANT), fp8_triton.DIV
    try:
        for div, code, persistent in ((0, 0, 0), (1, 1, 0), (0, 1, 2), (1, 0, 3), (1, 1, 2)):
            nvfp4_triton.VARIANT.update(div=div, code=code, persistent=persistent)
            fp8_triton.DIV = div
            yield f"div={div} code={code} persistent={persistent}"
    finally:
        nvfp4_triton.VARIANT.update(saved)
        fp8_triton.DIV = saved_div


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def hard_values(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values with zero blocks, outliers, E2M1-grid values and mixed row magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn((*shape[:-1], 1), generator=g) * 1.5)
    flat = x.view(-1)
    n = flat.numel()
    flat[torch.randint(0, n, (max(1, n // 500),), generator=g)] *= 300.0  # outliers
    grid = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    pick = torch.randint(0, n, (n // 8,), generator=g)
    sign = torch.where(torch.rand(pick.shape, generator=g) < 0.5, -1.0, 1.0)
    flat[pick] = grid[torch.randint(0, len(grid), pick.shape, generator=g)] * sign  # rounding ties
    blocks = x.view(-1, 16)
    blocks[torch.randint(0, blocks.shape[0], (max(1, blocks.shape[0] // 10),), generator=g)] = 0.0
    limit = 6e4 if dtype == torch.float16 else 1e30
    return x.clamp(-limit, limit).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so -0.0 differs from +0.0 and NaN payloads compare."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str, seed: int) -> None:
    got = got.cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    diff = (bits(got) != bits(want)).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.shape[0]} elements differ, first at {diff[0].tolist()} (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_nvfp4_quantize_bit_exact(shape, dtype):
    seed = fresh_seed()
    w = hard_values(shape, dtype, seed)
    ref = nvfp4.quantize_nvfp4(w)
    given = torch.rand(shape[:-2]) * 1e-2 + 1e-4 if len(shape) == 3 else torch.tensor(3e-3)
    ref_given = nvfp4.quantize_nvfp4(w, given)
    (w_gpu,) = on_gpu(w)
    assert use_kernels(w_gpu)
    for variant in each_variant():
        for got, want, label in ((nvfp4.quantize_nvfp4(w_gpu), ref, "amax"),
                                 (nvfp4.quantize_nvfp4(w_gpu, given.cuda()), ref_given, "given scale_2")):
            assert_same_bits(got.packed, want.packed, f"packed ({label}, {variant})", seed)
            assert_same_bits(got.block_scale, want.block_scale, f"block scales ({label}, {variant})", seed)
            assert_same_bits(got.scale_2, want.scale_2, f"scale_2 ({label}, {variant})", seed)


@pytest.mark.parametrize("anchor", [1.0, 3.75, 448.0, 1e-3, 2.0**-120])
def test_nvfp4_every_bf16_value(anchor):
    """Every finite bf16 value up to ``anchor``, in blocks whose amax is ``anchor``: codes, scales
    and fake-quantized values exact for all of them, under a random global scale."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = every[torch.isfinite(every) & (every.float().abs() <= anchor)]
    every = every[torch.randperm(every.numel(), generator=g)]
    every = torch.cat([every, every.new_zeros((-every.numel()) % 240)]).reshape(-1, 15)
    w = torch.cat([torch.full((every.shape[0], 1), anchor, dtype=torch.bfloat16), every], dim=1).reshape(-1, 256)
    s2 = torch.tensor(anchor / 2688 * float(torch.empty(()).uniform_(0.3, 3.0, generator=g)))
    want = nvfp4.quantize_nvfp4(w, s2)
    want_fake = nvfp4.fake_quantize_nvfp4_activation(w, s2)
    wg, sg = on_gpu(w, s2)
    for variant in each_variant():
        got = nvfp4.quantize_nvfp4(wg, sg)
        assert_same_bits(got.packed, want.packed, f"packed ({variant})", seed)
        assert_same_bits(got.block_scale, want.block_scale, f"block scales ({variant})", seed)
        assert_same_bits(nvfp4.fake_quantize_nvfp4_activation(wg, sg), want_fake, f"fake-quant ({variant})", seed)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 512), (5, 48), (3, 32, 160)])
def test_nvfp4_dequantize_bit_exact(shape, out_dtype):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (*shape[:-1], shape[-1] // 2), generator=g, dtype=torch.uint8)
    scale = (torch.rand((*shape[:-1], shape[-1] // 16), generator=g) * 448).clamp_min(2**-9)
    scale = scale.to(torch.float8_e4m3fn)
    s2 = torch.rand(shape[:-2], generator=g) * 1e-2 + 1e-5 if len(shape) == 3 else torch.tensor(2.5e-3)
    want = nvfp4.dequantize_nvfp4(packed, scale, s2, out_dtype)
    p, s, s2g = on_gpu(packed, scale, s2)
    assert_same_bits(nvfp4.dequantize_nvfp4(p, s, s2g, out_dtype), want, "dequantized", seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(512, 1024), (2, 7, 64), (300, 272)])
@pytest.mark.parametrize("level", [0.3, 1.0, 4.0])
def test_nvfp4_activation_fake_quant_bit_exact(shape, dtype, level):
    """Static input scales below, at and above the tensor's own amax / (6*448) (saturation)."""
    seed = fresh_seed()
    x = hard_values(shape, dtype, seed)
    scale = torch.tensor(float(x.float().abs().max()) / 2688 * level)
    want = nvfp4.fake_quantize_nvfp4_activation(x, scale)
    xg, sg = on_gpu(x, scale)
    for variant in each_variant():
        assert_same_bits(nvfp4.fake_quantize_nvfp4_activation(xg, sg), want, f"fake-quantized ({variant})", seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(256, 512), (33, 48), (5, 16, 96)])
def test_fp8_quantize_dequantize_fake_quant_bit_exact(shape, dtype):
    seed = fresh_seed()
    x = hard_values(shape, dtype, seed)
    q, scale = fp8.quantize_fp8(x)
    low_scale = scale * 0.25  # a quarter of the range: a quarter of the values saturate
    q_low, _ = fp8.quantize_fp8(x, low_scale)
    deq = fp8.dequantize_fp8(q, scale, torch.bfloat16)
    fake = fp8.fake_quantize_fp8(x, low_scale)
    per_expert = scale * torch.rand(shape[0]) + scale * 0.1
    q_exp = fp8.quantize_fp8_experts(x, per_expert)
    deq_exp = fp8.dequantize_fp8_experts(q_exp, per_expert, torch.float32)
    xg, qg, sg, lg, eg = on_gpu(x, q, scale, low_scale, per_expert)
    for v in each_variant():
        got_q, got_scale = fp8.quantize_fp8(xg)
        assert_same_bits(got_q, q, f"codes (own amax, {v})", seed)
        assert_same_bits(got_scale, scale, "scale", seed)
        assert_same_bits(fp8.quantize_fp8(xg, lg)[0], q_low, f"codes (saturating, {v})", seed)
        assert_same_bits(fp8.dequantize_fp8(qg, sg, torch.bfloat16), deq, "dequantized", seed)
        assert_same_bits(fp8.fake_quantize_fp8(xg, lg), fake, f"fake-quantized ({v})", seed)
        assert_same_bits(fp8.quantize_fp8_experts(xg, eg), q_exp, f"per-expert codes ({v})", seed)
        assert_same_bits(fp8.dequantize_fp8_experts(q_exp.cuda(), eg, torch.float32), deq_exp, "per-expert values", seed)


@pytest.mark.parametrize("shape", [(1,), (4097,), (3, 1000, 77), (8192, 1024)])
def test_amax_kernel(shape):
    seed = fresh_seed()
    x = hard_values((*shape[:-1], ((shape[-1] + 15) // 16) * 16), torch.bfloat16, seed)
    want = x.float().abs().amax()
    want_per = x.float().abs().reshape(shape[0], -1).amax(dim=1) if len(shape) > 1 else want.reshape(1)
    with_nan = x.clone()
    with_nan.view(-1)[int(torch.randint(0, x.numel(), ()))] = float("nan")
    (xg, ng) = on_gpu(x, with_nan)
    from quantship.formats.kernels import amax as kamax

    assert_same_bits(kamax.tensor_amax(xg), want, "amax", seed)
    assert_same_bits(kamax.matrix_amax(xg, want_per.numel()), want_per, "amax per matrix", seed)
    assert kamax.tensor_amax(ng).item() == float("inf")  # NaN is never dropped


def test_nan_weight_is_refused_like_the_reference():
    w = hard_values((32, 64), torch.bfloat16, fresh_seed())
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        nvfp4.quantize_nvfp4(w)
    (wg,) = on_gpu(w)
    with pytest.raises(ValueError, match="NaN or inf"):
        nvfp4.quantize_nvfp4(wg)


def test_kernels_switch_off_to_the_reference_on_gpu(monkeypatch):
    """QUANTSHIP_KERNELS=0 runs the torch reference on the GPU; both agree with the CPU."""
    seed = fresh_seed()
    w = hard_values((64, 256), torch.bfloat16, seed)
    want = nvfp4.quantize_nvfp4(w)
    (wg,) = on_gpu(w)
    monkeypatch.setenv("QUANTSHIP_KERNELS", "0")
    assert not use_kernels(wg)
    got = nvfp4.quantize_nvfp4(wg)
    assert_same_bits(got.packed, want.packed, "packed (torch on GPU)", seed)
    assert_same_bits(got.block_scale, want.block_scale, "block scales (torch on GPU)", seed)


def test_scales_from_amax_are_the_same_on_gpu():
    """torch's CUDA division by a Python number multiplies by a rounded reciprocal; the scale
    functions divide exactly, so a GPU plan holds the CPU's scales bit for bit."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    amax = torch.exp(torch.randn(100_000, generator=g) * 8)
    want = [nvfp4.global_scale_from_amax(amax), nvfp4.input_scale_from_amax(amax), fp8.scale_from_amax(amax)]
    (ag,) = on_gpu(amax)
    got = [nvfp4.global_scale_from_amax(ag), nvfp4.input_scale_from_amax(ag), fp8.scale_from_amax(ag)]
    for what, a, b in zip(("global", "input", "fp8"), got, want, strict=True):
        assert_same_bits(a, b, f"{what} scale", seed)
