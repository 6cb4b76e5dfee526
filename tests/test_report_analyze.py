"""`consisid_lab.report` on a synthetic sweep and `consisid_lab.analyze` on synthetic runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from consisid_lab import analyze, report
from consisid_lab.analysis import SpectrumResult, compute_spectrum


def _job(root: Path, num: int, experiment: str, seed: int, metrics: dict | None) -> Path:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(f"experiment_name: {experiment}\nseed: {seed}\n")
    (job / ".hydra" / "overrides.yaml").write_text(f"- +experiment={experiment}\n- seed={seed}\n")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def _metrics(experiment: str, seed: int, facesim: float, extra: dict | None = None, **kw) -> dict:
    metrics = {
        "test/facesim": facesim,
        "test/facesim_low": facesim - 0.1,
        "test/fid": 100.0 + seed,
        "freq/generated_faces/hf_ratio_025": 0.2 + 0.01 * seed,
    }
    metrics.update(extra or {})
    data = {
        "experiment": experiment,
        "seed": seed,
        "status": "completed",
        "error": None,
        "wall_time_s": 10.0,
        "metrics": metrics,
        "stability": {"max_grad_norm": 2.0 + seed, "nan_events": 0},
    }
    data.update(kw)
    return data


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    _job(root, 0, "full", 0, _metrics("full", 0, 0.70))
    _job(root, 1, "full", 1, _metrics("full", 1, 0.74))
    _job(root, 2, "full", 2, _metrics("full", 2, 0.0, status="failed", error="gradient norm exploded: inf"))
    _job(root, 3, "no_local", 0, _metrics("no_local", 0, 0.50, extra={"test/id_drift": 0.3}))
    _job(root, 4, "no_local", 1, None)  # killed before writing metrics.json
    _job(root, 5, "no_global", 0, _metrics("no_global", 0, 0.05, status="failed", error="NaN loss | step 3"))
    return root


def test_report_tables_failed_and_unfinished_runs(sweep, tmp_path):
    out = tmp_path / "report"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    with open(out / "report.csv") as f:
        rows = {r["experiment"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["full", "no_local", "no_global"]  # sweep order, failed-only experiment kept
    full = rows["full"]
    assert full["n_seeds"] == "2" and full["seeds"] == "0 1" and full["not_completed"] == "1 failed"
    assert float(full["facesim_mean"]) == pytest.approx(0.72)
    assert float(full["facesim_std"]) == pytest.approx(np.std([0.70, 0.74], ddof=1))
    assert float(full["gen_hf_ratio_025_mean"]) == pytest.approx(0.205)
    assert float(full["max_grad_norm_mean"]) == pytest.approx(2.5)
    assert full["id_drift_mean"] == ""  # a metric only another experiment reports: blank, not dropped
    no_local = rows["no_local"]
    assert float(no_local["id_drift_mean"]) == pytest.approx(0.3) and no_local["id_drift_std"] == ""
    assert no_local["not_completed"] == "1 unfinished"
    assert rows["no_global"]["n_seeds"] == "0" and rows["no_global"]["facesim_mean"] == ""

    md = (out / "report.md").read_text()
    assert "0.72 ± 0.02828" in md
    assert "gradient norm exploded: inf" in md
    assert "NaN loss \\| step 3" in md  # escaped so the table stays intact
    assert "no metrics.json; the run did not finish" in md and "ckpt_path=" in md
    with open(out / "report_runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert [r["status"] for r in runs] == ["completed", "completed", "failed", "completed", "unfinished", "failed"]
    assert runs[4]["run"] == "4"
    assert (out / "report.png").stat().st_size > 1000


def test_report_calls_a_running_record_of_a_dead_process_died(sweep, tmp_path):
    import socket
    import time

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer exists
    beat = time.time() - 120
    here = {"pid": gone.pid, "host": socket.gethostname(), "heartbeat": beat}
    _job(sweep, 6, "full", 3, _metrics("full", 3, 0.7, status="running", **here))
    elsewhere = {"pid": 1, "host": "another-node", "heartbeat": time.time() - 3600}
    _job(sweep, 7, "full", 4, _metrics("full", 4, 0.7, status="running", **elsewhere))
    alive = {"pid": os.getpid(), "host": socket.gethostname(), "heartbeat": time.time()}
    _job(sweep, 8, "full", 5, _metrics("full", 5, 0.7, status="running", **alive))
    assert report.main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "report_runs.csv") as f:
        runs = {r["run"]: r for r in csv.DictReader(f)}
    assert runs["6"]["status"] == "died" and f"pid {gone.pid}" in runs["6"]["error"]
    assert time.strftime("%Y-%m-%d %H:%M", time.localtime(beat)) in runs["6"]["error"], "the last heartbeat"
    assert runs["7"]["status"] == "died" and "no heartbeat for 60.0 min" in runs["7"]["error"]
    assert runs["8"]["status"] == "running"


def test_report_defaults_to_the_sweep_dir_and_runs_as_a_module(sweep):
    proc = subprocess.run([sys.executable, "-m", "consisid_lab.report", str(sweep)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert {"report.md", "report.csv", "report_runs.csv", "report.png"} <= {p.name for p in sweep.iterdir()}


def test_report_rejects_a_dir_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "consisid_lab.report", str(tmp_path / "empty")], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert ".hydra/config.yaml" in proc.stderr and "python -m consisid_lab.train -m" in proc.stderr
    assert report.main([str(tmp_path / "missing")]) != 0


def _run_dir(root: Path, name: str, experiment: str, seed: int, images: torch.Tensor) -> Path:
    run = _job(root, 0, experiment, seed, _metrics(experiment, seed, 0.7)).rename(root / name)
    compute_spectrum(images, "generated_faces").to_npz(run / "spectra" / "generated_faces.npz")
    return run


def test_analyze_two_runs_writes_figure_and_data(tmp_path):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(8, 1, 16, 16, generator=g)
    smooth = torch.nn.functional.avg_pool2d(noise, 3, stride=1, padding=1)
    runs = [_run_dir(tmp_path, "a", "only_high", 0, noise), _run_dir(tmp_path, "b", "only_low", 0, smooth)]
    out = tmp_path / "fig"
    assert analyze.main([*map(str, runs), "--out", str(out)]) == 0
    data = np.load(out / "generated_face_spectra.npz")
    assert list(data["labels"]) == ["only_high", "only_low"]
    expected = SpectrumResult.from_npz(runs[1] / "spectra" / "generated_faces.npz")
    np.testing.assert_allclose(data["curve_1"], expected.rel_curve)
    assert data["map_0"].shape == (16, 16)
    with open(out / "generated_face_spectra_scalars.csv") as f:
        scalars = {r["label"]: r for r in csv.DictReader(f)}
    # the smoothed run has less high-frequency energy: the figure's data carries the difference
    assert float(scalars["only_low"]["hf_ratio_025"]) < float(scalars["only_high"]["hf_ratio_025"])
    with open(out / "generated_face_spectra_curves.csv") as f:
        assert sum(1 for r in csv.DictReader(f) if r["label"] == "only_high") == len(expected.radius)
    assert (out / "generated_face_spectra.png").stat().st_size > 1000

    # same experiment twice: labels are disambiguated by seed; explicit labels win
    twin = _run_dir(tmp_path, "c", "only_high", 1, noise)
    assert analyze.run_labels([runs[0], twin]) == ["only_high (seed 0)", "only_high (seed 1)"]
    assert analyze.main([str(runs[0]), str(twin), "--out", str(out), "--labels", "x", "y"]) == 0
    assert list(np.load(out / "generated_face_spectra.npz")["labels"]) == ["x", "y"]


def test_analyze_names_the_missing_file_and_the_command(tmp_path, caplog):
    run = _job(tmp_path, 0, "full", 0, _metrics("full", 0, 0.7))
    proc = subprocess.run(
        [sys.executable, "-m", "consisid_lab.analyze", str(run), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "spectra/generated_faces.npz" in proc.stderr and "python -m consisid_lab.train" in proc.stderr
    (tmp_path / "plain").mkdir()
    assert analyze.main([str(tmp_path / "plain")]) != 0
    assert "not a run directory" in caplog.text
    assert analyze.main([str(tmp_path)]) != 0  # a folder of runs is a sweep: says which runs to pass
    assert "sweep directory" in caplog.text


@pytest.mark.slow
def test_report_uploads_to_wandb_offline_without_a_key(sweep, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["WANDB_SILENT"] = "true"
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "consisid_lab.report", str(sweep), "--out", str(out), "--wandb"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "offline" in proc.stderr
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
