"""Dense architectures and recipes: what gets quantized, what stays high precision, and the
exported numbers checked against the format functions applied to the source weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from quantship.errors import QuantshipError
from quantship.formats import fp8, nvfp4
from quantship.load import load_quantized
from quantship.model.discover import discover
from quantship.pipeline import quantize
from quantship.verify import verify_checkpoint

from tiny_models import build_tiny_model, save_tiny_model

DENSE = ("llama", "qwen2", "qwen3", "gemma3")


def assert_reload_reproduces_fake_quant(qm, out, ids: torch.Tensor) -> None:
    """The export, reloaded, computes bit for bit what the in-memory fake-quant model does."""
    with torch.no_grad(), qm.fake_quantized() as m:
        expected = m(ids).logits
    loaded = load_quantized(out)
    with torch.no_grad(), loaded.fake_quantized() as m:
        assert torch.equal(m(ids).logits, expected)


def _batches(n_tokens: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 256, (2, n_tokens), generator=g)}]


@pytest.mark.parametrize("kind", DENSE)
@pytest.mark.parametrize("qformat", ["nvfp4", "fp8"])
def test_dense_export_verifies_and_reloads(kind, qformat, tmp_path):
    model = build_tiny_model(kind)
    qm = quantize(model, qformat, _batches(), kv_cache="fp8", progress=False)
    out = qm.export(tmp_path / "out", progress=False)
    result = verify_checkpoint(out)
    assert result.ok, result.summary()
    assert result.n_quantized_modules == 7 * model.config.num_hidden_layers
    tensors = load_file(str(out / "model.safetensors"))
    for layer in range(model.config.num_hidden_layers):
        attn = f"model.layers.{layer}.self_attn"
        for s in ("k_proj.k_scale", "v_proj.v_scale"):
            v = tensors[f"{attn}.{s}"]
            assert v.dtype == torch.float32 and v.dim() == 0 and v > 0
    assert_reload_reproduces_fake_quant(qm, out, _batches(7)[0]["input_ids"])


def test_fp8_weights_match_the_format_functions_on_the_source(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    model = build_tiny_model("llama")
    qm = quantize(model, "fp8", _batches(), progress=False)
    out = qm.export(tmp_path / "out", progress=False)
    source = load_file(str(src / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    for m in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
        q, scale = fp8.quantize_fp8(source[f"{m}.weight"])
        assert torch.equal(got[f"{m}.weight"].view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(got[f"{m}.weight_scale"], scale)
    # input_scale = amax / 448 of the real input, recomputed here from a hook.
    seen = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].abs().max()))
    with torch.no_grad():
        model(**_batches()[0])
    h.remove()
    assert float(got["model.layers.0.mlp.down_proj.input_scale"]) == pytest.approx(float(seen[0]) / 448, rel=1e-6)


def test_nvfp4_input_scale_is_amax_over_6_times_448(tmp_path):
    model = build_tiny_model("qwen3")
    seen = []
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].abs().max()))
    with torch.no_grad():
        model(**_batches()[0])
    h.remove()
    qm = quantize(model, "nvfp4", _batches(), progress=False)
    s = qm.plan.target("model.layers.1.mlp.down_proj").scales["input_scale"]
    assert float(s) == pytest.approx(float(seen[0]) / (6 * 448), rel=1e-6)
    # gate/up share the max of both weights' amax as global scale
    gate = qm.plan.target("model.layers.1.mlp.gate_proj")
    up = qm.plan.target("model.layers.1.mlp.up_proj")
    amax = max(m.weight.abs().max() for m in (model.model.layers[1].mlp.gate_proj, model.model.layers[1].mlp.up_proj))
    assert torch.equal(gate.scales["weight_scale_2"], nvfp4.global_scale_from_amax(amax.float()))
    assert torch.equal(gate.scales["weight_scale_2"], up.scales["weight_scale_2"])


@pytest.mark.parametrize(
    ("recipe", "quantized_roles"),
    [
        ("nvfp4", {"attention", "mlp", "shared_expert", "expert"}),
        ("nvfp4_mlp_only", {"mlp", "shared_expert", "expert"}),
        ("nvfp4_experts_only", {"expert"}),
        ("fp8", {"attention", "mlp", "shared_expert", "expert"}),
    ],
)
def test_recipes_choose_roles_and_list_the_rest_as_excluded(recipe, quantized_roles, tmp_path):
    model = build_tiny_model("deepseek_v3")
    qm = quantize(model, recipe, _batches(8), progress=False)
    roles = {t.role for t in qm.plan.targets}
    assert roles == quantized_roles
    out = qm.export(tmp_path / "out", progress=False)
    assert verify_checkpoint(out).ok
    excluded = set(json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"])
    structure = discover(model)
    for t in structure.linears:
        if t.role not in quantized_roles:
            assert t.name in excluded, t.name
        else:
            assert t.name not in excluded, t.name
    assert {"lm_head", "model.layers.1.mlp.gate", "model.layers.2.mlp.gate"} <= excluded
    if "expert" not in quantized_roles:
        assert "model.layers.1.mlp.experts.0.gate_proj" in excluded


def test_user_exclude_pattern_keeps_modules_high_precision(tmp_path):
    model = build_tiny_model("llama")
    qm = quantize(model, "nvfp4", _batches(), exclude=["*.layers.1.self_attn.*"], progress=False)
    out = qm.export(tmp_path / "out", progress=False)
    excluded = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert "model.layers.1.self_attn.q_proj" in excluded
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.1.self_attn.q_proj.input_scale" not in tensors
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8


def test_mla_fused_q_a_and_kv_a_share_scales():
    model = build_tiny_model("deepseek_v3")
    qm = quantize(model, "nvfp4", _batches(8), progress=False)
    a = qm.plan.target("model.layers.1.self_attn.q_a_proj").scales
    b = qm.plan.target("model.layers.1.self_attn.kv_a_proj_with_mqa").scales
    assert torch.equal(a["weight_scale_2"], b["weight_scale_2"]) and torch.equal(a["input_scale"], b["input_scale"])


def test_dimension_not_divisible_by_16_is_a_clear_error():
    model = build_tiny_model("llama")
    old = model.model.layers[0].mlp.down_proj
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(120, old.out_features, bias=False, dtype=torch.bfloat16)
    model.model.layers[0].mlp.gate_proj = torch.nn.Linear(64, 120, bias=False, dtype=torch.bfloat16)
    model.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 120, bias=False, dtype=torch.bfloat16)
    with pytest.raises(QuantshipError, match=r"down_proj has input dimension 120.*--exclude"):
        quantize(model, "nvfp4", _batches(), progress=False)
    # the suggested fix works
    qm = quantize(model, "nvfp4", _batches(), exclude=["model.layers.0.mlp.down_proj"], progress=False)
    assert "model.layers.0.mlp.down_proj" in qm.plan.excluded


def test_unsupported_model_lists_what_is_supported():
    class NotALM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "mystery", "num_hidden_layers": 2})()
            self.proj = torch.nn.Linear(16, 16)

    with pytest.raises(QuantshipError, match="unsupported model type 'mystery'.*supported: Llama"):
        discover(NotALM())


def test_sharded_export_has_a_consistent_index(tmp_path):
    model = build_tiny_model("qwen3_moe")
    qm = quantize(model, "nvfp4", _batches(8), progress=False)
    out = qm.export(tmp_path / "out", max_shard_bytes=64 * 1024, progress=False)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    total = 0
    for s in shards:
        tensors = load_file(str(s))
        assert {k for k, v in index["weight_map"].items() if v == s.name} == set(tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert verify_checkpoint(out).ok
    assert_reload_reproduces_fake_quant(qm, out, _batches(5)[0]["input_ids"])
