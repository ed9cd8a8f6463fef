"""compressed-tensors layout, as a stateless converter from and to Model Optimizer's.

Consumers: vLLM's `CompressedTensorsConfig` (`CompressedTensorsW4A4Fp4`, `CompressedTensorsW8A8Fp8`
and their MoE methods) and compressed-tensors' own decompressors (transformers' loader). Read
from compressed-tensors 0.20 (`compressors/nvfp4/base.py`, `quantization/quant_scheme.py`
presets `NVFP4` / `FP8`, `quantization/utils/helpers.py` `generate_gparam`).

Per quantized module, Model Optimizer name -> compressed-tensors name:

- NVFP4 (`nvfp4-pack-quantized`): `weight` (uint8) -> `weight_packed`, the same bytes;
  `weight_scale` (e4m3 block scales) unchanged; `weight_scale_2` -> `weight_global_scale` and
  `input_scale` -> `input_global_scale`, each the *reciprocal*: Model Optimizer multiplies by
  `amax / 2688`, compressed-tensors divides by `2688 / amax` (effective block scale
  `weight_scale / weight_global_scale`).
- FP8 (`float-quantized`, per tensor): `weight` (e4m3), `weight_scale`, `input_scale`; the same
  names and values (both layouts multiply by `amax / 448`).
- Per-tensor scales are 0-dim in Model Optimizer's checkpoints and `[1]` in compressed-tensors'
  (its decompressor divides a bf16 block scale by the `[1]` float32 global scale and so
  computes in float32; a 0-dim one would be promoted to bf16).
- KV cache: `<attn>.k_proj.k_scale` -> `<attn>.k_scale` (compressed-tensors registers it on the
  attention module), values unchanged (`amax / 448` in both).

The global scale, exactly. compressed-tensors computes `float32(2688 / amax)`
(`generate_gparam`: `FP8_E4M3_DATA.max * FP4_E2M1_DATA.max / amax`), Model Optimizer
`float32(amax / 2688)`. In float32 `1 / float32(amax / 2688)` differs from `float32(2688 / amax)`
for about a third of all amax values, and `1 / (1 / x)` is not `x` for about one in six, so
plain reciprocals neither reproduce what compressed-tensors writes nor survive a round trip.
A converter only sees the stored scale, so it first recovers the amax: a tensor's amax is one
of its elements, so for bf16/fp16 weights and activations it lies on the bf16/fp16 grid, where
`float32(amax / 2688)` is one-to-one and the amax is the grid value nearest to `scale * 2688`.
With that amax both directions apply the producers' own formulas, so
`global_scale_from_scale_2(float32(amax / 2688)) == float32(2688 / amax)` bit for bit and
modelopt -> compressed-tensors -> modelopt returns the same bytes (checked for every bf16 and
fp16 amax, and on Model Optimizer's own export). A scale that no bf16/fp16 amax produces (an
fp32 model) falls back to the plain float32 reciprocal, which is what compressed-tensors' own
`ModelOptNvfp4Converter` does: within 1 ulp of `1 / scale`, back within 2 ulps (86% exact).

Dequantized weights: compressed-tensors computes `e2m1 * float32(weight_scale / global_scale)`,
Model Optimizer `e2m1 * float32(weight_scale * weight_scale_2)`; for most scales no float32
global scale makes the two steps equal for every e4m3 block scale, so the two layouts'
dequantized bf16 weights differ by one ulp in about 0.1% of elements (:func:`dequantize` is
compressed-tensors' arithmetic; the tests hold its decompressor to it bit for bit).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from quantship.errors import QuantshipError
from quantship.export import modelopt_hf
from quantship.formats import nvfp4

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"
LAYOUTS = (MODELOPT, COMPRESSED_TENSORS)

# E2M1 max * E4M3 max: the amax that a global scale of 1 maps to the top of both ranges.
GLOBAL_SCALE_NUMERATOR = nvfp4.E2M1_MAX * nvfp4.E4M3_MAX  # 2688.0, exact in float32
# The grids an amax is looked for on, coarsest first (see the module docstring).
_AMAX_GRIDS = (torch.bfloat16, torch.float16)
KV_LEAVES = ("k_scale", "v_scale")

# compressed-tensors' preset arguments as its `QuantizationArgs.model_dump()` writes them
# (tests/test_compressed_tensors.py compares with the dump of its own preset objects).
_NVFP4_ARGS = {
    "num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
    "dynamic": False, "scale_dtype": "torch.float8_e4m3fn",
}
_FP8_ARGS = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "tensor",
             "dynamic": False}
# Activations: NVFP4 block scales are computed at run time ("local") under the static global
# scale; FP8 per-tensor input scales are static.
_NVFP4_INPUT = {**_NVFP4_ARGS, "dynamic": "local", "observer": "static_minmax"}
_FP8_INPUT = {**_FP8_ARGS, "observer": "static_minmax"}
# FP8_PER_CHANNEL_PER_TOKEN is compressed-tensors' FP8_DYNAMIC preset: per-channel weight scales
# `[out, 1]` (Model Optimizer writes `[out]`, the same values), per-token activations at run time.
_FP8_CHANNEL_ARGS = {**_FP8_ARGS, "strategy": "channel"}
_FP8_TOKEN_INPUT = {**_FP8_ARGS, "strategy": "token", "dynamic": True}
# MX (presets MXFP4 / MXFP8): the same bytes as Model Optimizer's `weight` (packed FP4 or e4m3)
# and E8M0 `weight_scale` (uint8 biased exponents, `compressors/mx_utils.py`), activations MX at run time.
_MXFP4_ARGS = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group",
               "dynamic": False, "scale_dtype": "torch.uint8"}
_MXFP8_ARGS = {**_MXFP4_ARGS, "num_bits": 8}
KV_CACHE_SCHEMES = {"FP8": dict(_FP8_ARGS)}


@dataclass(frozen=True)
class LayoutMap:
    """How one algorithm's per-module tensors are named and scaled in the two layouts."""

    quant_algo: str  # Model Optimizer's name
    ct_format: str  # compressed-tensors' `format`
    renames: dict[str, str]  # Model Optimizer local name -> compressed-tensors local name
    reciprocal: frozenset[str]  # Model Optimizer names whose counterpart is the reciprocal
    per_tensor: frozenset[str]  # Model Optimizer names of one-element scales
    weights: dict
    input_activations: dict
    per_channel: frozenset[str] = frozenset()  # Model Optimizer names of `[out]` scales, `[out, 1]` there

    def to_modelopt_name(self, leaf: str) -> str:
        return {v: k for k, v in self.renames.items()}.get(leaf, leaf)


