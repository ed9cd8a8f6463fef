"""The batched fused-experts forward (grouped GEMM, and the padded bmm fallback) computes what
the per-expert loop and transformers compute, with the same per-expert statistics; the
deferred all-token fallback gives the statistics the batch-by-batch policy defines, with less
work. Runs on the CPU (torch's grouped GEMM has a CPU path); the GPU uses the same code."""

from __future__ import annotations

import pytest
import torch

from quantship.calibration.observers import Calibrator
from quantship.model import experts as fused_ops
from quantship.model.discover import discover
from quantship.model.experts_batched import batched_experts_forward, grouped_mm_function
from quantship.recipes import get_kv_cache_format, get_recipe

from tiny_models import build_tiny_model


def _routing(n_tokens: int, n_exp: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct top-k experts per token drawn from the first half of the experts (the rest get
    no token), and normalized routing weights."""
    scores = torch.rand(n_tokens, n_exp // 2, generator=g)
    idx = scores.topk(k, dim=-1).indices
    w = torch.rand(n_tokens, k, generator=g).softmax(-1)
    return idx, w


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("grouped", [True, False])
def test_batched_forward_matches_loop_and_float64(kind, grouped):
    if grouped and grouped_mm_function() is None:
        pytest.skip("this torch has no grouped GEMM")
    model = build_tiny_model(kind)
    fe = discover(model).fused_experts[0]
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    n_tokens, k = 37, model.config.num_experts_per_tok
    hidden = (torch.randn(n_tokens, fe.hidden_size, generator=g) * 2).to(torch.bfloat16)
    idx, w = _routing(n_tokens, fe.num_experts, k, g)
    with torch.no_grad():
        loop_out, loop = fused_ops.fused_experts_forward(fe, hidden, idx, w)
        out, st = batched_experts_forward(fe, hidden, idx, w, grouped=grouped)
        theirs = fe.module(hidden, idx, w)

    assert torch.equal(st.tokens, loop.tokens)
    assert torch.equal(st.tokens, torch.bincount(idx.flatten(), minlength=fe.num_experts).float())
    assert torch.equal(st.gate_up_input_amax, loop.gate_up_input_amax)
    # Down input amax per expert against float64 from the weights (bf16 GEMMs: a few ulps).
    x64, gu64 = hidden.double(), fe.gate_up.detach().double()
    inter = fe.intermediate_size
    for e in range(fe.num_experts):
        rows = x64[(idx == e).any(-1)]
        if rows.shape[0] == 0:
            assert st.down_input_amax[e] == 0
            continue
        gate, up = rows @ gu64[e, :inter].T, rows @ gu64[e, inter:].T
        act = fe.module.act_fn(gate.float()).double() * up
        assert float(st.down_input_amax[e]) == pytest.approx(float(act.abs().max()), rel=3e-2)
    ulp = theirs.float().abs().max() * 2**-7
    assert (out.float() - theirs.float()).abs().max() <= 2 * ulp
    assert (out.float() - loop_out.float()).abs().max() <= 2 * ulp


def _batches(n: int, tokens: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (1, tokens), generator=g)} for _ in range(n)]


def _calibrate(model, structure, batches, min_tokens: int, stash_bytes: int) -> Calibrator:
    cal = Calibrator(model, structure, get_recipe("nvfp4"), get_kv_cache_format("none"), min_tokens, set(),
                     fallback_stash_bytes=stash_bytes)
    with torch.no_grad(), cal.attached():
        for b in batches:
            model(**b)
    return cal


def test_deferred_fallback_gives_the_batch_by_batch_statistics_with_less_work():
    """Three batches; with a stash of 1 byte every forward flushes (the batch-by-batch policy),
    with a large stash the side pass runs once at the end, only for experts still cold. The
    statistics of experts cold at the end (the only ones scales use) are identical, and equal
    the float64 amax over every calibration token pushed through the expert."""
    model = build_tiny_model("qwen3_moe")
    structure = discover(model)
    batches = _batches(3, 12, seed=int(torch.randint(0, 2**31, ())))
    min_tokens = 3
    eager = _calibrate(model, structure, batches, min_tokens, stash_bytes=1)
    deferred = _calibrate(model, structure, batches, min_tokens, stash_bytes=1 << 30)
    block = structure.moe_blocks[0]
    fe = block.fused
    cov_e, cov_d = eager.stats.coverage[block.name], deferred.stats.coverage[block.name]
    assert torch.equal(cov_e.tokens, cov_d.tokens)
    assert cov_d.tokens.sum() == 3 * 12 * model.config.num_experts_per_tok
    cold = cov_d.fallback
    assert cold.any() and not cold.all()
    for key in (f"{fe.name}.{fe.gate_up_param}", f"{fe.name}.{fe.down_param}"):
        assert torch.equal(eager.stats.fallback_amax[key][cold], deferred.stats.fallback_amax[key][cold])
    assert 0 < deferred.fallback.pairs < eager.fallback.pairs

    captured = []
    handle = block.module.register_forward_pre_hook(lambda _m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()
    e = int(cold.nonzero()[0])
    gu = fe.gate_up[e].detach().double()
    inter = fe.intermediate_size
    h = torch.nn.functional.silu(x @ gu[:inter].T) * (x @ gu[inter:].T)
    down_key = f"{fe.name}.{fe.down_param}"
    assert float(deferred.stats.fallback_amax[down_key][e]) == pytest.approx(float(h.abs().max()), rel=2e-2)
