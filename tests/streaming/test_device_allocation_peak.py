"""What a GPU run of `--streaming` would allocate on the device, measured on the CPU (issue 4).

bench/scale.py found a 57.3 GiB GPU peak for a 23.0 GB DeepSeek-V3 decoder layer, set while
loading it: `torch.isfinite(p).all()` is `(p == p) * (p.abs() != inf)` in ATen, three temporaries
of the gate_up tensor on top of the layer (fixed by `calibration.amax.all_finite`). `w.abs().amax(
dim=(1, 2))` in the plan (fixed by `per_expert_absmax`) and the all-token fallback gathering every
cold expert's weights (fixed in `experts.all_token_down_input_amax`) were of the same kind. The
heap test (tests/sources/test_streaming_memory.py) cannot see these: on the CPU they are a short
spike between samples. This test counts every tensor storage created in the main thread, as it is
created and as it dies, so a temporary shows however short it lives.

How the count stands for the device: a `TorchDispatchMode` is active in the main thread for the
whole `stream_quantize`. Every op's output storage that is new (not an input's, not seen before)
is added to the live bytes when the op returns and removed when the storage dies (`weakref.
finalize` on the storage; torch keeps one Python object per storage). What a GPU run does on the
host is left out, so the count is the device's: the modes are thread-local, so the reader, the
activation writer and the shard writers (host threads in a GPU run) are not seen; source tensors
are read and dequantized on the host (`LazySection.pop`, `row_plan`'s index tensors: not counted)
and copied into their parameter rows on the device (`source._place`'s `torch.empty`: counted); a
quantized chunk leaves the device in `sections._on_cpu`, so its storages leave the count there.
Peaks are taken per phase of each layer (`LayerwiseRun._phase`) and, inside calibrate, for the
fused-expert layout check and the all-token fallback flush; the bounds are the working sets the
code means to have (see `bounds` in the test), so each fix above reverted fails its own step.
The experts' own forward (run only by the layout check) is set to transformers' `batched_mm`,
which gathers one expert's weights per (token, expert) pair: on the CPU transformers picks
`grouped_mm`, which loops over experts and would hide a check on too many pairs.

Not seen (so not bounded here): scratch an op allocates inside its kernel (cuBLAS workspaces,
sort/top-k buffers), the CUDA caching allocator's rounding and fragmentation, a storage grown in
place (`resize_`, `out=`), and Triton kernels' own scratch (on the GPU `absmax` is one Triton
read; the CPU path here, `x.abs().amax()`, allocates more, so the CPU count is the larger). On the
GPU `_place` also holds one source tensor on the device while copying it in (a `.to(device)` that
is an alias on the CPU): one checkpoint tensor, ~1% of a DeepSeek-V3 layer.

Chunk sizes are scaled to this model as a real DeepSeek-V3 layer (~23 GB) sees them, so a chunk
stays a small part of a layer and the chunked loops run several times.

Measured (MoE layer 12.9 MB; peak above the step's start, in layers): load 1.005, calibrate 0.246
(layout check 0.245, fallback 0.026), quantize_write 0.129; whole run 1.25. With a fix reverted:
isfinite 2.62 at load (the H100: 57.3 GiB for a 23.0 GB layer, ~2.6), `w.abs().amax(dim=(1, 2))`
0.65 at quantize_write, the fallback's unbounded gather 0.26, the layout check on 16 tokens 0.98.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import quantship.streaming.layerwise as layerwise
from quantship.calibration import amax
from quantship.calibration.expert_fallback import FusedExpertsFallback
from quantship.export import sections
from quantship.model import experts
from quantship.streaming import source as streaming_source

from .helpers import calib_batches
from tiny_models import VOCAB, model_from_config, tiny_config


class DeviceAllocations(TorchDispatchMode):
    """Live and peak bytes of the storages ops create in this thread (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.run_peak = 0
        self.host = 0  # > 0 inside code a GPU run executes on the host
        self._sizes: dict[int, int] = {}  # data_ptr -> bytes of a live storage being counted
        self._lock = threading.RLock()  # a storage may die in another thread (the activation writer)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.host:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            with self._lock:
                if size == 0 or ptr in inputs or ptr in self._sizes:
                    continue  # a view, an in-place result or a storage already counted
                self._sizes[ptr] = size
                self.live += size
                self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, ptr)
        return out

    def _freed(self, ptr: int) -> None:
        with self._lock:
            self.live -= self._sizes.pop(ptr, 0)

    def to_host(self, tensors: dict[str, torch.Tensor]) -> None:
        """These storages leave the device (a GPU run copies them to the host and frees them)."""
        for ptr in {t.untyped_storage().data_ptr() for t in tensors.values()}:
            self._freed(ptr)

    def on_host(self, fn: Callable) -> Callable:
        """`fn` with its allocations left out: what a GPU run executes on the host."""
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            self.host += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.host -= 1
        return wrapped

    @contextlib.contextmanager
    def scope(self, record: dict) -> Iterator[None]:
        """`record["start"]` / `["peak"]`: live bytes entering, highest live bytes inside (scopes nest)."""
        with self._lock:
            outer, self.peak = self.peak, self.live
            record["start"] = self.live
        try:
            yield
        finally:
            with self._lock:
                record["peak"] = self.peak
                self.peak = max(outer, self.peak)


