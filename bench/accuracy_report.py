"""Markdown tables from bench/accuracy.py's JSON (for bench/README.md).

    python bench/accuracy_report.py bench/results/<date>-cpu-accuracy.json [--merge OTHER.json]

--merge adds the llm-compressor columns of a second run (same windows, e.g. `--skip-moe
--skip-modelopt --llmcompressor-python ...`) to the first run's dense rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

POLICIES = (
    ("ours_default", "quantship (routed, all-token fallback under 32 tokens)"),
    ("routed_only", "routed tokens only (per-expert calibration)"),
    ("modelopt_shared_max", "Model Optimizer: max over experts (emulated from routed amax)"),
    ("modelopt_export", "Model Optimizer 0.47 export (its shared input quantizer)"),
    ("all_experts", "llm-compressor all-experts (every token through every expert)"),
)


def _f(x, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def merge(results: dict, other: dict) -> None:
    rows = {(r["format"], r["calib_size"]): r for r in other.get("dense", [])}
    for row in results.get("dense", []):
        extra = rows.get((row["format"], row["calib_size"]), {})
        if extra and abs(extra["ours_ppl"] - row["ours_ppl"]) > 1e-9 * row["ours_ppl"]:
            raise SystemExit(f"runs disagree on ours {row['format']} {row['calib_size']}: not the same windows")
        row.update({k: v for k, v in extra.items() if k.startswith("llmcompressor") or k.endswith("_vs_llmcompressor")})
        if "llmcompressor_ppl" in row:
            row["llmcompressor_ratio"] = row["llmcompressor_ppl"] / results["bf16_perplexity"]


def dense_table(r: dict) -> list[str]:
    lines = [f"BF16 perplexity {r['bf16_perplexity']:.4f}. Perplexity ratio to BF16 (lower is better):", "",
             "| format | calib windows | quantship | Model Optimizer 0.47 | Model Optimizer, as vLLM serves it | "
             "llm-compressor 0.14 | max input-amax difference (log2) vs MO / llmc |",
             "|---|---|---|---|---|---|---|"]
    for row in r.get("dense", []):
        served = row.get("modelopt_served_ratio", row.get("modelopt_ratio") if row["format"] != "fp8" else None)
        llmc = row.get("llmcompressor_ratio")
        lines.append(
            f"| {row['format']} | {row['calib_size']} | {_f(row.get('ours_ratio'))} | {_f(row.get('modelopt_ratio'))} | "
            f"{_f(served)} | {_f(llmc) if llmc else row.get('llmcompressor_error', '—')[:40]} | "
            f"{_f(row.get('input_amax_max_abs_log2_vs_modelopt'), 3)} / "
            f"{_f(row.get('input_amax_max_abs_log2_vs_llmcompressor'), 3)} |")
    return lines


def moe_tables(r: dict) -> list[str]:
    m = r.get("moe")
    if not m or "amax_log2_error" not in m:
        return []
    ref = m["amax_error_vs_routed_at_size"]
    lines = [f"MoEfied SmolLM2: {m['experts']} routed experts (top-{m['top_k']}) + a shared expert of "
             f"{m['shared_fraction']:.0%} of the neurons, {m['format']}; BF16 perplexity {m['bf16_perplexity']:.2f}.", ""]
    for entry in m["by_size"]:
        total = sum(len(t) for t in entry["tokens_per_expert"].values())
        lines.append(f"- {entry['calib_size']} windows: {entry['experts_without_tokens']} of {total} experts got no "
                     f"routed token, {entry['experts_under_min_tokens']} fewer than 32.")
    lines += ["", f"Per-expert input amax against the routed-token amax at {ref} windows, |log2 ratio| over every "
                  "(layer, expert, gate_up / down input) covered at the reference:", "",
              "| policy | calib windows | median | p95 | median gate_up / down | median signed | inputs without amax |"
              " perplexity ratio to MoE BF16 |", "|---|---|---|---|---|---|---|---|"]
    ppl_key = {"ours_default": "ours_default", "all_experts": "all_experts", "modelopt_export": "modelopt"}
    for size, policies in m["amax_log2_error"].items():
        if int(size) == ref:
            continue
        ppl = next(e["perplexity"] for e in m["by_size"] if e["calib_size"] == int(size))
        extra = [(k, f"quantship with --moe-min-tokens {k.rsplit('_', 1)[1]}") for k in policies if k.startswith("min_tokens_")]
        for key, label in (*POLICIES, *extra):
            s = policies.get(key)
            if not s or not s.get("count"):
                continue
            p = ppl.get(ppl_key.get(key, ""), None)
            bp = s["by_projection"]
            lines.append(
                f"| {label} | {size} | {_f(s['median'], 3)} | {_f(s['p95'], 3)} | "
                f"{_f(bp['gate_up_proj']['median'], 3)} / {_f(bp['down_proj']['median'], 3)} | "
                f"{_f(s['median_signed'], 3)} | {s['experts_without_amax']} | "
                f"{_f(p / m['bf16_perplexity']) if p else '—'} |")
    big = next((e for e in m["by_size"] if e["calib_size"] == ref), None)
    if big:
        lines += ["", f"At {ref} windows: perplexity ratio quantship {_f(big['perplexity'].get('ours_default', 0) / m['bf16_perplexity'])}"
                      f", all-experts {_f(big['perplexity'].get('all_experts', 0) / m['bf16_perplexity'])}."]
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results", type=Path)
    p.add_argument("--merge", type=Path, default=None)
    p.add_argument("--write", action="store_true", help="save the merged JSON back to RESULTS")
    a = p.parse_args()
    r = json.loads(a.results.read_text())
    if a.merge:
        merge(r, json.loads(a.merge.read_text()))
        if a.write:
            a.results.write_text(json.dumps(r, indent=1))
    print("\n".join(dense_table(r) + [""] + moe_tables(r)))


if __name__ == "__main__":
    main()
