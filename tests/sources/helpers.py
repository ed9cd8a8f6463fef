"""Build quantized *source* checkpoints the way they ship, from a BF16 tiny DeepSeek-V3, plus the BF16
twin of each (the same dequantized values written as a plain checkpoint).

- FP8-block: DeepSeek-V3's published `weight_quant` (inference/kernel.py): per 128x128 block
  `s = amax / 448` in float32, `fp8 = e4m3(w / s)`, stored with `weight_scale_inv = s`; config
  `quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}`.
- INT4: compressed-tensors' own `PackedQuantizationCompressor.compress` with scales from its
  `calculate_qparams` (symmetric int4, group 32, bf16 scales: Kimi-K2-Thinking's scheme), config
  from its `QuantizationConfig`.
- The BF16 twin holds the reference dequantization of the stored values (float64 of the published
  formula; compressed-tensors' decompressor), written independently of quantship's reader.
- An MTP layer (DeepSeek-V3's `model.layers.{num_hidden_layers}.*`: a MoE decoder layer plus enorm,
  hnorm, eh_proj and shared_head) is added to the shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from safetensors.torch import load_file, save_file

from tiny_models import model_from_config, tiny_config, write_byte_tokenizer

INT4_ARGS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
             "dynamic": False}


def save_tiny_deepseek(path: Path, seed: int = 0) -> Path:
    """tests/tiny_models.py's DeepSeek-V3 with hidden 96 (INT4 group 32 divides every input dim) and a
    dense MLP of 192 rows (two 128-row FP8 blocks, the second partial), one MTP layer and a byte-level
    tokenizer (so the folder is a complete model folder for the CLI)."""
    config = tiny_config("deepseek_v3")
    config.hidden_size, config.intermediate_size, config.num_nextn_predict_layers = 96, 192, 1
    model = model_from_config(config, seed)
    model.save_pretrained(path)
    write_byte_tokenizer(path)
    _add_mtp_layer(path, config.num_hidden_layers, seed)
    return path


def _add_mtp_layer(path: Path, n_layers: int, seed: int) -> None:
    """DeepSeek-V3's MTP layer: a copy of the last (MoE) decoder layer's tensors with fresh values,
    plus the MTP-only modules; written as a second shard with an index, like the real checkpoint."""
    g = torch.Generator().manual_seed(seed + 1)
    tensors = load_file(str(path / "model.safetensors"))
    last, mtp = f"model.layers.{n_layers - 1}.", f"model.layers.{n_layers}."
    extra = {}
    for name, t in tensors.items():
        if name.startswith(last):
            fresh = (torch.randn(t.shape, generator=g) * 0.08).to(t.dtype) if t.dim() >= 2 else t.clone()
            extra[mtp + name[len(last):]] = fresh
    hidden, vocab = tensors["model.norm.weight"].shape[0], tensors["model.embed_tokens.weight"].shape[0]
    for name, shape in (("embed_tokens.weight", (vocab, hidden)), ("eh_proj.weight", (hidden, 2 * hidden)),
                        ("shared_head.head.weight", (vocab, hidden))):
        extra[mtp + name] = (torch.randn(shape, generator=g) * 0.08).to(torch.bfloat16)
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        extra[mtp + name] = torch.ones(hidden, dtype=torch.bfloat16)
    _write_shards(path, {"model-00001-of-00002.safetensors": tensors, "model-00002-of-00002.safetensors": extra})
    (path / "model.safetensors").unlink()


def _write_shards(path: Path, shards: dict[str, dict[str, torch.Tensor]]) -> None:
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _copy_configs(src: Path, dst: Path, quantization_config: dict | None) -> None:
    dst.mkdir(parents=True)
    for f in src.iterdir():  # configs, tokenizer, remote code
        if f.suffix in (".json", ".py") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def _convert(bf16: Path, dst: Path, twin: Path, quantization_config: dict, quantize_module) -> tuple[Path, Path]:
    """Every shard of `bf16` with each 2-D weight that `quantize_module(name, w)` takes replaced by the
    stored tensors it returns (same shard); the BF16 twin gets the reference dequantization it returns
    instead (what `fp8_cast_bf16.py` / compressed-tensors' decompressor would write)."""
    _copy_configs(bf16, dst, quantization_config)
    _copy_configs(bf16, twin, None)
    index = bf16 / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    shards: dict[str, dict[str, torch.Tensor]] = {f: {} for f in files}
    twin_shards: dict[str, dict[str, torch.Tensor]] = {f: {} for f in shards}
    for file in shards:
        for name, t in load_file(str(bf16 / file)).items():
            module = name.removesuffix(".weight")
            replaced = quantize_module(module, t) if name.endswith(".weight") and t.dim() == 2 else None
            if replaced is None:
                shards[file][name] = twin_shards[file][name] = t
            else:
                stored, dequantized = replaced
                shards[file].update({f"{module}.{leaf}": v for leaf, v in stored.items()})
                twin_shards[file][name] = dequantized
    _write_shards(dst, shards)
    _write_shards(twin, twin_shards)
    return dst, twin


def _fp8_target(module: str) -> bool:
    """DeepSeek-V3 stores attention and MLP/expert projections in FP8; norms, embeddings, lm_head, the
    router and the MTP-only projections stay BF16."""
    return (".self_attn." in module or ".mlp." in module) and not module.endswith("mlp.gate")


def fp8_block_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's `weight_quant` (inference/kernel.py): per block `s = amax / 448`, `e4m3(w / s)`;
    edge blocks are partial (the kernel masks them)."""
    rows, cols = w.shape
    grid = (-(-rows // block), -(-cols // block))
    w = w.float()
    s = torch.empty(grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            s[i, j] = w[i * block:(i + 1) * block, j * block:(j + 1) * block].abs().amax() / 448.0
    full = s.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (w / full).to(torch.float8_e4m3fn), s


def fp8_block_reference(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """DeepSeek-V3's `weight_dequant_kernel` in float64, block by block: the product of an e4m3 value and
    a float32 scale is exact in float64, so rounding it to float32 is the kernel's `x * s`, and the
    store rounds that to bf16."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].double() * float(s[i, j])
    return out.float().to(torch.bfloat16)


def make_fp8_block_source(bf16: Path, dst: Path, twin: Path) -> tuple[Path, Path]:
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}

    def quantize(module: str, w: torch.Tensor):
        if not _fp8_target(module):
            return None
        q, s = fp8_block_quantize(w)
        return {"weight": q, "weight_scale_inv": s}, fp8_block_reference(q, s)

    return _convert(bf16, dst, twin, qc, quantize)


