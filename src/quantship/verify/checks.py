"""The checks over a checkpoint's tensors: per quantized module (present, dtype, shape, values),
exclusions, fused-sibling scale sharing, KV-cache scales.

Structure is judged from safetensors headers; only scale tensors are read, never weights.
"""

from pathlib import Path

import torch

from quantship.model.fusion import fused_group_of, fused_groups
from quantship.verify.config import Declared
from quantship.verify.result import Finding
from quantship.verify.scale_shapes import shape_problem
from quantship.verify.specs import (
    FLOAT_WEIGHT_DTYPES,
    KV_SPECS,
    MODELOPT,
    QUANT_PARAM_NAMES,
    QUANT_WEIGHT_DTYPES,
    AlgoSpec,
    ScaleSpec,
    dtype_name,
    is_projection,
)
from quantship.verify.tensors import TensorInfo, load

Params = dict[str, TensorInfo]  # a module's tensors by leaf name ("weight", "input_scale", ...)
KV_LEAVES = ("k_scale", "v_scale")


def modules_of(infos: dict[str, TensorInfo]) -> dict[str, Params]:
    out: dict[str, Params] = {}
    for name, info in infos.items():
        module, _, leaf = name.rpartition(".")
        out.setdefault(module, {})[leaf] = info
    return out


def is_quantized(params: Params) -> bool:
    """A module is quantized if it carries any quantization tensor or a quantized-dtype weight."""
    weight = params.get("weight")
    return any(p in QUANT_PARAM_NAMES for p in params) or (
        weight is not None and weight.dtype in QUANT_WEIGHT_DTYPES
    )


def check_checkpoint(root: Path, infos: dict[str, TensorInfo], d: Declared, spec: AlgoSpec | None):
    """Every tensor check; returns (quantized module names, findings)."""
    modules = modules_of(infos)
    quantized = sorted(m for m, params in modules.items() if is_quantized(params))
    findings = check_exclusions(modules, quantized, d)
    if spec is None:  # unknown algorithm: already a finding; nothing to check tensors against
        return quantized, findings
    to_read: list[str] = []  # scales whose headers are right: their values are checked next
    for m in quantized:
        module_findings, module_reads = check_module(m, modules[m], spec, d)
        findings += module_findings
        to_read += [f"{m}.{p}" for p in module_reads]
    kv_findings, kv_reads = check_kv(infos, modules, d)
    findings += kv_findings
    value_findings, scalars = check_values(root, infos, [*to_read, *kv_reads])
    findings += value_findings
    findings += check_fused(quantized, scalars, spec)
    findings += check_fused_mixed(modules, quantized)
    return quantized, findings


def check_module(module: str, params: Params, spec: AlgoSpec, d: Declared) -> tuple[list[Finding], list[str]]:
    """One quantized module from its headers; returns findings and the scales to read."""
    findings = []
    required = [spec.weight, *(s for s in spec.scales if d.static_inputs or s != spec.input_scale)]
    have = ", ".join(sorted(p for p in params if p in QUANT_PARAM_NAMES or p == spec.weight))
    for p in required:
        if p not in params:
            findings.append(Finding(f"{module}.{p}", f"missing; the module is quantized (has {have})"))
    for p in sorted(params):
        # e.g. weight_scale_2 in compressed-tensors, or a `weight` beside `weight_packed`
        if (p in QUANT_PARAM_NAMES or p == "weight") and p not in spec.names:
            findings.append(
                Finding(f"{module}.{p}", f"not a tensor of a {d.layout} {d.quant_algo} checkpoint")
            )

    weight = params.get(spec.weight)
    in_features = None
    if weight is not None:
        problems = _weight_problems(weight, spec)
        findings += [Finding(f"{module}.{spec.weight}", p) for p in problems]
        if not problems:
            in_features = weight.shape[-1] * (2 if spec.packed else 1)
            if spec.packed and in_features % (d.group_size or 1):
                findings.append(
                    Finding(
                        f"{module}.{spec.weight}",
                        f"{in_features} inputs, not a multiple of group_size {d.group_size}",
                    )
                )
                in_features = None

    reads = []
    for p, scale in {**spec.scales, **spec.optional}.items():  # optional: checked when present
        if p in params:
            problems = _scale_problems(params[p], scale, weight if in_features else None, in_features, d)
            findings += [Finding(f"{module}.{p}", problem) for problem in problems]
            if not problems:
                reads.append(p)
    return findings, reads


