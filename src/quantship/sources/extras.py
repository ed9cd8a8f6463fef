"""Source tensors the model class does not load — never dropped silently.

DeepSeek-V3/R1 ship `num_nextn_predict_layers` multi-token-prediction layers as
`model.layers.{num_hidden_layers + i}.*`; transformers' model classes skip them, but serving engines
load them for speculative decoding. They, and any other tensor the class ignores, go into the export
in high precision (dequantized from an FP8/INT4 source, as the BF16 twin holds them), their modules
into the exclude list, and a list into `report.md` / `source_extras.json`.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.core_model_loading import revert_weight_conversion

from quantship.errors import QuantshipError
from quantship.sources.reader import SourceCheckpoint

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def loaded_names(model: nn.Module) -> set[str]:
    """The checkpoint names `model` loads: its state dict through transformers' reverse weight conversion
    (per-expert names for fused experts), on meta tensors so nothing is copied."""
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model.state_dict().items()}
    return set(revert_weight_conversion(model, meta))


def mtp_layers(config: dict) -> range:
    n = int(config.get("num_hidden_layers") or 0)
    return range(n, n + int(config.get("num_nextn_predict_layers") or config.get("num_mtp_layers") or 0))


@dataclass
class SourceExtras:
    """Tensors of the source that the model does not hold: what to append to the export."""

    source: SourceCheckpoint | None = None
    names: list[str] = field(default_factory=list)
    mtp: range = range(0)
    dtype: torch.dtype = torch.bfloat16

    def is_mtp(self, name: str) -> bool:
        m = _LAYER.match(name)
        return m is not None and int(m.group(1)) in self.mtp

    @property
    def exclude_modules(self) -> list[str]:
        """Modules of the carried weights (2-D and up): stored in high precision, so excluded."""
        if self.source is None:
            return []
        return sorted({n.rsplit(".", 1)[0] for n in self.names
                       if n.endswith(".weight") and len(self.source.shape(n)) >= 2})

    def section_names(self) -> list[list[str]]:
        """The carried names as export sections (quantship.export.sections): one per source decoder
        layer (an MTP layer is one section), then the rest; both export paths write them last."""
        by_layer: dict[int, list[str]] = {}
        for name in self.names:
            m = _LAYER.match(name)
            by_layer.setdefault(int(m.group(1)) if m else -1, []).append(name)
        return [by_layer[k] for k in sorted(by_layer, key=lambda k: (k < 0, k))]

    @property
    def num_sections(self) -> int:
        return len(self.section_names())

    def sections(self) -> Iterator[list[tuple[str, Tensor]]]:
        """The carried tensors section by section, each read (dequantized) when its section is due."""
        for names in self.section_names():
            yield [(name, self.source.dequantized(name, self.dtype)) for name in names]

    def summary(self) -> dict:
        mtp = [n for n in self.names if self.is_mtp(n)]
        other = [n for n in self.names if not self.is_mtp(n)]
        return {
            "source": str(self.source.path) if self.source else None,
            "source_format": self.source.format if self.source else None,
            "mtp_layers": list(self.mtp),
            "mtp_tensors": mtp,
            "other_tensors_not_loaded_by_the_model_class": other,
            "dequantized": [n for n in self.names if self.source.is_dequantized(n)] if self.source else [],
            "source_quantization_tensors_replaced": len(self.source.source_scales) if self.source else 0,
            "policy": "carried into the export in high precision and listed in the exclude list",
        }

    def close(self) -> None:
        if self.source is not None:
            self.source.close()

    def write_report(self, directory: Path) -> None:
        if not self.names:
            return
        info = self.summary()
        (directory / "source_extras.json").write_text(json.dumps(info, indent=1))
        lines = ["", "## Source tensors outside the model class", "",
                 f"Carried unchanged in high precision (dequantized from `{info['source_format']}` where stored "
                 "quantized) and their modules listed in the exclude list; see `source_extras.json`.", ""]
        if info["mtp_tensors"]:
            lines.append(f"- MTP layers {info['mtp_layers']}: {len(info['mtp_tensors'])} tensors")
        if info["other_tensors_not_loaded_by_the_model_class"]:
            shown = info["other_tensors_not_loaded_by_the_model_class"]
            lines.append(f"- other tensors the model class ignores ({len(shown)}): "
                         + ", ".join(f"`{n}`" for n in shown[:8]) + (" ..." if len(shown) > 8 else ""))
        report = directory / "report.md"
        report.write_text((report.read_text() if report.is_file() else "# quantship report\n") + "\n".join(lines) + "\n")


def extras_of(source: SourceCheckpoint, model: nn.Module) -> SourceExtras:
    """The tensors of an open `source` that `model` (loaded, or a meta skeleton) does not load; warns
    about those that are not MTP layers. The streaming path calls this with its own reader."""
    loaded = loaded_names(model)
    names = [n for n in source.names() if n not in loaded]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16)
    extras = SourceExtras(source, names, mtp_layers(source.config), dtype)
    other = [n for n in names if not extras.is_mtp(n)]
    if other:
        warnings.warn(f"{len(other)} tensors of {source.path} are not loaded by the model class "
                      f"({', '.join(other[:3])}{' ...' if len(other) > 3 else ''}); they are carried into the "
                      "export unchanged and listed in report.md", stacklevel=2)
    return extras


def find_extras(source_dir: str | Path | None, model: nn.Module) -> SourceExtras:
    """`extras_of` for a folder (nothing without safetensors files); the caller closes the result."""
    if source_dir is None or not any(Path(source_dir).glob("*.safetensors")):
        return SourceExtras()
    try:
        source = SourceCheckpoint(source_dir)
    except QuantshipError as e:
        warnings.warn(f"cannot list the tensors of {source_dir} outside the model class ({e}); "
                      "only the model's own tensors are exported", stacklevel=2)
        return SourceExtras()
    return extras_of(source, model)
