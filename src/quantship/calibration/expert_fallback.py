"""All-token statistics for fused experts that calibration routes too few tokens to, deferred.

Policy (DESIGN.md): an expert whose routed-token count is below ``min_tokens`` gets its input
amax also from every calibration token pushed through it. Decided batch by batch, that pushes
each batch through every expert still cold after it, and most of that work is thrown away: an
expert that ends above the threshold never uses its fallback statistic. So the block inputs
are kept (up to ``stash_bytes`` in all) and pushed only through the experts still cold when
the stash is flushed: when it is full and when calibration ends. The statistics an export uses
are the same as batch by batch (an expert cold at the end was cold after every batch, and
gets every batch's tokens); the extra compute is bounded by the experts cold at flush time,
and there is no host sync per forward: token counts stay on the device until a flush.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantship.calibration.amax import absmax, max_into
from quantship.model import experts as fused_ops
from quantship.model.discover import FusedExperts

DEFAULT_STASH_BYTES = 1 << 30


@dataclass
class _Block:
    fe: FusedExperts
    tokens: torch.Tensor  # the coverage's CPU counts, updated at each flush
    keys: tuple[str, str]  # routed/fallback amax keys of the gate_up and down inputs
    counts: torch.Tensor | None = None  # running counts on the forward's device
    stash: list[torch.Tensor] = field(default_factory=list)


class FusedExpertsFallback:
    """Counts routed tokens per fused expert and computes deferred all-token statistics."""

    def __init__(self, fallback_amax: dict[str, torch.Tensor], min_tokens: int,
                 stash_bytes: int = DEFAULT_STASH_BYTES):
        self.fallback_amax = fallback_amax
        self.min_tokens = min_tokens
        self.stash_bytes = stash_bytes
        self.blocks: dict[str, _Block] = {}
        self.stashed = 0
        self.pairs = 0  # (token, expert) pairs pushed through on the side, for the record

    def add_block(self, name: str, fe: FusedExperts, tokens: torch.Tensor, keys: tuple[str, str]) -> None:
        self.blocks[name] = _Block(fe, tokens, keys)

    def record(self, name: str, hidden: torch.Tensor, routed: torch.Tensor) -> None:
        """One forward of block ``name``: its input ``[T, H]`` and routed pairs per expert."""
        b = self.blocks[name]
        b.counts = routed.detach().clone() if b.counts is None else b.counts + routed.to(b.counts.device)
        if self.min_tokens > 0:
            b.stash.append(hidden.detach().reshape(-1, hidden.shape[-1]))
            self.stashed += hidden.numel() * hidden.element_size()
            if self.stashed > self.stash_bytes:
                self.flush()

    def flush(self) -> None:
        """Copy counts into the coverage; push the stashed tokens through the cold experts."""
        with torch.no_grad():
            for b in self.blocks.values():
                if b.counts is not None:
                    b.tokens.copy_(b.counts.to(b.tokens.device, b.tokens.dtype))
                if not b.stash:
                    continue
                cold = (b.tokens < self.min_tokens).nonzero().flatten().tolist()
                if cold:
                    x = torch.cat(b.stash)
                    n_exp = b.fe.num_experts
                    gate_up = torch.zeros(n_exp, device=x.device)
                    gate_up[cold] = absmax(x)
                    down = torch.zeros(n_exp, device=x.device)
                    down[cold] = fused_ops.all_token_down_input_amax(b.fe, x, cold)
                    max_into(self.fallback_amax, b.keys[0], gate_up)
                    max_into(self.fallback_amax, b.keys[1], down)
                    self.pairs += len(cold) * x.shape[0]
                b.stash.clear()
        self.stashed = 0
