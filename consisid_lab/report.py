"""Ablation table of a sweep, the verdicts of its declared claims and its learning curves.

    python -m consisid_lab.report SWEEP_DIR [--claims CLAIMS.yaml] [--out DIR] [--wandb]

``SWEEP_DIR`` is a Hydra multirun directory (``multirun/<date>/<time>/``, or any folder above job dirs): every
folder holding ``.hydra/config.yaml`` is one run. A row is one experiment *plus* the overrides its runs were
trained with (``metrics.json`` ``overrides``: ``-m model/fuser=perceiver,mlp`` gives two rows), labelled by the
experiment and the overrides in which that experiment's rows differ: ``full [model/fuser=mlp]``. Runs measured with
different stand-in encoders (``benchmark.version``) are refused, never averaged. Writes to ``--out`` (default:
``SWEEP_DIR``):

- ``report.md``: one row per row label, mean ± std [95% bootstrap CI of the mean] over its completed seeds for
  the metrics present, the claims' verdicts (with ``--claims``), then every run that did not complete with its
  status and error (failed, diverged with its step, crashed with the signal, running, died = its process is gone
  with the last heartbeat, or unfinished = no ``metrics.json``);
- ``report.csv``: the same rows with ``<metric>_mean`` / ``_std`` / ``_ci_low`` / ``_ci_high`` columns;
- ``report_runs.csv``: one row per run (status, error, every value);
- ``report.png``: bars of the main metrics with std error bars;
- ``report_curves.png`` / ``report_grad_norm.png``: the validation identity gap and the gradient norm against
  step, one line per row (mean over seeds, ±1 sd band); the area under the identity-gap curve is the
  ``val_identity_gap_auc`` column;
- with ``--claims``: ``report_claims.csv`` (paired difference per claim: seeds, mean, 95% CI (the union of the
  bootstrap and paired t intervals), MDE, verdict) and
  ``report_forest.png`` (``consisid_lab.analysis.claims`` describes the file, ``consisid_lab.analysis.stats``
  the statistics).

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

from consisid_lab.analysis.claims import ClaimResult, ClaimsError, evaluate_claims, load_claims
from consisid_lab.analysis.curves import GRAD_NORM_KEY, IDENTITY_GAP_AUC, IDENTITY_GAP_KEY, csv_log, read_curves
from consisid_lab.analysis.run_dirs import SWEEP_HINT, RunDirError, RunInfo, find_run_dirs, read_run, run_cli
from consisid_lab.analysis.spectrum import SCALAR_NAMES
from consisid_lab.analysis.stats import UnpairedSeedsError, bootstrap_mean_ci

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

IDENTITY_COLUMNS = ("facesim", "facesim_low", "facesim_high", "fid", "id_drift", "facesim_shuffled")
FREQUENCY_COLUMNS = tuple(f"gen_{name}" for name in SCALAR_NAMES)
STABILITY_COLUMNS = ("max_grad_norm", "nan_events")
KNOWN_COLUMNS = (*IDENTITY_COLUMNS, IDENTITY_GAP_AUC, *FREQUENCY_COLUMNS, *STABILITY_COLUMNS, "wall_time_s")
CHART_COLUMNS = ("facesim", "facesim_low", "facesim_high", "fid", "id_drift", "gen_hf_ratio_025", "max_grad_norm")
MAX_ERROR_CHARS = 300


@dataclass
class ExperimentRow:
    """The runs of one experiment trained with one set of overrides (``RunInfo.row_overrides``); ``label`` names
    the experiment and the overrides that differ within the sweep (what claims and figures call the row)."""

    experiment: str
    overrides: tuple[str, ...] = ()
    label: str = ""
    completed: list[RunInfo] = field(default_factory=list)
    incomplete: list[RunInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.label = self.label or self.experiment

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

    def ci(self, column: str) -> tuple[float, float]:
        """95% bootstrap interval of the mean over completed seeds (NaN below two seeds)."""
        return bootstrap_mean_ci([r.values[column] for r in self.completed if column in r.values])

    @property
    def issues(self) -> str:
        counts: dict[str, int] = {}
        for r in self.incomplete:
            counts[r.status] = counts.get(r.status, 0) + 1
        return ", ".join(f"{n} {status}" for status, n in counts.items())


def check_benchmark(runs: list[RunInfo], sweep_dir: Path) -> None:
    """Refuse runs measured with different stand-in encoders: their numbers are on different scales."""
    first: dict[str, RunInfo] = {}
    for run in runs:
        if run.benchmark_version is not None:
            first.setdefault(run.benchmark_version, run)
    if len(first) > 1:
        (a, run_a), (b, run_b), *_ = first.items()
        more = f" (and {len(first) - 2} more)" if len(first) > 2 else ""
        raise RunDirError(
            f"{sweep_dir} mixes benchmark versions: stand-in hash {a} ({_rel(run_a.path, sweep_dir)}, ...) and "
            f"{b} ({_rel(run_b.path, sweep_dir)}, ...){more}; their metrics are not comparable and are never "
            "averaged. Report each version's runs separately (move them to their own folders) or rerun the "
            "older runs on the current stand-ins"
        )


def row_labels(runs: list[RunInfo]) -> dict[tuple[str, tuple[str, ...]], str]:
    """Label of each (experiment, overrides) key: the experiment, plus the overrides in which its rows differ
    (``full [model/fuser=mlp]``); an experiment with one set of overrides is labelled by its name alone."""
    keys = list(dict.fromkeys((r.experiment, tuple(r.row_overrides)) for r in runs))
    labels = {}
    for experiment in dict.fromkeys(k[0] for k in keys):
        own = [k for k in keys if k[0] == experiment]
        common = set(own[0][1]).intersection(*(set(k[1]) for k in own[1:]))
        for key in own:
            shown = [o for o in key[1] if o not in common]
            labels[key] = f"{experiment} [{' '.join(shown)}]" if shown else experiment
    if len(set(labels.values())) < len(labels):  # the same overrides in another order: name them all
        labels = {k: f"{k[0]} [{' '.join(k[1])}]" if k[1] else k[0] for k in keys}
    return labels


def collect(sweep_dir: Path) -> tuple[list[RunInfo], list[ExperimentRow], list[str]]:
    """Runs, one row per experiment and overrides (in sweep order), and the value columns present in any run."""
    if not sweep_dir.is_dir():
        raise RunDirError(f"{sweep_dir} does not exist or is not a directory")
    run_dirs = find_run_dirs(sweep_dir)
    if not run_dirs:
        raise RunDirError(
            f"{sweep_dir} is not a sweep directory: no run below it has .hydra/config.yaml or metrics.json; "
            f"a sweep is produced by `{SWEEP_HINT}` (under multirun/<date>/<time>/)"
        )
    runs = [read_run(d) for d in run_dirs]
    check_benchmark(runs, sweep_dir)
    labels = row_labels(runs)
    rows: dict[tuple[str, tuple[str, ...]], ExperimentRow] = {}
    for run in runs:
        key = (run.experiment, tuple(run.row_overrides))
        row = rows.setdefault(key, ExperimentRow(run.experiment, key[1], labels[key]))
        (row.completed if run.status == "completed" else row.incomplete).append(run)
    present = {c for r in runs for c in r.values}
    columns = [c for c in KNOWN_COLUMNS if c in present] + sorted(present - set(KNOWN_COLUMNS))
    return runs, list(rows.values()), columns


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _cell(stats: tuple[float, float, int] | None, n_seeds: int, ci: tuple[float, float] | None = None) -> str:
    if stats is None:
        return ""
    mean, std, n = stats
    text = _fmt(mean) if math.isnan(std) else f"{_fmt(mean)} ± {_fmt(std)}"
    if ci is not None and not math.isnan(ci[0]):
        text += f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"
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


def markdown(
    sweep_dir: Path,
    runs: list[RunInfo],
    rows: list[ExperimentRow],
    columns: list[str],
    claims: list[ClaimResult] | None = None,
) -> str:
    lines = [f"# Ablation report: `{sweep_dir}`", ""]
    n_done = sum(r.status == "completed" for r in runs)
    versions = sorted({r.benchmark_version for r in runs if r.benchmark_version})
    bench = f"; benchmark (stand-in hash) {versions[0]}" if versions else ""
    lines += [
        f"{len(runs)} runs, {n_done} completed{bench}; mean ± std [95% bootstrap CI of the mean] over completed "
        "seeds.",
        "",
    ]
    header = ["row", "seeds", *columns, "not completed"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        seeds = ",".join("?" if s is None else str(s) for s in row.seeds)
        cells = [row.label, f"{len(row.completed)} ({seeds})" if row.completed else "0"]
        cells += [_cell(row.stats(c), len(row.completed), row.ci(c)) for c in columns]
        cells.append(row.issues)
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    if claims is not None:
        lines += ["", "## Claims", ""]
        lines += [
            "Paired by seed: difference = treatment - control; 95% CI of its mean = the wider of the bootstrap and "
            "the paired t interval (a bootstrap of a few seeds cannot leave their range); MDE = the smallest mean "
            "difference a paired t-test (alpha 0.05, power 0.8) detects at this seed count and spread; seeds needed = "
            "the smallest seed count whose MDE at this spread is at most the observed difference (- : over 100).",
            "",
            "| claim | treatment | control | metric | expected | seeds | difference | 95% CI | MDE | seeds needed "
            "| verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for res in claims:
            c, d = res.claim, res.difference
            cells = [c.claim, c.treatment, c.control, c.metric, c.direction, f"{d.n} ({','.join(map(str, d.seeds))})"]
            needed = "-" if d.seeds_needed is None else str(d.seeds_needed)
            cells += [_fmt(d.mean), f"[{_fmt(d.ci_low)}, {_fmt(d.ci_high)}]", _fmt(d.mde), needed]
            cells.append(f"**{res.verdict}**")
            lines.append("| " + " | ".join(_md_escape(x) for x in cells) + " |")
    incomplete = [r for r in runs if r.status != "completed"]
    label_of = {id(r): row.label for row in rows for r in row.completed + row.incomplete}
    lines += ["", "## Runs that did not complete", ""]
    if not incomplete:
        lines.append("None.")
    else:
        lines += ["| run | row | seed | status | error |", "|---|---|---|---|---|"]
        for r in incomplete:
            cells = [_rel(r.path, sweep_dir), label_of[id(r)], "" if r.seed is None else str(r.seed), r.status]
            cells.append(r.error or "")
            lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    reported = [(r, f) for r in runs for f in r.failures]
    if reported:
        lines += ["", "## Failures reported during runs (skipped metrics, samples, spectra)", ""]
        lines += ["| run | status | failure |", "|---|---|---|"]
        lines += [f"| {_md_escape(_rel(r.path, sweep_dir))} | {r.status} | {_md_escape(f)} |" for r, f in reported]
    return "\n".join(lines) + "\n"


STAT_SUFFIXES = ("mean", "std", "ci_low", "ci_high")


def _mean_std(row: ExperimentRow, columns: list[str]) -> list[float | None]:
    """``[mean, std, ci_low, ci_high, ...]`` over ``columns``; None where a value is missing or undefined."""
    out: list[float | None] = []
    for c in columns:
        stats = row.stats(c)
        if stats is None:
            out += [None] * len(STAT_SUFFIXES)
            continue
        values = [stats[0], stats[1], *row.ci(c)]
        out += [None if math.isnan(v) else v for v in values]
    return out


def write_csvs(
    out: Path, sweep_dir: Path, runs: list[RunInfo], rows: list[ExperimentRow], columns: list[str]
) -> tuple[Path, Path]:
    table = out / "report.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "row",
                "experiment",
                "overrides",
                "n_seeds",
                "seeds",
                "not_completed",
                *(f"{c}_{s}" for c in columns for s in STAT_SUFFIXES),
            ]
        )
        for row in rows:
            values = ["" if v is None else repr(v) for v in _mean_std(row, columns)]
            seeds = " ".join("" if s is None else str(s) for s in row.seeds)
            overrides = " ".join(row.overrides)
            writer.writerow([row.label, row.experiment, overrides, len(row.completed), seeds, row.issues, *values])
    per_run = out / "report_runs.csv"
    with per_run.open("w", newline="") as f:
        writer = csv.writer(f)
        label_of = {id(r): row.label for row in rows for r in row.completed + row.incomplete}
        writer.writerow(["run", "row", "experiment", "seed", "status", "error", "benchmark", *columns])
        for r in runs:
            values = [repr(r.values[c]) if c in r.values else "" for c in columns]
            seed = "" if r.seed is None else r.seed
            cells = [_rel(r.path, sweep_dir), label_of[id(r)], r.experiment, seed, r.status, r.error or ""]
            writer.writerow([*cells, r.benchmark_version or "", *values])
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
    names = [r.label for r in rows]
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
    header = ["row", "n_seeds", *(f"{c}_{s}" for c in columns for s in STAT_SUFFIXES), "not_completed"]
    data = [[row.label, len(row.completed), *_mean_std(row, columns), row.issues] for row in rows]
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


def claim_values(rows: list[ExperimentRow]) -> dict[str, dict[int, dict[str, float]]]:
    """row label -> seed -> values of its completed runs; a seed run twice in one row is refused."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for row in rows:
        seeds: dict[int, dict[str, float]] = {}
        where: dict[int, Path] = {}
        for r in row.completed:
            if r.seed is None:
                raise RunDirError(f"{r.path} records no seed; claims pair runs by seed (metrics.json `seed`)")
            if r.seed in seeds:
                raise RunDirError(
                    f"row {row.label!r} has seed {r.seed} twice ({where[r.seed]} and {r.path}); a paired comparison "
                    "needs one run per seed: remove the duplicate run"
                )
            seeds[r.seed], where[r.seed] = r.values, r.path
        out[row.label] = seeds
    return out


