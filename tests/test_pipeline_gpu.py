"""The whole pipeline on a GPU (Triton kernels, batched experts) against the CPU pipeline.

Quantized bytes of every weight are identical (the kernels are bit-exact and weight scales
come from the weights); activation statistics agree to bf16 GEMM rounding (the GPU's GEMMs
round differently from the CPU's); expert token counts are identical; the export verifies.
Inputs are built first; the tests skip afterwards when no CUDA device with Triton is there.
"""

from __future__ import annotations

import copy

import pytest
import torch

from quantship.errors import QuantshipError
from quantship.formats.kernels import require_kernels
from quantship.model import experts as fused_ops
from quantship.model.discover import discover
from quantship.pipeline import quantize
from quantship.verify import verify_checkpoint

from tiny_models import build_tiny_model


def require_gpu() -> None:
    try:
        require_kernels()
    except QuantshipError as e:
        pytest.skip(str(e))


def _batches(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (2, 24), generator=g)} for _ in range(3)]


@pytest.mark.parametrize("kind", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("recipe", ["nvfp4", "fp8"])
def test_gpu_pipeline_matches_cpu(kind, recipe, tmp_path):
    model = build_tiny_model(kind)
    batches = _batches(int(torch.randint(0, 2**31, ())))
    require_gpu()
    qm_cpu = quantize(copy.deepcopy(model), recipe, batches, kv_cache="fp8", progress=False)
    qm_gpu = quantize(model.cuda(), recipe, batches, kv_cache="fp8", progress=False)

    # Routing sees bf16 GEMM outputs, which round differently on the GPU: a near-tie of two
    # router logits can flip. Totals match; a few pairs may move between experts.
    same_route = {}
    for block, cov in qm_cpu.plan.coverage.items():
        gpu_tokens = qm_gpu.plan.coverage[block].tokens.cpu()
        assert gpu_tokens.sum() == cov.tokens.sum()
        assert (gpu_tokens - cov.tokens).abs().sum() <= 0.05 * cov.tokens.sum()
        same_route[block] = (gpu_tokens == cov.tokens) & ~cov.fallback & (cov.tokens > 0)
    experts_block = {b.experts_name: b.name for b in qm_cpu.structure.moe_blocks}
    layers = [name for name, _ in qm_cpu.structure.decoder_layers]
    first_moe = min(layers.index(b.name.rsplit(".", 1)[0]) for b in qm_cpu.structure.moe_blocks)
    handler = qm_cpu.plan.handler
    for t_cpu in qm_cpu.plan.targets:
        t_gpu = qm_gpu.plan.target(t_cpu.key)
        got_amax, want_amax = t_gpu.input_amax.cpu(), t_cpu.input_amax
        if t_cpu.fused_experts:  # compare experts whose routed tokens are the same on both
            keep = same_route[experts_block[t_cpu.key.rsplit(".", 1)[0]]]
            got_amax, want_amax = got_amax[keep], want_amax[keep]
        layer = next(i for i, name in enumerate(layers) if t_cpu.key.startswith(name + "."))
        # After a MoE block, a flipped route changes some tokens by O(1), not by rounding.
        rtol = 5e-2 if layer <= first_moe else 0.25
        torch.testing.assert_close(got_amax, want_amax, rtol=rtol, atol=0, msg=lambda m, k=t_cpu.key: f"{k}: {m}")
        assert torch.equal(t_gpu.weight_amax.cpu(), t_cpu.weight_amax)
        # Same weight and scales in, same bytes out: the GPU kernels against the CPU reference.
        scales = {k: v.cuda() for k, v in t_cpu.scales.items()}
        got = handler.quantize(t_gpu.weight, scales)
        want = handler.quantize(t_cpu.weight, t_cpu.scales)
        for name, value in want.items():
            assert torch.equal(got[name].cpu().reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), \
                (t_cpu.key, name)
    out = qm_gpu.export(tmp_path / "gpu", progress=False)
    assert verify_checkpoint(out).ok


def test_gpu_batched_experts_match_the_loop_and_transformers():
    model = build_tiny_model("qwen3_moe")
    fe = discover(model).fused_experts[0]
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    hidden = torch.randn(300, fe.hidden_size, generator=g).to(torch.bfloat16)
    idx = torch.rand(300, fe.num_experts // 2, generator=g).topk(2, dim=-1).indices
    w = torch.rand(300, 2, generator=g).softmax(-1)
    require_gpu()
    model.cuda()
    fe = discover(model).fused_experts[0]
    hidden, idx, w = hidden.cuda(), idx.cuda(), w.cuda()
    with torch.no_grad():
        out, st = fused_ops.fused_experts_forward(fe, hidden, idx, w)  # CUDA: the batched path
        loop_out, loop = fused_ops.fused_experts_forward(fe, hidden, idx, w, on_input=lambda *a: None)  # the loop
        theirs = fe.module(hidden, idx, w)
    assert torch.equal(st.tokens, loop.tokens)
    assert torch.equal(st.gate_up_input_amax, loop.gate_up_input_amax)
    torch.testing.assert_close(st.down_input_amax, loop.down_input_amax, rtol=2e-2, atol=0)
    ulp = theirs.float().abs().max() * 2**-7
    assert (out.float() - theirs.float()).abs().max() <= 2 * ulp
    assert (out.float() - loop_out.float()).abs().max() <= 2 * ulp
