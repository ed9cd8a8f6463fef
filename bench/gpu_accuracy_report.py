"""Markdown of bench/gpu_accuracy.py's JSON: run summary, issue 5's dense and MoE tables (shared
with the CPU run through bench/accuracy_report.py), issue 10's GPTQ tables and the FP8 options.

Kept apart from the driver so a saved JSON can be rendered again without a GPU or a model:

    python -P bench/gpu_accuracy.py --render-only bench/results/<date>-<device>-accuracy.json
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def _accuracy_report():
    """bench/accuracy_report.py, loaded by path: bench/ is not a package and stays off sys.path."""
    path = Path(__file__).resolve().with_name("accuracy_report.py")
    spec = importlib.util.spec_from_file_location("bench_accuracy_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report_md = _accuracy_report()


def _f(x, d: int = 4) -> str:
    return "—" if x is None else f"{x:.{d}f}"


def markdown(r: dict) -> list[str]:
    lines = [f"# Accuracy on {r.get('device_name')} ({r.get('date')}, torch {r.get('torch')})", "",
             f"Model {r.get('model')} (SmolLM2 fingerprint match: {r.get('model_is_smollm2')}; token windows as on the "
             f"CPU: {r.get('token_ids_match_cpu_default_sizes')}); calibration "
             f"{r.get('calib_sizes')} windows of {r.get('calib_seq_len')} tokens; eval {r.get('eval_windows')} x "
             f"{r.get('eval_seq_len')} held-out tokens; BF16 perplexity {_f(r.get('bf16_perplexity'))}.", "",
             "| stage | status | s |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v.get('seconds', 0):.0f} |" for k, v in r.get("stages", {}).items()]
    if r.get("not_run_for_time"):
        lines += ["", "Not run (time budget): " + ", ".join(r["not_run_for_time"])]
    if r.get("dense"):
        lines += ["", "## Issue 5: dense", ""] + report_md.dense_table(r)
        lines += ["", "| format | calib | MO in-memory ratio (its own fake quant) | MO calibrate s | MO export s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {x['format']} | {x['calib_size']} | {_f(x.get('modelopt_inmemory_ratio'))} | "
                  f"{_f(x.get('modelopt_calibrate_seconds'), 1)} | {_f(x.get('modelopt_export_seconds'), 1)} |"
                  for x in r["dense"]]
    if r.get("moe", {}).get("amax_log2_error"):
        lines += ["", "## Issue 5: MoEfied SmolLM2", ""] + report_md.moe_tables(r)
    for key, title in (("gptq", "Issue 10: GPTQ, SmolLM2"), ("gptq_moe", "Issue 10: GPTQ, MoEfied SmolLM2")):
        sec = r.get(key)
        if not sec or not sec.get("runs"):
            continue
        fwd = sec.get("layer_forward_seconds")
        lines += ["", f"## {title}", "", f"Round-to-nearest ratios: {json.dumps({k: round(v, 4) for k, v in sec.get('rtn_ratio', {}).items()})}"
                  + (f"; one decoder layer's forward over the calibration windows: {fwd * 1e3:.2f} ms" if fwd else ""), "",
                  "| variant | ratio | RTN ratio | gap / RTN gap | median err / RTN | s | s/layer collect / gptq / propagate "
                  "| layer forwards: GPTQ / all three | RTN kept |", "|---|---|---|---|---|---|---|---|---|"]
        for spec, e in sec["runs"].items():
            if "error" in e:
                lines.append(f"| `{spec}` | {e['error'][:80]} | | | | | | | |")
                continue
            rtn = sec.get("rtn_ratio", {}).get(e["recipe"])
            gap = (e["ratio"] - 1) / (rtn - 1) if rtn and rtn > 1 else None
            s = e["mean_seconds_per_layer"]
            kept = len(e["rtn_kept_linears"]) + sum(len(v) for v in e["rtn_kept_experts"].values())
            lines.append(f"| `{spec}` | {_f(e['ratio'])} | {_f(rtn)} | {_f(gap, 3)} | {_f(e['median_error_ratio_vs_rtn'], 3)} | "
                         f"{e['gptq_seconds']:.1f} | {s['collect']:.3f} / {s['gptq']:.3f} / {s['propagate']:.3f} | "
                         f"{_f(s['gptq'] / fwd, 0) if fwd else '—'} / {_f(sum(s.values()) / fwd, 0) if fwd else '—'} | {kept} |")
    if r.get("fp8_options"):
        lines += ["", f"## FP8 options ({min(r.get('calib_sizes') or [0])} windows; ratio to BF16)", "", "| option | ratio |", "|---|---|"]
        lines += [f"| {k} | {_f(v)} |" for k, v in r["fp8_options"].items()]
    return lines


def render(r: dict) -> str:
    """The whole markdown file for results `r`."""
    return "\n".join(markdown(r)) + "\n"


def render_file(json_path: Path) -> Path:
    """Rewrite the markdown next to a saved JSON (same name, .md) and return its path."""
    md = json_path.with_suffix(".md")
    md.write_text(render(json.loads(json_path.read_text())))
    return md
