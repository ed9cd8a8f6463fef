"""Streaming's publish swaps the finished export in with `export.shards.swap_into_place`: killed
between the two renames of its fallback, the previous export comes back on the next run, and
the next run still publishes the uninterrupted run's bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quantship.export import shards
from quantship.streaming import stream_quantize
from quantship.streaming.journal import WORKDIR_PREFIX

from .helpers import assert_same_files, calib_batches
from tiny_models import VOCAB, save_tiny_model


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (not an Exception, so nothing catches it)."""


def _stream(src: Path, out: Path, overwrite: bool) -> Path:
    return stream_quantize(src, "nvfp4", calib_batches(VOCAB), out, kv_cache="fp8", moe_min_tokens=12,
                           device="cpu", overwrite=overwrite, progress=False)


def test_kill_between_fallback_renames_keeps_previous_export(tmp_path, monkeypatch):
    src = save_tiny_model("qwen3_moe", tmp_path / "src")
    reference = _stream(src, tmp_path / "reference", overwrite=False)

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous export")
    (out / "config.json").write_text('{"previous": true}')

    class _Os:  # shards' os module; dies right after the swap's first rename
        def __getattr__(self, attr):
            return getattr(os, attr)

        @staticmethod
        def replace(a, b):
            os.replace(a, b)
            if Path(b).name.startswith(f"{shards.TEMP_PREFIX}old-"):
                raise _Killed

    with monkeypatch.context() as m:
        m.setattr(shards, "_exchange", lambda a, b: False)  # force the two-rename fallback
        m.setattr(shards, "os", _Os())
        with pytest.raises(_Killed):
            _stream(src, out, overwrite=True)
    assert not out.exists()  # killed between the renames: the previous export is only aside
    assert [p.name for p in tmp_path.glob(f"{shards.TEMP_PREFIX}old-*")] == [f"{shards.TEMP_PREFIX}old-{os.getpid()}-out"]

    shards.check_target(out, overwrite=True)  # what the next run does first: the previous export is back
    assert (out / "model.safetensors").read_bytes() == b"previous export"
    assert (out / "config.json").read_text() == '{"previous": true}'
    assert not list(tmp_path.glob(f"{shards.TEMP_PREFIX}*"))

    _stream(src, out, overwrite=True)  # the same command again, normal swap path
    assert_same_files(out, reference)
    assert not list(tmp_path.glob(f"{shards.TEMP_PREFIX}*"))
    assert not (tmp_path / f"{WORKDIR_PREFIX}out").exists()
