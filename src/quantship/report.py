"""Reports a person reads, saved next to the checkpoint: coverage.json and report.md.

Coverage is the heart of the MoE story: how many calibration tokens the router sent to each
expert, and which experts' input scales also used the all-token fallback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quantship.pipeline import QuantizedModel


def coverage_dict(qm: QuantizedModel) -> dict:
    layers = {}
    for block, cov in qm.plan.coverage.items():
        tokens = [int(x) for x in cov.tokens.tolist()]
        fallback = cov.fallback.nonzero().flatten().tolist()
        layers[block] = {
            "num_experts": len(tokens),
            "tokens_per_expert": tokens,
            "experts_without_tokens": [e for e, n in enumerate(tokens) if n == 0],
            "fallback_experts": fallback,
            "min_tokens": cov.min_tokens,
        }
    return {
        "calibration_tokens": qm.stats.tokens_seen,
        "moe_min_tokens": next(iter(qm.plan.coverage.values())).min_tokens if qm.plan.coverage else None,
        "input_scale_source": "routed tokens; experts under min_tokens also all calibration tokens",
        "blocks": layers,
    }


def report_markdown(qm: QuantizedModel, coverage: dict) -> str:
    plan = qm.plan
    lines = [
        "# quantship report",
        "",
        f"- model type: `{qm.structure.model_type}`",
        f"- recipe: `{plan.recipe.name}` ({plan.recipe.quant_algo}), KV cache: `{plan.kv_format.name}`",
        f"- calibration tokens: {qm.stats.tokens_seen}",
        f"- quantized weight tensors: {len(plan.targets)} "
        f"({sum(t.weight.shape[0] if t.fused_experts else 1 for t in plan.targets)} counting experts one by one)",
        f"- kept in high precision: {len(plan.excluded)} modules",
        "",
    ]
    if coverage["blocks"]:
        lines += [
            "## MoE expert coverage",
            "",
            f"Experts with fewer than {coverage['moe_min_tokens']} routed tokens took their input scale from "
            "all calibration tokens pushed through them as well (the block's output unchanged).",
            "",
            "| block | experts | without tokens | fallback | min / median / max tokens |",
            "|---|---|---|---|---|",
        ]
        for block, info in coverage["blocks"].items():
            t = sorted(info["tokens_per_expert"])
            lines.append(
                f"| `{block}` | {info['num_experts']} | {len(info['experts_without_tokens'])} | "
                f"{len(info['fallback_experts'])} | {t[0]} / {t[len(t) // 2]} / {t[-1]} |"
            )
        lines.append("")
    if plan.algorithm_report:
        from quantship.algorithms.gptq_report import gptq_markdown

        lines += gptq_markdown(plan.algorithm_report)
    reasons: dict[str, list[str]] = {}
    for name, why in plan.excluded.items():
        reasons.setdefault(why, []).append(name)
    if reasons:
        lines += ["## Kept in high precision", ""]
        for why, names in reasons.items():
            shown = ", ".join(f"`{n}`" for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            lines.append(f"- {why}: {shown}")
        lines.append("")
    return "\n".join(lines)


def write_reports(qm: QuantizedModel, directory: Path) -> None:
    coverage = coverage_dict(qm)
    (directory / "coverage.json").write_text(json.dumps(coverage, indent=1))
    (directory / "report.md").write_text(report_markdown(qm, coverage))
    if qm.plan.algorithm_report:  # GPTQ: tokens per weight and expert, round-to-nearest fallbacks
        (directory / "gptq.json").write_text(json.dumps(qm.plan.algorithm_report, indent=1))
