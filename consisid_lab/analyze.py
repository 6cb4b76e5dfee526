"""Frequency figure across runs (the paper's Fig. 7).

    python -m consisid_lab.analyze RUN_DIR... [--out DIR] [--labels LABEL...]

One centred spectrum panel per run (face crops of its generated test videos, ``spectra/generated_faces.npz``
written by the frequency callback at test end) and the runs' relative log-amplitude curves overlaid. Writes
``<out>/generated_face_spectra.png`` plus the data: ``.npz`` (maps, radii, curves, labels), ``_curves.csv``
(long format: label, radius, relative log amplitude) and ``_scalars.csv`` (the frequency scalars per run).
Labels come from each run's experiment (``metrics.json`` ``experiment``, else ``.hydra/config.yaml``
``experiment_name``, else the directory name); repeated labels get the seed appended.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from consisid_lab.analysis.run_dirs import (
    GENERATED_FACES_FILE,
    RERUN_HINT,
    RunDirError,
    find_run_dirs,
    is_run_dir,
    read_run,
    run_cli,
)
from consisid_lab.analysis.spectrum import SCALAR_NAMES, SpectrumResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

OUTPUT_STEM = "generated_face_spectra"
PRODUCE_HINT = (
    "it is written at test end by the frequency callback (callbacks.frequency, on_test=true): "
    f"`{RERUN_HINT}` runs the test stage of a finished run"
)


def load_run_spectrum(run_dir: Path) -> SpectrumResult:
    """The generated-face spectrum of a run, or a ``RunDirError`` that says what is missing and how to get it."""
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} does not exist or is not a directory")
    path = run_dir / GENERATED_FACES_FILE
    if path.is_file():
        return SpectrumResult.from_npz(path)
    if not is_run_dir(run_dir):
        members = find_run_dirs(run_dir)
        if members:
            raise RunDirError(
                f"{run_dir} is a sweep directory with {len(members)} runs, not a run; pass its runs, "
                f"e.g. `python -m consisid_lab.analyze {' '.join(str(m) for m in members[:3])}`"
            )
        raise RunDirError(
            f"{run_dir} is not a run directory: it has neither .hydra/config.yaml nor metrics.json nor "
            f"{GENERATED_FACES_FILE}; point at a training run's output directory"
        )
    hint = PRODUCE_HINT.replace("<dir>", str(run_dir))
    raise RunDirError(f"{run_dir} lacks {GENERATED_FACES_FILE}; {hint}")


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Experiment names of the runs, made unique with the seed (or the directory name) where they repeat."""
    infos = [read_run(d) for d in run_dirs]
    labels = [i.experiment for i in infos]
    counts = Counter(labels)
    out = []
    for info, label in zip(infos, labels):
        if counts[label] > 1:
            label = f"{label} (seed {info.seed})" if info.seed is not None else f"{label} ({info.path.name})"
        out.append(label)
    if len(set(out)) < len(out):  # same experiment and seed twice (e.g. reruns): fall back to the paths
        out = [f"{label} [{d}]" for label, d in zip(out, run_dirs)]
    return out


def frequency_figure(results: Sequence[SpectrumResult], labels: Sequence[str]) -> Figure:
    """Top row: one centred relative log-amplitude map per run (shared colour scale); bottom: curves overlaid."""
    from matplotlib import colormaps

    from consisid_lab.analysis.plots import MAP_PERCENTILES, new_figure

    n = len(results)
    fig = new_figure(max(2.4 * n, 6.0) + 1.0, 6.2)
    grid = fig.add_gridspec(2, n, height_ratios=(1.0, 1.15))
    values = np.concatenate([r.rel_log_amp.ravel() for r in results])
    vmin, vmax = np.nanpercentile(values, MAP_PERCENTILES)
    colors = colormaps["tab10"]
    image = None
    for i, (r, label) in enumerate(zip(results, labels)):
        ax = fig.add_subplot(grid[0, i])
        image = ax.imshow(r.rel_log_amp, cmap="inferno", vmin=vmin, vmax=vmax, extent=(-1, 1, 1, -1))
        ax.set_title(label, fontsize=9, color=colors(i % colors.N))
        ax.set_xticks([-1, 0, 1])
        ax.set_yticks([-1, 0, 1])
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=[fig.axes[i] for i in range(n)], shrink=0.8, label="relative log amplitude")
    curves = fig.add_subplot(grid[1, :])
    for i, (r, label) in enumerate(zip(results, labels)):
        curves.plot(r.radius, r.rel_curve, color=colors(i % colors.N), label=label, marker=".")
    curves.set_xlabel("normalised frequency (1 = Nyquist)")
    curves.set_ylabel("relative log amplitude")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    return fig


def write_outputs(out: Path, results: Sequence[SpectrumResult], labels: Sequence[str]) -> list[Path]:
    from consisid_lab.analysis.plots import save_figure

    out.mkdir(parents=True, exist_ok=True)
    png = save_figure(frequency_figure(results, labels), out / f"{OUTPUT_STEM}.png")
    arrays: dict[str, np.ndarray] = {"labels": np.array(labels, dtype=str)}
    for i, r in enumerate(results):  # per run: face-crop sizes may differ between runs
        arrays[f"map_{i}"] = r.rel_log_amp
        arrays[f"radius_{i}"] = r.radius
        arrays[f"curve_{i}"] = r.rel_curve
    npz = out / f"{OUTPUT_STEM}.npz"
    np.savez(npz, **arrays)
    curves_csv = out / f"{OUTPUT_STEM}_curves.csv"
    with curves_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "radius", "rel_log_amp"])
        for r, label in zip(results, labels):
            writer.writerows([label, f"{x:.6g}", f"{y:.6g}"] for x, y in zip(r.radius, r.rel_curve))
    scalars_csv = out / f"{OUTPUT_STEM}_scalars.csv"
    with scalars_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", *SCALAR_NAMES])
        for r, label in zip(results, labels):
            writer.writerow([label, *(f"{r.scalars.get(k, float('nan')):.6g}" for k in SCALAR_NAMES)])
    return [png, npz, curves_csv, scalars_csv]


def analyze(run_dirs: Sequence[Path], out: Path, labels: Sequence[str] | None = None) -> list[Path]:
    """Load every run (all problems reported at once), then write the figure and its data."""
    results, problems = [], []
    for d in run_dirs:
        try:
            results.append(load_run_spectrum(d))
        except RunDirError as exc:
            problems.append(str(exc))
    if problems:
        raise RunDirError("\n".join(problems))
    if labels is not None and len(labels) != len(run_dirs):
        raise RunDirError(f"got {len(labels)} labels for {len(run_dirs)} runs; pass one label per run or none")
    labels = list(labels) if labels is not None else run_labels(run_dirs)
    return write_outputs(out, results, labels)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consisid_lab.analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=Path("frequency_analysis"), help="output folder")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per run (default: experiment names)")
    args = parser.parse_args(argv)
    return run_cli(lambda: analyze(args.run_dirs, args.out, args.labels))


if __name__ == "__main__":
    sys.exit(main())
