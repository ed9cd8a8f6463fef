"""AWQ-lite and SmoothQuant against Model Optimizer 0.47 running the same algorithm on the same
Linear and inputs (its `mtq.quantize` with INT4_AWQ_CFG / W4A8_AWQ_BETA_CFG / INT8_SMOOTHQUANT_CFG,
on the CPU): the same pre_quant_scale and the same smoothed weight, bit for bit. Plus the
properties Model Optimizer's code does not pin: neutral scales where no token arrived."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from quantship.algorithms import awq, smoothquant
from quantship.algorithms.smoothing import _scale_weight

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import modelopt.torch.quantization as mtq


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _case(seed: int, out: int = 96, inp: int = 256, calls: int = 2):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, inp, generator=g) * 0.05).to(torch.bfloat16)
    channel = torch.exp(torch.randn(inp, generator=g))  # outlier channels, as in real activations
    xs = [(torch.randn(4, 8, inp, generator=g) * channel).to(torch.bfloat16) for _ in range(calls)]
    return w, xs


def _modelopt(cfg_name: str, w: torch.Tensor, xs: list[torch.Tensor]):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
    model = torch.nn.Sequential(lin)

    def loop(m):
        for x in xs:
            m(x)

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg_name)), loop)
    return lin.input_quantizer._pre_quant_scale.detach(), lin.weight.detach()


def _ours_awq(w: torch.Tensor, xs: list[torch.Tensor], weight_format: str):
    block, fq = awq.search_quantizer(weight_format)
    x_mean = sum(awq.act_scale(x) for x in xs) / len(xs)
    search = awq.AWQSearch(w, x_mean, block, fq)
    for x in xs:
        search.observe(x)
    p = search.pre_quant_scale()
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
    _scale_weight(lin, 1.0 / p)
    return p.to(torch.bfloat16), lin.weight.detach(), search


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("cfg_name", "fmt"), [("INT4_AWQ_CFG", "int4_awq"), ("W4A8_AWQ_BETA_CFG", "w4a8_awq")])
def test_awq_lite_equals_model_optimizer(cfg_name, fmt, seed):
    w, xs = _case(seed)
    their_pqs, their_w = _modelopt(cfg_name, w, xs)
    pqs, smoothed, search = _ours_awq(w, xs, fmt)
    assert 0.0 <= search.best_alpha() <= 1.0
    assert torch.equal(bits(pqs), bits(their_pqs))
    assert torch.equal(bits(smoothed), bits(their_w))


@pytest.mark.parametrize("seed", range(3))
def test_smoothquant_equals_model_optimizer(seed):
    w, xs = _case(seed)
    their_pqs, their_w = _modelopt("INT8_SMOOTHQUANT_CFG", w, xs)
    x_amax = torch.stack([x.abs().reshape(-1, x.shape[-1]).amax(0).float() for x in xs]).amax(0)
    p = smoothquant.smoothquant_scale(w, x_amax)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
    _scale_weight(lin, 1.0 / p)
    assert torch.equal(bits(p.to(torch.bfloat16)), bits(their_pqs))
    assert torch.equal(bits(lin.weight.detach()), bits(their_w))
    # alpha 1: every smoothed channel has amax 1 (to float32 rounding), so INT8 sees no outliers
    assert torch.allclose(x_amax * p, torch.ones_like(p), rtol=1e-6)


def test_awq_search_prefers_the_scale_that_quantizes_best():
    # float64 reference of the objective: for each alpha, the output MSE of the quantized layer.
    w, xs = _case(7, calls=1)
    _, _, search = _ours_awq(w, xs, "int4_awq")
    x = xs[0]
    ref = {}
    for alpha in awq.ALPHAS:
        s = awq.awq_scale(search.x_mean, search.w_mean, alpha)
        out = (x * (1 / s).to(x.dtype)).double() @ awq.int4_search_fake_quant(w * s.to(w.dtype)).double().T
        ref[alpha] = (out - x.double() @ w.double().T).pow(2).mean().item()
    assert search.best_alpha() == min(ref, key=ref.get)
    assert ref[search.best_alpha()] < ref[0.0]  # better than no smoothing of the weight side


def test_no_tokens_gives_neutral_scales():
    w, _ = _case(0)
    block, fq = awq.search_quantizer("nvfp4_awq")
    search = awq.AWQSearch(w, torch.zeros(w.shape[1]), block, fq)
    search.observe(torch.zeros(0, w.shape[1], dtype=w.dtype))  # an expert routed no token
    assert search.best_alpha() is None
    assert torch.equal(search.pre_quant_scale(), torch.ones(w.shape[1]))
    assert torch.equal(smoothquant.smoothquant_scale(w, None), torch.ones(w.shape[1]))
    # a calibrated linear with a dead channel: that channel gets 1, never inf or NaN
    amax = torch.rand(w.shape[1]) + 0.5
    amax[3] = 0.0
    p = smoothquant.smoothquant_scale(w, amax)
    assert torch.isfinite(p).all() and p[3] == 1.0
    nan = search.x_mean.clone()
    nan[0] = float("nan")
    assert torch.equal(awq.AWQSearch(w, nan, block, fq).pre_quant_scale(), torch.ones(w.shape[1]))
