"""Streaming sharded safetensors writer, and the write-to-temp-then-rename export directory.

Tensors are appended one at a time and a shard is handed to a background writer thread once it
reaches its size limit, so an export holds at most two shards in memory (one being written, one
being filled) and produces the next shard while the disk writes the last. The whole export is
built in a temporary sibling directory and swapped into place at the end: the target path either
holds the previous content or a complete checkpoint, never a partial one, whenever the process dies.

Temporary siblings are named `.quantship-tmp-<kind>-<pid>-<target>...` and carry an flock held
by the exporting process for as long as they are in use. The next export into the same parent
(or `check_target`) removes the ones nobody holds, and puts back a previous export that a killed
`--overwrite` had moved aside, so a pid reused after a crash (pid 1 in a restarted container)
cannot keep them alive and a killed swap cannot lose the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantship.errors import QuantshipError
from quantship.export import safetensors_raw
from quantship.export.safetensors_raw import write_file as write_safetensors

TEMP_PREFIX = ".quantship-tmp-"
# Kinds of temporary sibling: "init" exists only between mkdtemp and taking its lock, "new" is
# the export being built, "old" a previous export moved aside during an --overwrite swap.
_INIT, _NEW, _OLD = "init", "new", "old"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write one shard file, with I/O failures raised as OSError.

    `write_safetensors` where it can (the same bytes as safetensors' `save_file`, see
    `safetensors_raw`), else `save_file` with its metadata then put in canonical order.
    safetensors reports a full disk as `SafetensorError("... I/O error: No space left on device
    (os error 28)")`, which is not an OSError; callers need the errno to explain it.
    """
    try:
        if safetensors_raw.supported(tensors):
            write_safetensors(tensors, path, metadata)
        else:
            # safetensors refuses tensors sharing memory (rows of one quantized chunk): own copies.
            save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata=metadata)
            safetensors_raw.canonical_metadata_order(path)
    except OSError:
        raise
    except Exception as e:
        found = re.search(r"\(os error (\d+)\)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e


save_tensors = _save  # for other writers of safetensors files (the streaming journal)


class _ShardJob:
    """One shard written by a background thread; `result()` joins it and re-raises its error."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(tensors, path, metadata),
                                       name=f"quantship-shard-{path.name}", daemon=False)
        self.thread.start()

    def _run(self, tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
        try:
            _save(tensors, path, metadata)
        except BaseException as e:  # handed to the main thread by result()
            self.error = e

    def result(self) -> None:
        self.thread.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error


# Writers with a shard in flight, so that `atomic_export_dir` can wait for them before it
# deletes its temp dir after a failure (a late write would recreate a file in it).
_LIVE: weakref.WeakSet[ShardWriter] = weakref.WeakSet()


class ShardWriter:
    """Appends tensors to `model-XXXXX-of-YYYYY.safetensors` files and writes the index.

    A full shard is written by a background thread while the caller goes on producing the next
    one (quantizing on the GPU, copying to the host): at most two shards are held, the one being
    written and the one being filled. A write error (a full disk) is raised in the caller's
    thread by the next `add`/`close`/`wait`, as the same OSError. Tensors given to `add` are
    written from their own memory, not copied (unless they are on another device or not
    contiguous): they must not be modified in place before `close()` (or `wait()`) returns.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = 5 * 1024**3, metadata: dict[str, str] | None = None):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._seen: set[str] = set()
        self._job: _ShardJob | None = None
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name} written twice")
        self._seen.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # Contiguous CPU memory, copied only where needed: a tensor copied off the GPU (or a view
        # of one, as the quantized chunks' per-expert rows are) is written from where it lies.
        if tensor.requires_grad:
            tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu")
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        self.wait()  # the previous shard is on disk before this one goes: two shards held at most
        path = self.directory / f"shard-{len(self._shards):05d}.partial"
        self._shards.append(list(self._pending))
        tensors, self._pending, self._pending_bytes = self._pending, {}, 0
        self._job = _ShardJob(tensors, path, self.metadata)
        _LIVE.add(self)

    def wait(self) -> None:
        """Block until every shard handed to the background writer is on disk; raise its error."""
        job, self._job = self._job, None
        _LIVE.discard(self)
        if job is not None:
            job.result()

    def close(self) -> list[str]:
        """Flush, give shards their final names, write the index; returns the file names."""
        self._flush()
        self.wait()
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
    """Refuse an existing target without --overwrite, and an unwritable parent, before any work.

    First tidies what a killed export left beside the target (see `clean_stale_temps`), so a
    previous export that a killed swap had moved aside is back in place before it is judged.
    """
    target = Path(target)
    parent = _parent(target)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantshipError(f"export path {target} is not writable ({e.strerror}); choose a writable directory") from None
    if not os.access(parent, os.W_OK):
        raise QuantshipError(f"export path {target} is not writable; choose a writable directory")
    clean_stale_temps(parent)
    if target.exists() and not overwrite:
        raise QuantshipError(f"export path {target} already exists; choose another path or pass --overwrite")


