"""--algorithm gptq on the streaming path: the same bytes as the in-memory GPTQ (each layer's
scales calibrated on the unquantized stream, its weights chosen by GPTQ on the stream of the
GPTQ-quantized layers before it), and a kill between layers resumes to the same bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantship.algorithms.gptq import GPTQConfig
from quantship.errors import QuantshipError
from quantship.pipeline import quantize
from quantship.streaming import stream_quantize
from quantship.streaming.layerwise import KILL_ENV

from .helpers import calib_batches
from tiny_models import VOCAB, save_tiny_model

CONFIG = GPTQConfig(min_tokens_per_dim=0.25)  # tiny calibration: let most matrices run GPTQ
SHARD = 60_000


def _same_except_timings(a: Path, b: Path) -> None:
    """Every file byte-identical but gptq.json, which must match once its seconds are removed."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if n == "gptq.json":
            ja, jb = (json.loads((d / n).read_text()) for d in (a, b))
            assert ja.pop("seconds_per_layer").keys() == jb.pop("seconds_per_layer").keys()
            assert ja == jb
        else:
            assert (a / n).read_bytes() == (b / n).read_bytes(), f"{n} differs"


@pytest.mark.parametrize(("kind", "recipe"), [("llama", "nvfp4"), ("qwen3_moe", "fp8")])
def test_streaming_gptq_equals_in_memory_gptq(tmp_path, kind, recipe):
    src = save_tiny_model(kind, tmp_path / "src")
    batches = calib_batches(VOCAB)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    qm = quantize(model, recipe, batches, moe_min_tokens=12, progress=False, algorithm="gptq", gptq_config=CONFIG)
    mem = qm.export(tmp_path / "mem", source_dir=src, max_shard_bytes=SHARD, progress=False)
    rtn = stream_quantize(src, recipe, batches, tmp_path / "rtn", moe_min_tokens=12, device="cpu",
                          max_shard_bytes=SHARD, progress=False)
    streamed = stream_quantize(src, recipe, batches, tmp_path / "stream", moe_min_tokens=12, device="cpu",
                               max_shard_bytes=SHARD, progress=False, algorithm="gptq", gptq_config=CONFIG)
    _same_except_timings(mem, streamed)
    report = json.loads((streamed / "gptq.json").read_text())
    assert any(v.get("method") == "gptq" or len(v.get("rtn_experts", [0])) < len(v.get("tokens_per_expert", []))
               for v in report["targets"].values())
    shards = sorted(p.name for p in streamed.glob("*.safetensors"))
    assert any((streamed / n).read_bytes() != (rtn / n).read_bytes() for n in shards), "GPTQ changed no weight"


def test_kill_between_layers_resumes_to_the_same_gptq_bytes(tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    batches = calib_batches(VOCAB)
    whole = stream_quantize(src, "nvfp4", batches, tmp_path / "whole", device="cpu", max_shard_bytes=SHARD,
                            progress=False, algorithm="gptq", gptq_config=CONFIG)
    script = (f"import sys, torch; sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parents[1])]!r}\n"
              "from helpers import calib_batches\nfrom tiny_models import VOCAB\n"
              "from quantship.algorithms.gptq import GPTQConfig\nfrom quantship.streaming import stream_quantize\n"
              f"stream_quantize({str(src)!r}, 'nvfp4', calib_batches(VOCAB), {str(tmp_path / 'resumed')!r}, device='cpu', "
              f"max_shard_bytes={SHARD}, progress=False, algorithm='gptq', gptq_config=GPTQConfig(min_tokens_per_dim=0.25))\n")
    env = {**os.environ, KILL_ENV: "0", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = stream_quantize(src, "nvfp4", batches, tmp_path / "resumed", device="cpu", max_shard_bytes=SHARD,
                              progress=False, algorithm="gptq", gptq_config=CONFIG)
    _same_except_timings(whole, resumed)


def test_gptq_options_belong_to_gptq():
    with pytest.raises(QuantshipError, match="gptq_config"):
        stream_quantize("unused", "nvfp4", calib_batches(VOCAB), "unused", gptq_config=CONFIG)
