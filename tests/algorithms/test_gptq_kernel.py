"""The fused GPTQ kernel (algorithms/gptq_triton.py) against the torch column loop and the
float64 GPTQ of test_gptq. On the CPU the kernel runs in Triton's interpreter: a private copy
of the module built with TRITON_INTERPRET=1 stands in for the compiled one inside
`gptq_quantize`, so the dispatch (act-order permutation, steps, partial blocks) is the real one.
On a GPU the compiled kernel runs against the torch loop on the same device."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import quantship.algorithms
from quantship.algorithms import gptq as gptq_mod
from quantship.algorithms.gptq import GPTQConfig, HessianAccumulator, gptq_quantize, objective
from quantship.algorithms.gptq_formats import GPTQ_FORMATS
from quantship.formats import fp8, int4, nvfp4

from .test_gptq import E4M3, _nearest, nvfp4_reference_quant, reference_gptq


@pytest.fixture(scope="module")
def interpreted():
    """gptq_triton compiled for Triton's CPU interpreter (skips where Triton is not installed)."""
    triton = pytest.importorskip("triton")
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"Triton {triton.__version__}'s interpreter passes scalar arguments as arrays; the test extra pins 3.9")
    path = os.path.join(os.path.dirname(quantship.algorithms.__file__), "gptq_triton.py")
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit runs, i.e. at module execution
    try:
        spec = importlib.util.spec_from_file_location("quantship_gptq_triton_interpreted", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module


@pytest.fixture
def kernel_on(monkeypatch, interpreted):
    """`gptq_quantize` takes the kernel path on CPU tensors, through the interpreted module."""
    monkeypatch.setattr(gptq_mod, "use_kernels", lambda *t: True)
    monkeypatch.setattr(quantship.algorithms, "gptq_triton", interpreted, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # also read when one jit function calls another


def _problem(rows: int, cols: int, batch: int, seed: int):
    """Correlated inputs with uneven channel scales; each batch entry its own weight and Hessian."""
    g = torch.Generator().manual_seed(seed)
    ws, hs = [], []
    for _ in range(batch):
        ws.append((torch.randn(rows, cols, generator=g) * 0.05).to(torch.bfloat16))
        mix = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5
        x = (torch.randn(4 * cols, cols, generator=g) @ mix) * torch.exp(torch.randn(cols, generator=g) * 0.5)
        acc = HessianAccumulator(cols)
        acc.add(x)
        hs.append(acc.hessian())
    return torch.stack(ws), torch.stack(hs)


def _scale(fmt: str, w: torch.Tensor) -> torch.Tensor:
    amax = w.abs().amax(dim=(1, 2)).float()
    if fmt == "nvfp4":
        return nvfp4.global_scale_from_amax(amax)
    return fp8.scale_from_amax(amax) if fmt == "fp8" else torch.ones(w.shape[0])


def _gptq(fmt: str, w, h, config: GPTQConfig):
    return gptq_quantize(w, h, GPTQ_FORMATS[fmt].columns(w, _scale(fmt, w), config.nvfp4_scales), config)


def _float64_quant(fmt: str, w: torch.Tensor, scale: torch.Tensor, mode: str):
    if fmt == "nvfp4":
        assert mode == "static"
        return nvfp4_reference_quant(w, dynamic=False)
    if fmt == "fp8":
        return lambda cur, i: (_nearest(E4M3, (cur[:, i] / scale.double()).clamp(-448, 448)).float() * scale).double()
    step = (w.float().abs().reshape(w.shape[0], -1, 128).amax(-1) / 7).repeat_interleave(128, dim=1)
    grid = torch.arange(-8, 8, dtype=torch.float64)
    return lambda cur, i: (_nearest(grid, cur[:, i] / step[:, i].double()).float() * step[:, i]).double()


# 20 rows: a partial row tile; 80 columns: two full lazy-batch blocks and a half one.
@pytest.mark.parametrize(("fmt", "mode", "act_order", "cols"), [
    ("nvfp4", "static", False, 80), ("nvfp4", "static", True, 80), ("nvfp4", "static_mse", False, 80),
    ("fp8", "static", True, 80), ("int4_awq", "static", True, 128),
])
def test_kernel_equals_the_column_loop_and_the_float64_gptq(kernel_on, monkeypatch, fmt, mode, act_order, cols):
    w, h = _problem(20, cols, batch=2, seed=cols + act_order)
    config = GPTQConfig(nvfp4_scales=mode, act_order=act_order)
    q_kernel = _gptq(fmt, w, h, config)
    monkeypatch.setattr(gptq_mod, "use_kernels", lambda *t: False)
    q_loop = _gptq(fmt, w, h, config)
    same = (q_kernel == q_loop).float().mean().item()
    assert same > 0.99, f"only {same:.4f} of the kernel's values equal the torch loop's"
    obj_k, obj_l = objective(w, q_kernel, h), objective(w, q_loop, h)
    torch.testing.assert_close(obj_k, obj_l, rtol=1e-3, atol=0)
    if mode == "static":
        scale = _scale(fmt, w)
        for b in range(w.shape[0]):
            order = torch.argsort(torch.diagonal(h[b]), descending=True, stable=True) if act_order else None
            ref = reference_gptq(w[b], h[b], _float64_quant(fmt, w[b], scale[b], mode), order=order)
            assert (q_kernel[b] == ref.float()).float().mean() > 0.95  # ref: exact products, q: float32
            assert abs(float(obj_k[b]) - float(objective(w[b : b + 1], ref[None], h[b : b + 1]))) <= 0.02 * float(obj_k[b])


def _hard_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Signed zeros, values past each format's largest code, tiny values (E4M3 subnormals) and
    values on the E2M1 rounding bounds, in float32."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[0, :8] = torch.tensor([-0.0, 0.0, -0.0, 1e-30, -1e-30, 3e-3, -5e-4, 2e-6])
    w[1, ::7] *= 400.0
    w[2] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]).repeat(cols // 8) * (w[2].abs().max() / 6)
    w[3, :16] = -0.0  # a whole NVFP4 block of negative zeros
    return w


@pytest.mark.parametrize("path", ["kernel", "loop"])
@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "int4_awq"])
def test_gptq_rounds_exactly_like_the_format_without_compensation(kernel_on, monkeypatch, fmt, path):
    """A diagonal Hessian moves no error, so GPTQ is round-to-nearest: the kernel's and the torch
    loop's bytes must be the format module's own, signed zeros, saturation, subnormals and ties
    included."""
    if path == "loop":
        monkeypatch.setattr(gptq_mod, "use_kernels", lambda *t: False)
    w = _hard_weight(24, 128, seed=7)[None]
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(8)) + 0.5)[None]
    scale = _scale(fmt, w)
    cols = GPTQ_FORMATS[fmt].columns(w, scale, "static")
    q = gptq_quantize(w, h, cols, GPTQConfig())
    rows = GPTQ_FORMATS[fmt].pack({k: v[0] for k, v in cols.row_tensors(q).items()})
    if fmt == "nvfp4":
        want = nvfp4.quantize_nvfp4(w[0], scale[0])
        assert torch.equal(rows["weight"], want.packed)
        assert torch.equal(rows["weight_scale"].view(torch.uint8), want.block_scale.view(torch.uint8))
    elif fmt == "fp8":
        assert torch.equal(rows["weight"].view(torch.uint8), fp8.quantize_fp8(w[0], scale[0])[0].view(torch.uint8))
    else:
        assert torch.equal(rows["weight"], int4.quantize_int4(w[0])[0])


