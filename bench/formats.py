"""The rest of hf_ptq's format table on SmolLM2-135M-Instruct: fake-quant perplexity per format.

    python bench/formats.py --out bench/results/<date>-cpu-formats.json            # every variant
    python bench/formats.py --variants int8_sq nvfp4:mse --out ...                 # some

A variant is `qformat[:weight_scale_search]` (`nvfp4_awq`, `mxfp4:mse`). Calibration and
evaluation as `bench/gptq.py` (built-in corpus calib / held-out shares, fixed seed), perplexity
of the in-memory fake-quant model (`QuantizedModel.fake_quantized`). Each variant reloads the
model: AWQ and SmoothQuant rewrite the weights in place. Modules whose input dimension the
format cannot block (SmolLM2's 576 inputs are not a multiple of INT4's 128) stay in high
precision and are counted in the result (Model Optimizer refuses such a model outright).

For another bench (bench/accuracy.py): `variant_perplexity(model_dir, spec, calib, evalb)` is the
whole measurement of one variant, and `VARIANTS` the list this file runs by default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

# bench/ holds scripts named like packages transformers imports (bench/kernels.py shadows HF's
# `kernels`): keep this folder off the import path, as bench/scale.py does.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from quantship.calibration.data import build_calibration_batches, load_documents, split_documents  # noqa: E402
from quantship.default_model import default_model_dir  # noqa: E402
from quantship.evaluate import eval_batches, perplexity  # noqa: E402
from quantship.formats.handlers import FORMAT_HANDLERS  # noqa: E402
from quantship.model.discover import discover  # noqa: E402
from quantship.pipeline import quantize  # noqa: E402
from quantship.recipes import get_recipe, with_weight_scale_search  # noqa: E402
from quantship.source import load_source_model  # noqa: E402

VARIANTS = (
    "nvfp4", "fp8",  # the baselines of the same table
    "fp8_pc_pt", "fp8_pb_wo", "int4_awq", "nvfp4_awq", "w4a8_awq", "w4a8_nvfp4_fp8", "mxfp8", "mxfp4",
    "int8_sq", "int8_wo", "nvfp4_four_over_six", "nvfp4:mse", "nvfp4_awq:mse", "mxfp4:mse", "w4a8_nvfp4_fp8:mse",
)


def parse_variant(spec: str) -> tuple[str, str]:
    qformat, _, search = spec.partition(":")
    return qformat, search or "max"


def indivisible(model: torch.nn.Module, spec: str) -> list[str]:
    """Quantized linears whose input dimension the variant's block size does not divide."""
    qformat, search = parse_variant(spec)
    recipe = with_weight_scale_search(get_recipe(qformat), search)
    block = FORMAT_HANDLERS[recipe.weight_format].block_size
    if not block:
        return []
    return [t.name for t in discover(model).linears
            if recipe.quantizes(t.role) and t.module.weight.shape[-1] % block]


def variant_perplexity(model_dir: str | Path, spec: str, calib: list[dict], evalb: list[dict],
                       device: str = "cpu") -> dict:
    """Quantize a fresh copy of the model with one variant; its fake-quant perplexity and cost."""
    qformat, search = parse_variant(spec)
    model, _ = load_source_model(str(model_dir), False, device)
    skipped = indivisible(model, spec)
    t = time.perf_counter()
    qm = quantize(model, qformat, calib, exclude=skipped, weight_scale_search=search, progress=False)
    seconds = time.perf_counter() - t
    with qm.fake_quantized() as m:
        ppl = perplexity(m, evalb, spec, progress=False)
    return {"qformat": qformat, "weight_scale_search": search, "quant_algo": qm.plan.recipe.quant_algo,
            "ppl": ppl, "quantize_seconds": seconds, "quantized_tensors": len(qm.plan.targets),
            "kept_high_precision_indivisible": len(skipped)}


def markdown(data: dict) -> str:
    bf16 = data["bf16"]["ppl"]
    lines = ["| variant | quant_algo | perplexity | vs bf16 | quantized linears | quantize s |", "|---|---|---|---|---|---|",
             f"| bf16 | - | {bf16:.3f} | 1.000 | - | - |"]
    for spec, r in data["runs"].items():
        note = f" ({r['kept_high_precision_indivisible']} kept: inputs not a block multiple)" \
            if r["kept_high_precision_indivisible"] else ""
        lines.append(f"| `{spec}` | {r['quant_algo']} | {r['ppl']:.3f} | {r['ppl'] / bf16:.3f} | "
                     f"{r['quantized_tensors']}{note} | {r['quantize_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--calib-size", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=f"bench/results/{datetime.date.today().isoformat()}-cpu-formats.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model_dir = default_model_dir()
    model, tokenizer = load_source_model(str(model_dir))
    calib = build_calibration_batches(tokenizer, split_documents(load_documents(None), "calib"), args.calib_size,
                                      args.seq_len, args.batch_size, 1234)
    evalb = eval_batches(tokenizer, None, args.eval_size, args.seq_len, args.batch_size)
    data = json.loads(out.read_text()) if out.is_file() else {}
    data.setdefault("setup", {
        "model": "SmolLM2-135M-Instruct (bf16, packaged GGUF)", "torch": torch.__version__,
        "device": f"CPU, {args.threads} threads ({platform.processor() or platform.machine()})",
        "calibration": f"{args.calib_size} x {args.seq_len} tokens, built-in corpus calib share, seed 1234",
        "eval": f"{args.eval_size} x {args.seq_len} tokens, built-in corpus held-out share",
    })
    if "bf16" not in data:
        data["bf16"] = {"ppl": perplexity(model, evalb, "bf16", progress=False)}
    del model
    runs = data.setdefault("runs", {})
    for spec in args.variants:
        runs[spec] = {**variant_perplexity(model_dir, spec, calib, evalb), "date": datetime.date.today().isoformat()}
        print(f"{spec}: ppl {runs[spec]['ppl']:.3f} ({runs[spec]['ppl'] / data['bf16']['ppl']:.3f}x bf16)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))
        out.with_suffix(".md").write_text(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
