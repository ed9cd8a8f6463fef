"""The two reductions every observer runs on every calibration forward."""

from __future__ import annotations

import torch

from quantship.formats.kernels import use_kernels


def absmax(x: torch.Tensor) -> torch.Tensor:
    """``|x|.max()`` as a 0-dim float32 tensor on ``x``'s device, without a host sync.

    On CUDA one Triton read of ``x`` (torch's ``x.abs().amax()`` writes and re-reads an ``|x|``
    temporary); NaN reads as inf there and stays NaN here, non-finite either way, which
    ``scales.py`` refuses."""
    x = x.detach()
    if use_kernels(x):
        from quantship.formats.kernels.amax import tensor_amax

        return tensor_amax(x)
    return x.abs().amax().float()


def per_expert_absmax(weight: torch.Tensor, chunk_bytes: int = 256 * 1024**2) -> torch.Tensor:
    """``|w|.amax(dim=(1, 2))`` of a fused [E, rows, cols] expert tensor as float32, a chunk of
    experts at a time: ``w.abs()`` of a DeepSeek-V3 gate_up tensor is a 15 GB temporary, more
    than half a decoder layer, on the GPU that holds the layer (issue 4's memory bound)."""
    weight = weight.detach()
    step = max(1, chunk_bytes // max(1, weight[0].numel() * weight.element_size()))
    parts = [weight[e0 : e0 + step].abs().amax(dim=(1, 2)) for e0 in range(0, weight.shape[0], step)]
    return torch.cat(parts).float()


def all_finite(tensor: torch.Tensor, chunk_elems: int = 1 << 26) -> bool:
    """Whether every element is finite, reading ``tensor`` once in chunks. ``torch.isfinite(t)``
    is ``(t == t) * (t.abs() != inf)``: three temporaries, 30 GB for one DeepSeek-V3 gate_up
    tensor, which made loading a layer the GPU peak of ``--streaming`` (bench/scale.py)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return True
    maxima = torch.stack([absmax(flat[i : i + chunk_elems]) for i in range(0, flat.numel(), chunk_elems)])
    return bool(torch.isfinite(maxima).all())


def max_into(store: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    """``store[key] = max(store[key], value)`` elementwise, creating the entry on first use."""
    value = value.detach().float()
    old = store.get(key)
    store[key] = value.clone() if old is None else torch.maximum(old, value.to(old.device))
