"""Issue 3: a static check of our Model Optimizer export against what vLLM's ModelOpt loader requires.

`REQUIREMENTS` below is a table of facts read from vLLM's source (repository vllm-project/vllm; each
row names the file and function, `READ_AT` the commit of the stored version that was read). Every row
has a checker in this file that inspects an export *statically*: config.json, hf_quant_config.json,
the safetensors headers (dtype, shape) and the few scalar values the loader compares. vLLM itself is
neither imported nor copied: the config parsing and the exclusion rule below are restated from those
facts. Tiny models from `tests/tiny_models.py` are quantized (NVFP4 for llama, qwen3_moe, mixtral,
deepseek_v3; FP8 for llama and qwen3_moe; FP8 KV cache throughout) and each table row that applies
is checked against each export.

Why equal scales matter (rows *-fused-*, *-w13-*): vLLM keeps ONE global/per-tensor scale per fused
layer (q/k/v, gate/up, DeepSeek's q_a/kv_a) and per expert's w1/w3 pair. For NVFP4 linears it takes
the max of the shards' `input_scale` / `weight_scale_2` and warns when they differ; for NVFP4 MoE it
keeps only w1's `weight_scale_2` (warning when w3's differs); for FP8 it requantizes shards to the max
weight scale. Shards that already share their scale therefore load with no accuracy loss.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantship.pipeline import quantize

from tiny_models import build_tiny_model

VLLM_REPO = "vllm-project/vllm"
MODELOPT_PY = "vllm/model_executor/layers/quantization/modelopt.py"
QUANT_UTILS_PY = "vllm/model_executor/layers/quantization/utils/quant_utils.py"
FUSED_MOE_PY = "vllm/model_executor/layers/fused_moe/layer.py"
WEIGHT_UTILS_PY = "vllm/model_executor/model_loader/weight_utils.py"
MODEL_CONFIG_PY = "vllm/config/model.py"
LLAMA_PY = "vllm/model_executor/models/llama.py"
QWEN3_MOE_PY = "vllm/model_executor/models/qwen3_moe.py"
MIXTRAL_PY = "vllm/model_executor/models/mixtral.py"
DEEPSEEK_V2_PY = "vllm/model_executor/models/deepseek_v2.py"

# The stored version of each vLLM file that was read (vllm-project/vllm commit).
READ_AT = {
    MODELOPT_PY: "00155cdecca722d98e34234c3d172725b7720b7d",
    QUANT_UTILS_PY: "01693a61cbed06543efef7373f6774afb961f244",
    FUSED_MOE_PY: "c439a139790cafaecb54e8dea123b78049f1442b",
    WEIGHT_UTILS_PY: "0a1ee72ed53f07ca8e57e5e82fdbd89734b39026",
    MODEL_CONFIG_PY: "18ec6629253632af0a384f2ffbb8c6b28af322e7",
    LLAMA_PY: "e06c9ba2a6ea923a84add30f5dafaea126429b81",
    QWEN3_MOE_PY: "2e0831b0ab951c8896d4dd5d6cb9c3350a4574de",
    MIXTRAL_PY: "f0e26957c6af4d1ce3d0642120b011949da65885",
    DEEPSEEK_V2_PY: "b863fe5bf4e19680572603b4e166faefc5725551",
}

NVFP4, FP8 = "NVFP4", "FP8"
BOTH = (NVFP4, FP8)


class Req(NamedTuple):
    id: str
    formats: tuple[str, ...]  # quant_algo values the row applies to
    moe_only: bool  # only meaningful for models with fused-MoE layers
    where: tuple[tuple[str, str], ...]  # (vLLM file, function) the fact was read from
    rule: str  # what vLLM does, in words


REQUIREMENTS: list[Req] = [
    # ---------------------------------------------------------------- which config vLLM reads
    Req("config-source", BOTH, False,
        ((WEIGHT_UTILS_PY, "get_quant_config"),),
        "config.json `quantization_config`, when present, is what from_config() gets (hf_quant_config.json is "
        "then not read); only without it is the folder searched for get_config_filenames() == "
        "['hf_quant_config.json'], and for method 'modelopt' (FP8) that file is refused unless "
        "producer.name == 'modelopt'. Our producer is 'quantship', so config.json must carry the config."),
    Req("config-method", BOTH, False,
        ((MODEL_CONFIG_PY, "ModelConfig._parse_quant_hf_config / _verify_quantization"),
         (MODELOPT_PY, "ModelOptQuantConfigBase._extract_modelopt_quant_algo"),
         (MODELOPT_PY, "ModelOptFp8Config / ModelOptNvFp4Config.override_quantization_method")),
        "quant_method is filled in from the producer only when producer.name == 'modelopt'; otherwise "
        "quantization_config.quant_method must start with 'modelopt'. The algo (nested `quantization."
        "quant_algo` or top-level `quant_algo`, upper-cased) then picks the method: 'FP8' -> 'modelopt', "
        "containing 'NVFP4'/'FP4' -> 'modelopt_fp4'."),
    # ---------------------------------------------------------------- from_config
    Req("config-quant-algo", BOTH, False,
        ((MODELOPT_PY, "ModelOptQuantConfigBase.from_config"),
         (MODELOPT_PY, "ModelOptNvFp4Config.__init__ / ModelOptFp8Config.__init__")),
        "quant_algo is required ('Missing quant_algo'), upper-cased, must be in QUANT_ALGOS; NVFP4 selects "
        "ModelOptNvFp4LinearMethod (W4A4), FP8 selects the per-tensor ModelOptFp8LinearMethod."),
    Req("nvfp4-required-fields", (NVFP4,), False,
        ((MODELOPT_PY, "ModelOptNvFp4Config._from_config"),),
        "with the hf_quant_config.json layout ({'quantization': {...}}) an NVFP4 config must hold "
        "group_size, kv_cache_quant_algo and exclude_modules, else ValueError listing the missing ones."),
    Req("config-field-types", BOTH, False,
        ((MODELOPT_PY, "ModelOptQuantConfigBase.from_config"),),
        "kv_cache_quant_algo must be a str (or absent/None), exclude_modules (config.json: ignore) a list, "
        "group_size an int or int()-convertible, else ValueError."),
    Req("nvfp4-group-size", (NVFP4,), False,
        ((MODELOPT_PY, "ModelOptQuantConfigBase.from_config"), (MODELOPT_PY, "ModelOptNvFp4Config._from_config")),
        "group_size comes from `quantization.group_size` (hf_quant_config.json) or a TOP-LEVEL `group_size` "
        "(config.json layout; config_groups is not read) and defaults to 16 when absent. Whichever file "
        "vLLM reads, the effective group size must be the one the weight_scale tensors were cut with."),
    Req("kv-cache-algo", BOTH, False,
        ((MODELOPT_PY, "ModelOptQuantConfigBase.from_config"), (MODELOPT_PY, "KV_CACHE_QUANT_ALGOS")),
        "hf_quant_config.json: kv_cache_quant_algo (upper-cased; ModelOpt lists FP8, NVFP4). config.json "
        "layout: kv_cache_scheme {'type': 'float', 'num_bits': 8} means FP8, anything else no KV quant."),
    Req("kv-scales", BOTH, False,
        ((MODELOPT_PY, "ModelOptQuantConfigBase.get_quant_method (Attention -> ModelOptKVCacheMethod)"),
         (WEIGHT_UTILS_PY, "maybe_remap_kv_scale_name"),
         (QWEN3_MOE_PY, "Qwen3MoeModel.load_weights")),
        "Attention layers take a KV-cache method; ModelOpt's `<layer>.self_attn.k_proj.k_scale` / "
        "`.v_proj.v_scale` are remapped to `self_attn.attn.k_scale` / `v_scale`; loaders assert numel == 1."),
    Req("exclude-list", BOTH, False,
        ((MODELOPT_PY, "ModelOptQuantConfigBase.from_config"),),
        "the exclusion list is `quantization.exclude_modules` (hf_quant_config.json) or `ignore` "
        "(config.json); both files must therefore name the same modules."),
    Req("exclude-rule", BOTH, False,
        ((MODELOPT_PY, "ModelOptQuantConfigBase.is_layer_excluded / get_quant_method / apply_vllm_mapper"),
         (QUANT_UTILS_PY, "is_layer_skipped")),
        "a layer prefix is excluded by (1) exact match, a fused layer (qkv_proj, gate_up_proj, ...) via its "
        "shards which must all agree (else ValueError), an `experts` prefix only via entries containing "
        "'experts'; (2) legacy substring match; (3) fnmatch wildcards ('x*' also as 'x' and 'x.*'). "
        "Excluded Linear/lm_head -> UnquantizedLinearMethod; every other Linear, lm_head and FusedMoE is "
        "quantized. So excluded == stored unquantized, exactly lm_head and the MoE routers."),
    Req("router-precision", BOTH, True,
        ((QWEN3_MOE_PY, "Qwen3MoeSparseMoeBlock.__init__"), (MIXTRAL_PY, "MixtralMoE.__init__"),
         (DEEPSEEK_V2_PY, "DeepSeekV2Gate.__init__")),
        "Qwen3-MoE builds its router `mlp.gate` with quant_config (so it must be excluded to stay high "
        "precision); Mixtral passes quant_config=None and DeepSeek asserts quant_config is None: routers "
        "are always high precision in vLLM, so their checkpoint weight must be unquantized."),
    Req("packed-modules", BOTH, False,
        ((LLAMA_PY, "LlamaForCausalLM.packed_modules_mapping"), (QWEN3_MOE_PY, "Qwen3MoeForCausalLM.packed_modules_mapping"),
         (MIXTRAL_PY, "MixtralModel.load_weights"), (DEEPSEEK_V2_PY, "DeepseekV2ForCausalLM.__init__ / load_weights")),
        "checkpoint shards load into fused layers: llama qkv_proj=[q,k,v], gate_up_proj=[gate,up]; qwen3_moe "
        "and mixtral qkv_proj; deepseek gate_up_proj and (q_lora_rank set) fused_qkv_a_proj=[q_a_proj, "
        "kv_a_proj_with_mqa]. Every shard must be in the checkpoint under its own unfused name."),
    # ---------------------------------------------------------------- NVFP4 linear
    Req("nvfp4-linear-tensors", (NVFP4,), False,
        ((MODELOPT_PY, "ModelOptNvFp4LinearMethod.create_weights"),),
        "per shard: weight uint8 [out, in/2] (two FP4 per byte), weight_scale float8_e4m3fn "
        "[out, in/group_size], weight_scale_2 and input_scale float32, one value each "
        "(PerTensorScaleParameter with one slot per shard)."),
    Req("nvfp4-linear-in16", (NVFP4,), False,
        ((MODELOPT_PY, "ModelOptNvFp4LinearMethod.create_weights"),),
        "raises unless input_size_per_partition % 16 == 0."),
    Req("nvfp4-fused-global-scales", (NVFP4,), False,
        ((MODELOPT_PY, "ModelOptNvFp4LinearMethod.process_weights_after_loading"),),
        "warns when the shards' input_scale or weight_scale_2 differ ('will likely results in reduce "
        "accuracy'), then uses the max of each: equal shard scales load without loss."),
    # ---------------------------------------------------------------- fused MoE
    Req("moe-expert-names", BOTH, True,
        ((FUSED_MOE_PY, "FusedMoE.make_expert_params_mapping"), (QWEN3_MOE_PY, "Qwen3MoeModel.get_expert_mapping"),
         (MIXTRAL_PY, "MixtralModel.get_expert_mapping"), (DEEPSEEK_V2_PY, "DeepseekV2ForCausalLM.get_expert_mapping")),
        "for expert_id in range(num_experts): `experts.{id}.{gate}.` -> w13_* shard w1, `{down}` -> w2_* "
        "shard w2, `{up}` -> w13_* shard w3; gate/down/up = gate_proj/down_proj/up_proj (qwen3_moe, "
        "deepseek) or w1/w2/w3 (mixtral). Every expert 0..E-1 needs all three, each with all its tensors."),
    Req("nvfp4-moe-tensors", (NVFP4,), True,
        ((MODELOPT_PY, "ModelOptNvFp4FusedMoE.create_weights"),),
        "w13_weight uint8 [E, 2I, H/2], w2_weight uint8 [E, H, I/2], w13_weight_scale fp8 [E, 2I, H/gs], "
        "w2_weight_scale fp8 [E, H, I/gs], w13_weight_scale_2 fp32 [E, 2], w2_weight_scale_2 [E], "
        "w13_input_scale [E, 2], w2_input_scale [E]: per expert w1/w3 weight [I, H/2], scale [I, H/gs], "
        "w2 weight [H, I/2], scale [H, I/gs], one fp32 weight_scale_2 and input_scale each."),
    Req("nvfp4-moe-w13-scale2", (NVFP4,), True,
        ((MODELOPT_PY, "ModelOptNvFp4FusedMoE.process_weights_after_loading"),),
        "warns 'w1_weight_scale_2 must match w3_weight_scale_2' when not allclose, then keeps only w1's "
        "(w13_weight_scale_2[:, 0]): w3's global scale is dropped, so they must be equal."),
    Req("moe-w13-input-scale", BOTH, True,
        ((FUSED_MOE_PY, "FusedMoE.weight_loader"),),
        "w1's and w3's input_scale go to the same per-expert slot; ValueError 'input_scales of w1 and w3 "
        "of a layer must be equal' when they differ."),
    # ---------------------------------------------------------------- FP8
    Req("fp8-linear-tensors", (FP8,), False,
        ((MODELOPT_PY, "ModelOptFp8LinearMethod.create_weights"),),
        "per shard: weight float8_e4m3fn [out, in]; weight_scale and input_scale float32, one value per shard."),
    Req("fp8-fused-scales", (FP8,), False,
        ((MODELOPT_PY, "ModelOptFp8LinearMethod.process_weights_after_loading"),),
        "shards with different weight_scale are requantized to the max scale (requantize_with_max_scale); "
        "input_scale becomes the max: equal shard scales load without loss."),
    Req("fp8-moe-tensors", (FP8,), True,
        ((MODELOPT_PY, "ModelOptFp8MoEMethod.create_weights"),),
        "w13_weight fp8 [E, 2I, H], w2_weight fp8 [E, H, I], w13_weight_scale fp32 [E, 2], w2_weight_scale "
        "[E], w13_input_scale [E], w2_input_scale [E]: per expert w1/w3 weight [I, H], w2 [H, I], one fp32 "
        "weight_scale and input_scale each."),
    Req("fp8-moe-w13-scales", (FP8,), True,
        ((MODELOPT_PY, "ModelOptFp8MoEMethod.process_weights_after_loading"),),
        "one activation scale (the max) per layer and w13 requantized to max(w1, w3) weight scale per "
        "expert: w1 and w3 weight_scale should be equal."),
    Req("nvfp4-embed", (NVFP4,), False,
        ((MODELOPT_PY, "ModelOptNvFp4Config._from_config / get_quant_method"),),
        "`nvfp4_embed` (default False) switches embed_tokens to packed NVFP4 (ModelOptNvFp4EmbeddingMethod); "
        "without it the embedding loads high precision, so an export with a plain embedding must not set it."),
]


# ======================================================================== reading an export
DTYPE = {torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32"}
HIGH_PRECISION = {"BF16", "F16", "F32"}
KV_SCALE_SUFFIXES = {"k_scale", "v_scale"}  # stored under k_proj / v_proj, remapped to attn (row kv-scales)
SUFFIXES = {  # format -> checkpoint tensor suffix -> safetensors dtype of a quantized module
    NVFP4: {"weight": "U8", "weight_scale": "F8_E4M3", "weight_scale_2": "F32", "input_scale": "F32"},
    FP8: {"weight": "F8_E4M3", "weight_scale": "F32", "input_scale": "F32"},
}


class Export:
    """The files of one export, read the way a loader sees them (headers; values only for scalars)."""

    def __init__(self, root: Path):
        self.root = root
        self.config = json.loads((root / "config.json").read_text())
        hq = root / "hf_quant_config.json"
        self.hf_quant = json.loads(hq.read_text()) if hq.is_file() else None
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.scalars: dict[str, float] = {}
        self.suffixes: dict[str, set[str]] = {}  # module -> the suffixes stored under it
        for f in sorted(root.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    sl = st.get_slice(name)
                    shape = tuple(sl.get_shape())
                    self.meta[name] = (sl.get_dtype(), shape)
                    module, suffix = name.rsplit(".", 1)
                    self.suffixes.setdefault(module, set()).add(suffix)
                    if math.prod(shape) == 1:
                        self.scalars[name] = float(st.get_tensor(name).float().reshape(()))

    def quantized(self, module: str) -> bool:
        meta = self.meta.get(f"{module}.weight")
        return meta is not None and meta[0] not in HIGH_PRECISION


# ======================================================================== vLLM's view, restated
def vllm_quant_config(ex: Export) -> dict:
    """The dict from_config() receives (row config-source)."""
    qc = ex.config.get("quantization_config")
    if qc is not None:
        return qc
    assert ex.hf_quant is not None, "neither config.json quantization_config nor hf_quant_config.json"
    return ex.hf_quant


def vllm_method(cfg: dict) -> str | None:
    """Which ModelOpt config class vLLM picks for `cfg` (row config-method)."""
    cfg = dict(cfg)
    if cfg.get("producer", {}).get("name") == "modelopt" and "quantization" in cfg:
        algo = cfg["quantization"].get("quant_algo")
        cfg["quant_method"] = {"FP8": "modelopt", "NVFP4": "modelopt_fp4"}.get(algo, cfg.get("quant_method"))
    if not str(cfg.get("quant_method", "")).lower().startswith("modelopt"):
        return None
    inner = cfg.get("quantization", cfg)  # nested (hf_quant_config.json) or flat (config.json)
    algo = str(inner.get("quant_algo", "")).upper()
    if algo == "FP8":
        return "modelopt"
    if "NVFP4" in algo or "FP4" in algo:
        return "modelopt_fp4"
    return None


QUANT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8", "MIXED_PRECISION")
KV_CACHE_QUANT_ALGOS = ("FP8", "NVFP4")


@dataclass
class Parsed:
    quant_algo: str
    kv_cache_quant_algo: str | None
    exclude_modules: list
    group_size: int | None  # None: the NVFP4 config's default applies
    nvfp4_embed: bool
    problems: list[str] = field(default_factory=list)


def vllm_parse(cfg: dict) -> Parsed:
    """from_config()'s two layouts, restated (rows config-quant-algo, config-field-types, group size, kv)."""
    problems = []
    if "quantization" in cfg:  # hf_quant_config.json layout
        q = cfg["quantization"]
        algo, kv, gs, exclude = q.get("quant_algo"), q.get("kv_cache_quant_algo"), q.get("group_size"), \
            q.get("exclude_modules", [])
        embed = q.get("nvfp4_embed", False)
    else:  # config.json quantization_config layout
        algo, gs, exclude = cfg.get("quant_algo"), cfg.get("group_size"), cfg.get("ignore", [])
        scheme = cfg.get("kv_cache_scheme")
        kv = "FP8" if isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8 \
            else None
        embed = cfg.get("nvfp4_embed", False)
    if not algo:
        problems.append("Missing 'quant_algo'")
    algo = str(algo).upper()
    if algo not in QUANT_ALGOS:
        problems.append(f"quant_algo {algo!r} not in {QUANT_ALGOS}")
    if kv is not None and not isinstance(kv, str):
        problems.append(f"kv_cache_quant_algo must be a string, got {type(kv)}")
    kv = kv.upper() if isinstance(kv, str) else kv
    if not isinstance(exclude, list):
        problems.append(f"exclude_modules must be a list, got {type(exclude)}")
    if gs is not None and not isinstance(gs, int):
        try:
            gs = int(gs)
        except (TypeError, ValueError):
            problems.append(f"group_size must be an integer, got {type(gs)}")
    return Parsed(algo, kv, exclude, gs, bool(embed), problems)


