"""The tensors each checkpoint layout writes per quantized module, as data.

Read from the producers' installed sources:
- Model Optimizer 0.47 `export/unified_export_hf.py` (`_export_quantized_weight`) and
  `export/quant_utils.py` (`_KV_CACHE_REPLACEMENTS`: KV scales at `<attn>.k_proj.k_scale`).
  Its own export of a tiny Llama/Qwen3-MoE writes every per-tensor scale as a 0-dim float32.
- compressed-tensors 0.20 `compressors/nvfp4/base.py` (`weight_packed`, `weight_scale`,
  `weight_global_scale`, `input_global_scale`) and `quantization/lifecycle/initialize.py`
  (`initialize_qparams`: global scales float32 `[1]`; per-tensor scales `[1]` in the model's
  float dtype; per-channel `[out, 1]`; `initialize_attn_qparams` registers `k_scale`/`v_scale`
  on the attention module itself, `quantization/quant_metadata.py` `KVCacheScaleType`).
"""

import fnmatch
import re
from dataclasses import dataclass, field

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"

FLOAT_SCALE_DTYPES = ("F32", "BF16", "F16")
FLOAT_WEIGHT_DTYPES = ("F32", "BF16", "F16", "F64")
# A `weight` of one of these dtypes is a quantized weight, whatever the declared format.
QUANT_WEIGHT_DTYPES = ("U8", "F8_E4M3", "F8_E5M2", "I8")

# safetensors dtype codes, shown to users as torch dtype names.
DTYPE_NAMES = {
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
}


def dtype_name(code: str) -> str:
    return DTYPE_NAMES.get(code, code)


@dataclass(frozen=True)
class ScaleSpec:
    """One scale tensor: accepted dtypes and shape rule.

    shape: "one" = a single element (0-dim or [1]); "blocks" = one per `group_size` inputs of
    the weight (`weight.shape[:-1] + [in / group_size]`); "one_or_row" = one element or `[out, 1]`.
    """

    dtypes: tuple[str, ...]
    shape: str


@dataclass(frozen=True)
class AlgoSpec:
    """What one quantized linear module carries in one layout and algorithm."""

    weight: str  # name of the quantized weight tensor
    weight_dtype: str
    packed: bool  # two 4-bit codes per byte along the input dimension
    scales: dict[str, ScaleSpec]
    input_scale: str  # the activation scale, required when activations are statically scaled
    # Scales that siblings fused into one GEMM must share. FP8 per-tensor weight scales may differ:
    # Model Optimizer skips FP8 in `_fuse_shared_input_modules` (unified_export_hf.py) and
    # serving engines requantize the shards to their max weight scale at load time.
    fused_shared: tuple[str, ...]
    # Tensors a module may carry but need not: AWQ's `pre_quant_scale` is folded into the
    # preceding norm where one feeds the module (Model Optimizer `fuse_prequant_layernorm`).
    optional: dict[str, ScaleSpec] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.weight, *self.scales, *self.optional)


_ONE_F32 = ScaleSpec(("F32",), "one")
_BLOCKS_E4M3 = ScaleSpec(("F8_E4M3",), "blocks")

SPECS: dict[tuple[str, str], AlgoSpec] = {
    (MODELOPT, "NVFP4"): AlgoSpec(
        weight="weight",
        weight_dtype="U8",
        packed=True,
        scales={"weight_scale": _BLOCKS_E4M3, "weight_scale_2": _ONE_F32, "input_scale": _ONE_F32},
        input_scale="input_scale",
        fused_shared=("weight_scale_2", "input_scale"),
    ),
    (MODELOPT, "FP8"): AlgoSpec(
        weight="weight",
        weight_dtype="F8_E4M3",
        packed=False,
        scales={"weight_scale": _ONE_F32, "input_scale": _ONE_F32},
        input_scale="input_scale",
        fused_shared=("input_scale",),
    ),
    # weight_global_scale = 448 * 6 / amax: the reciprocal of Model Optimizer's weight_scale_2.
    (COMPRESSED_TENSORS, "NVFP4"): AlgoSpec(
        weight="weight_packed",
        weight_dtype="U8",
        packed=True,
        scales={
            "weight_scale": _BLOCKS_E4M3,
            "weight_global_scale": _ONE_F32,
            "input_global_scale": _ONE_F32,
        },
        input_scale="input_global_scale",
        fused_shared=("weight_global_scale", "input_global_scale"),
    ),
    (COMPRESSED_TENSORS, "FP8"): AlgoSpec(
        weight="weight",
        weight_dtype="F8_E4M3",
        packed=False,
        scales={
            "weight_scale": ScaleSpec(FLOAT_SCALE_DTYPES, "one_or_row"),
            "input_scale": ScaleSpec(FLOAT_SCALE_DTYPES, "one"),
        },
        input_scale="input_scale",
        fused_shared=("input_scale",),
    ),
}

# The rest of hf_ptq's formats, as Model Optimizer 0.47 writes them (its own per-module export is
# the oracle: tests/formats/test_more_formats_modelopt.py). Shape kinds other than "one",
# "blocks" and "one_or_row" are checked by verify/scale_shapes.py.
_ROWS_F32 = ScaleSpec(("F32",), "rows")  # [out]
_PQS = {"pre_quant_scale": ScaleSpec(FLOAT_SCALE_DTYPES, "per_input")}  # [in]


