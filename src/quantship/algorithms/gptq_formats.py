"""What GPTQ rounds a column to, per weight format, and the checkpoint tensors of its choice.

The exported weight must be exactly what GPTQ compensated against, so each quantizer records
the codes (and NVFP4 block scales) it used and `row_tensors` returns them as stored; nothing is
requantized afterwards (a fresh round of a compensated weight could pick other scales and codes).
The arithmetic is the format module's own, in its order: NVFP4 divides by the float32 product
`block_scale * scale_2` and dequantizes by multiplying with it (`formats/nvfp4.py` `_encode` /
`_decode`); FP8 divides by the per-tensor scale in float32 and dequantizes `q * scale`.

NVFP4 block scales, two policies (`GPTQConfig.nvfp4_scales`):
- "static": the e4m3 block scales of round-to-nearest, from the original weight, fixed before
  compensation (any column order works, so act-order is allowed);
- "dynamic": a block's scale is derived from its 16 compensated values when GPTQ reaches the
  block's first column (all earlier columns' errors have arrived by then);
- "static_mse" / "mse": as "static" / "dynamic", but each block scale is the one among the
  amax-derived e4m3 scale and the next MSE_CANDIDATES - 1 smaller e4m3 values that gives the
  block's 16 values the least squared rounding error (clipping the block max can pay off).
The global scale (`weight_scale_2`, shared by fused siblings) is the plan's in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantship.formats import fp8, nvfp4

BLOCK = nvfp4.BLOCK_SIZE
MSE_CANDIDATES = 4  # e4m3 steps are 1/8..1/16 apart: 4 candidates reach down to ~0.7x the amax scale
NVFP4_SCALE_MODES = ("static", "dynamic", "static_mse", "mse")
DYNAMIC_MODES = ("dynamic", "mse")


def _unpermute(x: Tensor, perm: Tensor | None) -> Tensor:
    if perm is None:
        return x
    return x.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand_as(x))


def _block_scales(values: Tensor, s2: Tensor, mse: bool) -> Tensor:
    """e4m3 scales of `values` [B, rows, n*16] in blocks of 16 under `s2` [B]: RTN's amax rule,
    or with `mse` the best of MSE_CANDIDATES e4m3 values at and below it."""
    scale = nvfp4.block_scales(values, s2)
    if not mse:
        return scale
    # Positive e4m3 values are ordered like their bytes: byte - k is the k-th smaller value.
    bits = scale.view(torch.uint8).int()
    cands = torch.stack([(bits - k).clamp_min(1) for k in range(MSE_CANDIDATES)]).to(torch.uint8)
    cands = cands.view(torch.float8_e4m3fn)  # [K, B, rows, n]
    step = (cands.float() * s2[None, :, None, None]).unsqueeze(-1)  # the float32 product, as _encode
    blocks = values.float().reshape(*values.shape[:-1], -1, BLOCK).unsqueeze(0)
    deq = nvfp4.e2m1_values(nvfp4.round_to_e2m1_codes(blocks / step)) * step
    best = ((blocks - deq) ** 2).sum(-1).argmin(0)  # ties: the first, i.e. the amax scale
    return cands.view(torch.uint8).gather(0, best[None]).view(torch.float8_e4m3fn)[0]


class NVFP4Columns:
    """E2M1 codes column by column under a fixed `scale_2` [B] per matrix."""

    def __init__(self, weight: Tensor, scale_2: Tensor, mode: str):
        n_batch, rows, cols = weight.shape
        self.s2 = torch.as_tensor(scale_2, device=weight.device).float().reshape(-1).expand(n_batch).contiguous()
        self.dynamic = mode in DYNAMIC_MODES
        self.mse = mode.endswith("mse")
        self.codes = torch.zeros(n_batch, rows, cols, dtype=torch.uint8, device=weight.device)
        self.perm: Tensor | None = None
        if self.dynamic:
            self.block_scale = torch.zeros(n_batch, rows, cols // BLOCK, dtype=torch.uint8, device=weight.device)
            self._step: Tensor | None = None
        else:
            scale = _block_scales(weight, self.s2, self.mse)  # from the original weight
            self.block_scale = scale.view(torch.uint8)
            # Per column: the float32 step block_scale * scale_2 (one rounding, as _encode forms it).
            self._steps = (scale.float() * self.s2[:, None, None]).repeat_interleave(BLOCK, dim=-1)

    def set_order(self, perm: Tensor) -> None:
        if self.dynamic:
            raise ValueError("dynamic NVFP4 block scales need columns in their original order")
        self.perm = perm
        self._steps = self._steps.gather(2, perm[:, None, :].expand_as(self._steps))

    def column(self, j: int, block: Tensor, i: int) -> Tensor:
        if self.dynamic:
            if j % BLOCK == 0:  # first column of an NVFP4 block: its 16 values are final but for their own errors
                scale = _block_scales(block[:, :, i : i + BLOCK], self.s2, self.mse)[..., 0]
                self.block_scale[:, :, j // BLOCK] = scale.view(torch.uint8)
                self._step = scale.float() * self.s2[:, None]
            step = self._step
        else:
            step = self._steps[:, :, j]
        codes = nvfp4.round_to_e2m1_codes(block[:, :, i] / step)
        self.codes[:, :, j] = codes
        return nvfp4.e2m1_values(codes) * step

    def row_tensors(self) -> dict[str, Tensor]:
        """{"weight": packed uint8 [B, rows, cols/2], "weight_scale": e4m3 [B, rows, cols/16]}."""
        codes = _unpermute(self.codes, self.perm)
        return {"weight": nvfp4.pack_fp4(codes), "weight_scale": self.block_scale.view(torch.float8_e4m3fn)}


class FP8Columns:
    """Per-tensor E4M3 codes column by column under the plan's scale [B] per matrix."""

    def __init__(self, weight: Tensor, scale: Tensor):
        n_batch, rows, cols = weight.shape
        self.scale = torch.as_tensor(scale, device=weight.device).float().reshape(-1).expand(n_batch)[:, None]
        self.codes = torch.zeros(n_batch, rows, cols, dtype=torch.uint8, device=weight.device)  # e4m3 bytes
        self.perm: Tensor | None = None

    def set_order(self, perm: Tensor) -> None:
        self.perm = perm

    def column(self, j: int, block: Tensor, i: int) -> Tensor:
        # Division in float32 then one rounding to e4m3 (no detour through the weight's dtype:
        # GPTQ's values are float32 and the codes are ours to choose).
        q = (block[:, :, i] / self.scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(torch.float8_e4m3fn)
        self.codes[:, :, j] = q.view(torch.uint8)
        return q.float() * self.scale

    def row_tensors(self) -> dict[str, Tensor]:
        return {"weight": _unpermute(self.codes, self.perm).view(torch.float8_e4m3fn)}


@dataclass(frozen=True)
class GPTQFormat:
    """How one handler's weights go through GPTQ: the plan scale fixed before GPTQ (one per matrix)."""

    matrix_scale: str

    def columns(self, weight: Tensor, scale: Tensor, nvfp4_scales: str) -> NVFP4Columns | FP8Columns:
        if self.matrix_scale == "weight_scale_2":
            return NVFP4Columns(weight, scale, nvfp4_scales)
        return FP8Columns(weight, scale)


# Keyed by FormatHandler.name; a format missing here cannot use --algorithm gptq yet. The row
# tensors the quantizers return go into the target's scales, which the handler then exports.
GPTQ_FORMATS: dict[str, GPTQFormat] = {"nvfp4": GPTQFormat("weight_scale_2"), "fp8": GPTQFormat("weight_scale")}
