"""The model without its weights, and the arguments each decoder layer is called with.

The skeleton is the model class built from config.json with every parameter on the meta device
(accelerate's `init_empty_weights`) and its buffers real (rotary `inv_freq` computed as
`__init__` computes it). Sections are then loaded into it one at a time by
`SourceCheckpoint.load_section`, and freed again by `free`.

A decoder layer's inputs other than the hidden states (causal mask, rotary cos/sin, position
ids; per layer type where they differ, as in Gemma 3) are made by the model's own forward
before the layer loop. `capture_layer_calls` runs that forward with every layer replaced by a
catcher that records its arguments and passes the hidden states on, and stops at the last
layer, so the layers see exactly what the full forward gives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers import initialization as hf_init

from quantship.errors import QuantshipError
from quantship.model.discover import SUPPORTED_ARCHITECTURES
from quantship.source import check_model_dir


def build_skeleton(model_dir: str | Path, trust_remote_code: bool = False,
                   dtype: torch.dtype = torch.bfloat16, dequantized_source: bool = False) -> nn.Module:
    """The model class of `model_dir` in `dtype`, parameters on the meta device. For a quantized
    source read dequantized, its quantization_config goes, as in `sources.load`."""
    check_model_dir(str(model_dir))
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
        if dequantized_source and hasattr(config, "quantization_config"):
            del config.quantization_config
        with init_empty_weights(include_buffers=False), hf_init.no_tie_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as e:
        text = str(e)
        if "trust_remote_code" in text:
            raise QuantshipError(f"{model_dir} needs its own model code; rerun with --trust-remote-code if you trust it") from None
        raise QuantshipError(f"unsupported model at {model_dir}; supported: {SUPPORTED_ARCHITECTURES}") from None
    return model.eval()


def free(module: nn.Module) -> None:
    """Drop a section's weights (back to the meta device) once it is written."""
    module.to("meta")


@dataclass
class LayerCall:
    """How the model calls one decoder layer on one batch, apart from the hidden states."""

    args: tuple
    kwargs: dict
    hidden_as_keyword: bool

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_keyword:
            out = layer(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple | list) else out


class _Stop(Exception):
    """Raised by the last layer's catcher: nothing after the layers is needed."""


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The forward inputs the in-memory calibration passes (pipeline.run_calibration)."""
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def capture_layer_calls(model: nn.Module, layers: list[nn.Module], batches: list[dict[str, torch.Tensor]],
                        device: torch.device | str) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
    """(hidden states entering the first layer per batch, calls[layer][batch])."""
    calls: list[list[LayerCall]] = [[] for _ in layers]
    first_hidden: list[torch.Tensor] = []
    last = len(layers) - 1

    def catcher(i: int):
        def catch(*args, **kwargs):
            if args:
                hidden, rest, as_kw = args[0], args[1:], False
            else:
                hidden, rest, as_kw = kwargs.pop("hidden_states"), (), True
            calls[i].append(LayerCall(rest, kwargs, as_kw))
            if i == 0:
                first_hidden.append(hidden)
            if i == last:
                raise _Stop
            return hidden

        return catch

    for i, layer in enumerate(layers):
        layer.forward = catcher(i)
    try:
        for batch in batches:
            try:
                model(**model_inputs(batch, device), use_cache=False)
            except _Stop:
                pass
            except Exception as e:
                raise QuantshipError(
                    f"cannot capture the decoder-layer inputs of {type(model).__name__} ({type(e).__name__}: {e}); "
                    "use the in-memory path (--no-streaming)"
                ) from None
    finally:
        for layer in layers:
            del layer.forward
    if any(len(c) != len(batches) for c in calls):
        raise QuantshipError(f"the forward of {type(model).__name__} does not call every decoder layer once per batch; "
                             "use the in-memory path (--no-streaming)")
    return first_hidden, calls