def _deepseek_source(path: Path) -> Path:
    """DeepSeek-V3 shaped: one dense layer, then two MoE layers of 64 experts (hidden 256, experts of
    128) that are ~95% routed-expert weights, as at the real widths."""
    config = tiny_config("deepseek_v3")
    config.hidden_size, config.intermediate_size, config.moe_intermediate_size = 256, 256, 128
    config.num_hidden_layers = 3
    model_from_config(config, seed=0).save_pretrained(path)
    return path


def _batched_mm(build: Callable) -> Callable:
    def built(*args, **kwargs):
        model = build(*args, **kwargs)
        model.set_experts_implementation("batched_mm")
        return model
    return built


@contextlib.contextmanager
def _measured(monkeypatch) -> Iterator[tuple[DeviceAllocations, list[dict], dict[str, int]]]:
    """The tracker, one record per layer and step (its phases, the layout check and the
    fallback flush inside calibrate), and the BF16 bytes of each section."""
    tracker = DeviceAllocations()
    records: list[dict] = []
    sizes: dict[str, int] = {}
    current = {"layer": ""}
    phase, layer, prepare = layerwise.LayerwiseRun._phase, layerwise.LayerwiseRun.layer, layerwise.LayerSource.prepare
    on_cpu = sections._on_cpu

    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        records.append({"layer": current["layer"], "step": name})
        with tracker.scope(records[-1]):
            yield

    def measured_phase(self, name: str) -> contextlib.AbstractContextManager:
        return _both(phase(self, name), step(name))

    def measured(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with step(name):
                return fn(*args, **kwargs)
        return wrapped

    def measured_layer(self, k, *args):
        current["layer"] = self.layer_names[k]
        return layer(self, k, *args)

    def recording_prepare(self, *args):
        prepare(self, *args)
        sizes.update({s: self.section_bytes(s) for s in self._sections})

    def leaving_device(tensors):
        tracker.to_host(tensors)  # the device chunk is freed once its host copy is made
        return on_cpu(tensors)

    monkeypatch.setattr(layerwise.LayerwiseRun, "_phase", measured_phase)
    monkeypatch.setattr(layerwise.LayerwiseRun, "layer", measured_layer)
    monkeypatch.setattr(layerwise.LayerSource, "prepare", recording_prepare)
    monkeypatch.setattr(experts, "check_layout", measured("layout_check", experts.check_layout))
    monkeypatch.setattr(FusedExpertsFallback, "flush", measured("fallback", FusedExpertsFallback.flush))
    # Read and dequantized on the host; the row plan's index tensors are built on the host too.
    monkeypatch.setattr(streaming_source.LazySection, "pop", tracker.on_host(streaming_source.LazySection.pop))
    monkeypatch.setattr(streaming_source, "row_plan", tracker.on_host(streaming_source.row_plan))
    monkeypatch.setattr(sections, "_on_cpu", leaving_device)
    # The experts' own forward, which only the layout check runs, as transformers' batched_mm:
    # one weight matrix gathered per (token, expert) pair, the most a check on a few pairs costs.
    monkeypatch.setattr(layerwise, "build_skeleton", _batched_mm(layerwise.build_skeleton))
    with tracker:
        yield tracker, records, sizes


@contextlib.contextmanager
def _both(first, second) -> Iterator[None]:
    with first, second:
        yield


def test_device_allocation_peak_per_phase(tmp_path, monkeypatch):
    src = _deepseek_source(tmp_path / "src")
    calib = calib_batches(VOCAB, n=3, batch=1, seq=8)  # few tokens: the fallback's gather is the larger
    # A DeepSeek-V3 layer (23 GB) is ~90x the 256 MiB quantization and per-expert amax chunks,
    # ~180x the 64 Mi-element finiteness chunk and ~45x the 512 Mi-element fallback chunk on a GPU:
    # the same proportions here (a 12.9 MB layer: one expert, 32 Ki and 128 Ki elements).
    finite_elems, fallback_elems = 1 << 15, 1 << 17
    monkeypatch.setattr(sections.target_tensors, "__defaults__", (1,))
    monkeypatch.setattr(amax.per_expert_absmax, "__defaults__", (1,))
    monkeypatch.setattr(amax.all_finite, "__defaults__", (finite_elems,))
    monkeypatch.setattr(experts.all_token_down_input_amax, "__defaults__", (fallback_elems,))
    with _measured(monkeypatch) as (tracker, records, sizes):
        layerwise.stream_quantize(src, "nvfp4", calib, tmp_path / "out", device="cpu", progress=False)

    hidden = sum(b["input_ids"].numel() for b in calib) * 256 * 2  # all batches' hidden states, bf16
    expert = 3 * 128 * 256 * 2  # one expert's gate_up and down, bf16
    chunk = 2 * 128 * 256 * 2  # one expert's gate_up: a quantization and per-expert amax chunk here
    bounds = {  # bytes above the step's start; `hidden` covers a layer's inputs, outputs and temporaries
        "load": lambda one: 1.1 * one + 2 * finite_elems,  # the parameters, one finiteness chunk's |x|
        # <= 16 (token, expert) pairs: batched_mm gathers one expert's weights per pair
        "layout_check": lambda one: 1.1 * 16 * expert + 8 * hidden,
        # the gathered [experts, 2I, H] chunk, the [experts, tokens, 2I] product and its gated half
        "fallback": lambda one: 3 * 2 * fallback_elems + 8 * hidden,
        "calibrate": lambda one: 1.1 * 16 * expert + 8 * hidden,  # the larger of the two above
        # one chunk quantized in plain torch: int64 codes and float32 copies, ~12.5x its bf16 bytes
        "quantize_write": lambda one: 16 * chunk + 2 * hidden,
    }
    moe = [r for r in records if r["layer"] not in ("", "model.layers.0") and r["step"] in bounds]
    one = max(sizes.values())
    assert sorted(r["step"] for r in moe) == sorted(2 * list(bounds))
    assert all(sizes[r["layer"]] == one for r in moe)
    failed = []
    for r in moe:
        above, bound = r["peak"] - r["start"], bounds[r["step"]](one)
        print(f"{r['layer']} {r['step']:>14}: peak {above / one:.3f} layers above its start (bound {bound / one:.3f})")
        if above > bound:
            failed.append(f"{r['layer']} {r['step']}: {above / one:.3f} > {bound / one:.3f} layers")
    print(f"whole run: peak {tracker.peak / one:.3f} layers ({one / 1e6:.2f} MB a layer)")
    assert not failed, failed
    assert tracker.peak <= 1.5 * (one + hidden)  # issue 4's bound on the whole run


def test_tracker_counts_each_new_storage_once_until_it_dies():
    """The counter itself: views, in-place results and host code add nothing; a freed storage leaves."""
    tracker = DeviceAllocations()
    record: dict = {}
    host_ones = tracker.on_host(torch.ones)
    with tracker, tracker.scope(record):
        a = torch.empty(1000)  # 4000 bytes
        view = a.view(10, 100)[2:]
        view.add_(1)
        b = a * 2  # 4000 more
        assert tracker.live == 8000
        del b
        c = host_ones(500)
        assert tracker.live == 4000
        tracker.to_host({"a": view})
        assert tracker.live == 0
    assert record == {"start": 0, "peak": 8000} and c.numel() == 500
