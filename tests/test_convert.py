"""`quantship convert`: layouts change, numbers do not.

- modelopt -> compressed-tensors -> modelopt returns every tensor byte for byte, and converting
  our Model Optimizer export gives exactly our compressed-tensors export;
- Model Optimizer's own export of a tiny MoE converts, passes verify on both sides, loads through
  compressed-tensors' decompressor, carries the global scales compressed-tensors itself computes
  from Model Optimizer's amaxes, and converts back to Model Optimizer's bytes;
- compressed-tensors' own converter's output converts to modelopt too.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import modelopt.torch.export as export_hf
import modelopt.torch.quantization as mtq
import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.entrypoints import convert as ct_convert
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from compressed_tensors.quantization.utils.helpers import generate_gparam
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from quantship.cli import main
from quantship.convert import convert_checkpoint
from quantship.export import compressed_tensors as ctm
from quantship.formats.handlers import FORMAT_HANDLERS
from quantship.pipeline import quantize
from quantship.verify import verify_checkpoint

from tiny_models import build_tiny_model

CALIB = [{"input_ids": torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(s))} for s in (1, 2)]
CT = "compressed-tensors"


def _read(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose dtype, shape or bytes differ (or that only one side has)."""
    bad = sorted(a.keys() ^ b.keys())
    for name in a.keys() & b.keys():
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(
            x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)
        ):
            bad.append(name)
    return bad


def _cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def _ok(path: Path, layout: str):
    result = verify_checkpoint(path)
    assert result.ok, result.summary(20)
    assert result.layout == layout
    return result


# --------------------------------------------------------------------------- our exports


@pytest.fixture(scope="module", params=[("qwen3_moe", "nvfp4", "fp8"), ("llama", "fp8", "fp8")],
                ids=["qwen3_moe-nvfp4", "llama-fp8"])
def exported(request, tmp_path_factory):
    kind, recipe, kv = request.param
    qm = quantize(build_tiny_model(kind), recipe, CALIB, kv_cache=kv, progress=False)
    root = tmp_path_factory.mktemp(f"{kind}-{recipe}")
    qm.export(root / "mo", progress=False)
    (root / "mo" / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "mo" / "extra").mkdir()
    (root / "mo" / "extra" / "notes.txt").write_text("copied along")
    qm.export(root / "ct-direct", progress=False, export_format=CT)
    return root


