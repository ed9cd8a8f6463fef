"""Shared by the streaming tests and the subprocess they kill: seeded calibration batches, and
a byte-for-byte comparison of two export folders."""

from __future__ import annotations

from pathlib import Path

import torch


def calib_batches(vocab: int, n: int = 3, seed: int = 0, batch: int = 2, seq: int = 16) -> list[dict]:
    """`n` batches of random tokens; batch 1 is left-padded, so masks are exercised too."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        if i == 1:
            mask[0, :3] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def assert_same_files(a: Path, b: Path) -> list[str]:
    """Both folders hold the same file names with the same bytes; returns the names."""
    names_a = sorted(p.name for p in Path(a).iterdir())
    names_b = sorted(p.name for p in Path(b).iterdir())
    assert names_a == names_b
    differing = [n for n in names_a if (Path(a) / n).read_bytes() != (Path(b) / n).read_bytes()]
    assert not differing, f"files differ: {differing}"
    return names_a
