"""Small PNG plots drawn with Pillow only: histogram, grouped bar chart, heatmap.

Matplotlib is not a dependency, so the report draws its own plots. Each plot is
a fixed-size white canvas (:data:`HIST_SIZE`, :data:`BAR_SIZE`,
:data:`HEATMAP_SIZE`) with a title, a horizontal legend under it, a plot area
with a frame, "nice" ticks (1, 2, 2.5 or 5 times a power of ten), light grid
lines and axis labels. Data coordinates map linearly to pixels::

    px(x) = left + (x - x0) / (x1 - x0) * (right - left)
    py(y) = bottom - (y - y0) / (y1 - y0) * (bottom - top)     (y grows upwards)

Category labels that do not fit under their slot are drawn vertically and cut
to :data:`MAX_LABEL_CHARS` characters.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HIST_SIZE = (480, 320)  # (width, height) in pixels
BAR_SIZE = (720, 420)
HEATMAP_SIZE = (640, 560)

WHITE = (255, 255, 255)
TEXT = (30, 30, 30)
AXIS = (90, 90, 90)
GRID = (228, 228, 228)
# Series colours: blue, orange, green, purple, brown, pink, olive, cyan (a colour-blind-friendly order).
PALETTE = [(55, 126, 184), (255, 127, 0), (77, 175, 74), (152, 78, 163),
           (166, 86, 40), (247, 129, 191), (153, 153, 51), (23, 190, 207)]
POOL_COLOR = (166, 196, 226)  # light blue: the whole pool
SELECTED_COLOR = (255, 127, 0)  # orange: the selected subset
THRESHOLD_COLOR = (220, 20, 60)  # crimson: vote thresholds
# Sequential colour scale (dark purple -> blue -> teal -> green -> yellow), interpolated linearly.
SCALE = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
MAX_LABEL_CHARS = 18


@lru_cache(maxsize=None)
def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` pixels (a bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def text_size(s: str, size: int = 12) -> tuple[int, int]:
    left, top, right, bottom = font(size).getbbox(s)
    return right - left, bottom - top


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> tuple[list[float], float]:
    """About ``n`` round tick values covering ``[lo, hi]`` and their step.

    The step is 1, 2, 2.5 or 5 times a power of ten, the first tick is the
    largest multiple of the step <= ``lo`` and the last the smallest >= ``hi``.
    ``integer`` (an axis of counts): the step is a whole number, at least 1.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi <= lo:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, float(math.ceil(step)) if step != 2.5 else 2.0)
    first = math.floor(lo / step + 1e-9) * step
    count = int(math.ceil((hi - first) / step - 1e-9)) + 1
    return [first + i * step for i in range(count)], step


def format_tick(v: float, step: float) -> str:
    """``v`` with as many decimals as ``step`` needs (0.25 -> 2 decimals, 5 -> none)."""
    if step >= 1 and float(step).is_integer():
        return f"{v:.0f}" if abs(v) < 1e7 else f"{v:.3g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if not math.isclose(round(step, decimals), step, rel_tol=1e-6):
        decimals += 1
    if decimals > 6:
        return f"{v:.2e}"
    s = f"{v:.{decimals}f}"
    return "0" if float(s) == 0 else s


def short_label(s: str, limit: int = MAX_LABEL_CHARS) -> str:
    s = str(s)
    return s if len(s) <= limit else s[: limit - 2] + ".."


def scale_color(t: float) -> tuple[int, int, int]:
    """Colour of ``t`` in [0, 1] on :data:`SCALE` (clipped)."""
    t = min(max(float(t), 0.0), 1.0) * (len(SCALE) - 1)
    i = min(int(t), len(SCALE) - 2)
    f = t - i
    return tuple(int(round(a + (b - a) * f)) for a, b in zip(SCALE[i], SCALE[i + 1]))


