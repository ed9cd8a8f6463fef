"""Kill -9 a streaming run after a layer, rerun the same command: it continues from the journal
and the export is byte-identical to an uninterrupted run's (which equals the in-memory path's,
tests/streaming/test_equivalence.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from quantship.streaming import stream_quantize
from quantship.streaming.journal import WORKDIR_PREFIX
from quantship.streaming.layerwise import KILL_ENV

from .helpers import assert_same_files, calib_batches
from tiny_models import VOCAB, save_tiny_model

RUNNER = Path(__file__).with_name("run_stream.py")


def _run(src: Path, out: Path, max_shard: int, kill_after: int | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(KILL_ENV, None)
    if kill_after is not None:
        env[KILL_ENV] = str(kill_after)
    return subprocess.run([sys.executable, str(RUNNER), str(src), str(out), str(VOCAB), str(max_shard)],
                          env=env, capture_output=True, text=True, timeout=300)


def _stream(src: Path, out: Path, max_shard: int) -> Path:
    """The same command in this process (what run_stream.py does)."""
    return stream_quantize(src, "nvfp4", calib_batches(VOCAB), out, kv_cache="fp8", moe_min_tokens=12,
                           device="cpu", max_shard_bytes=max_shard, progress=False)


@pytest.mark.parametrize(("kind", "kill_after", "max_shard"), [
    # one shard: finished layers wait in pending files, the resumed run writes them
    ("deepseek_v3", 1, 5 * 1024**3),
    # small shards: finished layers are closed shard files already
    ("qwen3_moe", 0, 30_000),
])
def test_kill_and_resume_is_byte_identical(tmp_path, kind, kill_after, max_shard):
    src = save_tiny_model(kind, tmp_path / "src")
    reference = _stream(src, tmp_path / "reference", max_shard)

    out = tmp_path / "out"
    killed = _run(src, out, max_shard, kill_after)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    work = tmp_path / f"{WORKDIR_PREFIX}out"
    journal = json.loads((work / "journal.json").read_text())
    assert not out.exists()
    assert journal["next_layer"] == kill_after + 1 and journal["coverage"]
    assert (work / "acts" / f"L{kill_after + 1:05d}").is_dir()  # the next layer's inputs
    if max_shard < 1024**2:
        assert journal["writer"]["shards"]  # closed shard files survive the kill
    else:
        assert journal["pending"] and not journal["writer"]["shards"]
        # embeddings and lm_head are read from the source again, not stored twice
        assert journal["pending"][0]["file"] is None and all(e["file"] for e in journal["pending"][1:])

    resumed = _stream(src, out, max_shard)  # the same command again
    assert_same_files(reference, resumed)
    assert not work.exists()


class _Killed(Exception):
    pass


def test_a_different_command_starts_over(tmp_path, monkeypatch):
    """A journal left by another command (here: another shard size) is not resumed. (The kill
    is simulated in-process: the hook's os.kill raises instead.)"""
    import quantship.streaming.layerwise as layerwise

    src = save_tiny_model("llama", tmp_path / "src")

    def kill(pid, sig):
        raise _Killed

    monkeypatch.setenv(KILL_ENV, "0")
    monkeypatch.setattr(layerwise.os, "kill", kill)
    with pytest.raises(_Killed):
        _stream(src, tmp_path / "out", 30_000)
    assert json.loads((tmp_path / f"{WORKDIR_PREFIX}out" / "journal.json").read_text())["next_layer"] == 1
    monkeypatch.delenv(KILL_ENV)
    out = _stream(src, tmp_path / "out", 5 * 1024**3)
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert_same_files(_stream(src, tmp_path / "reference", 5 * 1024**3), out)