def int4_scheme(args: dict | None = None) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**(args or INT4_ARGS)),
                              format="pack-quantized")


def int4_compress(w: torch.Tensor, args: dict | None = None) -> dict[str, torch.Tensor]:
    """compressed-tensors' own compression of one weight: its qparams, its quantize and int32 packing."""
    scheme = int4_scheme(args)
    q = scheme.weights
    if q.strategy not in ("group", "channel"):
        raise ValueError(f"test compressor covers group and channel strategies, not {q.strategy}")
    # [rows, groups, group_size] (a channel is one group of all columns) -> qparams [rows, groups]
    groups = w.unflatten(-1, (-1, q.group_size)) if q.strategy == "group" else w.unsqueeze(1)
    scale, zp = calculate_qparams(groups.amin(dim=-1), groups.amax(dim=-1), q)
    state = {"weight": w, "weight_scale": scale, "weight_zero_point": zp}
    return BaseCompressor.get_value_from_registry("pack-quantized").compress(state, scheme)


def int4_decompress(tensors: dict[str, torch.Tensor], args: dict | None = None) -> torch.Tensor:
    """compressed-tensors' own decompression of one module (what its loaders compute)."""
    return BaseCompressor.get_value_from_registry("pack-quantized").decompress(tensors, int4_scheme(args))["weight"]


def make_int4_source(bf16: Path, dst: Path, twin: Path) -> tuple[Path, Path]:
    """Kimi-K2-Thinking's layout: routed experts INT4 (pack-quantized, group 32), everything else BF16."""
    qc = QuantizationConfig(config_groups={"group_0": int4_scheme()}, format="pack-quantized",
                            quantization_status="compressed", ignore=["lm_head"]).model_dump(mode="json")
    qc["quant_method"] = "compressed-tensors"

    def quantize(module: str, w: torch.Tensor):
        if ".mlp.experts." not in module:
            return None
        stored = int4_compress(w)
        return stored, int4_decompress(stored).to(torch.bfloat16)

    return _convert(bf16, dst, twin, qc, quantize)
