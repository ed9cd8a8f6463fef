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