LAYOUT_MAPS: dict[str, LayoutMap] = {
    m.quant_algo: m
    for m in (
        LayoutMap("NVFP4", "nvfp4-pack-quantized",
                  {"weight": "weight_packed", "weight_scale_2": "weight_global_scale",
                   "input_scale": "input_global_scale"},
                  frozenset({"weight_scale_2", "input_scale"}), frozenset({"weight_scale_2", "input_scale"}),
                  _NVFP4_ARGS, _NVFP4_INPUT),
        LayoutMap("FP8", "float-quantized", {}, frozenset(), frozenset({"weight_scale", "input_scale"}),
                  _FP8_ARGS, _FP8_INPUT),
        LayoutMap("FP8_PER_CHANNEL_PER_TOKEN", "float-quantized", {}, frozenset(), frozenset(),
                  _FP8_CHANNEL_ARGS, _FP8_TOKEN_INPUT, frozenset({"weight_scale"})),
        LayoutMap("mxfp4", "mxfp4-pack-quantized", {"weight": "weight_packed"}, frozenset(), frozenset(),
                  _MXFP4_ARGS, {**_MXFP4_ARGS, "dynamic": True}),
        LayoutMap("MXFP8", "mxfp8-quantized", {}, frozenset(), frozenset(), _MXFP8_ARGS, {**_MXFP8_ARGS, "dynamic": True}),
    )
}


def layout_map(quant_algo: str | None) -> LayoutMap:
    try:
        return LAYOUT_MAPS[str(quant_algo)]
    except KeyError:
        raise QuantshipError(
            f"quant_algo {quant_algo!r} has no compressed-tensors conversion; supported: {', '.join(LAYOUT_MAPS)}"
        ) from None


