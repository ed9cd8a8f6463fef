"""A full disk is one line and exit 2 with nothing left behind; stale temp dirs are judged by
their lock, not by a pid that a restarted container may reuse."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

import pytest
from safetensors import SafetensorError

import quantship.export.shards as shards
from quantship.cli import main

from tiny_models import save_tiny_model

ENOSPC_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_dir) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama") / "model", tokenizer_dir=smollm2_dir)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text("\n\n".join(f"Line {i}: a plain sentence to calibrate on. " * 6 for i in range(10)))
    return p


def _quantize(tiny_llama, text_file, target, *extra) -> int:
    return main(["quantize", "--model", str(tiny_llama), "--dataset", str(text_file), "--export", str(target),
                 "--calib-size", "1", "--calib-seq-len", "16", "--no-progress", *extra])


def _fail_writes(monkeypatch, where: str, error: BaseException) -> None:
    """Make the export's writer fail as a full disk does, after writing part of its file."""
    if where == "shard":
        def write_safetensors(tensors, path, metadata=None):
            Path(path).write_bytes(b"\x00" * 1000)  # what a disk filling up mid-write leaves
            raise error

        monkeypatch.setattr(shards, "write_safetensors", write_safetensors)
    else:  # config.json, after every shard is written
        real = Path.write_text

        def write_text(self, data, *args, **kwargs):
            if self.name == "config.json" and shards.TEMP_PREFIX in str(self.parent):
                real(self, data[: len(data) // 2], *args, **kwargs)
                raise error
            return real(self, data, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)


@pytest.fixture(scope="module")
def previous_export(tiny_llama, text_file, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("prev") / "out"
    assert _quantize(tiny_llama, text_file, target, "--qformat", "fp8") == 0
    return target


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    ("where", "error", "overwrite"),
    [
        ("shard", SafetensorError(ENOSPC_TEXT), False),  # what safetensors itself raises on a full disk
        ("shard", SafetensorError(ENOSPC_TEXT), True),
        ("shard", ENOSPC, False),
        ("config", ENOSPC, False),
        ("config", ENOSPC, True),
        ("shard", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), False),
    ],
    ids=["safetensors-error", "safetensors-error-overwrite", "shard-oserror", "config-oserror",
         "config-oserror-overwrite", "quota"],
)
def test_full_disk_is_one_line_and_leaves_nothing(tiny_llama, text_file, previous_export, tmp_path, capsys,
                                                 monkeypatch, where, error, overwrite):
    target = tmp_path / "out"
    previous = None
    if overwrite:  # a complete earlier export, which must survive untouched
        shutil.copytree(previous_export, target)
        previous = {f.name: f.read_bytes() for f in target.iterdir()}
    capsys.readouterr()
    _fail_writes(monkeypatch, where, error)
    code = _quantize(tiny_llama, text_file, target, *(["--overwrite"] if overwrite else []))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]  # (transformers' load bar aside)
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"error: no space left on the device while writing {target} ("), err
    assert not list(tmp_path.glob(f"{shards.TEMP_PREFIX}*"))
    if overwrite:
        assert {f.name: f.read_bytes() for f in target.iterdir()} == previous
    else:
        assert not target.exists()


def test_other_safetensors_io_errors_become_oserror(tmp_path, monkeypatch):
    """Only errors carrying an OS errno are converted; the errno is kept for the caller."""
    def save_file(*_a, **_k):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(shards, "save_file", save_file)  # the fallback for dtypes the raw writer lacks
    writer = shards.ShardWriter(tmp_path, 10)
    writer.add("a", __import__("torch").zeros(4, dtype=__import__("torch").float4_e2m1fn_x2))  # not in safetensors_raw.DTYPES
    with pytest.raises(OSError) as info:
        writer.close()
    assert info.value.errno == errno.EFBIG


def _make(parent: Path, name: str, content: str = "x") -> Path:
    d = parent / name
    d.mkdir()
    (d / "model.safetensors").write_text(content)
    return d


def test_stale_temps_are_judged_by_their_lock_not_their_pid(tmp_path):
    """A killed export that ran as the pid we now have (pid 1 in a restarted container) left
    `unlocked`; a live export holds `locked`; `init` belongs to a live pid (ours) and has no
    lock yet; an older quantship's temp of a dead pid goes too."""
    pid = os.getpid()
    unlocked = _make(tmp_path, f"{shards.TEMP_PREFIX}new-{pid}-ckpt-abc")
    locked = _make(tmp_path, f"{shards.TEMP_PREFIX}new-{pid}-ckpt-def")
    init = _make(tmp_path, f"{shards.TEMP_PREFIX}init-{pid}-ckpt-ghi")
    legacy = _make(tmp_path, f"{shards.TEMP_PREFIX}ckpt-xyz-{2**22 + 12345}")
    fd = os.open(locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        shards.clean_stale_temps(tmp_path)
    finally:
        os.close(fd)
    assert not unlocked.exists() and not legacy.exists()
    assert locked.exists() and init.exists()


def test_a_previous_export_moved_aside_by_a_killed_swap_is_put_back(tmp_path):
    old = _make(tmp_path, f"{shards.TEMP_PREFIX}old-{os.getpid()}-ckpt", "previous")
    new = _make(tmp_path, f"{shards.TEMP_PREFIX}new-{os.getpid()}-ckpt-abc", "new, complete")
    with pytest.raises(Exception, match="already exists"):
        shards.check_target(tmp_path / "ckpt", overwrite=False)  # tidies first, then judges
    assert (tmp_path / "ckpt" / "model.safetensors").read_text() == "previous"
    assert not old.exists() and not new.exists()
    # When the new export had already been swapped in, the one aside is simply removed.
    _make(tmp_path, f"{shards.TEMP_PREFIX}old-{os.getpid()}-ckpt", "older")
    shards.clean_stale_temps(tmp_path)
    assert (tmp_path / "ckpt" / "model.safetensors").read_text() == "previous"
    assert not list(tmp_path.glob(f"{shards.TEMP_PREFIX}*"))
