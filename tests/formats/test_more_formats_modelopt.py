"""Bit-exactness of the hf_ptq formats beyond NVFP4/FP8 against Model Optimizer 0.47 itself.

Oracle: a Linear quantized by Model Optimizer's own `mtq.quantize` with its preset config
(AWQ-lite / SmoothQuant / max calibration, on the CPU), then exported by its own per-module
exporter `_export_quantized_weight` (what `export_hf_checkpoint` calls for every module). Our
handler gets the same (already smoothed) weight and the same input amax and must write the same
tensors, byte for byte. Model Optimizer is a required test extra: missing, these tests fail.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from quantship.formats import fp4_blocks, int4, mxfp
from quantship.formats.handlers import FORMAT_HANDLERS
from quantship.formats.nvfp4_four_over_six import NORMALISER

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.quant_utils import get_quantization_format, pack_int4_in_uint8
    from modelopt.torch.export.unified_export_hf import _export_quantized_weight
    from modelopt.torch.quantization.qtensor import MXFP4QTensor, NVFP4QTensor

# (our format, Model Optimizer preset, its format name)
CASES = [
    ("fp8_pc_pt", "FP8_PER_CHANNEL_PER_TOKEN_CFG", "fp8_pc_pt"),
    ("int4_awq", "INT4_AWQ_CFG", "int4_awq"),
    ("w4a8_awq", "W4A8_AWQ_BETA_CFG", "w4a8_awq"),
    ("w4a8_nvfp4_fp8", "W4A8_NVFP4_FP8_CFG", "w4a8_nvfp4_fp8"),
    ("fp8_pb_wo", "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "fp8_pb_wo"),
    ("mxfp8", "MXFP8_DEFAULT_CFG", "mxfp8"),
    ("mxfp4", "MXFP4_DEFAULT_CFG", "mxfp4"),
    ("int8_sq", "INT8_SMOOTHQUANT_CFG", "int8_sq"),
    ("int8_wo", "INT8_WEIGHT_ONLY_CFG", "int8_wo"),
]
# (out, in, seed): out 192 leaves a partial 128-row tile for fp8_pb_wo; in 384 three INT4 groups.
SHAPES = [(192, 256, 0), (64, 384, 1)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _modelopt_module(cfg_name: str, out: int, inp: int, seed: int):
    """(the calibrated Linear, the tensors Model Optimizer exports for it)."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(inp, out, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=g) * 0.05)
        lin.weight[0, :32] = 0.0  # an all-zero block / group
        lin.weight[1, 5] = 0.9  # an outlier
    model = torch.nn.Sequential(lin)
    x = torch.randn(3, 8, inp, generator=g).to(torch.bfloat16) * torch.linspace(0.1, 4, inp).to(torch.bfloat16)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg_name)), lambda m: m(x))
    sub = model[0]
    snapshot = {
        "weight": sub.weight.detach().clone(),
        "input_amax": sub.input_quantizer.amax,  # None: weight-only or dynamic activations
        "format": get_quantization_format(sub),
    }
    _export_quantized_weight(sub, torch.bfloat16)
    exported = {k: v for k, v in [*sub.named_buffers(), *sub.named_parameters()] if "quantizer" not in k}
    return snapshot, exported


@pytest.mark.parametrize(("shape"), SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(("ours", "cfg_name", "their_format"), CASES, ids=[c[0] for c in CASES])
def test_module_export_bit_exact(ours, cfg_name, their_format, shape):
    snap, theirs = _modelopt_module(cfg_name, *shape)
    assert snap["format"] == their_format
    handler = FORMAT_HANDLERS[ours]
    w = snap["weight"]
    input_amax = snap["input_amax"] if snap["input_amax"] is not None else torch.tensor(1.0)
    mine = handler.quantize(w, handler.scales(w.abs().amax().float(), input_amax.float()))
    assert set(mine) == set(theirs), (sorted(mine), sorted(theirs))
    for name, t in theirs.items():
        assert mine[name].dtype == t.dtype, name
        assert mine[name].shape == t.shape, name
        assert torch.equal(bits(mine[name]), bits(t)), name


def test_int4_packing_of_fused_experts_matches_modelopt():
    # quant_utils.pack_int4_in_uint8 on [E, out, in]: the 3-D branch packs output-row pairs too.
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(3, 10, 256, generator=g) * 0.1).to(torch.bfloat16)
    scale = int4.scale_from_amax(int4.group_amax(w, 128))
    packed, _ = int4.quantize_int4(w, 128, scale)
    assert torch.equal(packed, pack_int4_in_uint8(w, scale, 128))
    assert torch.equal(int4.unpack_out_pairs(packed), int4.codes(w, scale, 128))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mxfp4_matches_qtensor_including_ties_and_zeros(dtype):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 128, generator=g) * 0.3
    w[0, :32] = torch.tensor([0.0, -0.0, 0.75, -0.75, 1.25, 2.5, 5.0, 6.0] * 4)  # midpoints, signed zeros
    w[1, :32] = 0.0  # zero block: exponent -127
    w = w.to(dtype)
    qt, scale = MXFP4QTensor.quantize(w.clone(), 32)
    packed, biased = mxfp.quantize_mxfp4(w)
    assert torch.equal(packed, qt._quantized_data)
    assert torch.equal(biased, scale.reshape(biased.shape))
    theirs = qt.dequantize(dtype=torch.float32, scale=scale, block_sizes={-1: 32})
    assert torch.equal(mxfp.dequantize_mxfp4(packed, biased, torch.float32), theirs)


