"""`verify` checks the scale shapes of every non-NVFP4/FP8 layout (issue 6): a checkpoint of one
quantized linear, written by the real handlers and config writers, passes; each planted wrong
shape is a finding naming the tensor and exits 1; E8M0 byte 0 (2**-127) is a valid MX scale,
byte 255 (NaN) is not."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from quantship.cli import main
from quantship.export import modelopt_hf
from quantship.formats.handlers import FORMAT_HANDLERS
from quantship.recipes import get_recipe
from quantship.verify import verify_checkpoint

M = "model.layers.0.mlp.down_proj"
OUT, IN = 192, 256  # 192 rows: a partial 128-row FP8 tile; 256 inputs: two INT4 groups


def _write(path, fmt: str, edit=None):
    """A one-module Model Optimizer checkpoint of format `fmt` (optionally tampered with)."""
    recipe, handler = get_recipe(fmt), FORMAT_HANDLERS[fmt]
    w = (torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    scales = handler.scales(w.abs().amax().float(), torch.tensor(3.0))
    if recipe.algorithm is not None:
        scales["pre_quant_scale"] = torch.linspace(0.5, 2, IN).to(torch.bfloat16)
    tensors = {f"{M}.{k}": v.contiguous() for k, v in handler.quantize(w, scales).items()}
    if edit is not None:
        edit(tensors)
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf = modelopt_hf.hf_quant_config(recipe.quant_algo, recipe.group_size, None, [])
    (path / "hf_quant_config.json").write_text(json.dumps(hf))
    config = {"model_type": "llama", "quantization_config": modelopt_hf.config_json_quantization(hf)}
    (path / "config.json").write_text(json.dumps(config))
    return path


def _set(name: str, make):
    return lambda t: t.update({f"{M}.{name}": make(t[f"{M}.{name}"])})


FORMATS = ["fp8_pc_pt", "fp8_pb_wo", "int4_awq", "w4a8_awq", "nvfp4_awq", "w4a8_nvfp4_fp8", "mxfp8", "mxfp4",
           "int8_sq", "int8_wo"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_handler_written_module_passes(tmp_path, fmt):
    result = verify_checkpoint(_write(tmp_path / fmt, fmt))
    assert result.ok and result.n_quantized_modules == 1, result.summary()


@pytest.mark.parametrize(("fmt", "name", "make"), [
    ("fp8_pc_pt", "weight_scale", lambda s: s.reshape(OUT, 1)),  # compressed-tensors' per-channel shape
    ("fp8_pb_wo", "weight_scale", lambda s: s.reshape(2, 2)),  # [out/128, in/128] without singletons
])
def test_other_accepted_shapes(tmp_path, fmt, name, make):
    assert verify_checkpoint(_write(tmp_path / fmt, fmt, _set(name, make))).ok


WRONG = [  # (format, tensor, tampering, words of the finding)
    ("fp8_pc_pt", "weight_scale", lambda s: s[: OUT // 2], "one per output row"),
    ("fp8_pc_pt", "weight_scale", lambda s: s.reshape(1, OUT).expand(2, OUT).contiguous(), "[192] or [192, 1]"),
    ("fp8_pb_wo", "weight_scale", lambda s: torch.ones(2, 1, 3, 1), "128x128 tile"),  # floor(in/128) + 1
    ("fp8_pb_wo", "weight_scale", lambda s: torch.ones(1, 1, 2, 1), "[2, 1, 2, 1] or [2, 2]"),  # floor(out/128)
    ("int4_awq", "weight_scale", lambda s: s[: OUT // 2], "[192, 2]"),  # rows of the packed weight
    ("int4_awq", "weight_scale", lambda s: s.repeat_interleave(2, -1), "in/128"),  # group 64
    ("int4_awq", "pre_quant_scale", lambda s: s[:OUT], "one per input channel"),
    ("w4a8_awq", "pre_quant_scale", lambda s: s.reshape(1, IN), "[256]"),
    ("nvfp4_awq", "pre_quant_scale", lambda s: torch.cat([s, s]), "[256]"),
    ("mxfp8", "weight_scale", lambda s: s.repeat_interleave(2, -1), "one E8M0 exponent per 32 inputs"),
    ("mxfp4", "weight_scale", lambda s: s[:, ::2].contiguous(), "[192, 8]"),
    ("int8_sq", "weight_scale", lambda s: s[:1], "one per output row"),
    ("int8_wo", "weight_scale", lambda s: s.reshape(OUT, 1).expand(OUT, 2).contiguous(), "one per output row"),
]


@pytest.mark.parametrize(("fmt", "name", "make", "words"), WRONG, ids=[f"{w[0]}-{w[1]}-{i}" for i, w in
                                                                     enumerate(WRONG)])
def test_wrong_scale_shape_is_a_named_finding(tmp_path, fmt, name, make, words):
    result = verify_checkpoint(_write(tmp_path / fmt, fmt, _set(name, make)))
    assert [f.tensor for f in result.findings] == [f"{M}.{name}"], result.summary()
    assert "shape" in result.findings[0].problem and words in result.findings[0].problem, result.summary()


def test_wrong_shape_exits_1_naming_the_tensor(tmp_path, capsys):
    path = _write(tmp_path / "mx", "mxfp8", _set("weight_scale", lambda s: s[:, :4].contiguous()))
    assert main(["verify", str(path)]) == 1
    assert f"{M}.weight_scale: shape [192, 4]" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_e8m0_byte_0_is_a_scale_and_255_is_nan(tmp_path, fmt):
    def zero(s):
        s = s.clone()
        s[0, 0] = 0  # 2**-127
        return s

    def nan(s):
        s = zero(s)
        s[3, 1] = 255
        return s

    assert verify_checkpoint(_write(tmp_path / "zero", fmt, _set("weight_scale", zero))).ok
    result = verify_checkpoint(_write(tmp_path / "nan", fmt, _set("weight_scale", nan)))
    assert [(f.tensor, f.problem) for f in result.findings] == [
        (f"{M}.weight_scale", f"1 of {OUT * IN // 32} E8M0 scales are 255 (NaN; first at [3, 1])")]
