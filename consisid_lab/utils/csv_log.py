"""A CSV log that survives a resume (``conf/logger/csv.yaml``).

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when its writer starts, so a run resumed into its
own directory (a rerun sweep member) kept only the steps after the resume, and it buffers rows in memory for
``flush_logs_every_n_steps``, so a killed run lost the rows logged since its last flush.
"""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger

log = logging.getLogger(__name__)

METRICS_CSV = "metrics.csv"


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a Lightning CSV log, blank cells left out."""
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k and v not in (None, "")} for row in csv.DictReader(f)]


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` keeps the steps logged before a resume, each once.

    The train task calls :meth:`continue_from` with the checkpoint's step ``k`` before anything is logged. The
    previous log's rows of steps ``<= k`` (from this run's own file, or from the checkpoint's run when it resumes
    into a new directory) are carried over; rows of later steps belong to the continuation the resume replaces
    and are dropped. Rows of steps ``< k`` are written back as soon as the writer starts (so a resumed run
    killed before its first flush still has them); a carried cell of step ``k`` that the resumed run logs again
    (the training step ``k`` itself) is dropped, the others (what the validation before the checkpoint logged at
    ``k``) are written once the resumed run has logged past ``k``, so every (step, key) appears once. The buffer
    is also flushed whenever a checkpoint is saved, so a killed run's file holds every step up to its last
    checkpoint.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._carried: list[dict[str, str]] = []  # previous rows not yet written
        self._relogged: set[tuple[int, str]] = set()  # (step, key) the resumed run logged while rows are carried
        self._newest_step = -1
        self._resume_step: int | None = None

    @property
    def metrics_file(self) -> Path:
        return Path(self.log_dir) / METRICS_CSV

    def continue_from(self, step: int, previous_log: Path | None = None) -> int:
        """Carry the rows of steps ``<= step`` over from ``previous_log`` (default: this logger's own file) and
        return how many. Runs before anything is logged: the CSV writer deletes the previous file when it starts."""
        if self._experiment is not None:
            raise RuntimeError(
                "ContinuingCSVLogger.continue_from must run before anything is logged: the CSV writer deletes "
                "the previous metrics.csv when it starts"
            )
        source = previous_log if previous_log is not None else self.metrics_file
        if not source.is_file():
            return 0
        self._carried = [r for r in read_rows(source) if "step" in r and int(float(r["step"])) <= step]
        self._resume_step = step
        log.info("CSV log: carrying %d rows of steps <= %d over from %s", len(self._carried), step, source)
        return len(self._carried)

    @property
    def experiment(self) -> Any:  # Lightning's writer, or its dummy on non-zero ranks
        created = self._experiment is None
        with warnings.catch_warnings():
            if created and self._resume_step is not None:
                # Lightning warns that the previous files "will be deleted": the carried rows are written back below,
                # so the warning would tell the user their log is lost when it is not.
                warnings.filterwarnings("ignore", message=r".*Previous log files in this directory will be deleted")
            experiment = super().experiment
        if created and self._experiment is not None and self._carried and self._resume_step is not None:
            # The writer has just deleted the previous file: put the steps before the resume back at once.
            self._release_carried(self._resume_step - 1)
            self._experiment.save()
        return experiment

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._carried and step is not None:
            self._relogged.update((int(step), key) for key in metrics)
            self._newest_step = max(self._newest_step, int(step))
        super().log_metrics(metrics, step)

    def _release_carried(self, up_to: float) -> None:
        """Put the carried rows of steps ``<= up_to`` (less the cells logged again) ahead of the buffer."""
        ready, waiting = [], []
        for row in self._carried:
            step = int(float(row["step"]))
            if step > up_to:
                waiting.append(row)
                continue
            kept = {k: v for k, v in row.items() if k == "step" or (step, k) not in self._relogged}
            if len(kept) > 1:
                ready.append(kept)
        self._carried = waiting
        if not waiting:
            self._relogged.clear()
        if ready and self._experiment is not None:
            self._experiment.metrics[:0] = ready

    def save(self) -> None:
        if self._carried and self._experiment is not None:
            self._release_carried(self._newest_step)
        super().save()

    def finalize(self, status: str) -> None:
        if self._carried and self._experiment is not None:
            self._release_carried(float("inf"))
        super().finalize(status)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        if self._experiment is not None:
            self.save()


def continue_logs(loggers: list, step: int, own_dir: Path, checkpoint_run: Path | None) -> None:
    """Carry each ``ContinuingCSVLogger``'s earlier rows into a run resumed at ``step``.

    ``own_dir`` is this run's output directory and ``checkpoint_run`` the run directory the checkpoint belongs
    to; when they differ the rows come from the same relative path under ``checkpoint_run``.
    """
    for lg in loggers:
        if not isinstance(lg, ContinuingCSVLogger):
            continue
        source = None
        if checkpoint_run is not None and checkpoint_run.resolve() != own_dir.resolve():
            try:
                source = checkpoint_run / lg.metrics_file.resolve().relative_to(own_dir.resolve())
            except ValueError:  # a log outside the run dir: nothing to carry over from elsewhere
                continue
        lg.continue_from(step, source)
