"""Ablation table of a sweep.

    python -m consisid_lab.report SWEEP_DIR [--out DIR] [--wandb]

``SWEEP_DIR`` is a Hydra multirun directory (``multirun/<date>/<time>/``, or any folder above job dirs): every
folder holding ``.hydra/config.yaml`` is one run. Writes to ``--out`` (default: ``SWEEP_DIR``):

- ``report.md``: one row per experiment, mean ± std over its completed seeds for the metrics present, then every
  run that did not complete with its status and error (failed, diverged with its step, crashed with the signal,
  running, died = its process is gone with the last heartbeat, or unfinished = no ``metrics.json``);
- ``report.csv``: the same rows with separate ``<metric>_mean`` / ``<metric>_std`` columns;
- ``report_runs.csv``: one row per run (status, error, every value);
- ``report.png``: bars of the main metrics with std error bars.

Runs with different metric sets leave blanks, never disappear. ``--wandb`` uploads the table and the chart to a
W&B run of job type ``report`` (offline under ``<out>/wandb`` unless ``WANDB_API_KEY`` is set; ``WANDB_MODE``
overrides).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from consisid_lab.analysis.run_dirs import SWEEP_HINT, RunDirError, RunInfo, find_run_dirs, read_run, run_cli
from consisid_lab.analysis.spectrum import SCALAR_NAMES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

IDENTITY_COLUMNS = ("facesim", "facesim_low", "facesim_high", "fid", "id_drift", "facesim_shuffled")
FREQUENCY_COLUMNS = tuple(f"gen_{name}" for name in SCALAR_NAMES)
STABILITY_COLUMNS = ("max_grad_norm", "nan_events")
KNOWN_COLUMNS = (*IDENTITY_COLUMNS, *FREQUENCY_COLUMNS, *STABILITY_COLUMNS, "wall_time_s")
CHART_COLUMNS = ("facesim", "facesim_low", "facesim_high", "fid", "id_drift", "gen_hf_ratio_025", "max_grad_norm")
MAX_ERROR_CHARS = 300


@dataclass
class ExperimentRow:
    experiment: str
    completed: list[RunInfo] = field(default_factory=list)
    incomplete: list[RunInfo] = field(default_factory=list)

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.completed]

    def stats(self, column: str) -> tuple[float, float, int] | None:
        """``(mean, std, n)`` over completed seeds that report ``column`` (sample std, NaN for one seed)."""
        values = [r.values[column] for r in self.completed if column in r.values]
        if not values:
            return None
        arr = np.asarray(values, dtype=np.float64)
        std = float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")
        return float(arr.mean()), std, len(arr)

    @property
    def issues(self) -> str:
        counts: dict[str, int] = {}
        for r in self.incomplete:
            counts[r.status] = counts.get(r.status, 0) + 1
        return ", ".join(f"{n} {status}" for status, n in counts.items())


def collect(sweep_dir: Path) -> tuple[list[RunInfo], list[ExperimentRow], list[str]]:
    """Runs, one row per experiment (in sweep order), and the value columns present in any run."""
    if not sweep_dir.is_dir():
        raise RunDirError(f"{sweep_dir} does not exist or is not a directory")
    run_dirs = find_run_dirs(sweep_dir)
    if not run_dirs:
        raise RunDirError(
            f"{sweep_dir} is not a sweep directory: no run below it has .hydra/config.yaml or metrics.json; "
            f"a sweep is produced by `{SWEEP_HINT}` (under multirun/<date>/<time>/)"
        )
    runs = [read_run(d) for d in run_dirs]
    rows: dict[str, ExperimentRow] = {}
    for run in runs:
        row = rows.setdefault(run.experiment, ExperimentRow(run.experiment))
        (row.completed if run.status == "completed" else row.incomplete).append(run)
    present = {c for r in runs for c in r.values}
    columns = [c for c in KNOWN_COLUMNS if c in present] + sorted(present - set(KNOWN_COLUMNS))
    return runs, list(rows.values()), columns


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _cell(stats: tuple[float, float, int] | None, n_seeds: int) -> str:
    if stats is None:
        return ""
    mean, std, n = stats
    text = _fmt(mean) if math.isnan(std) else f"{_fmt(mean)} ± {_fmt(std)}"
    return text if n == n_seeds else f"{text} (n={n})"  # some seeds lack this metric


def _md_escape(text: str) -> str:
    text = " ".join(str(text).split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text.replace("|", "\\|")


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def markdown(sweep_dir: Path, runs: list[RunInfo], rows: list[ExperimentRow], columns: list[str]) -> str:
    lines = [f"# Ablation report: `{sweep_dir}`", ""]
    n_done = sum(r.status == "completed" for r in runs)
    lines += [f"{len(runs)} runs, {n_done} completed; mean ± std over completed seeds.", ""]
    header = ["experiment", "seeds", *columns, "not completed"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        seeds = ",".join("?" if s is None else str(s) for s in row.seeds)
        cells = [row.experiment, f"{len(row.completed)} ({seeds})" if row.completed else "0"]
        cells += [_cell(row.stats(c), len(row.completed)) for c in columns]
        cells.append(row.issues)
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    incomplete = [r for r in runs if r.status != "completed"]
    lines += ["", "## Runs that did not complete", ""]
    if not incomplete:
        lines.append("None.")
    else:
        lines += ["| run | experiment | seed | status | error |", "|---|---|---|---|---|"]
        for r in incomplete:
            cells = [_rel(r.path, sweep_dir), r.experiment, "" if r.seed is None else str(r.seed), r.status]
            cells.append(r.error or "")
            lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    reported = [(r, f) for r in runs for f in r.failures]
    if reported:
        lines += ["", "## Failures reported during runs (skipped metrics, samples, spectra)", ""]
        lines += ["| run | status | failure |", "|---|---|---|"]
        lines += [f"| {_md_escape(_rel(r.path, sweep_dir))} | {r.status} | {_md_escape(f)} |" for r, f in reported]
    return "\n".join(lines) + "\n"


def _mean_std(row: ExperimentRow, columns: list[str]) -> list[float | None]:
    """``[mean, std, mean, std, ...]`` over ``columns``; None where a value is missing or undefined."""
    out: list[float | None] = []
    for c in columns:
        stats = row.stats(c)
        out += [None, None] if stats is None else [stats[0], None if math.isnan(stats[1]) else stats[1]]
    return out


def write_csvs(
    out: Path, sweep_dir: Path, runs: list[RunInfo], rows: list[ExperimentRow], columns: list[str]
) -> tuple[Path, Path]:
    table = out / "report.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "experiment",
                "n_seeds",
                "seeds",
                "not_completed",
                *(f"{c}_{s}" for c in columns for s in ("mean", "std")),
            ]
        )
        for row in rows:
            values = ["" if v is None else repr(v) for v in _mean_std(row, columns)]
            seeds = " ".join("" if s is None else str(s) for s in row.seeds)
            writer.writerow([row.experiment, len(row.completed), seeds, row.issues, *values])
    per_run = out / "report_runs.csv"
    with per_run.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "experiment", "seed", "status", "error", *columns])
        for r in runs:
            values = [repr(r.values[c]) if c in r.values else "" for c in columns]
            seed = "" if r.seed is None else r.seed
            writer.writerow([_rel(r.path, sweep_dir), r.experiment, seed, r.status, r.error or "", *values])
    return table, per_run


def bar_chart(rows: list[ExperimentRow], columns: list[str]) -> Figure:
    from matplotlib import colormaps

    from consisid_lab.analysis.plots import new_figure

    shown = [c for c in CHART_COLUMNS if c in columns and any(r.stats(c) for r in rows)]
    if not shown:
        fig = new_figure(6, 2)
        fig.text(0.5, 0.5, "no completed run reports any of: " + ", ".join(CHART_COLUMNS), ha="center", va="center")
        return fig
    ncols = min(len(shown), 4)
    nrows = math.ceil(len(shown) / ncols)
    fig = new_figure(max(3.2, 0.5 * len(rows) + 1.5) * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    names = [r.experiment for r in rows]
    colors = colormaps["tab20"]
    x = np.arange(len(rows))
    for ax, column in zip(axes, shown):
        stats = [r.stats(column) for r in rows]
        means = [s[0] if s else np.nan for s in stats]
        stds = [s[1] if s and not math.isnan(s[1]) else 0.0 for s in stats]
        ax.bar(x, means, yerr=stds, capsize=3, color=[colors(i % colors.N) for i in x])
        for i in np.flatnonzero(np.isnan(means)):  # say why a bar is missing instead of leaving a gap
            ax.text(i, 0, "no data", rotation=90, ha="center", va="bottom", fontsize=7, color="gray")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        ax.set_title(column, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(shown) :]:
        ax.set_axis_off()
    return fig


def upload_to_wandb(out: Path, sweep_dir: Path, rows: list[ExperimentRow], columns: list[str], png: Path) -> None:
    try:
        import wandb
    except ImportError as exc:  # pragma: no cover - wandb is a declared dependency
        raise RunDirError("--wandb needs the wandb package: pip install wandb") from exc
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    header = ["experiment", "n_seeds", *(f"{c}_{s}" for c in columns for s in ("mean", "std")), "not_completed"]
    data = [[row.experiment, len(row.completed), *_mean_std(row, columns), row.issues] for row in rows]
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "consisid_lab"),
        group=sweep_dir.name,
        job_type="report",
        name=f"report-{sweep_dir.parent.name}-{sweep_dir.name}",
        dir=str(out),
        mode=mode,
    )
    try:
        run.log({"ablation_table": wandb.Table(columns=header, data=data), "ablation_chart": wandb.Image(str(png))})
    finally:
        run.finish()
    log.info("uploaded the table to W&B (%s)", mode)


def report(sweep_dir: Path, out: Path | None = None, use_wandb: bool = False) -> list[Path]:
    from consisid_lab.analysis.plots import save_figure

    out = out or sweep_dir
    runs, rows, columns = collect(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(markdown(sweep_dir, runs, rows, columns))
    table, per_run = write_csvs(out, sweep_dir, runs, rows, columns)
    png = save_figure(bar_chart(rows, columns), out / "report.png")
    for r in runs:
        if r.status != "completed":
            log.warning("%s: %s (%s)", r.path, r.status, r.error)
    if use_wandb:
        upload_to_wandb(out, sweep_dir, rows, columns, png)
    return [md, table, per_run, png]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consisid_lab.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: SWEEP_DIR)")
    parser.add_argument("--wandb", action="store_true", help="upload the table to W&B (offline without a key)")
    args = parser.parse_args(argv)
    return run_cli(lambda: report(args.sweep_dir, args.out, args.wandb))


if __name__ == "__main__":
    sys.exit(main())
