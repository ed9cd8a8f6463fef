"""DeepSeek-V3's multi-token-prediction (MTP) layer quantized with the model (`--quantize-mtp`).

The source ships it as `model.layers.{N}.*` (N = num_hidden_layers): `embed_tokens`, `enorm`, `hnorm`,
`eh_proj`, a full MoE decoder layer, `shared_head.norm`, `shared_head.head`. transformers does not
load it, so by default it is carried in high precision (`sources.extras`). Asked to quantize it, we:

1. build the decoder layer with the model's own class and config (a meta skeleton of the model class
   with N + 1 layers: its layer N *is* `DeepseekV3DecoderLayer(config, layer_idx=N)`, and its names are
   the checkpoint's, so transformers' conversion loads the per-expert tensors into it and reverts them
   on export), loaded through `streaming.source.LayerSource` like any streamed layer;
2. feed it the activations a serving engine feeds it (vLLM `model_executor/models/deepseek_mtp.py`,
   `DeepSeekMultiTokenPredictorLayer.forward`): at position i,
   `x_i = eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i)))`, where `h_i` is what the main model returns
   as its hidden state — vLLM's `DeepseekV2Model.forward` returns it *after* the final norm
   (`hidden_states, _ = self.norm(hidden_states, residual)`) and the proposer passes that on — and
   `embed` is the MTP layer's own `embed_tokens` (vLLM loads it as the MTP model's embedding);
3. calibrate it with the same `Calibrator` (MoE coverage and all-token fallback included), plan its
   scales with `scales.build_plan`, and export it with `export.sections.section_tensors`: the
   original names, one set of `weight`/`weight_scale`/`weight_scale_2`/`input_scale` per expert, as
   vLLM's FusedMoE loader reads them for the main layers (`DeepSeekMTP.load_weights` uses the same
   `make_expert_params_mapping` and stacks `q_a_proj`/`kv_a_proj_with_mqa` into `fused_qkv_a_proj`,
   so those share scales here as in the main layers).

`eh_proj`, `shared_head.head` and `embed_tokens` stay high precision and excluded: vLLM builds
`eh_proj` as a plain `nn.Linear` without a quant config and `shared_head.head` as a `ParallelLMHead`
(an embedding, which Model Optimizer's linear/MoE methods do not quantize), as for the main lm_head.
vLLM zeroes the embedding at position 0 (`inputs_embeds[positions == 0] = 0`), SGLang does not; we
keep the plain definition above.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import initialization as hf_init

from quantship.calibration.observers import CalibrationStats, Calibrator
from quantship.errors import QuantshipError
from quantship.export.sections import section_tensors
from quantship.model.checkpoint_names import checkpoint_slices
from quantship.model.discover import ModelStructure, discover
from quantship.recipes import KVCacheFormat, Recipe
from quantship.scales import QuantPlan, build_plan, excluded_modules
from quantship.sources.extras import SourceExtras, mtp_layers
from quantship.sources.reader import SourceCheckpoint

MTP_FRONT = ("embed_tokens", "enorm", "hnorm", "eh_proj")


class _Stop(Exception):
    """Raised once the MTP layer's call is captured: nothing after it is needed."""


