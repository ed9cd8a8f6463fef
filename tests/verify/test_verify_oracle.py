"""Oracle: checkpoints written by Model Optimizer itself (and converted by compressed-tensors'
own converter) must pass verify. Runs on the CPU: Model Optimizer 0.47's NVFP4 fake-quant
calibration and export work there for these tiny models.

It also pins down what Model Optimizer writes, which quantship's exporter must match:
per-tensor scales (weight_scale_2, input_scale, FP8 weight_scale, k_scale/v_scale) are 0-dim
float32; NVFP4 block scales float8_e4m3fn [out, in/16]; packed weights uint8 [out, in/2].
"""

import copy
import json

import modelopt.torch.export as export_hf
import modelopt.torch.quantization as mtq
import pytest
import torch
from compressed_tensors.entrypoints import convert
from compressed_tensors.quantization import QuantizationArgs
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from quantship.verify import verify_checkpoint

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)


def _tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        # `architectures` must be set: the export's dummy forward reads it (is_multimodal_model).
        cfg = LlamaConfig(
            **SMALL, intermediate_size=128, num_key_value_heads=4, architectures=["LlamaForCausalLM"]
        )
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    cfg = Qwen3MoeConfig(
        **SMALL,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        architectures=["Qwen3MoeForCausalLM"],
    )
    return Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()


def _quantize_and_export(kind: str, cfg_name: str, kv: bool, out) -> None:
    model = _tiny(kind)
    cfg = copy.deepcopy(getattr(mtq, cfg_name))
    if kv:
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + list(mtq.FP8_KV_CFG["quant_cfg"])
    g = torch.Generator().manual_seed(1)

    def forward_loop(m):
        for _ in range(4):
            m(torch.randint(0, SMALL["vocab_size"], (2, 32), generator=g))

    with torch.no_grad():
        mtq.quantize(model, cfg, forward_loop)
    export_hf.export_hf_checkpoint(model, export_dir=out)


def _headers(path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = f.get_tensor(name)
                out[name] = (t.dtype, tuple(t.shape))
    return out


@pytest.mark.parametrize(
    ("kind", "cfg_name", "kv"),
    [("llama", "FP8_DEFAULT_CFG", False), ("qwen3_moe", "NVFP4_DEFAULT_CFG", True)],
)
def test_model_optimizer_export_passes_verify(tmp_path, kind, cfg_name, kv):
    out = tmp_path / "modelopt"
    _quantize_and_export(kind, cfg_name, kv, out)
    result = verify_checkpoint(out)
    assert result.ok, result.summary(50)
    algo = "NVFP4" if "NVFP4" in cfg_name else "FP8"
    assert (result.layout, result.quant_algo) == ("modelopt", algo)

    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == algo and quant["kv_cache_quant_algo"] == ("FP8" if kv else None)
    h = _headers(out)
    attn = "model.layers.0.self_attn"
    scalar = (torch.float32, ())  # what Model Optimizer writes for every per-tensor scale
    assert h[f"{attn}.q_proj.input_scale"] == scalar
    if algo == "NVFP4":
        down = "model.layers.0.mlp.experts.3.down_proj"  # moe_intermediate 32 -> hidden 64
        assert h[f"{down}.weight"] == (torch.uint8, (64, 16))
        assert h[f"{down}.weight_scale"] == (torch.float8_e4m3fn, (64, 2))
        assert h[f"{down}.weight_scale_2"] == scalar and h[f"{down}.input_scale"] == scalar
        assert h[f"{attn}.k_proj.k_scale"] == scalar and h[f"{attn}.v_proj.v_scale"] == scalar
        assert "model.layers.0.mlp.gate" in quant["exclude_modules"]  # the router stays bf16
        _compressed_tensors_conversion_passes(out, tmp_path / "ct", quant["exclude_modules"])
    else:
        assert h[f"{attn}.q_proj.weight"] == (torch.float8_e4m3fn, (64, 64))
        assert h[f"{attn}.q_proj.weight_scale"] == scalar


def _compressed_tensors_conversion_passes(src, dst, ignore) -> None:
    """compressed-tensors' own converter turns the export into its layout; that must pass too."""
    kv_scheme = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    converter = convert.ModelOptNvfp4Converter(
        ignore=ignore, targets=["re:.*proj$"], kv_cache_scheme=kv_scheme
    )
    convert.convert_checkpoint(src, dst, converter, device="cpu")
    result = verify_checkpoint(dst)
    assert result.ok, result.summary(50)
    assert (result.layout, result.quant_algo) == ("compressed-tensors", "NVFP4")
