"""Export time of a many-tensor MoE on the CPU: where the per-tensor work of an export goes.

    python -P bench/export_cpu.py --out bench/results             # 8 layers x 128 experts: ~12.5k tensors
    python -P bench/export_cpu.py --experts 16 --layers 2 --repeat 1   # a quick check
    python -P bench/export_cpu.py --profile 30                    # cProfile of one export, top 30 rows
    python -P bench/export_cpu.py --cache-quantize                # without the CPU quantization (GPU-like)

The synthetic Qwen3-MoE has the tensor count of bench/end_to_end.py's model (8 layers, 128
experts, top-8: 12.4k checkpoint tensors) but small matrices (hidden 256, experts of 64), so the
per-tensor overhead of quantize-split-write is what is timed, not the disk. It is quantized to
NVFP4 once (CPU reference kernels) and exported `--repeat` times into a temporary folder (the
first export is as warm as the rest: no Triton here); seconds, tensors, bytes and GB/s go to
`<out>/<date>-cpu-export.{json,md}`.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # bench/kernels.py shadows HF's kernels
_spec = importlib.util.spec_from_file_location("quantship_bench_timing", HERE / "timing.py")
timing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timing)

import quantship  # noqa: E402


def build(layers: int, experts: int, hidden: int, expert_dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=1024, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, num_experts=experts,
                            num_experts_per_tok=min(8, experts), moe_intermediate_size=expert_dim,
                            intermediate_size=4 * hidden, tie_word_embeddings=True, norm_topk_prob=True,
                            max_position_embeddings=256, architectures=["Qwen3MoeForCausalLM"])
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def _cache_quantize(qm) -> None:
    """Memoize the handler's quantize per (weight chunk, scales): the first export quantizes,
    later ones time only splitting, naming and writing, as on a GPU where quantizing is ~free."""
    handler, cache = qm.plan.handler, {}

    class Cached:
        def __getattr__(self, name):
            return getattr(handler, name)

        def quantize(self, weight, scales):
            key = (weight.data_ptr(), tuple(weight.shape), tuple(sorted((k, v.data_ptr()) for k, v in scales.items())))
            if key not in cache:
                cache[key] = handler.quantize(weight, scales)
            return cache[key]

    qm.plan.handler = Cached()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON and markdown results")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--expert-dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-shard-bytes", type=int, default=5 * 1024**3)
    ap.add_argument("--profile", type=int, default=0, help="print the top N cProfile rows of one more export")
    ap.add_argument("--label", default="", help="a note stored with the results (which code was timed)")
    ap.add_argument("--cache-quantize", action="store_true",
                    help="quantize each chunk once and reuse it in later exports (the GPU case: quantizing is ~free)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    model = build(args.layers, args.experts, args.hidden, args.expert_dim)
    ids = torch.randint(0, 1024, (4, 64), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    qm = quantship.quantize(model, "nvfp4", [{"input_ids": ids}], kv_cache="fp8", moe_min_tokens=4, progress=False)
    calibrate_s = time.perf_counter() - t0
    if args.cache_quantize:
        _cache_quantize(qm)
    work = Path(tempfile.mkdtemp(prefix="quantship-export-cpu-"))
    target = work / "ckpt"
    try:
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            qm.export(target, overwrite=True, progress=False, max_shard_bytes=args.max_shard_bytes)
            times.append(time.perf_counter() - t0)
        files = list(target.glob("*.safetensors"))
        nbytes = sum(f.stat().st_size for f in files)
        n_tensors = sum(1 for _ in qm.checkpoint_tensors())
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(qm.export, target, overwrite=True, progress=False, max_shard_bytes=args.max_shard_bytes)
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(args.profile)
            print(s.getvalue())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = sorted(times)[len(times) // 2]
    row = {"label": args.label, "layers": args.layers, "experts": args.experts, "hidden": args.hidden,
           "expert_dim": args.expert_dim, "tensors": n_tensors, "export_mb": nbytes / 1e6, "export_s": seconds,
           "runs": [round(t, 3) for t in times], "us_per_tensor": 1e6 * seconds / n_tensors,
           "calibrate_s": calibrate_s, "cache_quantize": args.cache_quantize, "max_shard_bytes": args.max_shard_bytes}
    print(f"{n_tensors} tensors, {nbytes / 1e6:.1f} MB in {len(files)} file(s): export {seconds:.3f} s "
          f"(runs {row['runs']}), {row['us_per_tensor']:.0f} us/tensor; calibration {calibrate_s:.1f} s")
    if args.out is not None:
        info = {"card": "cpu", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads()}
        previous = args.out / f"{info['date']}-cpu-export.json"  # rows of earlier runs that day are kept
        rows = json.loads(previous.read_text())["rows"] if previous.exists() else []
        rows.append(row)
        md = timing.table(rows, [("label", "code"), ("tensors", "tensors"), ("export_mb", "MB"), ("max_shard_bytes", "shard limit"),
                                 ("cache_quantize", "quantize cached"), ("export_s", "export s (median)"),
                                 ("runs", "runs"), ("us_per_tensor", "us/tensor")])
        timing.write_results(args.out, "export", {"device": info, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