def test_gpu_kernel_equals_the_torch_loop_on_the_gpu(monkeypatch):
    """Compiled kernel vs the torch loop, both on the GPU, for a dense matrix and a batch of
    experts; FMA contraction and GEMM order may flip a rare rounding, nothing more."""
    from quantship.errors import QuantshipError
    from quantship.formats.kernels import require_kernels

    dense, experts = _problem(200, 320, batch=1, seed=1), _problem(48, 96, batch=6, seed=2)
    try:
        require_kernels()
    except QuantshipError as e:
        pytest.skip(str(e))
    for w, h in (dense, experts):
        w, h = w.cuda(), h.cuda()
        for fmt in ("nvfp4", "fp8"):
            for act_order in (False, True):
                config = GPTQConfig(act_order=act_order)
                assert gptq_mod.use_kernels(w)
                q_kernel = _gptq(fmt, w, h, config)
                with monkeypatch.context() as m:
                    m.setattr(gptq_mod, "use_kernels", lambda *t: False)
                    q_loop = _gptq(fmt, w, h, config)
                same = (q_kernel == q_loop).float().mean().item()
                assert same > 0.98, f"{fmt} act_order={act_order}: {same:.4f} equal"
                torch.testing.assert_close(objective(w, q_kernel, h), objective(w, q_loop, h), rtol=5e-3, atol=0)


def test_gpu_hessian_of_bf16_rows_equals_float64():
    """On the GPU, bf16 rows are folded into the Hessian by a tensor-core GEMM accumulating in
    float32 (out_dtype): the same sum as float64 up to float32 rounding."""
    from quantship.errors import QuantshipError
    from quantship.formats.kernels import require_kernels

    g = torch.Generator().manual_seed(9)
    x = (torch.randn(3000, 96, generator=g) * torch.exp(torch.randn(96, generator=g))).to(torch.bfloat16)
    want = 2.0 / 3000 * (x.double().T @ x.double())
    try:
        require_kernels()
    except QuantshipError as e:
        pytest.skip(str(e))
    acc = HessianAccumulator(96)
    for chunk in x.cuda().split(700):  # rows kept first, then folded, then GEMMs into the sum
        acc.add(chunk)
    torch.testing.assert_close(acc.hessian().double().cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