class Figure:
    """A white canvas with a title, an optional legend strip and a plot area inside margins.

    ``margins`` is (left, top, right, bottom) in pixels; the top margin holds
    the title (and the legend strip, when there is a legend).
    """

    def __init__(self, size: tuple[int, int], title: str, margins=(64, 56, 20, 52)):
        self.width, self.height = size
        self.image = Image.new("RGB", size, WHITE)
        self.draw = ImageDraw.Draw(self.image)
        self.left, self.top = margins[0], margins[1]
        self.right, self.bottom = self.width - margins[2], self.height - margins[3]
        if self.right - self.left < 20 or self.bottom - self.top < 20:
            raise ValueError(f"margins {margins} leave no plot area in a {size} figure")
        self.text((self.width // 2, 8), title, size=15, anchor="mt")
        self.x0, self.x1, self.y0, self.y1 = 0.0, 1.0, 0.0, 1.0

    # ------------------------------------------------------------ coordinates
    def set_limits(self, x0: float, x1: float, y0: float, y1: float) -> None:
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"empty data range x [{x0}, {x1}], y [{y0}, {y1}]")
        self.x0, self.x1, self.y0, self.y1 = float(x0), float(x1), float(y0), float(y1)

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def py(self, y: float) -> float:
        return self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)

    # ------------------------------------------------------------ text
    def text(self, xy, s: str, size: int = 12, anchor: str = "la", fill=TEXT) -> None:
        self.draw.text(xy, str(s), font=font(size), fill=fill, anchor=anchor)

    def vertical_text(self, cx: float, y: float, s: str, size: int = 12, valign: str = "top", fill=TEXT) -> None:
        """``s`` reading bottom-to-top, centred on ``cx``; its top (or middle) at ``y``."""
        f = font(size)
        left, top, right, bottom = f.getbbox(str(s))
        strip = Image.new("L", (right - left + 2, bottom - top + 2), 0)
        ImageDraw.Draw(strip).text((-left + 1, -top + 1), str(s), font=f, fill=255)
        strip = strip.rotate(90, expand=True)
        w, h = strip.size
        y0 = y if valign == "top" else y - h / 2
        self.image.paste(fill, (int(round(cx - w / 2)), int(round(y0))), mask=strip)

    # ------------------------------------------------------------ axes
    def y_axis(self, ticks: Sequence[float], step: float, label: str = "", grid: bool = True) -> None:
        for t in ticks:
            if self.y0 - 1e-9 * abs(step) <= t <= self.y1 + 1e-9 * abs(step):
                y = self.py(t)
                if grid:
                    self.draw.line([(self.left, y), (self.right, y)], fill=GRID)
                self.draw.line([(self.left - 4, y), (self.left, y)], fill=AXIS)
                self.text((self.left - 6, y), format_tick(t, step), size=11, anchor="rm")
        if label:
            self.vertical_text(12, (self.top + self.bottom) / 2, label, size=12, valign="middle")

    def x_axis(self, ticks: Sequence[float], step: float, label: str = "") -> None:
        for t in ticks:
            if self.x0 - 1e-9 * abs(step) <= t <= self.x1 + 1e-9 * abs(step):
                x = self.px(t)
                self.draw.line([(x, self.bottom), (x, self.bottom + 4)], fill=AXIS)
                self.text((x, self.bottom + 6), format_tick(t, step), size=11, anchor="mt")
        if label:
            self.text(((self.left + self.right) / 2, self.height - 6), label, size=12, anchor="mb")

    def category_axis(self, centres: Sequence[float], labels: Sequence[str], label: str = "") -> None:
        """Category names under pixel x ``centres``; vertical when they do not fit their slot."""
        slot = (self.right - self.left) / max(len(labels), 1)
        labels = [short_label(s) for s in labels]
        vertical = any(text_size(s, 11)[0] > slot - 4 for s in labels)
        for cx, s in zip(centres, labels):
            self.draw.line([(cx, self.bottom), (cx, self.bottom + 4)], fill=AXIS)
            if vertical:
                self.vertical_text(cx, self.bottom + 6, s, size=11)
            else:
                self.text((cx, self.bottom + 6), s, size=11, anchor="mt")
        if label:
            self.text(((self.left + self.right) / 2, self.height - 6), label, size=12, anchor="mb")

    def frame(self) -> None:
        self.draw.rectangle([self.left, self.top, self.right, self.bottom], outline=AXIS)

    def legend(self, entries: Sequence[tuple[str, tuple, str]]) -> None:
        """A horizontal legend under the title: (label, colour, "box" | "line") per entry."""
        parts = [(short_label(lab, 40), col, kind) for lab, col, kind in entries]
        widths = [22 + text_size(lab, 11)[0] for lab, _, _ in parts]
        x = max(self.left, (self.width - (sum(widths) + 14 * (len(parts) - 1))) / 2)
        y = 34
        for (lab, col, kind), w in zip(parts, widths):
            if kind == "line":
                self.draw.line([(x, y), (x + 16, y)], fill=col, width=3)
            else:
                self.draw.rectangle([x, y - 6, x + 16, y + 6], fill=col, outline=AXIS)
            self.text((x + 20, y), lab, size=11, anchor="lm")
            x += w + 14

    def save(self, path: str) -> str:
        self.image.save(path, format="PNG")
        return path


