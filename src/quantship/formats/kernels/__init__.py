"""Fast Triton kernels for the formats, chosen automatically for CUDA tensors.

Every kernel computes the same function as the CPU reference in ``quantship.formats`` (bit for
bit: same float32 operations in the same order, see ``tests/formats/test_kernels_gpu.py``);
the reference stays the definition. The formats' public functions call :func:`use_kernels`
and take the kernel when it says yes, the reference otherwise:

- a CUDA tensor, Triton importable and ``QUANTSHIP_KERNELS`` not set to ``0`` -> kernel;
- anything else (CPU tensors, no Triton, kernels switched off) -> the torch reference.

Code that needs the kernels (benchmarks, GPU tests) calls :func:`require_kernels`, which says
how to get what is missing instead of silently running the reference.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from quantship.errors import QuantshipError

ENV_SWITCH = "QUANTSHIP_KERNELS"


def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def kernels_enabled() -> bool:
    """False when the user switched the kernels off with ``QUANTSHIP_KERNELS=0``."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def use_kernels(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on a CUDA device and the Triton kernels can run there."""
    return (
        bool(tensors)
        and all(t.is_cuda for t in tensors)
        and kernels_enabled()
        and triton_installed()
    )


def require_kernels() -> None:
    """Raise a one-line QuantshipError naming what is missing for the GPU kernels."""
    if not torch.cuda.is_available():
        raise QuantshipError(
            "the quantship GPU kernels need a CUDA device, and torch.cuda.is_available() is False; "
            "install a CUDA build of torch (https://pytorch.org/get-started) on a machine with an NVIDIA GPU, "
            "or use the CPU reference (the default on CPU tensors)"
        )
    if not triton_installed():
        raise QuantshipError(
            "the quantship GPU kernels need Triton, which is not installed; `pip install triton` "
            "(Linux CUDA builds of torch usually bring it)"
        )
    if not kernels_enabled():
        raise QuantshipError(f"the quantship GPU kernels are switched off by {ENV_SWITCH}=0; unset it to use them")
