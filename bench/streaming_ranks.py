"""Streaming on several GPUs (NCCL): `torchrun --nproc-per-node N quantship quantize` against one
in-memory process on one GPU, for tiny MoE models — the exports must be equal byte for byte.

    python bench/streaming_ranks.py --gpus 2 --out bench/results/<date>-<card>x2-streaming-ranks.json

The CPU twin of this check (gloo, 2 processes) is tests/streaming/test_distributed.py. Needs
tests/ on PYTHONPATH (tiny_models) and no network: the tokenizer is byte-level, written here, and
the calibration text a local file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# bench/ holds scripts named like packages transformers imports (bench/kernels.py shadows HF's
# `kernels`): keep this folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

TEXT = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog while rivers run to the sea."
                for i in range(400))
CALIB = ["--calib-size", "12", "--calib-seq-len", "64", "--batch-size", "2", "--moe-min-tokens", "12",
         "--qformat", "nvfp4", "--kv-cache-qformat", "fp8", "--no-progress"]


def same_files(a: Path, b: Path) -> list[str]:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return ["<file lists differ>"]
    return [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--work", default="/tmp/qs-ranks")
    p.add_argument("--kinds", nargs="+", default=["qwen3_moe", "deepseek_v3", "mixtral"])
    p.add_argument("--out", default="streaming-ranks.json")
    p.add_argument("--device", default="cuda", help="cpu: check the script itself (gloo ranks)")
    args = p.parse_args()
    from tiny_models import save_tiny_model, write_byte_tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "calib.txt").write_text(TEXT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    results = {}
    for kind in args.kinds:
        src = save_tiny_model(kind, work / kind / "src")
        write_byte_tokenizer(src)
        common = ["--model", str(src), "--dataset", str(work / "calib.txt"), *CALIB, "--overwrite"]
        start = time.perf_counter()
        one = subprocess.run([sys.executable, "-m", "quantship.cli", "quantize", *common, "--device", args.device,
                              "--export", str(work / kind / "one")], env=env, capture_output=True, text=True)
        t_one = time.perf_counter() - start
        start = time.perf_counter()
        many = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(args.gpus), "-m", "quantship.cli", "quantize", *common, "--device", args.device,
                               "--export", str(work / kind / "ranks")], env=env, capture_output=True, text=True)
        t_many = time.perf_counter() - start
        ok = one.returncode == 0 and many.returncode == 0
        results[kind] = {
            "in_memory_one_gpu_s": t_one, f"streaming_{args.gpus}_ranks_s": t_many,
            "returncodes": [one.returncode, many.returncode],
            "differing_files": same_files(work / kind / "one", work / kind / "ranks") if ok else None,
            "stderr_tail": None if ok else (one.stderr + many.stderr)[-2000:],
        }
        print(kind, json.dumps(results[kind], indent=1))
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