def write_claims(out: Path, results: list[ClaimResult]) -> Path:
    path = out / "report_claims.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["claim", "treatment", "control", "metric", "direction", "n_seeds", "seeds", "differences"]
            + ["mean_difference", "sd_difference", "ci_low", "ci_high", "mde", "verdict"]
            + ["bootstrap_ci_low", "bootstrap_ci_high", "t_ci_low", "t_ci_high", "seeds_needed"]
        )
        for res in results:
            c, d = res.claim, res.difference
            writer.writerow(
                [c.claim, c.treatment, c.control, c.metric, c.direction, d.n, " ".join(map(str, d.seeds))]
                + [" ".join(repr(x) for x in d.differences), repr(d.mean), repr(d.sd), repr(d.ci_low)]
                + [repr(d.ci_high), repr(d.mde), res.verdict]
                + [repr(d.boot_low), repr(d.boot_high), repr(d.t_low), repr(d.t_high), d.seeds_needed or ""]
            )
    return path


def forest_plot(results: list[ClaimResult]) -> Figure:
    from consisid_lab.analysis.plots import plot_forest

    d = [r.difference for r in results]
    return plot_forest(
        labels=[f"{r.claim.claim}: {r.claim.treatment} - {r.claim.control}" for r in results],
        means=[x.mean for x in d],
        lows=[x.ci_low for x in d],
        highs=[x.ci_high for x in d],
        mdes=[x.mde for x in d],
        verdicts=[r.verdict for r in results],
        metrics=[r.claim.metric for r in results],
    )


