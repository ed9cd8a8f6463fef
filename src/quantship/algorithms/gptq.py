"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) as pure tensor functions: Hessians and the
column-by-column quantization with error compensation, batched over matrices.

For a weight W [rows, cols] and calibration inputs X [n, cols] of its layer, GPTQ picks
quantized values Q minimizing ||W Xᵀ - Q Xᵀ||², i.e. tr((W-Q) H (W-Q)ᵀ) with H = 2/n XᵀX. It
quantizes one column at a time and spreads that column's rounding error over the columns not
yet quantized, weighted by the inverse Hessian (the upper Cholesky factor of H⁻¹, "lazy
batch" updates in blocks of `block_size` columns), exactly as in the paper's Algorithm 1.

What a column is rounded to is the format's business (`gptq_formats.py`): the loop here calls
`quantizer.column(...)` and never looks at codes, so the values GPTQ compensates against are
exactly the values the checkpoint will hold.

Every function takes a leading batch dimension B (1 for a Linear, one entry per expert for
MoE experts): each matrix has its own Hessian, and one Python loop over columns serves all of
them, so the loop count per layer does not grow with the number of experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from quantship.errors import QuantshipError
from quantship.formats.kernels import use_kernels


@dataclass(frozen=True)
class GPTQConfig:
    """Options of the GPTQ weight algorithm (defaults: the measured best on SmolLM2, bench/README.md)."""

    # Lazy-batch width (a multiple of NVFP4's 16, so blocks never straddle it). The paper uses 128;
    # 32 gives the same result up to float rounding order and a 2-3x faster column loop on CPUs (its
    # per-column update touches block_size / 2 columns on average; bench/README.md).
    block_size: int = 32
    damp: float = 0.01  # lambda = damp * mean(diag H), added to diag H (paper: 1%)
    # NVFP4 block scales: "static" from the original weight, "dynamic" per block as GPTQ reaches
    # it; "static_mse" / "mse" the same with a least-squares choice among nearby e4m3 scales.
    nvfp4_scales: str = "static"
    act_order: bool = False  # columns by decreasing diag H (static block scales and FP8 only)
    act_quant: bool = True  # Hessian inputs and layer propagation with activations fake-quantized
    # An expert (or any weight) whose Hessian saw fewer than this many input rows per input
    # dimension falls back to round-to-nearest (see ExpertFallback in sequential.py).
    min_tokens_per_dim: float = 2.0
    # Experts' Hessians held at once per layer (bytes). Past it the layer's experts are collected
    # in chunks, one calibration pass each (a 256-expert DeepSeek-V3 layer's gate_up Hessians are
    # ~52 GB). None: 40 % of the GPU's free memory when the layer starts; no bound on CPUs.
    max_hessian_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.nvfp4_scales not in ("static", "dynamic", "static_mse", "mse"):
            raise QuantshipError(f"GPTQ nvfp4_scales must be static, dynamic, static_mse or mse, "
                                 f"got {self.nvfp4_scales!r}")
        if self.block_size <= 0 or self.block_size % 16:
            raise QuantshipError(f"GPTQ block_size must be a positive multiple of 16, got {self.block_size}")
        if not 0 < self.damp < 1:
            raise QuantshipError(f"GPTQ damp must be in (0, 1), got {self.damp}")
        if self.max_hessian_bytes is not None and self.max_hessian_bytes <= 0:
            raise QuantshipError(f"GPTQ max_hessian_bytes must be a positive byte count or None (40 % of free GPU "
                                 f"memory), got {self.max_hessian_bytes}")
        if self.act_order and self.nvfp4_scales in ("dynamic", "mse"):
            raise QuantshipError(
                "GPTQ act_order needs static NVFP4 block scales: a dynamic block scale is derived when the "
                "block's first column is reached, and under a permutation its other 15 columns are still "
                "waiting for pending lazy-batch updates; use nvfp4_scales='static' with act_order"
            )


class ColumnQuantizer(Protocol):
    """Rounds a batch of matrices one column at a time, remembering the codes it chose."""

    def set_order(self, perm: Tensor) -> None:
        """Columns will come in order `perm` [B, cols] (act-order); codes stay in original order."""

    def kernel_plan(self) -> tuple[str, Tensor] | None:
        """("e2m1" | "int4" | "e4m3", per-element steps broadcastable to [B, rows, cols] in
        processing order) when the fused GPU kernel can round like `column`; None otherwise."""

    def column(self, j: int, block: Tensor, i: int) -> Tensor:
        """Dequantized values [B, rows] (float32) of processing-order column `j`, which is column
        `i` of `block` [B, rows, block_cols], the current (compensated) values of its GPTQ block."""

    def row_tensors(self, q: Tensor) -> dict[str, Tensor]:
        """The codes (and scales) of the final values `q` [B, rows, cols], original column order."""


# ------------------------------------------------------------------------------ Hessians
class HessianAccumulator:
    """Sum of xᵀx over the rows x [.., cols] fed to one weight (or one expert's weight).

    Until it has seen `cols` rows it keeps the rows themselves (an expert routed 30 tokens costs
    30·cols numbers, not cols²); then it folds them into a float32 [cols, cols] sum. So memory
    per accumulator is at most cols² floats, and a 384-expert layer of mostly idle experts stays
    small. `n` counts rows (tokens).
    """

    def __init__(self, cols: int):
        self.cols = cols
        self.n = 0
        self._rows: list[Tensor] = []
        self._sum: Tensor | None = None
        self.last_input: Tensor | None = None  # fused siblings share one input tensor; count it once

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[-1] != self.cols:
            raise ValueError(f"Hessian of {self.cols} inputs fed rows of {x.shape[-1]}")
        if not x.shape[0]:
            return
        self.n += x.shape[0]
        if self._sum is None and self.n < self.cols:
            self._rows.append(x.clone())
            return
        if self._sum is None:
            self._sum = torch.zeros(self.cols, self.cols, dtype=torch.float32, device=x.device)
            x = torch.cat([*self._rows, x]) if self._rows else x
            self._rows = []
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            # Half-precision products are exact in float32: a tensor-core GEMM accumulating in
            # float32 gives the float32 GEMM's sum up to order, 10x faster (bench/gptq_cost.py:
            # for a 14336-wide input the Hessian, tokens x cols², outweighs the layer's forward).
            self._sum = torch.addmm(self._sum, x.T, x, out_dtype=torch.float32)
        else:
            xf = x.float()
            self._sum.addmm_(xf.T, xf)

    def hessian(self) -> Tensor:
        """H = 2/n · XᵀX (float32); zeros when nothing was seen."""
        if self._sum is None:
            if not self._rows:
                return torch.zeros(self.cols, self.cols)
            xf = torch.cat(self._rows).float()
            s = xf.T @ xf
        else:
            s = self._sum
        return s * (2.0 / max(self.n, 1))


# ------------------------------------------------------------------------------ GPTQ proper
# How H⁻¹'s upper Cholesky factor is computed (bench/gptq_cost.py --invert-bench measures them):
# dtype; "chol_inv_chol" = cholesky, cholesky_inverse, cholesky (the reference implementations'
# way) or "reversed" = one cholesky of the index-reversed H and a triangular solve (the same
# factor: see _reversed_factor); batches of matrices at least `loop_from` wide go one matrix per
# call (batched cuSOLVER calls are slower than a loop there: 3 x 4096²: 35 vs 23 ms).
# Measured on an H100 (bench/results/2026-11-27-*-gptq-cost*): "reversed" takes 0.4-0.6x the time
# of chol_inv_chol (e.g. 128 x 2048²: 132 vs 380 ms; 14336²: 121 vs 238 ms); float32 saves little.
INVERSE = {"dtype": torch.float64, "method": "reversed", "loop_from": 4096, "leaf": 1024}


def _flip(a: Tensor) -> Tensor:
    return a.flip(-1).flip(-2)


def _chol_inv_chol(h: Tensor) -> Tensor | None:
    chol, info = torch.linalg.cholesky_ex(h)
    if info.any():
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    return None if info.any() else upper


def _reversed_factor(h: Tensor) -> Tensor | None:
    """With J the index reversal and J H J = L Lᵀ: H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J is
    upper triangular with a positive diagonal, so it is H⁻¹'s upper Cholesky factor."""
    chol, info = torch.linalg.cholesky_ex(_flip(h))
    if info.any():
        return None
    return _flip(_lower_triangular_inverse(chol, INVERSE["leaf"]))


def _lower_triangular_inverse(low: Tensor, leaf: int = 1024) -> Tensor:
    """L⁻¹ of lower-triangular L [B, n, n] by halves: [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0],
    [-D⁻¹ C A⁻¹, D⁻¹]], down to `leaf` columns, where a triangular solve takes over. Its flops
    sit in two GEMMs per level (about 2/3 n³, at GEMM speed) instead of one n³ solve against the
    identity (2-3x faster at n = 14336 in float64)."""
    n = low.shape[-1]
    if n <= leaf:
        eye = torch.eye(n, dtype=low.dtype, device=low.device).expand_as(low)
        return torch.linalg.solve_triangular(low, eye, upper=False)
    k = n // 2
    a_inv = _lower_triangular_inverse(low[..., :k, :k], leaf)
    d_inv = _lower_triangular_inverse(low[..., k:, k:], leaf)
    out = torch.zeros_like(low)
    out[..., :k, :k] = a_inv
    out[..., k:, k:] = d_inv
    out[..., k:, :k] = -(d_inv @ (low[..., k:, :k] @ a_inv))
    return out


def _inverse_hessian_factor(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H), per batch entry.

    Computed in float64 by default (a badly conditioned Hessian loses no accuracy); if Cholesky
    fails the dampening is raised tenfold, up to three times, as reference implementations do.
    """
    if h.shape[0] > 1 and h.shape[-1] >= INVERSE["loop_from"]:
        return torch.cat([_inverse_hessian_factor(h[i : i + 1], damp) for i in range(h.shape[0])])
    h = h.to(INVERSE["dtype"])
    factor = _reversed_factor if INVERSE["method"] == "reversed" else _chol_inv_chol
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    mean_diag = torch.diagonal(h, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    for attempt in range(4):
        lam = damp * (10**attempt) * mean_diag
        upper = factor(h + lam[:, None, None] * eye)
        if upper is not None:
            return upper.float()
    raise QuantshipError("GPTQ: the calibration Hessian is not positive definite even after 1000x dampening; "
                         "use more calibration text or --algorithm max")


@dataclass(frozen=True)
class PreparedHessians:
    """What the column work needs from a batch of Hessians: the act-order permutation (None
    without act-order) and the upper Cholesky factor of the dampened, permuted H⁻¹."""

    perm: Tensor | None  # [B, cols]
    hinv: Tensor  # [B, cols, cols] float32

    def select(self, index: list[int]) -> PreparedHessians:
        idx = torch.as_tensor(index, device=self.hinv.device)
        return PreparedHessians(None if self.perm is None else self.perm[idx], self.hinv[idx])


def prepare_hessians(hessian: Tensor, config: GPTQConfig) -> PreparedHessians:
    """Hessians [B, cols, cols] -> PreparedHessians. Separate from the column work so a layer's
    Hessians of one width are inverted in one batched call whatever the rows of their weights.

    Input dimensions the calibration never activated (diag H = 0) get diag 1: their columns are
    decoupled from the rest (zero off-diagonal), so they are rounded to nearest and neither give
    nor take compensation. (The reference code also zeroes their weights; we keep them, since
    the calibration set proves nothing about those inputs.)
    """
    h = hessian.float().clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    diag[diag == 0] = 1.0  # a view: writes into h
    perm = None
    if config.act_order:
        perm = torch.argsort(torch.diagonal(h, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)
        h = h.gather(1, perm[:, :, None].expand_as(h)).gather(2, perm[:, None, :].expand_as(h))
    return PreparedHessians(perm, _inverse_hessian_factor(h, config.damp))


def gptq_quantize(weight: Tensor, hessian: Tensor | None, quantizer: ColumnQuantizer, config: GPTQConfig,
                  prepared: PreparedHessians | None = None) -> Tensor:
    """GPTQ of `weight` [B, rows, cols] under `hessian` [B, cols, cols] (or its `prepared` form);
    returns the quantized values [B, rows, cols] (float32) exactly as `quantizer` produced them.
    On CUDA the column work is one fused Triton kernel where the quantizer allows it
    (`kernel_plan`), the torch loop otherwise."""
    if prepared is None:
        if weight.dim() != 3 or hessian is None or hessian.shape != (weight.shape[0], weight.shape[2], weight.shape[2]):
            shape = None if hessian is None else tuple(hessian.shape)
            raise ValueError(f"gptq_quantize: weight {tuple(weight.shape)} and hessian {shape} do not match")
        prepared = prepare_hessians(hessian, config)
    w = weight.float().clone()
    perm, hinv = prepared.perm, prepared.hinv
    if perm is not None:
        w = w.gather(2, perm[:, None, :].expand_as(w))
        quantizer.set_order(perm)
    plan = quantizer.kernel_plan() if use_kernels(w) and gptq_kernel_supports(config.block_size) else None
    if plan is not None:
        from quantship.algorithms import gptq_triton

        q = gptq_triton.gptq_columns(w, hinv, plan[1], plan[0], config.block_size)
    else:
        q = _column_loop(w, hinv, quantizer, config.block_size)
    if perm is not None:
        q = q.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand_as(q))
    return q


def gptq_kernel_supports(block_size: int) -> bool:
    """The fused kernel's register block is a power of two, and it needs `tl.gather` (Triton
    3.2+); otherwise the torch loop runs (same values up to float rounding order)."""
    import triton.language as tl

    return block_size >= 16 and block_size & (block_size - 1) == 0 and hasattr(tl, "gather")


def _column_loop(w: Tensor, hinv: Tensor, quantizer: ColumnQuantizer, bs: int) -> Tensor:
    """The column loop in torch ops (CPU, and GPU without Triton): `w` is updated in place."""
    cols = w.shape[-1]
    q = torch.zeros_like(w)
    # The column loop is launch/dispatch-bound (one small op per line), so it keeps few ops.
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        block = w[:, :, i1:i2].clone()
        errors = torch.zeros_like(block)
        hinv1 = hinv[:, i1:i2, i1:i2]
        inv_diag = 1.0 / torch.diagonal(hinv1, dim1=-2, dim2=-1)  # [B, block]
        for i in range(i2 - i1):
            qcol = quantizer.column(i1 + i, block, i)
            q[:, :, i1 + i] = qcol
            err = (block[:, :, i] - qcol).mul_(inv_diag[:, i, None])
            # The rounding error of column i, spread over the block's later columns.
            block[:, :, i:].addcmul_(err[:, :, None], hinv1[:, i, None, i:], value=-1.0)
            errors[:, :, i] = err
        # Lazy batch update: the whole block's errors reach the remaining columns in one GEMM.
        w[:, :, i2:] -= errors @ hinv[:, i1:i2, i2:]
    return q


def objective(weight: Tensor, quantized: Tensor, hessian: Tensor, dtype: torch.dtype = torch.float64,
              split: int | None = None) -> Tensor:
    """tr((W-Q) H (W-Q)ᵀ) per batch entry: the output error GPTQ minimizes. `dtype` is the
    GEMM's: float64 by default; float32 for the report on CPUs (a quarter of the time);
    bfloat16 for the report on GPUs, where a float32 GEMM of rows x cols² costs more than GPTQ
    itself (D and H rounded to 8 bits: the sum's relative error stays ~1e-3, far below the ratios
    it reports). The difference W-Q is taken in float32 at least either way. With `split`, rows
    [0, split) and [split, ...) are summed apart: [2, B] (two candidates from one GEMM)."""
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    d = weight.to(exact) - quantized.to(exact)
    per_row = ((d.to(dtype) @ hessian.to(dtype)).to(exact) * d).sum(dim=2)
    if split is None:
        return per_row.sum(dim=1)
    return torch.stack([per_row[:, :split].sum(dim=1), per_row[:, split:].sum(dim=1)])