def _weight_problems(w: TensorInfo, spec: AlgoSpec) -> list[str]:
    if w.dtype != spec.weight_dtype:
        return [f"dtype {dtype_name(w.dtype)}, expected {dtype_name(spec.weight_dtype)}"]
    if len(w.shape) < 2:
        return [f"shape {list(w.shape)}, expected [out, in{'/2' if spec.packed else ''}]"]
    return []


def _is_one(info: TensorInfo) -> bool:
    return info.numel == 1 and len(info.shape) <= 1


def _scale_problems(
    info: TensorInfo, scale: ScaleSpec, weight: TensorInfo | None, in_features: int | None, d: Declared
) -> list[str]:
    if info.dtype not in scale.dtypes:
        return [f"dtype {dtype_name(info.dtype)}, expected {' or '.join(map(dtype_name, scale.dtypes))}"]
    shape = list(info.shape)
    if scale.shape == "one" and not _is_one(info):
        return [f"shape {shape}, expected one element (0-dim or [1])"]
    per_row = weight is not None and info.shape == (weight.shape[0], 1)
    if scale.shape == "one_or_row" and not (_is_one(info) or per_row):
        return [f"shape {shape}, expected one element or [out, 1]"]
    if scale.shape == "blocks":
        if weight is None or in_features is None or not d.group_size:  # no group size: a config finding
            return [] if len(shape) >= 2 else [f"shape {shape}, expected [out, in/{d.group_size}]"]
        expected = [*weight.shape[:-1], in_features // d.group_size]
        if shape != expected:
            return [f"shape {shape}, expected {expected} (one per {d.group_size} of {in_features} inputs)"]
    problem = shape_problem(scale.shape, shape, weight.shape if weight is not None else None, in_features,
                            d.group_size)
    return [problem] if problem else []


def check_values(
    root: Path, infos: dict[str, TensorInfo], names: list[str]
) -> tuple[list[Finding], dict[str, float]]:
    """Every scale must be finite and > 0; returns findings and the one-element values."""
    findings, scalars = [], {}
    for name, t in load(root, infos, names):
        if t.dtype == torch.uint8:
            # E8M0 (MX) exponents, the only uint8 scales: 2**(byte - 127) is finite and > 0 for
            # every byte but 0xFF, which is NaN (OCP MX spec); byte 0 is 2**-127, a valid scale.
            bad = t == 0xFF
            if bad.any():
                first = bad.nonzero()[0].tolist()
                findings.append(Finding(name, f"{int(bad.sum())} of {t.numel()} E8M0 scales are 255 (NaN; "
                                              f"first at {first})"))
            continue
        if t.dtype == torch.float8_e4m3fn:
            # On the bytes, without a float copy: e4m3fn has no inf; 0x00 is +0, 0x7F is NaN,
            # and bit 7 is the sign, so exactly the bytes 0x01..0x7E are finite and > 0.
            b = t.view(torch.uint8)
            bad = (b == 0) | (b >= 0x7F)
        else:
            bad = ~(torch.isfinite(t) & (t > 0))
        if t.numel() == 1:
            value = t.float().item()
            scalars[name] = value
            if bad.any():
                findings.append(Finding(name, f"value {value}; a scale must be finite and > 0"))
        elif bad.any():
            first = bad.nonzero()[0]
            value = t[tuple(first.tolist())].float().item()
            findings.append(
                Finding(
                    name,
                    f"{int(bad.sum())} of {t.numel()} scales not finite and > 0 "
                    f"(first at {first.tolist()}: {value})",
                )
            )
    return findings, scalars


def _leaf(module: str) -> str:
    return module.rpartition(".")[2]


def _in_fused_order(group: list[str]) -> list[str]:
    """Members in the order of their fused group (q, k, v; gate, up), for stable messages."""
    order = fused_group_of(_leaf(group[0])) or ()
    return sorted(group, key=lambda m: order.index(_leaf(m)) if _leaf(m) in order else len(order))


def _group_label(group: list[str]) -> str:
    parent = group[0].rpartition(".")[0]
    return f"{parent}.{{{','.join(_leaf(m) for m in group)}}}"


def check_fused(quantized: list[str], scalars: dict[str, float], spec: AlgoSpec) -> list[Finding]:
    """Siblings a serving engine fuses into one GEMM load one global and one input scale."""
    findings = []
    for group in fused_groups(quantized):
        if len(group) < 2:
            continue
        group = _in_fused_order(group)
        for p in spec.fused_shared:
            values = {_leaf(m): scalars.get(f"{m}.{p}") for m in group}
            values = {k: v for k, v in values.items() if v is not None and v == v and abs(v) != float("inf")}
            if len(set(values.values())) > 1:
                listed = ", ".join(f"{k}={v:.9g}" for k, v in values.items())
                findings.append(
                    Finding(_group_label(group), f"fused siblings must share {p}; found {listed}")
                )
    return findings


def check_fused_mixed(modules: dict[str, Params], quantized: list[str]) -> list[Finding]:
    """A fused group cannot be half quantized: the engine loads it as one layer of one format."""
    q = set(quantized)
    candidates = sorted(
        m for m, params in modules.items() if fused_group_of(_leaf(m)) and (m in q or "weight" in params)
    )
    findings = []
    for group in fused_groups(candidates):
        group = _in_fused_order(group)
        mixed = {_leaf(m): m in q for m in group}
        if len(set(mixed.values())) > 1:
            yes = ", ".join(k for k, v in mixed.items() if v)
            no = ", ".join(k for k, v in mixed.items() if not v)
            findings.append(
                Finding(_group_label(group), f"fused siblings mix quantized ({yes}) and unquantized ({no})")
            )
    return findings


def check_exclusions(modules: dict[str, Params], quantized: list[str], d: Declared) -> list[Finding]:
    """Excluded modules must be unquantized; targeted projections must be quantized."""
    findings = []
    listing = "exclude_modules" if d.layout == MODELOPT else "ignore"
    for m in quantized:
        pattern = d.excluded_by(m)
        if pattern is not None:
            findings.append(
                Finding(m, f"carries quantized tensors but {listing} entry {pattern!r} excludes it")
            )
    q = set(quantized)
    for m, params in sorted(modules.items()):
        if m in q or not is_projection(m) or not d.expects_quantized(m):
            continue
        for leaf, info in sorted(params.items()):
            dense = (leaf == "weight" and len(info.shape) == 2) or len(info.shape) == 3  # 3-D: fused experts
            if dense and info.dtype in FLOAT_WEIGHT_DTYPES:
                findings.append(
                    Finding(
                        f"{m}.{leaf}", f"unquantized ({dtype_name(info.dtype)}) and not in the {listing} list"
                    )
                )
    return findings


def check_kv(
    infos: dict[str, TensorInfo], modules: dict[str, Params], d: Declared
) -> tuple[list[Finding], list[str]]:
    """Each attention module (parent of k_proj and v_proj) has k_scale and v_scale when the KV
    cache is quantized; returns findings and the KV scales to read."""
    present = sorted(n for n in infos if n.rpartition(".")[2] in KV_LEAVES)
    if not d.kv_algo:
        return [
            Finding(n, "KV-cache scale present but the config declares no KV-cache quantization")
            for n in present
        ], []
    kv = KV_SPECS[d.layout]
    findings = []
    parents = {x: {m.rpartition(".")[0] for m in modules if m.endswith(f".{x}_proj")} for x in "kv"}
    for attn in sorted(parents["k"] & parents["v"]):
        for x in "kv":
            places = [t.format(attn=attn, x=x) for t in kv.locations]
            if not any(p in infos for p in places):
                findings.append(Finding(places[0], f"missing; kv_cache_quant_algo is {d.kv_algo}"))
    if not present and not findings:
        findings.append(
            Finding("kv_cache_quant_algo", f"{d.kv_algo} declared but no k_scale/v_scale tensors found")
        )
    reads = []
    for n in present:
        info = infos[n]
        per_head = d.kv_per_head and len(info.shape) == 3 and info.shape[1:] == (1, 1)
        if info.dtype not in kv.dtypes:
            findings.append(
                Finding(
                    n, f"dtype {dtype_name(info.dtype)}, expected {' or '.join(map(dtype_name, kv.dtypes))}"
                )
            )
        elif not (_is_one(info) or per_head):
            findings.append(Finding(n, f"shape {list(info.shape)}, expected one element (0-dim or [1])"))
        else:
            reads.append(n)
    return findings, reads
