"""Load a quantized Model Optimizer unified checkpoint back as a fake-quant HF model (CPU-capable).

The packed weights are dequantized, written once as a plain high-precision checkpoint in a temp
dir and loaded with `from_pretrained`, so transformers applies its own name conversion (per-expert
tensors back into fused experts). Input scales are mapped onto the loaded modules and applied
as activation fake quantization, so the model computes what a serving engine will: static scales
from the checkpoint, dynamic ones (per-token FP8, MX blocks) computed by the format's handler.
An AWQ / SmoothQuant `pre_quant_scale` multiplies the module's input before that, as in the
engine (and as `algorithms/smoothing.py` hooks it in memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from quantship.errors import QuantshipError
from quantship.fake_quant import activation_fake_quant
from quantship.formats.handlers import FORMAT_HANDLERS, FormatHandler
from quantship.model.checkpoint_names import checkpoint_slices
from quantship.model.discover import ModelStructure, discover
from quantship.model.from_state_dict import model_from_state_dict

# quant_algo (hf_quant_config.json) -> handler; recipes.py writes these names. NVFP4 covers
# nvfp4_four_over_six and the `+mse` variants too: the same tensors, only chosen differently.
ALGO_TO_FORMAT = {
    "NVFP4": "nvfp4", "FP8": "fp8", "FP8_PER_CHANNEL_PER_TOKEN": "fp8_pc_pt", "fp8_pb_wo": "fp8_pb_wo",
    "W4A16_AWQ": "int4_awq", "W4A8_AWQ": "w4a8_awq", "NVFP4_AWQ": "nvfp4_awq", "W4A8_NVFP4_FP8": "w4a8_nvfp4_fp8",
    "MXFP8": "mxfp8", "mxfp4": "mxfp4", "W8A8_SQ_PER_CHANNEL": "int8_sq", "W8A16": "int8_wo",
}
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")
PQS = "pre_quant_scale"
KV_SUFFIXES = (".k_scale", ".v_scale")


@dataclass
class LoadedQuantized:
    model: nn.Module
    structure: ModelStructure
    handler: FormatHandler
    input_scales: dict[str, torch.Tensor]
    pre_quant_scales: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # Linear name -> [in]

    @contextlib.contextmanager
    def fake_quantized(self) -> Iterator[nn.Module]:
        with activation_fake_quant(self.structure, self.handler, self.input_scales):
            yield self.model


def _tensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise QuantshipError(f"{directory} has no .safetensors files; point to a checkpoint directory")
    return files


def _quant_section(directory: Path) -> dict:
    hf = directory / "hf_quant_config.json"
    if hf.is_file():
        return json.loads(hf.read_text())["quantization"]
    config = json.loads((directory / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == "modelopt" and "quant_algo" in qc:
        return qc
    raise QuantshipError(f"{directory} is not a Model Optimizer unified checkpoint (no hf_quant_config.json)")


def read_quant_algo(directory: Path) -> str:
    return _quant_section(directory)["quant_algo"]


def handler_for(directory: Path) -> FormatHandler:
    """The handler that dequantizes this checkpoint; a one-line error for what it cannot load."""
    q = _quant_section(directory)
    algo = q["quant_algo"]
    if algo not in ALGO_TO_FORMAT:
        raise QuantshipError(f"quant_algo {algo!r} cannot be loaded yet; supported: {', '.join(ALGO_TO_FORMAT)}")
    handler = FORMAT_HANDLERS[ALGO_TO_FORMAT[algo]]
    group = q.get("group_size")
    if group is not None and handler.block_size is not None and group != handler.block_size:
        raise QuantshipError(f"{algo} with group_size {group} cannot be loaded; quantship reads group_size "
                             f"{handler.block_size} for it (re-export with quantship)")
    return handler


_PER_ROW = ("fp8_pc_pt", "int8_sq", "int8_wo")


def normalize_scale_shapes(tensors: dict[str, torch.Tensor], handler: FormatHandler) -> dict[str, torch.Tensor]:
    """Scale shapes other writers use (and `verify` accepts) in the shapes the handlers read:
    per-row `[out, 1]` -> `[out]`, fp8_pb_wo tiles `[R, C]` -> `[R, 1, C, 1]`."""
    s = tensors.get("weight_scale")
    if s is None:
        return tensors
    if handler.name in _PER_ROW and s.ndim == 2 and s.shape[-1] == 1:
        return {**tensors, "weight_scale": s.squeeze(-1)}
    if handler.name == "fp8_pb_wo" and s.ndim == 2:
        return {**tensors, "weight_scale": s.reshape(s.shape[0], 1, s.shape[1], 1)}
    return tensors


def dequantized_state_dict(directory: Path, handler: FormatHandler, dtype: torch.dtype
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(high-precision checkpoint tensors, input scale per quantized checkpoint module, its
    pre_quant_scale where it has one). Modules without an input_scale (dynamic or weight-only
    activations) get 1.0, which their handler's activation fake quant does not read."""
    raw: dict[str, torch.Tensor] = {}
    for f in _tensor_files(directory):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open has no iterator
                raw[k] = fh.get_tensor(k)
    modules = {k.rsplit(".", 1)[0] for k in raw if k.endswith(".weight_scale")}
    out: dict[str, torch.Tensor] = {}
    input_scales, pre_quant = {}, {}
    for m in modules:
        tensors = {s: raw.pop(f"{m}.{s}") for s in ("weight", *SCALE_SUFFIXES, PQS) if f"{m}.{s}" in raw}
        input_scales[m] = tensors.pop("input_scale", torch.tensor(1.0))
        if PQS in tensors:
            pre_quant[m] = tensors.pop(PQS)
        out[f"{m}.weight"] = handler.dequantize(normalize_scale_shapes(tensors, handler), dtype)
    for k, v in raw.items():
        if not k.endswith(KV_SUFFIXES):
            out[k] = v
    return out, input_scales, pre_quant


