"""Streaming (`quantship quantize --streaming`) at real DeepSeek-V3 widths on one GPU.

Measures, in one run on one machine: wall time against the I/O floor (bytes read + written over
the disk bandwidth measured in the same run), peak GPU memory against one decoder layer, and
Model Optimizer on the same model through its own offload path (accelerate device_map with a GPU
budget, `mtq.quantize`, `export_hf_checkpoint`'s offload-aware export).

    python bench/scale.py generate --work /tmp/qs-scale --disk-gb 40   # synthetic source shards
    python bench/scale.py disk     --work /tmp/qs-scale                # write/read bandwidth
    python bench/scale.py ours     --work /tmp/qs-scale                # quantship streaming
    python bench/scale.py modelopt --work /tmp/qs-scale --gpu-gb 24    # Model Optimizer, offloaded
    python bench/scale.py report   --work /tmp/qs-scale --out bench/results/<date>-<card>-scale
    python bench/scale.py all      --work /tmp/qs-scale ...            # the five, each in its own process

The model: DeepseekV3Config with hidden 7168, 256 routed experts of 2048, top-8 (8 groups, 4 kept),
one shared expert, MLA (q_lora 1536, kv_lora 512, 128 heads), vocabulary 129280; one dense first
layer, then as many MoE layers (23 GB each in BF16) as `--disk-gb` holds next to one export.
Weights are random N(0, 0.02) BF16 written straight to safetensors shards in the checkpoint's
per-expert names (transformers' reverse conversion); calibration tokens are random ids (no
DeepSeek tokenizer offline; speed does not depend on the text). Page caches of the files are
dropped before each tool reads them. Each stage writes <work>/<stage>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

# bench/ holds scripts named like packages transformers imports (bench/kernels.py shadows HF's
# `kernels`): keep this folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

GB = 1e9
NVFP4_RATIO = 4.5 / 16  # packed 4-bit weights + e4m3 scale per 16, against BF16


def deepseek_config(num_layers: int, tiny: bool = False):
    from transformers import DeepseekV3Config

    if tiny:  # --tiny: the same pipeline at test widths, to check the script on a CPU
        return DeepseekV3Config(
            vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
            num_hidden_layers=num_layers, first_k_dense_replace=1, n_routed_experts=64, num_experts_per_tok=8,
            n_shared_experts=1, n_group=8, topk_group=4, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
            max_position_embeddings=4096, rope_scaling=None, tie_word_embeddings=False,
        )
    return DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=num_layers, first_k_dense_replace=1, n_routed_experts=256, num_experts_per_tok=8,
        n_shared_experts=1, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=4096,
        rope_scaling=None, tie_word_embeddings=False,
    )


def checkpoint_shapes(config) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Checkpoint tensor names and shapes (per expert), from the model on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model.state_dict().items()}
    return {k: (v.shape, v.dtype) for k, v in revert_weight_conversion(model, meta).items()}


def section_of(name: str) -> str:
    parts = name.split(".")
    return f"layer{parts[2]}" if parts[:2] == ["model", "layers"] else "outside"


def section_bytes(shapes: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, (shape, dtype) in shapes.items():
        out[section_of(name)] = out.get(section_of(name), 0) + shape.numel() * dtype.itemsize
    return out


def drop_page_cache(paths) -> None:
    """Evict files from the page cache so the next read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files(d: Path) -> list[Path]:
    return sorted(p for p in Path(d).rglob("*") if p.is_file())


def save(work: Path, stage: str, data: dict) -> None:
    (work / f"{stage}.json").write_text(json.dumps(data, indent=1))
    print(json.dumps(data, indent=1))