def nvfp4_group_size(parsed: Parsed) -> int:
    return 16 if parsed.group_size is None else parsed.group_size


def vllm_excluded(prefix: str, patterns: list[str], packed: dict[str, list[str]]) -> bool:
    """is_layer_excluded for a vLLM layer prefix, restated (row exclude-rule)."""
    expanded = []
    for p in patterns:  # apply_vllm_mapper: ModelOpt's `path*` also as `path` and `path.*`
        expanded += [p[:-1], p[:-1] + ".*"] if len(p) >= 2 and p.endswith("*") and p[-2] != "." else [p]
    if not expanded:
        return False
    last = prefix.rsplit(".", 1)[-1]
    if last in packed:
        verdicts = {prefix[: -len(last)] + shard in expanded for shard in packed[last]}
        assert len(verdicts) == 1, f"{prefix}: vLLM raises, some but not all shards are excluded"
        exact = verdicts.pop()
    elif "experts" in prefix:
        exact = any(prefix in p for p in expanded if "experts" in p)
    else:
        exact = prefix in expanded
    if exact:
        return True
    bare = prefix.removeprefix("language_model.")
    if any(p != prefix and (p in prefix or p in bare) for p in expanded):
        return True
    return any(fnmatch(prefix, p) for p in expanded)


# ======================================================================== vLLM's layers per model
@dataclass(frozen=True)
class Linear:
    """One vLLM LinearBase layer: its prefix and the checkpoint modules (out, in) it loads."""

    prefix: str
    shards: tuple[tuple[str, int, int], ...]
    high_precision: bool = False  # lm_head / router: must stay unquantized

    @property
    def fused(self) -> bool:
        return len(self.shards) > 1


