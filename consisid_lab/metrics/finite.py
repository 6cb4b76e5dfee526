"""Keeps non-finite samples away from a collection of metrics.

NaN frames from a diverged model would reach native code (the FID's eigen-decomposition crashes the process
inside MKL on them). ``FiniteSamplesOnly`` checks every batch first: a batch with any non-finite generated or
real frame is skipped for every metric of the collection and reported by name (``report_failure``), so the
run's ``metrics.json`` lists it under ``errors``. A metric that still refuses its state at ``compute`` (its own
``NonFiniteInputError``) is reported the same way instead of ending the run.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from torch import Tensor

from consisid_lab.types import VideoBatch
from consisid_lab.utils.faults import NonFiniteInputError, nonfinite_summary, report_failure

log = logging.getLogger(__name__)


class VideoMetrics(Protocol):
    """What the LightningModule needs of its benchmark metrics (``BenchmarkMetrics``)."""

    def update(self, batch: VideoBatch, video: Tensor) -> None: ...
    def has_updates(self) -> bool: ...
    def compute(self) -> dict[str, Tensor]: ...
    def reset(self) -> None: ...
    def to(self, device: torch.device | str) -> Any: ...


class FiniteSamplesOnly:
    """A ``VideoMetrics`` that forwards only batches whose generated and real videos are finite."""

    def __init__(self, metrics: VideoMetrics, name: str | None = None) -> None:
        self.metrics = metrics
        self.name = name or type(metrics).__name__
        self.skipped_batches = 0

    def update(self, batch: VideoBatch, video: Tensor) -> None:
        for what, x in (("generated videos", video), ("real clips", batch.video)):
            problem = nonfinite_summary(x)
            if problem is not None:
                self.skipped_batches += 1
                report_failure(
                    self.name,
                    f"{what} {tuple(x.shape)} of identities {batch.identity.tolist()} are not finite: {problem}; "
                    "batch skipped for every metric (FaceSim, FID, ...), so those metrics cover fewer clips or are "
                    "missing. Generated NaN means the model diverged: lower the learning rate or keep gradient "
                    "clipping",
                )
                return
        self.metrics.update(batch, video)

    def has_updates(self) -> bool:
        return self.metrics.has_updates()

    def compute(self) -> dict[str, Tensor]:
        try:
            return self.metrics.compute()
        except NonFiniteInputError as err:
            report_failure(self.name, f"compute() refused its accumulated state, no values logged: {err}")
            return {}

    def reset(self) -> None:
        self.metrics.reset()

    def to(self, device: torch.device | str) -> FiniteSamplesOnly:
        self.metrics.to(device)
        return self

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not defined here: the rest of the wrapped collection's interface.
        if name == "metrics":  # not yet set (unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.metrics, name)
