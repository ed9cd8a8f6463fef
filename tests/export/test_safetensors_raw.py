"""The raw shard writer writes exactly what safetensors' `save_file` writes (metadata keys
sorted), and the background shard writer overlaps writes with the caller, bounded to two shards."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantship.export.shards as shards
from quantship.errors import QuantshipError
from quantship.export import safetensors_raw
from quantship.export.safetensors_raw import DTYPES, canonical_metadata_order, write_file


def _random_tensors(seed: int, n: int = 60) -> dict[str, torch.Tensor]:
    """Every dtype, 0-dim, empty and odd shapes, names out of order (unicode, punctuation), and
    views sharing one storage (rows of a quantized chunk)."""
    g = torch.Generator().manual_seed(seed)
    dtypes = list(DTYPES)
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        dtype = dtypes[int(torch.randint(len(dtypes), (1,), generator=g))]
        shape = [int(s) for s in torch.randint(0, 5, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)]
        raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * dtype.itemsize,), dtype=torch.uint8, generator=g)
        if dtype == torch.bool:
            raw = raw % 2  # a bool byte other than 0 or 1 is not a valid bool
        t = raw[: torch.Size(shape).numel() * dtype.itemsize].view(dtype).reshape(shape)
        name = ["model.layers.{}.w", "Zz.{}", "a-{}_é", "ö.{}.\u4e2d", "x{}"][i % 5].format(int(torch.randint(1000, (1,), generator=g)))
        out[name] = t
    chunk = torch.randint(0, 256, (4, 6, 8), dtype=torch.uint8, generator=g)
    out.update({f"experts.{e}.weight": chunk[e, 1:5] for e in range(4)})  # views of one storage
    return out


def _reference(tensors: dict[str, torch.Tensor], path: Path, metadata) -> bytes:
    save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata=metadata)
    canonical_metadata_order(path)
    return path.read_bytes()


@pytest.mark.parametrize("seed", range(4))
def test_byte_identical_to_safetensors_save_file(tmp_path, seed):
    tensors = _random_tensors(seed)
    for metadata in (None, {"format": "pt"}, {"producer": "quantship", "format": "pt", "b": "é"}):
        write_file(tensors, tmp_path / "ours.safetensors", metadata)
        ours = (tmp_path / "ours.safetensors").read_bytes()
        assert ours == _reference(tensors, tmp_path / "ref.safetensors", metadata), metadata
        loaded = load_file(tmp_path / "ours.safetensors")
        for k, v in tensors.items():
            assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
            assert torch.equal(loaded[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))


def test_short_writes_and_many_buffers_are_resumed(tmp_path, monkeypatch):
    """More tensors than one writev takes (1024), each call cut short at an odd byte count."""
    tensors = {f"t{i:05d}": torch.full((i % 7 + 1,), i, dtype=torch.int32) for i in range(2500)}
    tensors["big"] = torch.arange(30000, dtype=torch.float32)
    real, calls = os.pwritev, []

    def short_pwritev(fd, buffers, offset):
        calls.append(len(buffers))
        assert len(buffers) <= 1024
        head = bytearray()
        for b in buffers:
            head += bytes(b[: 997 - len(head)])
            if len(head) == 997:
                break
        return real(fd, [head], offset)

    monkeypatch.setattr(safetensors_raw.os, "pwritev", short_pwritev)
    write_file(tensors, tmp_path / "ours.safetensors", {"format": "pt"})
    monkeypatch.undo()
    assert len(calls) > 3
    assert (tmp_path / "ours.safetensors").read_bytes() == _reference(tensors, tmp_path / "ref.safetensors", {"format": "pt"})


def test_writes_overlap_the_caller_and_at_most_two_shards_are_held(tmp_path, monkeypatch):
    """While shard 0 is being written the caller fills shard 1; it waits before handing over
    shard 2 until shard 0 is on disk. Files equal the synchronous save_file's."""
    release, started, live, most = threading.Event(), threading.Event(), [0], [0]
    real = shards.write_safetensors

    def slow_write(tensors, path, metadata=None):
        live[0] += 1
        most[0] = max(most[0], live[0])
        started.set()
        release.wait(10)
        real(tensors, path, metadata)
        live[0] -= 1

    monkeypatch.setattr(shards, "write_safetensors", slow_write)
    writer = shards.ShardWriter(tmp_path, max_shard_bytes=64)
    parts = [{f"s{s}.t{i}": torch.full((4,), 10 * s + i, dtype=torch.float32) for i in range(4)} for s in range(3)]
    for name, t in parts[0].items():
        writer.add(name, t)
    writer.add("s1.t0", parts[1]["s1.t0"])  # shard 0 is full: handed to the writer thread
    assert started.wait(10)
    for name, t in list(parts[1].items())[1:]:
        writer.add(name, t)  # returns while shard 0 is still being written
    assert live[0] == 1
    blocked = threading.Timer(0.2, release.set)
    blocked.start()
    t0 = time.perf_counter()
    writer.add("s2.t0", parts[2]["s2.t0"])  # shard 1 must wait for shard 0
    assert time.perf_counter() - t0 > 0.1
    for name, t in list(parts[2].items())[1:]:
        writer.add(name, t)
    names = writer.close()
    assert most[0] == 1 and len(names) == 3
    for part, name in zip(parts, names, strict=True):
        assert (tmp_path / name).read_bytes() == _reference(part, tmp_path / "ref.safetensors", {"format": "pt"})


def test_a_failure_while_a_shard_is_written_leaves_nothing(tmp_path, monkeypatch):
    """The export fails in the caller while the writer thread is mid-file: the temp dir is
    removed only after that write ends, so no late file recreates it."""
    real = shards.write_safetensors

    def slow_write(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        time.sleep(0.3)
        real(tensors, path, metadata)

    monkeypatch.setattr(shards, "write_safetensors", slow_write)
    with pytest.raises(RuntimeError, match="caller failed"), shards.atomic_export_dir(tmp_path / "out", False) as tmp:
        writer = shards.ShardWriter(tmp, max_shard_bytes=16)
        writer.add("a", torch.zeros(4))
        writer.add("b", torch.zeros(4))  # shard 0 goes to the writer thread
        raise RuntimeError("caller failed")
    time.sleep(0.4)
    assert list(tmp_path.iterdir()) == []


def test_a_write_error_surfaces_in_the_caller_as_one_line(tmp_path, monkeypatch):
    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(28, os.strerror(28), str(path))

    monkeypatch.setattr(shards, "write_safetensors", full_disk)
    with pytest.raises(QuantshipError, match="^no space left on the device while writing"), \
            shards.atomic_export_dir(tmp_path / "out", False) as tmp:
        writer = shards.ShardWriter(tmp, max_shard_bytes=16)
        for i in range(4):
            writer.add(f"t{i}", torch.zeros(4))
        writer.close()
    assert list(tmp_path.iterdir()) == []
