"""Learning curves of a run from its CSV log: the validation identity gap and the gradient norm against step.

A run's ``CSVLogger`` (``conf/logger/csv.yaml``) writes ``<run>/csv/metrics.csv``: one row per logging call, a
``step`` column and one column per logged key, blank where that call did not log the key. A curve is the
``(step, value)`` pairs of one key; its area is the trapezoid integral over steps divided by the step span, i.e.
the curve's mean height, comparable across runs of different lengths (a run that reaches a high identity gap
early has a larger area than one that gets there at its last step: Finding 1's "converges faster").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CSV_LOG = Path("csv") / "metrics.csv"
IDENTITY_GAP_KEY = "val/identity_gap"  # logged by the LightningModule at every validation (facesim - shuffled)
GRAD_NORM_KEY = "train/grad_norm"  # logged by the LightningModule before every optimizer step
IDENTITY_GAP_AUC = "val_identity_gap_auc"  # the area's column in the report (a per-run value, like facesim)


@dataclass(frozen=True)
class Curve:
    """One logged key of one run: strictly increasing ``steps`` and their ``values``."""

    steps: np.ndarray  # (T,) int
    values: np.ndarray  # (T,) float

    def __len__(self) -> int:
        return len(self.steps)


def csv_log(run_dir: Path) -> Path | None:
    """The run's CSV log, or None when it has none (another logger, or it never logged)."""
    path = run_dir / CSV_LOG
    return path if path.is_file() else None


def read_curves(path: Path, keys: Sequence[str]) -> dict[str, Curve]:
    """The curves of ``keys`` in a Lightning CSV log (keys absent from the log are left out).

    A step logged twice keeps its last value (a log written by an older resume that re-logged steps).
    """
    from consisid_lab.utils.csv_log import read_rows

    rows = read_rows(path)  # blank cells dropped
    out: dict[str, Curve] = {}
    for key in keys:
        points: dict[int, float] = {}
        for row in rows:
            if key in row and "step" in row:
                points[int(float(row["step"]))] = float(row[key])
        if points:
            steps = np.asarray(sorted(points), dtype=np.int64)
            out[key] = Curve(steps, np.asarray([points[s] for s in steps], dtype=np.float64))
    return out


def normalised_area(curve: Curve) -> float:
    """Trapezoid area under the curve over its steps, divided by the step span (its mean height); the value
    itself for a single point; NaN for an empty or non-finite curve."""
    from scipy.integrate import trapezoid

    if len(curve) == 0 or not np.all(np.isfinite(curve.values)):
        return float("nan")
    if len(curve) == 1:
        return float(curve.values[0])
    span = float(curve.steps[-1] - curve.steps[0])
    return float(trapezoid(curve.values, curve.steps.astype(np.float64)) / span)


def mean_curve(curves: Sequence[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, mean, sd)`` over seeds at the steps every curve has (sd 0 for one curve)."""
    if not curves:
        raise ValueError("mean_curve needs at least one curve")
    shared = curves[0].steps
    for c in curves[1:]:
        shared = np.intersect1d(shared, c.steps)
    stacked = np.stack([c.values[np.searchsorted(c.steps, shared)] for c in curves])  # (S, T)
    sd = stacked.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(shared))
    return shared, stacked.mean(axis=0), sd


def plot_curves(
    groups: dict[str, Sequence[Curve]], ylabel: str, title: str, log_y: bool = False, note: str | None = None
) -> Figure:
    """One line per row label (mean over its seeds) with a ±1 sd band; ``groups`` maps labels to curves."""
    from matplotlib import colormaps

    from consisid_lab.analysis.plots import new_figure

    fig = new_figure(7.0, 4.2)
    ax = fig.subplots()
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        ax.set_axis_off()
        ax.text(0.5, 0.5, note or "no run logged this curve", ha="center", va="center")
        return fig
    colors = colormaps["tab20"]
    for i, (label, curves) in enumerate(groups.items()):
        steps, mean, sd = mean_curve(curves)
        color = colors(i % colors.N)
        marker = "." if len(steps) < 20 else None
        ax.plot(steps, mean, color=color, marker=marker, label=f"{label} (n={len(curves)})")
        if len(curves) > 1:
            low, high = mean - sd, mean + sd
            if log_y:  # a band below zero has no place on a log axis
                low = np.maximum(low, np.nanmin(mean[mean > 0]) / 10 if np.any(mean > 0) else 1e-12)
            ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig
