"""Shared fixtures."""

from pathlib import Path

import pytest

from quantship.default_model import default_model_dir


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct HF folder, built from the packaged GGUF on first use
    (about half a minute) and kept in the quantship cache ($QUANTSHIP_CACHE or ~/.cache/quantship)."""
    return default_model_dir()
