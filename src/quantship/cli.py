"""`quantship quantize | verify | convert | eval` — the command line.

Model Optimizer's `hf_ptq.py` flag names are accepted as aliases so existing scripts keep
working. Every user error is one line on stderr and exit code 2; `verify` exits 1 when the
checkpoint has findings.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable
from pathlib import Path

from quantship import evaluate
from quantship.errors import QuantshipError
from quantship.pipeline import DEFAULT_MOE_MIN_TOKENS
from quantship.recipes import KV_CACHE_FORMATS, RECIPES


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="calibrate a HF model and export a quantized checkpoint")
    p.add_argument("--model", "--pyt_ckpt_path", dest="model", default=None,
                   help="local HF model folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--qformat", default="nvfp4", help=f"one of: {', '.join(RECIPES)}")
    p.add_argument("--kv-cache-qformat", "--kv_cache_qformat", dest="kv_cache_qformat", default="none",
                   help=f"one of: {', '.join(KV_CACHE_FORMATS)}")
    p.add_argument("--calib-size", "--calib_size", dest="calib_size", type=int, default=512)
    p.add_argument("--calib-seq-len", "--calib_seq_len", dest="calib_seq_len", type=int, default=512)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8)
    p.add_argument("--dataset", default=None,
                   help="local .txt/.jsonl/.parquet file or folder, or cnn_dailymail/pile/wikitext "
                        "(default: the built-in public-domain corpus)")
    p.add_argument("--export", "--export_path", "--export-path", dest="export", default=None,
                   help="output folder (default: ./out/<model>-<qformat>)")
    p.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep modules matching this fnmatch pattern in high precision (repeatable)")
    p.add_argument("--moe-min-tokens", dest="moe_min_tokens", type=int, default=DEFAULT_MOE_MIN_TOKENS,
                   help="experts routed fewer calibration tokens also see all tokens for their input scale")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--export-format", "--export_format", dest="export_format", default="modelopt",
                   help="checkpoint layout: modelopt (default) or compressed-tensors")
    p.add_argument("--algorithm", default="max",
                   help="how weights are rounded: max (round-to-nearest, default) or gptq (error compensation)")
    p.add_argument("--weight-scale-search", "--weight_scale_search", dest="weight_scale_search", default="max",
                   help="block formats: weight block scales from the block amax (max, default) or the "
                        "amax multiple with the smallest reconstruction error (mse)")
    p.add_argument("--quantize-mtp", "--quantize_mtp", dest="quantize_mtp", action="store_true",
                   help="also calibrate and quantize the source's MTP layer (DeepSeek-V3 num_nextn_predict_layers); "
                        "by default it is kept in high precision and excluded")
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrate and export one decoder layer at a time in bounded memory, resumable after a "
                        "kill, multi-GPU under torchrun (default: only when the model does not fit the GPU)")


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a quantized checkpoint is complete and servable")
    p.add_argument("path")
    p.add_argument("--max-findings", type=int, default=50)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a quantized checkpoint between the modelopt and "
                                       "compressed-tensors layouts, without requantizing")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, help="target layout: modelopt or compressed-tensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantship", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add_arguments, _ in COMMANDS.values():
        add_arguments(sub)
    return parser


def run_quantize(args: argparse.Namespace) -> int:
    import torch

    from quantship.algorithms import check_algorithm
    from quantship.calibration.data import build_calibration_batches, load_documents, split_documents
    from quantship.export.compressed_tensors import check_export
    from quantship.pipeline import quantize
    from quantship.recipes import get_kv_cache_format, get_recipe, with_weight_scale_search
    from quantship.source import load_source_model

    recipe = with_weight_scale_search(get_recipe(args.qformat), args.weight_scale_search)  # fail fast
    check_algorithm(args.algorithm)
    kv_format = get_kv_cache_format(args.kv_cache_qformat)
    check_export(args.export_format, recipe.quant_algo, kv_format.quant_algo)
    for flag, value in (("--calib-size", args.calib_size), ("--calib-seq-len", args.calib_seq_len),
                        ("--batch-size", args.batch_size)):
        if value <= 0:
            raise QuantshipError(f"{flag} must be a positive integer, got {value}")
    if args.model is None:
        from quantship.default_model import default_model_dir

        args.model = str(default_model_dir())
    export = Path(args.export or Path("out") / f"{Path(args.model).name}-{args.qformat}")
    from quantship.export.shards import check_target

    check_target(export, args.overwrite)
    documents = split_documents(load_documents(args.dataset), "calib")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from quantship.streaming.command import run_streaming_quantize, streaming_wanted

    if streaming_wanted(args.streaming, args.model, device):
        if recipe.algorithm or args.weight_scale_search != "max":
            raise QuantshipError(f"--streaming does not run {recipe.algorithm or 'the weight scale search'} yet; "
                                 "pass --no-streaming")
        return run_streaming_quantize(args, documents, export, device)
    model, tokenizer = load_source_model(args.model, args.trust_remote_code, device)
    batches = build_calibration_batches(tokenizer, documents, args.calib_size, args.calib_seq_len,
                                        args.batch_size, args.seed)
    qm = quantize(model, args.qformat, batches, kv_cache=args.kv_cache_qformat, exclude=args.exclude,
                  moe_min_tokens=args.moe_min_tokens, progress=args.progress, algorithm=args.algorithm,
                  weight_scale_search=args.weight_scale_search, mtp_source=args.model if args.quantize_mtp else None)
    qm.export(export, overwrite=args.overwrite, source_dir=args.model, progress=args.progress,
              export_format=args.export_format)
    print(f"exported {args.qformat} checkpoint to {export} (report: {export / 'report.md'})")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from quantship.verify import verify_checkpoint

    result = verify_checkpoint(args.path)
    print(result.summary(max_findings=args.max_findings))
    return 0 if result.ok else 1


def run_convert(args: argparse.Namespace) -> int:
    from quantship.convert import convert_checkpoint

    convert_checkpoint(args.src, args.dst, args.to, overwrite=args.overwrite)
    print(f"converted {args.src} to {args.to} at {args.dst}")
    return 0


# One entry per subcommand: (adds its parser, runs it). A new command is one line here.
COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    "quantize": (_add_quantize, run_quantize),
    "verify": (_add_verify, run_verify),
    "convert": (_add_convert, run_convert),
    "eval": (evaluate.add_parser, evaluate.run),
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except QuantshipError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print("error: no space left on the device while writing; free space or export elsewhere "
                  "(nothing was left at the target)", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the target", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