@dataclass(frozen=True)
class Moe:
    """One vLLM FusedMoE layer: checkpoint experts `{prefix}.{e}.{name}` (names: w1/gate, w2/down, w3/up)."""

    prefix: str
    names: tuple[str, str, str]
    num_experts: int
    hidden: int
    inter: int

    def shard_dims(self) -> dict[str, tuple[str, int, int]]:  # shard id -> (ckpt name, out, in)
        gate, down, up = self.names
        return {"w1": (gate, self.inter, self.hidden), "w2": (down, self.hidden, self.inter),
                "w3": (up, self.inter, self.hidden)}


@dataclass
class Layout:
    packed: dict[str, list[str]]
    linears: list[Linear]
    moes: list[Moe]
    attention: list[str]  # `model.layers.N.self_attn`


def _fused(base: str, name: str, parts: list[tuple[str, int, int]]) -> Linear:
    return Linear(f"{base}.{name}", tuple((f"{base}.{p}", o, i) for p, o, i in parts))


def _plain(base: str, name: str, out: int, inp: int, high_precision: bool = False) -> Linear:
    return Linear(f"{base}.{name}", ((f"{base}.{name}", out, inp),), high_precision)


def _gqa_attention(base: str, c: dict) -> list[Linear]:
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // heads
    return [_fused(base, "qkv_proj", [("q_proj", heads * hd, h), ("k_proj", kv * hd, h), ("v_proj", kv * hd, h)]),
            _plain(base, "o_proj", h, heads * hd)]