def curve_figures(rows: list[ExperimentRow]) -> tuple[Figure, Figure]:
    """Validation identity gap and gradient norm against step, one line per row over its completed seeds."""
    from consisid_lab.analysis.curves import plot_curves

    gaps: dict[str, list] = {}
    norms: dict[str, list] = {}
    for row in rows:
        for r in row.completed:
            if (log_file := csv_log(r.path)) is None:
                continue
            curves = read_curves(log_file, [IDENTITY_GAP_KEY, GRAD_NORM_KEY])
            if IDENTITY_GAP_KEY in curves:
                gaps.setdefault(row.label, []).append(curves[IDENTITY_GAP_KEY])
            if GRAD_NORM_KEY in curves:
                norms.setdefault(row.label, []).append(curves[GRAD_NORM_KEY])
    hint = "no completed run has a CSV log (logger=csv) with {key}"
    gap_fig = plot_curves(
        gaps,
        "validation identity gap",
        "identity gap against step (mean ± sd over seeds)",
        note=hint.format(key=IDENTITY_GAP_KEY),
    )
    norm_fig = plot_curves(
        norms,
        "gradient norm",
        "gradient norm against step (mean ± sd over seeds)",
        log_y=True,
        note=hint.format(key=GRAD_NORM_KEY),
    )
    return gap_fig, norm_fig


