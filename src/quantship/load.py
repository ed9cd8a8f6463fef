"""Load a quantized Model Optimizer unified checkpoint back as a fake-quant HF model (CPU-capable).

The packed weights are dequantized, written once as a plain high-precision checkpoint in a temp
dir and loaded with `from_pretrained`, so transformers applies its own name conversion (per-expert
tensors back into fused experts). Input scales are mapped onto the loaded modules and applied
as activation fake quantization, so the model computes what a serving engine will.
"""

from __future__ import annotations

import contextlib
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

ALGO_TO_FORMAT = {"NVFP4": "nvfp4", "FP8": "fp8"}
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")
KV_SUFFIXES = (".k_scale", ".v_scale")


@dataclass
class LoadedQuantized:
    model: nn.Module
    structure: ModelStructure
    handler: FormatHandler
    input_scales: dict[str, torch.Tensor]

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


def read_quant_algo(directory: Path) -> str:
    hf = directory / "hf_quant_config.json"
    if hf.is_file():
        return json.loads(hf.read_text())["quantization"]["quant_algo"]
    config = json.loads((directory / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == "modelopt" and "quant_algo" in qc:
        return qc["quant_algo"]
    raise QuantshipError(f"{directory} is not a Model Optimizer unified checkpoint (no hf_quant_config.json)")


def dequantized_state_dict(directory: Path, handler: FormatHandler, dtype: torch.dtype
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(high-precision checkpoint tensors, input_scale per checkpoint module name)."""
    raw: dict[str, torch.Tensor] = {}
    for f in _tensor_files(directory):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open has no iterator
                raw[k] = fh.get_tensor(k)
    modules = {k.rsplit(".", 1)[0] for k in raw if k.endswith(".input_scale")}
    out: dict[str, torch.Tensor] = {}
    input_scales = {}
    for m in modules:
        tensors = {s: raw.pop(f"{m}.{s}") for s in ("weight", *SCALE_SUFFIXES) if f"{m}.{s}" in raw}
        input_scales[m] = tensors["input_scale"]
        out[f"{m}.weight"] = handler.dequantize(tensors, dtype)
    for k, v in raw.items():
        if not k.endswith(KV_SUFFIXES):
            out[k] = v
    return out, input_scales


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


def load_quantized(directory: str | Path, dtype: torch.dtype = torch.bfloat16,
                   device: str | torch.device = "cpu", trust_remote_code: bool = False) -> LoadedQuantized:
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise QuantshipError(f"{directory} has no config.json; point to an exported checkpoint directory")
    algo = read_quant_algo(directory)
    if algo not in ALGO_TO_FORMAT:
        raise QuantshipError(f"quant_algo {algo!r} cannot be loaded yet; supported: {', '.join(ALGO_TO_FORMAT)}")
    handler = FORMAT_HANDLERS[ALGO_TO_FORMAT[algo]]
    state, scales_by_module = dequantized_state_dict(directory, handler, dtype)
    model = model_from_state_dict(directory, state, dtype, trust_remote_code).to(device)
    structure = discover(model)
    return LoadedQuantized(model, structure, handler, _map_input_scales(model, structure, scales_by_module))
