"""`quantship quantize --streaming`: when to stream, and the command's streaming branch."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from quantship.errors import QuantshipError
from quantship.streaming.distributed import init_from_env
from quantship.streaming.source import LayerSource

# Stream when the weights take more than this share of the free GPU memory: the rest holds the
# calibration activations, the forward's temporaries and the quantized copies.
FIT_FRACTION = 0.8


def streaming_wanted(flag: bool | None, model_dir: str, device: str) -> bool:
    """--streaming / --no-streaming as given; by default stream when the model's weights (from the
    safetensors headers) do not fit the GPU. On CPU the in-memory path stays the default."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if flag is False:
            raise QuantshipError("under torchrun only the streaming path runs; drop --no-streaming")
        return True
    if flag is not None:
        return flag
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return False
    try:
        need = LayerSource(model_dir).loaded_bytes()
    except QuantshipError:
        return False  # no safetensors (the in-memory loader explains what is wrong)
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return need > FIT_FRACTION * free


def run_streaming_quantize(args: argparse.Namespace, documents: list, export: Path, device: str) -> int:
    """Tokenize the calibration text and quantize `args.model` layer by layer into `export`."""
    from transformers import AutoTokenizer

    from quantship.calibration.data import build_calibration_batches
    from quantship.streaming.layerwise import stream_quantize

    ranks = init_from_env()
    if ranks.world > 1 and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code,
                                                  local_files_only=True)
    except Exception as e:
        raise QuantshipError(f"cannot load the tokenizer of {args.model} ({type(e).__name__}); "
                             "copy the tokenizer files into the model folder") from None
    batches = build_calibration_batches(tokenizer, documents, args.calib_size, args.calib_seq_len,
                                        args.batch_size, args.seed)
    stream_quantize(args.model, args.qformat, batches, export, kv_cache=args.kv_cache_qformat, exclude=args.exclude,
                    moe_min_tokens=args.moe_min_tokens, trust_remote_code=args.trust_remote_code, device=device,
                    export_format=args.export_format, overwrite=args.overwrite, progress=args.progress,
                    quantize_mtp=getattr(args, "quantize_mtp", False), algorithm=getattr(args, "algorithm", "max"))
    if ranks.is_main:
        print(f"exported {args.qformat} checkpoint to {export} layer by layer (report: {export / 'report.md'})")
    return 0
