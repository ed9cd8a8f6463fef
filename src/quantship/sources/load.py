"""Build the in-memory model from a quantized source without a BF16 copy, in memory or on disk.

transformers' loader takes, in place of each tensor, any object it can materialize with `t[...]` (it
passes safetensors' lazy slices that way). We hand it one `LazyTensor` per BF16 name, so each weight is
dequantized only when the loader sets that parameter, and loading is kept sequential: transformers'
default thread pool would start every materialization at once and hold all dequantized tensors
together, which is the BF16 copy again, only in RAM.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from quantship.model.from_state_dict import model_from_state_dict
from quantship.sources.reader import READABLE_METHODS, SourceCheckpoint, quantization_metadata

_SAFETENSORS_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


class LazyTensor:
    """A source tensor that is read (and dequantized) when transformers materializes it."""

    def __init__(self, source: SourceCheckpoint, name: str, dtype: torch.dtype):
        self.source, self.name, self.dtype = source, name, dtype

    def __getitem__(self, index) -> Tensor:
        return self.source.dequantized(self.name, self.dtype)[index]

    def get_shape(self) -> list[int]:
        return list(self.source.shape(self.name))

    def get_dtype(self) -> str:
        return _SAFETENSORS_NAMES.get(self.source.dtype(self.name, self.dtype), "F32")


@contextlib.contextmanager
def sequential_loading() -> Iterator[None]:
    """transformers reads HF_DEACTIVATE_ASYNC_LOAD at load time: one tensor materialized at a time."""
    previous = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = previous


def lazy_state_dict(source: SourceCheckpoint, dtype: torch.dtype = torch.bfloat16) -> dict[str, LazyTensor]:
    return {name: LazyTensor(source, name, dtype) for name in source.names()}


def load_dequantized_model(source: SourceCheckpoint, dtype: torch.dtype = torch.bfloat16,
                           trust_remote_code: bool = False) -> nn.Module:
    """The model class of `source`'s config with every weight dequantized into `dtype`; tensors the class
    does not hold (MTP layers) are left in the source (see `sources.extras`)."""
    with sequential_loading():
        return model_from_state_dict(source.path, lazy_state_dict(source, dtype), dtype, trust_remote_code)


def load_if_quantized(path: str | Path, dtype: torch.dtype = torch.bfloat16,
                      trust_remote_code: bool = False) -> nn.Module | None:
    """The dequantized model when the folder holds a source quantized in a format we read (by its
    quantization metadata), else None: unquantized folders, and other methods transformers may know,
    load through `from_pretrained` as before."""
    path = Path(path).expanduser()
    qc = quantization_metadata(path, json.loads((path / "config.json").read_text()))
    if qc is None or qc.get("quant_method") not in READABLE_METHODS:
        return None
    source = SourceCheckpoint(path)
    try:
        return load_dequantized_model(source, dtype, trust_remote_code)
    finally:
        source.close()
