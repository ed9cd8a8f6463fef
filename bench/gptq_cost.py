"""What GPTQ of a decoder layer costs on the GPU, in forward passes of that layer (issue 10).

For each model shape (built from a transformers config with seeded random weights, bf16, on the
device; random calibration tokens): quantship's round-to-nearest NVFP4 plan, then
`apply_gptq` twice on the same plan — the fused Triton column kernel (`gptq_triton.py`) and the
torch column loop — timing per decoder layer the Hessian collection, GPTQ itself (Hessian
inversion, the column work, assembling the checkpoint tensors) and one forward of the layer over
the whole calibration set (median of 5, plain forward, no hooks): the unit the issue prices GPTQ
in. Both paths' layer-output error ratios against round-to-nearest are reported side by side
(they may differ only by float rounding order). Layer 0 carries Triton's compilation: the
figures are medians over the other layers.

    python bench/gptq_cost.py --out $OUT              # on a GPU: every shape in SHAPES
    python bench/gptq_cost.py --tiny --device cpu     # checks the script (torch loop only)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # bench/kernels.py shadows `kernels`

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig  # noqa: E402

from quantship import quantize  # noqa: E402
from quantship.algorithms import gptq as gptq_mod  # noqa: E402
from quantship.algorithms import sequential  # noqa: E402
from quantship.algorithms.gptq import GPTQConfig  # noqa: E402
from quantship.algorithms.layer_inputs import capture_layer_inputs, run_layer  # noqa: E402

_spec = importlib.util.spec_from_file_location("quantship_bench_timing", HERE / "timing.py")
timing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timing)

SHAPES = {
    # name: (config class, config, calibration windows of 512 tokens)
    "smollm2": (LlamaConfig, dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                  num_key_value_heads=3, head_dim=64, vocab_size=49152, num_hidden_layers=4,
                                  tie_word_embeddings=True), 20),
    "llama8b": (LlamaConfig, dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                  num_key_value_heads=8, head_dim=128, vocab_size=32000, num_hidden_layers=3), 20),
    "llama8b-128w": (LlamaConfig, dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                       num_key_value_heads=8, head_dim=128, vocab_size=32000, num_hidden_layers=3), 128),
    "qwen3moe": (Qwen3MoeConfig, dict(hidden_size=2048, num_experts=128, num_experts_per_tok=8,
                                      moe_intermediate_size=768, intermediate_size=6144, num_attention_heads=32,
                                      num_key_value_heads=4, head_dim=128, vocab_size=32000, num_hidden_layers=3,
                                      norm_topk_prob=True), 64),
}
TINY = {"tiny": (LlamaConfig, dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=16, vocab_size=256, num_hidden_layers=3), 4)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Stopwatch:
    """Synchronized seconds spent inside wrapped functions, per label, reset per layer."""

    def __init__(self, device: str):
        self.device, self.seconds, self.active = device, {}, set()

    def wrap(self, label: str, fn):
        def timed(*args, **kwargs):
            if label in self.active:  # a recursive call (one matrix per call): counted by the outer one
                return fn(*args, **kwargs)
            self.active.add(label)
            sync(self.device)
            t = time.perf_counter()
            try:
                with torch.profiler.record_function(label):
                    return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t
                self.active.discard(label)
        return timed


@contextlib.contextmanager
def instrumented(watch: Stopwatch, variant: dict | None):
    """Time the Hessians, their inversion, the column work and the assembly of the checkpoint
    tensors; `variant` None = the torch loop, else the kernel with these VARIANT settings."""
    patched = [(gptq_mod, "_inverse_hessian_factor", "invert"), (gptq_mod, "_column_loop", "columns"),
               (sequential, "_matrices", "hessians"), (sequential, "_assemble", "assemble")]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patched]
    for mod, name, label in patched:
        setattr(mod, name, watch.wrap(label, getattr(mod, name)))
    saved.append((gptq_mod, "use_kernels", gptq_mod.use_kernels))
    if variant is None:
        gptq_mod.use_kernels = lambda *t: False
    else:
        from quantship.algorithms import gptq_triton

        saved.append((gptq_triton, "gptq_columns", gptq_triton.gptq_columns))
        gptq_triton.gptq_columns = watch.wrap("columns", gptq_triton.gptq_columns)
        saved_variant = dict(gptq_triton.VARIANT)
        gptq_triton.VARIANT.update({k: v for k, v in variant.items() if k != "invert"})
        saved_inverse = dict(gptq_mod.INVERSE)
        gptq_mod.INVERSE.update(variant.get("invert", {}))
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        if variant is not None:
            gptq_triton.VARIANT.clear()
            gptq_triton.VARIANT.update(saved_variant)
            gptq_mod.INVERSE.clear()
            gptq_mod.INVERSE.update(saved_inverse)


# Kernel settings measured against each other (the first is the shipped default).
KERNEL_VARIANTS = {
    "kernel": {},
    "kernel tf32x3": {"precision": "tf32x3"},
    "kernel chol-inv-chol": {"invert": {"method": "chol_inv_chol"}},
    "kernel solve-inverse": {"invert": {"leaf": 1 << 30}},  # L⁻¹ by one triangular solve, no halves
}
# (cols, matrices) of the Hessian batches the shapes above invert per layer.
INVERT_CASES = [(576, 3), (1536, 1), (768, 128), (2048, 128), (4096, 3), (14336, 1)]


SWEEP_SHAPES = {"smollm2 gate_up": (1, 3072, 576), "smollm2 down": (1, 576, 1536), "llama8b down": (1, 4096, 14336),
                "llama8b qkv": (1, 6144, 4096), "qwen3moe experts gate_up": (36, 1536, 2048)}
SWEEP = [dict(block_rows=br, num_warps=nw, tile_cols=bn) for br in (16, 32, 64) for nw in (2, 4, 8) for bn in (64, 128)]


def kernel_sweep(device: str) -> list[dict]:
    """Milliseconds of the column kernel alone per launch shape (random weight and Hessian at
    the shapes GPTQ meets), and the share of values equal to the default setting's."""
    from quantship.algorithms import gptq_triton
    from quantship.formats import nvfp4

    default = dict(gptq_triton.VARIANT)
    rows_out = []
    for name, (b, r, c) in SWEEP_SHAPES.items():
        g = torch.Generator(device=device).manual_seed(r + c)
        w = torch.randn(b, r, c, device=device, generator=g) * 0.02
        x = torch.randn(b, 2 * c, c, device=device, generator=g)
        hinv = gptq_mod._inverse_hessian_factor(x.transpose(1, 2) @ x / (2 * c), 0.01)
        s2 = nvfp4.global_scale_from_amax(w.abs().amax(dim=(1, 2)))
        steps = (nvfp4.block_scales(w, s2).float() * s2[:, None, None]).repeat_interleave(16, dim=-1)
        ref = gptq_triton.gptq_columns(w, hinv, steps, "e2m1", 32)
        for setting in SWEEP:
            gptq_triton.VARIANT.update(setting)
            try:
                ms = timing.time_ms(lambda w=w, hinv=hinv, steps=steps: gptq_triton.gptq_columns(w, hinv, steps, "e2m1", 32),
                                    rep_ms=50,
                                    min_reps=2, max_reps=5)
                same = float((gptq_triton.gptq_columns(w, hinv, steps, "e2m1", 32) == ref).float().mean())
            except Exception as e:  # a setting the compiler rejects (registers, shared memory)
                ms, same = None, f"{type(e).__name__}: {str(e)[:120]}"
            rows_out.append({"shape": name, "dims": [b, r, c], **setting, "ms": ms, "same_as_default": same})
            print(f"sweep {name} {setting}: {ms} ms, same {same}", flush=True)
            gptq_triton.VARIANT.clear()
            gptq_triton.VARIANT.update(default)
    return rows_out