def _parent(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


def _parse(name: str) -> tuple[str, int | None, str]:
    """(kind, pid, target name) of a temporary sibling's file name; kind "" if not ours."""
    found = re.fullmatch(rf"{re.escape(TEMP_PREFIX)}(init|new|old)-(\d+)-(.+)", name)
    if found is None:  # an older quantship's `.quantship-tmp-<target>-<random>-<pid>`
        pid = name.rsplit("-", 1)[-1]
        return "", int(pid) if pid.isdigit() else None, ""
    kind, pid, rest = found.groups()
    return kind, int(pid), rest


def clean_stale_temps(parent: Path) -> None:
    """Remove temp dirs left by a killed earlier export into the same parent; put back a
    previous export that a killed --overwrite had moved aside and not yet replaced."""
    for stale in sorted(Path(parent).glob(f"{TEMP_PREFIX}*")):
        kind, pid, target_name = _parse(stale.name)
        if _in_use(stale, kind, pid):
            continue
        target = stale.with_name(target_name) if kind == _OLD else None
        if target is not None and not os.path.lexists(target):
            # The swap died between its two renames: the previous export goes back. Should that
            # fail, it stays where it is rather than being deleted.
            with contextlib.suppress(OSError):
                os.replace(stale, target)
            continue
        _remove(stale)


def _remove(path: Path) -> None:
    """Delete a directory tree, or a file that an --overwrite swapped out."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _in_use(path: Path, kind: str, pid: int | None) -> bool:
    """Whether a live export holds `path`: its flock; the pid where there is no lock yet ("init",
    an older quantship) or the filesystem has no flock (some network filesystems)."""
    if kind in ("", _INIT):
        return pid is not None and _alive(pid)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return pid is not None and _alive(pid)
    finally:
        os.close(fd)  # also drops the probe's lock
    return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _lock(path: Path) -> int:
    """Hold an flock on a directory until the returned fd is closed (or the process dies)."""
    fd = os.open(path, os.O_RDONLY)
    # Held by someone else, or no flock on this filesystem: the pid in the name names the owner.
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE).

    False where the kernel, libc or filesystem cannot; the caller then renames in two steps.
    """
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the finished `tmp` at `target`, replacing a previous export there."""
    if not target.exists():
        os.replace(tmp, target)
        return
    if _exchange(tmp, target):  # target now complete; tmp holds the previous export
        _remove(tmp)
        return
    # Two renames: if killed between them, clean_stale_temps puts the "old" dir back.
    old = target.with_name(f"{TEMP_PREFIX}{_OLD}-{os.getpid()}-{target.name}")
    old_lock = _lock(target) if target.is_dir() else None
    try:
        os.replace(target, old)
        os.replace(tmp, target)
        _remove(old)
    finally:
        if old_lock is not None:
            os.close(old_lock)


def swap_into_place(finished: Path, target: Path) -> None:
    """Move the finished export folder `finished` to `target`, replacing a previous export there.

    Kill-safe, as `atomic_export_dir`'s own swap (the same code): one atomic exchange where the
    filesystem allows, else two renames with the previous export moved aside under a locked
    `.quantship-tmp-old-...` name that `clean_stale_temps` (run by `check_target`) puts back if
    the process dies between them. `finished` must be on the target's filesystem; the caller
    decides whether replacing is allowed.
    """
    _swap_in(Path(finished), Path(target))


def _settle_writers(directory: Path) -> None:
    """Wait for shards still being written into `directory` (the export failed before its
    writer's `close`), so that no late write recreates a file after the directory is removed.
    Their errors are dropped: the export's own error is already on its way."""
    where = os.path.abspath(directory)
    for writer in list(_LIVE):
        if os.path.abspath(writer.directory) == where:
            with contextlib.suppress(Exception):
                writer.wait()


@contextlib.contextmanager
def atomic_export_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temp dir beside `target`; on success swap it into place, on failure delete it.

    A full disk (ENOSPC, EDQUOT) while writing is raised as a one-line `QuantshipError`.
    """
    target = Path(target)
    check_target(target, overwrite)
    parent = _parent(target)
    pid = os.getpid()
    init = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{_INIT}-{pid}-{target.name}-", dir=parent))
    lock = _lock(init)
    tmp = init.with_name(init.name.replace(f"{TEMP_PREFIX}{_INIT}-", f"{TEMP_PREFIX}{_NEW}-", 1))
    try:
        os.replace(init, tmp)  # only now, locked, may a cleaner judge it by its lock
        try:
            yield tmp
        except OSError as e:
            if e.errno in _NO_SPACE:
                raise QuantshipError(
                    f"no space left on the device while writing {target} ({e.strerror}); "
                    "free space or export elsewhere (nothing was written to the target)"
                ) from None
            raise
        if target.exists() and not overwrite:  # appeared while we worked
            raise QuantshipError(f"export path {target} appeared during the export; rerun with --overwrite")
        _swap_in(tmp, target)
    finally:
        _settle_writers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once swapped in
        shutil.rmtree(init, ignore_errors=True)
        os.close(lock)
