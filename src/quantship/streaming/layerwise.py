"""Calibrate and export a model bigger than the GPU one decoder layer at a time (`--streaming`).

For each decoder layer in order: load only its tensors from the source shards, run every
calibration batch through it (the same `Calibrator` as the in-memory path, so MoE blocks get
the same full expert coverage), plan its scales (`scales.build_plan` on the layer's part of the
structure), quantize and append its tensors to the output shards, free it, and keep its outputs
as the next layer's inputs. Embeddings, final norm and lm_head form the section before the
layers. Each weight byte is read once and written once.

Each layer sees exactly the tensors the full forward would give it — the unquantized previous
layer's outputs and the arguments the model's own forward makes (`skeleton.capture_layer_calls`)
— so statistics, scales and the files written equal the in-memory path's, byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from tqdm.auto import tqdm

from quantship import __version__, report
from quantship.algorithms.gptq import GPTQConfig
from quantship.algorithms.gptq_report import TargetResult, gptq_report
from quantship.algorithms.sequential import gptq_decoder_layer
from quantship.calibration.observers import CalibrationStats, Calibrator, ExpertCoverage
from quantship.errors import QuantshipError
from quantship.export import compressed_tensors
from quantship.export.sections import OUTSIDE, SectionShardWriter, section_of, section_tensors
from quantship.export.shards import check_target
from quantship.formats.handlers import FORMAT_HANDLERS
from quantship.model.discover import ModelStructure, discover
from quantship.pipeline import DEFAULT_MOE_MIN_TOKENS, QuantizedModel
from quantship.recipes import KVCacheFormat, Recipe, get_kv_cache_format, get_recipe
from quantship.scales import QuantPlan, QuantTarget, build_plan, excluded_modules
from quantship.source import check_finite, check_finite_tensors
from quantship.sources.extras import find_extras
from quantship.sources.mtp import MTPQuantizer
from quantship.streaming.distributed import Ranks
from quantship.streaming.journal import WorkDir, batches_digest, digest, listing, publish
from quantship.streaming.skeleton import build_skeleton, capture_layer_calls, free
from quantship.streaming.source import LayerSource

KILL_ENV = "QUANTSHIP_TEST_KILL_AFTER_LAYER"  # tests: SIGKILL once layer N is journaled, or "publish"d


def reads_ahead(device: torch.device) -> bool:
    """Read the next layer's stored bytes during this one: on the GPU only, where the parameters
    do not share host memory with them (tests force it on the CPU)."""
    return device.type == "cuda"


def layer_structure(structure: ModelStructure, layer: str) -> ModelStructure:
    """The part of `structure` under one decoder layer: what its calibration and plan cover."""
    def under(name: str) -> bool:
        return name == layer or name.startswith(layer + ".")

    return ModelStructure(
        model_type=structure.model_type,
        decoder_layers=[(n, m) for n, m in structure.decoder_layers if n == layer],
        linears=[t for t in structure.linears if under(t.name)],
        moe_blocks=[b for b in structure.moe_blocks if under(b.name)],
        attention_modules=[(n, m) for n, m in structure.attention_modules if under(n)],
    )


def _check_inside_layers(structure: ModelStructure, recipe: Recipe, kv_format: KVCacheFormat,
                         excluded: dict[str, str], layers: set[str]) -> None:
    """Streaming calibrates decoder layers only; refuse a recipe that quantizes anything else."""
    def quantized(name: str, role: str) -> bool:
        return recipe.quantizes(role) and name not in excluded and not any(name.startswith(e + ".") for e in excluded)

    outside = [t.name for t in structure.linears if section_of(t.name, layers) == OUTSIDE and quantized(t.name, t.role)]
    outside += [b.name for b in structure.moe_blocks if section_of(b.name, layers) == OUTSIDE]
    if kv_format.quant_algo:
        outside += [n for n, _ in structure.attention_modules if section_of(n, layers) == OUTSIDE]
    if outside:
        raise QuantshipError(
            f"{outside[0]} lies outside the decoder layers, which --streaming calibrates one at a time; "
            f"keep it in high precision with --exclude '{outside[0]}' or use the in-memory path (--no-streaming)"
        )


class LayerwiseRun:
    """One streaming run: the skeleton, the source, the work folder and the shard writer."""

    def __init__(self, model_dir: Path, recipe: Recipe, kv_format: KVCacheFormat, batches: list[dict],
                 target: Path, *, exclude: list[str], moe_min_tokens: int, trust_remote_code: bool,
                 device: torch.device, export_format: str, overwrite: bool, max_shard_bytes: int,
                 progress: bool, dtype: torch.dtype, activation_budget: int | None, quantize_mtp: bool = False,
                 gptq_config: GPTQConfig | None = None):
        self.ranks = Ranks.current()
        self.gptq_config = gptq_config  # --algorithm gptq: each layer's weights chosen by GPTQ (_gptq_layer)
        if gptq_config is not None and self.ranks.world > 1:
            raise QuantshipError("--algorithm gptq runs on one process (its Hessians are not reduced across ranks); "
                                 "launch without torchrun, or use --algorithm max")
        self.hidden_q: list[torch.Tensor] | None = None  # GPTQ: outputs of the GPTQ-quantized layers so far
        self.model_dir, self.recipe, self.kv_format, self.batches = model_dir, recipe, kv_format, batches
        self.target, self.device, self.export_format, self.overwrite = target, device, export_format, overwrite
        self.moe_min_tokens, self.progress = moe_min_tokens, progress and self.ranks.is_main
        self.activation_budget = activation_budget
        self.source = LayerSource(model_dir)
        self.model = build_skeleton(model_dir, trust_remote_code, dtype, dequantized_source=self.source.quantized)
        self.structure = discover(self.model)
        self.excluded = excluded_modules(self.structure, recipe, exclude)
        self.layer_names = [n for n, _ in self.structure.decoder_layers]
        self.layer_set = set(self.layer_names)
        _check_inside_layers(self.structure, recipe, kv_format, self.excluded, self.layer_set)
        self.source.prepare(self.model, self.layer_names, dtype)
        self.handler = FORMAT_HANDLERS[recipe.weight_format]
        self.extra = find_extras(model_dir, self.model)  # tensors the model class ignores (MTP layers)
        self.mtp = MTPQuantizer(model_dir, self.model, recipe, kv_format, exclude, moe_min_tokens, device) \
            if quantize_mtp else None  # quantized after the layers from the last one's outputs (mtp_section)
        if self.mtp is not None:
            self.extra = self.mtp.without_mtp(self.extra)
        self.hf_config = self._final_model([], {}).hf_quant_config(
            [*self.extra.exclude_modules, *(self.mtp.exclude_modules() if self.mtp else [])])
        self.quantization_config, _ = compressed_tensors.from_modelopt((), self.hf_config, export_format)
        self.work = WorkDir(target, self.ranks)
        fingerprint = digest({
            "quantship": __version__, "model": str(model_dir.resolve()), "shards": self.source.fingerprint(),
            "recipe": recipe.name, "kv": kv_format.name, "exclude": sorted(exclude), "min_tokens": moe_min_tokens,
            "format": export_format, "max_shard_bytes": max_shard_bytes, "dtype": str(dtype),
            "calibration": batches_digest(batches), **({"quantize_mtp": True} if quantize_mtp else {}),
            **({"gptq": asdict(gptq_config)} if gptq_config is not None else {}),
        })
        self.state, self.resumed = self.work.open(fingerprint)
        # Killed after publishing, before the work folder went: the target is this command's export.
        self.complete = bool(self.ranks.broadcast(self.resumed and self.ranks.is_main
                                                  and self.work.holds_published(self.state)))
        if not self.complete and self.ranks.is_main and target.exists() and not overwrite:
            self.work.remove()  # a published journal of another command: its export stays, as it is
            raise QuantshipError(f"export path {target} already exists; choose another path or pass --overwrite")
        self.writer = SectionShardWriter(self.work.staging, max_shard_bytes, metadata={"producer": "quantship"})
        self.mine = self.ranks.mine(len(batches))
        # Seconds per phase and extra bytes written, for bench/scale.py and the curious.
        self.timings: dict[str, float] = {"load": 0.0, "calibrate": 0.0, "quantize_write": 0.0, "journal": 0.0,
                                          "activation_bytes": 0, "pending_bytes": 0}
        self._saves: list[Future] = []
        self._pool = ThreadPoolExecutor(max_workers=1)  # activation files written while the GPU works
        self._reader = ThreadPoolExecutor(max_workers=1)  # the next layer's raw bytes (GPU runs)
        self._next: Future | None = None

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        cuda = self.device.type == "cuda"
        peak_before = torch.cuda.max_memory_allocated(self.device) if cuda else 0
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
                if peak > peak_before:  # which phase set the run's GPU peak (bench/scale.py)
                    self.timings[f"peak_gpu_bytes_{name}"] = peak
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------ sections
    def _section_items(self, section: str, plan: QuantPlan, state: dict[str, torch.Tensor]) -> list:
        items = section_tensors(self.model, plan, section, state, self.layer_set)
        return list(compressed_tensors.from_modelopt(items, self.hf_config, self.export_format)[1])

    def _write_section(self, index: int, section: str, plan: QuantPlan, state: dict[str, torch.Tensor]) -> None:
        """Append one section to the shards (rank 0); keep what stays pending on disk too."""
        if self.ranks.is_main:
            self._add(index, self._section_items(section, plan, state))

    def _add(self, index: int, items: list) -> None:
        self.writer.add_section(items)
        pending = self.writer.pending
        self.state.pending = [e for e in self.state.pending if e["names"][0] in pending]
        names = [n for n, _ in items]
        if names and names[0] in pending:
            if index == 0:  # the section outside the layers is read again on resume, not stored twice
                self.state.pending.append({"file": None, "names": names})
            else:
                self.state.pending.append(self.work.save_pending(index, {n: pending[n] for n in names}))
                self.timings["pending_bytes"] += sum(pending[n].numel() * pending[n].element_size() for n in names)
        self.state.writer = self.writer.state()

    def _commit(self) -> None:
        """Journal the finished section once every rank's activation files are on disk."""
        for f in self._saves:
            f.result()
        self._saves.clear()
        self.ranks.barrier()
        self.work.save(self.state)
        self.ranks.barrier()
        self.work.drop_activations(self.state.next_layer)
        self.work.drop_pending(self.state.pending)

    def outside(self) -> tuple[list[torch.Tensor], list]:
        """Load and write the section outside the layers; capture the layers' call arguments."""
        self.source.load_section(self.model, OUTSIDE)
        self.model.tie_weights()
        for name, _ in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if section_of(name, self.layer_set) == OUTSIDE:  # rotary buffers too
                set_module_tensor_to_device(self.model, name, self.device)
        self.model.tie_weights()  # moving replaced the tied Parameter
        state = {n: t for n, t in self.model.state_dict().items() if section_of(n, self.layer_set) == OUTSIDE}
        check_finite_tensors(state.items())
        plan = QuantPlan(self.recipe, self.kv_format, self.handler, [], self.excluded, {}, {})
        if self.resumed and self.ranks.is_main:
            self.writer.restore(self.state.writer, self.work.load_pending(
                self.state.pending, lambda: dict(self._section_items(OUTSIDE, plan, state))))
        if not self.state.outside_done:
            self._write_section(0, OUTSIDE, plan, state)
            self.state.outside_done = True
            self._commit()
        layers = [m for _, m in self.structure.decoder_layers]
        first_hidden, calls = capture_layer_calls(self.model, layers, [self.batches[j] for j in self.mine], self.device)
        for name in state:
            set_module_tensor_to_device(self.model, name, "meta")
        return first_hidden, calls

    def _placement(self, hidden: list[torch.Tensor]) -> torch.device:
        size = sum(h.numel() * h.element_size() for h in hidden)
        budget = self.activation_budget
        if budget is None:
            budget = torch.cuda.get_device_properties(self.device).total_memory // 4 if self.device.type == "cuda" else 1 << 62
        return self.device if size <= budget else torch.device("cpu")

    def layer(self, k: int, hidden: list[torch.Tensor], calls: list) -> None:
        """Calibrate, plan, quantize and write decoder layer k; hidden[i] becomes its output."""
        name, layer = self.structure.decoder_layers[k]
        with self._phase("load"):
            # On the GPU, layer k+1's stored bytes (still FP8/INT4) are read while layer k computes
            # and writes; each tensor is dequantized when placed. On the CPU the parameters share
            # host memory with a read-ahead, so tensors are read when placed: peak ~ one layer.
            raw = self._next.result() if self._next is not None else None
            ahead = reads_ahead(self.device) and k + 1 < len(self.layer_names)
            self._next = self._reader.submit(self.source.read_raw, self.layer_names[k + 1]) if ahead else None
            self.source.load_section(self.model, name, self.device, self.source.section(name, raw))
            del raw
            layer.to(self.device)  # non-persistent buffers
            check_finite(layer, name)
        part = layer_structure(self.structure, name)
        calibrator = Calibrator(self.model, part, self.recipe, self.kv_format, self.moe_min_tokens, set(self.excluded))
        keep = self._placement(hidden)
        last = k + 1 == len(self.layer_names)
        with self._phase("calibrate"), torch.no_grad(), calibrator.attached() as stats:
            for i, j in enumerate(self.mine):
                out = calls[k][i](layer, hidden[i].to(self.device))
                hidden[i] = out.to(keep)
                if not last or self.mtp is not None:
                    self._saves.append(self._pool.submit(self.work.save_activation, k + 1, j, out))
                    self.timings["activation_bytes"] += out.numel() * out.element_size()
        with self._phase("quantize_write"):
            stats = self.ranks.reduce_stats(stats)
            plan = build_plan(part, self.recipe, self.kv_format, stats, self.excluded)
            for block, cov in stats.coverage.items():
                self.state.coverage[block] = {"tokens": [int(x) for x in cov.tokens.tolist()],
                                              "min_tokens": cov.min_tokens}
            self.state.targets += [[t.key, t.role, t.fused_experts, list(t.weight.shape)] for t in plan.targets]
            if self.gptq_config is None:
                self._write_section(k + 1, name, plan, {f"{name}.{n}": t for n, t in layer.state_dict().items()})
        if self.gptq_config is not None:  # GPTQ picks the weights between the plan and the write
            with self._phase("gptq"):
                self._gptq_layer(k, name, layer, part, plan, calls, keep, save=not last or self.mtp is not None)
            with self._phase("quantize_write"):
                self._write_section(k + 1, name, plan, {f"{name}.{n}": t for n, t in layer.state_dict().items()})
        self.state.next_layer = k + 1
        with self._phase("journal"):
            self._commit()
        del plan, stats
        free(layer)
        if os.environ.get(KILL_ENV) == str(k):
            os.kill(os.getpid(), signal.SIGKILL)

    def _gptq_layer(self, k: int, name: str, layer: nn.Module, part: ModelStructure, plan: QuantPlan, calls: list,
                    keep: torch.device, save: bool) -> None:
        """GPTQ of layer k on the GPTQ-quantized stream (algorithms.sequential, as in memory): its
        chosen tensors go into the plan's targets, its outputs become the next layer's stream."""
        def run(module: nn.Module, x: torch.Tensor, b: int) -> torch.Tensor:
            return calls[k][b](module, x.to(self.device))

        done = gptq_decoder_layer(layer, self.hidden_q, run, plan.targets, part, plan.handler, self.gptq_config)
        results = self.state.gptq.setdefault("targets", {})
        for t in plan.targets:
            r = done.targets[t.key]
            if r.rows is not None:
                t.scales.update(r.rows)
            results[t.key] = {"tokens": r.tokens, "gptq": r.gptq, "min_tokens": r.min_tokens, "error_ratio": r.error_ratio}
        self.state.gptq.setdefault("seconds", {})[name] = done.seconds
        self.hidden_q = [o.to(keep) for o in done.outputs]
        if save:
            for o, j in zip(self.hidden_q, self.mine, strict=True):
                self._saves.append(self._pool.submit(self.work.save_activation, k + 1, j, o, "q"))
                self.timings["activation_bytes"] += o.numel() * o.element_size()

    def resume_hidden(self, stream: str = "b") -> list[torch.Tensor]:
        k = self.state.next_layer
        loaded = [self.work.load_activation(k, j, "cpu", stream) for j in self.mine]
        return [h.to(self._placement(loaded)) for h in loaded]

    # ------------------------------------------------------------------ the end
    def _final_model(self, targets: list, coverage: dict, gptq: dict | None = None) -> QuantizedModel:
        """A QuantizedModel standing for the whole export, for configs and reports: targets
        carry their shapes only (meta tensors), coverage and token counts from the journal."""
        covs = {b: ExpertCoverage(b, torch.tensor(c["tokens"], dtype=torch.float32), c["min_tokens"])
                for b, c in coverage.items()}
        zero = torch.zeros(())
        quant_targets = [QuantTarget(key, torch.empty(shape, device="meta"), role, fused, zero, zero)
                         for key, role, fused, shape in targets]
        plan = QuantPlan(self.recipe, self.kv_format, FORMAT_HANDLERS[self.recipe.weight_format], quant_targets,
                         self.excluded, {}, covs)
        if gptq is not None and self.gptq_config is not None:  # the journal's GPTQ results -> gptq.json, report.md
            results = {key: TargetResult(r["tokens"], r["gptq"], r["min_tokens"], error_ratio=r["error_ratio"])
                       for key, r in gptq.get("targets", {}).items()}
            plan.algorithm_report = gptq_report(results, self.gptq_config, [], gptq.get("seconds", {}))
        tokens = sum(int(b["input_ids"].numel()) for b in self.batches)
        return QuantizedModel(self.model, self.structure, plan, CalibrationStats(coverage=covs, tokens_seen=tokens))

    def extras(self) -> None:
        """Append the source tensors outside the model class, as the in-memory export does."""
        n_layers = len(self.layer_names)
        for i, names in enumerate(self.extra.section_names()):
            if i < self.state.extras_done:
                continue
            if self.ranks.is_main:
                items = [(n, self.extra.source.dequantized(n, self.extra.dtype)) for n in names]
                items = list(compressed_tensors.from_modelopt(items, self.hf_config, self.export_format)[1])
                self._add(n_layers + 1 + i, items)
            self.state.extras_done = i + 1
            self._commit()

    @torch.no_grad()
    def mtp_section(self, hidden: list[torch.Tensor]) -> None:
        """The MTP layer (sources.mtp), calibrated on the final norm of the last layer's outputs, written last."""
        if self.mtp is None or self.state.mtp:
            return
        norm = self.mtp.final_norm()
        for h, j in zip(hidden, self.mine, strict=True):
            self.mtp.add(norm(h.to(self.device)), self.batches[j]["input_ids"], self.batches[j].get("attention_mask"))
        self.mtp.calibrate(reduce=self.ranks.reduce_stats, progress=self.progress)
        if self.ranks.is_main:
            items = compressed_tensors.from_modelopt(self.mtp.section(), self.hf_config, self.export_format)[1]
            self._add(len(self.layer_names) + 1 + self.extra.num_sections, list(items))
        self.state.mtp = self.mtp.info
        self.mtp.free()
        self._commit()

    def finish(self, tokenizer=None) -> None:
        self._pool.shutdown()
        self._reader.shutdown()
        if self.ranks.is_main:
            self._restore_partial_names()
            self.writer.close()
            final = self._final_model(self.state.targets, self.state.coverage, self.state.gptq)
            final._write_configs(self.work.staging, self.hf_config, self.model_dir, tokenizer, self.quantization_config)
            report.write_reports(final, self.work.staging)
            self.extra.write_report(self.work.staging)
            if self.mtp is not None:
                self.mtp.write_report(self.work.staging, self.state.mtp)
            self.state.published = listing(self.work.staging)  # how the next run knows it is done
            self.work.save(self.state)
            publish(self.work.staging, self.target, self.overwrite)
            if os.environ.get(KILL_ENV) == "publish":
                os.kill(os.getpid(), signal.SIGKILL)
            self.work.remove()
        self._close_sources()

    def _close_sources(self) -> None:
        """Close the source readers (extras, MTP, shards) and wait for every rank."""
        self.extra.close()
        if self.mtp is not None:
            self.mtp.close()
        self.source.close()
        self.ranks.barrier()

    def close_complete(self) -> None:
        """The target already holds this command's finished export: remove the work folder only."""
        self._pool.shutdown()
        self._reader.shutdown()
        self.work.remove()
        self._close_sources()
        if self.progress:
            print(f"{self.target} already holds this command's finished export (an earlier run stopped "
                  "after publishing it); removed its work folder")

    def _restore_partial_names(self) -> None:
        """A run killed inside `close()` left some shards under final names: name them back."""
        shards = self.state.writer["shards"]
        n = len(shards)
        for i in range(n):
            partial = self.work.staging / f"shard-{i:05d}.partial"
            final = self.work.staging / ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
            if not partial.exists() and final.exists():
                os.replace(final, partial)