def test_round_trip_is_byte_identical(exported, capsys):
    root = exported
    assert _cli(capsys, "convert", str(root / "mo"), str(root / "ct"), "--to", CT) == (0, "")
    assert _cli(capsys, "convert", str(root / "ct"), str(root / "back"), "--to", "modelopt") == (0, "")
    _ok(root / "mo", "modelopt")
    _ok(root / "ct", CT)
    _ok(root / "back", "modelopt")

    original, converted, back = _read(root / "mo"), _read(root / "ct"), _read(root / "back")
    assert _same_bytes(original, back) == []
    # the export path and the convert path are one converter
    assert _same_bytes(converted, _read(root / "ct-direct")) == []
    assert not (root / "ct" / "hf_quant_config.json").exists()
    config = json.loads((root / "ct" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((root / "ct-direct" / "config.json").read_text())[
        "quantization_config"]
    for name in ("hf_quant_config.json", "config.json"):
        assert json.loads((root / "back" / name).read_text()) == json.loads((root / "mo" / name).read_text())
    # every other file is copied
    assert (root / "back" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (root / "back" / "extra" / "notes.txt").read_text() == "copied along"
    assert (root / "ct" / "report.md").is_file()


def test_sharded_source_streams_into_shards(exported, tmp_path):
    qm_dir = exported / "mo"
    tensors = _read(qm_dir)
    sharded = tmp_path / "sharded"
    shutil.copytree(qm_dir, sharded)
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    index = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(sharded / file), metadata={"format": "pt"})
        index.update(dict.fromkeys(part, file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))

    out = convert_checkpoint(sharded, tmp_path / "ct", CT, max_shard_bytes=20_000)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    _ok(out, CT)
    assert _same_bytes(_read(out), _read(exported / "ct-direct")) == []


def test_convert_refuses_what_it_cannot_do(exported, tmp_path, capsys):
    mo = exported / "mo"
    code, err = _cli(capsys, "convert", str(mo), str(tmp_path / "x"), "--to", "modelopt")
    assert code == 2 and "already a modelopt checkpoint" in err and err.count("\n") == 1
    code, err = _cli(capsys, "convert", str(mo), str(tmp_path / "x"), "--to", "gguf")
    assert code == 2 and "unknown layout" in err
    (tmp_path / "taken").mkdir()
    code, err = _cli(capsys, "convert", str(mo), str(tmp_path / "taken"), "--to", CT)
    assert code == 2 and "--overwrite" in err
    assert _cli(capsys, "convert", str(mo), str(tmp_path / "taken"), "--to", CT, "--overwrite") == (0, "")
    _ok(tmp_path / "taken", CT)
    # a broken source is refused, and nothing is written
    broken = tmp_path / "broken"
    shutil.copytree(mo, broken)
    tensors = _read(broken)
    victim = next(n for n in tensors if n.endswith(".input_scale"))
    save_file({k: v.contiguous() for k, v in tensors.items() if k != victim}, str(broken / "model.safetensors"))
    code, err = _cli(capsys, "convert", str(broken), str(tmp_path / "y"), "--to", CT)
    assert code == 2 and "does not pass verify" in err and victim in err
    assert not (tmp_path / "y").exists()


def test_nvfp4_kv_cache_and_unknown_formats_fail_before_any_work(tmp_path, capsys):
    qm = quantize(build_tiny_model("llama"), "nvfp4", CALIB, kv_cache="nvfp4", progress=False)
    qm.export(tmp_path / "mo", progress=False)
    code, err = _cli(capsys, "convert", str(tmp_path / "mo"), str(tmp_path / "ct"), "--to", CT)
    assert code == 2 and "kv_cache_scheme" in err and not (tmp_path / "ct").exists()
    missing = str(tmp_path / "no-such-model")
    code, err = _cli(capsys, "quantize", "--model", missing, "--export-format", "gguf", "--export", str(tmp_path / "q"))
    assert code == 2 and "unknown export format 'gguf'" in err
    code, err = _cli(capsys, "quantize", "--model", missing, "--export-format", CT, "--kv-cache-qformat", "nvfp4",
                     "--export", str(tmp_path / "q"))
    assert code == 2 and "kv_cache_scheme" in err


# --------------------------------------------------------------------------- Model Optimizer's own export


def _model_optimizer_moe_export(out: Path) -> torch.nn.Module:
    """Model Optimizer 0.47 NVFP4 + FP8 KV on a tiny Qwen3-MoE, on the CPU (as in
    tests/verify/test_verify_oracle.py); returns the quantized model (its quantizers hold the amaxes)."""
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                         intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=2, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, architectures=["Qwen3MoeForCausalLM"])
    model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()
    quant_cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    quant_cfg["quant_cfg"] = list(quant_cfg["quant_cfg"]) + list(mtq.FP8_KV_CFG["quant_cfg"])
    g = torch.Generator().manual_seed(1)

    def forward_loop(m):
        for _ in range(4):
            m(torch.randint(0, 128, (2, 32), generator=g))

    with torch.no_grad():
        mtq.quantize(model, quant_cfg, forward_loop)
    export_hf.export_hf_checkpoint(model, export_dir=out)
    return model


@pytest.fixture(scope="module")
def model_optimizer_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("model-optimizer")
    model = _model_optimizer_moe_export(root / "mo")
    return root, model


def test_model_optimizer_export_converts_and_loads_through_compressed_tensors(model_optimizer_export, capsys):
    root, model = model_optimizer_export
    _ok(root / "mo", "modelopt")
    assert _cli(capsys, "convert", str(root / "mo"), str(root / "ct"), "--to", CT) == (0, "")
    _ok(root / "ct", CT)
    mo, ct = _read(root / "mo"), _read(root / "ct")

    # compressed-tensors' decompressor, configured from our config.json by its own schema
    qc = json.loads((root / "ct" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    nvfp4 = FORMAT_HANDLERS["nvfp4"]
    modules = sorted(n.rpartition(".")[0] for n in ct if n.endswith(".weight_packed"))
    assert len(modules) == 2 * (4 + 4 * 3)  # per layer: q/k/v/o, 4 experts x gate/up/down
    for m in modules:
        local = {p: ct[f"{m}.{p}"] for p in compressor.compression_param_names(scheme)}
        theirs = compressor.decompress(local, scheme)["weight"]
        assert torch.equal(theirs, ctm.dequantize(local, "NVFP4")), m
        modelopt_local = {p: mo[f"{m}.{p}"] for p in ("weight", "weight_scale", "weight_scale_2")}
        reference = nvfp4.dequantize(modelopt_local, torch.bfloat16)
        diff = (theirs.view(torch.int16).int() - reference.view(torch.int16).int()).abs()
        assert diff.max() <= 1, m

    # the global scales are what compressed-tensors computes from Model Optimizer's own amaxes
    attn = model.model.layers[1].self_attn
    o_proj = "model.layers.1.self_attn.o_proj"
    expected_w = generate_gparam(torch.zeros(1), attn.o_proj.weight_quantizer.amax.float().reshape(1))
    expected_x = generate_gparam(torch.zeros(1), attn.o_proj.input_quantizer.amax.float().reshape(1))
    assert torch.equal(ct[f"{o_proj}.weight_global_scale"], expected_w)
    assert torch.equal(ct[f"{o_proj}.input_global_scale"], expected_x)
    assert "model.layers.1.self_attn.k_scale" in ct and "model.layers.1.self_attn.k_proj.k_scale" in mo

    # and back: Model Optimizer's bytes, tensor by tensor
    assert _cli(capsys, "convert", str(root / "ct"), str(root / "back"), "--to", "modelopt") == (0, "")
    _ok(root / "back", "modelopt")
    assert _same_bytes(_read(root / "back"), mo) == []


def test_compressed_tensors_own_conversion_converts_to_modelopt(model_optimizer_export, capsys):
    """compressed-tensors' ModelOptNvfp4Converter (plain reciprocals, `re:` targets, bf16 KV scales)
    gives a checkpoint we convert back to Model Optimizer's layout: same packed bytes and block
    scales, global scales within 2 float32 ulps of Model Optimizer's."""
    root, _ = model_optimizer_export
    mo_dir = root / "mo"
    exclude = json.loads((mo_dir / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    kv_scheme = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    converter = ct_convert.ModelOptNvfp4Converter(ignore=exclude, targets=["re:.*proj$"], kv_cache_scheme=kv_scheme)
    ct_convert.convert_checkpoint(mo_dir, root / "ct-theirs", converter, device="cpu")
    _ok(root / "ct-theirs", CT)
    assert _cli(capsys, "convert", str(root / "ct-theirs"), str(root / "back-theirs"), "--to", "modelopt") == (0, "")
    _ok(root / "back-theirs", "modelopt")
    mo, back = _read(mo_dir), _read(root / "back-theirs")
    assert mo.keys() == back.keys()
    for name, t in mo.items():
        if name.endswith(("weight_scale_2", "input_scale")):
            assert back[name].shape == t.shape
            assert (back[name].view(torch.int32).long() - t.view(torch.int32).long()).abs().max() <= 2, name
        elif name.endswith(("k_scale", "v_scale")):  # their converter stored them in bf16
            assert torch.equal(back[name], t.to(torch.bfloat16).float()), name
        else:
            assert _same_bytes({name: back[name]}, {name: t}) == [], name
