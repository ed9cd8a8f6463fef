"""Model Optimizer "unified HF checkpoint" layout: tensor naming and config files.

Per quantized module M (original checkpoint name, one per expert even where transformers
holds experts fused): NVFP4 `M.weight` (uint8 packed), `M.weight_scale` (e4m3 [out, in/16]),
`M.weight_scale_2` and `M.input_scale` (fp32, 0-dim); FP8 `M.weight` (e4m3), `M.weight_scale`,
`M.input_scale`. KV cache: `<attn>.k_proj.k_scale`, `<attn>.v_proj.v_scale` (the names Model
Optimizer writes, modelopt/torch/export/quant_utils.py `_KV_CACHE_REPLACEMENTS`; vLLM remaps them
to `attn.k_scale`). Consumer: vLLM's `ModelOptNvFp4Config` / `ModelOptFp8Config` and their
linear and fused-MoE methods, TensorRT-LLM, SGLang.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from quantship import __version__
from quantship.formats.handlers import FormatHandler
from quantship.model.checkpoint_names import CheckpointSlice

PRODUCER = {"name": "quantship", "version": __version__}


def _row_span(rows: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) when ``rows`` is ``start, start+1, ..., stop-1``, else None."""
    n = rows.numel()
    if n == 0:
        return None
    start = int(rows[0])
    return (start, start + n) if torch.equal(rows.cpu(), torch.arange(start, start + n, dtype=rows.dtype)) else None


def split_module_tensors(
    tensors: dict[str, torch.Tensor], slices: list[CheckpointSlice], handler: FormatHandler
) -> Iterator[tuple[str, torch.Tensor]]:
    """Cut one in-memory quantized tensor set into the checkpoint's per-module tensors.

    Row-aligned tensors (packed weight, block scales) take the slice's rows; per-tensor scales
    take the slice's expert entry. Stateless: inputs are not modified.
    """
    select = getattr(handler, "select_rows", None)  # optional hook: packed rows, tiles, per-input vectors
    for sl in slices:
        span = _row_span(sl.rows)
        for suffix, value in tensors.items():
            if sl.expert is not None:
                value = value[sl.expert]
            if suffix not in handler.per_tensor:
                if select is not None:
                    value = select(suffix, value, sl.rows)
                elif span is not None:  # a view; the shard writer copies it once anyway
                    value = value[span[0] : span[1]]
                else:
                    value = value.index_select(0, sl.rows.to(value.device))
            yield f"{sl.module}.{suffix}", value.reshape(()) if suffix in handler.per_tensor else value


# Extra keys Model Optimizer 0.47 writes for AWQ algorithms, after group_size
# (export/quant_utils.py `process_layer_quant_config`).
_AWQ_FLAGS = {"has_zero_point": False, "pre_quant_scale": True}
_ALGO_FLAGS = {"W4A16_AWQ": _AWQ_FLAGS, "W4A8_AWQ": _AWQ_FLAGS, "NVFP4_AWQ": _AWQ_FLAGS}


def hf_quant_config(quant_algo: str, group_size: int | None, kv_cache_quant_algo: str | None,
                    exclude_modules: list[str]) -> dict:
    """Content of hf_quant_config.json."""
    quantization: dict = {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_cache_quant_algo}
    if group_size is not None:
        quantization["group_size"] = group_size
    quantization.update(_ALGO_FLAGS.get(quant_algo, {}))
    quantization["exclude_modules"] = sorted(exclude_modules)
    return {"producer": dict(PRODUCER), "quantization": quantization}


def config_json_quantization(hf_config: dict) -> dict:
    """The `quantization_config` entry of config.json, in the shape Model Optimizer 0.47 writes
    (modelopt/torch/export/convert_hf_config.py): config_groups + ignore + quant_method modelopt."""
    q = hf_config["quantization"]
    algo = q["quant_algo"]
    group = None
    if algo == "NVFP4":
        gs = q.get("group_size", 16)
        group = {
            "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": gs},
            "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": gs},
            "targets": ["Linear"],
        }
    elif algo == "FP8":
        group = {
            "input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
            "weights": {"dynamic": False, "num_bits": 8, "type": "float"},
            "targets": ["Linear"],
        }
    # Every other single algorithm: no config_groups, as `convert_hf_quant_config_format` writes.
    out: dict = {"config_groups": {"group_0": group}} if group else {}
    out.update({"ignore": list(q["exclude_modules"]), "quant_algo": algo})
    kv = q.get("kv_cache_quant_algo")
    if kv == "FP8":
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    elif kv:
        out["kv_cache_scheme"] = kv
    out["producer"] = dict(hf_config["producer"])
    out["quant_method"] = "modelopt"
    return out
