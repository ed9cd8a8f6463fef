"""Observers that record activation amax during calibration forwards.

Calibration records statistics only; turning them into scales is `scales.py`'s job (STYLE 11).
The forward itself is the plain high-precision forward: like Model Optimizer's `max`
algorithm, nothing is fake-quantized while statistics are gathered.

MoE coverage: every routed expert's token count is recorded. Experts whose count is still
below `min_tokens` after a batch also see every token of that batch pushed through them on
the side (the block's output is untouched); since counts only grow, an expert that ends below
the threshold has that all-token statistic over the whole calibration set. For fused experts
that side pass is deferred and limited to the experts still cold (`expert_fallback.py`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from quantship.calibration.amax import absmax, max_into
from quantship.calibration.expert_fallback import DEFAULT_STASH_BYTES, FusedExpertsFallback
from quantship.model import experts as fused_ops
from quantship.model.discover import ModelStructure, MoEBlock
from quantship.recipes import KVCacheFormat, Recipe

_amax = absmax  # one read on CUDA (a Triton kernel), no host sync
_max_into = max_into


@dataclass
class ExpertCoverage:
    """Routed tokens per expert of one MoE block, and which experts needed the fallback."""

    block: str
    tokens: torch.Tensor  # [E] routed (token, expert) pairs over the whole calibration
    min_tokens: int

    @property
    def fallback(self) -> torch.Tensor:
        return self.tokens < self.min_tokens


@dataclass
class CalibrationStats:
    """Raw statistics: amax per quantized input, per KV cache, per-expert coverage."""

    routed_amax: dict[str, torch.Tensor] = field(default_factory=dict)
    fallback_amax: dict[str, torch.Tensor] = field(default_factory=dict)
    kv_amax: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    coverage: dict[str, ExpertCoverage] = field(default_factory=dict)
    tokens_seen: int = 0


class Calibrator:
    """Attaches hooks for one recipe, collects `CalibrationStats` over any number of forwards."""

    def __init__(self, model: nn.Module, structure: ModelStructure, recipe: Recipe,
                 kv_format: KVCacheFormat, min_tokens: int, excluded: set[str],
                 fallback_stash_bytes: int = DEFAULT_STASH_BYTES):
        self.model = model
        self.structure = structure
        self.recipe = recipe
        self.kv_format = kv_format
        self.min_tokens = min_tokens
        self.excluded = excluded
        self.stats = CalibrationStats()
        self.fallback = FusedExpertsFallback(self.stats.fallback_amax, min_tokens, fallback_stash_bytes)
        self._fallback_mode = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._patched: list[nn.Module] = []
        self._layout_checked: set[str] = set()

    # --- plain linears (and per-expert linears of ModuleList experts) -------------------
    def _linear_hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if x.numel() == 0:
                return
            store = self.stats.fallback_amax if self._fallback_mode else self.stats.routed_amax
            _max_into(store, name, _amax(x))

        return hook

    # --- ModuleList experts ---------------------------------------------------------------
    def _attach_expert_list(self, block: MoEBlock) -> None:
        counts = torch.zeros(block.num_experts)
        self.stats.coverage[block.name] = ExpertCoverage(block.name, counts, self.min_tokens)
        block_input: dict[str, torch.Tensor] = {}

        for e, expert in enumerate(block.expert_modules):
            def count(_m: nn.Module, args: tuple, e: int = e) -> None:
                if not self._fallback_mode:
                    counts[e] += args[0].reshape(-1, args[0].shape[-1]).shape[0]

            self._handles.append(expert.register_forward_pre_hook(count))

        def keep_input(_m: nn.Module, args: tuple) -> None:
            block_input["x"] = args[0]

        def push_all_tokens(_m: nn.Module, _args: tuple, _out: object) -> None:
            x = block_input.pop("x")
            x = x.reshape(-1, x.shape[-1])
            low = (counts < self.min_tokens).nonzero().flatten().tolist()
            self._fallback_mode = True
            try:
                for e in low:
                    block.expert_modules[e](x)
            finally:
                self._fallback_mode = False

        self._handles.append(block.module.register_forward_pre_hook(keep_input))
        self._handles.append(block.module.register_forward_hook(push_all_tokens))

    # --- fused 3-D experts ----------------------------------------------------------------
    def _attach_fused(self, block: MoEBlock) -> None:
        fe = block.fused
        assert fe is not None
        fused_ops.check_supported(fe)
        counts = torch.zeros(block.num_experts)
        self.stats.coverage[block.name] = ExpertCoverage(block.name, counts, self.min_tokens)
        gate_up_key = f"{fe.name}.{fe.gate_up_param}"
        down_key = f"{fe.name}.{fe.down_param}"
        self.fallback.add_block(block.name, fe, counts, (gate_up_key, down_key))
        original_forward = fe.module.forward

        def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
            if fe.name not in self._layout_checked:
                fused_ops.check_layout(fe, hidden, top_k_index, top_k_weights, original_forward)
                self._layout_checked.add(fe.name)
            out, st = fused_ops.fused_experts_forward(fe, hidden, top_k_index, top_k_weights)
            _max_into(self.stats.routed_amax, gate_up_key, st.gate_up_input_amax)
            _max_into(self.stats.routed_amax, down_key, st.down_input_amax)
            self.fallback.record(block.name, hidden, st.tokens)
            return out

        fe.module.forward = forward
        self._patched.append(fe.module)

    # --- KV cache: wrap the attention function every HF attention module calls -------------
    @contextlib.contextmanager
    def _kv_observed(self) -> Iterator[None]:
        """Record key/value amax per attention module, after RoPE and norms, as cached.

        Two taps cover the ways attention is computed: transformers' attention interface (every
        built-in model; eager included) and `F.scaled_dot_product_attention` called directly by
        remote code, attributed to the attention module currently running.
        """
        names = {id(m): n for n, m in self.structure.attention_modules}
        impl = self.model.config._attn_implementation or "eager"
        local = ALL_ATTENTION_FUNCTIONS._local_mapping  # an override local to this instance
        had_local, old_local = impl in local, local.get(impl)
        previous = ALL_ATTENTION_FUNCTIONS.get(impl)  # None for "eager": each model has its own
        running: list[str] = []

        def record(name: str, key: torch.Tensor, value: torch.Tensor) -> None:
            entry = self.stats.kv_amax.setdefault(name, {})
            _max_into(entry, "k", _amax(key))
            _max_into(entry, "v", _amax(value))

        def observed(module: nn.Module, query, key, value, *args, **kwargs):
            name = names.get(id(module))
            if name is not None:
                record(name, key, value)
            delegate = previous or sys.modules[type(module).__module__].eager_attention_forward
            return delegate(module, query, key, value, *args, **kwargs)

        plain_sdpa = F.scaled_dot_product_attention

        def sdpa(query, key, value, *args, **kwargs):
            if running:
                record(running[-1], key, value)
            return plain_sdpa(query, key, value, *args, **kwargs)

        def enter(name: str):
            def hook(_m: nn.Module, _args: tuple) -> None:
                running.append(name)

            return hook

        def leave(_m: nn.Module, _args: tuple, _out: object) -> None:
            running.pop()  # a forward hook must return None, or it replaces the output

        for name, module in self.structure.attention_modules:
            self._handles.append(module.register_forward_pre_hook(enter(name)))
            self._handles.append(module.register_forward_hook(leave))
        local[impl] = observed
        F.scaled_dot_product_attention = sdpa
        try:
            yield
        finally:
            F.scaled_dot_product_attention = plain_sdpa
            if had_local:
                local[impl] = old_local
            else:
                del local[impl]

    # --- lifecycle ------------------------------------------------------------------------
    def attach(self) -> None:
        expert_list_linears: set[str] = set()
        for block in self.structure.moe_blocks:
            if not self.recipe.quantizes("expert") or block.experts_name in self.excluded:
                continue
            if block.fused is not None:
                self._attach_fused(block)
            else:
                self._attach_expert_list(block)
                expert_list_linears.add(block.experts_name)
        for target in self.structure.linears:
            if self.recipe.quantizes(target.role) and target.name not in self.excluded:
                self._handles.append(target.module.register_forward_pre_hook(self._linear_hook(target.name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module in self._patched:
            del module.forward  # back to the class's forward
        self._patched.clear()

    @contextlib.contextmanager
    def attached(self) -> Iterator[CalibrationStats]:
        self.attach()
        kv = self._kv_observed() if self.kv_format.quant_algo else contextlib.nullcontext()
        try:
            with kv:
                yield self.stats
            self.fallback.flush()  # deferred all-token statistics, final token counts
        finally:
            self.detach()
