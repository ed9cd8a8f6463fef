"""From calibration statistics to the scales of every quantized tensor (a `QuantPlan`).

Policy (DESIGN.md, "MoE experts that calibration did not reach"):
- weight scales come from the weight itself;
- input scales come from real activations: routed tokens, plus, for experts under the token
  threshold, all calibration tokens pushed through them;
- fused siblings (q/k/v, gate/up, an expert's w1/w3, MLA's q_a/kv_a) share the global weight
  scale and the input scale (max over the group), as serving engines load them as one GEMM;
- a scale that cannot be computed (no activation ever reached an input) stops with an error.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import Tensor

from quantship.calibration.amax import absmax, per_expert_absmax
from quantship.calibration.observers import CalibrationStats, ExpertCoverage
from quantship.errors import QuantshipError
from quantship.formats.exact import div_const
from quantship.formats.handlers import FORMAT_HANDLERS, FormatHandler
from quantship.model.discover import ModelStructure
from quantship.model.fusion import fused_groups
from quantship.recipes import KVCacheFormat, Recipe


@dataclass
class QuantTarget:
    """One weight tensor to quantize: a Linear's weight, or a fused experts 3-D parameter."""

    key: str  # Linear module name, or the fused parameter's full name
    weight: Tensor
    role: str
    fused_experts: bool
    weight_amax: Tensor  # 0-dim, or [E] for fused experts
    input_amax: Tensor
    group: list[str] = field(default_factory=list)
    # The handler's scales; a weight algorithm (GPTQ) adds the tensors it chose under their
    # checkpoint names ("weight", NVFP4 "weight_scale"), which handler.quantize returns as they are.
    scales: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class QuantPlan:
    recipe: Recipe
    kv_format: KVCacheFormat
    handler: FormatHandler
    targets: list[QuantTarget]
    excluded: dict[str, str]  # module name -> reason it stays in high precision
    kv_scales: dict[str, dict[str, Tensor]]  # attention module -> {"k_scale", "v_scale"}
    coverage: dict[str, ExpertCoverage]
    algorithm_report: dict | None = None  # what a weight algorithm other than max did (report.py)

    def target(self, key: str) -> QuantTarget:
        return next(t for t in self.targets if t.key == key)


def matches_any(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p for p in patterns)


def excluded_modules(structure: ModelStructure, recipe: Recipe, user_patterns: list[str]) -> dict[str, str]:
    """Every weight-bearing module that stays high precision, with the reason."""
    excluded: dict[str, str] = {}
    for t in structure.linears:
        if t.role == "lm_head":
            excluded[t.name] = "lm_head"
        elif t.role == "router":
            excluded[t.name] = "router"
        elif matches_any(t.name, user_patterns):
            excluded[t.name] = "--exclude"
        elif not recipe.quantizes(t.role):
            excluded[t.name] = f"not in recipe {recipe.name}"
    for block in structure.moe_blocks:
        for r in block.router_names:
            excluded.setdefault(r, "router")
        if matches_any(block.experts_name, user_patterns):
            excluded[block.experts_name] = "--exclude"
        elif not recipe.quantizes("expert"):
            excluded[block.experts_name] = f"not in recipe {recipe.name}"
    return excluded


def _check_divisible(key: str, weight: Tensor, handler: FormatHandler) -> None:
    if handler.block_size and weight.shape[-1] % handler.block_size:
        raise QuantshipError(
            f"{key} has input dimension {weight.shape[-1]}, not divisible by {handler.block_size} as "
            f"{handler.name} needs; keep it in high precision with --exclude '{key}'"
        )


