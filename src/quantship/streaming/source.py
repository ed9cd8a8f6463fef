"""The source checkpoint read one section (decoder layer) at a time.

Tensors are loaded through transformers' own loader, `convert_and_load_state_dict_in_model`, fed
only the checkpoint keys of one section: the same renames and fusions `from_pretrained` applies
(per-expert tensors stacked into transformers >= 5's 3-D expert parameters, Mixtral's
`block_sparse_moe` renamed), the same dtype rules, and each byte read from disk once. The keys
come from `quantship.sources`' BF16-named view of the folder, so FP8-block and INT4 sources
(DeepSeek-V3, Kimi-K2-Thinking) stream too, dequantized a tensor at a time as the loader asks.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    convert_and_load_state_dict_in_model,
    rename_source_key,
)
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging

from quantship.errors import QuantshipError
from quantship.export.sections import section_of
from quantship.sources.load import LazyTensor
from quantship.sources.reader import PLAIN, SourceCheckpoint


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files `from_pretrained` would read (sharded index or a single file)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise QuantshipError(f"{index} is not a valid safetensors index ({e}); re-download the model") from None
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise QuantshipError(
            f"{model_dir} has no .safetensors files; streaming reads safetensors shards — "
            "convert the checkpoint with save_pretrained or use the in-memory path (--no-streaming)"
        )
    return files


@contextlib.contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class LayerSource:
    """A HF model folder's tensors, grouped by section and loaded into a skeleton on demand."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.files = checkpoint_files(self.model_dir)
        self.reader = SourceCheckpoint(self.model_dir)
        self._sections: dict[str, list[str]] = {}
        self._load_config: LoadStateDictConfig | None = None

    @property
    def quantized(self) -> bool:
        """A quantized source, read dequantized (its quantization_config does not apply)."""
        return self.reader.format != PLAIN

    def tensor_bytes(self, name: str, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of one tensor once loaded (floating tensors in `dtype`, like from_pretrained)."""
        t = self.reader.dtype(name, dtype)
        item = (torch.finfo(dtype).bits if t.is_floating_point else torch.iinfo(t).bits if t != torch.bool else 8) // 8
        n = 1
        for d in self.reader.shape(name):
            n *= d
        return n * item

    def loaded_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes the whole model takes in memory once loaded in `dtype`."""
        return sum(self.tensor_bytes(n, dtype) for n in self.reader.names())

    def fingerprint(self) -> list:
        """Names, sizes and modification times of the shards: a changed source is a new command."""
        out = []
        for f in self.files:
            st = os.stat(f)
            out.append([f.name, st.st_size, st.st_mtime_ns])
        return out

    def prepare(self, model: nn.Module, layers: list[str], dtype: torch.dtype) -> None:
        """Group the checkpoint keys by section (OUTSIDE or a decoder layer) using the model's
        own conversion mapping, and set up the loader configuration `from_pretrained` would use."""
        conversions = get_model_conversion_mapping(model, None, None)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        meta_state = model.state_dict()
        layer_set = set(layers)
        sections: dict[str, list[str]] = {}
        for key in self.reader.names():
            # Marks each transform that matches as used, as from_pretrained's pass does, so that
            # `model._weight_conversions` (what export reverts) is the same as after from_pretrained.
            renamed, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
            if renamed not in meta_state and key in meta_state:
                renamed = key
            if renamed in meta_state:
                sections.setdefault(section_of(renamed, layer_set), []).append(key)
        self._sections = sections
        # Loaded and converted on the CPU, then moved: stacking per-expert tensors into 3-D
        # experts holds the pieces and the result at once, which must not happen on the GPU.
        self._load_config = LoadStateDictConfig(
            dtype=dtype, dtype_plan=model._get_dtype_plan(dtype), weight_mapping=conversions,
            device_map={"": torch.device("cpu")},
        )

    def section_bytes(self, section: str, dtype: torch.dtype = torch.bfloat16) -> int:
        return sum(self.tensor_bytes(k, dtype) for k in self._sections.get(section, []))

    def load_section(self, model: nn.Module, section: str) -> None:
        """Load one section's tensors into the (meta) model, on the CPU (callers move them)."""
        assert self._load_config is not None, "call prepare() first"
        keys = self._sections.get(section, [])
        state = {k: LazyTensor(self.reader, k, self._load_config.dtype) for k in keys}
        with _quiet_transformers_progress():
            info, _ = convert_and_load_state_dict_in_model(model, state, self._load_config)
        if info.mismatched_keys:
            name, got, want = sorted(info.mismatched_keys, key=str)[0]
            raise QuantshipError(f"checkpoint tensor {name} has shape {tuple(got)}, the model expects {tuple(want)}; "
                                 "the checkpoint does not match its config.json")
        if info.conversion_errors:
            first = next(iter(info.conversion_errors.items()))
            raise QuantshipError(f"cannot convert checkpoint tensors for {first[0]}: {first[1]}")

    def close(self) -> None:
        self.reader.close()
