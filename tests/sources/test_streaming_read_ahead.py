"""The GPU's read-ahead of the next layer, forced on the CPU: it holds the layer's stored bytes (FP8 /
packed INT4, smaller than BF16), each weight is dequantized from them when placed, every stored tensor
is used up, and the export is byte-identical to the run that reads each tensor from disk when placed."""

from __future__ import annotations

from pathlib import Path

import pytest

import quantship.streaming.layerwise as layerwise
from quantship.streaming import stream_quantize
from sources.helpers import make_fp8_block_source, make_int4_source, save_tiny_deepseek
from streaming.helpers import assert_same_files, calib_batches

from tiny_models import VOCAB


def _stream(src: Path, out: Path) -> Path:
    return stream_quantize(src, "nvfp4", calib_batches(VOCAB, n=2), out, moe_min_tokens=12, device="cpu",
                           progress=False)


@pytest.mark.parametrize("kind", ["fp8-block", "int4"])
def test_raw_read_ahead_writes_the_same_export(tmp_path, monkeypatch, kind):
    bf16 = save_tiny_deepseek(tmp_path / "bf16")
    make = make_fp8_block_source if kind == "fp8-block" else make_int4_source
    src, _ = make(bf16, tmp_path / "src", tmp_path / "twin")
    reference = _stream(src, tmp_path / "reference")  # CPU: nothing read ahead

    read: list[tuple[int, int]] = []  # (stored bytes read ahead, the section's BF16 bytes)
    left: list[int] = []  # stored tensors not taken once the layer is placed
    read_raw, load_section = layerwise.LayerSource.read_raw, layerwise.LayerSource.load_section

    def recording_read_raw(self, section):
        raw = read_raw(self, section)
        read.append((sum(t.numel() * t.element_size() for t in raw.values()), self.section_bytes(section)))
        return raw

    def checking_load_section(self, model, section, device="cpu", tensors=None):
        load_section(self, model, section, device, tensors)
        if tensors is not None and tensors.raw is not None:
            left.append(len(tensors.raw))

    monkeypatch.setattr(layerwise, "reads_ahead", lambda device: True)
    monkeypatch.setattr(layerwise.LayerSource, "read_raw", recording_read_raw)
    monkeypatch.setattr(layerwise.LayerSource, "load_section", checking_load_section)
    assert_same_files(reference, _stream(src, tmp_path / "ahead"))
    assert len(read) == 2 and left == [0, 0]  # layers 1 and 2 were read ahead, and fully used
    assert all(stored < 0.75 * bf16_bytes for stored, bf16_bytes in read)  # FP8 / INT4 bytes, not BF16
