"""Figures of spectra: centred maps, relative log-amplitude curves.

Figures are built on matplotlib's object API with an explicit Agg canvas, so plotting never touches pyplot's
global backend state (safe in notebooks, on headless nodes and in threads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from consisid_lab.analysis.spectrum import SpectrumResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Colour scale of relative-log-amplitude maps: percentiles rather than min/max so the DC pixel (0 by definition)
# and a few outliers do not wash out the rest of the map.
MAP_PERCENTILES = (1.0, 99.0)


def new_figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg (raster, headless) backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Render a figure to an ``(H, W, 3)`` uint8 array (what image loggers take)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def render_figure(fig: Figure, path: str | Path) -> np.ndarray:
    """Draw a figure once: write it as a PNG to ``path`` and return its ``(H, W, 3)`` uint8 pixels (the same ones).

    Half the cost of :func:`save_figure` then :func:`figure_to_rgb`, which lay out and rasterise it twice.
    """
    from PIL import Image

    rgb = figure_to_rgb(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return rgb


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_maps(results: Sequence[SpectrumResult], titles: Sequence[str] | None = None, ncols: int = 6) -> Figure:
    """Centred relative log-amplitude maps, one panel each, on one shared colour scale."""
    if not results:
        raise ValueError("plot_maps needs at least one spectrum")
    titles = list(titles) if titles is not None else [r.name for r in results]
    ncols = min(ncols, len(results))
    nrows = math.ceil(len(results) / ncols)
    fig = new_figure(2.2 * ncols + 0.8, 2.3 * nrows)
    maps = [r.rel_log_amp for r in results]
    values = np.concatenate([m.ravel() for m in maps])
    vmin, vmax = np.nanpercentile(values, MAP_PERCENTILES)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for ax, m, title in zip(axes.ravel(), maps, titles):
        # extent in units of Nyquist per axis: the centre is DC, the edges are +-1
        image = ax.imshow(m, cmap="inferno", vmin=vmin, vmax=vmax, extent=(-1, 1, 1, -1), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([-1, 0, 1])
        ax.set_yticks([-1, 0, 1])
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(maps) :]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="relative log amplitude")
    return fig


def plot_curves(
    groups: dict[str, Sequence[SpectrumResult]], labels: dict[str, Sequence[str]] | None = None, depth: bool = True
) -> Figure:
    """Relative log amplitude against normalised radius, one panel per group.

    With ``depth`` the curves of a group are coloured by their order (shallow = dark, deep = bright) with a
    colour bar, as in Park & Kim's figures; otherwise each curve gets a distinct colour and a legend entry.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        raise ValueError("plot_curves needs at least one spectrum")
    fig = new_figure(4.2 * len(groups) + 0.6, 3.4)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (group, results) in zip(axes, groups.items()):
        names = list(labels[group]) if labels and group in labels else [r.name for r in results]
        cmap = colormaps["plasma" if depth else "tab10"]
        norm = Normalize(0, max(len(results) - 1, 1))
        for i, (r, name) in enumerate(zip(results, names)):
            color = cmap(norm(i)) if depth else cmap(i % cmap.N)
            ax.plot(r.radius, r.rel_curve, color=color, label=name, marker="." if len(r.radius) < 12 else None)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("normalised frequency (1 = Nyquist)")
        ax.set_ylabel("relative log amplitude")
        ax.grid(alpha=0.3)
        if depth and len(results) > 1:
            bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax)
            bar.set_label("depth (order of the hooked modules)")
        else:
            ax.legend(fontsize=7)
    return fig


VERDICT_COLORS = {"supported": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:gray"}


def plot_forest(
    labels: Sequence[str],
    means: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    mdes: Sequence[float],
    verdicts: Sequence[str],
    metrics: Sequence[str],
) -> Figure:
    """Forest plot of paired differences (treatment - control), one panel per claim since claims differ in
    metric and scale: the mean with its 95% interval, 0 as a dashed line, ±MDE as a grey band (effects inside it
    are below what the seeds can detect), coloured by verdict."""
    n = len(labels)
    if n == 0:
        raise ValueError("plot_forest needs at least one comparison")
    fig = new_figure(7.5, 0.9 * n + 0.8)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, label, mean, low, high, mde, verdict, metric in zip(
        axes, labels, means, lows, highs, mdes, verdicts, metrics
    ):
        color = VERDICT_COLORS.get(verdict, "black")
        if math.isfinite(mde):
            ax.axvspan(-mde, mde, color="0.9", zorder=0)
        ax.axvline(0.0, color="0.3", linestyle="--", linewidth=0.8)
        if math.isfinite(low) and math.isfinite(high):
            ax.errorbar([mean], [0], xerr=[[mean - low], [high - mean]], fmt="o", color=color, capsize=4)
        else:
            ax.plot([mean], [0], "o", color=color)
        finite = [v for v in (low, high, mean, mde, -mde) if math.isfinite(v)]
        span = max(abs(v) for v in finite) if finite else 1.0
        ax.set_xlim(-1.15 * span or -1, 1.15 * span or 1)
        ax.set_yticks([])
        ax.set_title(f"{label}  [{metric}: {verdict}]", fontsize=8, loc="left", color=color)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1].set_xlabel(
        "paired difference, treatment - control (95% CI, the wider of bootstrap and paired t; grey: ±MDE)", fontsize=8
    )
    return fig
