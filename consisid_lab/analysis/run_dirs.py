"""Reading the run directories that ``consisid_lab.train`` writes (one Hydra job each).

A run dir holds ``.hydra/config.yaml`` and ``.hydra/overrides.yaml`` (written by Hydra when the job starts) and
``metrics.json`` (written when the run starts, rewritten by its heartbeat and when it ends)::

    {"experiment": "full", "seed": 0, "status": "completed" | "failed" | "diverged" | "crashed" | "running",
     "error": null | "text", "errors": [{"source": "BenchmarkMetrics", "message": "...", "time": ...}],
     "wall_time_s": 123.4, "metrics": {"test/facesim": 0.7, ...}, "stability": {"max_grad_norm": 3.1, ...},
     "components": {...}, "overrides": ["model/fuser=mlp", ...], "resumed_at_step": null | 300,
     "benchmark": {"version": "<16 hex>", "recipe": "default", "entries": {"identity_net": "<16 hex>", ...}},
     "pid": 1234, "host": "node1", "heartbeat": 1767000000.0}

``overrides`` are the task overrides that define what the run trains (``consisid_lab.utils.run.
recorded_overrides``: everything but the seed, the experiment, paths, loggers, resume and Hydra settings); a
record without them (older runs) falls back on the same filter applied to ``.hydra/overrides.yaml``.
``benchmark.version`` identifies the stand-in encoders the run was measured with.

``diverged`` adds ``diverged_at_step`` and ``last_good_checkpoint``; ``crashed`` (written by the sweep launcher
when the member's process died) adds ``exit_code``, ``signal`` and ``native_trace``. A ``running`` record whose
process no longer exists is read as ``died``, with its last heartbeat.

The frequency callback adds ``spectra/generated_faces.npz`` at test end.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consisid_lab.analysis.curves import IDENTITY_GAP_AUC, IDENTITY_GAP_KEY, csv_log, normalised_area, read_curves
from consisid_lab.utils.faults import iso_time, pid_alive
from consisid_lab.utils.run import recorded_overrides

METRICS_FILE = "metrics.json"
CONFIG_FILE = Path(".hydra") / "config.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
GENERATED_FACES_FILE = Path("spectra") / "generated_faces.npz"
RERUN_HINT = "python -m consisid_lab.train ... ckpt_path=<dir>"
SWEEP_HINT = "python -m consisid_lab.train -m +experiment=<a>,<b> seed=0,1,2"
# A running record whose heartbeat is this old is dead even when its process cannot be checked (another host):
# many missed heartbeats (``consisid_lab.utils.run.HEARTBEAT_INTERVAL_S``), not one slow write.
STALE_HEARTBEAT_S = 600.0


class RunDirError(ValueError):
    """A directory is not what a command needs; the message names the missing file and how to produce it."""


@dataclass
class RunInfo:
    """What a run dir says about itself; ``values`` are the flat numeric metrics (see ``metric_column``)."""

    path: Path
    experiment: str
    seed: int | None
    status: str  # completed | failed | diverged | crashed | running | died | unfinished
    error: str | None = None
    values: dict[str, float] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # named failures the run reported (``errors``)
    row_overrides: list[str] = field(default_factory=list)  # what the run trains beyond its experiment
    benchmark_version: str | None = None  # stand-in hashes (``benchmark.version`` in metrics.json)


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() or (path / METRICS_FILE).is_file()


def find_run_dirs(root: Path) -> list[Path]:
    """Every Hydra job dir under ``root`` (``root`` itself if it is one), sorted by path (= job order)."""
    if is_run_dir(root):
        return [root]
    found = {p.parent.parent for p in root.rglob(str(CONFIG_FILE))}
    found |= {p.parent for p in root.rglob(METRICS_FILE)}
    # a metrics.json inside a job dir's subfolder (e.g. an eval output) does not make a new run
    return sorted(p for p in found if not any(q != p and q in p.parents for q in found))


def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    if not path.is_file():
        return None
    # unresolved: Hydra's saved config may interpolate ${hydra:...}, which only resolves inside a Hydra job
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _override_value(overrides: list[str], *keys: str) -> str | None:
    for item in overrides:
        name, _, value = item.partition("=")
        if name.lstrip("+~") in keys:
            return value
    return None


def metric_column(key: str) -> str:
    """Column name of a logged metric: ``test/facesim`` -> ``facesim``,
    ``freq/generated_faces/hf_ratio_025`` -> ``gen_hf_ratio_025``; other keys are kept."""
    if key.startswith("test/"):
        return key.removeprefix("test/")
    if key.startswith("freq/generated_faces/"):
        return "gen_" + key.removeprefix("freq/generated_faces/")
    return key


def _numeric(value: Any) -> float | None:
    """Numbers (NaN / inf included: a diverged run's metrics are results too) as float; anything else None."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    return None


def read_run(path: Path) -> RunInfo:
    """Read a run dir; a run without ``metrics.json`` is ``unfinished``, never an exception."""
    cfg = _load_yaml(path / CONFIG_FILE) or {}
    overrides = _load_yaml(path / OVERRIDES_FILE) or []
    overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
    metrics_path = path / METRICS_FILE
    data: dict[str, Any] = {}
    status, error = "unfinished", None
    if not metrics_path.is_file():
        error = f"no {METRICS_FILE}; the run did not finish — rerun with `{RERUN_HINT.replace('<dir>', str(path))}`"
    else:
        try:
            data = json.loads(metrics_path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        except ValueError as exc:
            data, status, error = {}, "failed", f"{METRICS_FILE} is unreadable ({exc})"
        else:
            status = str(data.get("status") or "completed")
            error = data.get("error")
            if status == "running":
                status, error = _running_or_died(data, path)
    experiment = (
        data.get("experiment")
        or (cfg.get("experiment_name") if isinstance(cfg, dict) else None)
        or _override_value(overrides, "experiment")
        or path.name
    )
    if isinstance(experiment, str) and experiment.startswith("${"):
        experiment = _override_value(overrides, "experiment") or path.name
    seed = data.get("seed")
    if seed is None and isinstance(cfg, dict):
        seed = cfg.get("seed")
    if seed is None:
        seed = _override_value(overrides, "seed")
    try:
        seed = int(seed) if seed is not None else None
    except (TypeError, ValueError):
        seed = None
    values: dict[str, float] = {}
    for key, value in (data.get("metrics") or {}).items():
        if (v := _numeric(value)) is not None:
            values[metric_column(key)] = v
    for key, value in (data.get("stability") or {}).items():
        if (v := _numeric(value)) is not None:
            values[key] = v
    if (v := _numeric(data.get("wall_time_s"))) is not None:
        values["wall_time_s"] = v
    if (log_file := csv_log(path)) is not None:
        gap = read_curves(log_file, [IDENTITY_GAP_KEY]).get(IDENTITY_GAP_KEY)
        if gap is not None:
            values[IDENTITY_GAP_AUC] = normalised_area(gap)
    recorded = data.get("overrides")
    row_overrides = [str(o) for o in recorded] if isinstance(recorded, list) else recorded_overrides(overrides)
    benchmark = data.get("benchmark")
    version = benchmark.get("version") if isinstance(benchmark, dict) else None
    failures = [f"{e.get('source')}: {e.get('message')}" for e in (data.get("errors") or []) if isinstance(e, dict)]
    return RunInfo(
        path=path,
        experiment=str(experiment),
        seed=seed,
        status=status,
        error=str(error) if error else None,
        values=values,
        overrides=overrides,
        failures=failures,
        row_overrides=row_overrides,
        benchmark_version=str(version) if version else None,
    )


def _running_or_died(data: dict[str, Any], path: Path) -> tuple[str, str]:
    """A ``running`` record is ``died`` when its process is gone (same host) or its heartbeat went stale."""
    import socket
    import time

    resume = f"resume with `{RERUN_HINT.replace('<dir>', str(path))}`"
    pid, host, beat = data.get("pid"), data.get("host"), data.get("heartbeat")
    if not isinstance(beat, (int, float)):  # written before heartbeats existed: cannot tell
        return "running", f"{METRICS_FILE} says the run is still running (or was killed); {resume}"
    age = time.time() - float(beat)
    last = f"last heartbeat {iso_time(float(beat))} ({age / 60:.1f} min ago)"
    if isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid):
        return "died", f"its process (pid {pid} on {host}) no longer exists; {last}; {resume}"
    if age > STALE_HEARTBEAT_S:
        return "died", f"no heartbeat for {age / 60:.1f} min (pid {pid} on {host}); {last}; {resume}"
    return "running", f"still running (pid {pid} on {host}); {last}"


def run_cli(produce: Callable[[], list[Path]], errors: tuple[type[Exception], ...] = ()) -> int:
    """Shared tail of the `analyze` / `report` commands: log the written files, or the error with exit code 2
    (``RunDirError`` and the command's own input errors, ``errors``)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("consisid_lab")
    try:
        paths = produce()
    except (RunDirError, *errors) as exc:
        log.error("error: %s", exc)
        return 2
    for p in paths:
        log.info("wrote %s", p)
    return 0