def _decoder(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the decoder that owns the layers and the final norm (`model.model`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    name = next((n for n, m in model.named_modules() if m is decoder), None)
    if decoder is None or name is None or not isinstance(getattr(decoder, "norm", None), nn.Module):
        raise QuantshipError(f"--quantize-mtp needs a DeepSeek-V3-style model (a decoder with a final norm); "
                             f"{type(model).__name__} has none — drop --quantize-mtp")
    return name, decoder


def _skeleton(model: nn.Module, num_layers: int) -> nn.Module:
    """The model class with `num_layers` decoder layers, every parameter on the meta device."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    with init_empty_weights(include_buffers=False), hf_init.no_tie_weights():
        skeleton = type(model)._from_config(config, dtype=dtype)
    return skeleton.eval()


class MTPQuantizer:
    """One MTP layer: its inputs collected batch by batch, then calibrated, planned and exported."""

    def __init__(self, source_dir: str | Path, model: nn.Module, recipe: Recipe, kv_format: KVCacheFormat,
                 exclude: list[str], moe_min_tokens: int, device: torch.device | str):
        from quantship.streaming.layerwise import layer_structure
        from quantship.streaming.source import LayerSource

        self.source = SourceCheckpoint(source_dir)
        found = mtp_layers(self.source.config)
        if len(found) != 1:
            self.source.close()
            raise QuantshipError(f"--quantize-mtp: {source_dir} has {len(found)} MTP layers "
                                 f"(num_nextn_predict_layers); only exactly one (DeepSeek-V3/R1) is supported")
        self.index = found[0]
        self.device = torch.device(device)
        self.recipe, self.kv_format, self.moe_min_tokens = recipe, kv_format, moe_min_tokens
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.decoder_name, decoder = _decoder(model)
        self.norm_cls, self.eps = type(decoder.norm), getattr(decoder.norm, "variance_epsilon", 1e-6)
        self.holder = _skeleton(model, self.index + 1)
        self.structure = discover(self.holder)
        self.name = self.structure.decoder_layers[-1][0]  # "model.layers.N": the checkpoint's own prefix
        self.layer = self.structure.decoder_layers[-1][1]
        self.part: ModelStructure = layer_structure(self.structure, self.name)
        self.excluded = {k: v for k, v in excluded_modules(self.structure, recipe, exclude).items()
                         if k.startswith(self.name + ".")}
        self.layer_source = LayerSource(source_dir)
        self.layer_source.prepare(self.holder, [self.name], self.dtype)
        self.layer_keys = set(self.layer_source._sections.get(self.name, []))
        prefix = self.name + "."
        self.carried = [n for n in self.source.names() if n.startswith(prefix) and n not in self.layer_keys]
        missing = [f"{prefix}{m}.weight" for m in ("enorm", "hnorm", "eh_proj")
                   if f"{prefix}{m}.weight" not in self.carried]
        if missing or not self.layer_keys:
            raise QuantshipError(f"--quantize-mtp: {source_dir} lacks {missing[0] if missing else 'the MTP decoder layer'}"
                                 f" of its MTP layer {self.index}; the checkpoint is incomplete")
        self.inputs: list[tuple[Tensor, Tensor]] = []  # (eh_proj output, attention mask) per batch, on the CPU
        self.plan: QuantPlan | None = None
        self.stats: CalibrationStats | None = None
        self.info: dict = {}
        self._front: dict[str, nn.Module] | None = None

    # ------------------------------------------------------------------ inputs
    def _read(self, leaf: str) -> Tensor:
        return self.source.dequantized(f"{self.name}.{leaf}", self.dtype).to(self.device)

    def front(self) -> dict[str, nn.Module]:
        """enorm, hnorm (the model's norm class), eh_proj and the MTP embedding, loaded on the device."""
        if self._front is None:
            hidden = self.holder.config.hidden_size
            mods: dict[str, nn.Module] = {}
            for leaf in ("enorm", "hnorm"):
                norm = self.norm_cls(hidden, eps=self.eps).to(self.device, self.dtype)
                norm.weight.data = self._read(f"{leaf}.weight")
                mods[leaf] = norm
            eh = self._read("eh_proj.weight")
            mods["eh_proj"] = nn.Linear(eh.shape[1], eh.shape[0], bias=False, device="meta")
            mods["eh_proj"].weight = nn.Parameter(eh, requires_grad=False)
            key = f"{self.name}.embed_tokens.weight"
            if key not in self.carried:  # an MTP layer without its own copy shares the model's
                key = next(n for n in self.source.names() if n.endswith("embed_tokens.weight"))
            mods["embed"] = nn.Embedding.from_pretrained(self.source.dequantized(key, self.dtype).to(self.device))
            self._front = mods
        return self._front

    def final_norm(self) -> nn.Module:
        """The main model's final norm read from the source (streaming: the model's is on meta)."""
        norm = self.norm_cls(self.holder.config.hidden_size, eps=self.eps).to(self.device, self.dtype)
        norm.weight.data = self.source.dequantized(f"{self.decoder_name}.norm.weight", self.dtype).to(self.device)
        return norm

    @torch.no_grad()
    def add(self, h: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> None:
        """One batch: `h` [B, T, H] the main model's final (normed) hidden states, its token ids and mask."""
        if input_ids.shape[1] < 2:
            return
        f = self.front()
        e = f["embed"](input_ids[:, 1:].to(self.device))
        x = f["eh_proj"](torch.cat([f["enorm"](e), f["hnorm"](h[:, :-1].to(self.device))], dim=-1))
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self.inputs.append((x.cpu(), (mask[:, 1:] * mask[:, :-1]).cpu()))

    def collecting(self, model: nn.Module):
        """Hooks that feed `add` during the main model's calibration forwards (in-memory path)."""
        _, decoder = _decoder(model)
        batch: dict[str, Tensor] = {}

        def keep(_m: nn.Module, _args: tuple, kwargs: dict) -> None:
            batch["ids"], batch["mask"] = kwargs.get("input_ids"), kwargs.get("attention_mask")

        def take(_m: nn.Module, _args: tuple, out: Tensor) -> None:
            if batch.get("ids") is not None:
                self.add(out, batch["ids"], batch["mask"])

        return _Hooks([model.register_forward_pre_hook(keep, with_kwargs=True), decoder.norm.register_forward_hook(take)])

    # ------------------------------------------------------------------ calibration
    def _layer_call(self, x: Tensor, mask: Tensor):
        """How the model class calls its layer N on these inputs: its own forward, every layer a catcher."""
        from quantship.streaming.skeleton import LayerCall

        _, decoder = _decoder(self.holder)
        layers = [m for _, m in self.structure.decoder_layers]
        found: list = []

        def catcher(last: bool):
            def catch(*args, **kwargs):
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if last:
                    found.append(LayerCall(args[1:], kwargs, not args))
                    raise _Stop
                return hidden
            return catch

        for i, layer in enumerate(layers):
            layer.forward = catcher(i == len(layers) - 1)
        try:
            decoder(inputs_embeds=x, attention_mask=mask.to(self.device), use_cache=False)
        except _Stop:
            pass
        finally:
            for layer in layers:
                del layer.forward
        return found[0]

    @torch.no_grad()
    def calibrate(self, reduce=None, progress: bool = True) -> None:
        """Load the MTP decoder layer, run every collected batch through it, plan its scales."""
        if not self.inputs and reduce is None:
            raise QuantshipError("--quantize-mtp: no calibration batch reached the MTP layer (sequences need >= 2 tokens)")
        self.layer_source.load_section(self.holder, self.name, self.device)
        self.layer.to(self.device)
        self.holder.get_decoder().rotary_emb.to(self.device)
        calibrator = Calibrator(self.holder, self.part, self.recipe, self.kv_format, self.moe_min_tokens,
                                set(self.excluded))
        with calibrator.attached() as stats:
            for x, mask in tqdm(self.inputs, desc="calibrate MTP", unit="batch", disable=not progress):
                x = x.to(self.device)
                self._layer_call(x, mask)(self.layer, x)
        self.stats = reduce(stats) if reduce is not None else stats
        self.plan = build_plan(self.part, self.recipe, self.kv_format, self.stats, self.excluded)
        self.inputs.clear()
        self.info = self._summary()

    # ------------------------------------------------------------------ export
    def written_names(self) -> set[str]:
        return self.layer_keys | set(self.carried)

    def without_mtp(self, extra: SourceExtras) -> SourceExtras:
        """`extra` less the tensors the quantized MTP section writes."""
        written = self.written_names()
        return replace(extra, names=[n for n in extra.names if n not in written])

    def exclude_modules(self) -> list[str]:
        """Checkpoint modules of the MTP layer kept in high precision: the carried 2-D weights
        (eh_proj, shared_head.head, embed_tokens) and what the recipe excludes (the router)."""
        names = {n.rsplit(".", 1)[0] for n in self.carried if n.endswith(".weight") and len(self.source.shape(n)) >= 2}
        for pname, p in self.holder.named_parameters():
            module = pname.rsplit(".", 1)[0]
            if p.dim() >= 2 and module in self.excluded:
                names.update(sl.module for sl in checkpoint_slices(self.holder, pname, p.shape))
        return sorted(names)

    def section(self) -> list[tuple[str, Tensor]]:
        """The MTP layer's export tensors: the quantized decoder layer, then the carried front and head."""
        assert self.plan is not None, "calibrate() first"
        state = {f"{self.name}.{n}": t for n, t in self.layer.state_dict().items()}
        items = section_tensors(self.holder, self.plan, self.name, state, {self.name})
        return items + [(n, self.source.dequantized(n, self.dtype)) for n in self.carried]

    def sections(self) -> Iterator[list[tuple[str, Tensor]]]:
        yield self.section()

    def _summary(self) -> dict:
        cov = {b: {"tokens": [int(t) for t in c.tokens.tolist()], "min_tokens": c.min_tokens,
                   "fallback_experts": int(c.fallback.sum())} for b, c in (self.stats.coverage if self.stats else {}).items()}
        return {
            "mtp_layer": self.name, "quantized_targets": [t.key for t in self.plan.targets] if self.plan else [],
            "kept_high_precision": self.exclude_modules(), "coverage": cov,
            "input_definition": "x_i = eh_proj(cat(enorm(mtp_embed(t_{i+1})), hnorm(h_i))), h_i = the main model's "
                                "final hidden state after its final norm (what vLLM passes to DeepSeekMTP)",
        }

    def write_report(self, directory: Path, info: dict | None = None) -> None:
        info = info or self.info
        (directory / "mtp_quantization.json").write_text(json.dumps(info, indent=1))
        report = directory / "report.md"
        lines = ["", "## MTP layer quantized (--quantize-mtp)", "",
                 f"`{info['mtp_layer']}`: {len(info['quantized_targets'])} quantized targets, calibrated on "
                 "x_i = eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i))); eh_proj, shared_head and embed_tokens kept "
                 "in high precision. See `mtp_quantization.json`.", ""]
        report.write_text((report.read_text() if report.is_file() else "# quantship report\n") + "\n".join(lines))

    def free(self) -> None:
        from quantship.streaming.skeleton import free

        free(self.layer)
        self.plan, self._front = None, None

    def close(self) -> None:
        self.layer_source.close()
        self.source.close()


class _Hooks:
    """Removable hooks as a context manager."""

    def __init__(self, handles: list):
        self.handles = handles

    def __enter__(self) -> _Hooks:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
