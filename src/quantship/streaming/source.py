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
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    build_glob_alternation,
    convert_and_load_state_dict_in_model,
    rename_source_key,
    revert_weight_conversion,
)
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging

from quantship.errors import QuantshipError
from quantship.export.sections import OUTSIDE, section_of
from quantship.sources.reader import PLAIN, SourceCheckpoint


def row_plan(model: nn.Module, section: str, keys: set[str]) -> dict[str, dict[str, torch.Tensor]] | None:
    """For every parameter and persistent buffer of `section`: {checkpoint tensor: the flat row
    indices (over all leading dims) its rows fill}; None where transformers' conversion does more
    than rename, stack and concatenate along rows, or does not use exactly `keys`.

    Found with `model.checkpoint_names`' probe run backwards: the reverse conversion of a tensor
    holding each row's own index shows where every checkpoint row comes from.
    """
    layer = model.get_submodule(section)
    plan: dict[str, dict[str, torch.Tensor]] = {}
    used: list[str] = []
    for local, ref in layer.state_dict(keep_vars=True).items():
        name = f"{section}.{local}"
        rows = math.prod(ref.shape[:-1]) if ref.dim() >= 2 else ref.numel()
        if ref.dim() >= 2:  # two columns, (i, -1-i): a conversion that moves columns shows
            ids = torch.arange(rows).view(*ref.shape[:-1], 1)
            probe = torch.cat([ids, -ids - 1], dim=-1)
        else:
            probe = torch.arange(rows).view(ref.shape)
        mapping = {}
        for key, value in revert_weight_conversion(model, {name: probe}).items():
            if ref.dim() >= 2:
                if value.dim() == 0 or value.shape[-1] != 2 or not torch.equal(value[..., 1], -value[..., 0] - 1):
                    return None  # columns transposed, split or merged: not row-wise
                value = value[..., 0]
            mapping[key] = value.reshape(-1)
        ids = torch.cat(list(mapping.values())) if mapping else torch.empty(0, dtype=torch.long)
        if not torch.equal(ids.sort().values, torch.arange(rows)):
            return None
        plan[name] = mapping
        used += list(mapping)
    return plan if sorted(used) == sorted(keys) else None


def _place(model: nn.Module, name: str, mapping: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
           device: torch.device | str, dtype: torch.dtype) -> None:
    """Fill a fresh tensor on `device` with its checkpoint tensors' rows and put it in the model."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    ref = getattr(module, leaf)
    out = torch.empty(ref.shape, dtype=dtype, device=device)
    flat = out.view(-1, ref.shape[-1]) if ref.dim() >= 2 else out.view(-1)
    for key, ids in mapping.items():
        t = tensors.pop(key)
        cols = flat.shape[1] if flat.dim() == 2 else 1
        if t.numel() != ids.numel() * cols or (flat.dim() == 2 and (t.dim() == 0 or t.shape[-1] != cols)):
            raise QuantshipError(f"checkpoint tensor {key} has shape {tuple(t.shape)}, which does not fit "
                                 f"{name} {tuple(ref.shape)}; the checkpoint does not match its config.json")
        # The cast from_pretrained makes (`.to(dtype)`), on the way to the device.
        value = t.to(device=device, dtype=dtype).reshape(ids.numel(), *flat.shape[1:])
        flat.index_copy_(0, ids.to(device), value)
    if leaf in module._parameters:
        param = nn.Parameter(out, requires_grad=out.is_floating_point())
        param._is_hf_initialized = True
        module._parameters[leaf] = param
    else:
        module._buffers[leaf] = out


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


class LazySection:
    """One section's checkpoint tensors, each read (from `raw` when read ahead, else from disk) and
    dequantized only when taken with `pop`, and held by nobody after: a layer's BF16 source copy
    never exists whole. Raw tensors are dropped as their weight is taken."""

    def __init__(self, reader: SourceCheckpoint, keys: list[str], dtype: torch.dtype,
                 raw: dict[str, torch.Tensor] | None = None):
        self.reader, self.dtype, self.raw = reader, dtype, raw
        self._keys = dict.fromkeys(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._keys))

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def pop(self, key: str) -> torch.Tensor:
        del self._keys[key]
        t = self.reader.dequantized(key, self.dtype, self.raw)
        if self.raw is not None:
            for stored in self.reader.stored_names(key):
                self.raw.pop(stored, None)
        return t

    def materialized(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self:
            yield key, self.pop(key)

    def deferred(self) -> Iterator[tuple[str, _Deferred]]:
        """(key, a slice-like whose `[...]` pops it): how transformers' loader takes safetensors slices."""
        for key in self:
            yield key, _Deferred(self, key)


