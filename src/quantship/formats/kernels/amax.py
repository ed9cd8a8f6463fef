"""Abs-max reductions in one read: per matrix (global NVFP4/FP8 scales) and per tensor (observers).

``x.abs().amax()`` in torch writes the whole ``|x|`` temporary and reads it back (three passes
over memory); these kernels read ``x`` once. NaN is mapped to inf, so a NaN anywhere gives a
non-finite amax that callers can refuse, instead of being dropped by ``max``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantship.formats.kernels.common import launch_device, sm_count

BLOCK = 16384  # 64 elements per thread of 8 warps: eight 16-byte loads in flight each


@triton.jit
def _amax_partial_kernel(x_ptr, out_ptr, per_matrix, n_iter, n_chunks, BLOCK: tl.constexpr):
    m = tl.program_id(0)
    c = tl.program_id(1)
    base = x_ptr + m.to(tl.int64) * per_matrix
    start = c.to(tl.int64) * n_iter * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n_iter):
        idx = start + i * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(base + idx, mask=idx < per_matrix, other=0.0).to(tl.float32)
        a = tl.where(x != x, float("inf"), tl.abs(x))
        acc = tl.maximum(acc, a)
    tl.store(out_ptr + m * n_chunks + c, tl.max(acc, axis=0))


def matrix_amax(x: torch.Tensor, n_matrices: int = 1) -> torch.Tensor:
    """float32 ``[n_matrices]``: amax of |x| over each of the equal consecutive parts of ``x``
    (``n_matrices=E`` for fused experts ``[E, out, in]``)."""
    x = x.contiguous()
    per = x.numel() // n_matrices
    if per * n_matrices != x.numel():
        raise ValueError(f"{x.numel()} elements do not split into {n_matrices} equal matrices")
    if per == 0:
        return torch.zeros(n_matrices, dtype=torch.float32, device=x.device)
    # Enough programs to fill the GPU a few times over, each reducing a long contiguous chunk.
    want = max(1, (8 * sm_count(x.device)) // n_matrices)
    n_chunks = max(1, min(want, triton.cdiv(per, BLOCK)))
    chunk = triton.cdiv(triton.cdiv(per, n_chunks), BLOCK) * BLOCK
    n_chunks = triton.cdiv(per, chunk)
    partial = torch.empty((n_matrices, n_chunks), dtype=torch.float32, device=x.device)
    with launch_device(x):
        _amax_partial_kernel[(n_matrices, n_chunks)](x, partial, per, chunk // BLOCK, n_chunks, BLOCK=BLOCK,
                                                       num_warps=8)
    return partial.amax(dim=1)


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """0-dim float32 amax of |x| (NaN gives inf)."""
    return matrix_amax(x, 1).reshape(())