def stream_quantize(model_dir: str | Path, recipe: str | Recipe = "nvfp4",
                    calib_data: Iterable[dict[str, torch.Tensor]] = (), export: str | Path = "out",
                    *, kv_cache: str | None = "none", exclude: Iterable[str] = (),
                    moe_min_tokens: int = DEFAULT_MOE_MIN_TOKENS, trust_remote_code: bool = False,
                    device: str | torch.device | None = None, export_format: str = "modelopt",
                    overwrite: bool = False, max_shard_bytes: int = 5 * 1024**3, progress: bool = True,
                    dtype: torch.dtype = torch.bfloat16, tokenizer=None,
                    activation_budget: int | None = None, timings: dict | None = None,
                    quantize_mtp: bool = False, algorithm: str = "max", gptq_config: GPTQConfig | None = None) -> Path:
    """Quantize the HF model folder `model_dir` layer by layer into `export`; returns `export`.

    Reruns of the same command after a kill continue from the last finished layer. Under
    torch.distributed (torchrun), every rank calls this with the same arguments. `timings`, if
    given, receives seconds per phase (load, calibrate, quantize_write, journal) and extra bytes.
    `quantize_mtp`: quantize the source's MTP layer too (sources.mtp), written after everything else.
    `algorithm="gptq"`: each layer's weights chosen by GPTQ on the outputs of the GPTQ-quantized
    layers before it, its scales calibrated on the unquantized ones — the in-memory path's bytes.
    """
    from quantship.algorithms import check_algorithm

    check_algorithm(algorithm)
    if algorithm == "gptq":
        gptq_config = gptq_config or GPTQConfig()
    elif gptq_config is not None:
        raise QuantshipError("gptq_config is given but algorithm is not 'gptq'")
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    kv_format = get_kv_cache_format(kv_cache)
    if moe_min_tokens < 0:
        raise QuantshipError(f"--moe-min-tokens must be >= 0, got {moe_min_tokens}")
    batches = list(calib_data)
    if not batches:
        raise QuantshipError("calibration data is empty; pass a --dataset with text or raise --calib-size")
    target = Path(export)
    if Ranks.current().is_main:  # an export this command published (its run killed before cleanup) may stay
        check_target(target, overwrite or WorkDir(target, Ranks.current()).holds_published())
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = LayerwiseRun(Path(model_dir), recipe, kv_format, batches, target, exclude=list(exclude),
                       moe_min_tokens=moe_min_tokens, trust_remote_code=trust_remote_code, device=device,
                       export_format=export_format, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                       progress=progress, dtype=dtype, activation_budget=activation_budget, quantize_mtp=quantize_mtp,
                       gptq_config=gptq_config if algorithm == "gptq" else None)
    if run.complete:
        run.close_complete()
        return target
    first_hidden, calls = run.outside()
    start = run.state.next_layer
    n = len(run.layer_names)
    mtp_due = run.mtp is not None and not run.state.mtp  # needs the last layer's outputs
    hidden = first_hidden if start == 0 else run.resume_hidden() if start < n or mtp_due else []
    if run.gptq_config is not None and start < n:
        run.hidden_q = [h.clone() for h in first_hidden] if start == 0 else run.resume_hidden("q")
    del first_hidden
    for k in tqdm(range(start, n), desc="layers", unit="layer", initial=start, total=n, disable=not run.progress):
        run.layer(k, hidden, calls)
    del calls
    run.extras()
    run.mtp_section(hidden)
    del hidden
    run.finish(tokenizer)
    if timings is not None:
        timings.update(run.timings)
    return target
