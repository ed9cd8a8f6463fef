"""A safetensors file written straight from CPU tensors' memory, byte for byte what
`safetensors.torch.save_file` writes (with the metadata keys sorted, see `canonical_metadata_order`).

Why: an MoE export has ~12k small tensors per checkpoint, and `save_file` spends ~60 us on each
(sharing and contiguity checks, a numpy array per tensor) before its Rust writer starts, all while
holding the GIL. Here the header is built in one pass and the data goes out with `os.writev`
(up to 1024 tensors per system call, no copy), which also releases the GIL, so the export's main
thread keeps quantizing while a shard is written (`quantship.export.shards.ShardWriter`).

Layout (safetensors 0.4-0.8, `safetensors::tensor::prepare`): an 8-byte little-endian header
length; a compact JSON header, `__metadata__` first, then the tensors sorted by dtype (largest
safetensors `Dtype` first) then by name, padded with spaces to a multiple of 8 bytes; then the
tensors' bytes in that order. Tensors sharing memory are fine here (safetensors refuses them).
Dtypes not in `DTYPES` (e.g. torch's packed float4) are left to `save_file` by the caller.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import torch

# safetensors' Dtype names in the order of its Rust enum (the sort key of its file layout).
DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
    torch.complex64: "C64", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}
_RANK = {dtype: i for i, dtype in enumerate(DTYPES)}
_IOV_MAX = 1024  # Linux's limit on buffers per writev
_MAX_CALL_BYTES = 1 << 30  # Linux writes at most ~2 GiB per call; stay well under


def supported(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether `write_file` can write these: CPU, contiguous, a dtype in `DTYPES`, an OS with pwritev."""
    return hasattr(os, "pwritev") and all(t.dtype in _RANK and t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())


def layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """(the 8-byte length plus the padded header, the tensor names in file order)."""
    order = sorted(tensors, key=lambda k: (-_RANK[tensors[k].dtype], k))
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    # serde_json's compact form; non-ASCII names stay UTF-8 as serde writes them.
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The tensor's memory as bytes, without a copy (the tensor must stay alive while in use)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _pwritev_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Write the buffers back to back from `offset`, a batch per system call, resuming after
    short writes (Linux writes at most ~2 GiB per call)."""
    i, n = 0, len(buffers)
    while i < n:
        j, size = i, 0
        while j < n and j - i < _IOV_MAX and (j == i or size + len(buffers[j]) <= _MAX_CALL_BYTES):
            size += len(buffers[j])
            j += 1
        written = os.pwritev(fd, buffers[i:j], offset)
        if written <= 0 < size:  # a regular file raises rather than writing nothing; never spin
            raise OSError(errno.EIO, "write made no progress", str(fd))
        offset += written
        while i < j and written >= len(buffers[i]):
            written -= len(buffers[i])
            i += 1
        if written:  # a buffer written in part: resume from where it stopped
            buffers[i] = buffers[i][written:]


def write_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (see `supported`) as the safetensors file `path`; raises OSError on I/O errors.

    One thread: Linux takes a file's inode lock for each buffered write, so writers at disjoint
    offsets of one file take turns (measured on ext4: 1, 2 and 4 threads all ~3 GB/s)."""
    head, order = layout(tensors, metadata)
    buffers = [memoryview(head)]
    buffers += [_bytes_of(tensors[n]) for n in order if tensors[n].numel()]
    with open(path, "wb", buffering=0) as f:
        _pwritev_all(f.fileno(), buffers, 0)


def canonical_metadata_order(path: Path) -> None:
    """Rewrite a safetensors header in place with its `__metadata__` keys sorted.

    safetensors keeps the metadata in a Rust HashMap, whose iteration order is seeded per
    process: with two keys ("format", "producer") the same tensors make different files in two
    runs. The tensor entries are already in a fixed order, so sorting the metadata makes a shard
    a function of its tensors; the header keeps its length, only those bytes are rewritten.
    `write_file` writes this order to begin with; this is for files `save_file` wrote.
    """
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not meta or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()  # UTF-8, as serde
        if len(new) != len(raw.rstrip(b" ")):  # a layout this function does not know: leave it
            return
        f.seek(8)
        f.write(new)
