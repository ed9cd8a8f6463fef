"""NVFP4/FP8 kernels against the peers, on one GPU, in one process, on the same tensors.

    python bench/kernels.py --out bench/results        # needs CUDA, Triton, and the peers

Ours (quantship's Triton kernels), Model Optimizer 0.47 (`NVFP4QTensor.quantize`, its Triton
`fp4_fake_quant_block` and `fp4_dequantize`), compressed-tensors 0.20 (`quantize_and_pack_fp4`
given precomputed scales) and torch.compile of the plain torch reference. The device-to-device
copy bandwidth is measured in the same run; each result is reported in ms, in GB/s of the
op's minimal traffic (each input read once, each output written once) and as the fraction of
the copy floor (that traffic at copy bandwidth) it reaches. Outputs are compared with ours
bit for bit where the peer computes the same function.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import sys
import traceback
from pathlib import Path

import torch

# This file's folder must not stay on sys.path: bench/kernels.py would shadow the `kernels`
# package that transformers probes for. The shared helpers are loaded by path instead.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("quantship_bench_timing", HERE / "timing.py")
timing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timing)

copy_bandwidth_gbps, device_info, table, time_ms, write_results = (
    timing.copy_bandwidth_gbps, timing.device_info, timing.table, timing.time_ms, timing.write_results)

from quantship.formats import fp8, nvfp4  # noqa: E402
from quantship.formats.kernels import amax as kamax  # noqa: E402
from quantship.formats.kernels import fp8_triton, nvfp4_triton, require_kernels  # noqa: E402

QUANT_SHAPES = [(4096, 4096), (8192, 28672), (16384, 16384), (256, 4096, 7168)]
ACT_SHAPE = (8192, 7168)
PEER_CHUNK = 16  # experts per call for peers on the 3-D tensor (their temporaries are 5-10x the input)


# ------------------------------------------------------------------ plain torch references


def ref_quantize(w: torch.Tensor):
    """The reference's whole path in plain torch ops: amax, scale_2, block scales, codes, pack."""
    s2 = nvfp4.global_scale_from_amax(w.abs().amax(dim=(-2, -1)).float())[..., None, None]
    scale = nvfp4._block_scales(w, s2)
    return nvfp4.pack_fp4(nvfp4._encode(w, scale, s2)), scale


