"""Shared helpers of the GPU benchmarks: timing, the copy-bandwidth ceiling, result files."""

from __future__ import annotations

import datetime
import json
import platform
import re
import time
from pathlib import Path

import torch


def sync() -> None:
    torch.cuda.synchronize()


def time_ms(fn, rep_ms: float = 400.0, max_reps: int = 400, min_reps: int = 3) -> float:
    """Median milliseconds of ``fn()`` over several calls, timed with CUDA events, after warm-up
    calls for about 50 ms (compilation, clocks); the L2 cache is flushed before each call (a
    256 MiB write) so small inputs are read from memory, as large ones are."""
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    start = time.perf_counter()
    fn()
    sync()
    while time.perf_counter() - start < 0.05:
        fn()
        sync()
    times: list[float] = []
    spent = 0.0
    while len(times) < max_reps and (len(times) < min_reps or spent < rep_ms):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        spent += times[-1]
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, counting bytes read plus bytes written (the floor every
    one-pass kernel is measured against)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), rep_ms=200)
    return 2 * nbytes / ms / 1e6


def device_info() -> dict:
    p = torch.cuda.get_device_properties(0)
    import triton

    return {
        "card": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
    }


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_results(out_dir: Path, stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """``<out>/<date>-<card>-<stem>.json`` and ``.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"{payload['device']['date']}-{card_slug(payload['device']['card'])}-{stem}"
    js, md = out_dir / f"{base}.json", out_dir / f"{base}.md"
    js.write_text(json.dumps(payload, indent=2))
    md.write_text(markdown)
    return js, md


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with (key, header) columns; floats get 3 significant digits."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
