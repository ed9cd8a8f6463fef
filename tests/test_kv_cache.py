"""KV-cache scales: k_scale / v_scale = amax / 448 of the keys and values as the cache holds them,
for attention through transformers' interface and for remote code calling sdpa directly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantship.pipeline import quantize

from remote_moe.builder import save_remote_moe_model
from tiny_models import build_tiny_model


def _batches() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))}]


def _reference_kv_amax(model, batches) -> dict[int, tuple[float, float]]:
    """Keys/values seen by sdpa per call, recorded independently of quantship."""
    seen: list[tuple[float, float]] = []
    plain = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((float(k.abs().max()), float(v.abs().max())))
        return plain(q, k, v, *a, **kw)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        F.scaled_dot_product_attention = plain
    return dict(enumerate(seen))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_kv_scales_through_the_attention_interface(kind):
    model = build_tiny_model(kind)
    model.config._attn_implementation = "sdpa"
    ref = _reference_kv_amax(model, _batches())
    qm = quantize(model, "fp8", _batches(), kv_cache="fp8", progress=False)
    for layer in range(model.config.num_hidden_layers):
        s = qm.plan.kv_scales[f"model.layers.{layer}.self_attn"]
        k, v = ref[layer]
        assert float(s["k_scale"]) == pytest.approx(k / 448, rel=1e-6)
        assert float(s["v_scale"]) == pytest.approx(v / 448, rel=1e-6)


def test_kv_scales_for_remote_code_calling_sdpa_directly(tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_remote_moe_model(tmp_path / "remote", vocab_size=256)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16).eval()
    ref = _reference_kv_amax(model, _batches())
    qm = quantize(model, "nvfp4", _batches(), kv_cache="fp8", progress=False)
    assert len(qm.plan.kv_scales) == model.config.num_hidden_layers
    for layer in range(model.config.num_hidden_layers):
        s = qm.plan.kv_scales[f"model.layers.{layer}.self_attn"]
        assert float(s["k_scale"]) == pytest.approx(ref[layer][0] / 448, rel=1e-6)
        assert float(s["v_scale"]) == pytest.approx(ref[layer][1] / 448, rel=1e-6)


def test_nvfp4_kv_cache_export_verifies(tmp_path):
    from quantship.verify import verify_checkpoint

    qm = quantize(build_tiny_model("llama"), "nvfp4", _batches(), kv_cache="nvfp4", progress=False)
    out = qm.export(tmp_path / "out", progress=False)
    result = verify_checkpoint(out)
    assert result.ok, result.summary()
    assert result.quant_algo == "NVFP4"
