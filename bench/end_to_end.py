"""Calibration and export of a synthetic Qwen3-MoE: quantship against Model Optimizer, one GPU, one run.

    python bench/end_to_end.py --out bench/results          # ~5 B parameters, needs ~40 GB of GPU
    python bench/end_to_end.py --tiny --device cpu          # the same code path on a toy model

The model is built from `Qwen3MoeConfig` (8 layers, hidden 2048, 128 experts of 768, top-8,
vocabulary 32000 with tied embeddings: 5.05 B parameters) with random bf16 weights, directly on
the GPU; 32 sequences of 512 random tokens are the calibration set for every contestant.
Measured, in this order: the plain bf16 forward over those tokens; quantship's NVFP4
calibration (every expert covered: routed tokens, plus all tokens for experts under 32) and
export; Model Optimizer 0.47's NVFP4 calibration, routed only and with
`moe_calib_experts_ratio=1.0`, each followed by its `export_hf_checkpoint`. Each contestant gets
a freshly built model (same seed, same weights). After quantship's export, its tensors are written
again by the exporter's file writer alone: the disk's share of the export. Seconds, peak GPU memory, export GB/s and the ratios are written after every
phase, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

# This file's folder must not stay on sys.path: bench/kernels.py would shadow the `kernels`
# package that transformers probes for. The shared helpers are loaded by path instead.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("quantship_bench_timing", HERE / "timing.py")
timing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timing)
device_info, table, write_results = timing.device_info, timing.table, timing.write_results

import quantship  # noqa: E402

FULL = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4,
            head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
            tie_word_embeddings=True, norm_topk_prob=True, max_position_embeddings=4096)
TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128,
            tie_word_embeddings=True, norm_topk_prob=True, max_position_embeddings=256)


def build_model(cfg: dict, device: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(**cfg, architectures=["Qwen3MoeForCausalLM"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Phases:
    """Times phases (seconds, peak GPU memory) and rewrites the result files after each one."""

    def __init__(self, device: str, out: Path, meta: dict):
        self.device, self.out, self.meta = device, out, meta
        self.rows: list[dict] = []

    def run(self, name: str, fn, repeat: int = 1, **extra):
        """Seconds of ``fn()`` (the median of ``repeat`` runs) and the peak GPU memory."""
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeat):
            sync(self.device)
            t0 = time.perf_counter()
            result = fn()
            sync(self.device)
            times.append(time.perf_counter() - t0)
        seconds = sorted(times)[len(times) // 2]
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.startswith("cuda") else None
        row = {"phase": name, "seconds": seconds, "peak_gib": peak, "runs": [round(t, 4) for t in times], **extra}
        self.rows.append(row)
        print(f"{name:44s} {seconds:8.2f} s   peak {peak if peak is None else round(peak, 1)} GiB", flush=True)
        self.save()
        return result

    def seconds(self, name: str) -> float | None:
        return next((r["seconds"] for r in self.rows if r["phase"] == name), None)

    def save(self) -> None:
        ratios = self.ratios()
        payload = {**self.meta, "phases": self.rows, "ratios": ratios}
        md = (f"### {self.meta['device']['card']}, {self.meta['device']['date']}: synthetic Qwen3-MoE "
              f"({self.meta['params_b']:.2f} B parameters, {self.meta['tokens']} calibration tokens, "
              f"batches of {self.meta['batch_size']})\n\n"
              + table(self.rows, [("phase", "phase"), ("seconds", "s"), ("peak_gib", "peak GiB"),
                                  ("export_gb", "export GB"), ("export_gbps", "export GB/s"), ("note", "note")])
              + "\n" + table([{"ratio": k, "value": v} for k, v in ratios.items()], [("ratio", "ratio"), ("value", "value")]))
        write_results(self.out, "end-to-end", payload, md)
        self.markdown = md

    def ratios(self) -> dict:
        s = self.seconds
        plain = min(x for x in (s("plain forward"), s("plain forward (grouped_mm experts)")) if x is not None) \
            if s("plain forward") is not None else None
        out: dict = {}
        ours_cal = s("quantship calibrate (warm)") or s("quantship calibrate (first run)")
        if plain and ours_cal:
            out["quantship calibration (warm) / plain forward"] = ours_cal / plain
        totals = {run: (s(f"quantship calibrate ({run})") or 0) + (s(f"quantship export ({run})") or 0)
                  for run in ("first run", "warm")}
        for tag in ("routed", "ratio 1.0"):
            mo_cal, mo_exp = s(f"modelopt calibrate ({tag})"), s(f"modelopt export ({tag})")
            if mo_cal and ours_cal:
                out[f"modelopt calibration ({tag}) / quantship calibration (warm)"] = mo_cal / ours_cal
            for run, total in totals.items():
                if mo_cal and mo_exp and total:
                    out[f"modelopt calibration+export ({tag}) / quantship calibration+export ({run})"] = \
                        (mo_cal + mo_exp) / total
            if mo_cal and plain:
                out[f"modelopt calibration ({tag}) / plain forward"] = mo_cal / plain
        return out


def dir_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9


def write_floor(ph: Phases, export: Path, work: Path) -> None:
    """The disk's part of the export: the exported shards' tensors (already in memory) written
    again by the exporter's own file writer."""
    from safetensors.torch import load_file

    from quantship.export.safetensors_raw import write_file

    shards = {f: load_file(f) for f in sorted(export.glob("*.safetensors"))}
    out = work / "floor"
    out.mkdir(exist_ok=True)
    ph.run("write floor: the export's tensors written again",
           lambda: [write_file(t, out / f.name, {"format": "pt"}) for f, t in shards.items()])
    ph.rows[-1]["export_gb"] = dir_gb(out)
    ph.rows[-1]["export_gbps"] = dir_gb(out) / ph.rows[-1]["seconds"]
    ph.save()
    shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    ap.add_argument("--tiny", action="store_true", help="a toy model (checks the script on any machine)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "quantship-e2e")
    ap.add_argument("--skip-modelopt", action="store_true")
    args = ap.parse_args(argv)
    cfg = TINY if args.tiny else FULL
    if args.tiny:
        args.sequences, args.seq_len = 4, 32
    dev = args.device
    info = device_info() if dev.startswith("cuda") else {"card": "cpu", "date": time.strftime("%Y-%m-%d")}
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg["vocab_size"], (args.sequences, args.seq_len), generator=g)
    batches = [ids[i : i + args.batch_size].to(dev) for i in range(0, args.sequences, args.batch_size)]
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    model = build_model(cfg, dev)
    n_params = sum(p.numel() for p in model.parameters())
    meta = {"device": info, "params_b": n_params / 1e9, "tokens": ids.numel(), "batch_size": args.batch_size,
            "config": cfg, "experts_implementation": getattr(model.config, "_experts_implementation", None),
            "quantship_kernels": quantship.formats.kernels.use_kernels(next(model.parameters()))}
    ph = Phases(dev, args.out, meta)
    print(f"{n_params / 1e9:.2f} B parameters, {ids.numel()} tokens in {len(batches)} batches, experts "
          f"implementation {meta['experts_implementation']}", flush=True)

    def forward_all(m):
        with torch.no_grad():
            for b in batches:
                m(input_ids=b, use_cache=False)

    forward_all(model)  # warm-up (kernel selection, allocator)
    ph.run("plain forward", lambda: forward_all(model), repeat=3)
    if meta["experts_implementation"] != "grouped_mm" and dev.startswith("cuda"):
        previous = model.config._experts_implementation
        model.set_experts_implementation("grouped_mm")
        forward_all(model)
        ph.run("plain forward (grouped_mm experts)", lambda: forward_all(model))
        model.set_experts_implementation(previous)

    calib = [{"input_ids": b} for b in batches]

    def ours():
        return quantship.quantize(model, "nvfp4", calib, kv_cache="none", moe_min_tokens=32, progress=False)

    qm = ph.run("quantship calibrate (first run)", ours, note="includes Triton compilation")
    qm = ph.run("quantship calibrate (warm)", ours, repeat=3)
    fallback = sum(int(c.fallback.sum()) for c in qm.plan.coverage.values())
    ph.rows[-1]["note"] = f"{fallback} experts under 32 routed tokens took the all-token fallback"
    target = args.work / "quantship"
    for phase, note in (("quantship export (first run)", "includes Triton compilation"), ("quantship export (warm)", "")):
        ph.run(phase, lambda: qm.export(target, overwrite=True, progress=False), note=note)
        gb = dir_gb(target)
        ph.rows[-1].update(export_gb=gb, export_gbps=gb / ph.rows[-1]["seconds"])
        ph.save()
    write_floor(ph, target, args.work)
    shutil.rmtree(target, ignore_errors=True)
    qm = model = None
    gc.collect()

    if not args.skip_modelopt:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.export as mte
            import modelopt.torch.quantization as mtq
        for tag, ratio in (("routed", None), ("ratio 1.0", 1.0)):
            model = build_model(cfg, dev)
            qcfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
            if ratio is not None:
                qcfg["algorithm"] = {"method": "max", "moe_calib_experts_ratio": ratio}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ph.run(f"modelopt calibrate ({tag})", lambda model=model, qcfg=qcfg: mtq.quantize(model, qcfg, forward_all))
                target = args.work / f"modelopt-{tag.replace(' ', '')}"
                ph.run(f"modelopt export ({tag})", lambda model=model, target=target: mte.export_hf_checkpoint(
                    model, export_dir=target))
            gb = dir_gb(target)
            ph.rows[-1].update(export_gb=gb, export_gbps=gb / ph.rows[-1]["seconds"])
            ph.save()
            shutil.rmtree(target, ignore_errors=True)
            model = None
            gc.collect()
    print(ph.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
