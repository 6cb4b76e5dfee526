"""Faults a run survives and records: divergence, non-finite samples, unwritable outputs, dead processes.

Components that skip work because of a fault report it with ``report_failure(source, message)``; the run
record (``consisid_lab.utils.run.recorded_run``) collects every report of its lifetime into the ``errors`` list of
``metrics.json``. Reports travel as log records of the ``consisid_lab.faults`` logger, so a metric, a callback or
the media writer can report without holding a reference to the record.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch
from torch import Tensor

FAULT_LOGGER = "consisid_lab.faults"
_SOURCE_FIELD = "fault_source"
_MESSAGE_FIELD = "fault_message"

log = logging.getLogger(FAULT_LOGGER)


class DivergenceError(RuntimeError):
    """Training went non-finite and stopped; ``step`` is the first bad step, ``last_good_checkpoint`` the file
    holding the weights of the last good one (``None`` when none could be written)."""

    def __init__(self, message: str, step: int, last_good_checkpoint: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_good_checkpoint = last_good_checkpoint

    def __reduce__(self) -> tuple:  # picklable with its fields (a sweep member hands it to its launcher)
        return type(self), (str(self), self.step, self.last_good_checkpoint)


class NonFiniteInputError(ValueError):
    """A metric, a spectrum or a video writer was handed NaN or infinite values; nothing native has run on them."""


class OutputDirError(OSError):
    """The run's output directory cannot be written."""


def report_failure(source: str, message: str) -> None:
    """Log a named failure (``source``: the metric, callback or writer) for the run record to collect."""
    log.error("%s: %s", source, message, extra={_SOURCE_FIELD: source, _MESSAGE_FIELD: message})


class FailureCollector(logging.Handler):
    """Keeps every ``report_failure`` of a run as ``{"source", "message", "time"}``."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.failures: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        source = getattr(record, _SOURCE_FIELD, None)
        if source is None:
            return
        message = getattr(record, _MESSAGE_FIELD, record.getMessage())
        self.failures.append({"source": str(source), "message": str(message), "time": record.created})

    def __enter__(self) -> FailureCollector:
        logging.getLogger(FAULT_LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger(FAULT_LOGGER).removeHandler(self)


def nonfinite_summary(x: Tensor) -> str | None:
    """``None`` for an all-finite tensor, else what is wrong with it (counts of NaN and inf, first bad items)."""
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(x).sum())
    inf = int((~finite).sum()) - nan
    text = f"{nan + inf} of {x.numel()} values are non-finite ({nan} NaN, {inf} inf)"
    if x.ndim > 1:
        bad_items = torch.nonzero(~finite.flatten(1).all(dim=1)).flatten().tolist()
        text += f" in items {bad_items[:8]}{' ...' if len(bad_items) > 8 else ''} of {x.shape[0]}"
    return text


def require_finite(owner: str, **tensors: Tensor | None) -> None:
    """Raise ``NonFiniteInputError`` naming ``owner`` and the argument if any tensor holds NaN or inf."""
    for name, x in tensors.items():
        if x is None:
            continue
        problem = nonfinite_summary(x)
        if problem is not None:
            raise NonFiniteInputError(
                f"{owner}: {name} {tuple(x.shape)} is not finite: {problem}. A diverged model produces such "
                "samples; fix the run (lower the learning rate, keep gradient clipping) rather than the metric"
            )


def check_writable(directory: Path) -> None:
    """Create ``directory`` and write a probe file in it, or raise ``OutputDirError`` naming it and the fix."""
    probe = directory / f".write_probe_{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputDirError(
            f"output directory {directory} cannot be written ({type(err).__name__}: {err}); pick a writable one "
            "with hydra.run.dir=DIR (hydra.sweep.dir=DIR for -m sweeps) or fix its permissions"
        ) from err


def describe_exit(returncode: int) -> tuple[str | None, str]:
    """``(signal name or None, sentence)`` for a child process's return code (negative: killed by a signal)."""
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return None, f"killed by signal {-returncode}"
        reason = {
            signal.SIGSEGV: "segmentation fault in native code",
            signal.SIGKILL: "killed with SIGKILL (out-of-memory killer, kill -9 or a scheduler limit)",
            signal.SIGABRT: "aborted in native code",
            signal.SIGBUS: "bus error in native code",
            signal.SIGFPE: "floating-point exception in native code",
            signal.SIGILL: "illegal instruction in native code",
        }.get(sig, signal.strsignal(sig) or sig.name)
        return sig.name, f"killed by {sig.name} ({reason})"
    return None, f"exited with code {returncode} without reporting a result"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    stat = Path(f"/proc/{pid}/stat")
    if stat.is_file():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    return True


def iso_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
