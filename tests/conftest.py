"""Shared fixtures."""

from pathlib import Path

import pytest
import torch

from quantship.default_model import default_model_dir


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct HF folder, built from the packaged GGUF on first use
    (about half a minute) and kept in the quantship cache ($QUANTSHIP_CACHE or ~/.cache/quantship)."""
    return default_model_dir()


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """Test tensors are tiny: intra-op threads only add sync cost (10x on a busy 2-core box)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