class _Deferred:
    """A tensor read when indexed, as transformers' loader indexes the safetensors slices it is given."""

    def __init__(self, section: LazySection, key: str):
        self.section, self.key = section, key

    def __getitem__(self, index) -> torch.Tensor:
        return self.section.pop(self.key)[index]


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

    def read_raw(self, section: str) -> dict[str, torch.Tensor]:
        """The section's stored tensors as they are on disk (FP8 / packed INT4 still quantized:
        half or a quarter of BF16). The GPU run reads the next layer so in a background thread."""
        out: dict[str, torch.Tensor] = {}
        for k in self._sections.get(section, []):
            out.update(self.reader.read_stored(k))
        return out

    def section(self, section: str, raw: dict[str, torch.Tensor] | None = None) -> LazySection:
        """The section's checkpoint tensors, each read (or dequantized) when taken; `raw` from `read_raw`."""
        dtype = self._load_config.dtype if self._load_config else torch.bfloat16
        return LazySection(self.reader, self._sections.get(section, []), dtype, raw)

    def read_section(self, section: str) -> dict[str, torch.Tensor]:
        """The section's checkpoint tensors on the CPU, all dequantized at once (a whole layer in BF16)."""
        return dict(self.section(section).materialized())

    def load_section(self, model: nn.Module, section: str, device: torch.device | str = "cpu",
                     tensors: LazySection | dict[str, torch.Tensor] | None = None) -> None:
        """Load one section into the (meta) model on `device`; `tensors` from `section` (default)
        or `read_section`.

        Where transformers' conversion for the section only renames tensors and stacks or
        concatenates them along rows (every model here), each checkpoint tensor is read and
        dequantized only when it is copied into its rows of the parameter on `device`, then
        dropped: the host holds the new parameters and one source tensor. Otherwise transformers'
        own loader converts on the CPU (reading each tensor as it asks) and the section is moved after.
        """
        assert self._load_config is not None, "call prepare() first"
        tensors = self.section(section) if tensors is None else tensors
        plan = row_plan(model, section, set(self._sections.get(section, [])))
        if plan is not None and section != OUTSIDE:
            for name, mapping in plan.items():
                _place(model, name, mapping, tensors, device, self._target_dtype(model, name))
            return
        if isinstance(tensors, LazySection):
            tensors = dict(tensors.deferred())
        with _quiet_transformers_progress():
            info, _ = convert_and_load_state_dict_in_model(model, tensors, self._load_config)
        if info.mismatched_keys:
            name, got, want = sorted(info.mismatched_keys, key=str)[0]
            raise QuantshipError(f"checkpoint tensor {name} has shape {tuple(got)}, the model expects {tuple(want)}; "
                                 "the checkpoint does not match its config.json")
        if info.conversion_errors:
            first = next(iter(info.conversion_errors.items()))
            raise QuantshipError(f"cannot convert checkpoint tensors for {first[0]}: {first[1]}")

    def _target_dtype(self, model: nn.Module, name: str) -> torch.dtype:
        """The dtype from_pretrained gives a parameter: keep-in-fp32 plans, else the model's own."""
        plan = self._load_config.dtype_plan or {}
        if plan:
            alternation, by_group, _ = build_glob_alternation(list(plan))
            found = alternation.search(name)
            if found is not None:
                return plan[by_group[found.lastgroup]]
        return model.get_parameter_or_buffer(name).dtype

    def close(self) -> None:
        self.reader.close()
