"""Find what to quantize in a Hugging Face causal LM, by structure rather than class name.

The one place that knows model shapes (STYLE 8). It recognises:
- decoder layers: the `nn.ModuleList` with `config.num_hidden_layers` entries;
- attention modules: modules that carry `is_causal` (every HF decoder attention, remote code
  included) and own linears;
- MoE blocks: a module whose child is an experts container — either transformers >= 5 fused
  3-D expert tensors (`[E, 2I, H]` gate-up and `[E, H, I]` down) or a `ModuleList` of per-expert
  MLPs — next to a router whose weight has one row per expert;
- every `nn.Linear`, classified by role: attention, mlp, shared_expert, expert, router,
  lm_head, other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quantship.errors import QuantshipError

SUPPORTED_ARCHITECTURES = (
    "Llama, Qwen2, Qwen3, Gemma 3 (dense); Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V3 / Kimi-K2 (MoE, "
    "fused 3-D experts or one Linear per expert)"
)

ROLES = ("attention", "mlp", "shared_expert", "expert", "router", "lm_head", "other")


@dataclass
class LinearTarget:
    """One `nn.Linear` and the role it plays in its decoder layer."""

    name: str
    module: nn.Linear
    role: str


@dataclass
class FusedExperts:
    """transformers >= 5 fused expert tensors: `gate_up [E, 2I, H]`, `down [E, H, I]`."""

    name: str
    module: nn.Module
    gate_up_param: str
    down_param: str
    num_experts: int
    hidden_size: int
    intermediate_size: int

    @property
    def gate_up(self) -> torch.Tensor:
        return getattr(self.module, self.gate_up_param)

    @property
    def down(self) -> torch.Tensor:
        return getattr(self.module, self.down_param)


@dataclass
class MoEBlock:
    """A sparse MoE block: router plus routed experts (plus shared experts, if any)."""

    name: str
    module: nn.Module
    experts_name: str
    num_experts: int
    fused: FusedExperts | None = None
    expert_modules: list[nn.Module] = field(default_factory=list)  # ModuleList layout
    router_names: list[str] = field(default_factory=list)


@dataclass
class ModelStructure:
    """Everything later steps need to know about the model's shape."""

    model_type: str
    decoder_layers: list[tuple[str, nn.Module]]
    linears: list[LinearTarget]
    moe_blocks: list[MoEBlock]
    attention_modules: list[tuple[str, nn.Module]]

    @property
    def fused_experts(self) -> list[FusedExperts]:
        return [b.fused for b in self.moe_blocks if b.fused is not None]

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_blocks)


def _decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if n_layers is None and hasattr(model.config, "get_text_config"):
        n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers:
            return [(f"{name}.{i}", layer) for i, layer in enumerate(module)]
    return []


def _as_fused_experts(name: str, module: nn.Module) -> FusedExperts | None:
    """Recognise fused experts by their two 3-D parameters' shapes, whatever they are called."""
    params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
    if len(params) != 2:
        return None
    for (gu_name, gu), (d_name, d) in (params, params[::-1]):
        n_exp, two_i, hidden = gu.shape
        if d.shape[0] == n_exp and d.shape[1] == hidden and 2 * d.shape[2] == two_i:
            return FusedExperts(name, module, gu_name, d_name, n_exp, hidden, d.shape[2])
    return None


def _is_expert_list(module: nn.Module) -> bool:
    """A ModuleList of >= 2 same-class MLPs that own linears (one Linear per expert layout)."""
    if not isinstance(module, nn.ModuleList) or len(module) < 2:
        return False
    first = type(module[0])
    return all(type(m) is first for m in module) and any(
        isinstance(c, nn.Linear) for c in module[0].children()
    )


def _router_names(block_name: str, block: nn.Module, experts_name: str, n_experts: int) -> list[str]:
    """Direct children of the block, other than the experts, whose own weight has one row per
    expert (the router), or a single row (Qwen2-MoE's shared_expert_gate). Shared-expert MLPs
    are containers without a weight of their own, so they never match."""
    names = []
    for child_name, child in block.named_children():
        full = f"{block_name}.{child_name}"
        weight = getattr(child, "weight", None)
        if full == experts_name or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if weight.shape[0] == n_experts or (isinstance(child, nn.Linear) and weight.shape[0] == 1):
            names.append(full)
    return names


def _find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    blocks = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            fused = _as_fused_experts(full, child)
            if fused is not None:
                block = MoEBlock(name, module, full, fused.num_experts, fused=fused)
            elif _is_expert_list(child):
                block = MoEBlock(name, module, full, len(child), expert_modules=list(child))
            else:
                continue
            block.router_names = _router_names(name, module, full, block.num_experts)
            if any(r for r in block.router_names):
                blocks.append(block)
    return blocks


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        if hasattr(module, "is_causal") and any(isinstance(c, nn.Linear) for c in module.children()):
            found.append((name, module))
    return found


def _classify(
    name: str,
    lm_head: nn.Module | None,
    module: nn.Module,
    layer_prefixes: list[str],
    attention: list[str],
    blocks: list[MoEBlock],
) -> str:
    def under(prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    if module is lm_head:
        return "lm_head"
    for block in blocks:
        if name in block.router_names:
            return "router"
        if under(block.experts_name):
            return "expert"
        if under(block.name):
            return "shared_expert"
    if any(under(a) for a in attention):
        return "attention"
    if any(under(p) for p in layer_prefixes):
        return "mlp"
    return "other"


def discover(model: nn.Module) -> ModelStructure:
    """Describe the model's quantizable structure, or explain why it is not supported."""
    layers = _decoder_layers(model)
    if not layers:
        raise QuantshipError(
            f"unsupported model type {getattr(model.config, 'model_type', type(model).__name__)!r}: "
            f"no decoder-layer list found; supported: {SUPPORTED_ARCHITECTURES}"
        )
    blocks = _find_moe_blocks(model)
    attention = _attention_modules(model)
    attention_names = [n for n, _ in attention]
    layer_prefixes = [n for n, _ in layers]
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [
        LinearTarget(n, m, _classify(n, lm_head, m, layer_prefixes, attention_names, blocks))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    if not any(t.role in ("attention", "mlp", "expert", "shared_expert") for t in linears) and not blocks:
        raise QuantshipError(
            f"unsupported model type {model.config.model_type!r}: no attention or MLP linears found in its "
            f"decoder layers; supported: {SUPPORTED_ARCHITECTURES}"
        )
    return ModelStructure(
        model_type=getattr(model.config, "model_type", "unknown"),
        decoder_layers=layers,
        linears=linears,
        moe_blocks=blocks,
        attention_modules=attention,
    )
