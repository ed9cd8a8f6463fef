"""GPTQ on single matrices against an independent float64 implementation: the same choices,
a lower layer-output error than round-to-nearest on correlated inputs, and tensors that
dequantize bit for bit to the values GPTQ compensated against."""

from __future__ import annotations

import pytest
import torch

from quantship.algorithms.gptq import GPTQConfig, HessianAccumulator, gptq_quantize, objective
from quantship.algorithms.gptq_formats import GPTQ_FORMATS
from quantship.errors import QuantshipError
from quantship.formats import fp8, int4, nvfp4

ROWS, COLS = 24, 256  # INT4 needs two groups of 128
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
E4M3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()
E4M3 = torch.unique(E4M3[torch.isfinite(E4M3)])


def _nearest(grid: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Nearest grid value (float64), saturating at the ends."""
    return grid[(v[:, None] - grid[None, :]).abs().argmin(dim=1)]


def reference_gptq(w: torch.Tensor, h: torch.Tensor, quant, damp: float = 0.01,
                   order: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ as Optimal Brain Quantization states it, in float64: quantize column i, move the
    other columns by -err/[H⁻¹]ᵢᵢ · [H⁻¹]ᵢ,:, then remove i from H⁻¹ (Gaussian elimination).
    No Cholesky, no lazy batches. `quant(current_weight, column)` -> that column's values."""
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    order = torch.arange(n) if order is None else order
    h += damp * torch.diagonal(h).mean() * torch.eye(n, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    todo = torch.ones(n, dtype=torch.bool)
    for i in order.tolist():
        q[:, i] = quant(w, i)
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, todo] -= err[:, None] * hinv[i, todo][None, :]
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
        todo[i] = False
    return q


def _e4m3_block_scale(block_amax: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """DESIGN.md: e4m3(clamp(block_amax / (6 * scale_2), 2**-9, 448)), 1.0 for a zero block."""
    r = (block_amax.double() / (6 * s2.double())).clamp(2.0**-9, 448.0)
    r = torch.where(block_amax == 0, torch.ones_like(r), r)
    return r.to(torch.float8_e4m3fn)


def nvfp4_reference_quant(w: torch.Tensor, dynamic: bool):
    """Round to the nearest E2M1 value times the step block_scale * scale_2 (the float32 product
    the format dequantizes with); dynamic: the block scale from the current values of the block's
    16 columns when its first column comes up."""
    s2 = nvfp4.global_scale_from_amax(w.abs().amax().float())
    grid = torch.cat([-E2M1.flip(0), E2M1])
    static = _e4m3_block_scale(w.double().abs().reshape(w.shape[0], -1, 16).amax(-1), s2)
    current: dict[str, torch.Tensor] = {}

    def quant(cur: torch.Tensor, i: int) -> torch.Tensor:
        if dynamic and i % 16 == 0:
            current["scale"] = _e4m3_block_scale(cur[:, i : i + 16].abs().amax(-1), s2)
        scale = current["scale"] if dynamic else static[:, i // 16]
        step = (scale.float() * s2).double()
        return _nearest(grid, cur[:, i] / step) * step

    return quant


@pytest.fixture(scope="module")
def problem():
    """A weight and the Hessian of strongly correlated inputs with uneven channel scales."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(ROWS, COLS, generator=g) * 0.05).to(torch.bfloat16)
    mix = torch.eye(COLS) + torch.randn(COLS, COLS, generator=g) / COLS**0.5
    x = (torch.randn(2048, COLS, generator=g) @ mix) * torch.exp(torch.randn(COLS, generator=g) * 0.5)
    acc = HessianAccumulator(COLS)
    acc.add(x)
    return w, acc.hessian(), x


def _run(w, h, fmt: str, config: GPTQConfig):
    amax = w.abs().amax().float()
    scale = {"nvfp4": nvfp4.global_scale_from_amax(amax), "fp8": fp8.scale_from_amax(amax)}.get(fmt, torch.ones(()))
    cols = GPTQ_FORMATS[fmt].columns(w[None], scale[None], config.nvfp4_scales)
    q = gptq_quantize(w[None], h[None], cols, config)[0]
    rows = GPTQ_FORMATS[fmt].pack({k: v[0] for k, v in cols.row_tensors(q[None]).items()})
    return q, rows, scale


@pytest.mark.parametrize(("fmt", "mode", "act_order"), [
    ("nvfp4", "static", False), ("nvfp4", "static", True), ("nvfp4", "dynamic", False),
    ("fp8", "static", False), ("fp8", "static", True), ("int4_awq", "static", False), ("int4_awq", "static", True),
])
def test_matches_float64_reference_and_beats_rtn(problem, fmt, mode, act_order):
    w, h, _ = problem
    q, _, scale = _run(w, h, fmt, GPTQConfig(block_size=32, nvfp4_scales=mode, act_order=act_order))
    if fmt == "nvfp4":
        quant = nvfp4_reference_quant(w, dynamic=mode == "dynamic")
        rtn = nvfp4.fake_quantize_nvfp4_weight(w.float(), scale)
    elif fmt == "fp8":
        def quant(cur, i):
            code = _nearest(E4M3, (cur[:, i] / scale.double()).clamp(-448, 448))
            return (code.float() * scale).double()  # dequantized as the format does, in float32

        rtn = fp8.fake_quantize_fp8(w.float(), scale)
    else:  # INT4: groups of 128 inputs, scale amax / 7 from the original weight, codes -8..7
        step = (w.float().abs().reshape(ROWS, -1, 128).amax(-1) / 7).repeat_interleave(128, dim=1)

        def quant(cur, i):
            code = _nearest(torch.arange(-8, 8, dtype=torch.float64), cur[:, i] / step[:, i].double())
            return (code.float() * step[:, i]).double()

        rtn = int4.fake_quantize_int4(w.float())
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    ref = reference_gptq(w, h, quant, order=order)
    obj = lambda a: float(objective(w[None], a[None], h[None]))  # noqa: E731
    assert obj(q) < 0.8 * obj(rtn), "GPTQ must cut the output error of round-to-nearest on correlated inputs"
    assert abs(obj(q) - obj(ref)) <= 0.02 * obj(ref)
    same = (q.double() == ref).float().mean().item()
    assert same > 0.95, f"only {same:.3f} of the values equal the float64 reference's"


@pytest.mark.parametrize(("mode", "act_order"), [("static", False), ("static", True), ("dynamic", False)])
def test_nvfp4_export_dequantizes_bit_exactly_to_the_gptq_weight(problem, mode, act_order):
    w, h, _ = problem
    q, rows, s2 = _run(w, h, "nvfp4", GPTQConfig(nvfp4_scales=mode, act_order=act_order))
    packed, block_scale = rows["weight"], rows["weight_scale"]
    assert packed.dtype == torch.uint8 and packed.shape == (ROWS, COLS // 2)
    assert block_scale.dtype == torch.float8_e4m3fn and block_scale.shape == (ROWS, COLS // 16)
    back = nvfp4.dequantize_nvfp4(packed, block_scale, s2, dtype=torch.float32)
    assert torch.equal(back, q)
    rtn = nvfp4.quantize_nvfp4(w, s2)
    if mode == "static":  # block scales are RTN's, fixed before compensation
        assert torch.equal(block_scale.view(torch.uint8), rtn.block_scale.view(torch.uint8))
    assert not torch.equal(packed, rtn.packed)


def test_fp8_export_dequantizes_bit_exactly_to_the_gptq_weight(problem):
    w, h, _ = problem
    q, rows, scale = _run(w, h, "fp8", GPTQConfig())
    assert rows["weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(fp8.dequantize_fp8(rows["weight"], scale, torch.float32), q)


def test_int4_export_dequantizes_bit_exactly_to_the_gptq_weight(problem):
    w, h, _ = problem
    q, rows, _ = _run(w, h, "int4_awq", GPTQConfig(act_order=True))
    assert rows["weight"].dtype == torch.uint8 and rows["weight"].shape == (ROWS // 2, COLS)
    assert torch.equal(int4.dequantize_int4(rows["weight"], rows["weight_scale"], 128, torch.float32), q)
    assert torch.equal(rows["weight_scale"], int4.scale_from_amax(int4.group_amax(w)))


def test_uncorrelated_inputs_give_round_to_nearest_exactly():
    """With a diagonal Hessian no error can be compensated: GPTQ's bytes are RTN's."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g)  # float32: FP8 RTN then has no bf16 double rounding
    h = torch.diag(torch.rand(64, generator=g) + 0.5)
    _, rows, s2 = _run(w.to(torch.bfloat16), h, "nvfp4", GPTQConfig())
    assert torch.equal(rows["weight"], nvfp4.quantize_nvfp4(w.to(torch.bfloat16), s2).packed)
    _, rows, scale = _run(w, h, "fp8", GPTQConfig())
    assert torch.equal(rows["weight"].view(torch.uint8), fp8.quantize_fp8(w, scale)[0].view(torch.uint8))


def test_batched_matrices_equal_one_at_a_time(problem):
    w, h, _ = problem
    ws = torch.stack([w, -w, w * 0.5])
    hs = torch.stack([h, h * 2.0, h + torch.eye(COLS)])
    s2 = nvfp4.global_scale_from_amax(ws.abs().amax(dim=(1, 2)).float())
    cols = GPTQ_FORMATS["nvfp4"].columns(ws, s2, "static")
    q = gptq_quantize(ws, hs, cols, GPTQConfig())
    for b in range(3):
        one = GPTQ_FORMATS["nvfp4"].columns(ws[b : b + 1], s2[b : b + 1], "static")
        qb = gptq_quantize(ws[b : b + 1], hs[b : b + 1], one, GPTQConfig())[0]
        assert (q[b] == qb).float().mean() > 0.99


def test_hessian_accumulator_rows_then_sum(problem):
    _, _, x = problem
    acc = HessianAccumulator(COLS)
    for chunk in (x[:10], x[10:50], x[50:]):  # first below COLS rows (kept as rows), then folded
        acc.add(chunk.reshape(1, -1, COLS))
    ref = 2.0 / x.shape[0] * (x.double().T @ x.double())
    assert acc.n == x.shape[0]
    torch.testing.assert_close(acc.hessian().double(), ref, rtol=1e-4, atol=1e-4)
    few = HessianAccumulator(COLS)
    few.add(x[:7])
    torch.testing.assert_close(few.hessian().double(), 2.0 / 7 * (x[:7].double().T @ x[:7].double()),
                               rtol=1e-5, atol=1e-5)


def test_bad_options_are_one_line_errors():
    with pytest.raises(QuantshipError, match="act_order needs static"):
        GPTQConfig(nvfp4_scales="dynamic", act_order=True)
    with pytest.raises(QuantshipError, match="multiple of 16"):
        GPTQConfig(block_size=24)
    with pytest.raises(QuantshipError, match="max_hessian_bytes must be a positive"):
        GPTQConfig(max_hessian_bytes=0)


def test_fast_e2m1_rounding_equals_the_format_reference():
    """The column loop's rounder against round_to_e2m1_codes + e2m1_values: every bound (ties),
    its float32 neighbours, zeros of both signs, saturation and inf; sign bits included."""
    from quantship.algorithms.gptq_formats import _codes_of, _E2M1Rounder

    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 1e30, float("inf")])
    near = torch.cat([bounds, torch.nextafter(bounds, torch.zeros(())), torch.nextafter(bounds, bounds * 2)])
    grid = torch.cat([near, torch.linspace(0, 8, 4001), torch.tensor([0.0, 1e-30])])
    x = torch.cat([grid, -grid])
    want = nvfp4.e2m1_values(nvfp4.round_to_e2m1_codes(x))
    got = _E2M1Rounder(x.device)(x)
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))
    finite = torch.isfinite(x)  # -0.0 included: code 0, as the reference's q < 0
    assert torch.equal(_codes_of(got * 0.37 / 0.37)[finite], nvfp4.round_to_e2m1_codes(x)[finite])


