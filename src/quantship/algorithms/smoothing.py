"""Per-input-channel smoothing before calibration: AWQ-lite (`awq.py`) and SmoothQuant
(`smoothquant.py`), applied to the model in place, the way Model Optimizer 0.47 leaves a model
for export (`export/unified_export_hf.py` `requantize_resmooth_fused_llm_layers`,
`export/quant_utils.py` `preprocess_linear_fusion`, `fuse_prequant_layernorm`).

Steps, each Model Optimizer's:
1. statistics pass(es) over the calibration batches, then one `pre_quant_scale` p per linear;
2. the weight becomes `W / p` (float32 math, back to the model dtype), p is kept in the dtype;
3. linears reading the same input (q/k/v, gate/up; for AWQ also one projection across all
   ModuleList experts of a block) share one p, the mean of theirs, weights rescaled by old/new;
4. AWQ only: where a norm's output feeds exactly one such group, p is folded into the norm's
   weight (`w * p`, or `(1 + w) * p - 1` for norms computing `1 + w`, whichever reproduces the
   norm's output times p) and the linears carry none;
5. every other p is multiplied into the linear's input by a forward pre-hook, so the model keeps
   computing what it did, calibration sees the smoothed activations, and the export writes the
   p as `pre_quant_scale`.
Fused 3-D experts (transformers >= 5) and linears calibration never reached get p = 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantship.algorithms import awq, smoothquant
from quantship.model.discover import ModelStructure
from quantship.model.fusion import fused_groups
from quantship.recipes import Recipe

PQS = "pre_quant_scale"
ALGORITHMS = ("awq_lite", "smoothquant")


@dataclass
class Smoothing:
    """What smoothing did: the `pre_quant_scale` each target keeps (target key -> tensor in the
    model dtype; `[E, in]` for fused experts), the norms scales were folded into, the hooks."""

    algorithm: str
    pre_quant_scales: dict[str, Tensor] = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)  # linear -> norm its scale went into
    handles: list = field(default_factory=list)

    def attach_to_plan(self, plan) -> None:
        """Give every planned target that keeps a scale its `pre_quant_scale` (exported by the handler)."""
        for t in plan.targets:
            if t.key in self.pre_quant_scales:
                t.scales[PQS] = self.pre_quant_scales[t.key]


def _forward(model: nn.Module, batches: list[dict], desc: str, progress: bool) -> None:
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            model(**inputs, use_cache=False)


def _targets(structure: ModelStructure, recipe: Recipe, excluded: set[str]) -> dict[str, nn.Linear]:
    def skipped(name: str) -> bool:
        return name in excluded or any(name.startswith(e + ".") for e in excluded)

    return {t.name: t.module for t in structure.linears if recipe.quantizes(t.role) and not skipped(t.name)}


@dataclass
class _Trace:
    """Which linears read the same tensor, and which norm produced it (one short forward)."""

    input_of: dict[str, int] = field(default_factory=dict)  # linear -> storage id of its input
    consumers: dict[int, set[str]] = field(default_factory=dict)  # storage -> leaf modules reading it
    norm_of: dict[int, tuple[str, Tensor, Tensor]] = field(default_factory=dict)  # storage -> (norm, in, out)


def _is_norm_candidate(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (isinstance(w, nn.Parameter) and w.dim() == 1 and not isinstance(module, nn.Embedding)
            and not list(module.children()))


def _trace(model: nn.Module, targets: dict[str, nn.Linear], batch: dict) -> _Trace:
    trace, keep, handles = _Trace(), [], []
    leaves = {n: m for n, m in model.named_modules() if not list(m.children())}

    def pre(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], Tensor):
                keep.append(args[0])  # held so no later tensor reuses its storage during the trace
                ptr = args[0].untyped_storage().data_ptr()
                trace.consumers.setdefault(ptr, set()).add(name)
                if name in targets:
                    trace.input_of.setdefault(name, ptr)
        return hook

    def post(name: str):
        def hook(_m: nn.Module, args: tuple, out: object) -> None:
            if isinstance(out, Tensor) and args and isinstance(args[0], Tensor) and out.shape == args[0].shape:
                keep.append(out)
                trace.norm_of.setdefault(out.untyped_storage().data_ptr(), (name, args[0].detach(), out.detach()))
        return hook

    for name, m in leaves.items():
        handles.append(m.register_forward_pre_hook(pre(name)))
        if _is_norm_candidate(m):
            handles.append(m.register_forward_hook(post(name)))
    short = {k: v[:1, :16] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    try:
        _forward(model, [short], "trace", progress=False)
    finally:
        for h in handles:
            h.remove()
    return trace


class _UnionFind:
    def __init__(self, names: Iterable[str]):
        self.parent = {n: n for n in names}

    def find(self, n: str) -> str:
        while self.parent[n] != n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, names: list[str]) -> None:
        for other in names[1:]:
            self.parent[self.find(other)] = self.find(names[0])

    def groups(self) -> list[list[str]]:
        out: dict[str, list[str]] = {}
        for n in self.parent:
            out.setdefault(self.find(n), []).append(n)
        return list(out.values())


def _groups(targets: dict[str, nn.Linear], trace: _Trace, structure: ModelStructure, across_experts: bool
            ) -> list[list[str]]:
    uf = _UnionFind(targets)
    by_input: dict[int, list[str]] = {}
    for name, ptr in trace.input_of.items():
        by_input.setdefault(ptr, []).append(name)
    for names in [*by_input.values(), *fused_groups(list(targets))]:
        uf.union([n for n in names if n in targets])
    if across_experts:  # Model Optimizer averages each projection over a block's experts (AWQ)
        for block in structure.moe_blocks:
            by_leaf: dict[str, list[str]] = {}
            for name in targets:
                if name.startswith(block.experts_name + "."):
                    by_leaf.setdefault(name.rpartition(".")[2], []).append(name)
            for names in by_leaf.values():
                uf.union(names)
    return uf.groups()


# --------------------------------------------------------------------------- statistics and scales


@dataclass
class _Stats:
    x_sum: Tensor | None = None  # sum over forward calls of the per-call mean |x| per channel
    x_amax: Tensor | None = None  # per-channel |x| max
    calls: int = 0


def _collect(model: nn.Module, targets: dict[str, nn.Linear], batches: list[dict], progress: bool
             ) -> dict[str, _Stats]:
    stats = {n: _Stats() for n in targets}

    def hook(name: str):
        def pre(_m: nn.Module, args: tuple) -> None:
            x = args[0]
            if x.numel() == 0:
                return
            s = stats[name]
            mean = awq.act_scale(x).cpu()
            amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float().cpu()
            s.x_sum = mean if s.x_sum is None else s.x_sum + mean
            s.x_amax = amax if s.x_amax is None else torch.maximum(s.x_amax, amax)
            s.calls += 1
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        _forward(model, batches, "smoothing statistics", progress)
    finally:
        for h in handles:
            h.remove()
    return stats


def _awq_scales(model: nn.Module, targets: dict[str, nn.Linear], stats: dict[str, _Stats], weight_format: str,
                batches: list[dict], progress: bool) -> dict[str, Tensor]:
    block, fake_quant = awq.search_quantizer(weight_format)
    searches: dict[str, awq.AWQSearch] = {}
    for name, m in targets.items():
        s = stats[name]
        if s.calls and m.weight.shape[-1] % block == 0:
            searches[name] = awq.AWQSearch(m.weight.detach(), (s.x_sum / s.calls).to(m.weight.device), block, fake_quant)

    def hook(name: str):
        def pre(m: nn.Module, args: tuple) -> None:
            searches[name].observe(args[0], m.bias)
        return pre

    handles = [targets[n].register_forward_pre_hook(hook(n)) for n in searches]
    try:
        _forward(model, batches, "awq search", progress)
    finally:
        for h in handles:
            h.remove()
    ones = {n: torch.ones(m.weight.shape[-1]) for n, m in targets.items()}
    return {**ones, **{n: s.pre_quant_scale().cpu() for n, s in searches.items()}}


# --------------------------------------------------------------------------- applying scales


@torch.no_grad()
def _scale_weight(m: nn.Linear, factor: Tensor, divisor: Tensor | None = None) -> None:
    """`W * factor (/ divisor)` per input channel in float32, in that order, back to the weight's
    dtype (Model Optimizer's `_apply_weight_pre_quant_scale` / `_update_pre_quant_scale`)."""
    w = m.weight
    out = w.float() * factor.float().to(w.device)[None, :]
    if divisor is not None:
        out = out / divisor.float().to(w.device)[None, :]
    w.data = out.to(w.dtype)


@torch.no_grad()
def _fold_into_norm(norm: nn.Module, x: Tensor, y: Tensor, pqs: Tensor) -> bool:
    """Scale the norm's weight so its output becomes `y * pqs`; True if one of the two
    parametrizations reproduces that (bf16 tolerance), else the norm is left untouched."""
    w, bias = norm.weight, getattr(norm, "bias", None)
    p = pqs.to(w.device)
    expected = y.float() * p.float()
    scale = expected.abs().amax().clamp_min(1e-6)
    best, best_err = None, float("inf")
    for candidate in ((w * p).to(w.dtype), ((w.float() + 1.0) * p.float() - 1.0).to(w.dtype)):
        old = w.data
        w.data = candidate
        saved_bias = bias.data if bias is not None else None
        if bias is not None:
            bias.data = (bias * p).to(bias.dtype)
        err = ((norm(x).float() - expected).abs().amax() / scale).item()
        w.data = old
        if bias is not None:
            bias.data = saved_bias
        if err < best_err:
            best, best_err = candidate, err
    if best_err > 2e-2:
        return False
    w.data = best
    if bias is not None:
        bias.data = (bias * p).to(bias.dtype)
    return True


def _pre_hook(pqs: Tensor):
    def hook(_m: nn.Module, args: tuple) -> tuple:
        return (args[0] * pqs.to(args[0].device, args[0].dtype), *args[1:])
    return hook


def smooth(model: nn.Module, structure: ModelStructure, recipe: Recipe, excluded: set[str], batches: list[dict],
           progress: bool = True) -> Smoothing | None:
    """Run the recipe's smoothing algorithm on `model` in place (module docstring); None for
    recipes without one."""
    if recipe.algorithm is None:
        return None
    if recipe.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown smoothing algorithm {recipe.algorithm!r}")
    is_awq = recipe.algorithm == "awq_lite"
    targets = _targets(structure, recipe, excluded)
    result = Smoothing(recipe.algorithm)
    if targets and batches:
        trace = _trace(model, targets, batches[0])
        stats = _collect(model, targets, batches, progress)
        if is_awq:
            raw = _awq_scales(model, targets, stats, recipe.weight_format, batches, progress)
        else:
            raw = {n: smoothquant.smoothquant_scale(m.weight.detach(), stats[n].x_amax) for n, m in targets.items()}
        pqs: dict[str, Tensor] = {}
        for name, m in targets.items():  # step 2
            p = raw[name].float()
            _scale_weight(m, 1.0 / p)
            pqs[name] = p.to(m.weight.dtype)
        for group in _groups(targets, trace, structure, across_experts=is_awq):  # step 3
            avg = torch.stack([pqs[n] for n in group]).mean(0)
            for n in group:
                if not torch.equal(pqs[n], avg):
                    _scale_weight(targets[n], pqs[n], avg)
                    pqs[n] = avg
            ptr = trace.input_of.get(group[0])
            norm = trace.norm_of.get(ptr) if ptr is not None else None
            if (is_awq and norm is not None and all(trace.input_of.get(n) == ptr for n in group)
                    and trace.consumers.get(ptr, set()) <= set(group)):  # step 4
                norm_name, x, y = norm
                if _fold_into_norm(model.get_submodule(norm_name), x, y, avg):
                    for n in group:
                        result.folded[n] = norm_name
                        del pqs[n]
        for name, p in pqs.items():  # step 5
            result.handles.append(targets[name].register_forward_pre_hook(_pre_hook(p)))
            result.pre_quant_scales[name] = p
    for fe in structure.fused_experts:  # neutral scales, as Model Optimizer's for unreached experts
        if recipe.quantizes("expert") and fe.name not in excluded and not any(
                fe.name.startswith(e + ".") for e in excluded):
            for param in (fe.gate_up_param, fe.down_param):
                w = getattr(fe.module, param)
                result.pre_quant_scales[f"{fe.name}.{param}"] = torch.ones(w.shape[0], w.shape[-1], dtype=w.dtype)
    return result
