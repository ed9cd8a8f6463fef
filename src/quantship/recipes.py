"""Named quantization recipes and KV-cache formats, as data (STYLE 6).

A recipe says which module roles (see `model.discover.ROLES`) get which weight/activation
format. lm_head and routers are never quantized: serving engines run them in high precision
and expect them in the exclude list.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    )
}

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


def get_kv_cache_format(name: str | None) -> KVCacheFormat:
    key = "none" if name in (None, "", "none", "None") else name
    try:
        return KV_CACHE_FORMATS[key]
    except KeyError:
        raise QuantshipError(
            f"unknown kv cache qformat {name!r}; choose one of: {', '.join(KV_CACHE_FORMATS)}"
        ) from None
