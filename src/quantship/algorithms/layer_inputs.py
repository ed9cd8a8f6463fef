"""The inputs of every decoder layer for the calibration batches, without running the layers.

Layer-wise algorithms (GPTQ) run one decoder layer at a time on the previous layer's outputs,
so they need what the model passes each layer besides the hidden state: attention mask,
position embeddings, position ids... These are computed once by the model before its layer
loop and may differ per layer (Gemma 3's sliding-window layers get their own mask and rotary
table), so they are recorded per layer: every layer's forward is briefly replaced by a stub
that records its call and hands the hidden state on unchanged, and the last stub stops the
forward (no final norm, no lm_head).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from quantship.errors import QuantshipError
from quantship.model.discover import ModelStructure


@dataclass
class LayerCalls:
    """One decoder layer's call arguments besides the hidden state, per calibration batch."""

    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    tuple_output: bool = False  # the layer returns (hidden, ...) rather than a tensor (remote code)


class _Stop(Exception):
    """Raised by the last stub: the rest of the forward is not needed."""


def run_layer(layer: nn.Module, hidden: Tensor, calls: LayerCalls, b: int) -> Tensor:
    """The layer's output hidden state for batch b."""
    out = layer(hidden, *calls.args[b], **calls.kwargs[b])
    return out[0] if isinstance(out, tuple | list) else out


def _split_hidden(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    if "hidden_states" not in kwargs:
        raise QuantshipError("a decoder layer was called without a hidden state; this model's layer loop "
                             "is not supported by layer-wise algorithms, use --algorithm max")
    return kwargs.pop("hidden_states"), args, kwargs


def _with_stubs(layers: list[nn.Module], stub_of) -> None:
    for i, layer in enumerate(layers):
        layer.forward = stub_of(i)


def _remove_stubs(layers: list[nn.Module]) -> None:
    for layer in layers:
        if "forward" in layer.__dict__:
            del layer.forward


def capture_layer_inputs(model: nn.Module, structure: ModelStructure, batches: list[dict[str, Tensor]]
                         ) -> tuple[list[Tensor], list[LayerCalls]]:
    """(first layer's hidden input per batch, every layer's other call arguments per batch)."""
    layers = [m for _, m in structure.decoder_layers]
    device = next(model.parameters()).device
    first: list[Tensor] = []
    calls = [LayerCalls() for _ in layers]

    def stub_of(i: int, last: int):
        def stub(*args, **kwargs):
            hidden, rest, kw = _split_hidden(args, kwargs)
            calls[i].args.append(rest)
            calls[i].kwargs.append(kw)
            if i == 0:
                first.append(hidden)
            if i == last:
                raise _Stop
            return (hidden,) if calls[0].tuple_output else hidden

        return stub

    def forward(batch: dict[str, Tensor]) -> None:
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        try:
            model(**inputs, use_cache=False)
        except _Stop:
            return
        raise QuantshipError("the model did not call its decoder layers in order; use --algorithm max")

    with torch.no_grad():
        if not batches:
            raise QuantshipError("calibration data is empty; pass a --dataset with text or raise --calib-size")
        try:
            # Probe: run the real first layer once to learn whether layers return a tuple.
            _with_stubs(layers[:1], lambda i: stub_of(i, 0))
            forward(batches[0])
            _remove_stubs(layers[:1])
            out = layers[0](first[0], *calls[0].args[0], **calls[0].kwargs[0])
            tuple_output = isinstance(out, tuple | list)
            first.clear()
            for c in calls:
                c.args.clear()
                c.kwargs.clear()
            calls[0].tuple_output = tuple_output
            _with_stubs(layers, lambda i: stub_of(i, len(layers) - 1))
            for batch in batches:
                forward(batch)
        finally:
            _remove_stubs(layers)
    for c in calls:
        c.tuple_output = calls[0].tuple_output
    return first, calls