def report(
    sweep_dir: Path, out: Path | None = None, use_wandb: bool = False, claims_file: Path | None = None
) -> list[Path]:
    from consisid_lab.analysis.plots import save_figure

    out = out or sweep_dir
    runs, rows, columns = collect(sweep_dir)
    results = evaluate_claims(load_claims(claims_file), claim_values(rows)) if claims_file is not None else None
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(markdown(sweep_dir, runs, rows, columns, results))
    table, per_run = write_csvs(out, sweep_dir, runs, rows, columns)
    png = save_figure(bar_chart(rows, columns), out / "report.png")
    gap_fig, norm_fig = curve_figures(rows)
    written = [md, table, per_run, png]
    written += [save_figure(gap_fig, out / "report_curves.png"), save_figure(norm_fig, out / "report_grad_norm.png")]
    if results is not None:
        written += [write_claims(out, results), save_figure(forest_plot(results), out / "report_forest.png")]
    for r in runs:
        if r.status != "completed":
            log.warning("%s: %s (%s)", r.path, r.status, r.error)
    if use_wandb:
        upload_to_wandb(out, sweep_dir, rows, columns, png)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consisid_lab.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: SWEEP_DIR)")
    parser.add_argument("--claims", type=Path, default=None, help="claims yaml: verdict table and forest plot")
    parser.add_argument("--wandb", action="store_true", help="upload the table to W&B (offline without a key)")
    args = parser.parse_args(argv)
    # A bad claims file or unpaired seeds is the user's input, said in one line like a bad sweep dir.
    return run_cli(
        lambda: report(args.sweep_dir, args.out, args.wandb, args.claims), (ClaimsError, UnpairedSeedsError)
    )


if __name__ == "__main__":
    sys.exit(main())
