"""Fuzz target for the readers of untrusted files: the safetensors-header reader
(`verify/tensors.py`), verify's config reader (`verify/config.py`) and the source folder's config
check (`source.py`). Run by tests/verify/test_fuzz_readers.py under atheris, bounded in time:

    python tests/verify/fuzz_readers.py CORPUS_DIR -max_total_time=20 -dict=DICT

An input is one byte choosing the target, then that target's file(s):
- 0 "header": the bytes of model.safetensors, beside a valid NVFP4 config (`verify` runs fully);
- 1 "verify_config": config.json, a NUL byte, hf_quant_config.json (no NUL: no hf_quant_config),
  beside a valid NVFP4 tensor file;
- 2 "source_config": a source folder's config.json, beside float weights.
Any exception but `QuantshipError` is a crash. `run_case` is also what the regression tests replay.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

TARGETS = ("header", "verify_config", "source_config")
MODULE = "model.layers.0.mlp.down_proj"


def valid_tensors() -> dict[str, torch.Tensor]:
    """One NVFP4 linear (Model Optimizer layout), a norm and an FP8 KV scale pair."""
    g = torch.Generator().manual_seed(0)
    return {
        f"{MODULE}.weight": torch.randint(0, 256, (32, 8), generator=g, dtype=torch.uint8),
        f"{MODULE}.weight_scale": torch.full((32, 1), 2.0).to(torch.float8_e4m3fn),
        f"{MODULE}.weight_scale_2": torch.tensor(1e-3),
        f"{MODULE}.input_scale": torch.tensor(2e-3),
        "model.layers.0.self_attn.k_proj.k_scale": torch.tensor(0.1),
        "model.layers.0.self_attn.v_proj.v_scale": torch.tensor(0.2),
        "model.norm.weight": torch.ones(16, dtype=torch.bfloat16),
    }


def valid_configs() -> tuple[dict, dict]:
    quant = {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16, "exclude_modules": ["lm_head"]}
    config = {"model_type": "llama", "quantization_config": {
        "quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": ["lm_head"],
        "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
        "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "float", "group_size": 16},
                                      "input_activations": {"num_bits": 4, "type": "float", "group_size": 16},
                                      "targets": ["Linear"]}}}}
    return config, {"producer": {"name": "fuzz"}, "quantization": quant}


def seeds() -> list[bytes]:
    """Valid inputs for every target: the fuzzer mutates from here."""
    tmp = Path(__import__("tempfile").mkdtemp())
    try:
        save_file(valid_tensors(), tmp / "a.safetensors")
        save_file({"w": torch.zeros(2, 3, dtype=torch.float8_e4m3fn), "s": torch.ones(1)}, tmp / "b.safetensors")
        files = [(tmp / n).read_bytes() for n in ("a.safetensors", "b.safetensors")]
    finally:
        shutil.rmtree(tmp)
    config, hf_quant = valid_configs()
    ct = {"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head", "re:.*gate$"], "kv_cache_scheme": {"num_bits": 8, "type": "float"},
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "nvfp4-pack-quantized",
                                      "weights": {"num_bits": 4, "type": "float", "group_size": 16},
                                      "input_activations": {"num_bits": 4, "type": "float", "dynamic": "local"}}}}}
    source = {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1, "torch_dtype": "bfloat16"}
    return [
        *(b"\x00" + f for f in files),
        b"\x01" + json.dumps(config).encode() + b"\x00" + json.dumps(hf_quant).encode(),
        b"\x01" + json.dumps(ct).encode(),
        b"\x02" + json.dumps(source).encode(),
        b"\x02" + json.dumps({**source, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}).encode(),
    ]


DICTIONARY = [
    '"quant_algo"', '"NVFP4"', '"FP8"', '"group_size"', '"exclude_modules"', '"quantization"',
    '"quantization_config"', '"quant_method"', '"modelopt"', '"compressed-tensors"', '"config_groups"',
    '"weights"', '"input_activations"', '"targets"', '"ignore"', '"format"', '"kv_cache_scheme"',
    '"kv_cache_quant_algo"', '"num_bits"', '"type"', '"strategy"', '"dynamic"', '"quantization_status"',
    "null", "true", "[]", "{}", "0", "-1", "1e999", '"re:("', '"*"', '"dtype"', '"shape"', '"data_offsets"',
    '"U8"', '"F8_E4M3"', '"F32"', '"BF16"', '"I64"', '"BOOL"', '"__metadata__"', '"weight_map"',
]


class Scratch:
    """One folder per target, rewritten for every input."""

    def __init__(self, root: Path):
        self.root = root
        config, hf_quant = valid_configs()
        self.config, self.hf_quant = json.dumps(config), json.dumps(hf_quant)
        self.tensors = root / "tensors.safetensors"
        root.mkdir(parents=True, exist_ok=True)
        save_file(valid_tensors(), self.tensors)
        self.floats = root / "floats.safetensors"
        save_file({"model.norm.weight": torch.ones(16, dtype=torch.bfloat16)}, self.floats)

    def folder(self, name: str, files: dict[str, bytes | Path | None]) -> Path:
        d = self.root / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        for file, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, d / file)
            elif content is not None:
                (d / file).write_bytes(content)
        return d


def run_case(data: bytes, scratch: Scratch) -> None:
    """Feed one input to its reader; raises only what a reader must never raise."""
    from quantship.errors import QuantshipError
    from quantship.source import check_float_tensors, check_model_dir
    from quantship.verify import verify_checkpoint
    from quantship.verify.tensors import read_headers

    if not data:
        return
    target, body = TARGETS[data[0] % len(TARGETS)], data[1:]
    try:
        if target == "header":
            d = scratch.folder(target, {"config.json": scratch.config.encode(),
                                        "hf_quant_config.json": scratch.hf_quant.encode(), "model.safetensors": body})
            read_headers(d)
            verify_checkpoint(d)
        elif target == "verify_config":
            config, _, hf_quant = body.partition(b"\x00")
            d = scratch.folder(target, {"config.json": config, "hf_quant_config.json": hf_quant if b"\x00" in body else None,
                                        "model.safetensors": scratch.tensors})
            verify_checkpoint(d)
        else:
            d = scratch.folder(target, {"config.json": body, "model.safetensors": scratch.floats})
            check_model_dir(str(d))
            check_float_tensors(str(d))
    except QuantshipError:
        pass


def main() -> None:
    import atheris

    with atheris.instrument_imports(include=["quantship.verify", "quantship.source", "quantship.sources"]):
        import quantship.source  # noqa: F401
        import quantship.verify  # noqa: F401

    # libFuzzer ends the process itself, so the caller owns (and removes) the scratch folder.
    scratch = Scratch(Path(os.environ["QUANTSHIP_FUZZ_SCRATCH"]))
    atheris.Setup(sys.argv, lambda data: run_case(data, scratch))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
