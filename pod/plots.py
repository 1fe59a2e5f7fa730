"""Plots of the grouping stage (PNG, matplotlib's Agg canvas).

Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas rather than pyplot, so that
importing or calling these functions never changes the caller's matplotlib backend or global state.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .groups import GroupSpec

if TYPE_CHECKING:
    from .grouping import ProximalImportance, SimilarityResult

__all__ = ["plot_proximal_importance", "plot_similarity", "plot_similarity_heads"]

# One colour per KV head for the block outlines on the head-mean heatmap.
_HEAD_COLOURS = (
    "tab:red",
    "tab:orange",
    "white",
    "tab:pink",
    "tab:cyan",
    "tab:olive",
    "tab:brown",
    "tab:gray",
)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _heatmap(axes, matrix: np.ndarray, vmin: float, annotate: bool):
    image = axes.imshow(matrix, vmin=vmin, vmax=1.0, cmap="viridis", origin="upper", interpolation="nearest")
    num_layers = matrix.shape[0]
    step = max(1, num_layers // 16)
    ticks = list(range(0, num_layers, step))
    axes.set_xticks(ticks)
    axes.set_yticks(ticks)
    axes.set_xlabel("layer")
    axes.set_ylabel("layer")
    if annotate:
        for row in range(num_layers):
            for col in range(num_layers):
                value = matrix[row, col]
                axes.text(
                    col,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if value > vmin + 0.6 * (1 - vmin) else "white",
                )
    return image


def _outline_blocks(axes, spec: GroupSpec, head: int, colour: str, inset: float, label: str | None) -> None:
    from matplotlib.patches import Rectangle

    for index, (first, stop) in enumerate(spec.blocks(head)):
        size = stop - first
        axes.add_patch(
            Rectangle(
                (first - 0.5 + inset, first - 0.5 + inset),
                size - 2 * inset,
                size - 2 * inset,
                fill=False,
                edgecolor=colour,
                linewidth=1.8,
                label=label if index == 0 else None,
            )
        )


def _colour_floor(similarity: np.ndarray) -> float:
    """Lower end of the colour scale: the data's minimum, so that small differences near 1 stay visible."""
    low = float(similarity.min())
    return min(low, 0.99) if low < 1.0 else 0.0


def plot_similarity(
    result: SimilarityResult, spec: GroupSpec, path: str | Path, *, title: str | None = None
) -> Path:
    """Layer x layer similarity (mean over KV heads) with the blocks of ``spec`` outlined.

    A per-layer spec is drawn once; otherwise each KV head's blocks are outlined in its own colour,
    slightly inset so that blocks shared by several heads stay distinguishable.
    """
    mean = result.mean()
    num_layers = mean.shape[0]
    spec.check_model(num_layers, result.num_kv_heads)
    figure = _figure(6.4, 6.0)
    axes = figure.add_subplot()
    image = _heatmap(axes, mean, _colour_floor(result.similarity), annotate=num_layers <= 12)
    figure.colorbar(image, ax=axes, label="1 - JS (mean over KV heads)")
    if spec.per_layer:
        _outline_blocks(axes, spec, 0, "tab:red", 0.04, "blocks (all heads)")
    else:
        inset_step = 0.35 / max(1, spec.num_kv_heads)
        for head in range(spec.num_kv_heads):
            colour = _HEAD_COLOURS[head % len(_HEAD_COLOURS)]
            _outline_blocks(axes, spec, head, colour, 0.04 + head * inset_step, f"KV head {head}")
        axes.legend(
            loc="upper center",
            bbox_to_anchor=(0.5, -0.1),
            ncol=min(4, spec.num_kv_heads),
            fontsize=7,
            facecolor="lightgray",
            title="blocks of",
            title_fontsize=7,
        )
    axes.set_title(title or "inter-layer attention similarity (distant tokens)", fontsize=10)
    figure.savefig(path)
    return Path(path)


def plot_similarity_heads(
    result: SimilarityResult, spec: GroupSpec, path: str | Path, *, title: str | None = None
) -> Path:
    """One similarity heatmap per KV head, each with that head's blocks outlined."""
    heads = result.num_kv_heads
    spec.check_model(result.num_layers, heads)
    columns = min(4, heads)
    rows = (heads + columns - 1) // columns
    figure = _figure(3.0 * columns + 1.0, 3.0 * rows + 0.4)
    vmin = _colour_floor(result.similarity)
    image = None
    for head in range(heads):
        axes = figure.add_subplot(rows, columns, head + 1)
        image = _heatmap(axes, result.similarity[head], vmin, annotate=False)
        _outline_blocks(axes, spec, head, "tab:red", 0.04, None)
        axes.set_title(f"KV head {head}", fontsize=9)
    figure.colorbar(image, ax=figure.axes, label="1 - JS", shrink=0.8)
    figure.suptitle(title or "similarity per KV head, blocks outlined", fontsize=10)
    figure.savefig(path)
    return Path(path)


def plot_proximal_importance(
    curve: ProximalImportance, path: str | Path, *, title: str | None = None
) -> Path:
    """Agreement of the greedy next token with only ``n`` proximal tokens vs full attention, against ``n``."""
    figure = _figure(6.0, 4.0)
    axes = figure.add_subplot()
    axes.plot(curve.sizes, curve.agreement, marker="o")
    axes.set_xscale("log", base=2)
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel(f"proximal tokens n ({curve.n_sink} sinks + n - {curve.n_sink} recent)")
    axes.set_ylabel("same next token as full attention")
    axes.grid(True, alpha=0.3)
    axes.set_title(
        (title + ": " if title else "")
        + f"{curve.num_sequences} seq x {curve.n_queries} queries, T={curve.seq_len}",
        fontsize=10,
    )
    figure.savefig(path)
    return Path(path)
