"""Dequantization of shipped source formats against references that are not ours:

- FP8-block: a float64 evaluation of DeepSeek-V3's published `weight_dequant_kernel`, block by block,
  including partial edge blocks;
- INT pack-quantized (INT4 group 32 as Kimi-K2-Thinking ships, and other schemes) and NVFP4:
  compressed-tensors 0.20's own decompressors, bit for bit;
- through `SourceCheckpoint` on files, stripe by stripe, with the same results.
"""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors.torch import save_file

from quantship.errors import QuantshipError
from quantship.export import compressed_tensors as ctm
from quantship.formats import nvfp4
from quantship.sources import SourceCheckpoint
from quantship.sources.compressed_int4 import dequantize_packed, unpack_int32, unpack_zero_point
from quantship.sources.fp8_block import dequantize_fp8_block, scale_grid
from sources.helpers import INT4_ARGS, fp8_block_quantize, fp8_block_reference, int4_compress, int4_decompress


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8 if t.element_size() == 1 else torch.int16)


def _weight(shape, seed=0, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, : min(4, shape[1])] *= 40  # an outlier block, so block scales differ widely
    return w.to(dtype)


# --------------------------------------------------------------------------- FP8 block


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (1, 5), (129, 257), (128, 128)])
def test_fp8_block_matches_float64_published_formula(shape):
    q, s = fp8_block_quantize(_weight(shape))
    assert tuple(s.shape) == scale_grid(shape)
    ours = dequantize_fp8_block(q, s)
    ref = fp8_block_reference(q, s)
    assert ours.dtype == torch.bfloat16 and torch.equal(_bits(ours), _bits(ref))


def test_fp8_block_edge_blocks_use_their_own_scale():
    """A 130x130 weight has 2x2 blocks; the 2-wide edge strips must take scales [.,1] and [1,.]."""
    q = torch.ones(130, 130).to(torch.float8_e4m3fn)
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = dequantize_fp8_block(q, s, dtype=torch.float32)
    assert out[0, 0] == 1 and out[0, 129] == 2 and out[129, 0] == 3 and out[129, 129] == 4
    assert out[127, 127] == 1 and out[128, 127] == 3 and out[127, 128] == 2


def test_fp8_block_rejects_a_scale_grid_of_the_wrong_shape():
    with pytest.raises(ValueError, match="scale grid"):
        dequantize_fp8_block(torch.zeros(256, 256).to(torch.float8_e4m3fn), torch.ones(1, 2))


# --------------------------------------------------------------------------- INT pack-quantized

