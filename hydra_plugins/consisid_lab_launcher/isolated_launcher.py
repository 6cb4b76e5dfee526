"""A Hydra launcher that runs each sweep member in its own process, so that one member's death ends only it.

In-process launchers (Hydra's basic one) lose the whole sweep when a member dies natively: a segmentation
fault in a native library, the out-of-memory killer, ``kill -9``. Here each member is a fresh Python process
(``python -m hydra_plugins.consisid_lab_launcher.member``) that runs Hydra's ``run_job`` exactly as the basic
launcher would (same output dirs, same ``.hydra`` files, same job numbers). When a member's process dies without
handing back its result, its ``metrics.json`` is marked ``crashed`` with the signal or exit code (and the Python
stacks that ``faulthandler`` wrote at a native crash), and the sweep goes on with the next member.

``n_jobs`` members run at once (default 1: a sweep on one GPU runs its members one after another).

Members are forked from a server process that has already imported torch, Lightning, diffusers and the project
(``preload``, default true): each member still runs in its own process, but skips those imports (about 7 s of a
member's start on 2 CPU threads). ``hydra.launcher.preload=false`` starts each member as a fresh interpreter.

Rerunning the same multirun command into the same sweep dir continues the sweep: a member whose
``metrics.json`` says ``completed`` (or ``diverged``: a result, which a rerun would only repeat) is skipped, one
with a loadable checkpoint in its ``checkpoints/`` is resumed from it (``ckpt_path=<its run dir>``), any other is
started; one log line per member says which, and a summary closes the sweep. The sweep dir is time-stamped by
default (``conf/hydra/default.yaml``), so pass it explicitly to rerun into it::

    python -m consisid_lab.train -m +experiment=full,no_global seed=0,1,2 hydra.sweep.dir=multirun/study
    # killed, or some members crashed: the same command again skips, resumes, starts

A member dir that holds a run of *other* overrides (the sweep was changed, so job numbers moved) is refused
before anything starts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

FINISHED_STATUSES = ("completed", "diverged")  # results: a rerun skips them
RESUME_OVERRIDE = "ckpt_path"

PAYLOAD_FILE = ".member_payload.pkl"
RESULT_FILE = ".member_result.pkl"
NATIVE_TRACE_FILE = "native_trace.log"
MAX_TRACE_CHARS = 8000


class _Member:
    """A started member. A plain class: Hydra's plugin scan runs this module before it is in ``sys.modules``,
    where dataclasses cannot resolve postponed annotations."""

    def __init__(self, idx: int, overrides: list[str], config: DictConfig, run_dir: Path, process: subprocess.Popen):
        self.idx, self.overrides, self.config, self.run_dir, self.process = idx, overrides, config, run_dir, process


# What a member imports before it runs (seconds of each member's start): imported once, in the fork server.
PRELOAD_MODULES = [
    "consisid_lab.train",
    "consisid_lab.models.lit_module",
    "consisid_lab.models.backbone",
    "consisid_lab.encoders.store",
    "diffusers",
    "open_clip",
    "wandb",
    "lightning.pytorch.loggers",
]


class _ForkedProcess:
    """A member forked from a server process that imported :data:`PRELOAD_MODULES` once (multiprocessing's
    forkserver): still its own process, so a native death ends only it, without paying the imports again. The
    interface is the part of ``subprocess.Popen`` the launcher uses; ``returncode`` follows Popen's convention
    (``-N`` for a death by signal N)."""

    _context = None

    def __init__(self, run_dir: Path) -> None:
        import multiprocessing

        from hydra_plugins.consisid_lab_launcher.member import run_forked

        if _ForkedProcess._context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD_MODULES)
            _ForkedProcess._context = context
        self._process = _ForkedProcess._context.Process(target=run_forked, args=(str(run_dir),), daemon=False)
        self._process.start()

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self) -> int | None:
        self._process.join()
        return self._process.exitcode

    def terminate(self) -> None:
        self._process.terminate()


class IsolatedLauncher(Launcher):
    def __init__(self, n_jobs: int = 1, poll_interval_s: float = 0.2, preload: bool = True) -> None:
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
            raise ValueError(f"hydra.launcher.n_jobs must be an integer >= 1 (members run at once), got {n_jobs!r}")
        self.n_jobs = n_jobs
        self.preload = bool(preload)
        self.poll_interval_s = float(poll_interval_s)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self._run_dirs: dict[int, Path] = {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs, each in its own process (%d at a time)", len(job_overrides), self.n_jobs)
        queue: list[tuple[int, list[str]]] = []
        results: dict[int, JobReturn] = {}
        actions: dict[int, str] = {}
        planned = [self._plan(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        for idx, overrides, action, skipped in planned:
            actions[idx] = action
            if skipped is not None:
                results[idx] = skipped
            else:
                queue.append((idx, overrides))
        running: list[_Member] = []
        try:
            while queue or running:
                while queue and len(running) < self.n_jobs:
                    running.append(self._start(*queue.pop(0)))
                for member in [m for m in running if m.process.poll() is not None]:
                    running.remove(member)
                    results[member.idx] = self._collect(member)
                if running:
                    time.sleep(self.poll_interval_s)
        finally:
            for member in running:  # interrupted (Ctrl-C): do not leave members running
                member.process.terminate()
                member.process.wait()
        self._summary(actions, sweep_dir)
        return [results[idx] for idx in sorted(results)]

    def _plan(self, idx: int, overrides: list[str]) -> tuple[int, list[str], str, JobReturn | None]:
        """What a member does in this launch: ``skipped`` (its record says it finished), ``resumed`` (from the
        newest checkpoint in its dir that loads), or ``started``; logs one line saying which."""
        from consisid_lab.utils.checkpoints import newest_loadable_checkpoint
        from consisid_lab.utils.run import checkpoint_step

        assert self.config is not None and self.hydra_context is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        run_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        self._run_dirs[idx] = run_dir
        shown = " ".join(filter_overrides(overrides))
        _check_same_member(run_dir, overrides, idx)
        record = _read_record(run_dir)
        status = record.get("status")
        if status in FINISHED_STATUSES:
            log.info("member %d (%s): %s, skipped (%s)", idx, shown, status, run_dir / "metrics.json")
            return idx, overrides, "skipped", self._skipped(idx, overrides, sweep_config, run_dir, record)
        if any(o.partition("=")[0].lstrip("+~") == RESUME_OVERRIDE for o in overrides):
            log.info("member %d (%s): starting (ckpt_path given by the sweep)", idx, shown)
            return idx, overrides, "started", None
        try:
            ckpt = newest_loadable_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
        except FileNotFoundError:
            ckpt = None
        if ckpt is not None:
            step = checkpoint_step(ckpt)
            log.info("member %d (%s): resuming from %s at step %s", idx, shown, ckpt, step)
            return idx, [*overrides, f"{RESUME_OVERRIDE}={run_dir}"], "resumed", None
        was = f" (was {status}, no checkpoint)" if status else ""
        log.info("member %d (%s): starting%s", idx, shown, was)
        return idx, overrides, "started", None

    def _skipped(
        self, idx: int, overrides: list[str], sweep_config: DictConfig, run_dir: Path, record: dict
    ) -> JobReturn:
        ret = JobReturn(
            overrides=overrides,
            cfg=OmegaConf.create(),
            hydra_cfg=sweep_config,
            working_dir=str(run_dir),
            task_name=str(sweep_config.hydra.job.name),
            status=JobStatus.COMPLETED,
        )
        value = (record.get("metrics") or {}).get(str(sweep_config.get("optimized_metric")))
        ret.return_value = float(value) if isinstance(value, (int, float)) else None
        return ret

    def _summary(self, actions: dict[int, str], sweep_dir: Path) -> None:
        """One closing line: what this launch did per member, and every member's status now."""
        counts = {a: sum(v == a for v in actions.values()) for a in ("skipped", "resumed", "started")}
        statuses: dict[str, list[int]] = {}
        n = len(actions)
        for idx in sorted(actions):
            status = str(_read_record(self._run_dirs[idx]).get("status") or "no metrics.json")
            statuses.setdefault(status, []).append(idx)
        outcome = "; ".join(f"{s}: {len(ids)} (#{', #'.join(map(str, ids))})" for s, ids in statuses.items())
        log.info(
            "sweep %s: %d members, %d skipped, %d resumed, %d started; now %s",
            sweep_dir,
            n,
            counts["skipped"],
            counts["resumed"],
            counts["started"],
            outcome,
        )

    def _start(self, idx: int, overrides: list[str]) -> _Member:
        import cloudpickle

        assert self.config is not None and self.hydra_context is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)
        run_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in (RESULT_FILE, NATIVE_TRACE_FILE):
            (run_dir / name).unlink(missing_ok=True)
        payload = (self.hydra_context, self.task_function, sweep_config, Singleton.get_state())
        (run_dir / PAYLOAD_FILE).write_bytes(cloudpickle.dumps(payload))
        if self.preload:
            process: subprocess.Popen | _ForkedProcess = _ForkedProcess(run_dir)
        else:
            cmd = [sys.executable, "-m", "hydra_plugins.consisid_lab_launcher.member", str(run_dir)]
            process = subprocess.Popen(cmd, env=os.environ.copy())
        return _Member(idx, overrides, sweep_config, run_dir, process)

    def _collect(self, member: _Member) -> JobReturn:
        import cloudpickle

        result, trace = member.run_dir / RESULT_FILE, member.run_dir / NATIVE_TRACE_FILE
        (member.run_dir / PAYLOAD_FILE).unlink(missing_ok=True)
        native = trace.read_text(errors="replace")[-MAX_TRACE_CHARS:] if trace.is_file() else ""
        if trace.is_file() and not native.strip():
            trace.unlink()
        rc = member.process.returncode
        if rc == 0 and result.is_file():
            ret = cloudpickle.loads(result.read_bytes())
            result.unlink()
            return ret
        from consisid_lab.utils.faults import describe_exit
        from consisid_lab.utils.run import record_crash

        record_crash(member.run_dir, rc, member.config, native_trace=native or None)
        log.error(
            "sweep member #%d (%s) %s; recorded as crashed in %s; the sweep goes on",
            member.idx,
            " ".join(filter_overrides(member.overrides)),
            describe_exit(rc)[1],
            member.run_dir / "metrics.json",
        )
        # Completed without a value, like a member whose run failed in Python (see consisid_lab.train.main):
        # a sweeper must not stop the other members because of this one.
        ret = JobReturn(
            overrides=member.overrides,
            cfg=OmegaConf.create(),
            hydra_cfg=member.config,
            working_dir=str(member.run_dir),
            task_name=str(member.config.hydra.job.name),
            status=JobStatus.COMPLETED,
        )
        ret.return_value = None
        return ret


def _read_record(run_dir: Path) -> dict:
    import json

    try:
        data = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_same_member(run_dir: Path, overrides: list[str], idx: int) -> None:
    """Refuse a member dir that holds a run of other overrides: rerunning into it would mix two configs."""
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return
    previous = OmegaConf.to_container(OmegaConf.load(saved))
    if not isinstance(previous, list):
        return

    def key(items: Sequence[str]) -> list[str]:
        return sorted(str(o) for o in items if str(o).partition("=")[0].lstrip("+~") != RESUME_OVERRIDE)

    if key(previous) != key(overrides):
        raise ValueError(
            f"sweep member #{idx} would run in {run_dir}, which holds a run of other overrides "
            f"({' '.join(key(previous))}; this sweep gives it {' '.join(key(overrides))}). Rerun the same "
            "multirun command to continue a sweep, or pass a new hydra.sweep.dir=... for a different one"
        )
