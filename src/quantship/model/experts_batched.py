"""The fused-experts forward as batched tensor work: no Python loop over experts, no host sync.

Calibration runs every MoE block through our own forward (``experts.py`` says why). The loop
over experts there costs one GEMM pair plus a host sync per hit expert; with 128 experts and
8 layers that is a thousand small launches per batch. Here the (token, expert) pairs are
sorted by expert once and both projections run as one grouped GEMM each
(``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``, the kernels transformers' own
``grouped_mm`` experts implementation uses) or, where no grouped GEMM serves the dtype, as one
padded batched matmul. Per-expert statistics come out of the same pass: input amax per pair
row reduced into experts with ``scatter_reduce``.

The output is accumulated as transformers' grouped forward does (routing-weighted bf16 rows,
summed over the k experts of a token in float32, rounded once), so calibration sees the
activations the model itself computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantship.model.discover import FusedExperts


def grouped_mm_function():
    """The grouped GEMM of this torch (public name first), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def can_group(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Grouped GEMM kernels take bf16 operands on CUDA (and any float on the CPU fallback)."""
    if grouped_mm_function() is None:
        return False
    if x.is_cuda:
        return x.dtype == weight.dtype == torch.bfloat16
    return x.dtype == weight.dtype


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (sorted by expert, expert e ending at ``offsets[e]``) times ``weight[e].T``."""
    return grouped_mm_function()(x, weight.transpose(-2, -1), offs=offsets)


def _padded_linear(x: torch.Tensor, weight: torch.Tensor, expert: torch.Tensor, slot: torch.Tensor,
                   width: int) -> torch.Tensor:
    """The same product through one ``bmm`` over experts, each padded to ``width`` rows."""
    padded = x.new_zeros((weight.shape[0], width, x.shape[-1]))
    padded[expert, slot] = x
    return torch.bmm(padded, weight.transpose(-2, -1))[expert, slot]


def _per_expert(kind: str, rows: torch.Tensor, bounds: list[int], act, on_input,
                expert: torch.Tensor) -> torch.Tensor:
    """Apply the per-expert activation fake-quant `act(x, e)` and observer `on_input(kind, x, e)`
    to the expert-sorted `rows` (expert e ends at bounds[e]; `expert`: each row's expert): an
    `act` with a `rows(x, expert_of_row)` method fake-quantizes all rows in one call, else one
    call per hit expert on a slice; the observer gets each expert's slice. The GEMMs stay grouped."""
    if act is not None and getattr(act, "rows", None) is not None:
        rows, act = act.rows(rows, expert), None
    if act is None and on_input is None:
        return rows
    out = rows if act is None else torch.empty_like(rows)
    start = 0
    for e, end in enumerate(bounds):
        if end == start:
            continue
        seg = rows[start:end]
        if act is not None:
            seg = act(seg, e)
            out[start:end] = seg
        if on_input is not None:
            on_input(kind, seg, e)
        start = end
    return out


def batched_experts_forward(fe: FusedExperts, hidden: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor, gate_up_weight: torch.Tensor | None = None,
                            down_weight: torch.Tensor | None = None, grouped: bool | None = None,
                            act_quant_gate_up=None, act_quant_down=None, on_input=None):
    """Routed experts output for ``hidden [T, H]`` and ``ExpertStats``, as ``fused_experts_forward``.
    ``grouped=None`` picks the grouped GEMM when it serves these tensors, else the padded ``bmm``.
    Activation fake-quant and input observers (GPTQ's Hessians) are called per hit expert on
    slices of the sorted rows, between the grouped GEMMs (one host sync for the expert bounds)."""
    from quantship.model.experts import ExpertStats, _apply_gate

    gate_up = fe.gate_up if gate_up_weight is None else gate_up_weight
    down = fe.down if down_weight is None else down_weight
    n_tokens, k = top_k_index.shape
    n_exp = fe.num_experts
    device = hidden.device
    flat_expert = top_k_index.reshape(-1)
    expert_sorted, perm = torch.sort(flat_expert, stable=True)
    # Expert-parallel sentinels (ids >= E) sort last; they are counted nowhere and the grouped
    # GEMM never reads rows past offsets[-1].
    valid = expert_sorted < n_exp
    expert = expert_sorted.clamp(max=n_exp - 1)
    counts = torch.zeros(n_exp, dtype=torch.int64, device=device).scatter_add_(0, expert, valid.long())
    token = perm // k
    x = hidden[token]

    token_amax = hidden.detach().abs().amax(dim=-1).float()
    zero = torch.zeros((), dtype=torch.float32, device=device)
    gate_up_amax = torch.zeros(n_exp, dtype=torch.float32, device=device).scatter_reduce_(
        0, expert, torch.where(valid, token_amax[token], zero), "amax")

    if grouped is None:
        grouped = can_group(x, gate_up)
    if grouped:
        offsets = counts.cumsum(0).to(torch.int32)

        def linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return _grouped_linear(a, w, offsets)
    else:
        starts = counts.cumsum(0) - counts
        slot = torch.arange(expert.numel(), device=device) - starts[expert]
        width = int(counts.max()) if counts.numel() else 0  # the one host sync of this path

        def linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return _padded_linear(a, w, expert, slot, width)

    hooked = act_quant_gate_up is not None or act_quant_down is not None or on_input is not None
    bounds = counts.cumsum(0).tolist() if hooked else []
    x = _per_expert("gate_up", x, bounds, act_quant_gate_up, on_input, expert)
    h = _apply_gate(fe.module, linear(x, gate_up))
    row_amax = h.detach().abs().amax(dim=-1).float()
    down_amax = torch.zeros(n_exp, dtype=torch.float32, device=device).scatter_reduce_(
        0, expert, torch.where(valid, row_amax, zero), "amax")
    h = _per_expert("down", h, bounds, act_quant_down, on_input, expert)
    y = linear(h, down)
    y = torch.where(valid[:, None], y, torch.zeros((), dtype=y.dtype, device=device))
    weighted = y * top_k_weights.reshape(-1)[perm, None].to(y.dtype)
    unsorted = torch.empty_like(weighted)
    unsorted[perm] = weighted
    out = unsorted.view(n_tokens, k, -1).sum(dim=1, dtype=torch.float32)
    return out.to(hidden.dtype), ExpertStats(counts.float(), gate_up_amax, down_amax)