def _resolved_input_amax(key: str, stats: CalibrationStats, fallback: Tensor | None) -> Tensor:
    """Routed amax, raised to the all-token amax where the expert had too few routed tokens."""
    routed = stats.routed_amax.get(key)
    extra = stats.fallback_amax.get(key)
    if fallback is not None and extra is not None:
        extra = torch.where(fallback.to(extra.device), extra, torch.zeros_like(extra))
        routed = extra if routed is None else torch.maximum(routed, extra)
    if routed is None:
        raise QuantshipError(
            f"no calibration activation reached {key}, so its input scale cannot be computed; "
            f"check that calibration runs this module, or keep it in high precision with --exclude '{key}'"
        )
    bad = ~torch.isfinite(routed) | (routed <= 0)
    if bad.any():
        where = f" (experts {bad.nonzero().flatten().tolist()[:10]})" if routed.dim() else ""
        raise QuantshipError(
            f"input amax of {key} is zero, NaN or inf{where}; the calibration data gives no usable scale — "
            "raise --moe-min-tokens (all-token fallback for experts), use more calibration text, or --exclude the module"
        )
    return routed


def _expert_index_of(name: str, experts_name: str) -> int | None:
    rest = name[len(experts_name) + 1 :] if name.startswith(experts_name + ".") else ""
    head = rest.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def build_plan(structure: ModelStructure, recipe: Recipe, kv_format: KVCacheFormat, stats: CalibrationStats,
               excluded: dict[str, str]) -> QuantPlan:
    handler = FORMAT_HANDLERS[recipe.weight_format]
    targets: list[QuantTarget] = []
    coverage_of_block = {b.experts_name: stats.coverage.get(b.name) for b in structure.moe_blocks}

    for t in structure.linears:
        if t.name in excluded or not recipe.quantizes(t.role) or any(
            t.name.startswith(e + ".") for e in excluded
        ):
            continue
        _check_divisible(t.name, t.module.weight, handler)
        fallback = None
        for experts_name, cov in coverage_of_block.items():
            e = _expert_index_of(t.name, experts_name)
            if e is not None and cov is not None:
                fallback = cov.fallback[e]
        w = t.module.weight.detach()
        targets.append(QuantTarget(t.name, w, t.role, False, absmax(w),
                                   _resolved_input_amax(t.name, stats, fallback)))

    for block in structure.moe_blocks:
        fe = block.fused
        if fe is None or block.experts_name in excluded:
            continue
        cov = stats.coverage[block.name]
        for param in (fe.gate_up_param, fe.down_param):
            key = f"{fe.name}.{param}"
            w = getattr(fe.module, param).detach()
            _check_divisible(key, w, handler)
            targets.append(QuantTarget(key, w, "expert", True, per_expert_absmax(w),
                                       _resolved_input_amax(key, stats, cov.fallback)))

    _share_within_fused_groups(targets)
    for t in targets:
        if not torch.isfinite(t.weight_amax).all():
            raise QuantshipError(f"the source weight {t.key} contains NaN or inf; fix or re-export the source model")
        t.scales = handler.scales(t.weight_amax, t.input_amax)

    kv_scales: dict[str, dict[str, Tensor]] = {}
    if kv_format.quant_algo:
        for attn, amax in stats.kv_amax.items():
            if not all(torch.isfinite(v) and v > 0 for v in amax.values()):
                raise QuantshipError(f"KV cache amax of {attn} is zero or not finite; use more calibration text")
            # DESIGN.md: k_scale / v_scale = amax / 448 for both FP8 and NVFP4 KV caches, rounded
            # once on every device (CUDA's `x / 448.0` multiplies by a rounded reciprocal).
            kv_scales[attn] = {"k_scale": div_const(amax["k"], 448.0), "v_scale": div_const(amax["v"], 448.0)}
        missing = [n for n, _ in structure.attention_modules if n not in kv_scales]
        if missing:
            raise QuantshipError(f"no calibration activation reached the attention of {missing[0]}; cannot set its KV scales")
    return QuantPlan(recipe, kv_format, handler, targets, excluded, kv_scales, stats.coverage)


def _share_within_fused_groups(targets: list[QuantTarget]) -> None:
    """Fused siblings get the group max of weight amax and input amax."""
    by_key = {t.key: t for t in targets if not t.fused_experts}
    for group in fused_groups(list(by_key)):
        members = [by_key[k] for k in group]
        w = torch.stack([m.weight_amax for m in members]).amax(0)
        x = torch.stack([m.input_amax for m in members]).amax(0)
        for m in members:
            m.weight_amax, m.input_amax, m.group = w, x, list(group)
