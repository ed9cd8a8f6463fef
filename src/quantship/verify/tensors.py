"""The checkpoint's tensors from safetensors headers only, and the index's consistency.

Nothing here reads tensor data: `safe_open` maps the file and `get_slice` reports dtype and shape
from the header, so a multi-terabyte checkpoint is listed in seconds. `load` reads the few
tensors asked for (scales), one file open at a time.
"""

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from quantship.verify.result import Finding

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str  # safetensors code: "U8", "F8_E4M3", "F32", ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _weight_map(root: Path, findings: list[Finding]) -> dict[str, str] | None:
    try:
        weight_map = json.loads((root / INDEX).read_text())["weight_map"]
        if isinstance(weight_map, dict):
            return weight_map
    except (OSError, ValueError, KeyError, TypeError):
        pass
    findings.append(Finding(INDEX, "unreadable or has no weight_map; re-export the checkpoint"))
    return None


def _read_header(path: Path) -> dict[str, TensorInfo]:
    with safe_open(path, framework="pt") as f:
        out = {}
        for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            s = f.get_slice(name)
            out[name] = TensorInfo(path.name, s.get_dtype(), tuple(s.get_shape()))
        return out


def read_headers(root: Path) -> tuple[dict[str, TensorInfo], list[Finding]]:
    """All tensors by name, and findings about missing/unreadable files and the index."""
    findings: list[Finding] = []
    weight_map = _weight_map(root, findings) if (root / INDEX).is_file() else None
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
    elif (root / SINGLE).is_file():
        files = [SINGLE]
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
        problem = "missing, and no model.safetensors.index.json to name the shards"
        findings.append(Finding(SINGLE, problem if files else "no safetensors weights in the checkpoint"))

    infos: dict[str, TensorInfo] = {}
    readable: dict[str, set[str]] = {}
    for file in files:
        path = root / file
        if not path.is_file():
            n = sum(1 for f in (weight_map or {}).values() if f == file)
            findings.append(Finding(file, f"listed in {INDEX} for {n} tensors but missing"))
            continue
        try:
            header = _read_header(path)
        except Exception as e:  # safetensors raises its own error types for bad headers
            findings.append(Finding(file, f"unreadable safetensors file ({e})"))
            continue
        readable[file] = set(header)
        for name, info in header.items():
            if name in infos:
                findings.append(Finding(name, f"stored twice, in {infos[name].file} and {file}"))
            infos[name] = info

    if weight_map is not None:
        for name, file in weight_map.items():
            if file in readable and name not in readable[file]:
                findings.append(Finding(name, f"{INDEX} places it in {file}, which does not contain it"))
        for name, info in infos.items():
            listed = weight_map.get(name)
            if listed is None:
                findings.append(Finding(name, f"in {info.file} but not listed in {INDEX}"))
            elif listed != info.file:
                findings.append(Finding(name, f"in {info.file} but {INDEX} places it in {listed}"))
    return infos, findings


def load(
    root: Path, infos: dict[str, TensorInfo], names: Iterable[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Read the named tensors fully, grouped so that each file is opened once."""
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(infos[name].file, []).append(name)
    for file, file_names in by_file.items():
        with safe_open(root / file, framework="pt") as f:
            for name in file_names:
                yield name, f.get_tensor(name)
