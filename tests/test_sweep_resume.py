"""Runs and sweeps that survive interruption: the CSV log keeps the steps before a resume, metrics.json says what
the run trained and on which benchmark, and a rerun sweep skips, resumes or starts each member."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, TINY_OVERRIDES, compose_train

from consisid_lab.train import train
from consisid_lab.utils.csv_log import ContinuingCSVLogger


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if v} for r in csv.DictReader(f)]


def _cells(rows: list[dict[str, str]], key: str) -> list[int]:
    return [int(r["step"]) for r in rows if key in r]


def test_the_csv_logger_carries_earlier_rows_once(tmp_path):
    log_dir = tmp_path / "csv"
    log_dir.mkdir()
    with open(log_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train/loss", "freq/x"])
        writer.writeheader()
        writer.writerows([{"step": s, "train/loss": s / 10} for s in range(5)])
        writer.writerow({"step": 3, "freq/x": 7})  # logged after the step-3 checkpoint, never logged again
    logger = ContinuingCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    assert logger.continue_from(3) == 5  # rows of steps 0-3; step 4 belongs to the replaced continuation
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log_metrics({"train/loss": 4.0}, 3)
    # Lightning's "previous log files will be deleted" would be false here: the rows are carried over
    assert not [w for w in caught if "will be deleted" in str(w.message)]
    # written back as the writer starts: a resumed run killed before its first flush keeps the earlier steps
    assert sorted(_cells(_rows(tmp_path), "train/loss")) == [0, 1, 2]
    for step in (4, 5):
        logger.log_metrics({"train/loss": 1.0 + step}, step)
    logger.finalize("success")
    rows = _rows(tmp_path)
    assert sorted(_cells(rows, "train/loss")) == [0, 1, 2, 3, 4, 5]
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if "train/loss" in r}
    assert losses[2] == pytest.approx(0.2) and losses[3] == pytest.approx(4.0), "the resumed run's value wins"
    assert _cells(rows, "freq/x") == [3]


def test_a_run_resumed_in_its_own_dir_keeps_its_earlier_log_and_records_the_resume(tmp_path, standin_cache):
    common = ["test=false", "callbacks.checkpoint.every_n_train_steps=1", "trainer.val_check_interval=2"]
    run = tmp_path / "run"
    train(compose_train([*common, "trainer.max_steps=4", "model/fuser=mlp"], run, standin_cache))
    before = _rows(run)
    record = json.loads((run / "metrics.json").read_text())
    assert "model/fuser=mlp" in record["overrides"] and not any("paths." in o for o in record["overrides"])
    assert len(record["benchmark"]["version"]) == 16 and record["benchmark"]["recipe"] == "tiny"
    train(compose_train([*common, "trainer.max_steps=8", "model/fuser=mlp", f"ckpt_path={run}"], run, standin_cache))
    after = _rows(run)
    for key in ("train/loss", "val/identity_gap"):
        steps = _cells(after, key)
        assert len(steps) == len(set(steps)), f"{key} logged twice at some step: {sorted(steps)}"
    assert sorted(_cells(after, "train/loss")) == list(range(8)), "steps before and after the resume"
    assert set(_cells(before, "val/identity_gap")) < set(_cells(after, "val/identity_gap"))
    carried = {int(r["step"]): r["train/loss"] for r in before if "train/loss" in r and int(r["step"]) < 4}
    assert carried == {int(r["step"]): r["train/loss"] for r in after if "train/loss" in r and int(r["step"]) < 4}
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "completed" and record["resumed_at_step"] == 4


def _sweep(sweep: Path, cache: Path, seeds: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONSISID_LAB_CACHE": str(cache), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "consisid_lab.train", "-m", *TINY_OVERRIDES, "trainer.max_steps=2", "test=false",
        "trainer.val_check_interval=100", f"paths.cache_dir={cache}", f"hydra.sweep.dir={sweep}", f"seed={seeds}",
        # members as fresh interpreters: the fast sweep tests (tests/test_faults.py) run them forked (the default)
        "hydra.launcher.preload=false",
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_rerunning_a_sweep_skips_completed_resumes_unfinished_and_starts_missing_members(tmp_path, standin_cache):
    sweep = tmp_path / "sweep"
    first = _sweep(sweep, standin_cache, "0,1,2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (first.stdout + first.stderr).count(": starting") == 3, first.stdout[-3000:]
    # member 1 was killed after its last checkpoint; member 2 never got to write anything
    record = json.loads((sweep / "1" / "metrics.json").read_text())
    (sweep / "1" / "metrics.json").write_text(json.dumps({**record, "status": "crashed", "metrics": {}}))
    for name in ("metrics.json", "checkpoints", "csv"):
        target = sweep / "2" / name
        subprocess.run(["rm", "-rf", str(target)], check=True)
    again = _sweep(sweep, standin_cache, "0,1,2")
    assert again.returncode == 0, again.stderr[-3000:]
    err = again.stdout + again.stderr  # Hydra's console log goes to stdout
    assert "member 0 (" in err and "seed=0): completed, skipped" in err
    assert "member 1 (" in err and f"resuming from {sweep / '1' / 'checkpoints' / 'last.ckpt'} at step 2" in err
    assert "seed=2): starting" in err
    assert "1 skipped, 1 resumed, 1 started; now completed: 3" in err
    statuses = Counter(json.loads((sweep / m / "metrics.json").read_text())["status"] for m in "012")
    assert statuses == {"completed": 3}
    assert json.loads((sweep / "1" / "metrics.json").read_text())["resumed_at_step"] == 2
    # a changed sweep would put other configs into the same member dirs: refused before anything runs
    changed = _sweep(sweep, standin_cache, "5,1,2")
    said = changed.stdout + changed.stderr
    assert changed.returncode != 0 and "holds a run of other overrides" in said and "hydra.sweep.dir" in said