def _gated_mlp(base: str, h: int, inter: int) -> list[Linear]:
    return [_fused(base, "gate_up_proj", [("gate_proj", inter, h), ("up_proj", inter, h)]),
            _plain(base, "down_proj", h, inter)]


def vllm_layout(kind: str, c: dict) -> Layout:
    """The layers vLLM's model class builds for config `c`, from the model files in READ_AT."""
    h, n = c["hidden_size"], c["num_hidden_layers"]
    linears = [Linear("lm_head", (("lm_head", c["vocab_size"], h),), high_precision=True)]
    moes: list[Moe] = []
    attention = [f"model.layers.{i}.self_attn" for i in range(n)]
    if kind == "llama":
        packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
        for i in range(n):
            linears += _gqa_attention(f"model.layers.{i}.self_attn", c)
            linears += _gated_mlp(f"model.layers.{i}.mlp", h, c["intermediate_size"])
    elif kind == "qwen3_moe":
        assert not c.get("mlp_only_layers") and c.get("decoder_sparse_step", 1) == 1, "tiny model: every layer MoE"
        packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
        experts = c.get("num_experts") or c["num_local_experts"]
        for i in range(n):
            mlp = f"model.layers.{i}.mlp"
            linears += _gqa_attention(f"model.layers.{i}.self_attn", c)
            linears.append(_plain(mlp, "gate", experts, h, high_precision=True))
            moes.append(Moe(f"{mlp}.experts", ("gate_proj", "down_proj", "up_proj"), experts, h,
                            c["moe_intermediate_size"]))
    elif kind == "mixtral":
        packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
        experts = c["num_local_experts"]
        for i in range(n):
            moe = f"model.layers.{i}.block_sparse_moe"
            linears += _gqa_attention(f"model.layers.{i}.self_attn", c)
            linears.append(_plain(moe, "gate", experts, h, high_precision=True))
            moes.append(Moe(f"{moe}.experts", ("w1", "w2", "w3"), experts, h, c["intermediate_size"]))
    elif kind == "deepseek_v3":
        assert c.get("q_lora_rank"), "tiny model uses q_lora_rank (fused_qkv_a_proj)"
        packed = {"gate_up_proj": ["gate_proj", "up_proj"], "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"]}
        heads, rope, nope, v = (c["num_attention_heads"], c["qk_rope_head_dim"], c["qk_nope_head_dim"],
                                c["v_head_dim"])
        q_rank, kv_rank = c["q_lora_rank"], c["kv_lora_rank"]
        for i in range(n):
            attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            linears += [
                _fused(attn, "fused_qkv_a_proj", [("q_a_proj", q_rank, h), ("kv_a_proj_with_mqa", kv_rank + rope, h)]),
                _plain(attn, "q_b_proj", heads * (nope + rope), q_rank),
                _plain(attn, "kv_b_proj", heads * (nope + v), kv_rank),
                _plain(attn, "o_proj", h, heads * v),
            ]
            if i < c["first_k_dense_replace"]:
                linears += _gated_mlp(mlp, h, c["intermediate_size"])
                continue
            linears.append(_plain(mlp, "gate", c["n_routed_experts"], h, high_precision=True))
            linears += _gated_mlp(f"{mlp}.shared_experts", h, c["moe_intermediate_size"] * c["n_shared_experts"])
            moes.append(Moe(f"{mlp}.experts", ("gate_proj", "down_proj", "up_proj"), c["n_routed_experts"], h,
                            c["moe_intermediate_size"]))
    else:
        raise ValueError(kind)
    return Layout(packed, linears, moes, attention)