class _StaticQuantizer:
    """What Model Optimizer's export reads from an NVFP4 static quantizer after 4/6 MSE
    calibration: per-block `_amax` (the 4-or-6 choice folded in), `global_amax`, block sizes."""

    def __init__(self, per_block_amax: torch.Tensor, global_amax: torch.Tensor, four_over_six: bool = True):
        self._amax = per_block_amax
        self.global_amax = global_amax
        self.block_sizes = {-1: 16, "type": "static", "scale_bits": (4, 3), "four_over_six": four_over_six}


@pytest.mark.parametrize("seed", range(4))
def test_four_over_six_export_matches_static_quantizer_path(seed):
    # nvfp4_tensor.py get_weights_scaling_factor_from_quantizer (static path, normaliser 256), then
    # quant_utils.to_quantized_weight -> NVFP4QTensor.quantize with those scales.
    from quantship.formats.nvfp4_four_over_six import choose_block_amax, quantize_four_over_six

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(32, 64, generator=g) * 0.02).to(torch.bfloat16)
    w[0, :16] = 0.0
    amax = w.abs().amax().float()
    q = _StaticQuantizer(choose_block_amax(w, amax).reshape(-1), amax)
    ws2 = NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(q)
    ws, _ = NVFP4QTensor.get_weights_scaling_factor_from_quantizer(q, w, ws2)
    qt, _, _ = NVFP4QTensor.quantize(w.clone(), 16, ws, ws2)
    packed, bs, s2 = quantize_four_over_six(w)
    assert torch.equal(bits(s2), bits(ws2)) and torch.equal(ws2, amax / (6 * NORMALISER))
    assert torch.equal(bits(bs), bits(ws))
    assert torch.equal(packed, qt._quantized_data)
    # and the same numbers through our generic static path
    assert torch.equal(bits(fp4_blocks.static_block_scales(q._amax.view(32, 4), amax, NORMALISER)), bits(ws))


@pytest.mark.parametrize("seed", range(3))
def test_nvfp4_mse_export_matches_static_quantizer_path(seed):
    # An MSE-calibrated NVFP4 weight (NVFP4StaticQuantizer, normaliser 448) exports through the
    # static path; our nvfp4+mse writes the same bytes for the same chosen per-block amax.
    from quantship.algorithms.mse_scale_search import search_block_amax

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(32, 64, generator=g) * 0.02).to(torch.bfloat16)
    handler = FORMAT_HANDLERS["nvfp4+mse"]
    amax = w.abs().amax().float()
    scales = handler.scales(amax, torch.tensor(1.0))
    chosen = search_block_amax(handler.base, w, scales)
    q = _StaticQuantizer(chosen.reshape(-1), amax, four_over_six=False)
    ws2 = NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(q)
    ws, _ = NVFP4QTensor.get_weights_scaling_factor_from_quantizer(q, w, ws2)
    qt, _, _ = NVFP4QTensor.quantize(w.clone(), 16, ws, ws2)
    mine = handler.quantize(w, scales)
    assert torch.equal(bits(mine["weight_scale_2"]), bits(ws2))
    assert torch.equal(bits(mine["weight_scale"]), bits(ws))
    assert torch.equal(mine["weight"], qt._quantized_data)
    assert (chosen != handler.base.block_amax(w)).any()  # the search moved some blocks
