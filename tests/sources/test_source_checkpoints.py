"""Quantizing a shipped FP8-block (DeepSeek-V3) or INT4 pack-quantized (Kimi-K2-Thinking) source gives
the same export, bit for bit, as quantizing its BF16 twin; MTP layers reach the export and its exclude
list; dequantization adds at most one in-memory tensor to the model while loading; NVFP4 sources
requantize to FP8.

The sources are built in the test from a BF16 tiny DeepSeek-V3 with an MTP layer (sources/helpers.py):
FP8 by DeepSeek's published block quantizer, INT4 by compressed-tensors' own compressor; the twins hold
the reference dequantization (float64 of DeepSeek's formula; compressed-tensors' decompressor).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from quantship.cli import main as cli_main
from quantship.model.from_state_dict import model_from_state_dict
from quantship.pipeline import quantize
from quantship.source import load_source_model
from quantship.sources import SourceCheckpoint, load_dequantized_model
from quantship.sources.load import load_if_quantized
from quantship.verify import verify_checkpoint
from sources.helpers import make_fp8_block_source, make_int4_source, save_tiny_deepseek

MTP = "model.layers.3."  # the tiny model has 3 decoder layers; DeepSeek-V3's MTP layer is the next index


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("sources")
    bf16 = save_tiny_deepseek(root / "bf16")
    return {"fp8-block": make_fp8_block_source(bf16, root / "fp8", root / "fp8-twin"),
            "int4": make_int4_source(bf16, root / "int4", root / "int4-twin")}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _quantize_cli(model: Path, out: Path, *extra: str) -> Path:
    args = ["quantize", "--model", str(model), "--qformat", "nvfp4", "--calib-size", "4", "--calib-seq-len", "24",
            "--batch-size", "2", "--kv-cache-qformat", "fp8", "--export", str(out), "--no-progress", "--device", "cpu",
            *extra]
    assert cli_main(args) == 0
    return out


@pytest.fixture(scope="module")
def exports(sources, tmp_path_factory):
    """kind -> (export of the source, export of its twin), each made once through the CLI."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in done:
            root = tmp_path_factory.mktemp(f"exports-{kind}")
            done[kind] = tuple(_quantize_cli(folder, root / name)
                               for folder, name in zip(sources[kind], ("from-source", "from-twin"), strict=True))
        return done[kind]

    return get


@pytest.mark.parametrize("kind", ["fp8-block", "int4"])
def test_quantized_source_exports_exactly_as_its_bf16_twin(exports, kind):
    from_source, from_twin = exports(kind)
    a, b = _tensors(from_source), _tensors(from_twin)
    assert a.keys() == b.keys()
    differ = [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(
        a[n].contiguous().view(-1).view(torch.uint8), b[n].contiguous().view(-1).view(torch.uint8))]
    assert differ == []
    for name in ("hf_quant_config.json", "config.json", "coverage.json"):
        assert (from_source / name).read_text() == (from_twin / name).read_text()
    config = json.loads((from_source / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt" and config["num_nextn_predict_layers"] == 1
    assert verify_checkpoint(from_source).ok


@pytest.mark.parametrize("kind", ["fp8-block", "int4"])
def test_streaming_a_quantized_source_writes_the_in_memory_export(exports, sources, kind, tmp_path):
    """quantship.streaming reads the same SourceCheckpoint a layer at a time and appends the MTP layer
    as its own section: every file equals the in-memory export's, byte for byte."""
    in_memory, _ = exports(kind)
    streamed = _quantize_cli(sources[kind][0], tmp_path / "streamed", "--streaming")
    for f in sorted(p.name for p in in_memory.iterdir()):
        if f.endswith((".safetensors", ".json")) and f != "source_extras.json":
            assert (streamed / f).read_bytes() == (in_memory / f).read_bytes(), f
    assert json.loads((streamed / "source_extras.json").read_text())["mtp_tensors"] == \
        json.loads((in_memory / "source_extras.json").read_text())["mtp_tensors"]


def test_mtp_layer_is_exported_in_high_precision_and_excluded(sources, exports):
    source, _ = sources["fp8-block"]
    out, _ = exports("fp8-block")
    tensors = _tensors(out)
    with SourceCheckpoint(source) as src:
        mtp = [n for n in src.names() if n.startswith(MTP)]
        assert len(mtp) > 200 and any(src.is_dequantized(n) for n in mtp)  # FP8 attention and experts
        for n in mtp:  # dequantized as the twin holds it, never requantized
            assert torch.equal(tensors[n], src.dequantized(n)), n
    assert {n for n in tensors if n.startswith(MTP)} == set(mtp)
    exclude = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    mtp_modules = {n.rsplit(".", 1)[0] for n in mtp if n.endswith(".weight") and tensors[n].dim() == 2}
    assert {"model.layers.3.eh_proj", "model.layers.3.shared_head.head", "model.layers.3.mlp.experts.63.down_proj",
            "model.layers.3.self_attn.q_a_proj"} <= mtp_modules
    assert mtp_modules <= set(exclude)
    assert not any(n.startswith(MTP) and n.endswith(("weight_scale", "weight_scale_inv", "input_scale")) for n in tensors)
    report = (out / "report.md").read_text()
    assert "MTP layers [3]" in report
    assert json.loads((out / "source_extras.json").read_text())["mtp_tensors"] == mtp
    assert verify_checkpoint(out).ok  # excluded modules stored unquantized: consistent for verify


def test_compressed_tensors_export_lists_mtp_in_ignore(sources, tmp_path):
    source, _ = sources["int4"]
    model, _ = load_source_model(str(source))
    calib = [{"input_ids": torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))}]
    qm = quantize(model, "fp8", calib, progress=False)
    out = qm.export(tmp_path / "ct", source_dir=source, export_format="compressed-tensors", progress=False)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.3.eh_proj" in ignore and "model.layers.3.mlp.experts.0.gate_proj" in ignore
    assert "model.layers.3.mlp.experts.0.gate_proj.weight" in _tensors(out)
    assert verify_checkpoint(out).ok


