"""KV-cache scales are amax / 448 rounded once (formats/exact.py `div_const`), as a float64
division rounded to float32 gives, on the CPU and on CUDA (whose `x / 448.0` multiplies by a
rounded reciprocal and differs in the last bit for some amax)."""

from __future__ import annotations

import pytest
import torch

from quantship.pipeline import quantize
from quantship.scales import build_plan

from tiny_models import build_tiny_model


def _awkward_amax(n: int) -> torch.Tensor:
    """float32 amax values over many exponents, led by ones where `x * float32(1/448)` is not
    the correctly rounded quotient (what a reciprocal-multiplying device would get wrong)."""
    x = torch.exp2(torch.empty(20000).uniform_(-20, 20, generator=torch.Generator().manual_seed(0))).float()
    exact = (x.double() / 448).float()
    by_reciprocal = x * torch.tensor(1 / 448, dtype=torch.float32)
    wrong = x[by_reciprocal != exact]
    assert wrong.numel() > n // 2  # the test would not tell the two roundings apart otherwise
    return torch.cat([wrong[: n // 2], x[: n - n // 2]])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_kv_scales_are_amax_over_448_rounded_once(device):
    model = build_tiny_model("llama")
    batches = [{"input_ids": torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))}]
    qm = quantize(model, "fp8", batches, kv_cache="fp8", progress=False)
    stats, attns = qm.stats, sorted(qm.stats.kv_amax)
    values = _awkward_amax(64)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for start in range(0, len(values), 2 * len(attns)):
        chunk = values[start : start + 2 * len(attns)].to(device)
        stats.kv_amax = {a: {"k": chunk[2 * i], "v": chunk[2 * i + 1]} for i, a in enumerate(attns) if 2 * i + 1 < len(chunk)}
        plan = build_plan(qm.structure, qm.plan.recipe, qm.plan.kv_format, stats, qm.plan.excluded)
        for a, amax in stats.kv_amax.items():
            for leaf in ("k", "v"):
                got = plan.kv_scales[a][f"{leaf}_scale"]
                want = (amax[leaf].double().cpu() / 448).float()
                assert got.dtype == torch.float32 and got.device.type == device
                assert got.cpu().view(torch.int32) == want.view(torch.int32), (float(amax[leaf]), float(got), float(want))