def _map_input_scales(model: nn.Module, structure: ModelStructure, by_module: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """Checkpoint-module input scales -> in-memory targets (Linear names, fused expert params)."""
    mapped: dict[str, torch.Tensor] = {}
    for t in structure.linears:
        slices = checkpoint_slices(model, f"{t.name}.weight", t.module.weight.shape)
        if slices and slices[0].module in by_module:
            mapped[t.name] = by_module[slices[0].module]
    for fe in structure.fused_experts:
        for param in (fe.gate_up_param, fe.down_param):
            slices = checkpoint_slices(model, f"{fe.name}.{param}", getattr(fe.module, param).shape)
            per_expert = torch.zeros(fe.num_experts)
            if not all(sl.module in by_module for sl in slices):
                continue
            for sl in slices:
                per_expert[sl.expert] = by_module[sl.module].float()
            mapped[f"{fe.name}.{param}"] = per_expert
    return mapped


def _pre_quant_hooks(model: nn.Module, structure: ModelStructure, by_module: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """Multiply each Linear's input by its checkpoint pre_quant_scale (a permanent forward
    pre-hook: the stored weight is `W / pre_quant_scale`). Fused 3-D experts have no per-expert
    hook point: a scale other than all-ones there is an error, not silently dropped."""
    mapped: dict[str, torch.Tensor] = {}
    for t in structure.linears:
        slices = checkpoint_slices(model, f"{t.name}.weight", t.module.weight.shape)
        if slices and slices[0].module in by_module:
            pqs = by_module[slices[0].module].to(t.module.weight.device)
            t.module.register_forward_pre_hook(
                lambda _m, args, p=pqs: (args[0] * p.to(args[0].dtype), *args[1:]))
            mapped[t.name] = pqs
    for fe in structure.fused_experts:
        for param in (fe.gate_up_param, fe.down_param):
            for sl in checkpoint_slices(model, f"{fe.name}.{param}", getattr(fe.module, param).shape):
                p = by_module.get(sl.module)
                if p is not None and not bool((p == 1).all()):
                    raise QuantshipError(f"{sl.module}.pre_quant_scale is not all ones, and fused experts "
                                         f"({fe.name}) cannot apply one on reload; fold it into the weights")
    return mapped


def load_quantized(directory: str | Path, dtype: torch.dtype = torch.bfloat16,
                   device: str | torch.device = "cpu", trust_remote_code: bool = False) -> LoadedQuantized:
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise QuantshipError(f"{directory} has no config.json; point to an exported checkpoint directory")
    handler = handler_for(directory)
    state, scales_by_module, pqs_by_module = dequantized_state_dict(directory, handler, dtype)
    model = model_from_state_dict(directory, state, dtype, trust_remote_code).to(device)
    structure = discover(model)
    pre_quant = _pre_quant_hooks(model, structure, pqs_by_module)
    return LoadedQuantized(model, structure, handler, _map_input_scales(model, structure, scales_by_module),
                           pre_quant)