def _bottom_margin(labels: Sequence[str], slot: float) -> int:
    """Room under the plot for category labels (more when they must be vertical)."""
    labels = [short_label(s) for s in labels]
    widest = max((text_size(s, 11)[0] for s in labels), default=0)
    return 52 if widest <= slot - 4 else 34 + widest


def histogram(path: str, edges, series: Sequence[tuple[str, Sequence[float], tuple]], title: str,
              xlabel: str, ylabel: str = "samples", vlines: Sequence[tuple[str, float, tuple]] = (),
              size: tuple[int, int] = HIST_SIZE) -> str:
    """Bars of per-bin counts over ``edges`` (``B + 1`` values); series drawn in order, overlaid.

    ``series`` holds (label, counts [B], colour); draw a superset first (the
    pool) and its subset after it (the selection), so the subset's bars sit
    inside the superset's. ``vlines`` holds (label, x, colour): full-height
    vertical lines, e.g. a vote threshold; the x range always includes them.
    """
    edges = np.asarray(edges, dtype=np.float64)
    fig = Figure(size, title, margins=(64, 56, 20, 52))
    xs = list(edges) + [x for _, x, _ in vlines]
    ymax = max([float(np.max(c)) for _, c, _ in series if len(c)] + [1.0])
    xticks, xstep = nice_ticks(min(xs), max(xs), 5)
    yticks, ystep = nice_ticks(0.0, ymax, 5, integer=True)
    fig.set_limits(min(min(xs), xticks[0]), max(max(xs), xticks[-1]), 0.0, yticks[-1])
    fig.y_axis(yticks, ystep, ylabel)
    for _, counts, colour in series:
        for lo, hi, c in zip(edges[:-1], edges[1:], counts):
            if c > 0:
                x_a, x_b = round(fig.px(lo)), round(fig.px(hi))
                gap = 1 if x_b - x_a >= 4 else 0  # a white pixel column between bars that are wide enough
                fig.draw.rectangle([x_a + gap, fig.py(c), max(x_a + gap, x_b - 1), fig.bottom], fill=colour)
    for _, x, colour in vlines:
        fig.draw.line([(fig.px(x), fig.top), (fig.px(x), fig.bottom)], fill=colour, width=2)
    fig.x_axis(xticks, xstep, xlabel)
    fig.frame()
    fig.legend([(lab, col, "box") for lab, _, col in series] + [(lab, col, "line") for lab, _, col in vlines])
    return fig.save(path)


