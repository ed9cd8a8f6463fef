"""kill -9 at any point of an export never leaves a partial checkpoint at the target.

Each trial forks the test process (the tiny model is already quantized, so a child starts in
milliseconds) and the child exports with 4 KiB shards, reporting each step it reaches through a
pipe: temp dir made, each shard written, finalizing (shard renames, index, configs, report), the
swap into place, removal of the previous export. The parent SIGKILLs it after a random delay
drawn inside a phase measured on an uninterrupted run, then checks the invariant:

- the target is absent, or byte-identical to a complete export: the new one, or with
  --overwrite the previous one (and, once the next run has tidied up, never absent then);
- the next export into the same folder removes every `.quantship-tmp-*` sibling and succeeds.

Every child sleeps 2 ms after each step so that the windows between steps (between the two
renames of a swap, say) are wide enough to be hit. A second test kills the child from inside at
each step, so every phase is covered whatever the timing.
"""

from __future__ import annotations

import collections
import json
import os
import random
import select
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch
import tqdm
from safetensors.torch import load_file

import quantship.export.shards as shards
from quantship.pipeline import quantize
from quantship.verify import verify_checkpoint

from tiny_models import build_tiny_model

MAX_SHARD_BYTES = 4096
STEP_SLEEP_S = 0.002
CHILD_TIMEOUT_S = 60
PHASES = ("before temp dir", "writing shards", "finalizing", "swapping in", "removing previous", "finished")
# The last step a child reported -> the phase it was killed in.
STEP_PHASE = {
    None: PHASES[0], "tmp": PHASES[1], "shard": PHASES[1], "finalize": PHASES[2], "swap": PHASES[3],
    "replace": PHASES[3], "exchange": PHASES[3], "remove": PHASES[4], "done": PHASES[5],
}


@pytest.fixture(scope="module")
def models():
    """(new, previous): the same tiny Llama quantized to NVFP4 and to FP8."""
    model = build_tiny_model("llama", seed=3)
    batches = [{"input_ids": torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))}]
    new = quantize(model, "nvfp4", batches, progress=False)
    prev = quantize(build_tiny_model("llama", seed=4), "fp8", batches, progress=False)
    return new, prev


@pytest.fixture(scope="module")
def references(models, tmp_path_factory):
    """Complete exports of both models, as `_snapshot`s (reports included)."""
    root = tmp_path_factory.mktemp("ref")
    out = {}
    for key, qm in zip(("new", "prev"), models, strict=True):
        qm.export(root / key, max_shard_bytes=MAX_SHARD_BYTES, progress=False)
        out[key] = _snapshot(root / key)
        assert len([f for f in out[key] if f.endswith(".safetensors")]) > 10  # many shard writes
    out["prev_dir"] = root / "prev"
    return out


