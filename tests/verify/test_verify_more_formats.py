"""`verify` knows the rest of hf_ptq's formats: a complete export passes, and a missing scale, a
wrong dtype, a non-finite scale or a foreign tensor is a finding naming the tensor; AWQ's
pre_quant_scale may be absent (folded into a norm) but not wrong."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantship.pipeline import quantize
from quantship.verify import verify_checkpoint
from test_more_formats_export import _batches, _llama

M = "model.layers.0.self_attn.o_proj"


@pytest.fixture(scope="module")
def w4a8(tmp_path_factory):
    out = tmp_path_factory.mktemp("w4a8") / "ckpt"
    quantize(_llama(), "w4a8_awq", _batches(), progress=False).export(out, progress=False)
    return out


def _tampered(src, dst, edit) -> object:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return verify_checkpoint(dst)


@pytest.mark.parametrize(
    ("case", "edit", "tensor", "problem"),
    [
        ("missing_scale", lambda t: t.pop(f"{M}.weight_scale"), f"{M}.weight_scale", "missing"),
        ("missing_scale_2", lambda t: t.pop(f"{M}.weight_scale_2"), f"{M}.weight_scale_2", "missing"),
        ("fp16_input_scale", lambda t: t.update({f"{M}.input_scale": t[f"{M}.input_scale"].half()}),
         f"{M}.input_scale", "dtype float16"),
        ("nan_scale", lambda t: t[f"{M}.weight_scale"].view(-1).__setitem__(0, float("nan")),
         f"{M}.weight_scale", "not finite"),
        ("nvfp4_tensor", lambda t: t.update({f"{M}.weight_packed": t[f"{M}.weight"].clone()}), f"{M}.weight_packed",
         "not a tensor of a modelopt W4A8_AWQ checkpoint"),
    ],
)
def test_tampered_w4a8_awq_is_flagged(w4a8, tmp_path, case, edit, tensor, problem):
    assert verify_checkpoint(w4a8).ok
    result = _tampered(w4a8, tmp_path / case, edit)
    assert not result.ok
    assert any(f.tensor == tensor and problem in f.problem for f in result.findings), result.summary(10)


def test_pre_quant_scale_is_optional(w4a8, tmp_path):
    result = _tampered(w4a8, tmp_path / "no_pqs", lambda t: t.pop(f"{M}.pre_quant_scale"))
    assert result.ok, result.summary(10)


def test_unequal_fused_scales_are_flagged(w4a8, tmp_path):
    q = "model.layers.1.self_attn.q_proj.weight_scale_2"
    result = _tampered(w4a8, tmp_path / "unfused", lambda t: t.update({q: t[q] * 2}))
    assert any("must share weight_scale_2" in f.problem for f in result.findings), result.summary(10)


def test_int8_sq_needs_its_static_input_scale(tmp_path):
    out = tmp_path / "sq"
    quantize(_llama(), "int8_sq", _batches(), progress=False).export(out, progress=False)
    result = _tampered(out, tmp_path / "no_input", lambda t: t.pop(f"{M}.input_scale"))
    assert any(f.tensor == f"{M}.input_scale" and "missing" in f.problem for f in result.findings)
    assert load_file(str(out / "model.safetensors"))[f"{M}.weight"].dtype == torch.int8
