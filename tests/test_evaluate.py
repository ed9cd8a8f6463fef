"""`quantship eval`: numbers checked against independent computations, reports that parse, and
one-line errors for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from quantship.cli import main
from quantship.errors import QuantshipError
from quantship.evaluate import evaluate, layer_output_errors, modelopt_layout, weight_sqnr
from quantship.formats.handlers import FORMAT_HANDLERS
from quantship.pipeline import quantize

from tiny_models import save_tiny_model

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _batches(n: int = 2, tokens: int = 32, vocab: int = 256) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, vocab, (2, tokens), generator=g)} for _ in range(n)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, smollm2_dir):
    """A tiny llama (SmolLM2's tokenizer) and its NVFP4 export in both layouts."""
    root = tmp_path_factory.mktemp("eval")
    src = save_tiny_model("llama", root / "src", tokenizer_dir=smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    qm = quantize(model, "nvfp4", _batches(vocab=model.config.vocab_size), progress=False)
    qm.export(root / "q", source_dir=src, progress=False)
    qm.export(root / "q_ct", source_dir=src, progress=False, export_format="compressed-tensors")
    result = evaluate(root / "q", src, root / "out", eval_size=4, eval_seq_len=32, batch_size=2, progress=False)
    return src, root, result


def _dequant_nvfp4_float64(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Independent of quantship.formats: nibble table, low nibble first, scale products in float64."""
    packed = t["weight"].to(torch.int64)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    table = torch.tensor(E2M1, dtype=torch.float64)
    values = table[codes & 7] * torch.where(codes >= 8, -1.0, 1.0).double()
    block = t["weight_scale"].to(torch.float64).repeat_interleave(16, dim=1)
    return values * block * t["weight_scale_2"].double()


def test_sqnr_matches_independent_float64(exported):
    src, root, result = exported
    module = "model.layers.1.mlp.down_proj"
    q = load_file(str(root / "q" / "model.safetensors"))
    tensors = {s: q[f"{module}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2")}
    reference = load_file(str(src / "model.safetensors"))[f"{module}.weight"].double()
    expected = 10 * math.log10(float(reference.pow(2).sum() / (reference - _dequant_nvfp4_float64(tensors)).pow(2).sum()))
    # dequantization is defined in float32 (formats/nvfp4.py): agree to float32 rounding
    assert result["weight_sqnr_db"][module] == pytest.approx(expected, abs=1e-5)
    # every quantized projection of both layers is measured, and NVFP4 lands in its usual range
    assert len(result["weight_sqnr_db"]) == 2 * 7
    assert all(10 < v < 30 for v in result["weight_sqnr_db"].values())


def test_reports_parse_and_agree(exported):
    _, root, result = exported
    out = root / "out"
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    p = on_disk["perplexity"]
    assert math.isfinite(p["reference"]) and math.isfinite(p["quantized"]) and p["reference"] > 1
    assert p["ratio"] == pytest.approx(p["quantized"] / p["reference"])
    assert on_disk["eval"]["tokens_scored"] == 4 * 31
    errors = on_disk["layer_output_error"]
    assert [e["layer"] for e in errors] == [0, 1]
    # layer 0 gets the same input in both modes; later layers also inherit earlier error
    assert errors[0]["isolated"] == pytest.approx(errors[0]["accumulated"], rel=1e-9)
    assert all(0 < e["isolated"] < 1 for e in errors)
    md = (out / "eval.md").read_text()
    assert f"| ratio | {p['ratio']:.4f} |" in md and "| 1 |" in md
    assert sorted(on_disk["plots"]) == ["layer_output_error.png", "sqnr_per_layer.png"]  # dense: no heat map
    for name in on_disk["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_layer_errors_of_a_model_against_itself_are_zero(exported):
    src, _, _ = exported
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    errors = layer_output_errors(model, model, _batches(1, 16, model.config.vocab_size), progress=False)
    assert [(e["isolated"], e["accumulated"]) for e in errors] == [(0.0, 0.0), (0.0, 0.0)]


def test_compressed_tensors_layout_gives_the_same_sqnr(exported):
    src, root, result = exported
    with modelopt_layout(root / "q_ct") as directory:
        assert directory != root / "q_ct"
        sqnr = weight_sqnr(directory, src, FORMAT_HANDLERS["nvfp4"], progress=False)
    assert sqnr == pytest.approx(result["weight_sqnr_db"], abs=1e-9)


def test_cli_eval_writes_to_out(exported, tmp_path, capsys):
    src, root, _ = exported
    code = main(["eval", str(root / "q"), "--reference", str(src), "--eval-size", "2", "--eval-seq-len", "16",
                 "--layer-batches", "1", "--no-plots", "--no-progress", "--out", str(tmp_path / "e")])
    assert code == 0 and "ratio" in capsys.readouterr().out
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["plots"] == []


def _error(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_bad_inputs_are_one_line_errors(exported, tmp_path, capsys):
    src, root, _ = exported
    q = str(root / "q")
    assert "does not exist" in _error(capsys, "eval", str(tmp_path / "nope"), "--reference", str(src))
    assert "--reference" in _error(capsys, "eval", q, "--reference", str(tmp_path / "nope"))
    assert "itself quantized" in _error(capsys, "eval", q, "--reference", str(root / "q_ct"))
    other = save_tiny_model("qwen2", tmp_path / "qwen2")
    assert "different architectures" in _error(capsys, "eval", q, "--reference", str(other))
    assert "--eval-size" in _error(capsys, "eval", q, "--reference", str(src), "--eval-size", "0")
    (tmp_path / "empty").mkdir()
    assert "config.json" in _error(capsys, "eval", str(tmp_path / "empty"), "--reference", str(src))


def test_reference_missing_a_quantized_tensor(exported, tmp_path):
    src, root, _ = exported
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_text((Path(src) / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(ref / "model.safetensors"))
    with pytest.raises(QuantshipError, match=r"no tensor model\.layers\.0\.self_attn\.q_proj\.weight"):
        weight_sqnr(root / "q", ref, FORMAT_HANDLERS["nvfp4"], progress=False)
