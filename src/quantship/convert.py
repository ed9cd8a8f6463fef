"""`quantship convert SRC DST --to {modelopt,compressed-tensors}`: change a quantized checkpoint's
layout without requantizing.

Packed weights and block scales are copied byte for byte, global scales are inverted and every
tensor renamed as `export/compressed_tensors.py` defines; config.json's `quantization_config`
(and Model Optimizer's hf_quant_config.json) are rewritten, every other file (tokenizer,
generation config, remote code, reports) is copied. Tensors stream one at a time into
size-limited shards, built in a temporary directory renamed into place at the end.

The source must pass `verify` first: converting a broken checkpoint would only move its defects.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from quantship.errors import QuantshipError
from quantship.export import compressed_tensors as ct
from quantship.export import modelopt_hf
from quantship.export.shards import TEMP_PREFIX, ShardWriter, atomic_export_dir
from quantship.verify import verify_checkpoint
from quantship.verify.checks import is_quantized, modules_of
from quantship.verify.config import Declared, read_declared
from quantship.verify.specs import FLOAT_WEIGHT_DTYPES, is_projection
from quantship.verify.tensors import TensorInfo, load, read_headers

# Files the converter writes itself; everything else in the source directory is copied.
REWRITTEN = ("config.json", "hf_quant_config.json", "model.safetensors.index.json")


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, overwrite: bool = False,
                       max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write `src` in layout `to` at `dst` (atomically); returns `dst`."""
    src, dst = Path(src), Path(dst)
    declared = _check_source(src, dst, to)
    infos, _ = read_headers(src)
    hf_quant_config = modelopt_hf.hf_quant_config(
        declared.quant_algo, declared.group_size, declared.kv_algo, _exclude_modules(declared, infos)
    )
    if to == ct.MODELOPT:
        quantization_config = modelopt_hf.config_json_quantization(hf_quant_config)
    else:
        quantization_config = ct.config_json_quantization(hf_quant_config)
    with atomic_export_dir(dst, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, metadata={"producer": "quantship"})
        for name, tensor in ct.convert_tensors(load(src, infos, infos), declared.quant_algo, to):
            writer.add(name, tensor)
        writer.close()
        _copy_other_files(src, tmp)
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if to == ct.MODELOPT:
            (tmp / "hf_quant_config.json").write_text(json.dumps(hf_quant_config, indent=4))
    return dst


def _check_source(src: Path, dst: Path, to: str) -> Declared:
    """What `src` declares, once it is known convertible to `to`; one-line errors otherwise."""
    if to not in ct.LAYOUTS:
        raise QuantshipError(f"unknown layout {to!r} for --to; choose one of: {', '.join(ct.LAYOUTS)}")
    if not (src / "config.json").is_file():
        raise QuantshipError(f"{src} has no config.json; pass a quantized checkpoint directory")
    if src.resolve() == dst.resolve():
        raise QuantshipError("SRC and DST are the same directory; convert into a new directory")
    declared = read_declared(src)
    if declared.layout == to:
        raise QuantshipError(f"{src} is already a {to} checkpoint; nothing to convert")
    ct.check_supported(declared.quant_algo, declared.kv_algo)
    if not declared.static_inputs:
        raise QuantshipError(f"{src} computes activation scales at run time; Model Optimizer's "
                             f"{declared.quant_algo} layout stores static input scales, so it cannot be converted")
    result = verify_checkpoint(src)
    if not result.ok:
        raise QuantshipError(
            f"{src} does not pass verify ({len(result.findings)} findings, first: {result.findings[0]}); "
            f"run `quantship verify {src}` and fix or re-export it before converting"
        )
    return declared


def _exclude_modules(d: Declared, infos: dict[str, TensorInfo]) -> list[str]:
    """Model Optimizer's exclude list for the source: its own list, or for compressed-tensors the
    modules its `ignore` entries match (a `re:` regex has no fnmatch equivalent, so it is expanded
    to the names it matches here) plus projections its targets leave unquantized."""
    if d.layout == ct.MODELOPT:
        return list(d.exclude)
    names = {p for p in d.exclude if not p.startswith("re:")}
    for module, params in modules_of(infos).items():
        weight = params.get("weight")
        if is_quantized(params) or weight is None or weight.dtype not in FLOAT_WEIGHT_DTYPES:
            continue
        if len(weight.shape) >= 2 and (d.excluded_by(module) is not None or is_projection(module)):
            names.add(module)
    return sorted(names)


def _copy_other_files(src: Path, dst: Path) -> None:
    for entry in sorted(src.iterdir()):
        if entry.name in REWRITTEN or entry.suffix == ".safetensors" or entry.name.startswith(TEMP_PREFIX):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name)
        else:
            shutil.copy2(entry, dst / entry.name)
