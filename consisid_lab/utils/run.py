"""What every task does around the loop: seeding, checkpoint resolution, metrics.json, logger shutdown."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from consisid_lab.utils.faults import DivergenceError, FailureCollector, check_writable, describe_exit

log = logging.getLogger(__name__)

# A running record rewrites its heartbeat this often; `consisid_lab.report` calls a run whose heartbeat is
# much older than this dead even when it cannot see the process (another host).
HEARTBEAT_INTERVAL_S = 30.0

COMPONENT_GROUPS = (
    "backbone",
    "vae",
    "text_encoder",
    "keypoint_renderer",
    "global_encoder",
    "local_encoder",
    "fuser",
    "injector",
)


def seed_everything(seed: int) -> None:
    import lightning.pytorch as pl

    pl.seed_everything(int(seed), workers=True, verbose=False)


def output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


CHECKPOINT_DIR = "checkpoints"  # where a run's ModelCheckpoint writes (conf/callbacks/default.yaml)
LAST_CHECKPOINT = "last.ckpt"


def resolve_ckpt_path(path: str | Path | None) -> str | None:
    """The checkpoint file that ``ckpt_path=...`` means, for every task (train, eval, generate, export).

    ``path`` is a ``.ckpt`` file, a run directory (its ``checkpoints/last.ckpt``) or a run's ``checkpoints``
    directory (its ``last.ckpt``); ``None`` / ``""`` / ``"null"`` mean no checkpoint. Anything else raises
    ``FileNotFoundError`` naming the path, the checkpoints found there (if any) and what to pass instead.
    """
    if path is None or str(path) in ("", "null", "None"):
        return None
    p = Path(str(path)).expanduser()
    if p.is_file():
        return str(p)
    if not p.exists():
        raise FileNotFoundError(
            f"ckpt_path={path} does not exist; pass a run directory (outputs/<experiment>/<time>) or a .ckpt file"
        )
    for candidate in (p / CHECKPOINT_DIR / LAST_CHECKPOINT, p / LAST_CHECKPOINT):
        if candidate.is_file():
            return str(candidate)
    found = sorted(p.glob("*.ckpt")) + sorted((p / CHECKPOINT_DIR).glob("*.ckpt"))
    if found:
        listed = ", ".join(str(f) for f in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        hint = f"it holds {listed}: pass one of them as ckpt_path=<file>"
    else:
        hint = (
            "it holds no .ckpt file at all; pass the output directory of a training run that saved one "
            f"(outputs/<experiment>/<time>, with {CHECKPOINT_DIR}/{LAST_CHECKPOINT}) or a .ckpt file"
        )
    raise FileNotFoundError(f"ckpt_path={path} is a directory without {CHECKPOINT_DIR}/{LAST_CHECKPOINT}; {hint}")


def component_names(cfg: DictConfig) -> dict[str, str]:
    """The chosen variant of each component group, read from Hydra's choices (``model/fuser: perceiver``)."""
    from hydra.core.hydra_config import HydraConfig

    names: dict[str, str] = {}
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        for group in COMPONENT_GROUPS:
            choice = choices.get(f"model/{group}")
            if choice is not None:
                names[group] = str(choice)
    model = cfg.get("model") or {}
    if "injector" in model and model.injector.get("position"):
        names["injector_position"] = str(model.injector.position)
    if "local_encoder" in model and model.local_encoder.get("arcface_layer") and model.local_encoder.get("arcface"):
        names["arcface_layer"] = str(model.local_encoder.arcface_layer)
    if "global_encoder" in model and "use_kps" in model.global_encoder:
        names["use_kps"] = str(bool(model.global_encoder.use_kps)).lower()
    if "global_encoder" in model and model.global_encoder.get("face_frames"):
        names["face_frames"] = str(model.global_encoder.face_frames)
    return names


# Overrides that say where or how a run is recorded, not what it trains: never part of a report row's key.
BOOKKEEPING_OVERRIDES = ("seed", "ckpt_path", "experiment", "experiment_name", "tags", "task_name", "optimized_metric")
BOOKKEEPING_PREFIXES = ("paths", "hydra", "logger", "callbacks.progress")


