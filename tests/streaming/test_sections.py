"""The shared export order and shard policy (quantship.export.sections), unit by unit."""

from __future__ import annotations

import json
import struct

import torch

from quantship.export.sections import SectionShardWriter, canonical_metadata_order, target_tensors
from quantship.formats.handlers import FORMAT_HANDLERS
from quantship.scales import QuantTarget

from tiny_models import build_tiny_model


def _t(n_bytes: int) -> torch.Tensor:
    return torch.zeros(n_bytes, dtype=torch.uint8)


def _shards(directory) -> list[list[str]]:
    index = directory / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    return [sorted(k for k, f in weight_map.items() if f == name) for name in files]


def test_sections_share_shards_until_full_and_big_ones_close_theirs(tmp_path):
    w = SectionShardWriter(tmp_path, max_shard_bytes=100)
    w.add_section([("a.0", _t(30)), ("a.1", _t(30))])  # 60
    w.add_section([("b.0", _t(30))])  # 90: fits with a
    w.add_section([("c.0", _t(20))])  # 110 > 100: starts a new shard
    w.add_section([("d.0", _t(60)), ("d.1", _t(60)), ("d.2", _t(10))])  # 130 > 100: cut, then closed
    w.add_section([("e.0", _t(10))])
    w.close()
    assert _shards(tmp_path) == [["a.0", "a.1", "b.0"], ["c.0"], ["d.0"], ["d.1", "d.2"], ["e.0"]]


def test_shard_header_does_not_depend_on_metadata_order(tmp_path):
    """safetensors stores metadata in a per-process-seeded hash map; the writer sorts it."""
    heads = []
    for i, meta in enumerate(({"producer": "quantship"}, {"zz": "1", "aa": "2"})):
        d = tmp_path / str(i)
        d.mkdir()
        w = SectionShardWriter(d, metadata=meta)
        w.add_section([("x", torch.arange(4.0))])
        w.close()
        raw = (d / "model.safetensors").read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        heads.append(list(json.loads(raw[8 : 8 + n])["__metadata__"]))
        assert torch.equal(torch.frombuffer(bytearray(raw[8 + n :]), dtype=torch.float32), torch.arange(4.0))
    assert heads == [["format", "producer"], ["aa", "format", "zz"]]
    canonical_metadata_order(tmp_path / "1" / "model.safetensors")  # idempotent
    assert (tmp_path / "1" / "model.safetensors").read_bytes() == raw


def test_fused_experts_quantized_in_chunks_equal_one_piece():
    """Chunking fused experts bounds the float32 temporaries; NVFP4 and FP8 work per expert
    matrix and block, so any chunking gives the same tensors as quantizing at once."""
    model = build_tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    key = "model.layers.0.mlp.experts.gate_up_proj"
    w = experts.gate_up_proj.detach()
    for fmt in ("nvfp4", "fp8"):
        handler = FORMAT_HANDLERS[fmt]
        amax = w.abs().amax(dim=(1, 2)).float()
        t = QuantTarget(key, w, "expert", True, amax, amax / 3, scales=handler.scales(amax, amax / 3))
        whole = list(target_tensors(model, t, handler, chunk_bytes=1 << 40))
        chunked = list(target_tensors(model, t, handler, chunk_bytes=w[0].numel() * w.element_size() * 3))
        assert [n for n, _ in whole] == [n for n, _ in chunked]
        per_module = {"nvfp4": 4, "fp8": 3}[fmt]  # weight, its scale(s), input_scale
        assert len(whole) == 32 * 2 * per_module  # 32 experts x (gate_proj, up_proj)
        for (name, a), (_, b) in zip(whole, chunked, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name