def _snapshot(path: Path) -> dict[str, object]:
    """Every file's content; safetensors files as their tensors (safetensors orders the header's
    metadata differently from run to run, so their bytes are not comparable)."""
    out: dict[str, object] = {}
    for f in sorted(path.iterdir()):
        if f.suffix != ".safetensors":
            out[f.name] = f.read_bytes()
            continue
        try:
            tensors = load_file(f)
        except Exception as e:  # a truncated shard
            out[f.name] = f"unreadable: {e}"
            continue
        out[f.name] = {k: (str(t.dtype), tuple(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes())
                       for k, t in tensors.items()}
    return out


def _private_tqdm_lock() -> None:
    """In the child only. tqdm guards its bars (disabled ones too) with a multiprocessing
    semaphore that a forked child shares with its parent: a child killed while holding it would
    leave the parent's next progress bar waiting forever."""
    lock = threading.RLock()
    classes = [tqdm.std.tqdm]
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        if cls is tqdm.std.tqdm or "_lock" in vars(cls):
            cls._lock = lock


def _instrument(w_fd: int, two_step: bool, die_at: int | None) -> None:
    """In the child only: report each export step on the pipe, then sleep (or die there)."""
    _private_tqdm_lock()
    count = [0]

    def step(name: str) -> None:
        os.write(w_fd, f"{name} {time.monotonic()}\n".encode())
        if count[0] == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        count[0] += 1
        time.sleep(STEP_SLEEP_S)

    def wrap(fn, name, after=False):
        def wrapped(*args, **kwargs):
            if not after:
                step(name)
            out = fn(*args, **kwargs)
            if after:
                step(name)
            return out
        return wrapped

    class _Os:  # shards' os module, with each rename of the swap reported
        def __getattr__(self, attr):
            return getattr(os, attr)

        replace = staticmethod(wrap(os.replace, "replace", after=True))

    shards.tempfile = type("T", (), {"mkdtemp": staticmethod(wrap(shards.tempfile.mkdtemp, "tmp", after=True))})
    shards.write_safetensors = wrap(shards.write_safetensors, "shard", after=True)  # in the writer thread
    real_close = shards.ShardWriter.close

    def close(self):  # "finalize" once earlier shards are written, so steps come in one order
        self.wait()
        step("finalize")
        return real_close(self)

    shards.ShardWriter.close = close
    real_swap_in = shards._swap_in

    def swap_in(tmp, target):
        step("swap")
        shards.os = _Os()
        real_swap_in(tmp, target)

    shards._swap_in = swap_in
    shards._exchange = (lambda a, b: False) if two_step else wrap(shards._exchange, "exchange", after=True)
    shards._remove = wrap(shards._remove, "remove")


def _fork_export(qm, target: Path, overwrite: bool, two_step: bool, die_at: int | None = None):
    """Start a child exporting `qm`; returns (pid, read end of its step pipe, fork time)."""
    r, w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            _instrument(w, two_step, die_at)
            qm.export(target, overwrite=overwrite, max_shard_bytes=MAX_SHARD_BYTES, progress=False)
            os.write(w, f"done {time.monotonic()}\n".encode())
            code = 0
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(w)
    return pid, r, t0


def _collect(pid: int, r: int, t0: float, data: bytes = b"") -> tuple[int, list[tuple[str, float]]]:
    """Wait for the child; (wait status, its steps with times relative to the fork)."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:  # a fork of a threaded process can deadlock: fail, not hang
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"export child {pid} hung for {CHILD_TIMEOUT_S} s")
        time.sleep(0.005)
    status = done[1]
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    steps = [(name, float(t) - t0) for name, t in (ln.split() for ln in data.decode().splitlines())]
    return status, steps


def _scenario(i: int) -> tuple[bool, bool]:
    """(overwrite, two_step): a fresh target, or over a previous export by exchange or two renames."""
    return [(False, False), (True, False), (True, True)][i % 3]


def _prepare(root: Path, overwrite: bool, references) -> Path:
    target = root / "ckpt"
    root.mkdir(parents=True)
    if overwrite:
        shutil.copytree(references["prev_dir"], target)
    return target


def _check_after_kill(target: Path, overwrite: bool, references, models) -> str:
    """The invariant right after the kill, after the next run's tidy-up, and after the next run."""
    allowed = {"new"} | ({"prev"} if overwrite else set())
    state = "absent"
    if target.exists():
        snap = _snapshot(target)
        state = next((k for k in allowed if snap == references[k]), None)
        assert state is not None, f"partial checkpoint at the target: {sorted(snap)}"
        assert verify_checkpoint(target).ok
    shards.clean_stale_temps(target.parent)  # what the next run does first
    assert not list(target.parent.glob(f"{shards.TEMP_PREFIX}*"))
    if overwrite:  # the previous export is never lost
        assert target.exists() and _snapshot(target) in (references["prev"], references["new"])
    models[0].export(target, overwrite=target.exists(), max_shard_bytes=MAX_SHARD_BYTES, progress=False)
    assert _snapshot(target) == references["new"] and verify_checkpoint(target).ok
    assert not list(target.parent.glob(f"{shards.TEMP_PREFIX}*"))
    return state


def _uninterrupted_steps(models, references, tmp_path) -> dict[int, list[tuple[str | None, float]]]:
    """Per scenario, the steps of an uninterrupted run (times from the fork), led by (None, 0)."""
    out = {}
    for i in range(3):
        overwrite, two_step = _scenario(i)
        target = _prepare(tmp_path / f"calib{i}", overwrite, references)
        status, steps = _collect(*_fork_export(models[0], target, overwrite, two_step))
        assert os.waitstatus_to_exitcode(status) == 0 and steps[-1][0] == "done"
        out[i] = [(None, 0.0), *steps]
    return out


def _wait_for_steps(r: int, n: int) -> bytes:
    """Block until the child has reported `n` steps (or died); returns what was read."""
    data, deadline = b"", time.monotonic() + CHILD_TIMEOUT_S
    while data.count(b"\n") < n and select.select([r], [], [], max(0.0, deadline - time.monotonic()))[0]:
        if not (chunk := os.read(r, 65536)):
            break
        data += chunk
    return data


def test_kill_9_at_random_points_never_leaves_a_partial_checkpoint(models, references, tmp_path):
    """A kill lands after a random step k of a phase (phases taken in turn), a random fraction
    of the way to step k+1; which phase it really landed in is read from the child's reports."""
    runs = _uninterrupted_steps(models, references, tmp_path)
    rng = random.Random(1234)
    trials, landed, states = 24, collections.Counter(), collections.Counter()
    for i in range(trials):
        overwrite, two_step = _scenario(i)
        points = runs[i % 3]
        phases = list(dict.fromkeys(STEP_PHASE[name] for name, _ in points[:-1]))
        phase = phases[(i // 3) % len(phases)]
        k = rng.choice([k for k, (name, _) in enumerate(points[:-1]) if STEP_PHASE[name] == phase])
        delay = rng.uniform(0, points[k + 1][1] - points[k][1])
        target = _prepare(tmp_path / f"trial{i}", overwrite, references)
        pid, r, t0 = _fork_export(models[0], target, overwrite, two_step)
        seen = _wait_for_steps(r, k)  # points[k] is the child's k-th report (points[0] the fork)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        status, steps = _collect(pid, r, t0, seen)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed or os.waitstatus_to_exitcode(status) == 0
        landed[STEP_PHASE[steps[-1][0] if steps else None]] += 1
        states[_check_after_kill(target, overwrite, references, models)] += 1
    distribution = {p: landed[p] for p in PHASES}
    print(f"\nkill phases over {trials} trials: {json.dumps(distribution)}; target after kill: {dict(states)}")
    # Kills must spread over the export, not all land before or after it.
    assert sum(1 for n in distribution.values() if n) >= 4, distribution
    assert distribution["writing shards"] and distribution["finalizing"], distribution


def test_kill_9_at_every_step_kind(models, references, tmp_path):
    """The child kills itself right after a chosen step: every phase, whatever the timing."""
    seen = collections.Counter()
    for i in range(3):
        overwrite, two_step = _scenario(i)
        target = _prepare(tmp_path / f"steps{i}", overwrite, references)
        _, steps = _collect(*_fork_export(models[0], target, overwrite, two_step))
        names = [name for name, _ in steps if name != "done"]
        shutil.rmtree(target.parent)
        # The first of each step kind, and the last shard and the last rename of the swap.
        firsts = {names.index(n) for n in set(names)}
        lasts = {len(names) - 1 - names[::-1].index(n) for n in ("shard", "replace") if n in names}
        picks = sorted(firsts | lasts)
        for j in picks:
            target = _prepare(tmp_path / f"steps{i}-{j}", overwrite, references)
            status, got = _collect(*_fork_export(models[0], target, overwrite, two_step, die_at=j))
            assert os.WIFSIGNALED(status) and got[-1][0] == names[j]
            seen[(names[j], overwrite, two_step)] += 1
            _check_after_kill(target, overwrite, references, models)
    kinds = {name for name, *_ in seen}
    assert {"tmp", "shard", "finalize", "swap", "remove"} <= kinds, kinds
    assert ("replace", True, True) in seen, seen
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    if shards._exchange(tmp_path / "a", tmp_path / "b"):  # where the filesystem can swap in one step
        assert ("exchange", True, False) in seen, seen