def bar_chart(path: str, categories: Sequence[str], series: Sequence[tuple[str, Sequence[float], tuple]],
              title: str, xlabel: str, ylabel: str, value_format: str = "{:g}",
              size: tuple[int, int] = BAR_SIZE, integer: bool = False) -> str:
    """Grouped bars: one group per category, one bar per series (label, values [C], colour).

    Each bar carries its value (``value_format``) above it when the bar is
    wide enough for the text. ``integer``: the values are counts (whole-number ticks).
    """
    n_cat, n_ser = len(categories), max(len(series), 1)
    slot = (size[0] - 64 - 20) / max(n_cat, 1)
    fig = Figure(size, title, margins=(64, 56, 20, _bottom_margin(categories, slot)))
    ymax = max([float(np.max(v)) for _, v, _ in series if len(v)] + [0.0]) or 1.0
    yticks, ystep = nice_ticks(0.0, ymax * 1.08, 5, integer)  # headroom for the value labels
    fig.set_limits(0.0, float(max(n_cat, 1)), 0.0, yticks[-1])
    fig.y_axis(yticks, ystep, ylabel)
    bar_w = (fig.px(1) - fig.px(0)) * 0.8 / n_ser
    for s, (_, values, colour) in enumerate(series):
        for c, v in enumerate(values):
            x_a = fig.px(c + 0.1) + s * bar_w
            if v > 0:
                fig.draw.rectangle([x_a, fig.py(v), x_a + max(bar_w - 1, 1), fig.bottom], fill=colour)
            label = value_format.format(v)
            if text_size(label, 10)[0] <= bar_w + 6:
                fig.text((x_a + bar_w / 2, fig.py(v) - 2), label, size=10, anchor="mb")
    fig.category_axis([fig.px(c + 0.5) for c in range(n_cat)], list(categories), xlabel)
    fig.frame()
    if len(series) > 1 or series and series[0][0]:
        fig.legend([(lab, col, "box") for lab, _, col in series])
    return fig.save(path)


def heatmap(path: str, matrix, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
            xlabel: str = "", ylabel: str = "", vmin: float = 0.0, vmax: float = 1.0,
            value_format: str = "{:.2f}", size: tuple[int, int] = HEATMAP_SIZE) -> str:
    """Cells coloured by value on :data:`SCALE` with a colour bar; annotated when cells are big enough.

    ``matrix`` is ``[R, C]``; row 0 is drawn at the top. NaN cells stay grey.
    """
    m = np.asarray(matrix, dtype=np.float64)
    n_rows, n_cols = m.shape
    longest = max((text_size(short_label(s), 11)[0] for s in row_labels), default=0)
    left = 30 + longest + 8
    slot = (size[0] - left - 90) / max(n_cols, 1)
    fig = Figure(size, title, margins=(left, 40, 90, _bottom_margin(col_labels, slot)))
    fig.set_limits(0.0, float(n_cols), 0.0, float(n_rows))
    cw, ch = fig.px(1) - fig.px(0), fig.py(0) - fig.py(1)
    annotate = cw >= text_size(value_format.format(vmax), 10)[0] + 4 and ch >= 14
    span = (vmax - vmin) or 1.0
    for r in range(n_rows):
        for c in range(n_cols):
            v = m[r, c]
            colour = (200, 200, 200) if not np.isfinite(v) else scale_color((v - vmin) / span)
            box = [fig.px(c), fig.py(n_rows - r), fig.px(c + 1), fig.py(n_rows - r - 1)]
            fig.draw.rectangle(box, fill=colour, outline=WHITE)
            if annotate and np.isfinite(v):
                luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
                fig.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), value_format.format(v), size=10,
                         anchor="mm", fill=TEXT if luminance > 140 else WHITE)
    for r, s in enumerate(row_labels):
        y = fig.py(n_rows - r - 0.5)
        fig.text((fig.left - 6, y), short_label(s), size=11, anchor="rm")
    fig.category_axis([fig.px(c + 0.5) for c in range(n_cols)], list(col_labels), xlabel)
    if ylabel:
        fig.vertical_text(12, (fig.top + fig.bottom) / 2, ylabel, size=12, valign="middle")
    fig.frame()
    # Colour bar: a vertical strip right of the plot with ticks on the data scale.
    bx0, bx1 = fig.right + 18, fig.right + 34
    for y in range(int(fig.top), int(fig.bottom) + 1):
        t = (fig.bottom - y) / (fig.bottom - fig.top)
        fig.draw.line([(bx0, y), (bx1, y)], fill=scale_color(t))
    fig.draw.rectangle([bx0, fig.top, bx1, fig.bottom], outline=AXIS)
    ticks, step = nice_ticks(vmin, vmax, 5)
    for t in ticks:
        if vmin - 1e-9 <= t <= vmax + 1e-9:
            y = fig.bottom - (t - vmin) / span * (fig.bottom - fig.top)
            fig.draw.line([(bx1, y), (bx1 + 4, y)], fill=AXIS)
            fig.text((bx1 + 6, y), format_tick(t, step), size=10, anchor="lm")
    return fig.save(path)
