"""Expert-load figures, drawn with matplotlib's object API (Agg canvas, no pyplot state, safe in workers).

Shared by the trainer (images in TensorBoard) and `dist-moe analyze` (PNG files): the layers x experts
load heatmap, its change between two logs, per-layer load lines and the drop-rate curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

HEATMAP_DPI = 100


def heatmap_figsize(num_layers: int, num_experts: int) -> tuple[float, float]:
    """Inches; the PNG is (width * HEATMAP_DPI) x (height * HEATMAP_DPI) pixels, whatever the labels say."""
    return min(max(3.0 + 0.4 * num_experts, 6.0), 18.0), min(max(1.5 + 0.4 * num_layers, 3.0), 12.0)


def load_heatmap(load: np.ndarray, layers: Sequence[int], title: str, change: bool = False) -> Figure:
    """load (L, E): fraction of each layer's kept assignments per expert (change=True: a difference of two
    such matrices, drawn with a diverging colormap centred on zero). Rows are labelled by layer index."""
    num_layers, num_experts = load.shape
    fig = Figure(figsize=heatmap_figsize(num_layers, num_experts), dpi=HEATMAP_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if change:
        limit = max(float(np.abs(load).max()), 1e-6)
        image = ax.imshow(load, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
        label = "change in load fraction"
    else:
        image = ax.imshow(load, cmap="viridis", vmin=0.0, aspect="auto", interpolation="nearest")
        label = "fraction of kept tokens"
    fig.colorbar(image, ax=ax, label=label)
    if load.size <= 128:  # small enough to print every cell
        for (i, e), value in np.ndenumerate(load):
            ax.text(e, i, f"{value:+.2f}" if change else f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if _dark_cell(value, image.norm.vmax, change) else "black")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, num_experts, 1 if num_experts <= 32 else 8))
    ax.set_yticks(range(num_layers), labels=[str(i) for i in layers])
    ax.set_title(title)
    return fig


def _dark_cell(value: float, vmax: float, change: bool) -> bool:
    """viridis is dark at its low end; RdBu_r at both ends (deep blue, deep red), light around zero."""
    return abs(value) > 0.6 * vmax if change else value <= 0.6 * vmax


def to_rgb(fig: Figure) -> np.ndarray:
    """Render to an (H, W, 3) uint8 array of exactly the figure's pixel size (for SummaryWriter.add_image)."""
    canvas = fig.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: Figure, path: Path) -> Path:
    """Write at the figure's own size and dpi (no tight bbox), so the pixel size is predictable."""
    fig.savefig(path, format="png", dpi=fig.dpi)
    return path


def layer_load_lines(steps: np.ndarray, load: np.ndarray, layer: int, dead_threshold: float) -> Figure:
    """load (N, E) over N logged steps: one line per expert, the fair share 1/E and the dead threshold."""
    num_experts = load.shape[1]
    fig = Figure(figsize=(8.0, 4.5), dpi=HEATMAP_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for e in range(num_experts):
        ax.plot(steps, load[:, e], marker="." if len(steps) < 30 else None, label=f"expert {e}")
    ax.axhline(1.0 / num_experts, color="black", linestyle="--", linewidth=1, label="fair share 1/E")
    ax.axhline(dead_threshold, color="red", linestyle=":", linewidth=1, label=f"dead below {dead_threshold:.2%}")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of kept tokens")
    ax.set_ylim(bottom=0.0)
    ax.set_title(f"layer {layer}: expert load")
    if num_experts <= 16:
        ax.legend(fontsize="small", ncols=2)
    return fig


def dropped_lines(steps: np.ndarray, dropped: np.ndarray, layers: Sequence[int]) -> Figure:
    """dropped (N, L): fraction of routed assignments dropped at each log, a line per layer."""
    fig = Figure(figsize=(8.0, 4.5), dpi=HEATMAP_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for j, layer in enumerate(layers):
        ax.plot(steps, dropped[:, j], marker="." if len(steps) < 30 else None, label=f"layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("dropped fraction")
    ax.set_ylim(bottom=0.0)
    ax.set_title("dropped assignments (over capacity)")
    ax.legend(fontsize="small")
    return fig
