"""`quantship eval QUANT_DIR --reference BF16_DIR`: how far a quantized checkpoint is from its source.

Three measurements, each on the CPU:
- perplexity of the reference and of the quantized model (weights dequantized, activations
  fake-quantized with the checkpoint's input scales: what a serving engine computes) on held-out
  text — `split_documents(..., "eval")`, never the calibration share;
- weight SQNR in dB per quantized checkpoint module (per expert for MoE), reference tensor vs
  dequantized, matched by checkpoint name and computed in float64;
- per decoder layer, the relative error of its output on a few batches: "isolated" feeds the
  quantized layer the reference layer's own input (the layer's error alone), "accumulated" runs
  both models on the same tokens (the error the layer passes on).
Written as eval.json, eval.md and PNG plots (plots.py) in `--out` (default QUANT_DIR/eval).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from quantship.errors import QuantshipError
from quantship.formats.handlers import FORMAT_HANDLERS, FormatHandler
from quantship.load import (
    ALGO_TO_FORMAT,
    PQS,
    SCALE_SUFFIXES,
    _tensor_files,
    load_quantized,
    normalize_scale_shapes,
    read_quant_algo,
)

ARCH_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")


# ------------------------------------------------------------------------------------ inputs
def _read_config(directory: Path, flag: str) -> dict:
    if not directory.is_dir():
        raise QuantshipError(f"{flag} {directory} does not exist; pass an existing checkpoint folder")
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        raise QuantshipError(f"{flag} {directory} has no readable config.json; point to a HF checkpoint folder") from None


def check_pair(quant_dir: Path, reference_dir: Path) -> None:
    """Both folders exist, and describe the same architecture."""
    q, r = _read_config(quant_dir, "QUANT_DIR"), _read_config(reference_dir, "--reference")
    if r.get("quantization_config"):
        raise QuantshipError(f"--reference {reference_dir} is itself quantized; pass the high-precision source")
    for key in ARCH_KEYS:
        if q.get(key) != r.get(key):
            raise QuantshipError(
                f"{quant_dir} and --reference {reference_dir} are different architectures ({key}: "
                f"{q.get(key)!r} vs {r.get(key)!r}); pass the checkpoint the export was quantized from"
            )


@contextlib.contextmanager
def modelopt_layout(quant_dir: Path) -> Iterator[Path]:
    """The checkpoint in Model Optimizer's layout: itself, or a temporary conversion of a
    compressed-tensors checkpoint (the same quantized bytes, see convert.py)."""
    qc = json.loads((quant_dir / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        yield quant_dir
        return
    from quantship.convert import convert_checkpoint

    with tempfile.TemporaryDirectory(prefix="quantship-eval-") as tmp:
        yield convert_checkpoint(quant_dir, Path(tmp) / "modelopt", "modelopt")


def eval_batches(tokenizer, dataset: str | None, size: int, seq_len: int, batch_size: int,
                 seed: int = 1234) -> list[dict[str, torch.Tensor]]:
    """`size` windows of held-out text (the eval share of the dataset, never calibration text)."""
    from quantship.calibration.data import build_calibration_batches, load_documents, split_documents

    documents = split_documents(load_documents(dataset), "eval")
    return build_calibration_batches(tokenizer, documents, size, seq_len, batch_size, seed)


# ------------------------------------------------------------------------------------ perplexity
@torch.no_grad()
def perplexity(model: nn.Module, batches: list[dict[str, torch.Tensor]], desc: str = "perplexity",
               progress: bool = True) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of the batches."""
    nll, count = 0.0, 0
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        ids = batch["input_ids"]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


# ------------------------------------------------------------------------------------ weights
def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(|W|^2 / |W - Wq|^2), in float64; inf where they are equal."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def _index(directory: Path) -> dict[str, Path]:
    out = {}
    for f in _tensor_files(directory):
        with safe_open(str(f), "pt") as fh:
            out.update(dict.fromkeys(fh.keys(), f))  # noqa: SIM118 - safe_open has no iterator
    return out


def weight_sqnr(quant_dir: Path, reference_dir: Path, handler: FormatHandler, progress: bool = True
                ) -> dict[str, float]:
    """SQNR per quantized module (checkpoint name), streaming one module at a time. A module's
    `pre_quant_scale` multiplies its dequantized weight back (the engine computes `(x p) W_q^T`);
    one folded into a norm cannot be: such modules compare the smoothed weight `W / p`."""
    q_index, r_index = _index(quant_dir), _index(reference_dir)
    modules = sorted(k.rsplit(".", 1)[0] for k in q_index if k.endswith(".weight_scale"))
    missing = [m for m in modules if f"{m}.weight" not in r_index]
    if missing:
        raise QuantshipError(
            f"--reference {reference_dir} has no tensor {missing[0]}.weight ({len(missing)} quantized modules "
            "unmatched); pass the checkpoint the export was quantized from"
        )
    out: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        files = {f: stack.enter_context(safe_open(str(f), "pt")) for f in {*q_index.values(), *r_index.values()}}
        for m in tqdm(modules, desc="weight SQNR", unit="module", disable=not progress):
            tensors = {s: files[q_index[f"{m}.{s}"]].get_tensor(f"{m}.{s}")
                       for s in ("weight", *SCALE_SUFFIXES) if f"{m}.{s}" in q_index}
            reference = files[r_index[f"{m}.weight"]].get_tensor(f"{m}.weight")
            weight = handler.dequantize(normalize_scale_shapes(tensors, handler), torch.float32)
            if f"{m}.{PQS}" in q_index:
                weight = weight * files[q_index[f"{m}.{PQS}"]].get_tensor(f"{m}.{PQS}").float()
            out[m] = sqnr_db(reference, weight)
    return out


