"""Dequantization speed of shipped source formats through `SourceCheckpoint` (CPU), per expert tensor of
DeepSeek-V3 / Kimi-K2 shape, and of the same pure functions on a CUDA tensor where one is present.

    python bench/sources_dequant.py [--threads 1 16] [--json out.json]

The source shards are synthetic (random e4m3 bytes with float32 block scales; random int32 words, which
are all valid INT4 packings, with bf16 group-32 scales): only shapes and dtypes matter for speed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantship.sources import SourceCheckpoint
from quantship.sources.compressed_int4 import dequantize_packed
from quantship.sources.fp8_block import dequantize_fp8_block, scale_grid

SHAPES = {"gate/up_proj [2048, 7168]": (2048, 7168), "down_proj [7168, 2048]": (7168, 2048)}
INT4_QC = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
    "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                                       "symmetric": True}}}}
FP8_QC = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}


def _source(root: Path, name: str, tensors: dict, qc: dict) -> Path:
    path = root / name
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    return path


def _time(fn, repeat: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (m, n) in SHAPES.items():
            q = (torch.randn(m, n, generator=g) * 100).to(torch.float8_e4m3fn)
            s = torch.rand(scale_grid((m, n)), generator=g) * 1e-3
            packed = torch.randint(-(2**31), 2**31 - 1, (m, n // 8), generator=g, dtype=torch.int32)
            scale = (torch.rand(m, n // 32, generator=g) * 1e-2).to(torch.bfloat16)
            fp8 = _source(Path(tmp), f"fp8-{m}", {"x.weight": q, "x.weight_scale_inv": s}, FP8_QC)
            int4 = _source(Path(tmp), f"int4-{m}", {"x.weight_packed": packed, "x.weight_scale": scale,
                                                    "x.weight_shape": torch.tensor([m, n])}, INT4_QC)
            out_bytes = m * n * 2
            for threads in args.threads:
                torch.set_num_threads(threads)
                for fmt, path in (("fp8-block", fp8), ("int4 pack-quantized", int4)):
                    with SourceCheckpoint(path) as src:
                        sec = _time(lambda src=src: src.dequantized("x.weight"))
                    rows.append({"tensor": label, "format": fmt, "where": f"cpu, {threads} threads",
                                 "ms": round(sec * 1e3, 2), "GB_per_s_bf16_out": round(out_bytes / sec / 1e9, 2)})
            if torch.cuda.is_available():
                qc, sc, pc, scc = q.cuda(), s.cuda(), packed.cuda(), scale.cuda()
                cases = (("fp8-block", dequantize_fp8_block, (qc, sc)),
                         ("int4 pack-quantized", dequantize_packed, (pc, scc, n, 4)))
                for fmt, fn, fn_args in cases:
                    sec = _time(lambda fn=fn, a=fn_args: (fn(*a), torch.cuda.synchronize()), repeat=10)
                    rows.append({"tensor": label, "format": fmt, "where": torch.cuda.get_device_name(),
                                 "ms": round(sec * 1e3, 3), "GB_per_s_bf16_out": round(out_bytes / sec / 1e9, 1)})
    for r in rows:
        print(f"{r['tensor']:28} {r['format']:20} {r['where']:28} {r['ms']:>9} ms  {r['GB_per_s_bf16_out']:>7} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
