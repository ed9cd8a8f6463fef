"""An export's tensors as *sections* — everything outside the decoder layers, then each decoder
layer in order — and the shard writer both export paths share.

Why sections: the streaming path (`quantship.streaming`) holds one decoder layer at a time, so it
can only write layer by layer. The in-memory path (`QuantizedModel.export`) writes in the same
order through the same `SectionShardWriter`, so both produce the same shard files byte for byte
(safetensors lays a file out by dtype and name, so only *which* tensors share a shard matters).

Shard policy (deterministic, the same for both paths): a section that does not fit in the open
shard starts a new one; a section larger than the shard limit is cut at tensor boundaries and
closes its last shard. So for big models every layer ends on a shard boundary and nothing is
left pending between layers (what makes a killed streaming run resumable without rewriting).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from quantship.export import modelopt_hf
from quantship.export.safetensors_raw import canonical_metadata_order  # noqa: F401 (re-exported)
from quantship.export.shards import ShardWriter
from quantship.formats.handlers import FormatHandler
from quantship.model.checkpoint_names import checkpoint_slices, checkpoint_state_dict
from quantship.model.discover import ModelStructure
from quantship.scales import QuantPlan, QuantTarget

if TYPE_CHECKING:
    from quantship.pipeline import QuantizedModel

OUTSIDE = ""  # the section of everything not under a decoder layer (embeddings, final norm, lm_head)
# Fused experts are quantized a few experts at a time (the float32 intermediates of one whole
# [E, 2I, H] tensor would be 4x its bf16 size); block-wise formats make that bit-identical.
QUANT_CHUNK_BYTES = 256 * 1024**2

Items = list[tuple[str, Tensor]]


def layer_sections(structure: ModelStructure) -> list[str]:
    """The section names in export order: OUTSIDE, then every decoder layer's module name."""
    return [OUTSIDE, *(name for name, _ in structure.decoder_layers)]


def section_of(name: str, layers: set[str]) -> str:
    """The decoder layer `name` (a module or parameter name) lies under, or OUTSIDE."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix
    return OUTSIDE


def _param_name(t: QuantTarget) -> str:
    return t.key if t.fused_experts else f"{t.key}.weight"


def _expert_chunk(t: QuantTarget, e0: int, e1: int) -> dict[str, Tensor]:
    n = t.weight.shape[0]
    return {k: v[e0:e1] if v.dim() and v.shape[0] == n else v for k, v in t.scales.items()}


def _on_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A quantized chunk leaves the GPU in one copy per tensor, not one per expert and slice: a
    GPU model's section is collected on the CPU before it is written, and ~12k small copies
    (128 experts x 3 projections x 4 tensors x 8 layers) each cost a launch and a sync."""
    return {k: v.cpu() for k, v in tensors.items()}


def target_tensors(model: nn.Module, t: QuantTarget, handler: FormatHandler,
                   chunk_bytes: int = QUANT_CHUNK_BYTES) -> Iterator[tuple[str, Tensor]]:
    """One quantized target's checkpoint tensors (per expert for fused experts), quantized a
    chunk of experts at a time. Order: by expert, then transformers' reverse-conversion order."""
    slices = checkpoint_slices(model, _param_name(t), t.weight.shape)
    if not t.fused_experts:
        yield from modelopt_hf.split_module_tensors(_on_cpu(handler.quantize(t.weight, t.scales)), slices, handler)
        return
    n_exp = t.weight.shape[0]
    per_expert = t.weight[0].numel() * t.weight.element_size()
    step = max(1, chunk_bytes // max(per_expert, 1))
    by_expert: dict[int, list] = {}
    for sl in slices:
        by_expert.setdefault(sl.expert, []).append(sl)
    for e0 in range(0, n_exp, step):
        e1 = min(n_exp, e0 + step)
        q = _on_cpu(handler.quantize(t.weight[e0:e1], _expert_chunk(t, e0, e1)))
        for e in range(e0, e1):
            local = [type(sl)(sl.name, sl.expert - e0, sl.rows) for sl in by_expert.get(e, [])]
            yield from modelopt_hf.split_module_tensors(q, local, handler)


def section_tensors(model: nn.Module, plan: QuantPlan, section: str, state: dict[str, Tensor],
                    layers: set[str]) -> Items:
    """Every export tensor of one section under its checkpoint name: quantized targets, the
    high-precision rest of `state` (the section's parameters and persistent buffers), KV scales."""
    items: Items = []
    quantized_params = set()
    for t in plan.targets:
        if section_of(t.key, layers) == section:
            quantized_params.add(_param_name(t))
            items.extend(target_tensors(model, t, plan.handler))
    seen_storage: set[int] = set()
    rest = {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in state.items():
        if name in quantized_params:
            continue
        ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() and ptr in seen_storage and tied:
            continue  # a tied copy (lm_head = embed_tokens); save_pretrained drops it too
        seen_storage.add(ptr)
        rest[name] = tensor
    items.extend(checkpoint_state_dict(model, rest).items())
    for attn, scales in plan.kv_scales.items():
        if section_of(attn, layers) == section:
            items.append((f"{attn}.k_proj.k_scale", scales["k_scale"].float().reshape(())))
            items.append((f"{attn}.v_proj.v_scale", scales["v_scale"].float().reshape(())))
    return items


def model_sections(qm: QuantizedModel) -> Iterator[Items]:
    """The in-memory model's export tensors, section by section (see the module docstring)."""
    sections = layer_sections(qm.structure)
    layers = set(sections[1:])
    grouped: dict[str, dict[str, Tensor]] = {s: {} for s in sections}
    for name, tensor in qm.model.state_dict(keep_vars=False).items():
        grouped[section_of(name, layers)][name] = tensor
    for section in sections:
        yield section_tensors(qm.model, qm.plan, section, grouped.pop(section), layers)


def nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class SectionShardWriter(ShardWriter):
    """`ShardWriter` plus whole sections: the shard policy of the module docstring."""

    def add_section(self, items: Iterable[tuple[str, Tensor]]) -> None:
        items = list(items)
        size = sum(nbytes(t) for _, t in items)
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        for name, tensor in items:
            self.add(name, tensor)
        if size > self.max_shard_bytes:
            self._flush()

    # --- state for a resumable writer (quantship.streaming.journal) -----------------------
    @property
    def pending(self) -> dict[str, torch.Tensor]:
        return self._pending

    def state(self) -> dict:
        """The shards written so far (on disk once this returns) and the byte count."""
        self.wait()
        return {"shards": [list(s) for s in self._shards], "total_bytes": self.total_bytes}

    def restore(self, state: dict, pending: dict[str, Tensor]) -> None:
        """Continue from `state()` saved earlier (its shard files already in the directory),
        with the tensors that were pending then, in their original order."""
        self._shards = [list(s) for s in state["shards"]]
        self.total_bytes = state["total_bytes"]
        self._seen = {n for s in self._shards for n in s} | set(pending)
        self._pending = dict(pending)
        self._pending_bytes = sum(nbytes(t) for t in pending.values())
