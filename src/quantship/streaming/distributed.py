"""Calibration batches split across torch.distributed ranks, statistics reduced across them.

Launched with `torchrun --nproc-per-node N quantship quantize ... --streaming`; without a
process group the same code runs as one rank. Every rank loads each layer and runs its own
share of the batches (batch j goes to rank j % world); the layer's statistics are then reduced
— amax with MAX, token counts with SUM — so every rank plans the same scales, and rank 0
writes. The statistics equal a one-process run's: amax and counts are order-free reductions,
and the all-token fallback amax of an expert that ends under the token threshold was under it
after every batch on every rank, so it is the max over all batches either way (experts above
the threshold never use theirs; `scales._resolved_input_amax` masks them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from quantship.calibration.observers import CalibrationStats

ABSENT = -1.0  # amax is >= 0; a rank without a statistic contributes this, and MAX keeps real ones


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collective tensors live (NCCL: the GPU)

    @classmethod
    def current(cls) -> Ranks:
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, n: int) -> list[int]:
        """The global batch indices this rank runs."""
        return list(range(self.rank, n, self.world))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj: object) -> object:
        """Rank 0's value of `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_int(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item())

    def reduce_stats(self, stats: CalibrationStats) -> CalibrationStats:
        """All-reduce one layer's statistics in place: amax MAX, expert token counts SUM."""
        if self.world == 1:
            return stats
        amax = _amax_entries(stats)
        names = _union({k: list(v.shape) for k, v in amax.items()}, self)
        if names:
            flat = torch.cat([amax[k].float().reshape(-1).to(self.device) if k in amax
                              else torch.full((_numel(shape),), ABSENT, device=self.device) for k, shape in names])
            dist.all_reduce(flat, op=dist.ReduceOp.MAX)
            _set_amax(stats, names, flat)
        blocks = _union({b: list(c.tokens.shape) for b, c in stats.coverage.items()}, self)
        if blocks:
            counts = torch.cat([stats.coverage[b].tokens.float().to(self.device) for b, _ in blocks])
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            offset = 0
            for b, shape in blocks:
                n = _numel(shape)
                stats.coverage[b].tokens.copy_(counts[offset : offset + n].cpu())
                offset += n
        return stats


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _union(local: dict, ranks: Ranks) -> list[tuple]:
    """Sorted (key, shape) pairs over every rank, so all ranks reduce the same flat layout."""
    gathered: list[dict] = [{} for _ in range(ranks.world)]
    dist.all_gather_object(gathered, local)
    merged: dict = {}
    for d in gathered:
        merged.update(d)
    return sorted((k, v) for k, v in merged.items())


def _amax_entries(stats: CalibrationStats) -> dict[tuple, torch.Tensor]:
    out: dict[tuple, torch.Tensor] = {}
    for k, v in stats.routed_amax.items():
        out[("routed", k, "")] = v
    for k, v in stats.fallback_amax.items():
        out[("fallback", k, "")] = v
    for attn, kv in stats.kv_amax.items():
        for leaf, v in kv.items():
            out[("kv", attn, leaf)] = v
    return out


def _set_amax(stats: CalibrationStats, names: list[tuple], flat: torch.Tensor) -> None:
    offset = 0
    for (kind, key, leaf), shape in names:
        n = _numel(shape)
        value = flat[offset : offset + n].reshape(shape)
        offset += n
        if bool((value < 0).all()):
            continue  # no rank had it
        if kind == "routed":
            stats.routed_amax[key] = value
        elif kind == "fallback":
            stats.fallback_amax[key] = value
        else:
            stats.kv_amax.setdefault(key, {})[leaf] = value


def init_from_env() -> Ranks:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, else gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return Ranks.current()