SCHEMES = {
    "int4-group32-sym (Kimi-K2-Thinking)": (INT4_ARGS, torch.bfloat16),
    "int4-group32-sym-fp16-scale": (INT4_ARGS, torch.float16),
    "int4-group64-asym": ({**INT4_ARGS, "symmetric": False, "group_size": 64}, torch.bfloat16),
    "int4-channel-sym": ({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}, torch.float32),
    "int8-group32-sym": ({**INT4_ARGS, "num_bits": 8}, torch.bfloat16),
    "int2-channel-asym": ({"num_bits": 2, "type": "int", "symmetric": False, "strategy": "channel"}, torch.bfloat16),
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_int_pack_quantized_equals_compressed_tensors_decompressor(scheme):
    args, dtype = SCHEMES[scheme]
    w = _weight((48, 192), seed=1, dtype=dtype)
    stored = int4_compress(w, args)
    assert stored["weight_packed"].dtype == torch.int32
    theirs = int4_decompress(stored, args)
    assert theirs.dtype == stored["weight_scale"].dtype
    zp = stored.get("weight_zero_point")
    if zp is not None and zp.dtype == torch.int32:
        zp = unpack_zero_point(zp, args["num_bits"], 48)
    ours = dequantize_packed(stored["weight_packed"], stored["weight_scale"], 192, args["num_bits"], zp,
                             dtype=theirs.dtype)
    assert torch.equal(_bits(ours), _bits(theirs))
    ours_bf16 = dequantize_packed(stored["weight_packed"], stored["weight_scale"], 192, args["num_bits"], zp)
    assert torch.equal(_bits(ours_bf16), _bits(theirs.to(torch.bfloat16)))


@pytest.mark.parametrize("num_bits", range(1, 9))
def test_unpack_inverts_compressed_tensors_pack_for_every_width(num_bits):
    """Widths dividing 8 take the byte path, 3/5/6/7 the straddling-word path; rows and zero points
    (packed along dim 0) alike, for column counts around the 32-value packing unit."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(num_bits)
    for cols in (1, 7, 32, 33, 100):
        v = torch.randint(-(1 << (num_bits - 1)), 1 << (num_bits - 1), (5, cols), generator=g).to(torch.int8)
        assert torch.equal(unpack_int32(pack_to_int32(v, num_bits), num_bits, cols), v)
        assert torch.equal(unpack_zero_point(pack_to_int32(v, num_bits, packed_dim=0), num_bits, 5), v)


def test_int4_nibble_order_and_offset_written_down():
    """Values -8..7 in order: element j sits in nibble j of the little-endian word, stored as j + 8."""
    values = torch.arange(-8, 8, dtype=torch.int8).reshape(2, 8)
    packed = torch.tensor([[0x76543210], [0xFEDCBA98 - (1 << 32)]], dtype=torch.int32)
    assert torch.equal(unpack_int32(packed, 4, 8), values)


# --------------------------------------------------------------------------- NVFP4


def test_nvfp4_source_equals_compressed_tensors_decompressor():
    w = _weight((64, 128), seed=2)
    scale_2 = nvfp4.global_scale_from_amax(w.abs().amax().float())
    q = nvfp4.quantize_nvfp4(w, scale_2)
    stored = {"weight_packed": q.packed, "weight_scale": q.block_scale,
              "weight_global_scale": ctm.global_scale_from_scale_2(q.scale_2).reshape(1)}
    scheme = QuantizationScheme(targets=["Linear"], format="nvfp4-pack-quantized",
                                weights=QuantizationArgs(**ctm._NVFP4_ARGS))
    theirs = BaseCompressor.get_value_from_registry("nvfp4-pack-quantized").decompress(stored, scheme)["weight"]
    ours = ctm.dequantize(stored, "NVFP4")
    assert torch.equal(_bits(ours), _bits(theirs.to(torch.bfloat16)))


# --------------------------------------------------------------------------- through the reader


def _write_source(path, tensors, quantization_config):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": quantization_config}))
    return path


FP8_QC = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}


def test_reader_dequantizes_in_stripes_with_the_same_bits(tmp_path):
    """A weight taller than one stripe (512 rows) with a partial last block, FP8 and INT4 alike."""
    w = _weight((700, 260), seed=3)
    q, s = fp8_block_quantize(w)
    fp8 = _write_source(tmp_path / "fp8", {"a.weight": q, "a.weight_scale_inv": s, "n.weight": w[0]}, FP8_QC)
    with SourceCheckpoint(fp8) as src:
        assert src.names() == ["a.weight", "n.weight"] and src.shape("a.weight") == (700, 260)
        assert torch.equal(_bits(src.dequantized("a.weight")), _bits(fp8_block_reference(q, s)))
        assert torch.equal(src.dequantized("n.weight"), w[0]) and not src.is_dequantized("n.weight")
    w = _weight((700, 256), seed=4)
    stored = int4_compress(w)
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": INT4_ARGS}}}
    asym_args = {**INT4_ARGS, "symmetric": False}
    asym = int4_compress(w, asym_args)
    int4 = _write_source(tmp_path / "int4", {**{f"b.{k}": v for k, v in stored.items()},
                                             **{f"c.{k}": v for k, v in asym.items()}}, qc)
    with SourceCheckpoint(int4) as src:
        assert src.names() == ["b.weight", "c.weight"] and src.shape("b.weight") == (700, 256)
        assert torch.equal(_bits(src.dequantized("b.weight")), _bits(int4_decompress(stored).to(torch.bfloat16)))
        assert torch.equal(_bits(src.dequantized("c.weight")),
                           _bits(int4_decompress(asym, asym_args).to(torch.bfloat16)))


def test_reader_errors_are_one_line(tmp_path):
    q, s = fp8_block_quantize(_weight((128, 128)))
    missing = _write_source(tmp_path / "missing", {"a.weight": q}, FP8_QC)
    with pytest.raises(QuantshipError, match="a.weight .* scales are missing"):
        SourceCheckpoint(missing)
    bad = _write_source(tmp_path / "bad", {"a.weight": q, "a.weight_scale_inv": torch.ones(2, 2)}, FP8_QC)
    with SourceCheckpoint(bad) as src, pytest.raises(QuantshipError, match="cannot dequantize a.weight"):
        src.dequantized("a.weight")
    other = _write_source(tmp_path / "gptq", {"a.weight": q}, {"quant_method": "gptq"})
    with pytest.raises(QuantshipError, match="'gptq' cannot be read"):
        SourceCheckpoint(other)
    per_tensor = _write_source(tmp_path / "per-tensor", {"a.weight": q}, {"quant_method": "fp8"})
    with pytest.raises(QuantshipError, match="weight_block_size"):
        SourceCheckpoint(per_tensor)