def test_both_inverse_factor_methods_give_the_upper_cholesky_factor_of_the_inverse(problem, monkeypatch):
    """The shipped 'reversed' method (one Cholesky of the index-reversed H, one triangular solve),
    batched or one matrix per call, against float64 inv() and cholesky(upper) of it."""
    from quantship.algorithms import gptq as gptq_mod

    _, h, _ = problem
    hs = torch.stack([h, h * 3.0 + torch.eye(COLS)])
    damped = hs.double() + 0.01 * torch.diagonal(hs.double(), dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(COLS)
    want = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    for method in ("reversed", "chol_inv_chol"):
        for loop_from in (1, 1 << 30):
            monkeypatch.setitem(gptq_mod.INVERSE, "method", method)
            monkeypatch.setitem(gptq_mod.INVERSE, "loop_from", loop_from)
            got = gptq_mod._inverse_hessian_factor(hs, 0.01)
            assert got.dtype == torch.float32 and torch.equal(got, got.triu())
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_objective_split_sums_two_candidates_from_one_gemm(problem):
    w, h, _ = problem
    a, b = w.float() * 0.9, w.float().round()
    both = objective(torch.cat([w, w])[None], torch.cat([a, b])[None], h[None], torch.float64, split=ROWS)
    torch.testing.assert_close(both[:, 0], torch.stack([objective(w[None], a[None], h[None])[0],
                                                         objective(w[None], b[None], h[None])[0]]))
    ref = float(((w.double() - a.double()) @ h.double() * (w.double() - a.double())).sum())
    assert abs(float(both[0, 0]) - ref) <= 1e-9 * abs(ref)


def test_lower_triangular_inverse_by_halves_matches_a_triangular_solve():
    from quantship.algorithms.gptq import _lower_triangular_inverse

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 300, 200, generator=g, dtype=torch.float64)
    low = torch.linalg.cholesky(x.transpose(1, 2) @ x / 300 + 0.01 * torch.eye(200, dtype=torch.float64))
    want = torch.linalg.solve_triangular(low, torch.eye(200, dtype=torch.float64).expand(2, 200, 200), upper=False)
    got = _lower_triangular_inverse(low, leaf=48)  # three levels of halves, odd sizes included
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * want.abs().max().item())
    assert torch.equal(got, got.tril())