def ref_fake_nvfp4(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    scale = nvfp4._block_scales(x, s)
    return nvfp4._decode(nvfp4._encode(x, scale, s), scale, s, x.dtype)


def ref_fake_fp8(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    q = (x.float() / s).clamp(-448.0, 448.0).to(x.dtype).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


def ref_dequantize(packed: torch.Tensor, scale: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    return nvfp4._decode(nvfp4.unpack_fp4(packed), scale, s2, torch.bfloat16)


# ------------------------------------------------------------------ bookkeeping


class Results:
    def __init__(self, copy_gbps: float):
        self.copy_gbps = copy_gbps
        self.rows: list[dict] = []

    def fail(self, op: str, shape, impl: str, e: Exception) -> None:
        self.rows.append({"op": op, "shape": "x".join(map(str, shape)), "impl": impl, "error": repr(e)[:300]})
        print(f"{op:22s} {impl:34s} ERROR {e!r:.200}", flush=True)
        torch.cuda.empty_cache()

    def add(self, op: str, shape, impl: str, nbytes: float, fn=None, ms: float | None = None,
            exact=None, note: str = "", **timing) -> float | None:
        """Time ``fn`` (or take ``ms``) and record it; a peer that fails is recorded, not fatal."""
        try:
            if ms is None:
                ms = time_ms(fn, **timing)
        except Exception as e:  # a peer's OOM or missing kernel is a result of the run, kept as such
            self.fail(op, shape, impl, e)
            return None
        gbps = nbytes / ms / 1e6
        row = {"op": op, "shape": "x".join(map(str, shape)), "impl": impl, "ms": ms, "GBps": gbps,
               "frac_copy_floor": gbps / self.copy_gbps, "exact_vs_ours": exact, "note": note}
        self.rows.append(row)
        print(f"{op:22s} {row['shape']:16s} {impl:34s} {ms:9.3f} ms {gbps:8.0f} GB/s "
              f"{row['frac_copy_floor']:6.1%}  exact={exact} {note}", flush=True)
        return ms


def reference(fn, *args):
    """``fn(*args)`` through the torch reference (kernels switched off), on the same GPU."""
    old = os.environ.get("QUANTSHIP_KERNELS")
    os.environ["QUANTSHIP_KERNELS"] = "0"
    try:
        return fn(*args)
    finally:
        if old is None:
            del os.environ["QUANTSHIP_KERNELS"]
        else:
            os.environ["QUANTSHIP_KERNELS"] = old


def peer(res: Results, op: str, shape, impl: str, nbytes: float, fn, want: torch.Tensor | None = None,
         note: str = "") -> None:
    """Run a peer once (checking its output against ours), then time it; a failure is recorded."""
    try:
        exact = same(fn(), want) if want is not None else None
    except Exception as e:  # a peer that cannot run here is a result of the run
        res.fail(op, shape, impl, e)
        return
    res.add(op, shape, impl, nbytes, fn, exact=exact, note=note)


def same(a: torch.Tensor, b: torch.Tensor) -> bool | float:
    """True when bit-identical, else the fraction of identical elements."""
    a, b = a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    if a.shape != b.shape:
        return False
    eq = (a == b).float().mean().item()
    return True if eq == 1.0 else eq


# ------------------------------------------------------------------ cases


def bench_quantize(res: Results, shape: tuple[int, ...], peers: dict, sweep: bool) -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    n = w.numel()
    floor_bytes = n * (2 + 0.5 + 1 / 16)
    ours = nvfp4.quantize_nvfp4(w)  # full path (amax included) through the public dispatch
    s2 = ours.scale_2
    exact = None
    if w.dim() == 2:  # the torch reference on the same GPU (its temporaries are ~10x the input)
        ref = reference(nvfp4.quantize_nvfp4, w)
        exact = same(ref.packed, ours.packed) is True and same(ref.block_scale, ours.block_scale) is True
        ref = None
    res.add("nvfp4 quantize+pack", shape, "ours (scale_2 given, 1 pass)", floor_bytes,
            lambda: nvfp4_triton.quantize(w, s2), exact=exact, note="exact: vs the torch reference")
    res.add("nvfp4 quantize+pack", shape, "ours (amax included, 2 passes)", floor_bytes,
            lambda: nvfp4.quantize_nvfp4(w), note=f"2-pass floor {floor_bytes / (floor_bytes + 2 * n):.0%}")
    if sweep:
        sweep_quantize(res, w, s2, ours, floor_bytes)
    three_d = w.dim() == 3
    chunks = [slice(i, i + PEER_CHUNK) for i in range(0, shape[0], PEER_CHUNK)] if three_d else [slice(None)]
    note = f"chunks of {PEER_CHUNK} experts" if three_d else ""

    mo = peers.get("modelopt")
    if mo is not None:
        def modelopt_run():
            outs = []
            for c in chunks:
                wc = w[c]
                wsf2 = s2[c][:, None, None] if three_d else None  # per-expert global scales
                outs.append(mo.quantize(wc, 16, weights_scaling_factor_2=wsf2))
            return outs

        try:
            # Bytes compared under our scale_2: its own divides amax by 2688 as a multiplication
            # by a rounded reciprocal on the GPU (torch's CUDA division by a number), one ulp off.
            c0 = chunks[0]
            first = mo.quantize(w[c0], 16, weights_scaling_factor_2=s2[c0][:, None, None] if three_d else s2)
            exact = same(first[0]._quantized_data, ours.packed[c0]) is True and \
                same(first[1], ours.block_scale[c0]) is True
            first = None
            modelopt_run()
            res.add("nvfp4 quantize+pack", shape, "Model Optimizer NVFP4QTensor", floor_bytes, modelopt_run,
                    exact=exact, note=note, rep_ms=100, max_reps=5)
        except Exception as e:  # recorded as this peer's result
            res.fail("nvfp4 quantize+pack", shape, "Model Optimizer NVFP4QTensor", e)
    ct = peers.get("compressed_tensors")
    if ct is not None:
        # 2-D only, one global scale per call, int32 offsets: the 3-D tensor goes in expert chunks.
        parts = [(w[c].reshape(-1, shape[-1]), ours.block_scale[c].reshape(-1, shape[-1] // 16),
                  (1.0 / s2.reshape(-1)[c][:1] if three_d else 1.0 / s2.reshape(1)).float()) for c in chunks]

        def ct_run():
            return [ct(x2, sc2, global_scale=gs) for x2, sc2, gs in parts]

        try:
            packed = ct_run()[0]
            exact = same(packed, ours.packed[chunks[0]].reshape(packed.shape))
            packed = None
            res.add("nvfp4 quantize+pack", shape, "compressed-tensors (scales given)", floor_bytes, ct_run,
                    exact=exact, note=note)
        except Exception as e:  # recorded as this peer's result
            res.fail("nvfp4 quantize+pack", shape, "compressed-tensors (scales given)", e)
    compiled = peers.get("compile_quantize")
    if compiled is not None:
        def compiled_run():
            return [compiled(w[c]) for c in chunks]

        try:
            out = compiled_run()
        except Exception as e:  # recorded as this peer's result
            res.fail("nvfp4 quantize+pack", shape, "torch.compile(reference)", e)
            return
        exact = same(out[0][0], ours.packed[chunks[0]])
        out = None
        res.add("nvfp4 quantize+pack", shape, "torch.compile(reference)", floor_bytes, compiled_run,
                exact=exact, note=note, rep_ms=100, max_reps=10)


def sweep_quantize(res: Results, w, s2, ours, floor_bytes: float) -> None:
    """Tile shapes, warps and arithmetic variants of the one-pass kernel (all must be exact)."""
    for tile in [(8, 256), (16, 256), (32, 256), (16, 512), (32, 128), (64, 64)]:
        for warps in (4, 8):
            q = nvfp4_triton.quantize(w, s2, tile=tile, num_warps=warps)
            res.add("sweep quantize", tuple(w.shape), f"tile {tile[0]}x{tile[1]} w{warps}", floor_bytes,
                    lambda tile=tile, warps=warps: nvfp4_triton.quantize(w, s2, tile=tile, num_warps=warps),
                    exact=same(q.packed, ours.packed) is True and same(q.block_scale, ours.block_scale) is True)
    for div in (0, 1):
        for code in (0, 1):
            q = nvfp4_triton.quantize(w, s2, div=div, code=code)
            res.add("sweep quantize", tuple(w.shape), f"variant div={div} code={code}", floor_bytes,
                    lambda div=div, code=code: nvfp4_triton.quantize(w, s2, div=div, code=code),
                    exact=same(q.packed, ours.packed) is True)
    res.add("sweep quantize", tuple(w.shape), "default config, timed again", floor_bytes,
            lambda: nvfp4_triton.quantize(w, s2), note="spread of one config between two timings")
    for tile in [(16, 256), (16, 512), (32, 256)]:
        for per_sm in (2, 4, 8):
            for warps in (4, 8):
                kw = dict(tile=tile, num_warps=warps, persistent=per_sm)
                q = nvfp4_triton.quantize(w, s2, **kw)
                res.add("sweep quantize", tuple(w.shape), f"persistent {per_sm}/SM tile {tile[0]}x{tile[1]} w{warps}",
                        floor_bytes, lambda kw=kw: nvfp4_triton.quantize(w, s2, **kw),
                        exact=same(q.packed, ours.packed) is True and same(q.block_scale, ours.block_scale) is True)


def bench_activations(res: Results, peers: dict) -> None:
    torch.manual_seed(1)
    x = torch.randn(ACT_SHAPE, dtype=torch.bfloat16, device="cuda") * 3
    n = x.numel()
    amax = x.abs().amax().float()
    s = nvfp4.input_scale_from_amax(amax)
    rw = 4.0 * n  # read and write bf16
    want = reference(nvfp4.fake_quantize_nvfp4_activation, x, s)
    for div in (0, 1):
        for code in (0, 1):
            got = nvfp4_triton.fake_quantize_activation(x, s, div=div, code=code)
            res.add("nvfp4 fake-quant act", ACT_SHAPE, f"ours (static scale) div={div} code={code}", rw,
                    lambda div=div, code=code: nvfp4_triton.fake_quantize_activation(x, s, div=div, code=code),
                    exact=same(got, want))
    fq = peers.get("modelopt_fake_fp4")
    if fq is not None:
        peer(res, "nvfp4 fake-quant act", ACT_SHAPE, "Model Optimizer fp4_fake_quant_block", rw,
             lambda: fq(x, amax), want, note="dynamic scales from its global amax")
    cf = peers.get("compile_fake_nvfp4")
    if cf is not None:
        peer(res, "nvfp4 fake-quant act", ACT_SHAPE, "torch.compile(reference)", rw, lambda: cf(x, s), want)

    s8 = amax / 448.0
    want8 = reference(fp8.fake_quantize_fp8, x, s8)
    for div in (0, 1):
        got = fp8_triton.fake_quantize(x, s8, div=div)
        res.add("fp8 fake-quant act", ACT_SHAPE, f"ours div={div}", rw,
                lambda div=div: fp8_triton.fake_quantize(x, s8, div=div), exact=same(got, want8))
    mo8 = peers.get("modelopt_fp8_eager")
    if mo8 is not None:
        peer(res, "fp8 fake-quant act", ACT_SHAPE, "Model Optimizer fp8_eager", rw, lambda: mo8(x, amax),
             note="its CUDA extension needs a build; eager path")
    c8 = peers.get("compile_fake_fp8")
    if c8 is not None:
        peer(res, "fp8 fake-quant act", ACT_SHAPE, "torch.compile(reference)", rw, lambda: c8(x, s8), want8)

    res.add("amax (observer)", ACT_SHAPE, "ours", 2.0 * n, lambda: kamax.tensor_amax(x),
            exact=same(kamax.tensor_amax(x), x.abs().amax().float()))
    res.add("amax (observer)", ACT_SHAPE, "torch x.abs().amax()", 2.0 * n, lambda: x.abs().amax())
    res.add("amax (observer)", ACT_SHAPE, "torch vector_norm(inf)", 2.0 * n,
            lambda: torch.linalg.vector_norm(x, float("inf")))


def bench_dequantize(res: Results, peers: dict) -> None:
    shape = (16384, 16384)
    torch.manual_seed(2)
    w = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    q = nvfp4.quantize_nvfp4(w)
    del w
    n = shape[0] * shape[1]
    nbytes = n * (0.5 + 1 / 16 + 2)
    want = reference(nvfp4.dequantize_nvfp4, q.packed, q.block_scale, q.scale_2)
    res.add("nvfp4 dequantize", shape, "ours", nbytes,
            lambda: nvfp4_triton.dequantize(q.packed, q.block_scale, q.scale_2),
            exact=same(nvfp4_triton.dequantize(q.packed, q.block_scale, q.scale_2), want))
    dq = peers.get("modelopt_dequant")
    if dq is not None:
        peer(res, "nvfp4 dequantize", shape, "Model Optimizer fp4_dequantize", nbytes,
             lambda: dq(q.packed, q.block_scale, q.scale_2, dtype=torch.bfloat16), want)
    cd = peers.get("compile_dequant")
    if cd is not None:
        peer(res, "nvfp4 dequantize", shape, "torch.compile(reference)", nbytes,
             lambda: cd(q.packed, q.block_scale, q.scale_2), want)


def load_peers(skip: set[str]) -> dict:
    peers: dict = {}
    if "modelopt" not in skip:
        from modelopt.torch.kernels.quantization.gemm import fp4_dequantize, fp4_fake_quant_block
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
        from modelopt.torch.quantization.tensor_quant import fp8_eager

        peers.update(modelopt=NVFP4QTensor, modelopt_fake_fp4=fp4_fake_quant_block,
                     modelopt_dequant=fp4_dequantize, modelopt_fp8_eager=fp8_eager)
    if "compressed_tensors" not in skip:
        from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4

        peers["compressed_tensors"] = quantize_and_pack_fp4
    if "compile" not in skip:
        peers.update(compile_quantize=torch.compile(ref_quantize, dynamic=False),
                     compile_fake_nvfp4=torch.compile(ref_fake_nvfp4, dynamic=False),
                     compile_fake_fp8=torch.compile(ref_fake_fp8, dynamic=False),
                     compile_dequant=torch.compile(ref_dequantize, dynamic=False))
    return peers


COLUMNS = [("op", "op"), ("shape", "shape"), ("impl", "implementation"), ("ms", "ms"), ("GBps", "GB/s"),
           ("frac_copy_floor", "of copy floor"), ("exact_vs_ours", "bit-exact vs reference"), ("note", "note")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    ap.add_argument("--skip", nargs="*", default=[], help="peers to leave out: modelopt compressed_tensors compile")
    ap.add_argument("--shapes", nargs="*", default=None, help="e.g. 16384x16384 256x4096x7168")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args(argv)
    require_kernels()
    info = device_info()
    copy = copy_bandwidth_gbps()
    print(f"{info['card']}  torch {info['torch']}  triton {info['triton']}  copy {copy:.0f} GB/s", flush=True)
    res = Results(copy)
    peers = load_peers(set(args.skip))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else QUANT_SHAPES
    cases = [(f"quantize {s}", lambda s=s: bench_quantize(res, s, peers, sweep=not args.no_sweep and s == (16384, 16384)))
             for s in shapes]
    cases += [("activations", lambda: bench_activations(res, peers)), ("dequantize", lambda: bench_dequantize(res, peers))]
    for name, case in cases:
        try:
            case()
        except Exception as e:  # one broken case must not cost the others' numbers
            traceback.print_exc()
            res.fail(name, (), "case", e)
    rows = [r for r in res.rows if "ms" in r]
    md = (f"### {info['card']}, {info['date']} (torch {info['torch']}, triton {info['triton']})\n\n"
          f"Device-to-device copy: {copy:.0f} GB/s (read + write). GB/s below count each input read once and "
          "each output written once; 'of copy floor' is that traffic at copy bandwidth over the measured time.\n\n"
          + table(rows, COLUMNS))
    errors = [r for r in res.rows if "error" in r]
    if errors:
        md += "\nFailed: " + "; ".join(f"{r['impl']} {r['shape']}: {r['error']}" for r in errors) + "\n"
    js, mdp = write_results(args.out, "kernels", {"device": info, "copy_GBps": copy, "rows": res.rows}, md)
    print(md)
    print(f"wrote {js} and {mdp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
