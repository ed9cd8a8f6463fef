"""The streaming path (`quantship.streaming`) writes the same export as the in-memory path, byte
for byte — shards, index, configs, coverage and report — for every kind of model: dense, fused
3-D experts (Qwen3-MoE, Mixtral, DeepSeek-V3 with MLA and a dense first layer), the remote-code
ModuleList MoE, and tied embeddings; NVFP4 and FP8, with KV scales, in both layouts.

Equal bytes need equal statistics: each layer must see exactly the unquantized previous layer's
outputs and the arguments the full forward gives it, and MoE coverage must be the same.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantship.streaming.layerwise as layerwise
from quantship.pipeline import quantize
from quantship.sources.reader import SourceCheckpoint
from quantship.streaming import stream_quantize
from quantship.streaming.journal import WORKDIR_PREFIX

from .helpers import assert_same_files, calib_batches
from remote_moe.builder import save_remote_moe_model
from tiny_models import VOCAB, build_tiny_model, save_tiny_model, tiny_config

SHARD = 60_000  # small shards: several per export, sections packed, oversized layers split

CASES = {
    "llama": dict(recipe="nvfp4", kv_cache="fp8"),
    "llama_tied": dict(recipe="nvfp4", export_format="compressed-tensors"),
    "qwen3_moe": dict(recipe="nvfp4", moe_min_tokens=12),
    "mixtral": dict(recipe="fp8", kv_cache="fp8"),
    "deepseek_v3": dict(recipe="nvfp4_mlp_only"),
    "remote": dict(recipe="nvfp4"),
}


def _save(kind: str, path: Path) -> Path:
    if kind == "remote":
        return save_remote_moe_model(path, seed=0, n_experts=16, top_k=4, layers=3, first_k_dense=1, vocab_size=VOCAB)
    if kind == "llama_tied":
        config = tiny_config("llama")
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.08) if p.dim() >= 2 else p.fill_(1.0)
        model.save_pretrained(path)
        return path
    return save_tiny_model(kind, path)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """kind -> (in-memory export, streaming export)."""
    out = {}
    for kind, opts in CASES.items():
        root = tmp_path_factory.mktemp(kind)
        src = _save(kind, root / "src")
        batches = calib_batches(VOCAB)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, trust_remote_code=True).eval()
        qm = quantize(model, opts["recipe"], batches, kv_cache=opts.get("kv_cache", "none"),
                      moe_min_tokens=opts.get("moe_min_tokens", 32), progress=False)
        mem = qm.export(root / "mem", source_dir=src, max_shard_bytes=SHARD, progress=False,
                        export_format=opts.get("export_format", "modelopt"))
        streamed = stream_quantize(src, opts["recipe"], batches, root / "stream", kv_cache=opts.get("kv_cache", "none"),
                                   moe_min_tokens=opts.get("moe_min_tokens", 32), trust_remote_code=True,
                                   device="cpu", max_shard_bytes=SHARD, progress=False,
                                   export_format=opts.get("export_format", "modelopt"))
        out[kind] = (mem, streamed)
    return out


@pytest.mark.parametrize("kind", list(CASES))
def test_streaming_export_is_byte_identical(exports, kind):
    mem, streamed = exports[kind]
    names = assert_same_files(mem, streamed)
    assert sum(n.endswith(".safetensors") for n in names) >= 2  # really sharded
    assert "model.safetensors.index.json" in names and "coverage.json" in names
    assert not list(streamed.parent.glob(f"{WORKDIR_PREFIX}*"))  # the work folder is gone


def test_moe_coverage_has_both_sources(exports):
    """The qwen3_moe case mixes experts over and under --moe-min-tokens, so the identical bytes
    cover both the routed and the all-token fallback input scales."""
    import json

    cov = json.loads((exports["qwen3_moe"][1] / "coverage.json").read_text())["blocks"]
    for block in cov.values():
        assert 0 < len(block["fallback_experts"]) < block["num_experts"]


def test_one_layer_in_memory_and_each_tensor_read_once(tmp_path, monkeypatch):
    """While a layer is planned, only that decoder layer holds real weights (the others and the
    embeddings / lm_head are on the meta device), every source tensor is read exactly once, and
    the layers' (per-expert) checkpoint tensors are copied straight into their rows."""
    src = save_tiny_model("deepseek_v3", tmp_path / "src")
    real_layers: list[list[int]] = []
    reads: Counter = Counter()
    plan = layerwise.build_plan

    def spy_plan(part, *args, **kwargs):
        model = spy_plan.run.model
        layers = model.model.layers
        real_layers.append([i for i, layer in enumerate(layers) if not next(layer.parameters()).is_meta])
        assert model.model.embed_tokens.weight.is_meta and model.lm_head.weight.is_meta
        return plan(part, *args, **kwargs)

    original_layer = layerwise.LayerwiseRun.layer

    def layer(self, k, hidden, calls):
        spy_plan.run = self
        return original_layer(self, k, hidden, calls)

    dequantized = SourceCheckpoint.dequantized

    def counted(self, name, *args, **kwargs):
        reads[name] += 1
        return dequantized(self, name, *args, **kwargs)

    import quantship.streaming.source as source

    plans = []
    row_plan = source.row_plan

    def spy_row_plan(*args):
        plans.append(row_plan(*args))
        return plans[-1]

    monkeypatch.setattr(source, "row_plan", spy_row_plan)
    monkeypatch.setattr(layerwise, "build_plan", spy_plan)
    monkeypatch.setattr(layerwise.LayerwiseRun, "layer", layer)
    monkeypatch.setattr(SourceCheckpoint, "dequantized", counted)
    stream_quantize(src, "nvfp4", calib_batches(VOCAB, n=1), tmp_path / "out", device="cpu", progress=False)
    assert real_layers == [[0], [1], [2]]
    assert len(plans) == 4 and all(p is not None for p in plans[1:])  # layers copied row by row, in place
    n_source = len(build_tiny_model("deepseek_v3").state_dict())  # fused experts count once here
    assert set(reads.values()) == {1} and len(reads) > n_source  # per-expert source tensors, once each


@pytest.mark.parametrize("kind", ["qwen3_moe", "remote"])
def test_transformers_loader_path_is_byte_identical(exports, kind, tmp_path, monkeypatch):
    """Sections whose conversion is not row-wise go through transformers' own loader; force it."""
    import quantship.streaming.source as source

    monkeypatch.setattr(source, "row_plan", lambda *a: None)
    mem, _ = exports[kind]
    opts = CASES[kind]
    out = stream_quantize(mem.parent / "src", opts["recipe"], calib_batches(VOCAB), tmp_path / "out",
                          moe_min_tokens=opts.get("moe_min_tokens", 32), trust_remote_code=True, device="cpu",
                          max_shard_bytes=SHARD, progress=False)
    assert_same_files(mem, out)
