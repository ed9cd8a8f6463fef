"""What a streaming run keeps on disk so that, after a kill, the same command continues from
the last finished layer and writes the same bytes as an uninterrupted run.

Next to the target, in `.quantship-stream-<target name>/`:
- `journal.json`: the command's fingerprint (source shards, recipe, calibration tokens, ...),
  the next layer to run, the shard writer's state, the per-expert coverage and quantized-target
  list the report needs. Replaced atomically after each layer.
- `export/`: the checkpoint being built; finished shards are closed files there.
- `pending/<section>.safetensors`: a finished layer's tensors that share a not-yet-full shard
  with the next layers (only for layers smaller than a shard; see `export.sections`). Those of
  the section outside the layers (embeddings, lm_head) are not stored: a resumed run reads them
  from the source again, as it must anyway.
- `acts/L<k>/b<j>.safetensors`: the hidden states entering layer k, per calibration batch j.
A journal for a different command is discarded; once the export is in place the folder goes.
Before the finished export is moved into place, the journal records its files (`published`: name ->
size, mtime, inode, which a rename keeps): a run killed after the move but before the folder went
finds the target holding exactly those files and only removes the folder (`WorkDir.holds_published`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantship.export.shards import save_tensors
from quantship.streaming.distributed import Ranks

WORKDIR_PREFIX = ".quantship-stream-"
FORMAT = 1


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def batches_digest(batches: list[dict[str, torch.Tensor]]) -> str:
    """The calibration tokens themselves: dataset, tokenizer, sizes and seed in one value."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            t = batch[key].detach().cpu().contiguous()
            h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass
class JournalState:
    fingerprint: str
    format: int = FORMAT
    outside_done: bool = False
    next_layer: int = 0
    extras_done: int = 0  # sections of source tensors outside the model class (sources.extras)
    writer: dict = field(default_factory=lambda: {"shards": [], "total_bytes": 0})
    pending: list[dict] = field(default_factory=list)  # [{"file", "names"}] in section order
    coverage: dict = field(default_factory=dict)  # block -> {"tokens": [...], "min_tokens": n}
    mtp: dict = field(default_factory=dict)  # the quantized MTP layer's report once written (sources.mtp)
    targets: list = field(default_factory=list)  # [key, role, fused_experts, shape]
    gptq: dict = field(default_factory=dict)  # --algorithm gptq: {"targets": {key: result}, "seconds": {layer: ...}}
    tokens_seen: int = 0
    published: dict = field(default_factory=dict)  # the finished export's files, recorded before publish


class WorkDir:
    """The streaming run's folder beside the target (see the module docstring)."""

    def __init__(self, target: Path, ranks: Ranks):
        self.target = Path(target)
        self.ranks = ranks
        parent = self.target.parent if str(self.target.parent) else Path(".")
        self.root = parent / f"{WORKDIR_PREFIX}{self.target.name}"
        self.staging = self.root / "export"
        self.journal = self.root / "journal.json"

    def open(self, fingerprint: str) -> tuple[JournalState, bool]:
        """(state, resumed): the journal of an earlier run of this command, else a fresh one."""
        resumed = False
        if self.ranks.is_main:
            state = self._read()
            # Published (the staging folder moved away) into a target changed or removed since: start over.
            gone = state is not None and state.published and not self.staging.is_dir() and not self.holds_published(state)
            if state is not None and state.fingerprint == fingerprint and state.format == FORMAT and not gone:
                resumed = True
            else:
                if self.root.exists():
                    shutil.rmtree(self.root)
                state = JournalState(fingerprint)
                self.staging.mkdir(parents=True)
                self.save(state)
        self.ranks.barrier()
        state, resumed = self.ranks.broadcast((state if self.ranks.is_main else None, resumed))
        return state, resumed

    def _read(self) -> JournalState | None:
        try:
            data = json.loads(self.journal.read_text())
            return JournalState(**data)
        except (OSError, ValueError, TypeError):
            return None

    def save(self, state: JournalState) -> None:
        """Replace the journal atomically (rank 0)."""
        if not self.ranks.is_main:
            return
        tmp = self.journal.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.journal)

    # --- activations -------------------------------------------------------------------
    def acts_dir(self, layer: int) -> Path:
        return self.root / "acts" / f"L{layer:05d}"

    def save_activation(self, layer: int, batch: int, hidden: torch.Tensor, stream: str = "b") -> None:
        """`stream` "b": the unquantized layers' outputs (calibration); "q": with GPTQ's weights."""
        d = self.acts_dir(layer)
        d.mkdir(parents=True, exist_ok=True)
        save_file({"hidden": hidden.detach().cpu().contiguous()}, str(d / f"{stream}{batch:05d}.safetensors"))

    def load_activation(self, layer: int, batch: int, device: torch.device | str, stream: str = "b") -> torch.Tensor:
        return load_file(str(self.acts_dir(layer) / f"{stream}{batch:05d}.safetensors"), device=str(device))["hidden"]

    def drop_activations(self, before: int) -> None:
        """Remove activation folders of layers before `before` (rank 0)."""
        if self.ranks.is_main and (self.root / "acts").is_dir():
            for d in (self.root / "acts").iterdir():
                if d.name.startswith("L") and int(d.name[1:]) < before:
                    shutil.rmtree(d, ignore_errors=True)

    # --- tensors of a shard not yet full -------------------------------------------------
    def save_pending(self, section_index: int, tensors: dict[str, torch.Tensor]) -> dict:
        (self.root / "pending").mkdir(exist_ok=True)
        rel = f"pending/{section_index:05d}.safetensors"
        save_tensors(tensors, self.root / rel, {"format": "pt"})  # the writer's views of shared chunks too
        return {"file": rel, "names": list(tensors)}

    def load_pending(self, entries: list[dict], outside: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The pending tensors in their order; `outside()` remakes those of the section outside
        the layers (entries without a file) from the source."""
        out: dict[str, torch.Tensor] = {}
        for entry in entries:
            loaded = outside() if entry["file"] is None else load_file(str(self.root / entry["file"]))
            out.update((n, loaded[n]) for n in entry["names"])
        return out

    def drop_pending(self, keep: list[dict]) -> None:
        kept = {e["file"] for e in keep}
        d = self.root / "pending"
        if self.ranks.is_main and d.is_dir():
            for f in d.iterdir():
                if f"pending/{f.name}" not in kept:
                    f.unlink(missing_ok=True)

    def holds_published(self, state: JournalState | None = None) -> bool:
        """Whether the target is the finished export of this journal (`state`, else the one on
        disk), already moved into place."""
        state = self._read() if state is None else state
        return state is not None and bool(state.published) and listing(self.target) == state.published

    def remove(self) -> None:
        if self.ranks.is_main:
            shutil.rmtree(self.root, ignore_errors=True)


def listing(folder: Path) -> dict[str, list[int]]:
    """{file name: [size, mtime_ns, inode]} of a folder's files ({} if it is not a folder)."""
    if not folder.is_dir():
        return {}
    out = {}
    for f in sorted(folder.iterdir()):
        st = f.stat()
        out[f.name] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


def publish(staging: Path, target: Path, overwrite: bool) -> None:
    """Move the finished export into place, replacing an existing one only with overwrite.

    The swap is `export.shards.swap_into_place`: a kill during it never loses the previous
    export (the next run's `check_target` puts a moved-aside one back).
    """
    from quantship.errors import QuantshipError
    from quantship.export.shards import swap_into_place

    if target.exists() and not overwrite:
        raise QuantshipError(f"export path {target} appeared during the export; rerun with --overwrite")
    swap_into_place(staging, target)