# ======================================================================== checkers, one per row
@dataclass
class Case:
    kind: str
    fmt: str  # NVFP4 / FP8
    ex: Export
    layout: Layout


CHECKS: dict[str, Callable[[Case], list[str]]] = {}


def check(req_id: str):
    def register(fn):
        CHECKS[req_id] = fn
        return fn
    return register


def _views(c: Case) -> dict[str, dict]:
    """Both config files, each as from_config would get it."""
    views = {}
    if "quantization_config" in c.ex.config:
        views["config.json"] = c.ex.config["quantization_config"]
    if c.ex.hf_quant is not None:
        views["hf_quant_config.json"] = c.ex.hf_quant
    return views


def _one_value(c: Case, name: str, problems: list[str]) -> float | None:
    meta = c.ex.meta.get(name)
    if meta is None:
        problems.append(f"{name}: missing")
        return None
    dtype, shape = meta
    if dtype != "F32" or math.prod(shape) != 1 or len(shape) > 1:
        problems.append(f"{name}: {dtype} {list(shape)}, vLLM expects one float32 value")
        return None
    value = c.ex.scalars[name]
    if not (math.isfinite(value) and value > 0):
        problems.append(f"{name}: {value} is not a positive finite scale")
    return value


def _module_tensors(c: Case, module: str, out: int, inp: int, problems: list[str]) -> None:
    """A quantized module's tensors as create_weights registers them for one shard."""
    expected = {"weight": [out, inp // 2], "weight_scale": [out, inp // _group_size(c)]} if c.fmt == NVFP4 \
        else {"weight": [out, inp]}
    for suffix, dtype in SUFFIXES[c.fmt].items():
        name = f"{module}.{suffix}"
        if suffix in expected:
            meta = c.ex.meta.get(name)
            if meta != (dtype, tuple(expected[suffix])):
                problems.append(f"{name}: {meta}, vLLM registers {dtype} {expected[suffix]}")
        else:
            _one_value(c, name, problems)
    extra = c.ex.suffixes.get(module, set()) - set(SUFFIXES[c.fmt]) - KV_SCALE_SUFFIXES
    problems += [f"{module}.{s}: a tensor vLLM's {c.fmt} method has no parameter for" for s in sorted(extra)]


def _group_size(c: Case) -> int:
    return nvfp4_group_size(vllm_parse(vllm_quant_config(c.ex)))


def _equal(c: Case, names: list[str], what: str, problems: list[str]) -> None:
    values = [c.ex.scalars.get(n) for n in names]
    if None not in values and len(set(values)) != 1:
        problems.append(f"{what}: {dict(zip(names, values, strict=True))} differ")


def _quantized_linears(c: Case) -> list[Linear]:
    return [lin for lin in c.layout.linears if not lin.high_precision]


@check("config-source")
def _(c: Case) -> list[str]:
    qc = c.ex.config.get("quantization_config")
    producer = (c.ex.hf_quant or {}).get("producer", {}).get("name")
    if isinstance(qc, dict):
        return []
    if producer == "modelopt":  # the hf_quant_config.json-only layout vLLM still accepts
        return []
    return [f"config.json has no quantization_config and hf_quant_config.json's producer is {producer!r}: "
            "vLLM would not load hf_quant_config.json as a ModelOpt config"]


@check("config-method")
def _(c: Case) -> list[str]:
    want = {NVFP4: "modelopt_fp4", FP8: "modelopt"}[c.fmt]
    got = vllm_method(vllm_quant_config(c.ex))
    return [] if got == want else [f"vLLM would pick quantization method {got!r}, want {want!r}"]


@check("config-quant-algo")
def _(c: Case) -> list[str]:
    problems = []
    for where, cfg in _views(c).items():
        p = vllm_parse(cfg)
        problems += [f"{where}: {m}" for m in p.problems if "quant_algo" in m]
        if p.quant_algo != c.fmt:
            problems.append(f"{where}: quant_algo {p.quant_algo!r}, want {c.fmt!r}")
    return problems


@check("nvfp4-required-fields")
def _(c: Case) -> list[str]:
    if c.ex.hf_quant is None:
        return ["no hf_quant_config.json"]
    q = c.ex.hf_quant.get("quantization", {})
    missing = [k for k in ("group_size", "kv_cache_quant_algo", "exclude_modules") if k not in q]
    return [f"hf_quant_config.json quantization lacks {missing}"] if missing else []


@check("config-field-types")
def _(c: Case) -> list[str]:
    return [f"{where}: {m}" for where, cfg in _views(c).items() for m in vllm_parse(cfg).problems]


@check("nvfp4-group-size")
def _(c: Case) -> list[str]:
    sizes = {where: nvfp4_group_size(vllm_parse(cfg)) for where, cfg in _views(c).items()}
    problems = [] if len(set(sizes.values())) == 1 else [f"effective group sizes differ: {sizes}"]
    gs = _group_size(c)
    for lin in _quantized_linears(c):
        for module, _out, inp in lin.shards:
            meta = c.ex.meta.get(f"{module}.weight_scale")
            if meta is not None and meta[1][-1] * gs != inp:
                problems.append(f"{module}.weight_scale {list(meta[1])}: not cut in groups of {gs} over {inp}")
    return problems


@check("kv-cache-algo")
def _(c: Case) -> list[str]:
    problems = []
    for where, cfg in _views(c).items():
        kv = vllm_parse(cfg).kv_cache_quant_algo
        if kv not in KV_CACHE_QUANT_ALGOS or kv != "FP8":
            problems.append(f"{where}: KV cache algo as vLLM reads it is {kv!r} (ModelOpt knows "
                            f"{KV_CACHE_QUANT_ALGOS}); the export was asked for FP8")
    return problems


@check("kv-scales")
def _(c: Case) -> list[str]:
    problems: list[str] = []
    for attn in c.layout.attention:
        for name in (f"{attn}.k_proj.k_scale", f"{attn}.v_proj.v_scale"):
            _one_value(c, name, problems)
    return problems


@check("exclude-list")
def _(c: Case) -> list[str]:
    lists = {where: sorted(vllm_parse(cfg).exclude_modules) for where, cfg in _views(c).items()}
    return [] if len({json.dumps(v) for v in lists.values()}) == 1 else [f"exclusion lists differ: {lists}"]


@check("exclude-rule")
def _(c: Case) -> list[str]:
    patterns = vllm_parse(vllm_quant_config(c.ex)).exclude_modules
    problems = []
    for lin in c.layout.linears:
        excluded = vllm_excluded(lin.prefix, patterns, c.layout.packed)
        stored = {c.ex.quantized(module) for module, _o, _i in lin.shards}
        if excluded == lin.high_precision and stored == {not excluded}:
            continue
        problems.append(f"{lin.prefix}: vLLM excludes={excluded}, checkpoint quantized={sorted(stored)}, "
                        f"expected {'high precision' if lin.high_precision else 'quantized'}")
    for moe in c.layout.moes:
        if vllm_excluded(moe.prefix, patterns, c.layout.packed):
            problems.append(f"{moe.prefix}: vLLM would load the experts unquantized")
    return problems


@check("router-precision")
def _(c: Case) -> list[str]:
    routers = [lin for lin in c.layout.linears if lin.high_precision and lin.prefix != "lm_head"]
    problems = [] if len(routers) == len(c.layout.moes) else [f"{len(routers)} routers for {len(c.layout.moes)} MoE"]
    for lin in routers:
        meta = c.ex.meta.get(f"{lin.prefix}.weight")
        _m, out, inp = lin.shards[0]
        if meta is None or meta[0] not in HIGH_PRECISION or meta[1] != (out, inp):
            problems.append(f"{lin.prefix}.weight: {meta}, vLLM's router wants a high-precision [{out}, {inp}]")
    return problems


@check("packed-modules")
def _(c: Case) -> list[str]:
    problems = []
    for lin in c.layout.linears:
        for module, _o, _i in lin.shards:
            if f"{module}.weight" not in c.ex.meta:
                problems.append(f"{module}.weight missing (shard of vLLM's {lin.prefix})")
    fused_in_ckpt = {k for k in c.ex.meta for name in c.layout.packed if f".{name}." in k}
    problems += [f"{k}: fused name in the checkpoint, vLLM loads shards" for k in sorted(fused_in_ckpt)]
    return problems


@check("nvfp4-linear-tensors")
@check("fp8-linear-tensors")
def _(c: Case) -> list[str]:
    problems: list[str] = []
    for lin in _quantized_linears(c):
        for module, out, inp in lin.shards:
            _module_tensors(c, module, out, inp, problems)
    return problems


@check("nvfp4-linear-in16")
def _(c: Case) -> list[str]:
    return [f"{module}: in_features {inp} % 16 != 0" for lin in _quantized_linears(c)
            for module, _o, inp in lin.shards if inp % 16]


@check("nvfp4-fused-global-scales")
@check("fp8-fused-scales")
def _(c: Case) -> list[str]:
    problems: list[str] = []
    global_scale = "weight_scale_2" if c.fmt == NVFP4 else "weight_scale"
    for lin in _quantized_linears(c):
        if lin.fused:
            for suffix in (global_scale, "input_scale"):
                _equal(c, [f"{m}.{suffix}" for m, _o, _i in lin.shards], f"{lin.prefix} {suffix}", problems)
    return problems


@check("moe-expert-names")
def _(c: Case) -> list[str]:
    problems = []
    for moe in c.layout.moes:
        present = {int(k[len(moe.prefix) + 1:].split(".", 1)[0]) for k in c.ex.meta if k.startswith(moe.prefix + ".")}
        if present != set(range(moe.num_experts)):
            problems.append(f"{moe.prefix}: experts {sorted(set(range(moe.num_experts)) ^ present)} missing or extra")
        for e in range(moe.num_experts):
            for name in moe.names:
                for suffix in SUFFIXES[c.fmt]:
                    if f"{moe.prefix}.{e}.{name}.{suffix}" not in c.ex.meta:
                        problems.append(f"{moe.prefix}.{e}.{name}.{suffix} missing")
    return problems


@check("nvfp4-moe-tensors")
@check("fp8-moe-tensors")
def _(c: Case) -> list[str]:
    problems: list[str] = []
    for moe in c.layout.moes:
        for e in range(moe.num_experts):
            for name, out, inp in moe.shard_dims().values():
                _module_tensors(c, f"{moe.prefix}.{e}.{name}", out, inp, problems)
    return problems


def _w1_w3_equal(c: Case, suffix: str) -> list[str]:
    problems: list[str] = []
    for moe in c.layout.moes:
        gate, _down, up = moe.names
        for e in range(moe.num_experts):
            _equal(c, [f"{moe.prefix}.{e}.{gate}.{suffix}", f"{moe.prefix}.{e}.{up}.{suffix}"],
                   f"{moe.prefix}.{e} w1/w3 {suffix}", problems)
    return problems


@check("nvfp4-moe-w13-scale2")
def _(c: Case) -> list[str]:
    return _w1_w3_equal(c, "weight_scale_2")


@check("moe-w13-input-scale")
def _(c: Case) -> list[str]:
    return _w1_w3_equal(c, "input_scale")


@check("fp8-moe-w13-scales")
def _(c: Case) -> list[str]:
    return _w1_w3_equal(c, "weight_scale")


@check("nvfp4-embed")
def _(c: Case) -> list[str]:
    problems = [f"{where}: nvfp4_embed set" for where, cfg in _views(c).items() if vllm_parse(cfg).nvfp4_embed]
    meta = c.ex.meta.get("model.embed_tokens.weight")
    want = (c.ex.config["vocab_size"], c.ex.config["hidden_size"])
    if meta is None or meta[0] not in HIGH_PRECISION or meta[1] != want:
        problems.append(f"model.embed_tokens.weight: {meta}, want high precision {list(want)}")
    return problems


# ======================================================================== exports and tests
CASES = [("llama", "nvfp4"), ("qwen3_moe", "nvfp4"), ("mixtral", "nvfp4"), ("deepseek_v3", "nvfp4"),
         ("llama", "fp8"), ("qwen3_moe", "fp8")]
MOE_KINDS = {"qwen3_moe", "mixtral", "deepseek_v3"}


def _export(kind: str, recipe: str, out: Path) -> Path:
    model = build_tiny_model(kind)
    batches = [{"input_ids": torch.randint(0, 256, (1, 8))}]
    qm = quantize(model, recipe, batches, kv_cache="fp8", progress=False)
    qm.export(out, progress=False)
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    built: dict[tuple[str, str], Case] = {}

    def get(kind: str, recipe: str) -> Case:
        if (kind, recipe) not in built:
            torch.manual_seed(0)
            ex = Export(_export(kind, recipe, tmp_path_factory.mktemp(f"{kind}_{recipe}") / "out"))
            built[kind, recipe] = Case(kind, recipe.upper(), ex, vllm_layout(kind, ex.config))
        return built[kind, recipe]

    return get


def _params():
    for kind, recipe in CASES:
        for req in REQUIREMENTS:
            if recipe.upper() in req.formats and (kind in MOE_KINDS or not req.moe_only):
                yield pytest.param(kind, recipe, req, id=f"{kind}-{recipe}-{req.id}")


@pytest.mark.parametrize(("kind", "recipe", "req"), list(_params()))
def test_export_meets_vllm_requirement(cases, kind, recipe, req):
    problems = CHECKS[req.id](cases(kind, recipe))
    cited = "; ".join(f"{VLLM_REPO}: {path} {fn} @ {READ_AT[path][:12]}" for path, fn in req.where)
    assert not problems, f"[{req.id}] {req.rule}\n  (from {cited})\n  " + "\n  ".join(problems[:12])


def test_requirement_table_is_complete_and_cited():
    ids = [r.id for r in REQUIREMENTS]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(CHECKS), set(ids) ^ set(CHECKS)
    for r in REQUIREMENTS:
        assert r.where and r.rule and set(r.formats) <= {NVFP4, FP8}
        for path, fn in r.where:
            assert path in READ_AT and fn, r.id
    assert all(len(c) == 40 and int(c, 16) >= 0 for c in READ_AT.values())
    assert MODELOPT_PY in {path for r in REQUIREMENTS for path, _fn in r.where}


def test_every_expert_layer_and_fused_layer_is_covered(cases):
    """The layouts are not vacuous: every quantized checkpoint module is a shard vLLM loads."""
    for kind, recipe in CASES:
        c = cases(kind, recipe)
        known = {m for lin in c.layout.linears for m, _o, _i in lin.shards}
        known |= {f"{moe.prefix}.{e}.{n}" for moe in c.layout.moes for e in range(moe.num_experts) for n in moe.names}
        quantized = {k.rsplit(".", 1)[0] for k, (dtype, _s) in c.ex.meta.items()
                     if k.endswith(".weight") and dtype not in HIGH_PRECISION}
        assert quantized and quantized <= known, (kind, recipe, sorted(quantized - known)[:5])
        assert known - {lin.prefix for lin in c.layout.linears if lin.high_precision} <= quantized


def test_checkers_catch_a_broken_export(cases, tmp_path):
    """Tamper with a copy of the qwen3_moe NVFP4 export: each rule that should fire does."""
    good = cases("qwen3_moe", "nvfp4")
    bad_dir = tmp_path / "bad"
    shutil.copytree(good.ex.root, bad_dir)
    (st,) = bad_dir.glob("*.safetensors")
    tensors = load_file(str(st))
    moe = good.layout.moes[1]
    gate, _down, up = moe.names
    last = moe.num_experts - 1
    for suffix in SUFFIXES[NVFP4]:
        del tensors[f"{moe.prefix}.{last}.{up}.{suffix}"]
    tensors[f"{moe.prefix}.3.{up}.weight_scale_2"] = tensors[f"{moe.prefix}.3.{gate}.weight_scale_2"] * 2
    tensors[f"{moe.prefix}.4.{up}.input_scale"] = tensors[f"{moe.prefix}.4.{gate}.input_scale"] * 2
    tensors["model.layers.0.self_attn.k_proj.input_scale"] *= 2
    tensors["model.layers.0.mlp.gate.weight"] = tensors["model.layers.0.mlp.gate.weight"].to(torch.float8_e4m3fn)
    tensors["model.layers.1.self_attn.o_proj.weight_scale"] = tensors["model.layers.1.self_attn.o_proj.weight_scale"][:, :1].contiguous()
    save_file(tensors, str(st), metadata={"format": "pt"})
    cfg = json.loads((bad_dir / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = ["lm_head", "model.layers.0.mlp.gate"]
    cfg["quantization_config"].pop("kv_cache_scheme")
    (bad_dir / "config.json").write_text(json.dumps(cfg))

    bad = Case("qwen3_moe", NVFP4, Export(bad_dir), good.layout)
    fired = {rid: CHECKS[rid](bad) for rid in CHECKS if NVFP4 in next(r for r in REQUIREMENTS if r.id == rid).formats}
    for rid, needle in [
        ("moe-expert-names", f"{moe.prefix}.{last}.{up}.weight missing"),
        ("nvfp4-moe-w13-scale2", f"{moe.prefix}.3 w1/w3 weight_scale_2"),
        ("moe-w13-input-scale", f"{moe.prefix}.4 w1/w3 input_scale"),
        ("nvfp4-fused-global-scales", "model.layers.0.self_attn.qkv_proj input_scale"),
        ("exclude-rule", "model.layers.1.mlp.gate"),
        ("router-precision", "model.layers.0.mlp.gate.weight"),
        ("nvfp4-linear-tensors", "model.layers.1.self_attn.o_proj.weight_scale"),
        ("exclude-list", "exclusion lists differ"),
        ("kv-cache-algo", "config.json: KV cache algo"),
    ]:
        assert any(needle in p for p in fired[rid]), (rid, fired[rid][:5])
    assert not fired["config-method"] and not fired["nvfp4-required-fields"]
