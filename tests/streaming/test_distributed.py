"""Several ranks: `torchrun --nproc-per-node 2 quantship quantize` (gloo on CPU) splits the
calibration batches across two processes, reduces the statistics (amax MAX, token counts SUM),
and writes the same export as one in-memory process — so the statistics are the same too: every
input scale and KV scale is in the shards, every expert's token count in coverage.json.

Also: when the command streams on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from quantship.cli import main
from quantship.errors import QuantshipError
from quantship.streaming.command import streaming_wanted

from .helpers import assert_same_files
from tiny_models import save_tiny_model

CALIB = ["--calib-size", "6", "--calib-seq-len", "32", "--batch-size", "2", "--moe-min-tokens", "12",
         "--qformat", "nvfp4", "--kv-cache-qformat", "fp8", "--device", "cpu", "--no-progress"]


def test_two_ranks_equal_one_process(tmp_path, smollm2_dir):
    src = save_tiny_model("qwen3_moe", tmp_path / "src", tokenizer_dir=smollm2_dir)
    assert main(["quantize", "--model", str(src), "--export", str(tmp_path / "one"), *CALIB]) == 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "quantship.cli", "quantize", "--model", str(src), "--export", str(tmp_path / "two"), *CALIB],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("layer by layer") == 1  # rank 0 reports, streaming ran
    assert_same_files(tmp_path / "one", tmp_path / "two")
    blocks = json.loads((tmp_path / "two" / "coverage.json").read_text())["blocks"]
    for block in blocks.values():  # routed and all-token input scales both took part
        assert 0 < len(block["fallback_experts"]) < block["num_experts"]


def test_when_streaming_runs(tmp_path, monkeypatch):
    src = save_tiny_model("llama", tmp_path / "src")
    assert streaming_wanted(None, str(src), "cpu") is False  # CPU: in-memory unless asked
    assert streaming_wanted(True, str(src), "cpu") is True
    assert streaming_wanted(False, str(src), "cuda") is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert streaming_wanted(None, str(src), "cpu") is True  # torchrun: only streaming splits batches
    with pytest.raises(QuantshipError, match="torchrun"):
        streaming_wanted(False, str(src), "cpu")