def recorded_overrides(overrides: list[str]) -> list[str]:
    """The task overrides that define what a run trains (``model/fuser=mlp``, ``model.lr=...``, ``data.*``, ...):
    all of them but the seed, the experiment (recorded on its own), paths, checkpoints to resume, loggers and
    Hydra's own settings (``BOOKKEEPING_OVERRIDES`` / ``BOOKKEEPING_PREFIXES``). A report keys its rows by the
    experiment plus these, so runs that differ in any of them are never averaged together."""
    kept = []
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        if key in BOOKKEEPING_OVERRIDES:
            continue
        if any(key == p or key.startswith(p + ".") or key.startswith(p + "/") for p in BOOKKEEPING_PREFIXES):
            continue
        kept.append(item)
    return kept


def task_overrides() -> list[str]:
    """The command-line overrides of this Hydra job (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def benchmark_fingerprint(cfg: DictConfig) -> dict | None:
    """The stand-in hashes of the recipe this run used (``consisid_lab.encoders.store.standin_fingerprint``)."""
    from consisid_lab.encoders.store import standin_fingerprint

    paths = cfg.get("paths") or {}
    if not paths.get("standin_dir"):
        return None
    return standin_fingerprint(str(paths.standin_dir), str(cfg.get("standins_recipe", "default")))


def checkpoint_step(path: str | Path) -> int | None:
    """The ``global_step`` a training checkpoint was saved at (memory-mapped: tensors are not read)."""
    from consisid_lab.utils.checkpoints import load_checkpoint

    try:
        ckpt = load_checkpoint(path, mmap=True)
    except Exception:  # noqa: BLE001 - a checkpoint that does not load has no step to report
        return None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return int(step) if isinstance(step, int) else None


def checkpoint_run_dir(path: str | Path) -> Path:
    """The run directory a checkpoint file belongs to (the folder above ``checkpoints/``, else its folder)."""
    p = Path(path).resolve()
    return p.parent.parent if p.parent.name == CHECKPOINT_DIR else p.parent


@dataclass
class RunRecord:
    """``metrics.json`` of a run: written at start (``running``, then a heartbeat every
    ``HEARTBEAT_INTERVAL_S``), at the end (``completed``) or on failure (``failed``, or ``diverged`` with the step
    and the last good checkpoint). A sweep launcher marks a member whose process died ``crashed``
    (``record_crash``). ``errors`` lists the named failures reported during the run (``report_failure``)."""

    path: Path
    experiment: str
    seed: int
    started: float
    components: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # ``recorded_overrides`` of the task's overrides
    benchmark: dict | None = None  # ``benchmark_fingerprint``: the stand-ins this run measured with
    metrics: dict[str, float] = field(default_factory=dict)
    stability: dict[str, float] = field(default_factory=dict)
    train_time_s: float | None = None
    loggers: list = field(default_factory=list)  # closed when the run ends, whatever happens
    failures: FailureCollector = field(default_factory=FailureCollector)
    status: str = "running"
    extra: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _heartbeat: threading.Thread | None = field(default=None, repr=False)

    @classmethod
    def start(cls, cfg: DictConfig) -> RunRecord:
        out = output_dir()
        check_writable(out)
        rec = cls(
            path=out / "metrics.json",
            experiment=str(cfg.get("experiment_name")),
            seed=int(cfg.get("seed", 0)),
            started=time.time(),
            overrides=recorded_overrides(task_overrides()),
        )
        OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
        rec.write("running")
        return rec

    def start_heartbeat(self, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        """Rewrite the running record every ``interval_s`` (a daemon thread: it dies with the process)."""

        def beat() -> None:
            while not self._stop.wait(interval_s):
                self.write("running")

        self._heartbeat = threading.Thread(target=beat, name="metrics.json heartbeat", daemon=True)
        self._heartbeat.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()

    def set_components(self, cfg: DictConfig) -> None:
        """Record the chosen component variants and the benchmark version (once the stand-ins are built)."""
        self.components = component_names(cfg)
        self.benchmark = benchmark_fingerprint(cfg)

    def resume_from(self, ckpt_path: str) -> None:
        """Record that the run continues ``ckpt_path`` and carry the CSV log's earlier steps into it."""
        from consisid_lab.utils.csv_log import continue_logs

        step = checkpoint_step(ckpt_path)
        self.extra.update(resumed_from=str(ckpt_path), resumed_at_step=step)
        if step is not None:
            continue_logs(self.loggers, step, self.path.parent, checkpoint_run_dir(ckpt_path))

    def finish(self, callback_metrics: dict[str, Any], stability: dict[str, float]) -> None:
        self.metrics = {k: float(v) for k, v in callback_metrics.items() if _is_scalar(v)}
        self.stability = dict(stability)
        self.write("completed")

    def fail(self, err: BaseException) -> None:
        error, trace = f"{type(err).__name__}: {err}", traceback.format_exc()
        if isinstance(err, DivergenceError):
            self.extra.update(diverged_at_step=err.step, last_good_checkpoint=err.last_good_checkpoint)
            self.write("diverged", error=error, trace=trace)
        else:
            self.write("failed", error=error, trace=trace)

    def write(self, status: str, error: str | None = None, trace: str | None = None) -> None:
        with self._lock:
            if self.status != "running" and status == "running":
                return  # a late heartbeat never overwrites the final status
            self.status = status
            now = time.time()
            data = {
                "experiment": self.experiment,
                "seed": self.seed,
                "status": status,
                "error": error,
                "errors": list(self.failures.failures),
                "wall_time_s": now - self.started,
                "train_time_s": self.train_time_s,
                "metrics": self.metrics,
                "stability": self.stability,
                "components": self.components,
                "overrides": self.overrides,
                "benchmark": self.benchmark,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "heartbeat": now,
                **self.extra,
            }
            if trace:
                data["traceback"] = trace
            _write_json(self.path, data)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write-then-rename, so a reader (or a kill) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def record_crash(
    run_dir: Path, returncode: int, cfg: DictConfig | None = None, native_trace: str | None = None
) -> None:
    """Mark the run in ``run_dir`` ``crashed`` after its process died without finishing its record.

    Called by the sweep launcher, which saw the process exit: ``returncode`` as ``subprocess`` reports it
    (negative = killed by that signal). Keeps what the run had recorded; writes a new record if it had none.
    """
    path = run_dir / "metrics.json"
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    if data.get("status") not in (None, "running"):
        return  # the run recorded its own end before dying (e.g. while shutting down)
    sig, sentence = describe_exit(returncode)
    error = f"the run's process {sentence}"
    if data.get("heartbeat"):
        error += f"; last heartbeat {time.time() - float(data['heartbeat']):.0f} s before"
    cfg = cfg if cfg is not None else OmegaConf.create()
    data.setdefault("experiment", str(cfg.get("experiment_name")))
    data.setdefault("seed", int(cfg.get("seed", 0)))
    data.update(status="crashed", error=error, exit_code=returncode, signal=sig)
    if native_trace:
        data["native_trace"] = native_trace
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, data)


def _is_scalar(v: Any) -> bool:
    if hasattr(v, "numel"):
        return v.numel() == 1
    return isinstance(v, (int, float))


@contextmanager
def recorded_run(cfg: DictConfig) -> Iterator[RunRecord]:
    """The run's ``metrics.json`` for its whole life: ``running`` at start with a heartbeat, ``failed`` (or
    ``diverged``) with the error on any exception (re-raised); the failures reported meanwhile are listed in it;
    the loggers put on the record are always closed."""
    record = RunRecord.start(cfg)
    record.start_heartbeat()
    try:
        with record.failures:
            yield record
    except BaseException as err:
        record.stop_heartbeat()
        record.fail(err)
        raise
    finally:
        record.stop_heartbeat()
        close_loggers(record.loggers)


def log_config(loggers: list, cfg: DictConfig) -> None:
    params = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(params)


def close_loggers(loggers: list) -> None:
    """Always close W&B (also on failure) so offline files are complete and no service process lingers."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()
