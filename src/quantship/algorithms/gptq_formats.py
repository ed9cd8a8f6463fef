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

INT4 (W4A16 AWQ, `int4_awq`): group scales of 128 inputs fixed from the (AWQ-smoothed) weight
before compensation; act-order allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantship.formats import fp8, int4, nvfp4

BLOCK = nvfp4.BLOCK_SIZE
MSE_CANDIDATES = 4  # e4m3 steps are 1/8..1/16 apart: 4 candidates reach down to ~0.7x the amax scale
NVFP4_SCALE_MODES = ("static", "dynamic", "static_mse", "mse")
DYNAMIC_MODES = ("dynamic", "mse")


class _E2M1Rounder:
    """Nearest E2M1 value, ties to the even code, saturating at 6 — `round_to_e2m1_codes` then
    `e2m1_values` — in arithmetic ops only (on CPUs a compare, where or searchsorted costs
    20-100x an add; the column loop runs once per column). The grid is 0.5 apart below 2 and 1
    apart below 4, so torch.round (half to even) of 2|x| resp. |x| lands on the even code at each
    tie; above 4 only 4 and 6 remain, and round((|x| - 4) / 2) sends 5 to 4. The three clamped
    pieces add up to the magnitude; tests/algorithms check equality at every tie and bound."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, x: Tensor) -> Tensor:
        m = x.abs()
        low = (m.clamp(max=2.0) * 2.0).round_() * 0.5  # 0 .. 2 in steps of 0.5
        mid = m.clamp(2.0, 4.0).round_() - 2.0  # + 0 .. 2 in steps of 1
        top = ((m - 4.0) * 0.5).clamp_(0.0, 1.0).round_() * 2.0  # + 0 or 2
        # A negative value that rounds to zero stays -0.0 (code 8), as the format's `q < 0` does;
        # x + 0.0 turns an input of exactly -0.0 into +0.0, whose code is 0 there too.
        return (low + mid + top) * (x + 0.0).sign()


def _codes_of(values: Tensor) -> Tensor:
    """E2M1 codes of values already on the grid (value / step, within float32 rounding of a grid
    point, far from any rounding bound); the sign bit from the sign of the value, -0 included."""
    codes = nvfp4.round_to_e2m1_codes(values.abs())
    return codes | (torch.signbit(values).to(torch.uint8) << 3)


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
    """E2M1 values column by column under a fixed `scale_2` [B] per matrix; codes are read back
    from GPTQ's final values (`row_tensors`), exactly the ones the loop chose."""

    def __init__(self, weight: Tensor, scale_2: Tensor, mode: str):
        n_batch, rows, cols = weight.shape
        self.s2 = torch.as_tensor(scale_2, device=weight.device).float().reshape(-1).expand(n_batch).contiguous()
        self.dynamic = mode in DYNAMIC_MODES
        self.mse = mode.endswith("mse")
        self.round = _E2M1Rounder(weight.device)
        if self.dynamic:
            self.block_scale = torch.zeros(n_batch, rows, cols // BLOCK, dtype=torch.uint8, device=weight.device)
            self._step: Tensor | None = None
        else:
            scale = _block_scales(weight, self.s2, self.mse)  # from the original weight
            self.block_scale = scale.view(torch.uint8)
            self._steps = self._column_steps()

    def _column_steps(self) -> Tensor:
        # Per column: the float32 step block_scale * scale_2 (one rounding, as _encode forms it).
        scale = self.block_scale.view(torch.float8_e4m3fn).float()
        return (scale * self.s2[:, None, None]).repeat_interleave(BLOCK, dim=-1)

    def set_order(self, perm: Tensor) -> None:
        if self.dynamic:
            raise ValueError("dynamic NVFP4 block scales need columns in their original order")
        self._steps = self._steps.gather(2, perm[:, None, :].expand_as(self._steps))

    def kernel_plan(self) -> tuple[str, Tensor] | None:
        # A dynamic block scale is chosen mid-loop: only the torch loop does that.
        return None if self.dynamic else ("e2m1", self._steps)

    def column(self, j: int, block: Tensor, i: int) -> Tensor:
        if self.dynamic:
            if j % BLOCK == 0:  # first column of an NVFP4 block: its 16 values are final but for their own errors
                scale = _block_scales(block[:, :, i : i + BLOCK], self.s2, self.mse)[..., 0]
                self.block_scale[:, :, j // BLOCK] = scale.view(torch.uint8)
                self._step = scale.float() * self.s2[:, None]
            step = self._step
        else:
            step = self._steps[:, :, j]
        return self.round(block[:, :, i] / step) * step

    def row_tensors(self, q: Tensor) -> dict[str, Tensor]:
        """{"codes": uint8 [B, rows, cols], "weight_scale": e4m3 [B, rows, cols/16]} for GPTQ's
        final values `q` (original column order)."""
        return {"codes": _codes_of(q / self._column_steps()), "weight_scale": self.block_scale.view(torch.float8_e4m3fn)}


class FP8Columns:
    """Per-tensor E4M3 values column by column under the plan's scale [B] per matrix."""

    def __init__(self, weight: Tensor, scale: Tensor):
        n_batch = weight.shape[0]
        self.scale = torch.as_tensor(scale, device=weight.device).float().reshape(-1).expand(n_batch)[:, None]

    def set_order(self, perm: Tensor) -> None:
        pass  # one scale per matrix: any column order

    def kernel_plan(self) -> tuple[str, Tensor] | None:
        return "e4m3", self.scale[:, :, None]

    def column(self, j: int, block: Tensor, i: int) -> Tensor:
        # Division in float32 then one rounding to e4m3 (no detour through the weight's dtype:
        # GPTQ's values are float32 and the codes are ours to choose).
        q = (block[:, :, i] / self.scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(torch.float8_e4m3fn)
        return q.float() * self.scale

    def row_tensors(self, q: Tensor) -> dict[str, Tensor]:
        # q / scale is an e4m3 value up to float32 rounding, which the cast undoes exactly.
        return {"codes": (q / self.scale[:, :, None]).to(torch.float8_e4m3fn)}


class Int4Columns:
    """Symmetric INT4 codes in groups of `group` inputs, group scales fixed from the original
    weight (`int4.scale_from_amax(group_amax / 7)`), as `formats/int4.py` rounds: round half to
    even of the float32 quotient, clamped to [-8, 7]; dequantized `code * scale`."""

    def __init__(self, weight: Tensor, group: int):
        self.scale = int4.scale_from_amax(int4.group_amax(weight, group))  # [B, rows, cols/group]
        self._orig_steps = self._steps = self.scale.repeat_interleave(group, dim=-1)

    def set_order(self, perm: Tensor) -> None:
        self._steps = self._steps.gather(2, perm[:, None, :].expand_as(self._steps))

    def kernel_plan(self) -> tuple[str, Tensor] | None:
        return "int4", self._steps

    def column(self, j: int, block: Tensor, i: int) -> Tensor:
        step = self._steps[:, :, j]
        return (block[:, :, i] / step).round().clamp(int4.INT4_MIN_CODE, int4.INT4_MAX_CODE) * step

    def row_tensors(self, q: Tensor) -> dict[str, Tensor]:
        return {"codes": (q / self._orig_steps).round().to(torch.int8), "weight_scale": self.scale}


@dataclass(frozen=True)
class GPTQFormat:
    """How one handler's weights go through GPTQ: the plan scale fixed before GPTQ (one per
    matrix, None where the format has none) and how row codes become checkpoint tensors."""

    kind: str  # "nvfp4", "fp8" or "int4"
    matrix_scale: str | None
    group: int = 0

    def columns(self, weight: Tensor, scale: Tensor, nvfp4_scales: str) -> NVFP4Columns | FP8Columns | Int4Columns:
        if self.kind == "nvfp4":
            return NVFP4Columns(weight, scale, nvfp4_scales)
        if self.kind == "int4":
            return Int4Columns(weight, self.group)
        return FP8Columns(weight, scale)

    def pack(self, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        """One matrix's row tensors (`[..., rows, cols]` codes) -> its checkpoint tensors. Packing
        comes after rows are split per target: INT4 packs pairs of output rows."""
        out = {k: v for k, v in rows.items() if k != "codes"}
        codes = rows["codes"]
        if self.kind == "nvfp4":
            codes = nvfp4.pack_fp4(codes)
        elif self.kind == "int4":
            codes = int4.pack_out_pairs(codes)
        return {"weight": codes, **out}


# Keyed by FormatHandler.name; a format missing here cannot use --algorithm gptq yet. The packed
# tensors go into the target's scales under their checkpoint names; the handler exports them.
GPTQ_FORMATS: dict[str, GPTQFormat] = {
    "nvfp4": GPTQFormat("nvfp4", "weight_scale_2"),
    "fp8": GPTQFormat("fp8", "weight_scale"),
    "int4_awq": GPTQFormat("int4", None, int4.DEFAULT_GROUP),
}
