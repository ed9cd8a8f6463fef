"""per_expert_absmax: the chunked per-expert weight amax equals a float64 reduction, whatever the chunk."""

from __future__ import annotations

import pytest
import torch

from quantship.calibration.amax import per_expert_absmax


@pytest.mark.parametrize("chunk_bytes", [1, 4096, 1 << 30])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_per_expert_absmax_equals_float64(chunk_bytes: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(9, 12, 40, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 9, dtype=torch.float64)[:, None, None])
    w[4] = 0.0
    w[2, 3, 5] = -1e4  # a negative outlier sets its expert's amax
    w = w.to(dtype)
    expected = w.double().abs().flatten(1).max(dim=1).values
    got = per_expert_absmax(w, chunk_bytes)
    assert got.dtype == torch.float32 and got.shape == (9,)
    assert torch.equal(got.double(), expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 517, -1])
def test_all_finite_finds_one_bad_element_in_any_chunk(bad: float, where: int) -> None:
    from quantship.calibration.amax import all_finite

    t = torch.randn(33, 31, dtype=torch.bfloat16)
    assert all_finite(t, chunk_elems=100)
    t.view(-1)[where] = bad
    assert not all_finite(t, chunk_elems=100)
    assert not all_finite(t)
    assert all_finite(torch.empty(0, 4))
