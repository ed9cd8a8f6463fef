"""Streaming sharded safetensors writer, and the write-to-temp-then-rename export directory.

Tensors are appended one at a time and flushed to a shard file once the shard reaches its size
limit, so an export never holds more than one shard in memory. The whole export is built in a
temporary sibling directory and renamed into place at the end: the target path either holds
the previous content or a complete checkpoint, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantship.errors import QuantshipError

TEMP_PREFIX = ".quantship-tmp-"


class ShardWriter:
    """Appends tensors to `model-XXXXX-of-YYYYY.safetensors` files and writes the index."""

    def __init__(self, directory: Path, max_shard_bytes: int = 5 * 1024**3, metadata: dict[str, str] | None = None):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name} written twice")
        self._seen.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # Own contiguous CPU storage: safetensors cannot save views sharing memory.
        self._pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        index = len(self._shards)
        save_file(self._pending, str(self.directory / f"shard-{index:05d}.partial"), metadata=self.metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, give shards their final names, write the index; returns the file names."""
        self._flush()
        n = len(self._shards)
        if n == 0:
            raise ValueError("no tensors were written")
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, (tensor_names, final) in enumerate(zip(self._shards, names, strict=True)):
            os.replace(self.directory / f"shard-{i:05d}.partial", self.directory / final)
            weight_map.update(dict.fromkeys(tensor_names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse an existing target without --overwrite, and an unwritable parent, before any work."""
    if target.exists() and not overwrite:
        raise QuantshipError(f"export path {target} already exists; choose another path or pass --overwrite")
    parent = target.parent if target.parent != Path("") else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantshipError(f"export path {target} is not writable ({e.strerror}); choose a writable directory") from None
    if not os.access(parent, os.W_OK):
        raise QuantshipError(f"export path {target} is not writable; choose a writable directory")


def clean_stale_temps(parent: Path) -> None:
    """Remove temp dirs left by a killed earlier export into the same parent."""
    for stale in parent.glob(f"{TEMP_PREFIX}*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def atomic_export_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temp dir beside `target`; on success rename it into place, on failure delete it."""
    target = Path(target)
    check_target(target, overwrite)
    parent = target.parent if str(target.parent) else Path(".")
    clean_stale_temps(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}-", dir=parent))
    final_tmp = tmp.with_name(f"{tmp.name}-{os.getpid()}")
    tmp.rename(final_tmp)
    try:
        yield final_tmp
    except BaseException:
        shutil.rmtree(final_tmp, ignore_errors=True)
        raise
    if target.exists():
        if not overwrite:  # appeared while we worked
            shutil.rmtree(final_tmp, ignore_errors=True)
            raise QuantshipError(f"export path {target} appeared during the export; rerun with --overwrite")
        old = target.with_name(f"{TEMP_PREFIX}old-{target.name}-{os.getpid()}")
        os.replace(target, old)
        os.replace(final_tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(final_tmp, target)
