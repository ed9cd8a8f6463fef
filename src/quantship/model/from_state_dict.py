"""Build a HF model from a config folder and an in-memory state dict in checkpoint names.

transformers' `from_pretrained(None, config=..., state_dict=...)` runs the same weight
conversion as loading files (per-expert tensors fused into 3-D experts, renames), so tensors
that we produce in memory — dequantized exports, dequantized FP8/INT4 sources — load exactly
as a checkpoint on disk would, without writing a high-precision copy to disk.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from quantship.errors import QuantshipError


def causal_lm_class(config, config_dir: Path, trust_remote_code: bool) -> type[nn.Module]:
    """The model class `AutoModelForCausalLM` would pick, remote code included."""
    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModelForCausalLM" in auto_map:
        if not trust_remote_code:
            raise QuantshipError(
                f"{config_dir} needs its own model code; rerun with --trust-remote-code if you trust it"
            )
        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], str(config_dir))
    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise QuantshipError(f"{config_dir}: model type {config.model_type!r} has no causal-LM class") from None


def model_from_state_dict(config_dir: str | Path, state_dict: dict[str, torch.Tensor],
                          dtype: torch.dtype = torch.bfloat16, trust_remote_code: bool = False,
                          drop_quantization_config: bool = True) -> nn.Module:
    config_dir = Path(config_dir)
    config = AutoConfig.from_pretrained(config_dir, trust_remote_code=trust_remote_code)
    if drop_quantization_config and hasattr(config, "quantization_config"):
        del config.quantization_config
    cls = causal_lm_class(config, config_dir, trust_remote_code)
    return cls.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype).eval()
