"""FP8_PER_CHANNEL_PER_TOKEN in compressed-tensors' layout (its FP8_DYNAMIC preset): the config is
compressed-tensors' own schema object, its float-quantized decompressor and transformers'
loader get our weights, verify passes, and `convert` goes there from the modelopt layout."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.quant_scheme import FP8_DYNAMIC
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from quantship.cli import main
from quantship.export import compressed_tensors as ctm
from quantship.export import modelopt_hf
from quantship.pipeline import quantize
from quantship.verify import verify_checkpoint

from tiny_models import build_tiny_model

ALGO = "FP8_PER_CHANNEL_PER_TOKEN"


@pytest.mark.parametrize("kv", [None, "FP8"])
def test_config_is_compressed_tensors_fp8_dynamic_preset(kv):
    exclude = ["lm_head", "model.layers.*.mlp.gate"]
    ours = ctm.config_json_quantization(modelopt_hf.hf_quant_config(ALGO, None, kv, exclude))
    kv_scheme = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    theirs = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], format="float-quantized", **FP8_DYNAMIC)},
        ignore=[ctm.ignore_entry(p) for p in sorted(exclude)], kv_cache_scheme=kv_scheme if kv else None,
        format="float-quantized", quantization_status="compressed",
    )
    assert ours == theirs.model_dump()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8pc")
    qm = quantize(build_tiny_model("qwen3_moe"), "fp8_pc_pt", [{"input_ids": torch.arange(32).view(2, 16)}],
                  kv_cache="fp8", progress=False)
    qm.export(root / "ct", progress=False, export_format="compressed-tensors")
    qm.export(root / "mo", progress=False)
    return qm, root


def test_export_verifies_and_decompresses_to_our_weights(exported):
    qm, root = exported
    result = verify_checkpoint(root / "ct")
    assert result.ok, result.summary(10)
    assert (result.layout, result.quant_algo) == ("compressed-tensors", "FP8")
    ct, mo = load_file(str(root / "ct" / "model.safetensors")), load_file(str(root / "mo" / "model.safetensors"))
    qc = QuantizationConfig.model_validate(json.loads((root / "ct" / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    modules = sorted(k.removesuffix(".weight_scale") for k in ct if k.endswith(".weight_scale"))
    assert len(modules) == 2 * (4 + 32 * 3) and not any(k.endswith("input_scale") for k in ct)
    for m in modules:
        assert ct[f"{m}.weight_scale"].shape == (ct[f"{m}.weight"].shape[0], 1)
        assert torch.equal(ct[f"{m}.weight_scale"].reshape(-1), mo[f"{m}.weight_scale"])
        assert torch.equal(ct[f"{m}.weight"].view(torch.uint8), mo[f"{m}.weight"].view(torch.uint8))
        local = {p: ct[f"{m}.{p}"] for p in compressor.compression_param_names(scheme)}
        theirs = compressor.decompress(local, scheme)["weight"]
        ours = qm.plan.handler.dequantize({"weight": mo[f"{m}.weight"], "weight_scale": mo[f"{m}.weight_scale"]},
                                          theirs.dtype)
        assert torch.equal(theirs, ours), m


def test_transformers_loads_the_dense_layers_to_our_weights(exported, tmp_path):
    qm, root = exported
    model = AutoModelForCausalLM.from_pretrained(root / "ct", quantization_config=CompressedTensorsConfig(
        dequantize=True), dtype=torch.bfloat16).eval()
    loaded = model.state_dict()
    for t in qm.plan.targets:
        if t.fused_experts:
            continue
        ours = qm.plan.handler.dequantize(qm.quantized_tensors(t.key), torch.bfloat16)
        # transformers multiplies by the scale rounded to bf16 in bf16: within 2 bf16 ulps of ours
        ulps = (loaded[f"{t.key}.weight"].view(torch.int16).int() - ours.view(torch.int16).int()).abs()
        assert ulps.max() <= 2, t.key


def test_convert_from_modelopt_gives_the_same_checkpoint(exported, tmp_path, capsys):
    _, root = exported
    assert main(["convert", str(root / "mo"), str(tmp_path / "ct"), "--to", "compressed-tensors"]) == 0
    a, b = load_file(str(root / "ct" / "model.safetensors")), load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert verify_checkpoint(tmp_path / "ct").ok