def check_export(layout: str, quant_algo: str | None, kv_cache_quant_algo: str | None) -> None:
    """Raise before any work when `layout` is unknown or cannot hold this kind of checkpoint."""
    if layout not in LAYOUTS:
        raise QuantshipError(f"unknown export format {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    if layout == COMPRESSED_TENSORS:
        check_supported(quant_algo, kv_cache_quant_algo)


def check_supported(quant_algo: str | None, kv_cache_quant_algo: str | None) -> None:
    """Raise before any work when a checkpoint of this kind has no compressed-tensors form."""
    layout_map(quant_algo)
    if kv_cache_quant_algo and kv_cache_quant_algo not in KV_CACHE_SCHEMES:
        raise QuantshipError(
            f"KV cache {kv_cache_quant_algo} has no compressed-tensors kv_cache_scheme that serving engines "
            "load; export with --export-format modelopt or use --kv-cache-qformat fp8"
        )


# --------------------------------------------------------------------------- global scales


def _on_grid(approx: Tensor, reproduces) -> Tensor:
    """Per element, the value of the coarsest grid nearest to `approx` for which
    `reproduces(value)` holds; NaN where no grid value does."""
    found = torch.full_like(approx, float("nan"))
    for dtype in _AMAX_GRIDS:
        candidate = approx.to(dtype).float()
        ok = torch.isnan(found) & torch.isfinite(candidate) & (candidate > 0) & reproduces(candidate)
        found = torch.where(ok, candidate, found)
    return found


def global_scale_from_scale_2(scale_2: Tensor) -> Tensor:
    """Model Optimizer `amax / 2688` -> compressed-tensors `2688 / amax`, float32, elementwise
    (also for `input_scale` -> `input_global_scale`). See the module docstring."""
    s = torch.as_tensor(scale_2).float()
    amax = _on_grid(s * GLOBAL_SCALE_NUMERATOR, lambda a: a / GLOBAL_SCALE_NUMERATOR == s)
    return torch.where(torch.isnan(amax), 1.0 / s, GLOBAL_SCALE_NUMERATOR / amax)


def scale_2_from_global_scale(global_scale: Tensor) -> Tensor:
    """compressed-tensors `2688 / amax` -> Model Optimizer `amax / 2688`; the inverse of
    :func:`global_scale_from_scale_2`."""
    g = torch.as_tensor(global_scale).float()
    amax = _on_grid(GLOBAL_SCALE_NUMERATOR / g, lambda a: GLOBAL_SCALE_NUMERATOR / a == g)
    return torch.where(torch.isnan(amax), 1.0 / g, amax / GLOBAL_SCALE_NUMERATOR)


# --------------------------------------------------------------------------- tensors


def _kv_name(module: str, leaf: str, to: str) -> str:
    x = leaf[0]  # "k" or "v"
    parent, _, last = module.rpartition(".")
    if to == COMPRESSED_TENSORS:
        return f"{parent}.{leaf}" if last == f"{x}_proj" else f"{module}.{leaf}"
    # compressed-tensors' own converter keeps Model Optimizer's `k_proj.k_scale`: leave those.
    return f"{module}.{leaf}" if last == f"{x}_proj" else f"{module}.{x}_proj.{leaf}"


def convert_tensor(name: str, tensor: Tensor, quant_algo: str, to: str) -> tuple[str, Tensor]:
    """One checkpoint tensor into layout `to`: its new name and value; the input is untouched.

    Tensors that carry no quantization (norms, embeddings, the weights of excluded modules)
    pass through unchanged."""
    if to not in LAYOUTS:
        raise QuantshipError(f"unknown layout {to!r}; choose one of: {', '.join(LAYOUTS)}")
    m = layout_map(quant_algo)
    module, _, leaf = name.rpartition(".")
    if leaf in KV_LEAVES:
        value = tensor.float()
        return _kv_name(module, leaf, to), value.reshape(1) if to == COMPRESSED_TENSORS else value.reshape(())
    if to == COMPRESSED_TENSORS:
        mo_leaf, new_leaf = leaf, m.renames.get(leaf, leaf)
        if leaf == "weight" and tensor.dtype != torch.uint8:
            new_leaf = leaf  # a high-precision weight (excluded module), or FP8's e4m3 weight
    else:
        mo_leaf = new_leaf = m.to_modelopt_name(leaf)
    value = tensor
    if mo_leaf in m.reciprocal and new_leaf != leaf:
        value = (global_scale_from_scale_2 if to == COMPRESSED_TENSORS else scale_2_from_global_scale)(tensor)
    if mo_leaf in m.per_tensor:
        if value.numel() != 1:
            raise QuantshipError(
                f"{name} has shape {list(value.shape)}; only per-tensor {m.quant_algo} scales convert between layouts"
            )
        value = value.float().reshape(1) if to == COMPRESSED_TENSORS else value.float().reshape(())
    elif mo_leaf in m.per_channel:
        value = value.reshape(-1, 1) if to == COMPRESSED_TENSORS else value.reshape(-1)
    elif new_leaf == leaf and leaf.endswith(_UNCONVERTIBLE):
        raise QuantshipError(f"{name}: a {leaf} tensor has no counterpart in the other layout; cannot convert")
    return f"{module}.{new_leaf}", value


# Quantization tensors of other schemes (asymmetric, AWQ, packed int): no counterpart.
_UNCONVERTIBLE = ("zero_point", "pre_quant_scale", "weight_shape", "output_scale")


def convert_tensors(items: Iterable[tuple[str, Tensor]], quant_algo: str, to: str
                    ) -> Iterator[tuple[str, Tensor]]:
    """A stream of checkpoint tensors into layout `to`, one tensor at a time."""
    for name, tensor in items:
        yield convert_tensor(name, tensor, quant_algo, to)


def module_to_compressed_tensors(tensors: dict[str, Tensor], quant_algo: str) -> dict[str, Tensor]:
    """One quantized module's tensors by local name, Model Optimizer -> compressed-tensors."""
    return _convert_module(tensors, quant_algo, COMPRESSED_TENSORS)


def module_to_modelopt(tensors: dict[str, Tensor], quant_algo: str) -> dict[str, Tensor]:
    """One quantized module's tensors by local name, compressed-tensors -> Model Optimizer."""
    return _convert_module(tensors, quant_algo, MODELOPT)


def _convert_module(tensors: dict[str, Tensor], quant_algo: str, to: str) -> dict[str, Tensor]:
    out = {}
    for local, value in tensors.items():
        name, converted = convert_tensor(f"m.{local}", value, quant_algo, to)
        out[name.removeprefix("m.")] = converted
    return out


def dequantize(tensors: dict[str, Tensor], quant_algo: str, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """A compressed-tensors module's weight as its loaders compute it: NVFP4
    `e2m1 * float32(weight_scale / weight_global_scale)`, FP8 `e4m3 * weight_scale`, each
    product in float32, then cast to `dtype`. (Model Optimizer's layout multiplies by
    `weight_scale * weight_scale_2` instead; the two agree to one float32 rounding of the step.)"""
    if layout_map(quant_algo).quant_algo == "FP8":
        return (tensors["weight"].float() * tensors["weight_scale"].float().reshape(-1)[0]).to(dtype)
    if layout_map(quant_algo).quant_algo == "FP8_PER_CHANNEL_PER_TOKEN":  # weight_scale [out, 1]
        return (tensors["weight"].float() * tensors["weight_scale"].float()).to(dtype)
    if layout_map(quant_algo).quant_algo in ("mxfp4", "MXFP8"):
        from quantship.formats import mxfp

        if quant_algo == "mxfp4":
            return mxfp.dequantize_mxfp4(tensors["weight_packed"], tensors["weight_scale"], dtype)
        return mxfp.dequantize_mxfp8(tensors["weight"], tensors["weight_scale"], dtype)
    codes = nvfp4.unpack_fp4(tensors["weight_packed"])
    step = tensors["weight_scale"].float() / tensors["weight_global_scale"].float().reshape(1)
    values = nvfp4.e2m1_values(codes).reshape(*codes.shape[:-1], -1, nvfp4.BLOCK_SIZE)
    return (values * step.unsqueeze(-1)).reshape(codes.shape).to(dtype)


# --------------------------------------------------------------------------- config.json


def ignore_entry(pattern: str) -> str:
    """A Model Optimizer exclude pattern (fnmatch) as a compressed-tensors ignore entry
    (exact name, or `re:` + a regex that `re.match` applies)."""
    if any(c in pattern for c in "*?["):
        return "re:" + fnmatch.translate(pattern)
    return pattern


def config_json_quantization(hf_quant_config: dict) -> dict:
    """config.json's `quantization_config` for compressed-tensors, from the content of Model
    Optimizer's hf_quant_config.json: one config group targeting every Linear, `ignore` = the
    exclude list, status `compressed` (the weights on disk are quantized)."""
    q = hf_quant_config["quantization"]
    check_supported(q.get("quant_algo"), q.get("kv_cache_quant_algo"))
    m = layout_map(q["quant_algo"])
    group = {
        "targets": ["Linear"],
        "weights": dict(m.weights),
        "input_activations": dict(m.input_activations),
        "output_activations": None,
        "format": m.ct_format,
    }
    kv = q.get("kv_cache_quant_algo")
    return {
        "config_groups": {"group_0": group},
        "quant_method": COMPRESSED_TENSORS,
        "kv_cache_scheme": dict(KV_CACHE_SCHEMES[kv]) if kv else None,
        "format": m.ct_format,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": [ignore_entry(p) for p in q.get("exclude_modules", [])],
        "moe_sparsity_config": None,
    }


def from_modelopt(items: Iterable[tuple[str, Tensor]], hf_quant_config: dict, layout: str
                  ) -> tuple[dict, Iterator[tuple[str, Tensor]]]:
    """Model Optimizer checkpoint content (a tensor stream and hf_quant_config.json's content)
    as `layout` writes it: (config.json's `quantization_config`, the tensor stream). Checks
    that the layout can hold it before the first tensor is produced."""
    q = hf_quant_config["quantization"]
    check_export(layout, q["quant_algo"], q.get("kv_cache_quant_algo"))
    if layout == MODELOPT:
        return modelopt_hf.config_json_quantization(hf_quant_config), iter(items)
    return config_json_quantization(hf_quant_config), convert_tensors(items, q["quant_algo"], layout)
