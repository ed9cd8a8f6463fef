"""Load the source model and tokenizer, with one-line errors for every way that goes wrong."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from quantship.calibration.amax import all_finite
from quantship.errors import QuantshipError
from quantship.model.discover import SUPPORTED_ARCHITECTURES

_FLOAT_CODES = ("F16", "BF16", "F32", "F64")  # safetensors dtype codes a float source may use


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def check_model_dir(path: str) -> None:
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise QuantshipError(f"model directory {p} has no config.json; point --model to a Hugging Face model folder")
        try:
            config = json.loads((p / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise QuantshipError(f"{p / 'config.json'} is not readable JSON ({e}); re-download or fix it") from None
        if not isinstance(config, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(config), "a number or null")
            raise QuantshipError(f"{p / 'config.json'} holds {kind}, not a JSON object; re-download or fix it")
        return
    if p.exists():
        raise QuantshipError(f"--model {p} is a file; point it to the model's directory")
    if not _looks_like_hub_id(path):
        raise QuantshipError(f"model directory {p} does not exist; pass an existing local folder with --model")


def check_finite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse a source whose float weights hold NaN or inf (quantizing them gives NaN scales)."""
    for name, t in named:
        if t.is_floating_point() and not all_finite(t):
            raise QuantshipError(f"source weight {name} contains NaN or inf; fix or re-export the source model")


def check_finite(module: nn.Module, prefix: str = "") -> None:
    """`check_finite_tensors` over a module's parameters, named from `prefix` (a submodule's path)."""
    check_finite_tensors((f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters())


def check_float_tensors(path: str) -> None:
    """A source without quantization metadata must hold float tensors: transformers casts
    integer, bool or fp8 ones into the model's dtype without any scale, and quantizing those
    values would ship garbage. Reads safetensors headers only."""
    from quantship.sources.reader import quantization_metadata
    from quantship.verify.specs import DTYPE_NAMES
    from quantship.verify.tensors import read_headers

    root = Path(path).expanduser()
    if quantization_metadata(root, json.loads((root / "config.json").read_text())) is not None:
        return
    infos, _ = read_headers(root)  # unreadable files are left to the loader, which names them
    bad = sorted((name, info.dtype) for name, info in infos.items() if info.dtype not in _FLOAT_CODES)
    if bad:
        name, code = bad[0]
        names = {**DTYPE_NAMES, "BOOL": "bool", "I16": "int16", "I32": "int32", "I64": "int64", "U16": "uint16"}
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise QuantshipError(
            f"source tensor {name} is stored as {names.get(code, code)}{more} but {root / 'config.json'} declares no "
            "quantization; pass a float (bf16/fp16/fp32) checkpoint, or a quantized one with its quantization_config"
        )


def check_nothing_missing(path: str, info: dict) -> None:
    """transformers fills weights the checkpoint lacks with fresh random values and only warns;
    quantizing those would ship noise. A config that wants more layers than the weights hold,
    or a shard the index leaves out, ends here."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise QuantshipError(
            f"{len(missing)} weight{'s' if len(missing) != 1 else ''} of the model in {path} missing from its checkpoint "
            f"({', '.join(missing[:3])}{more}); config.json and the weights disagree or a shard is missing"
        )


def load_source_model(path: str, trust_remote_code: bool = False, device: str | None = None,
                      dtype: torch.dtype = torch.bfloat16):
    """(model, tokenizer) from a local folder (or a hub id when reachable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantship.sources.load import load_if_quantized

    check_model_dir(path)
    local = Path(path).expanduser().is_dir()
    try:
        # FP8-block / INT4 / NVFP4 sources: dequantized tensor by tensor, no BF16 copy (quantship.sources).
        model = load_if_quantized(path, dtype, trust_remote_code) if local else None
        if model is None:
            if local:
                check_float_tensors(path)
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=local,
                output_loading_info=True,
            )
            check_nothing_missing(path, info)
    except QuantshipError:
        raise
    except ValueError as e:
        text = str(e)
        if "trust_remote_code" in text:
            raise QuantshipError(
                f"{path} needs its own model code; rerun with --trust-remote-code if you trust it"
            ) from None
        if "Unrecognized configuration" in text or "model type" in text:
            raise QuantshipError(f"unsupported model at {path}; supported: {SUPPORTED_ARCHITECTURES}") from None
        raise QuantshipError(f"cannot load model from {path}: {text.splitlines()[0]}") from None
    except OSError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not local:
            raise QuantshipError(
                f"cannot reach the Hugging Face hub for {path} ({first}); download it and pass the local folder"
            ) from None
        raise QuantshipError(f"cannot read model weights in {path}: {first}") from None
    except Exception as e:  # safetensors/torch errors from truncated or inconsistent files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QuantshipError(f"cannot load the weights in {path} ({type(e).__name__}: {first}); "
                             "check that the checkpoint is complete") from None
    check_finite(model)
    if device:
        model = model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local)
    except Exception as e:
        # The cause goes along: AutoTokenizer also parses config.json, whose errors land here too.
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise QuantshipError(f"cannot load the tokenizer of {path} ({type(e).__name__}{': ' if first else ''}"
                             f"{first}); copy the tokenizer files into the model folder") from None
    return model.eval(), tokenizer
