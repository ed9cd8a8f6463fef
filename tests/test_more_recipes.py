"""The rest of hf_ptq's format table as data: recipe rows, the config content Model Optimizer's
own config functions produce for them, and `--weight-scale-search`."""

from __future__ import annotations

import warnings

import pytest

from quantship.errors import QuantshipError
from quantship.export import modelopt_hf
from quantship.formats.handlers import FORMAT_HANDLERS
from quantship.recipes import RECIPES, get_recipe, with_weight_scale_search

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
    from modelopt.torch.export.quant_utils import process_layer_quant_config

# Our recipe -> (Model Optimizer's per-layer format name, its weight block size from the quantizer).
MODELOPT_LAYER_FORMAT = {
    "nvfp4": ("nvfp4", 16),
    "fp8": ("fp8", 0),
    "fp8_pc_pt": ("fp8_pc_pt", 0),
    "fp8_pb_wo": ("fp8_pb_wo", 128),
    "int4_awq": ("int4_awq", 128),
    "nvfp4_awq": ("nvfp4_awq", 16),
    "w4a8_awq": ("w4a8_awq", 128),
    "w4a8_nvfp4_fp8": ("w4a8_nvfp4_fp8", 32),
    "mxfp8": ("mxfp8", 32),
    "mxfp4": ("mxfp4", 32),
    "int8_sq": ("int8_sq", 0),
    "int8_wo": ("int8_wo", 0),
    "nvfp4_four_over_six": ("nvfp4_static", 16),  # an NVFP4StaticQuantizer after 4/6 MSE
}
LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")


def test_every_hf_ptq_format_is_a_recipe_row():
    assert set(MODELOPT_LAYER_FORMAT) <= set(RECIPES)
    for name in MODELOPT_LAYER_FORMAT:
        r = get_recipe(name)
        assert r.weight_format in FORMAT_HANDLERS, name
        assert (r.algorithm is not None) == (name in ("int4_awq", "nvfp4_awq", "w4a8_awq", "int8_sq"))


@pytest.mark.parametrize("kv", [None, "FP8", "NVFP4"])
@pytest.mark.parametrize("name", sorted(MODELOPT_LAYER_FORMAT))
def test_configs_equal_model_optimizers_own(name, kv):
    fmt, block = MODELOPT_LAYER_FORMAT[name]
    layer_config = {"lm_head.quantization": None, "lm_head.awq_block_size": 0}
    for layer in LAYERS:
        layer_config[f"{layer}.quantization"] = fmt
        layer_config[f"{layer}.awq_block_size"] = block
    theirs = {"quant_algo": None, "kv_cache_quant_algo": None, **process_layer_quant_config(layer_config)}
    theirs["kv_cache_quant_algo"] = kv

    r = get_recipe(name)
    ours = modelopt_hf.hf_quant_config(r.quant_algo, r.group_size, kv, ["lm_head"])
    assert ours["quantization"] == theirs
    assert list(ours["quantization"]) == list(theirs)  # key order too: a diff of the JSON is empty
    their_json = convert_hf_quant_config_format({"producer": ours["producer"], "quantization": theirs})
    assert modelopt_hf.config_json_quantization(ours) == their_json


def test_weight_scale_search_is_a_variant_of_block_formats_only():
    r = with_weight_scale_search(get_recipe("nvfp4"), "mse")
    assert (r.name, r.weight_format, r.quant_algo) == ("nvfp4+mse", "nvfp4+mse", "NVFP4")
    assert with_weight_scale_search(get_recipe("int4_awq"), "max") == get_recipe("int4_awq")
    for name in ("int4_awq", "w4a8_awq", "nvfp4_awq", "w4a8_nvfp4_fp8", "fp8_pb_wo", "mxfp8", "mxfp4"):
        assert with_weight_scale_search(get_recipe(name), "mse").algorithm == get_recipe(name).algorithm
    with pytest.raises(QuantshipError, match="needs a block format; fp8 "):
        with_weight_scale_search(get_recipe("fp8"), "mse")
    with pytest.raises(QuantshipError, match="unknown --weight-scale-search 'l1'"):
        with_weight_scale_search(get_recipe("nvfp4"), "l1")