def invert_bench(device: str) -> list[dict]:
    """Milliseconds of each way to get H⁻¹'s upper Cholesky factor, and its largest difference
    from the float64 chol_inv_chol factor (relative to that factor's largest entry)."""
    rows = []
    for cols, batch in INVERT_CASES:
        g = torch.Generator(device=device).manual_seed(cols)
        x = torch.randn(batch, 2 * cols, cols, device=device, generator=g)
        h = x.transpose(1, 2) @ x / (2 * cols)
        gptq_mod.INVERSE.update(dtype=torch.float64, method="chol_inv_chol", loop_from=1 << 30)
        ref = gptq_mod._inverse_hessian_factor(h, 0.01).double()
        for dtype in (torch.float64, torch.float32):
            for method in ("chol_inv_chol", "reversed"):
                for loop in (False, True):
                    if loop and batch == 1:
                        continue
                    gptq_mod.INVERSE.update(dtype=dtype, method=method, loop_from=0 if loop else 1 << 30)
                    ms = timing.time_ms(lambda h=h: gptq_mod._inverse_hessian_factor(h, 0.01), rep_ms=100, min_reps=2,
                                        max_reps=10)
                    got = gptq_mod._inverse_hessian_factor(h, 0.01).double()
                    err = float((got - ref).abs().max() / ref.abs().max())
                    rows.append({"cols": cols, "matrices": batch, "dtype": str(dtype).removeprefix("torch."),
                                 "method": method, "loop": loop, "ms": ms, "max_rel_diff": err})
                    print(f"invert {cols}x{batch} {dtype} {method} loop={loop}: {ms:.2f} ms, diff {err:.1e}", flush=True)
    gptq_mod.INVERSE.update(dtype=torch.float64, method="chol_inv_chol", loop_from=1 << 30)
    return rows


