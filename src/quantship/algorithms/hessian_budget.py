"""How many experts' GPTQ Hessians a layer holds at once.

An expert's Hessians are cols² float32 per fused projection: 205 MB for a DeepSeek-V3 expert's
gate_up inputs (hidden 7168), 52 GB for the layer's 256 experts, next to the 23 GB layer itself.
Past the budget the layer's experts are collected in ranges, each with its own pass over the
calibration set (the Linears' Hessians come with the first): more forward passes, bounded memory.
"""

from __future__ import annotations

import torch

from quantship.algorithms.gptq import GPTQConfig
from quantship.scales import QuantTarget

FREE_MEMORY_SHARE = 0.4  # of the GPU's free memory at the layer's start, when no budget is given


def hessian_budget(config: GPTQConfig, device: torch.device) -> int | None:
    """Bytes of experts' Hessians allowed at once; None: no bound (CPU without a given budget)."""
    if config.max_hessian_bytes is not None:
        return config.max_hessian_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(FREE_MEMORY_SHARE * free)
    return None


def expert_ranges(targets: list[QuantTarget], config: GPTQConfig, device: torch.device) -> list[range | None]:
    """[None] (every expert in one pass) when the experts' Hessians fit the budget, else the
    expert ranges to collect one pass at a time (at least one expert each)."""
    fused = [t for t in targets if t.fused_experts]
    budget = hessian_budget(config, device) if fused else None
    if budget is None:
        return [None]
    n_exp = max(t.weight.shape[0] for t in fused)
    per_expert = sum(4 * t.weight.shape[-1] ** 2 for t in fused)
    if n_exp * per_expert <= budget:
        return [None]
    step = max(1, budget // per_expert)
    return [range(i, min(i + step, n_exp)) for i in range(0, n_exp, step)]
