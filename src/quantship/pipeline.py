"""The Python API: `quantize(model, recipe, calib_data) -> QuantizedModel; .export(path)`.

discover -> calibrate -> scales -> export, each step a module of its own; this file only
strings them together.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.dynamic_module_utils import custom_object_save

from quantship.calibration.observers import CalibrationStats, Calibrator
from quantship.errors import QuantshipError
from quantship.export import compressed_tensors, modelopt_hf
from quantship.export.sections import SectionShardWriter, model_sections
from quantship.export.shards import atomic_export_dir
from quantship.fake_quant import activation_fake_quant, swapped_weights
from quantship.model.checkpoint_names import checkpoint_slices
from quantship.model.discover import ModelStructure, discover
from quantship.recipes import Recipe, get_kv_cache_format, get_recipe, with_weight_scale_search
from quantship.scales import QuantPlan, build_plan, excluded_modules

if TYPE_CHECKING:
    from quantship.sources.extras import SourceExtras
    from quantship.sources.mtp import MTPQuantizer

DEFAULT_MOE_MIN_TOKENS = 32
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "added_tokens.json",
    "generation_config.json", "tiktoken.model",
)


@dataclass
class QuantizedModel:
    """A calibrated model and its quantization plan; export or evaluate it."""

    model: nn.Module
    structure: ModelStructure
    plan: QuantPlan
    stats: CalibrationStats
    mtp: MTPQuantizer | None = None  # the source's MTP layer, quantized with the model (quantize(mtp_source=...))

    # ------------------------------------------------------------------ tensors
    def quantized_tensors(self, target_key: str) -> dict[str, torch.Tensor]:
        """The in-memory quantized tensors of one target (3-D for fused experts)."""
        t = self.plan.target(target_key)
        return self.plan.handler.quantize(t.weight, t.scales)

    def checkpoint_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the export under its checkpoint name, section by section (outside the
        decoder layers, then each layer: the order the streaming path writes in)."""
        for items in model_sections(self):
            yield from items

    def exclude_modules(self) -> list[str]:
        """Checkpoint names of every module kept in high precision (for the exclude list)."""
        names: set[str] = set()
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for module_name in self.plan.excluded:
            for pname, p in params.items():
                if p.dim() < 2 or not pname.startswith(module_name + "."):
                    continue
                if pname.count(".") - module_name.count(".") != 1:
                    continue
                names.update(sl.module for sl in checkpoint_slices(self.model, pname, p.shape))
        return sorted(names)

    # ------------------------------------------------------------------ export
    def hf_quant_config(self, extra_exclude: Iterable[str] = ()) -> dict:
        r = self.plan.recipe
        return modelopt_hf.hf_quant_config(r.quant_algo, r.group_size, self.plan.kv_format.quant_algo,
                                           sorted({*self.exclude_modules(), *extra_exclude}))

    def export(self, path: str | Path, overwrite: bool = False, source_dir: str | Path | None = None,
               tokenizer=None, max_shard_bytes: int = 5 * 1024**3, progress: bool = True,
               export_format: str = "modelopt", extra_tensors: SourceExtras | None = None) -> Path:
        """Write the checkpoint atomically: Model Optimizer's unified HF layout, or with
        `export_format="compressed-tensors"` the same quantized bytes in compressed-tensors' layout.
        `extra_tensors`: source tensors the model class does not hold (MTP layers), appended in high
        precision and excluded; by default those found in `source_dir` (quantship.sources.extras)."""
        from quantship import report
        from quantship.sources.extras import find_extras

        target = Path(path)
        extra = extra_tensors if extra_tensors is not None else find_extras(source_dir, self.model)
        extra = extra if self.mtp is None else self.mtp.without_mtp(extra)
        hf_config = self.hf_quant_config([*extra.exclude_modules, *(self.mtp.exclude_modules() if self.mtp else [])])
        quantization_config, _ = compressed_tensors.from_modelopt((), hf_config, export_format)
        with atomic_export_dir(target, overwrite) as tmp:
            writer = SectionShardWriter(tmp, max_shard_bytes, metadata={"producer": "quantship"})
            for items in tqdm(itertools.chain(model_sections(self), extra.sections(), self.mtp.sections() if self.mtp else ()), desc="export", unit="layer",
                              disable=not progress,
                              total=len(self.structure.decoder_layers) + 1 + extra.num_sections + (self.mtp is not None)):
                writer.add_section(compressed_tensors.from_modelopt(items, hf_config, export_format)[1])
            writer.close()
            self._write_configs(tmp, hf_config, source_dir, tokenizer, quantization_config)
            report.write_reports(self, tmp)
            extra.write_report(tmp)
            if self.mtp is not None:
                self.mtp.write_report(tmp)
        extra.close()
        return target

    def _write_configs(self, directory: Path, hf_config: dict, source_dir, tokenizer,
                       quantization_config: dict | None = None) -> None:
        quantization_config = quantization_config or modelopt_hf.config_json_quantization(hf_config)
        if quantization_config["quant_method"] == "modelopt":  # compressed-tensors has config.json only
            (directory / "hf_quant_config.json").write_text(json.dumps(hf_config, indent=4))
        self.model.config.save_pretrained(directory)
        config = json.loads((directory / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        if source_dir is not None:
            for name in (*TOKENIZER_FILES, *_remote_code_files(Path(source_dir))):
                src = Path(source_dir) / name
                if src.is_file():
                    shutil.copy2(src, directory / name)
        else:
            if getattr(self.model, "_auto_class", None) is not None:
                # Remote code (trust_remote_code): what save_pretrained does, so the export loads.
                custom_object_save(self.model, directory)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
        gen = getattr(self.model, "generation_config", None)
        if gen is not None and not (directory / "generation_config.json").exists():
            with contextlib.suppress(Exception):
                gen.save_pretrained(directory)

    # ------------------------------------------------------------------ evaluation
    def input_scales(self) -> dict[str, torch.Tensor]:
        return {t.key: t.scales["input_scale"] for t in self.plan.targets}

    @contextlib.contextmanager
    def fake_quantized(self) -> Iterator[nn.Module]:
        """The model computing as the exported checkpoint will (weights and activations)."""
        params = dict(self.model.named_parameters())
        handler = self.plan.handler
        swaps = {}
        for t in self.plan.targets:
            pname = t.key if t.fused_experts else f"{t.key}.weight"
            swaps[pname] = (params[pname], handler.dequantize(self.quantized_tensors(t.key), t.weight.dtype))
        with swapped_weights(swaps), activation_fake_quant(self.structure, handler, self.input_scales()):
            yield self.model


def _remote_code_files(source_dir: Path) -> list[str]:
    """The python files that `auto_map` in the source's config.json and tokenizer_config.json
    points to (Kimi-K2: configuration_deepseek.py, modeling_deepseek.py, tokenization_kimi.py).
    Without them the export cannot be loaded with trust_remote_code."""
    files: set[str] = set()
    for config_name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((source_dir / config_name).read_text()).get("auto_map") or {}
        except (OSError, ValueError):
            continue
        for ref in auto_map.values():
            for r in ref if isinstance(ref, list | tuple) else [ref]:
                if isinstance(r, str) and "--" not in r:  # "repo--module.Class" lives in another repo
                    files.add(r.rsplit(".", 1)[0] + ".py")
    return sorted(files)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_calibration(model: nn.Module, calibrator: Calibrator, batches: Iterable[dict[str, torch.Tensor]],
                    progress: bool = True) -> CalibrationStats:
    device = _model_device(model)
    batches = list(batches)
    if not batches:
        raise QuantshipError("calibration data is empty; pass a --dataset with text or raise --calib-size")
    with torch.no_grad(), calibrator.attached() as stats:
        for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            model(**inputs, use_cache=False)
            stats.tokens_seen += int(inputs["input_ids"].numel())
    return stats


def quantize(model: nn.Module, recipe: str | Recipe = "nvfp4",
             calib_data: Iterable[dict[str, torch.Tensor]] = (), kv_cache: str | None = "none",
             exclude: Iterable[str] = (), moe_min_tokens: int = DEFAULT_MOE_MIN_TOKENS,
             progress: bool = True, algorithm: str = "max", gptq_config=None,
             weight_scale_search: str = "max", mtp_source: str | Path | None = None) -> QuantizedModel:
    """Calibrate `model` on `calib_data` (batches of input_ids) and plan every scale; with
    `algorithm="gptq"` the weights are then chosen by GPTQ layer by layer (`algorithms/`).
    AWQ / SmoothQuant recipes first smooth the model in place (`algorithms/smoothing.py`);
    `weight_scale_search="mse"` searches block scales (`algorithms/mse_scale_search.py`).
    `mtp_source`: the model's folder, to quantize its MTP layer too (`sources/mtp.py`; max calibration)."""
    from quantship.algorithms import check_algorithm
    from quantship.algorithms.smoothing import smooth

    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    recipe = with_weight_scale_search(recipe, weight_scale_search)
    kv_format = get_kv_cache_format(kv_cache)
    check_algorithm(algorithm)
    if moe_min_tokens < 0:
        raise QuantshipError(f"--moe-min-tokens must be >= 0, got {moe_min_tokens}")
    calib_data = list(calib_data)
    model.eval()
    structure = discover(model)
    excluded = excluded_modules(structure, recipe, list(exclude))
    smoothing = smooth(model, structure, recipe, set(excluded), calib_data, progress)
    calibrator = Calibrator(model, structure, recipe, kv_format, moe_min_tokens, set(excluded))
    mtp = None
    if mtp_source is not None:
        from quantship.sources.mtp import MTPQuantizer

        mtp = MTPQuantizer(mtp_source, model, recipe, kv_format, list(exclude), moe_min_tokens, _model_device(model))
    with mtp.collecting(model) if mtp else contextlib.nullcontext():
        stats = run_calibration(model, calibrator, calib_data, progress)
    if mtp is not None:
        mtp.calibrate(progress=progress)
    plan = build_plan(structure, recipe, kv_format, stats, excluded)
    if smoothing is not None:
        smoothing.attach_to_plan(plan)
    if algorithm == "gptq":
        from quantship.algorithms.sequential import apply_gptq

        apply_gptq(model, structure, plan, calib_data, gptq_config, progress)
    return QuantizedModel(model, structure, plan, stats, mtp)
