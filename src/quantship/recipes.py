"""Named quantization recipes and KV-cache formats, as data (STYLE 6).

A recipe says which module roles (see `model.discover.ROLES`) get which weight/activation
format. lm_head and routers are never quantized: serving engines run them in high precision
and expect them in the exclude list.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from quantship.errors import QuantshipError

ALL_LINEAR_ROLES = frozenset({"attention", "mlp", "shared_expert", "expert", "other"})
MLP_ROLES = frozenset({"mlp", "shared_expert", "expert"})


@dataclass(frozen=True)
class Recipe:
    """One named format: the weight/activation format and the roles it applies to."""

    name: str
    quant_algo: str  # the value written to hf_quant_config.json
    weight_format: str  # key into quantship.scales.FORMAT_HANDLERS
    roles: frozenset[str]
    group_size: int | None  # block size along the input dimension, None for per-tensor
    # Smoothing run before calibration (`quantship.algorithms.smoothing`): "awq_lite" or
    # "smoothquant" (a per-input-channel pre_quant_scale), None for plain max calibration.
    algorithm: str | None = None

    def quantizes(self, role: str) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class KVCacheFormat:
    name: str
    quant_algo: str | None  # hf_quant_config.json's kv_cache_quant_algo


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("nvfp4", "NVFP4", "nvfp4", ALL_LINEAR_ROLES, 16),
        Recipe("nvfp4_mlp_only", "NVFP4", "nvfp4", MLP_ROLES, 16),
        Recipe("nvfp4_experts_only", "NVFP4", "nvfp4", frozenset({"expert"}), 16),
        Recipe("fp8", "FP8", "fp8", ALL_LINEAR_ROLES, None),
        # The rest of hf_ptq's table. quant_algo and group_size exactly as Model Optimizer 0.47
        # writes them (export/quant_utils.py `process_layer_quant_config`; "fp8_pb_wo" and "mxfp4"
        # are its lower-case fall-through names, mxfp4 without a group_size).
        Recipe("fp8_pc_pt", "FP8_PER_CHANNEL_PER_TOKEN", "fp8_pc_pt", ALL_LINEAR_ROLES, None),
        Recipe("fp8_pb_wo", "fp8_pb_wo", "fp8_pb_wo", ALL_LINEAR_ROLES, None),
        Recipe("int4_awq", "W4A16_AWQ", "int4_awq", ALL_LINEAR_ROLES, 128, "awq_lite"),
        Recipe("nvfp4_awq", "NVFP4_AWQ", "nvfp4_awq", ALL_LINEAR_ROLES, 16, "awq_lite"),
        Recipe("w4a8_awq", "W4A8_AWQ", "w4a8_awq", ALL_LINEAR_ROLES, 128, "awq_lite"),
        Recipe("w4a8_nvfp4_fp8", "W4A8_NVFP4_FP8", "w4a8_nvfp4_fp8", ALL_LINEAR_ROLES, 32),
        Recipe("mxfp8", "MXFP8", "mxfp8", ALL_LINEAR_ROLES, 32),
        Recipe("mxfp4", "mxfp4", "mxfp4", ALL_LINEAR_ROLES, None),
        Recipe("int8_sq", "W8A8_SQ_PER_CHANNEL", "int8_sq", ALL_LINEAR_ROLES, None, "smoothquant"),
        Recipe("int8_wo", "W8A16", "int8_wo", ALL_LINEAR_ROLES, None),
        # Exported as a plain NVFP4 checkpoint (Model Optimizer: "nvfp4_static" -> NVFP4).
        Recipe("nvfp4_four_over_six", "NVFP4", "nvfp4_four_over_six", ALL_LINEAR_ROLES, 16),
    )
}
WEIGHT_SCALE_SEARCHES = ("max", "mse")

KV_CACHE_FORMATS: dict[str, KVCacheFormat] = {
    k.name: k for k in (KVCacheFormat("none", None), KVCacheFormat("fp8", "FP8"), KVCacheFormat("nvfp4", "NVFP4"))
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise QuantshipError(
            f"unknown qformat {name!r}; choose one of: {', '.join(RECIPES)}"
        ) from None


def with_weight_scale_search(recipe: Recipe, search: str) -> Recipe:
    """`recipe` with its weight block scales from `search`: "max" (the block amax) or "mse" (the
    block amax multiple with the smallest reconstruction error, `algorithms/mse_scale_search.py`)."""
    from quantship.formats.handlers import FORMAT_HANDLERS

    if search not in WEIGHT_SCALE_SEARCHES:
        raise QuantshipError(f"unknown --weight-scale-search {search!r}; choose one of: {', '.join(WEIGHT_SCALE_SEARCHES)}")
    if search == "max":
        return recipe
    searched = f"{recipe.weight_format}+{search}"
    if searched not in FORMAT_HANDLERS:
        raise QuantshipError(
            f"--weight-scale-search {search} needs a block format; {recipe.name} has no weight blocks "
            f"(block formats: {', '.join(n for n, r in RECIPES.items() if f'{r.weight_format}+mse' in FORMAT_HANDLERS)})"
        )
    return replace(recipe, name=f"{recipe.name}+{search}", weight_format=searched)


def get_kv_cache_format(name: str | None) -> KVCacheFormat:
    key = "none" if name in (None, "", "none", "None") else name
    try:
        return KV_CACHE_FORMATS[key]
    except KeyError:
        raise QuantshipError(
            f"unknown kv cache qformat {name!r}; choose one of: {', '.join(KV_CACHE_FORMATS)}"
        ) from None
