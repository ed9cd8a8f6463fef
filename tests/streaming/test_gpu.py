"""On a GPU: the streaming path writes the in-memory path's bytes there too (GPU matmuls, the
Triton quantization kernels, activations kept on the device), and holds one layer at a time.
Skipped without CUDA; run on the device with `pytest tests/streaming/test_gpu.py`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantship.pipeline import quantize
from quantship.streaming import stream_quantize

from .helpers import assert_same_files, calib_batches
from tiny_models import VOCAB, save_tiny_model


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["qwen3_moe", "deepseek_v3"])
def test_streaming_on_gpu_is_byte_identical(tmp_path, kind, cuda):
    src = save_tiny_model(kind, tmp_path / "src")
    batches = calib_batches(VOCAB, n=4)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).to(cuda).eval()
    qm = quantize(model, "nvfp4", batches, kv_cache="fp8", moe_min_tokens=12, progress=False)
    mem = qm.export(tmp_path / "mem", source_dir=src, max_shard_bytes=60_000, progress=False)
    del qm, model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    timings: dict = {}
    out = stream_quantize(src, "nvfp4", batches, tmp_path / "stream", kv_cache="fp8", moe_min_tokens=12,
                          device=cuda, max_shard_bytes=60_000, progress=False, timings=timings)
    assert_same_files(mem, out)
    assert timings["calibrate"] > 0 and timings["load"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize(("kind", "recipe"), [("qwen3_moe", "nvfp4"), ("llama", "fp8")])
def test_streaming_gptq_on_gpu_equals_in_memory_gptq(tmp_path, kind, recipe, cuda):
    """--algorithm gptq on the GPU (the column kernel, the grouped experts forward with per-row
    activation fake-quant, bf16 Hessian GEMMs): streaming and in-memory write the same bytes."""
    import json

    from quantship.algorithms.gptq import GPTQConfig

    config = GPTQConfig(min_tokens_per_dim=0.25)
    src = save_tiny_model(kind, tmp_path / "src")
    batches = calib_batches(VOCAB, n=4)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).to(cuda).eval()
    qm = quantize(model, recipe, batches, moe_min_tokens=12, progress=False, algorithm="gptq", gptq_config=config)
    mem = qm.export(tmp_path / "mem", source_dir=src, max_shard_bytes=60_000, progress=False)
    del qm, model
    out = stream_quantize(src, recipe, batches, tmp_path / "stream", moe_min_tokens=12, device=cuda,
                          max_shard_bytes=60_000, progress=False, algorithm="gptq", gptq_config=config)
    for p in sorted(mem.iterdir()):
        if p.name == "gptq.json":
            a, b = json.loads(p.read_text()), json.loads((out / p.name).read_text())
            assert a.pop("seconds_per_layer").keys() == b.pop("seconds_per_layer").keys() and a == b
        else:
            assert p.read_bytes() == (out / p.name).read_bytes(), p.name
    report = json.loads((out / "gptq.json").read_text())
    assert any(v.get("error_ratio_vs_rtn") is not None for v in report["targets"].values())
