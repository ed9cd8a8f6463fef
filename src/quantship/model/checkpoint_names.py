"""Map in-memory parameters to the tensor names of the original checkpoint.

transformers >= 5 renames and fuses tensors on load (per-expert `experts.17.gate_proj.weight`
become rows of one `experts.gate_up_proj`; Mixtral's `block_sparse_moe` becomes `mlp`) and
reverts that on `save_pretrained`. Serving engines load the original names, so the exporter
must too. Rather than re-implementing each model's conversion table, we run transformers' own
reverse conversion on a *row-index probe*: a tensor whose value at each row is that row's flat
index. Wherever a row lands tells which checkpoint tensor it belongs to, and that mapping
applies to the packed weight and block scales alike (both keep the rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from quantship.errors import QuantshipError


@dataclass(frozen=True)
class CheckpointSlice:
    """Rows `rows` of in-memory matrix `expert` (None for 2-D) form checkpoint tensor `name`."""

    name: str  # e.g. "model.layers.1.mlp.experts.3.gate_proj.weight"
    expert: int | None
    rows: torch.Tensor  # int64 row indices into the in-memory matrix

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


def checkpoint_slices(model: nn.Module, param_name: str, shape: torch.Size) -> list[CheckpointSlice]:
    """How the in-memory parameter `param_name` of `shape` splits into checkpoint tensors."""
    if len(shape) == 3:
        n_exp, rows = shape[0], shape[1]
        probe = torch.arange(n_exp * rows).view(n_exp, rows, 1)
    elif len(shape) == 2:
        n_exp, rows = 1, shape[0]
        probe = torch.arange(rows).view(rows, 1)
    else:
        raise ValueError(f"{param_name}: expected a 2-D or 3-D weight, got shape {tuple(shape)}")
    reverted = revert_weight_conversion(model, {param_name: probe})
    slices = []
    for name, value in reverted.items():
        flat = value.reshape(-1)
        if len(shape) == 2:
            slices.append(CheckpointSlice(name, None, flat))
            continue
        # One expert iff the smallest and largest flat index fall in the same one (aminmax: ~8x
        # cheaper than torch.unique, and this runs for each of 128+ experts x 3 projections).
        lo, hi = torch.aminmax(flat) if flat.numel() else (torch.tensor(0), torch.tensor(rows))
        experts = int(lo) // rows
        if int(hi) // rows != experts or value.dim() > 2 or (value.dim() == 2 and value.shape[1] != 1):
            raise QuantshipError(
                f"cannot map {param_name} back to checkpoint tensors (its conversion mixes experts or "
                "transposes); report the model type"
            )
        slices.append(CheckpointSlice(name, int(experts), flat % rows))
    return slices


def checkpoint_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reverse-convert high-precision tensors (norms, embeddings, routers, lm_head) to checkpoint names."""
    return revert_weight_conversion(model, dict(tensors))
