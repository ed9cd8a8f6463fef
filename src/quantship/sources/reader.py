"""A source checkpoint's tensors under their BF16 checkpoint names, dequantized one tensor at a time.

DeepSeek-V3/R1 and Kimi-K2 ship FP8 block-quantized weights, Kimi-K2-Thinking INT4 (compressed-tensors
`pack-quantized`); quantized exports may be requantized. Rather than writing a BF16 copy to disk first,
`SourceCheckpoint` presents the folder as its BF16 twin: `X.weight` for FP8-block `X.weight` +
`X.weight_scale_inv`, for `X.weight_packed` + `X.weight_scale` (+ `X.weight_shape`, ...), and every other
tensor as stored. Headers are read lazily (safetensors `safe_open`), and a weight is dequantized only
when asked for, stripe by stripe, so the in-memory and the streaming path hold one tensor at a time.

The source format comes from `config.json`'s `quantization_config` (or `hf_quant_config.json`), never
from tensor names alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from quantship.errors import QuantshipError
from quantship.sources import layouts
from quantship.sources.compressed_int4 import unpack_zero_point
from quantship.sources.layouts import SOURCE_RUNTIME_SCALES, Layout

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
PLAIN = "plain"
SUPPORTED = "FP8-block (quant_method fp8 + weight_block_size), compressed-tensors pack-quantized (INT) and " \
            "nvfp4-pack-quantized, Model Optimizer NVFP4/FP8, or unquantized"


READABLE_METHODS = ("fp8", "compressed-tensors", "modelopt")


def quantization_metadata(directory: Path, config: dict) -> dict | None:
    """config.json's `quantization_config`, else Model Optimizer's hf_quant_config.json; None if neither."""
    qc = config.get("quantization_config")
    hf_quant = directory / "hf_quant_config.json"
    if not qc and hf_quant.is_file():
        qc = {"quant_method": "modelopt", **json.loads(hf_quant.read_text()).get("quantization", {})}
    return qc or None


def _source_layouts(directory: Path, config: dict) -> tuple[str, list[Layout], dict]:
    """(format name, the layouts its quantized modules may use, format parameters) from the metadata."""
    qc = quantization_metadata(directory, config)
    if not qc:
        return PLAIN, [], {}
    method = qc.get("quant_method")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2) or qc.get("fmt", "e4m3") != "e4m3":
            raise QuantshipError(f"{directory}: only FP8 e4m3 sources with a 2-D weight_block_size can be read "
                                 f"(got {qc}); dequantize it to BF16 first")
        return "fp8-block", [layouts.fp8_block_layout((int(block[0]), int(block[1])))], {}
    if method == "compressed-tensors":
        return "compressed-tensors", *_compressed_tensors_layouts(directory, qc)
    if method == "modelopt":
        algo = qc.get("quant_algo")
        table = {"NVFP4": layouts.MODELOPT_NVFP4, "FP8": layouts.MODELOPT_FP8}
        if algo not in table:
            raise QuantshipError(f"{directory}: Model Optimizer quant_algo {algo!r} cannot be read as a source; "
                                 f"supported: {', '.join(table)}")
        return f"modelopt-{algo.lower()}", [table[algo]], {}
    raise QuantshipError(f"{directory}: source quantization {method!r} cannot be read; supported: {SUPPORTED}")


def _compressed_tensors_layouts(directory: Path, qc: dict) -> tuple[list[Layout], dict]:
    if qc.get("sparsity_config"):
        raise QuantshipError(f"{directory}: sparse compressed-tensors sources are not supported; densify it first")
    found: list[Layout] = []
    bits: set[int] = set()
    for name, group in (qc.get("config_groups") or {}).items():
        fmt = group.get("format") or qc.get("format")
        weights = group.get("weights") or {}
        if fmt == "pack-quantized" and weights.get("type") == "int":
            found.append(layouts.INT_PACKED)
            bits.add(int(weights["num_bits"]))
            if weights.get("actorder") not in (None, "weight"):
                raise QuantshipError(f"{directory}: config group {name} uses activation ordering "
                                     f"({weights['actorder']}); such sources are not supported")
        elif fmt == "nvfp4-pack-quantized":
            found.append(layouts.NVFP4_CT)
        elif fmt not in ("dense", None):
            raise QuantshipError(f"{directory}: compressed-tensors format {fmt!r} (config group {name}) cannot be "
                                 f"read; supported: pack-quantized (INT), nvfp4-pack-quantized")
    if len(bits) > 1:
        raise QuantshipError(f"{directory}: pack-quantized groups with different bit widths {sorted(bits)}")
    return list(dict.fromkeys(found)), {"num_bits": bits.pop()} if bits else {}


def _tensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise QuantshipError(f"{directory} has no .safetensors files; point to a checkpoint folder")
    return files


class SourceCheckpoint:
    """The BF16-named view of a checkpoint folder. Use as a context manager (or call `close`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        try:
            self.config = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise QuantshipError(f"{self.path}/config.json is missing or not JSON ({e}); point to a model folder") from None
        self.format, self._layouts, self._params = _source_layouts(self.path, self.config)
        self._handles: dict[Path, object] = {}
        self._file_of: dict[str, Path] = {}
        self._stored: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (safetensors dtype, shape)
        for f in _tensor_files(self.path):
            handle = self._handle(f)
            for k in handle.keys():  # noqa: SIM118 - safe_open has no iterator
                sl = handle.get_slice(k)
                self._file_of[k] = f
                self._stored[k] = (sl.get_dtype(), tuple(sl.get_shape()))
        self._modules: dict[str, tuple[Layout, str]] = {}  # dequantized name -> (layout, module prefix)
        self.source_scales: list[str] = []  # stored tensors of the source's own quantization, not carried
        self._classify()
        self._passthrough = set(self._stored) - self._consumed()
        self._names = sorted([*self._modules, *self._passthrough])
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._zero_points: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ classification
    def _classify(self) -> None:
        for stored in sorted(self._stored):
            module, _, leaf = stored.rpartition(".")
            matches = [lay for lay in self._layouts if leaf == lay.marker
                       and all(f"{module}.{r}" in self._stored for r in lay.requires)]
            if len(matches) > 1:
                raise QuantshipError(f"{stored}: ambiguous quantized layout ({', '.join(m.name for m in matches)})")
            if matches:
                self._modules[f"{module}.weight"] = (matches[0], module)
            elif self._layouts and leaf in SOURCE_RUNTIME_SCALES:
                self.source_scales.append(stored)
        scales = set(self.source_scales)
        for stored in self._stored:  # a quantized-looking tensor that no layout explains
            module, _, leaf = stored.rpartition(".")
            dtype = self._stored[stored][0]
            if leaf == "weight_g_idx":
                raise QuantshipError(f"{stored}: activation-ordered (g_idx) sources are not supported")
            if f"{module}.weight" in self._modules or stored in scales:
                continue
            if self._layouts and (leaf in ("weight_packed", "weight_scale_inv")
                                  or (leaf == "weight" and dtype in ("F8_E4M3", "F8_E5M2", "U8", "I32"))):
                raise QuantshipError(f"{stored} ({dtype}) is stored quantized but its module's scales are missing "
                                     f"or of an unsupported scheme ({self.format}); the checkpoint is incomplete")

    def _consumed(self) -> set[str]:
        used = set(self.source_scales)
        for layout, module in self._modules.values():
            used.update(f"{module}.{leaf}" for leaf in layout.leaves if f"{module}.{leaf}" in self._stored)
        return used

    # ------------------------------------------------------------------ queries
    def names(self) -> list[str]:
        """Every tensor name of the BF16 twin (dequantized weights and pass-through tensors), sorted."""
        return list(self._names)

    def is_dequantized(self, name: str) -> bool:
        """True when `name` is rebuilt from a quantized form (else it is read as stored)."""
        return name in self._modules

    def stored_names(self, name: str) -> list[str]:
        """The stored tensors that make up `name` (itself for a pass-through tensor)."""
        if name not in self._modules:
            return [self._check(name)]
        layout, module = self._modules[name]
        return [f"{module}.{leaf}" for leaf in layout.leaves if f"{module}.{leaf}" in self._stored]

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._modules:
            return self._stored[self._check(name)][1]
        if name not in self._shapes:
            layout, module = self._modules[name]
            shapes = {leaf: self._stored[f"{module}.{leaf}"][1] for leaf in layout.leaves
                      if f"{module}.{leaf}" in self._stored}
            self._shapes[name] = tuple(layout.shape(shapes, self._reader(module)))
        return self._shapes[name]

    def dtype(self, name: str, dtype: torch.dtype = torch.bfloat16) -> torch.dtype:
        """The dtype `dequantized(name, dtype)` returns."""
        return dtype if name in self._modules else SAFETENSORS_DTYPES[self._stored[self._check(name)][0]]

    def read_stored(self, name: str) -> dict[str, Tensor]:
        """The stored (still quantized) tensors that make up `name`, read into memory: what
        `dequantized(name, stored=...)` needs, at the source's size (FP8: half of BF16)."""
        return {s: self._handle(self._file_of[s]).get_tensor(s) for s in self.stored_names(name)}

    def dequantized(self, name: str, dtype: torch.dtype = torch.bfloat16,
                    stored: dict[str, Tensor] | None = None) -> Tensor:
        """The tensor `name` of the BF16 twin: a quantized weight rebuilt in `dtype` (by the source
        format's published formula, a stripe of rows at a time), any other tensor as stored.
        `stored`: its stored tensors already read (`read_stored`), else they are read from disk."""
        if name not in self._modules:
            key = self._check(name)
            return stored[key] if stored is not None and key in stored else \
                self._handle(self._file_of[key]).get_tensor(key)
        layout, module = self._modules[name]
        shape = self.shape(name)
        params = {**self._params, "shape": shape, "zero_point": self._zero_point(module, shape, stored)}
        out = torch.empty(shape, dtype=dtype)
        read = self._reader(module, stored)
        try:
            for r0 in range(0, shape[0], layout.stripe_rows):
                r1 = min(r0 + layout.stripe_rows, shape[0])
                out[r0:r1] = layout.dequantize(read, r0, r1, params, dtype)
        except (ValueError, RuntimeError) as e:
            raise QuantshipError(f"cannot dequantize {name} from its {layout.name} tensors "
                                 f"({str(e).splitlines()[0]}); the checkpoint is inconsistent") from None
        return out

    # ------------------------------------------------------------------ internals
    def _check(self, name: str) -> str:
        if name not in self._stored or name not in self._passthrough:
            raise KeyError(f"{name} is not a tensor of {self.path}")
        return name

    def _reader(self, module: str, stored: dict[str, Tensor] | None = None):
        def read(leaf: str, r0: int | None, r1: int | None) -> Tensor:
            key = f"{module}.{leaf}"
            if stored is not None and key in stored:
                return stored[key] if r0 is None else stored[key][r0:r1]
            handle = self._handle(self._file_of[key])
            if r0 is None:
                return handle.get_tensor(key)
            return handle.get_slice(key)[r0:r1]
        return read

    def _zero_point(self, module: str, shape: tuple[int, ...], raw: dict[str, Tensor] | None = None) -> Tensor | None:
        """Asymmetric INT schemes: the unpacked zero points (group/channel strategies pack them along
        dim 0 as int32; the tensor strategy stores one int8), cached for the tensor being read."""
        stored = f"{module}.weight_zero_point"
        if stored not in self._stored or self._modules[f"{module}.weight"][0] is not layouts.INT_PACKED:
            return None
        cached = self._zero_points.get(stored)  # one entry, replaced whole: safe across loader threads
        if cached is None:
            cached = self._reader(module, raw)("weight_zero_point", None, None)
            if cached.dtype == torch.int32:
                cached = unpack_zero_point(cached, self._params["num_bits"], shape[0])
            self._zero_points = {stored: cached}
        return cached

    def _handle(self, f: Path):
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
        return self._handles[f]

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> SourceCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SourceCheckpoint({str(self.path)!r}, format={self.format!r}, quantized={len(self._modules)})"