# --------------------------------------------------------------------------- stages
def generate(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    work, src = Path(args.work), Path(args.work) / "src"
    probe = section_bytes(checkpoint_shapes(deepseek_config(2, args.tiny)))
    outside, dense, moe = probe["outside"], probe["layer0"], probe["layer1"]
    tiny_default = 3 if args.tiny else 0  # --tiny checks the script: never fill the disk with test-width layers
    n_moe = args.moe_layers or tiny_default or max(1, int((args.disk_gb * GB - 2 * outside - 1.3 * dense) // ((1 + NVFP4_RATIO) * moe)))
    config = deepseek_config(1 + n_moe, args.tiny)
    shapes = checkpoint_shapes(config)
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    config.save_pretrained(src)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    shard, shard_bytes, weight_map, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(src / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes, n = {}, 0, n + 1

    for name, (shape, dtype) in shapes.items():
        if len(shape) >= 2:
            t = torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(0.02).to(dtype).cpu()
        elif "norm" in name:
            t = torch.ones(shape, dtype=dtype)
        else:  # the router's score-correction bias
            t = torch.randn(shape, generator=g, device=device).mul_(0.01).to(dtype).cpu()
        shard[name] = t
        shard_bytes += t.numel() * t.element_size()
        if shard_bytes >= 5 * GB:
            flush()
    if shard:
        flush()
    total = sum(s[0].numel() * s[1].itemsize for s in shapes.values())
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    drop_page_cache(files(src))
    save(work, "generate", {"layers": 1 + n_moe, "moe_layers": n_moe, "bytes": total, "sections": section_bytes(shapes),
                            "hidden": config.hidden_size, "vocab": config.vocab_size, "experts": config.n_routed_experts,
                            "expert_width": config.moe_intermediate_size,
                            "seconds": time.perf_counter() - start, "device": device})


def disk(args: argparse.Namespace) -> None:
    """Sequential write (with fsync) and read (page cache dropped) of a probe file."""
    work = Path(args.work)
    probe, chunk = work / "disk-probe.bin", os.urandom(64 * 1024**2)
    n = max(1, int(args.probe_gb * GB) // len(chunk))
    start = time.perf_counter()
    with open(probe, "wb") as f:
        for _ in range(n):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    drop_page_cache([probe])
    buf = bytearray(len(chunk))
    start = time.perf_counter()
    with open(probe, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    read_s = time.perf_counter() - start
    probe.unlink()
    size = n * len(chunk)
    save(work, "disk", {"probe_bytes": size, "write_Bps": size / write_s, "read_Bps": size / read_s})


def random_batches(args: argparse.Namespace, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(args.seed)
    out = []
    for i in range(0, args.calib_size, args.batch_size):
        ids = torch.randint(0, vocab, (min(args.batch_size, args.calib_size - i), args.calib_seq_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _vocab(work: Path) -> int:
    return json.loads((work / "generate.json").read_text())["vocab"]


def _card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def ours(args: argparse.Namespace) -> None:
    from quantship.streaming import stream_quantize
    from quantship.verify import verify_checkpoint

    work, src, out = Path(args.work), Path(args.work) / "src", Path(args.work) / "ours"
    batches = random_batches(args, _vocab(work))
    shutil.rmtree(out, ignore_errors=True)
    drop_page_cache(files(src))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timings: dict = {}
    start = time.perf_counter()
    stream_quantize(src, "nvfp4", batches, out, device=args.device, overwrite=True, timings=timings,
                    max_shard_bytes=5 * 1024**3)
    wall = time.perf_counter() - start
    peak = _peak()
    written = sum(p.stat().st_size for p in files(out))
    ok = verify_checkpoint(out).ok
    if not args.keep:
        shutil.rmtree(out)  # room for Model Optimizer's export
    save(work, "ours", {"wall_s": wall, "peak_gpu_bytes": peak, "read_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors")),
                        "written_bytes": written, "timings": timings, "verify_ok": ok,
                        "tokens": sum(b["input_ids"].numel() for b in batches), "card": _card()})


def modelopt(args: argparse.Namespace) -> None:
    """Model Optimizer 0.47's own path for a model bigger than the GPU budget: accelerate offload."""
    from transformers import AutoModelForCausalLM

    from quantship.verify import verify_checkpoint

    work, src, out = Path(args.work), Path(args.work) / "src", Path(args.work) / "modelopt"
    batches = random_batches(args, _vocab(work))
    shutil.rmtree(out, ignore_errors=True)
    drop_page_cache(files(src))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result: dict = {"gpu_budget_gib": args.gpu_gb, "card": _card()}
    start = time.perf_counter()
    stage = "import"
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint

        stage = "load"
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, device_map="auto",
                                                     max_memory={0: f"{args.gpu_gb}GiB", "cpu": f"{args.cpu_gb}GiB"}).eval()
        result["load_s"] = time.perf_counter() - start

        def forward_loop(m):
            with torch.no_grad():
                for b in batches:
                    m(input_ids=b["input_ids"].to(args.device), attention_mask=b["attention_mask"].to(args.device),
                      use_cache=False)

        stage = "calibrate"
        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
        result["calibrate_s"] = time.perf_counter() - start - result["load_s"]
        stage = "export"
        export_hf_checkpoint(model, export_dir=str(out))
        result["verify_ok"] = verify_checkpoint(out).ok
        result["written_bytes"] = sum(p.stat().st_size for p in files(out))
    except Exception as e:  # recorded, not raised: the comparison is the point
        result["failed"] = f"{stage}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    result["wall_s"] = time.perf_counter() - start
    result["peak_gpu_bytes"] = _peak()
    shutil.rmtree(out, ignore_errors=True)
    save(work, "modelopt", result)


def report(args: argparse.Namespace) -> None:
    work = Path(args.work)
    gen, bw, us = (json.loads((work / f"{s}.json").read_text()) for s in ("generate", "disk", "ours"))
    mo = json.loads((work / "modelopt.json").read_text()) if (work / "modelopt.json").is_file() else {}
    layer = max(v for k, v in gen["sections"].items() if k.startswith("layer"))
    activations = us["tokens"] * gen["hidden"] * 2
    floor = us["read_bytes"] / bw["read_Bps"] + us["written_bytes"] / bw["write_Bps"]
    calibrate = us["timings"]["calibrate"]
    data = {
        "date": datetime.date.today().isoformat(), "card": us["card"], "model": gen, "disk": bw,
        "quantship": us, "modelopt": mo,
        "one_layer_bytes": layer, "activation_bytes": activations, "io_floor_s": floor,
        "criteria": {
            # The "1.5x one decoder layer plus activations", read strictly: 1.5 x (layer + activations).
            "peak_gpu <= 1.5 x (layer + activations)": us["peak_gpu_bytes"] <= 1.5 * (layer + activations),
            "wall <= 1.5 x (io floor + calibration compute)": us["wall_s"] <= 1.5 * (floor + calibrate),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    gib = 1024**3
    lines = [
        f"# Streaming at DeepSeek-V3 widths — {data['card']}, {data['date']}", "",
        f"- model: {gen['layers']} decoder layers (1 dense, {gen['moe_layers']} MoE of {gen['experts']} x "
        f"{gen['expert_width']} experts, hidden {gen['hidden']}), "
        f"{gen['bytes'] / GB:.1f} GB BF16; one decoder layer {layer / GB:.1f} GB; calibration "
        f"{us['tokens']} tokens ({activations / GB:.2f} GB of hidden states)",
        f"- disk: write {bw['write_Bps'] / GB:.2f} GB/s, read {bw['read_Bps'] / GB:.2f} GB/s (probe, page cache dropped)",
        "", "| | wall s | peak GPU GiB | read GB | written GB | verify |", "|---|---|---|---|---|---|",
        f"| quantship --streaming | {us['wall_s']:.1f} | {us['peak_gpu_bytes'] / gib:.1f} | {us['read_bytes'] / GB:.1f} | "
        f"{us['written_bytes'] / GB:.1f} | {us['verify_ok']} |",
        f"| Model Optimizer (offload, GPU budget {mo.get('gpu_budget_gib')} GiB) | {mo.get('wall_s', float('nan')):.1f} | "
        f"{mo.get('peak_gpu_bytes', 0) / gib:.1f} | | {mo.get('written_bytes', 0) / GB:.1f} | "
        f"{mo.get('verify_ok', mo.get('failed', 'not run'))} |",
        "", f"- I/O floor (read/read_bw + written/write_bw): {floor:.1f} s; quantship phases: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in us["timings"].items() if k in ("load", "calibrate", "quantize_write", "journal"))
        + "; peak GPU GiB when first reached, by phase: "
        + ", ".join(f"{k.removeprefix('peak_gpu_bytes_')} {v / gib:.1f}" for k, v in us["timings"].items()
                    if k.startswith("peak_gpu_bytes_")),
        *(f"- {k}: **{'yes' if v else 'NO'}**" for k, v in data["criteria"].items()), "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def run_all(args: argparse.Namespace, argv: list[str]) -> None:
    """Each stage in its own process: separate CUDA contexts, peak memory and page caches.
    Model Optimizer gets `--modelopt-timeout` seconds, so the report is written either way."""
    common = [a for a in argv if a != "all"]
    for stage in ("generate", "disk", "ours", "modelopt", "report"):
        cmd = [sys.executable, __file__, stage, *common]
        if stage != "modelopt":
            subprocess.run(cmd, check=True)
            continue
        start = time.perf_counter()
        try:
            subprocess.run(cmd, timeout=args.modelopt_timeout)
        except subprocess.TimeoutExpired:
            save(Path(args.work), "modelopt", {"gpu_budget_gib": args.gpu_gb, "card": _card(),
                                               "failed": f"not finished in {args.modelopt_timeout} s (killed)",
                                               "wall_s": time.perf_counter() - start})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=("generate", "disk", "ours", "modelopt", "report", "all"))
    p.add_argument("--work", default="/tmp/qs-scale")
    p.add_argument("--disk-gb", type=float, default=40, help="source plus one export must fit in this")
    p.add_argument("--moe-layers", type=int, default=0, help="override the MoE layer count")
    p.add_argument("--probe-gb", type=float, default=4)
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gpu-gb", type=float, default=24, help="Model Optimizer's GPU budget (max_memory)")
    p.add_argument("--cpu-gb", type=float, default=110)
    p.add_argument("--modelopt-timeout", type=float, default=300, help="seconds (stage `all` only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep quantship's export")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="test widths: check the script itself on a CPU")
    p.add_argument("--out", default=f"bench/results/{datetime.date.today().isoformat()}-scale")
    args = p.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.stage == "all":
        run_all(args, argv)
    else:
        {"generate": generate, "disk": disk, "ours": ours, "modelopt": modelopt, "report": report}[args.stage](args)


if __name__ == "__main__":
    main()
