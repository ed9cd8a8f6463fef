"""What GPTQ did, for people: per weight (per expert for MoE) the calibration tokens its Hessian
saw, whether GPTQ ran or round-to-nearest was kept, and the layer-output error against
round-to-nearest. Saved as gptq.json and a section of report.md (report.py)."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median

from torch import Tensor

from quantship.algorithms.gptq import GPTQConfig


@dataclass
class TargetResult:
    """What GPTQ did to one target (per expert for fused experts)."""

    tokens: list[int]  # Hessian rows seen, one entry per matrix (1 for a Linear, E for fused experts)
    gptq: list[bool]  # True where GPTQ ran, False where round-to-nearest was kept (too few tokens)
    min_tokens: int
    rows: dict[str, Tensor] | None = None  # GPTQ's tensors under checkpoint names; None: round-to-nearest
    error_ratio: float | None = None  # GPTQ / RTN layer-output error tr(dW H dWᵀ), summed over matrices


def gptq_report(results: dict[str, TargetResult], config: GPTQConfig, outside: list[str],
                timings: dict[str, dict[str, float]]) -> dict:
    """JSON-able summary: options, per-layer seconds, and per target the tokens and where RTN was kept."""
    targets = {}
    for key, r in results.items():
        entry: dict = {"min_tokens": r.min_tokens, "error_ratio_vs_rtn": r.error_ratio}
        if len(r.tokens) == 1:
            entry.update(tokens=r.tokens[0], method="gptq" if r.gptq[0] else "rtn")
        else:
            entry.update(tokens_per_expert=r.tokens, rtn_experts=[e for e, ok in enumerate(r.gptq) if not ok])
        targets[key] = entry
    return {
        "algorithm": "gptq",
        "options": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "fallback_rule": (f"a weight (each expert's, for MoE) whose Hessian saw fewer than "
                          f"{config.min_tokens_per_dim:g} x its input dimension calibration tokens keeps "
                          "round-to-nearest"),
        "outside_decoder_layers_rtn": outside,
        "seconds_per_layer": timings,
        "targets": targets,
    }


def gptq_markdown(report: dict) -> list[str]:
    """The report.md section."""
    o = report["options"]
    targets = report["targets"]
    dense = {k: v for k, v in targets.items() if "method" in v}
    fused = {k: v for k, v in targets.items() if "method" not in v}
    rtn_dense = [k for k, v in dense.items() if v["method"] == "rtn"]
    ratios = [v["error_ratio_vs_rtn"] for v in targets.values() if v["error_ratio_vs_rtn"] is not None]
    lines = [
        "## Weight algorithm: GPTQ",
        "",
        f"Block {o['block_size']}, dampening {o['damp']} x mean(diag H), NVFP4 block scales {o['nvfp4_scales']}, "
        f"act-order {'on' if o['act_order'] else 'off'}, Hessian inputs "
        f"{'fake-quantized' if o['act_quant'] else 'high precision'}; {report['fallback_rule']}.",
        "",
        f"- weights by GPTQ: {len(dense) - len(rtn_dense)} of {len(dense)} linears"
        + (f", and fused experts in {len(fused)} tensors (below)" if fused else ""),
        f"- median layer-output error GPTQ / round-to-nearest: {median(ratios):.3f}" if ratios else
        "- no weight had enough tokens for GPTQ",
    ]
    if rtn_dense:
        shown = ", ".join(f"`{k}` ({dense[k]['tokens']} tokens)" for k in rtn_dense[:12])
        more = f" and {len(rtn_dense) - 12} more" if len(rtn_dense) > 12 else ""
        lines.append(f"- round-to-nearest (too few tokens): {shown}{more}")
    if report["outside_decoder_layers_rtn"]:
        lines.append("- round-to-nearest (outside the decoder layers): "
                     + ", ".join(f"`{k}`" for k in report["outside_decoder_layers_rtn"]))
    if fused:
        lines += ["", "| fused experts | experts | GPTQ | round-to-nearest (too few routed tokens) |", "|---|---|---|---|"]
        for k, v in fused.items():
            rtn = v["rtn_experts"]
            n = len(v["tokens_per_expert"])
            listed = ", ".join(map(str, rtn[:32])) + (f" and {len(rtn) - 32} more" if len(rtn) > 32 else "")
            lines.append(f"| `{k}` | {n} | {n - len(rtn)} | {listed or '-'} |")
    lines.append("")
    return lines