def _peak_bytes_beyond(fn, baseline: int) -> tuple[object, int]:
    """Peak of live CPU tensor bytes that `fn` allocates (torch's memory profiler), minus `baseline`."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return out, peak - baseline


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("kind", ["fp8-block", "int4"])
def test_dequantization_peak_memory_is_one_tensor_beyond_the_model(sources, kind):
    """In-memory path: beyond the model's own parameters, loading holds at most one in-memory tensor
    (transformers stacks one fused expert parameter from its per-expert tensors) — not a BF16 copy.
    Handles are opened first: safetensors' file mapping is not heap memory."""
    source, _ = sources[kind]
    with SourceCheckpoint(source) as src:
        model, beyond = _peak_bytes_beyond(lambda: load_dequantized_model(src), 0)
        model_bytes = _nbytes([*model.parameters(), *model.buffers()])
        largest = max(p.numel() * p.element_size() for p in model.parameters())
        beyond -= model_bytes
        assert 0 < beyond <= largest, (beyond, largest)

        if kind == "fp8-block":  # once: the same load from a fully dequantized dict, a copy the measure sees
            _, eager_beyond = _peak_bytes_beyond(
                lambda: model_from_state_dict(source, {n: src.dequantized(n) for n in src.names()}), model_bytes)
            assert eager_beyond > model_bytes
            print(f"eager: peak beyond the model {eager_beyond} B")
    print(f"{kind}: model {model_bytes} B, peak beyond it {beyond} B, largest in-memory tensor {largest} B")


def test_nvfp4_source_requantizes_to_fp8(sources, tmp_path):
    """An NVFP4 compressed-tensors export read back as a source (dequantized as compressed-tensors
    computes it), requantized to FP8 in both layouts."""
    source, _ = sources["fp8-block"]
    nvfp4_ct = tmp_path / "nvfp4-ct"
    assert cli_main(["quantize", "--model", str(source), "--qformat", "nvfp4", "--calib-size", "2",
                     "--calib-seq-len", "16", "--export", str(nvfp4_ct), "--export-format", "compressed-tensors",
                     "--no-progress", "--device", "cpu"]) == 0
    with SourceCheckpoint(nvfp4_ct) as src:
        assert src.format == "compressed-tensors"
        assert src.is_dequantized("model.layers.1.mlp.experts.5.up_proj.weight")
        assert "model.layers.0.self_attn.k_proj.k_scale" not in src.names()  # source KV scales are replaced
    for layout in ("modelopt", "compressed-tensors"):
        out = tmp_path / f"fp8-{layout}"
        assert cli_main(["quantize", "--model", str(nvfp4_ct), "--qformat", "fp8", "--calib-size", "2",
                         "--calib-seq-len", "16", "--export", str(out), "--export-format", layout,
                         "--no-progress", "--device", "cpu"]) == 0
        assert verify_checkpoint(out).ok
        tensors = _tensors(out)
        assert tensors["model.layers.1.mlp.experts.5.up_proj.weight"].dtype == torch.float8_e4m3fn
        assert "model.layers.3.eh_proj.weight" in tensors  # the MTP layer survives two requantizations


def test_remote_code_int4_source_as_kimi_k2_thinking(tmp_path):
    """Kimi-K2-Thinking: remote model code (ModuleList experts under custom class names) with INT4
    experts. Read with --trust-remote-code it exports exactly as its BF16 twin does."""
    from remote_moe.builder import save_remote_moe_model

    bf16 = save_remote_moe_model(tmp_path / "bf16", n_experts=16, top_k=4, layers=2)
    source, twin = make_int4_source(bf16, tmp_path / "int4", tmp_path / "int4-twin")
    calib = [{"input_ids": torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))}]
    exports = []
    for folder in (source, twin):
        model = load_if_quantized(folder, trust_remote_code=True) if folder == source else \
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, trust_remote_code=True)
        assert type(model).__name__ == "TinyMoeForCausalLM"
        qm = quantize(model, "nvfp4", calib, progress=False)
        exports.append(_tensors(qm.export(tmp_path / f"out-{folder.name}", source_dir=folder, progress=False)))
    a, b = exports
    assert a.keys() == b.keys() and "model.layers.1.mlp.experts.15.down_proj.weight_scale" in a
    assert all(torch.equal(a[n].view(-1).view(torch.uint8), b[n].view(-1).view(torch.uint8)) for n in a)