def layer_forward_seconds(model, structure, batches, device: str) -> list[float]:
    """Each decoder layer's plain forward over all calibration batches (median of 5)."""
    hidden, calls = capture_layer_inputs(model, structure, batches)
    out = []
    with torch.no_grad():
        for (_, layer), layer_calls in zip(structure.decoder_layers, calls, strict=True):
            times = []
            for _ in range(6):
                sync(device)
                t = time.perf_counter()
                nxt = [run_layer(layer, x, layer_calls, b) for b, x in enumerate(hidden)]
                sync(device)
                times.append(time.perf_counter() - t)
            out.append(statistics.median(times[1:]))
            hidden = nxt
    return out


def run_shape(name: str, cls, cfg: dict, windows: int, args) -> dict:
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cls(**cfg), dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (windows, args.seq_len), generator=g)
    batches = [{"input_ids": ids[i : i + args.batch_size].to(args.device),
                "attention_mask": torch.ones_like(ids[i : i + args.batch_size]).to(args.device)}
               for i in range(0, windows, args.batch_size)]
    qm = quantize(model, args.recipe, batches, progress=False)
    saved = [dict(t.scales) for t in qm.plan.targets]
    forward = layer_forward_seconds(model, qm.structure, batches, args.device)
    row: dict = {"shape": name, "config": cfg, "calibration": f"{windows} x {args.seq_len} tokens",
                 "layer_forward_seconds": forward, "paths": {}}
    paths = {k: KERNEL_VARIANTS[k] for k in args.kernel_variants}
    if not args.no_loop:
        paths["loop"] = None
    if not args.device.startswith("cuda"):
        paths = {"loop": None}
    for path, variant in paths.items():
        for t, s in zip(qm.plan.targets, saved, strict=True):
            t.scales = dict(s)
        watch = Stopwatch(args.device)
        per_layer = []
        original = sequential.gptq_decoder_layer

        def layer_timed(*a, watch=watch, original=original, per_layer=per_layer, **k):
            watch.seconds = {}
            res = original(*a, **k)
            per_layer.append({**res.seconds, **watch.seconds})
            return res

        sequential.gptq_decoder_layer = layer_timed
        profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                       torch.profiler.ProfilerActivity.CUDA])
                    if args.profile and path == "kernel" else contextlib.nullcontext())
        try:
            with instrumented(watch, variant), profiler:
                report = sequential.apply_gptq(model, qm.structure, qm.plan, batches, GPTQConfig(), progress=False)
        finally:
            sequential.gptq_decoder_layer = original
        if args.profile and path == "kernel":
            table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            table += "\n" + profiler.key_averages().table(sort_by="self_device_time_total", row_limit=25)
            (args.out / f"profile-{name}.txt").write_text(table)
        ratios = {k: v["error_ratio_vs_rtn"] for k, v in report["targets"].items() if v["error_ratio_vs_rtn"]}
        steady = per_layer[1:] or per_layer
        med = {k: statistics.median(x.get(k, 0.0) for x in steady) for k in per_layer[0]}
        fwd = statistics.median(forward[1:] or forward)
        row["paths"][path] = {"per_layer": per_layer, "median_steady_layer": med,
                              "gptq_over_forward": med["gptq"] / fwd,
                              "median_error_ratio_vs_rtn": statistics.median(ratios.values()) if ratios else None,
                              "error_ratio_vs_rtn": ratios}
        print(f"{name} {path}: gptq {med['gptq'] * 1e3:.1f} ms/layer (invert {med.get('invert', 0) * 1e3:.1f}, "
              f"columns {med.get('columns', 0) * 1e3:.1f}, assemble {med.get('assemble', 0) * 1e3:.1f}), "
              f"forward {fwd * 1e3:.2f} ms -> "
              f"{med['gptq'] / fwd:.1f} forwards; collect {med['collect'] * 1e3:.1f} ms", flush=True)
    del model, qm
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def markdown(payload: dict) -> str:
    lines = [f"# GPTQ cost per decoder layer ({payload['device'].get('card', 'cpu')}, {payload['device']['date']})", "",
             f"Recipe {payload['recipe']}; medians over layers 1.. (layer 0 compiles).", "",
             "| shape | path | forward ms | GPTQ ms | invert ms | columns ms | assemble ms | GPTQ / forward "
             "| collect ms | median error vs RTN |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in payload["rows"]:
        fwd = statistics.median(row["layer_forward_seconds"][1:] or row["layer_forward_seconds"])
        for path, p in row["paths"].items():
            m = p["median_steady_layer"]
            err = p["median_error_ratio_vs_rtn"]
            lines.append(f"| {row['shape']} ({row['calibration']}) | {path} | {fwd * 1e3:.2f} | {m['gptq'] * 1e3:.1f} "
                         f"| {m.get('invert', 0) * 1e3:.1f} | {m.get('columns', 0) * 1e3:.1f} "
                         f"| {m.get('assemble', 0) * 1e3:.1f} | {p['gptq_over_forward']:.1f} "
                         f"| {m['collect'] * 1e3:.1f} | {err if err is None else round(err, 4)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--recipe", default="nvfp4")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kernel-variants", nargs="+", default=list(KERNEL_VARIANTS), choices=list(KERNEL_VARIANTS))
    ap.add_argument("--invert-bench", action="store_true", help="time the H⁻¹ factor methods first (GPU)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables of the kernel path, per shape")
    ap.add_argument("--kernel-sweep", action="store_true", help="time the column kernel's launch settings first (GPU)")
    ap.add_argument("--no-loop", action="store_true", help="skip the torch column loop")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    shapes = TINY if args.tiny else {k: SHAPES[k] for k in args.shapes}
    if args.tiny:
        args.seq_len = 32
    device = timing.device_info() if args.device.startswith("cuda") else {
        "card": "cpu", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    payload = {"device": device, "recipe": args.recipe, "rows": []}
    if args.invert_bench:
        payload["invert"] = invert_bench(args.device)
    if args.kernel_sweep:
        payload["kernel_sweep"] = kernel_sweep(args.device)
        timing.write_results(args.out, "gptq-cost", payload, markdown(payload))
    for name, (cls, cfg, windows) in shapes.items():
        payload["rows"].append(run_shape(name, cls, cfg, windows, args))
        js, md = timing.write_results(args.out, "gptq-cost", payload, markdown(payload))
    print(md.read_text())


if __name__ == "__main__":
    main()
