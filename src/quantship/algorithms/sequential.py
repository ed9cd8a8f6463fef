"""Layer-by-layer GPTQ: each decoder layer sees the inputs the already-quantized layers before
it produce, collects one Hessian per weight (per expert for MoE) and is quantized in turn.

`gptq_decoder_layer` handles one layer given its inputs and returns its outputs, so the
streaming path can call it per decoder layer as it loads them; `apply_gptq` is the in-memory
driver that captures the first layer's inputs and walks the layers.

Decision (measured in bench/README.md): with `GPTQConfig.act_quant` (the default) a quantized
Linear's input is fake-quantized with its calibrated input scale both for its Hessian and when
the layer's outputs are propagated, so layer i is fitted to what the served W4A4/W8A8 model
feeds it — the weight multiplies Q(x), not x, at inference.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantship.algorithms.gptq import (
    GPTQConfig,
    HessianAccumulator,
    gptq_quantize,
    objective,
    prepare_hessians,
)
from quantship.algorithms.gptq_formats import GPTQ_FORMATS, GPTQFormat
from quantship.algorithms.gptq_report import TargetResult, gptq_report
from quantship.algorithms.hessian_budget import expert_ranges
from quantship.algorithms.layer_inputs import LayerCalls, capture_layer_inputs, run_layer
from quantship.errors import QuantshipError
from quantship.fake_quant import swapped_weights
from quantship.formats.handlers import FormatHandler
from quantship.model import experts as fused_ops
from quantship.model.discover import FusedExperts, ModelStructure
from quantship.scales import QuantPlan, QuantTarget

# Matrices of one shape are batched through one GPTQ loop; this bounds a batch's float32
# elements (weights + Hessians), so 384 experts do not need 384 Hessians at once.
MAX_BATCH_ELEMENTS = 1 << 28


@dataclass
class _Matrix:
    key: str
    expert: int | None
    weight: Tensor  # [rows, cols]
    hessian: Tensor
    scale: Tensor  # the format's per-matrix scale (fixed before GPTQ)
    rows: dict[str, Tensor] = field(default_factory=dict)  # GPTQ's row tensors for this matrix
    q: Tensor | None = None


class _ExpertActQuant:
    """Activation fake-quant of fused experts' inputs under each expert's input scale: per expert
    (`(x, e)`, the CPU loop) or, where the handler can, for rows of many experts at once
    (`rows(x, expert_of_row)`, the GPU's grouped forward)."""

    def __init__(self, handler: FormatHandler, scales: Tensor):
        self.handler, self.scales = handler, scales
        if not hasattr(handler, "fake_quant_input_rows"):
            self.rows = None

    def __call__(self, x: Tensor, e: int) -> Tensor:
        return self.handler.fake_quant_input(x, self.scales[e])

    def rows(self, x: Tensor, expert: Tensor) -> Tensor:
        return self.handler.fake_quant_input_rows(x, self.scales.to(x.device)[expert])


def _min_tokens(cols: int, config: GPTQConfig) -> int:
    return math.ceil(config.min_tokens_per_dim * cols)


class _LayerObservers:
    """Forward hooks on one layer's targets: activation fake-quant and Hessian collection."""

    def __init__(self, targets: list[QuantTarget], structure: ModelStructure, handler: FormatHandler,
                 config: GPTQConfig):
        self.collecting = True
        self.dense = True  # collect the Linears' Hessians (the first pass over the calibration set)
        self.expert_range: range | None = None  # collect only these experts' Hessians (None: all)
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.patched: list[nn.Module] = []
        self.linear: dict[str, HessianAccumulator] = {}
        self.experts: dict[str, dict[int, HessianAccumulator]] = {}
        modules = {t.name: t.module for t in structure.linears}
        fused = {f"{fe.name}.{p}": fe for fe in structure.fused_experts for p in (fe.gate_up_param, fe.down_param)}
        # Fused siblings (q/k/v, gate/up) are fed one input tensor: fake-quantize it once and
        # accumulate one Hessian for the group. Each member counts its own rows, and
        # `shared_hessian_checked` refuses a group whose members saw different inputs.
        cache: dict[object, tuple[Tensor, Tensor]] = {}
        shared: dict[object, HessianAccumulator] = {}
        self.rows_seen: dict[str, int] = {}
        patched_fused: set[str] = set()
        for t in targets:
            if t.fused_experts:
                fe = fused[t.key]
                if fe.name not in patched_fused:
                    patched_fused.add(fe.name)
                    self._patch_fused(fe, targets, handler, config)
                continue
            group = tuple(t.group) or t.key
            acc = self.linear[t.key] = shared.setdefault(group, HessianAccumulator(t.weight.shape[-1]))
            self.rows_seen[t.key] = 0
            scale = t.scales["input_scale"]

            def hook(_m: nn.Module, args: tuple, acc=acc, scale=scale, group=group, key=t.key):
                x = args[0]
                hit = cache.get(group)
                if hit is not None and hit[0] is x:
                    xq = hit[1]
                else:
                    xq = handler.fake_quant_input(x, scale) if config.act_quant else x
                    cache[group] = (x, xq)
                    if self.collecting and self.dense:
                        acc.add(xq)
                if self.collecting and self.dense:
                    self.rows_seen[key] += x.numel() // x.shape[-1]
                return (xq, *args[1:]) if config.act_quant else None

            self.handles.append(modules[t.key].register_forward_pre_hook(hook))
        self._cache = cache

    def _patch_fused(self, fe: FusedExperts, targets: list[QuantTarget], handler: FormatHandler,
                     config: GPTQConfig) -> None:
        keys = {"gate_up": f"{fe.name}.{fe.gate_up_param}", "down": f"{fe.name}.{fe.down_param}"}
        by_key = {t.key: t for t in targets}
        if not all(k in by_key for k in keys.values()):
            raise QuantshipError(f"fused experts {fe.name}: GPTQ needs both projections quantized")
        scales = {kind: by_key[k].scales["input_scale"] for kind, k in keys.items()}
        cols = {"gate_up": fe.hidden_size, "down": fe.intermediate_size}
        for k in keys.values():
            self.experts[k] = {}

        def observe(kind: str, x: Tensor, e: int) -> None:
            if self.collecting and (self.expert_range is None or e in self.expert_range):
                accs = self.experts[keys[kind]]
                accs.setdefault(e, HessianAccumulator(cols[kind])).add(x)

        def act(kind: str):
            return _ExpertActQuant(handler, scales[kind]) if config.act_quant else None

        def forward(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
            out, _ = fused_ops.fused_experts_forward(fe, hidden, top_k_index, top_k_weights,
                                                     act_quant_gate_up=act("gate_up"), act_quant_down=act("down"),
                                                     on_input=observe)
            return out

        fused_ops.check_supported(fe)
        fe.module.forward = forward
        self.patched.append(fe.module)

    def shared_hessian_checked(self) -> None:
        """Every member of a shared accumulator saw as many rows as it holds (same inputs)."""
        for key, acc in self.linear.items():
            if self.rows_seen[key] != acc.n:
                raise QuantshipError(
                    f"{key} and its fused siblings were fed different inputs ({self.rows_seen[key]} vs {acc.n} rows); "
                    "they cannot share a Hessian — use --algorithm max for this model")

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for m in self.patched:
            del m.forward
        self._cache.clear()


def _matrices(targets: list[QuantTarget], obs: _LayerObservers, fmt: GPTQFormat, config: GPTQConfig,
              results: dict[str, TargetResult]) -> list[_Matrix]:
    """One matrix per Linear and per expert with enough tokens; the rest keep round-to-nearest.
    Takes what `obs` collected in this pass: the Linears if `obs.dense`, the experts in
    `obs.expert_range` (a fused target's result fills in expert range by expert range)."""
    mats = []
    hessians: dict[int, Tensor] = {}
    for t in targets:
        scale = t.scales[fmt.matrix_scale] if fmt.matrix_scale else torch.ones(t.weight.shape[:-2])
        need = _min_tokens(t.weight.shape[-1], config)
        if t.fused_experts:
            accs = obs.experts[t.key]
            n_exp = t.weight.shape[0]
            res = results.setdefault(t.key, TargetResult([0] * n_exp, [False] * n_exp, need))
            for e in obs.expert_range or range(n_exp):
                res.tokens[e] = accs[e].n if e in accs else 0
                res.gptq[e] = res.tokens[e] >= need
                if res.gptq[e]:
                    mats.append(_Matrix(t.key, e, t.weight[e], accs[e].hessian(), scale[e]))
            continue
        if not obs.dense:
            continue
        tokens = [obs.linear[t.key].n]
        ok = [tokens[0] >= need]
        if ok[0]:
            acc = obs.linear[t.key]
            if id(acc) not in hessians:  # one Hessian object per shared accumulator
                hessians[id(acc)] = acc.hessian()
            mats.append(_Matrix(t.key, None, t.weight, hessians[id(acc)], scale))
        results[t.key] = TargetResult(tokens, ok, need)
    return mats


def _run_gptq(mats: list[_Matrix], fmt: GPTQFormat, config: GPTQConfig) -> None:
    """GPTQ every matrix: those sharing a Hessian and scale (fused siblings) as one matrix of
    stacked rows; the distinct Hessians of one width prepared (inverted) in one batched call;
    then same-shaped matrices (experts) through one column kernel or loop."""
    merged: list[list[_Matrix]] = []
    for m in mats:
        for group in merged:
            g = group[0]
            if (g.expert is None and m.expert is None and g.weight.shape[-1] == m.weight.shape[-1]
                    and torch.equal(g.scale, m.scale) and g.hessian is m.hessian):
                group.append(m)
                break
        else:
            merged.append([m])
    by_cols: dict[int, list[list[_Matrix]]] = {}
    for group in merged:
        by_cols.setdefault(group[0].weight.shape[1], []).append(group)
    for cols, groups in by_cols.items():
        chunk: list[list[_Matrix]] = []
        elements = 0
        for group in groups:
            size = sum(m.weight.shape[0] for m in group) * cols + cols * cols
            if chunk and elements + size > MAX_BATCH_ELEMENTS:
                _run_chunk(chunk, fmt, config)
                chunk, elements = [], 0
            chunk.append(group)
            elements += size
        if chunk:
            _run_chunk(chunk, fmt, config)


def _run_chunk(chunk: list[list[_Matrix]], fmt: GPTQFormat, config: GPTQConfig) -> None:
    """Groups of one input width: their distinct Hessians prepared together, then GPTQ per
    row count (one batch each)."""
    hessians: list[Tensor] = []
    slot: dict[int, int] = {}  # id of a group's Hessian -> its index in `hessians`
    for g in chunk:
        h = g[0].hessian
        if id(h) not in slot:
            slot[id(h)] = len(hessians)
            hessians.append(h)
    prepared = prepare_hessians(torch.stack(hessians), config)
    by_rows: dict[int, list[list[_Matrix]]] = {}
    for g in chunk:
        by_rows.setdefault(sum(m.weight.shape[0] for m in g), []).append(g)
    for same in by_rows.values():
        w = torch.stack([torch.cat([m.weight for m in g]) for g in same])
        quantizer = fmt.columns(w, torch.stack([g[0].scale.float() for g in same]), config.nvfp4_scales)
        q = gptq_quantize(w, None, quantizer, config, prepared.select([slot[id(g[0].hessian)] for g in same]))
        row_tensors = quantizer.row_tensors(q)
        for b, g in enumerate(same):
            start = 0
            for m in g:
                end = start + m.weight.shape[0]
                m.rows = {k: v[b, start:end] for k, v in row_tensors.items()}
                m.q = q[b, start:end]
                start = end


@dataclass
class LayerResult:
    outputs: list[Tensor]  # the layer's output per batch, with its quantized weights
    targets: dict[str, TargetResult]
    seconds: dict[str, float]  # "collect" (forward + Hessians), "gptq", "propagate" (forward)


def gptq_decoder_layer(layer: nn.Module, hidden: list[Tensor], run: Callable[[nn.Module, Tensor, int], Tensor],
                       targets: list[QuantTarget], structure: ModelStructure, handler: FormatHandler,
                       config: GPTQConfig) -> LayerResult:
    """Quantize one decoder layer's `targets` with GPTQ; returns the layer's outputs (computed
    with its quantized weights, as the next layer will see them) and a result per target.

    `hidden[b]`: the layer's input for calibration batch b; `run(layer, x, b)` its output for
    input x with batch b's other arguments (mask, rotary embeddings), so the in-memory driver
    and the streaming path (which captures those differently) share this function. The layer's
    parameters are left as they were; the caller stores `TargetResult.rows`.
    """
    fmt = GPTQ_FORMATS.get(handler.name)
    if fmt is None:
        raise QuantshipError(f"--algorithm gptq does not support the {handler.name} format yet; use --algorithm max")
    results: dict[str, TargetResult] = {}
    obs = _LayerObservers(targets, structure, handler, config)
    clock = [time.perf_counter()]
    seconds = {}

    def lap(name: str) -> None:
        _sync(hidden)
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - clock[0]
        clock[0] = now

    ranges = expert_ranges(targets, config, next(layer.parameters()).device)
    errors: dict[str, Tensor] = {}  # key -> [GPTQ, RTN] layer-output error, summed over chunks
    rtn = {t.key: handler.quantize(t.weight, t.scales) for t in targets}  # round-to-nearest, once per target
    done: list[_Matrix] = []
    try:
        for i, experts in enumerate(ranges):  # one pass, unless the experts' Hessians must come in chunks
            obs.collecting, obs.dense, obs.expert_range = True, i == 0, experts
            for b, x in enumerate(hidden):
                run(layer, x, b)
            obs.collecting = False
            if i == 0:
                obs.shared_hessian_checked()
            mats = _matrices(targets, obs, fmt, config, results)
            obs.linear.clear()
            for accs in obs.experts.values():
                accs.clear()
            lap("collect")
            _run_gptq(mats, fmt, config)
            _add_errors(targets, mats, handler, rtn, errors)
            for m in mats:
                m.hessian = None  # this chunk's Hessians are done with
            done += mats
            lap("gptq")
        swaps = _assemble(targets, done, fmt, handler, rtn, results, structure)
        for key, (err_gptq, err_rtn) in errors.items():
            results[key].error_ratio = float(err_gptq / err_rtn.clamp_min(1e-30))
        lap("gptq")
        with swapped_weights(swaps):
            outputs = [run(layer, x, b) for b, x in enumerate(hidden)]
        lap("propagate")
    finally:
        obs.close()
    return LayerResult(outputs, results, seconds)


def _sync(hidden: list[Tensor]) -> None:
    if hidden and hidden[0].is_cuda:
        torch.cuda.synchronize(hidden[0].device)


def _assemble(targets: list[QuantTarget], mats: list[_Matrix], fmt: GPTQFormat, handler: FormatHandler,
              rtn_of: dict[str, dict[str, Tensor]],
              results: dict[str, TargetResult], structure: ModelStructure) -> dict:
    """Each target's GPTQ row tensors (round-to-nearest experts keep theirs), and the dequantized
    weights to run the layer with."""
    params = {f"{t.name}.weight": t.module.weight for t in structure.linears}
    params.update({f"{fe.name}.{p}": getattr(fe.module, p) for fe in structure.fused_experts
                   for p in (fe.gate_up_param, fe.down_param)})
    by_key: dict[str, list[_Matrix]] = {}
    for m in mats:
        by_key.setdefault(m.key, []).append(m)
    swaps = {}
    for t in targets:
        chosen = rtn = rtn_of[t.key]
        res = results[t.key]
        got = by_key.get(t.key, [])
        if got:
            packed = [fmt.pack(m.rows) for m in got]
            if t.fused_experts:
                rows = {k: rtn[k].clone() for k in packed[0]}
                for m, p in zip(got, packed, strict=True):
                    for k, v in p.items():
                        rows[k][m.expert] = v
            else:
                rows = packed[0]
            res.rows = rows
            chosen = handler.quantize(t.weight, {**t.scales, **rows})
        # Every format dequantizes in float32 and then casts: the same values as asking for the dtype.
        param = t.key if t.fused_experts else f"{t.key}.weight"
        swaps[param] = (params[param], handler.dequantize(chosen, t.weight.dtype))
    return swaps


def _add_errors(targets: list[QuantTarget], mats: list[_Matrix], handler: FormatHandler,
                rtn_of: dict[str, dict[str, Tensor]], errors: dict[str, Tensor]) -> None:
    """Add GPTQ's and round-to-nearest's layer-output errors tr(dW H dWᵀ) on `mats` (GPTQ's values
    are `m.q`, which the exported tensors dequantize to bit for bit) to errors[key], one GEMM per
    target; round-to-nearest is dequantized for these matrices only."""
    by_key: dict[str, list[_Matrix]] = {}
    for m in mats:
        by_key.setdefault(m.key, []).append(m)
    for t in targets:
        got = by_key.get(t.key)
        if not got:
            continue
        rtn = rtn_of[t.key]
        if t.fused_experts:
            idx = torch.tensor([m.expert for m in got], device=t.weight.device)
            n_exp = t.weight.shape[0]
            rtn = {k: v.index_select(0, idx.to(v.device)) if v.dim() and v.shape[0] == n_exp else v
                   for k, v in rtn.items()}
            w, hs = t.weight[idx], torch.stack([m.hessian for m in got])
            rtn_w = handler.dequantize(rtn, torch.float32)
        else:
            w, hs = t.weight[None], got[0].hessian[None]
            rtn_w = handler.dequantize(rtn, torch.float32)[None]
        q = torch.stack([m.q for m in got])
        both = objective(torch.cat([w, w], dim=1), torch.cat([q, rtn_w], dim=1), hs,
                         torch.bfloat16 if w.is_cuda else torch.float32, split=w.shape[1])  # see objective()
        pair = torch.stack([both[0].sum(), both[1].sum()])
        errors[t.key] = errors[t.key] + pair if t.key in errors else pair


def _run_with(calls: LayerCalls, layer: nn.Module, x: Tensor, b: int) -> Tensor:
    return run_layer(layer, x, calls, b)


def apply_gptq(model: nn.Module, structure: ModelStructure, plan: QuantPlan,
               batches: Iterable[dict[str, Tensor]], config: GPTQConfig | None = None,
               progress: bool = True) -> dict:
    """GPTQ every planned target, decoder layer by decoder layer; the chosen tensors go into
    `target.scales` under their checkpoint names, which `handler.quantize` returns as they are.
    Returns the report (also `plan.algorithm_report`)."""
    config = config or GPTQConfig()
    hidden, calls = capture_layer_inputs(model, structure, list(batches))
    by_layer: dict[str, list[QuantTarget]] = {name: [] for name, _ in structure.decoder_layers}
    outside = []
    for t in plan.targets:
        layer = next((n for n in by_layer if t.key.startswith(n + ".")), None)
        (by_layer[layer] if layer else outside).append(t)
    results: dict[str, TargetResult] = {}
    timings: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for (name, layer), layer_calls in tqdm(list(zip(structure.decoder_layers, calls, strict=True)),
                                               desc="gptq", unit="layer", disable=not progress):
            run = functools.partial(_run_with, layer_calls)
            done = gptq_decoder_layer(layer, hidden, run, by_layer[name], structure, plan.handler, config)
            hidden = done.outputs
            results.update(done.targets)
            timings[name] = done.seconds
    by_key = {t.key: t for t in plan.targets}
    for key, res in results.items():
        if res.rows is not None:
            by_key[key].scales.update(res.rows)
    report = gptq_report(results, config, [t.key for t in outside], timings)
    plan.algorithm_report = report
    return report
