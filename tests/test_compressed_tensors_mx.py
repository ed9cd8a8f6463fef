"""MXFP4 / MXFP8 in compressed-tensors' layout (its `mxfp4-pack-quantized` / `mxfp8-quantized`
formats, presets MXFP4 / MXFP8): the same bytes as the modelopt layout under compressed-tensors'
names, its own schema, its own decompressors give our weights, and verify passes."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.quant_scheme import MXFP4, MXFP8
from safetensors.torch import load_file

from quantship.export import compressed_tensors as ctm
from quantship.export import modelopt_hf
from quantship.pipeline import quantize
from quantship.verify import verify_checkpoint

from tiny_models import build_tiny_model

CASES = {"mxfp4": (MXFP4, "mxfp4-pack-quantized"), "mxfp8": (MXFP8, "mxfp8-quantized")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_is_compressed_tensors_preset(name):
    preset, fmt = CASES[name]
    algo = "mxfp4" if name == "mxfp4" else "MXFP8"
    ours = ctm.config_json_quantization(modelopt_hf.hf_quant_config(algo, None, None, ["lm_head"]))
    theirs = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], format=fmt, **preset)},
        ignore=["lm_head"], format=fmt, quantization_status="compressed")
    assert ours == theirs.model_dump()


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_verifies_and_decompresses_to_our_weights(name, tmp_path):
    qm = quantize(build_tiny_model("llama"), name, [{"input_ids": torch.arange(32).view(2, 16)}], progress=False)
    qm.export(tmp_path / "mo", progress=False)
    qm.export(tmp_path / "ct", progress=False, export_format="compressed-tensors")
    result = verify_checkpoint(tmp_path / "ct")
    assert result.ok, result.summary(10)
    assert (result.layout, result.quant_algo) == ("compressed-tensors", CASES[name][1])
    mo, ct = load_file(str(tmp_path / "mo" / "model.safetensors")), load_file(str(tmp_path / "ct" / "model.safetensors"))
    qc = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    weight = "weight_packed" if name == "mxfp4" else "weight"
    modules = sorted(k.removesuffix(".weight_scale") for k in ct if k.endswith(".weight_scale"))
    assert len(modules) == 7 * 2
    for m in modules:
        assert torch.equal(ct[f"{m}.{weight}"].view(torch.uint8), mo[f"{m}.weight"].view(torch.uint8))
        assert torch.equal(ct[f"{m}.weight_scale"], mo[f"{m}.weight_scale"])
        local = {p: ct[f"{m}.{p}"] for p in compressor.compression_param_names(scheme)}
        theirs = compressor.decompress(local, scheme)["weight"]
        ours = qm.plan.handler.dequantize({"weight": mo[f"{m}.weight"], "weight_scale": mo[f"{m}.weight_scale"]},
                                          theirs.dtype)
        assert torch.equal(theirs, ours), m
