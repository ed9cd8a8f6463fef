"""Kill -9 a streaming run right after it published the export, before its work folder went: the same
command again sees the target holds that finished export (the journal recorded its files before the
move) and only removes the work folder; another command refuses the target without --overwrite."""

from __future__ import annotations

import json
import signal

import pytest

from quantship.errors import QuantshipError
from quantship.streaming import stream_quantize
from quantship.streaming.journal import WORKDIR_PREFIX, listing

from .helpers import assert_same_files, calib_batches
from .test_resume import _run, _stream
from tiny_models import VOCAB, save_tiny_model

SHARD = 30_000  # several shards


def test_kill_after_publish_is_complete_not_resumed(tmp_path):
    src = save_tiny_model("qwen3_moe", tmp_path / "src")
    reference = _stream(src, tmp_path / "reference", SHARD)

    out = tmp_path / "out"
    killed = _run(src, out, SHARD, "publish")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    work = tmp_path / f"{WORKDIR_PREFIX}out"
    journal = json.loads((work / "journal.json").read_text())
    assert not (work / "export").exists()  # moved into place: the stale staging folder is gone
    assert journal["published"] == listing(out)
    assert_same_files(reference, out)
    published = listing(out)

    assert _stream(src, out, SHARD) == out  # the same command again, no --overwrite
    assert not work.exists()
    assert listing(out) == published  # the same files (inodes, times): nothing rewritten or replaced
    assert_same_files(reference, out)


def test_another_command_does_not_take_a_published_export(tmp_path):
    src = save_tiny_model("qwen3_moe", tmp_path / "src")
    out = tmp_path / "out"
    assert _run(src, out, SHARD, "publish").returncode == -signal.SIGKILL
    published = listing(out)
    with pytest.raises(QuantshipError, match="already exists"):
        _stream(src, out, 5 * 1024**3)  # another shard size: another command
    assert listing(out) == published
    assert not (tmp_path / f"{WORKDIR_PREFIX}out").exists()


def test_a_changed_published_export_is_not_taken_for_finished(tmp_path):
    """After the kill, someone edits the published export: the same command refuses it (no
    --overwrite), and with --overwrite starts over instead of resuming into the moved staging."""
    src = save_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "out"
    assert _run(src, out, SHARD, "publish").returncode == -signal.SIGKILL
    (out / "config.json").write_text("{}")
    with pytest.raises(QuantshipError, match="already exists"):
        _stream(src, out, SHARD)
    assert (out / "config.json").read_text() == "{}"
    stream_quantize(src, "nvfp4", calib_batches(VOCAB), out, kv_cache="fp8", moe_min_tokens=12, device="cpu",
                    max_shard_bytes=SHARD, progress=False, overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]
    assert not (tmp_path / f"{WORKDIR_PREFIX}out").exists()
