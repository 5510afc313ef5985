"""The report's figures, drawn with matplotlib on the Agg canvas.

Each function takes the numbers of one figure (see :mod:`icons_fast.report.data`)
and writes one PNG of a fixed pixel size (:data:`HIST_SIZE`, :data:`BAR_SIZE`,
:data:`SMALL_BAR_SIZE`, :data:`HEATMAP_SIZE`; ``inches = pixels / DPI``). The
figures are :class:`matplotlib.figure.Figure` objects bound to
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg` directly: no pyplot,
no global backend switch, no display, nothing kept alive after saving.
Ticks, label rotation and the colour map are matplotlib's.
"""
from __future__ import annotations

import logging
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

log = logging.getLogger(__name__)

DPI = 100
HIST_SIZE = (560, 360)  # (width, height) in pixels; two fit side by side in the page
BAR_SIZE = (800, 480)
SMALL_BAR_SIZE = (520, 400)
HEATMAP_SIZE = (640, 560)

POOL_COLOR = "#a6c4e2"  # light blue: the whole pool
SELECTED_COLOR = "#ff7f00"  # orange: the selected subset
THRESHOLD_COLOR = "#dc143c"  # crimson: vote thresholds
SERIES_COLORS = matplotlib.colormaps["tab10"].colors  # further series (one per error-log split)
HEATMAP_CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")  # grey: empty top set (NaN row)
CHAR_PX = 7  # width of one tick-label character at the default 10 pt, in pixels
MAX_LABEL_CHARS = 24  # longer category names are cut in the figure (the tables keep them whole)
ANNOTATE_CELLS = 12  # heatmap cells carry their value up to this many tasks


def _figure(size: tuple[int, int]) -> tuple[Figure, "matplotlib.axes.Axes"]:
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, set explicitly: no display is ever needed
    return fig, fig.add_subplot()


def _save(fig: Figure, path: str) -> str:
    fig.savefig(path, format="png", dpi=DPI)  # no bbox_inches: the file keeps the figure's pixel size
    log.debug("wrote %s", path)
    return path


def _short(label: str) -> str:
    """A tick label cut to :data:`MAX_LABEL_CHARS` characters (the page's tables carry the full names)."""
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"


def _category_ticks(ax, positions: Sequence[float], labels: Sequence[str], axis: str = "x") -> None:
    """Category labels: level when the longest fits its slot of the axes' width, slanted, or upright when crowded."""
    labels = [_short(str(s)) for s in labels]
    if axis == "y":
        ax.set_yticks(positions, labels)
        return
    slot_px = 0.8 * ax.figure.get_figwidth() * DPI / max(len(labels), 1)  # the axes take about 80% of the width
    need_px = max((len(s) for s in labels), default=0) * CHAR_PX
    rotation = 0 if need_px <= slot_px else 35 if need_px <= 3 * slot_px else 90
    ax.set_xticks(positions, labels, rotation=rotation, ha="center" if rotation == 0 else "right",
                  rotation_mode="anchor")


def score_histogram(path: str, task: str, edges: np.ndarray, pool: np.ndarray, selected: np.ndarray,
                    threshold: float, top_percent: float) -> str:
    """Pool and selected counts per score bin (``edges`` [B+1], counts [B]) and the vote threshold line."""
    fig, ax = _figure(HIST_SIZE)
    ax.stairs(pool, edges, fill=True, color=POOL_COLOR, label=f"pool ({int(pool.sum())} valid)")
    ax.stairs(selected, edges, fill=True, color=SELECTED_COLOR, label=f"selected ({int(selected.sum())})")
    if np.isfinite(threshold):
        ax.axvline(threshold, color=THRESHOLD_COLOR, linewidth=2,
                   label=f"threshold (top {top_percent:.3g}%) = {threshold:.4g}")
    ax.set_title(f"task {task}: influence scores")
    ax.set_xlabel("influence score")
    ax.set_ylabel("samples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="y", alpha=0.3)
    fig.legend(fontsize="small", loc="outside lower center", ncols=3)  # below the axes: never over a bar
    return _save(fig, path)


def bar_chart(path: str, categories: Sequence[str], series: Sequence[tuple[str, Sequence[float], str]], title: str,
              xlabel: str, ylabel: str, value_format: str = "{:.0f}", integer: bool = False,
              size: tuple[int, int] = BAR_SIZE) -> str:
    """Grouped bars: one group per category, one bar per ``(label, values [C], colour)`` series, values on top."""
    fig, ax = _figure(size)
    x = np.arange(len(categories))
    width = 0.8 / max(len(series), 1)
    for j, (label, values, colour) in enumerate(series):
        bars = ax.bar(x + (j - (len(series) - 1) / 2) * width, values, width, label=label, color=colour)
        ax.bar_label(bars, fmt=value_format, fontsize="x-small", padding=1)
    _category_ticks(ax, x, [str(c) for c in categories])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if integer:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(y=0.1)  # room above the tallest bar for its value label
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if len(series) > 1:
        fig.legend(fontsize="small", loc="outside lower center", ncols=len(series))  # below: never over a bar
    return _save(fig, path)


def heatmap(path: str, matrix: np.ndarray, labels: Sequence[str], title: str, xlabel: str, ylabel: str,
            colorbar_label: str) -> str:
    """``matrix`` [R, C] with values in [0, 1] on the viridis scale; NaN cells grey; values written in small ones."""
    fig, ax = _figure(HEATMAP_SIZE)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=HEATMAP_CMAP, vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, label=colorbar_label)
    _category_ticks(ax, np.arange(matrix.shape[1]), list(labels))
    _category_ticks(ax, np.arange(matrix.shape[0]), list(labels), axis="y")
    if max(matrix.shape) <= ANNOTATE_CELLS:
        for (a, b), v in np.ndenumerate(matrix):
            if np.isfinite(v):  # dark cells get white text, bright (yellow) cells black
                ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize="small",
                        color="white" if v < 0.6 else "black")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _save(fig, path)
