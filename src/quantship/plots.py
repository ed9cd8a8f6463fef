"""PNG plots for `quantship eval`: weight SQNR per layer, per-layer output error, and for MoE
models a tokens-per-expert heat map from the export's coverage.json.

matplotlib is an optional dependency (`pip install 'quantship[plot]'`); the Agg backend draws
without a display, so this works on headless servers and in CI.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from quantship.errors import QuantshipError

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise QuantshipError("plots need matplotlib: pip install 'quantship[plot]', or pass --no-plots")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _layer(module: str) -> int:
    m = _LAYER_RE.search(f".{module}.")
    return int(m.group(1)) if m else -1


def plot_sqnr(sqnr: dict[str, float], path: Path) -> Path:
    """One point per quantized module (per expert for MoE), colored by projection name."""
    plt = _pyplot()
    kinds: dict[str, tuple[list[int], list[float]]] = {}
    for module, value in sqnr.items():
        if value != value or value == float("inf"):
            continue
        xs, ys = kinds.setdefault(module.rsplit(".", 1)[-1], ([], []))
        xs.append(_layer(module))
        ys.append(value)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, (kind, (xs, ys)) in enumerate(sorted(kinds.items())):
        offset = (i - len(kinds) / 2) * 0.06  # keep projections of one layer apart
        ax.scatter([x + offset for x in xs], ys, s=8, label=kind, alpha=0.7)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("weight SQNR (dB)")
    ax.set_title("weight SQNR per quantized module")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=4, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_errors(errors: list[dict[str, float]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    layers = [e["layer"] for e in errors]
    for key in ("isolated", "accumulated"):
        ax.plot(layers, [e[key] for e in errors], marker="o", ms=3, label=key)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative output error")
    ax.set_title("decoder layer output error, quantized vs reference")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_expert_heatmap(coverage: dict, path: Path) -> Path:
    """Routed calibration tokens per (MoE block, expert), log color scale; fallback experts boxed."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    blocks = list(coverage["blocks"].items())
    width = max(b["num_experts"] for _, b in blocks)
    grid = np.full((len(blocks), width), np.nan)
    for row, (_, info) in enumerate(blocks):
        grid[row, : info["num_experts"]] = info["tokens_per_expert"]
    fig, ax = plt.subplots(figsize=(min(16, 3 + width * 0.18), min(12, 1.5 + len(blocks) * 0.25)))
    shown = np.where(grid > 0, grid, np.nan)  # zero tokens: drawn as the empty background
    im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis",
                   norm=LogNorm(vmin=1, vmax=max(2.0, float(np.nanmax(grid)))))
    ax.set_facecolor("black")
    for row, (_, info) in enumerate(blocks):
        for e in info["fallback_experts"]:
            ax.add_patch(plt.Rectangle((e - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", lw=0.8))
    ax.set_yticks(range(len(blocks)))
    ax.set_yticklabels([_short(name) for name, _ in blocks], fontsize=6)
    ax.set_xlabel("expert")
    ax.set_title(f"routed calibration tokens per expert (black: none; red box: all-token fallback, "
                 f"< {coverage.get('moe_min_tokens')} tokens)", fontsize=9)
    fig.colorbar(im, ax=ax, label="tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(block: str) -> str:
    layer = _layer(block)
    return f"layer {layer}" if layer >= 0 else block


def write_plots(out: Path, sqnr: dict[str, float], errors: list[dict[str, float]],
                coverage: dict | None) -> list[str]:
    """Every plot that applies; returns the file names written."""
    written = [plot_sqnr(sqnr, out / "sqnr_per_layer.png"), plot_layer_errors(errors, out / "layer_output_error.png")]
    if coverage and coverage.get("blocks"):
        written.append(plot_expert_heatmap(coverage, out / "expert_tokens_heatmap.png"))
    return [p.name for p in written]
