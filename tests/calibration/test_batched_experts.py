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


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("grouped", [True, False])
def test_batched_forward_runs_fake_quant_and_observers_per_expert_like_the_loop(grouped, rows):
    """GPTQ's Hessian collection on the GPU: the per-expert activation fake-quant and input
    observers see, expert by expert, the rows the loop gives them (gate_up inputs exactly; down
    inputs up to the GEMMs' bf16 rounding), and the output matches the loop's."""
    if grouped and grouped_mm_function() is None:
        pytest.skip("this torch has no grouped GEMM")
    from quantship.formats import nvfp4

    model = build_tiny_model("qwen3_moe")
    fe = discover(model).fused_experts[0]
    g = torch.Generator().manual_seed(11)
    hidden = (torch.randn(41, fe.hidden_size, generator=g) * 2).to(torch.bfloat16)
    idx, w = _routing(41, fe.num_experts, model.config.num_experts_per_tok, g)
    scales = torch.rand(fe.num_experts, generator=g) * 0.01 + 0.002

    def run(fn):
        seen: dict = {}

        def observe(kind, x, e):
            assert (kind, e) not in seen  # one call per hit expert and projection
            seen[(kind, e)] = x.clone()

        def act(x, e):
            return nvfp4.fake_quantize_nvfp4_activation(x, scales[e])

        if rows:  # the GPTQ collector's: all rows in one call where the handler allows it
            from quantship.algorithms.sequential import _ExpertActQuant
            from quantship.formats.handlers import NVFP4Handler

            act = _ExpertActQuant(NVFP4Handler(), scales)
            assert act.rows is not None

        with torch.no_grad():
            out, _ = fn(act, observe)
        return out, seen

    loop_out, loop_seen = run(lambda a, o: fused_ops.fused_experts_forward(fe, hidden, idx, w, a, a, on_input=o))
    out, seen = run(lambda a, o: batched_experts_forward(fe, hidden, idx, w, grouped=grouped, act_quant_gate_up=a,
                                                         act_quant_down=a, on_input=o))
    assert seen.keys() == loop_seen.keys() and len(seen) == 2 * int((torch.bincount(idx.flatten()) > 0).sum())
    for key, x in seen.items():
        if key[0] == "gate_up":
            assert torch.equal(x, loop_seen[key])
        else:  # NVFP4 values, so a rounding flip moves a value by one E2M1 step at most
            assert (x.float() - loop_seen[key].float()).abs().max() <= x.float().abs().max() * 0.34
            assert (x == loop_seen[key]).float().mean() > 0.95
    ulp = loop_out.float().abs().max() * 2**-7
    assert (out.float() - loop_out.float()).abs().max() <= 4 * ulp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_scaled_fake_quant_equals_one_call_per_row(dtype):
    """fake_quant_input_rows (one scale per row) gives each row exactly what the single-scale
    function gives it: NVFP4 activations and FP8, scales spanning three decades."""
    from quantship.formats import fp8, nvfp4

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(12, 64, generator=g) * torch.logspace(-2, 2, 12)[:, None]).to(dtype)
    x[3, :16] = 0.0  # a zero block
    s = torch.logspace(-3, 0, 12) * x.float().abs().amax(-1).clamp_min(1e-3)
    got_nv = nvfp4.fake_quantize_nvfp4_activation_rows(x, s)
    got_fp8 = fp8.fake_quantize_fp8_rows(x, s)
    for r in range(12):
        assert torch.equal(got_nv[r], nvfp4.fake_quantize_nvfp4_activation(x[r : r + 1], s[r])[0])
        assert torch.equal(got_fp8[r], fp8.fake_quantize_fp8(x[r : r + 1], s[r])[0])