def _more(weight_dtype: str, packed: bool, scales: dict[str, ScaleSpec], shared: tuple[str, ...] = (),
          optional: dict[str, ScaleSpec] | None = None) -> AlgoSpec:
    return AlgoSpec("weight", weight_dtype, packed, scales, "input_scale", shared, dict(optional or {}))


_W4A8_SCALES = {"weight_scale_2": _ONE_F32, "input_scale": _ONE_F32}
SPECS.update({
    (MODELOPT, "FP8_PER_CHANNEL_PER_TOKEN"): _more("F8_E4M3", False, {"weight_scale": _ROWS_F32}),
    (MODELOPT, "fp8_pb_wo"): _more("F8_E4M3", False, {"weight_scale": ScaleSpec(("F32",), "tiles_128")}),
    # INT4 packs pairs of output rows: weight [out/2, in], weight_scale [out, in/group].
    (MODELOPT, "W4A16_AWQ"): _more("U8", False, {"weight_scale": ScaleSpec(("F32",), "int4_groups")},
                                   optional=_PQS),
    (MODELOPT, "W4A8_AWQ"): _more("U8", False, {"weight_scale": ScaleSpec(("F32",), "int4_groups"),
                                                **_W4A8_SCALES}, ("weight_scale_2", "input_scale"), _PQS),
    (MODELOPT, "NVFP4_AWQ"): _more("U8", True, {"weight_scale": _BLOCKS_E4M3, **_W4A8_SCALES},
                                   ("weight_scale_2", "input_scale"), _PQS),
    (MODELOPT, "W4A8_NVFP4_FP8"): _more("U8", True, {"weight_scale": _BLOCKS_E4M3, **_W4A8_SCALES},
                                        ("weight_scale_2", "input_scale")),
    (MODELOPT, "MXFP8"): _more("F8_E4M3", False, {"weight_scale": ScaleSpec(("U8",), "blocks_32")}),
    # Model Optimizer writes no group_size for mxfp4 (lower case: its fall-through name).
    (MODELOPT, "mxfp4"): _more("U8", True, {"weight_scale": ScaleSpec(("U8",), "blocks_32")}),
    (MODELOPT, "W8A8_SQ_PER_CHANNEL"): _more("I8", False, {"weight_scale": _ROWS_F32, "input_scale": _ONE_F32},
                                             ("input_scale",), _PQS),
    (MODELOPT, "W8A16"): _more("I8", False, {"weight_scale": _ROWS_F32}),
    # compressed-tensors MX formats (`compressors/mxfp4`, `compressors/mxfp8`), checked under their format name.
    (COMPRESSED_TENSORS, "mxfp4-pack-quantized"): AlgoSpec("weight_packed", "U8", True,
                                                          {"weight_scale": ScaleSpec(("U8",), "blocks")}, "", ()),
    (COMPRESSED_TENSORS, "mxfp8-quantized"): AlgoSpec("weight", "F8_E4M3", False,
                                                     {"weight_scale": ScaleSpec(("U8",), "blocks")}, "", ()),
})
KNOWN_ALGOS = sorted({algo for _, algo in SPECS})

# Any module carrying one of these is a quantized module, whatever the declared format.
QUANT_PARAM_NAMES = frozenset(name for spec in SPECS.values() for name in spec.names) - {"weight"}


@dataclass(frozen=True)
class KvSpec:
    """Where KV-cache scales live, first the layout's own place, then the other one a serving
    engine also accepts (vLLM remaps both to its attention layer)."""

    locations: tuple[str, ...]  # templates over {attn} (attention module) and {x} ("k"/"v")
    dtypes: tuple[str, ...]


KV_SPECS = {
    MODELOPT: KvSpec(("{attn}.{x}_proj.{x}_scale", "{attn}.{x}_scale"), ("F32",)),
    # compressed-tensors' own ModelOptNvfp4Converter (entrypoints/convert/converters/
    # modelopt_nvfp4.py) keeps Model Optimizer's `k_proj.k_scale` names, in bfloat16.
    COMPRESSED_TENSORS: KvSpec(("{attn}.{x}_scale", "{attn}.{x}_proj.{x}_scale"), FLOAT_SCALE_DTYPES),
}


def modelopt_matches(name: str, pattern: str) -> bool:
    """Model Optimizer's exclude_modules are fnmatch wildcards (vLLM's `is_layer_excluded`)."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def compressed_tensors_matches(name: str, pattern: str) -> bool:
    """compressed-tensors `utils/match.py` `match_name`: "re:" prefix is `re.match`, else equality."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern


MATCHERS = {MODELOPT: modelopt_matches, COMPRESSED_TENSORS: compressed_tensors_matches}

# Modules a serving engine runs as quantized linears when a checkpoint declares a format: the
# projections of attention and MLP blocks, and everything inside an experts container.
_PROJECTION_LEAF = re.compile(r"(proj|proj_with_mqa|^w[123])$")


def is_projection(module: str) -> bool:
    leaf = module.rpartition(".")[2]
    return bool(_PROJECTION_LEAF.search(leaf)) or ".experts." in f"{module}."
