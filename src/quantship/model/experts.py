"""Our own forward for fused 3-D experts, with hooks for statistics and activation fake-quant.

transformers >= 5 computes the intermediate activation of each expert (the down projection's
input) inside one function, where no module hook can see it. Calibration needs its per-expert
amax, so during calibration (and for fake-quant evaluation) the experts module's forward is
replaced by this one. It follows the layout transformers' experts integration documents
(`gate_up [E, 2I, H]` concatenated gate then up, `down [E, H, I]`, `_apply_gate`), and
`check_layout` compares it with the module's own forward so an unknown layout fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantship.errors import QuantshipError
from quantship.model.discover import FusedExperts

# (activation, expert index) -> fake-quantized activation
ActQuant = Callable[[torch.Tensor, int], torch.Tensor]
# (projection "gate_up" or "down", its input as the GEMM sees it, expert index); GPTQ's
# per-expert Hessians are built from these routed inputs.
InputObserver = Callable[[str, torch.Tensor, int], None]


@dataclass
class ExpertStats:
    """Per-expert statistics of one forward call (float32 vectors of length E)."""

    tokens: torch.Tensor  # routed (token, expert) pairs
    gate_up_input_amax: torch.Tensor  # over routed tokens; 0 where none
    down_input_amax: torch.Tensor


def _apply_gate(module: torch.nn.Module, gate_up_out: torch.Tensor) -> torch.Tensor:
    if hasattr(module, "_apply_gate"):
        return module._apply_gate(gate_up_out)
    gate, up = gate_up_out.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def check_supported(fe: FusedExperts) -> None:
    """Refuse fused layouts this forward does not implement (bias, transposed, no gate)."""
    m = fe.module
    if getattr(m, "has_bias", False) or getattr(m, "is_transposed", False) or not getattr(m, "has_gate", True):
        raise QuantshipError(
            f"fused experts at {fe.name} use a layout quantship does not support yet "
            "(bias, transposed or ungated experts); exclude them with --exclude '{fe.name}*'"
        )


def fused_experts_forward(
    fe: FusedExperts,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    act_quant_gate_up: ActQuant | None = None,
    act_quant_down: ActQuant | None = None,
    gate_up_weight: torch.Tensor | None = None,
    down_weight: torch.Tensor | None = None,
    on_input: InputObserver | None = None,
) -> tuple[torch.Tensor, ExpertStats]:
    """Routed experts output for `hidden [T, H]`, plus per-expert routed statistics.

    Tokens are grouped by expert with one sort, so each expert runs one GEMM pair on its own
    tokens, as transformers' eager loop does. On CUDA all experts run as one grouped GEMM per
    projection instead (``experts_batched.py``), fake-quant and observers called per expert on
    slices in between; the loop stays the CPU path.
    """
    if hidden.is_cuda:
        from quantship.model.experts_batched import batched_experts_forward

        return batched_experts_forward(fe, hidden, top_k_index, top_k_weights, gate_up_weight, down_weight,
                                       act_quant_gate_up=act_quant_gate_up, act_quant_down=act_quant_down,
                                       on_input=on_input)
    gate_up = fe.gate_up if gate_up_weight is None else gate_up_weight
    down = fe.down if down_weight is None else down_weight
    n_tokens, k = top_k_index.shape
    n_exp = fe.num_experts
    flat_expert = top_k_index.reshape(-1)
    flat_token = torch.arange(n_tokens, device=hidden.device).repeat_interleave(k)
    flat_weight = top_k_weights.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=n_exp)[:n_exp]

    token_amax = hidden.detach().abs().amax(dim=-1).float()
    gate_up_amax = torch.zeros(n_exp, dtype=torch.float32, device=hidden.device)
    valid = flat_expert < n_exp
    gate_up_amax.scatter_reduce_(0, flat_expert[valid], token_amax[flat_token[valid]], "amax")
    down_amax = torch.zeros(n_exp, dtype=torch.float32, device=hidden.device)

    # Accumulate in float32 like transformers' grouped/batched experts kernels (the default
    # implementation), so the block output matches theirs to the last bf16 bit in most cases.
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    bounds = torch.cumsum(counts, 0).tolist()
    start = 0
    for e, end in enumerate(bounds):
        if end == start:
            continue
        pairs = order[start:end]
        start = end
        tokens = flat_token[pairs]
        x = hidden[tokens]
        if act_quant_gate_up is not None:
            x = act_quant_gate_up(x, e)
        if on_input is not None:
            on_input("gate_up", x, e)
        h = _apply_gate(fe.module, F.linear(x, gate_up[e]))
        down_amax[e] = h.detach().abs().amax().float()
        if act_quant_down is not None:
            h = act_quant_down(h, e)
        if on_input is not None:
            on_input("down", h, e)
        y = F.linear(h, down[e]) * flat_weight[pairs, None]
        out.index_add_(0, tokens, y.float())
    return out.to(hidden.dtype), ExpertStats(counts.float(), gate_up_amax, down_amax)


def all_token_down_input_amax(
    fe: FusedExperts, hidden: torch.Tensor, experts: list[int], chunk_elems: int | None = None
) -> torch.Tensor:
    """Down-projection input amax of the given experts when every token goes through them.

    The fallback statistic for experts that calibration routed too few tokens to: computed
    on the side, so the block's output is unchanged. Experts are processed in chunks to keep
    both the [experts, tokens, 2I] intermediate and the gathered [experts, 2I, H] weights
    bounded (with few stashed tokens, one chunk once gathered every cold expert: a copy of the
    whole gate_up tensor, most of a decoder layer).
    """
    result = torch.zeros(len(experts), dtype=torch.float32, device=hidden.device)
    if not experts:
        return result
    if chunk_elems is None:  # the larger of the two: 128 MiB of bf16 on CPU, 512 MiB on a GPU
        chunk_elems = 1 << (28 if hidden.is_cuda else 26)
    per_expert = max(hidden.shape[0], fe.gate_up.shape[2]) * fe.gate_up.shape[1]
    step = max(1, chunk_elems // max(per_expert, 1))
    ids = torch.tensor(experts, device=hidden.device)
    for i in range(0, len(experts), step):
        sel = ids[i : i + step]
        gu = torch.einsum("th,eih->eti", hidden, fe.gate_up[sel])
        h = _apply_gate(fe.module, gu)
        result[i : i + step] = h.detach().abs().amax(dim=(1, 2)).float()
    return result


def check_layout(fe: FusedExperts, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, original_forward: Callable) -> None:
    """Compare our forward with the module's own on a few tokens; refuse an unknown layout."""
    # A few (token, expert) pairs suffice, and stay few: transformers' batched_mm experts gather
    # one weight matrix per pair (16 tokens x top-8 of DeepSeek-V3 = 11 GB).
    n = min(hidden.shape[0], max(1, 16 // max(1, top_k_index.shape[-1])))
    ours, _ = fused_experts_forward(fe, hidden[:n], top_k_index[:n], top_k_weights[:n])
    theirs = original_forward(hidden[:n], top_k_index[:n], top_k_weights[:n])
    scale = theirs.float().abs().max().clamp_min(1e-6)
    if (ours.float() - theirs.float()).abs().max() / scale > 2e-2:
        raise QuantshipError(
            f"fused experts at {fe.name} ({type(fe.module).__name__}) do not follow the gate_up/down layout "
            f"quantship implements; exclude them with --exclude '{fe.name}*' or report the model type"
        )