# ------------------------------------------------------------------------------------ layers
def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from quantship.model.discover import discover

    return [m for _, m in discover(model).decoder_layers]


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _layer_io(model: nn.Module, layers: list[nn.Module], ids: torch.Tensor,
              replace_inputs: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(input hidden states, output hidden states) of every decoder layer for one forward;
    with `replace_inputs`, layer i computes on replace_inputs[i] instead of its own input."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def keep(_m: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        inputs.append(_hidden(args, kwargs))
        outputs.append(_output(out))

    handles = [layer.register_forward_hook(keep, with_kwargs=True) for layer in layers]
    if replace_inputs is not None:
        for layer, hidden in zip(layers, replace_inputs, strict=True):
            def swap(_m: nn.Module, args: tuple, kwargs: dict, hidden: torch.Tensor = hidden) -> tuple[tuple, dict]:
                return _replace_hidden(args, kwargs, hidden)

            handles.append(layer.register_forward_pre_hook(swap, with_kwargs=True))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


@torch.no_grad()
def layer_output_errors(reference: nn.Module, quantized: nn.Module, batches: list[dict[str, torch.Tensor]],
                        progress: bool = True) -> list[dict[str, float]]:
    """Per decoder layer: relative output error, isolated (same layer input) and accumulated."""
    ref_layers, q_layers = _decoder_layers(reference), _decoder_layers(quantized)
    n = len(ref_layers)
    sums = {k: torch.zeros(n, dtype=torch.float64) for k in ("ref", "isolated", "accumulated")}
    for batch in tqdm(batches, desc="layer errors", unit="batch", disable=not progress):
        ids = batch["input_ids"]
        ref_in, ref_out = _layer_io(reference, ref_layers, ids)
        runs = {"accumulated": _layer_io(quantized, q_layers, ids)[1],
                "isolated": _layer_io(quantized, q_layers, ids, ref_in)[1]}
        for mode, got in runs.items():
            for i, (q, r) in enumerate(zip(got, ref_out, strict=True)):
                sums[mode][i] += (q.double() - r.double()).pow(2).sum()
        for i, r in enumerate(ref_out):
            sums["ref"][i] += r.double().pow(2).sum()
    return [{"layer": i, **{k: float((sums[k][i] / sums["ref"][i]).sqrt()) for k in ("isolated", "accumulated")}}
            for i in range(n)]


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


# ------------------------------------------------------------------------------------ report
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def layer_of(module: str) -> int | None:
    m = _LAYER_RE.search(f".{module}.")
    return int(m.group(1)) if m else None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no inf: an exact tensor reports null


def summarize_sqnr(sqnr: dict[str, float]) -> dict:
    values = sorted(v for v in sqnr.values())
    per_layer: dict[int, list[float]] = {}
    for m, v in sqnr.items():
        layer = layer_of(m)
        if layer is not None:
            per_layer.setdefault(layer, []).append(v)
    return {
        "modules": len(values),
        "min_db": _finite(values[0]) if values else None,
        "median_db": _finite(values[len(values) // 2]) if values else None,
        "max_db": _finite(values[-1]) if values else None,
        "per_layer": {str(k): {"min_db": _finite(min(v)), "median_db": _finite(sorted(v)[len(v) // 2])}
                      for k, v in sorted(per_layer.items())},
    }


def markdown(result: dict) -> str:
    p = result["perplexity"]
    s = result["weight_sqnr_summary"]
    lines = [
        "# quantship eval", "",
        f"- quantized: `{result['quant_dir']}` ({result['quant_algo']}), reference: `{result['reference_dir']}`",
        f"- held-out text: {result['eval']['windows']} windows x {result['eval']['seq_len']} tokens "
        f"of `{result['eval']['dataset']}` (eval share, never calibration)", "",
        "| | perplexity |", "|---|---|",
        f"| reference | {p['reference']:.4f} |", f"| quantized | {p['quantized']:.4f} |",
        f"| ratio | {p['ratio']:.4f} |", "",
        f"Weight SQNR over {s['modules']} quantized modules: min {_fmt(s['min_db'])} dB, "
        f"median {_fmt(s['median_db'])} dB, max {_fmt(s['max_db'])} dB.", "",
        "| layer | min SQNR dB | median SQNR dB | output rel. error (isolated) | (accumulated) |",
        "|---|---|---|---|---|",
    ]
    for e in result["layer_output_error"]:
        sq = s["per_layer"].get(str(e["layer"]), {})
        lines.append(f"| {e['layer']} | {_fmt(sq.get('min_db'))} | {_fmt(sq.get('median_db'))} | "
                     f"{e['isolated']:.4f} | {e['accumulated']:.4f} |")
    worst = sorted(result["weight_sqnr_db"].items(), key=lambda kv: math.inf if kv[1] is None else kv[1])[:10]
    lines += ["", "Lowest SQNR modules:", ""] + [f"- `{m}`: {_fmt(v)} dB" for m, v in worst]
    if result.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in result["plots"])]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "exact" if x is None else f"{x:.2f}"


# ------------------------------------------------------------------------------------ entry
def evaluate(quant_dir: str | Path, reference_dir: str | Path, out_dir: str | Path | None = None,
             dataset: str | None = None, eval_size: int = 32, eval_seq_len: int = 512, batch_size: int = 4,
             layer_batches: int = 2, plots: bool = True, trust_remote_code: bool = False,
             progress: bool = True) -> dict:
    """Measure the quantized checkpoint against its reference; write eval.json/eval.md/PNGs."""
    from quantship.source import load_source_model

    quant_dir, reference_dir = Path(quant_dir), Path(reference_dir)
    for flag, value in (("--eval-size", eval_size), ("--eval-seq-len", eval_seq_len),
                        ("--batch-size", batch_size), ("--layer-batches", layer_batches)):
        if value <= 0:
            raise QuantshipError(f"{flag} must be a positive integer, got {value}")
    check_pair(quant_dir, reference_dir)
    out = Path(out_dir) if out_dir is not None else quant_dir / "eval"
    if plots:
        from quantship import plots as plotting

        plotting.require_matplotlib()
    with modelopt_layout(quant_dir) as layout_dir:
        algo = read_quant_algo(layout_dir)
        if algo not in ALGO_TO_FORMAT:
            raise QuantshipError(f"quant_algo {algo!r} cannot be evaluated yet; supported: {', '.join(ALGO_TO_FORMAT)}")
        sqnr = weight_sqnr(layout_dir, reference_dir, FORMAT_HANDLERS[ALGO_TO_FORMAT[algo]], progress)
        loaded = load_quantized(layout_dir, trust_remote_code=trust_remote_code)
    reference, tokenizer = load_source_model(str(reference_dir), trust_remote_code)
    batches = eval_batches(tokenizer, dataset, eval_size, eval_seq_len, batch_size)
    ppl_ref = perplexity(reference, batches, "perplexity (reference)", progress)
    with loaded.fake_quantized() as qmodel:
        ppl_q = perplexity(qmodel, batches, "perplexity (quantized)", progress)
        layers = layer_output_errors(reference, qmodel, batches[:layer_batches], progress)
    result = {
        "quant_dir": str(quant_dir), "reference_dir": str(reference_dir), "quant_algo": algo,
        "eval": {"dataset": dataset or "builtin", "windows": sum(int(b["input_ids"].shape[0]) for b in batches),
                 "seq_len": eval_seq_len, "tokens_scored": sum(int(b["input_ids"][:, 1:].numel()) for b in batches),
                 "layer_error_batches": min(layer_batches, len(batches))},
        "perplexity": {"reference": ppl_ref, "quantized": ppl_q, "ratio": ppl_q / ppl_ref},
        "weight_sqnr_db": {k: _finite(v) for k, v in sqnr.items()},
        "weight_sqnr_summary": summarize_sqnr(sqnr),
        "layer_output_error": layers,
        "plots": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        coverage = quant_dir / "coverage.json"
        result["plots"] = plotting.write_plots(
            out, sqnr, layers, json.loads(coverage.read_text()) if coverage.is_file() else None)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    (out / "eval.md").write_text(markdown(result))
    return result


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity, weight SQNR and per-layer error of a quantized checkpoint "
                                    "against its high-precision source (CPU)")
    p.add_argument("quant_dir")
    p.add_argument("--reference", required=True, help="the high-precision checkpoint it was quantized from")
    p.add_argument("--dataset", default=None, help="as for quantize; its held-out share is used")
    p.add_argument("--eval-size", dest="eval_size", type=int, default=32, help="held-out windows")
    p.add_argument("--eval-seq-len", dest="eval_seq_len", type=int, default=512)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=4)
    p.add_argument("--layer-batches", dest="layer_batches", type=int, default=2,
                   help="batches used for the per-layer output error")
    p.add_argument("--out", default=None, help="output folder (default: QUANT_DIR/eval)")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    r = evaluate(args.quant_dir, args.reference, args.out, args.dataset, args.eval_size, args.eval_seq_len,
                 args.batch_size, args.layer_batches, args.plots, args.trust_remote_code, args.progress)
    out = Path(args.out) if args.out else Path(args.quant_dir) / "eval"
    p = r["perplexity"]
    print(f"perplexity {p['quantized']:.4f} vs reference {p['reference']:.4f} (ratio {p['ratio']:.4f}); "
          f"median weight SQNR {_fmt(r['weight_sqnr_summary']['median_db'])} dB; report: {out / 'eval.md'}")
    return 0
