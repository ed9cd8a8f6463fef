"""Run a high-precision model as the quantized checkpoint will compute: fake quantization.

Used to measure accuracy and to prove that an export reloads to the same numbers. Weights are
swapped for their dequantized values; inputs of quantized modules are quantized and
dequantized with their static input scale, per expert for fused experts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from quantship.formats.handlers import FormatHandler
from quantship.model import experts as fused_ops
from quantship.model.discover import ModelStructure


@contextlib.contextmanager
def swapped_weights(params: dict[str, tuple[nn.Parameter, torch.Tensor]]) -> Iterator[None]:
    """Temporarily replace parameter values: {name: (parameter, new value)}."""
    saved = {}
    try:
        with torch.no_grad():
            for name, (param, value) in params.items():
                saved[name] = param.data
                param.data = value.to(param.dtype)
        yield
    finally:
        for name, (param, _) in params.items():
            if name in saved:
                param.data = saved[name]


@contextlib.contextmanager
def activation_fake_quant(
    structure: ModelStructure, handler: FormatHandler, input_scales: dict[str, torch.Tensor]
) -> Iterator[None]:
    """Quantize-dequantize the inputs of every module with an input scale.

    Keys of `input_scales` are Linear module names (0-dim scale) or fused experts parameter
    names (`...experts.gate_up_proj`, one scale per expert).
    """
    handles = []
    patched = []
    modules = {t.name: t.module for t in structure.linears}
    # Fused siblings (q/k/v, gate/up) get the same input tensor and the same input scale:
    # quantize it once. Keyed on the tensor object itself, so only a true repeat hits.
    last: list = [None, None, None]  # input, scale, its fake-quantized value
    try:
        for key, scale in input_scales.items():
            module = modules.get(key)
            if module is not None:
                def pre_hook(_m: nn.Module, args: tuple, scale: torch.Tensor = scale) -> tuple:
                    x = args[0]
                    if last[0] is not x or not torch.equal(last[1], scale):
                        last[:] = [x, scale, handler.fake_quant_input(x, scale)]
                    return (last[2], *args[1:])

                handles.append(module.register_forward_pre_hook(pre_hook))
        for fe in structure.fused_experts:
            gu = input_scales.get(f"{fe.name}.{fe.gate_up_param}")
            dn = input_scales.get(f"{fe.name}.{fe.down_param}")
            if gu is None or dn is None:
                continue

            def forward(hidden, top_k_index, top_k_weights, fe=fe, gu=gu, dn=dn):
                out, _ = fused_ops.fused_experts_forward(
                    fe, hidden, top_k_index, top_k_weights,
                    act_quant_gate_up=lambda x, e: handler.fake_quant_input(x, gu[e]),
                    act_quant_down=lambda x, e: handler.fake_quant_input(x, dn[e]),
                )
                return out

            fe.module.forward = forward
            patched.append(fe.module)
        yield
    finally:
        last.clear()
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward
