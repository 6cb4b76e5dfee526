"""Faults on purpose, for the fault-injection tests (``tests/test_faults.py``); never part of a default config.

Added from the command line as an extra callback, e.g. a member that dies of a segmentation fault at step 1::

    python -m consisid_lab.train ... +callbacks.fault._target_=consisid_lab.callbacks.fault_injection.FaultInjection \
        +callbacks.fault.kind=segfault +callbacks.fault.at_step=1

Kinds: ``nan_loss`` (the batch's video becomes NaN, so the loss is non-finite), ``nan_weights`` (the gradients
become NaN, so the optimiser step leaves non-finite weights), ``segfault`` / ``sigkill`` (the process kills
itself with that signal, as a native crash or the out-of-memory killer would).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)

FAULT_KINDS = ("nan_loss", "nan_weights", "segfault", "sigkill")


class FaultInjection(pl.Callback):
    """Injects ``kind`` at the global steps ``at_step`` (one step or several) of training."""

    def __init__(self, kind: str, at_step: int | list[int]) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {', '.join(FAULT_KINDS)}, got {kind!r}")
        self.kind = kind
        self.steps = {int(s) for s in (at_step if isinstance(at_step, (list, tuple)) else [at_step])}

    def _due(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step in self.steps

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args) -> None:
        if not self._due(trainer):
            return
        log.warning("fault injection: %s at global step %d", self.kind, trainer.global_step)
        if self.kind == "nan_loss":
            batch.video.fill_(float("nan"))
        elif self.kind in ("segfault", "sigkill"):
            logging.shutdown()  # flush the log files before the process vanishes
            os.kill(os.getpid(), signal.SIGSEGV if self.kind == "segfault" else signal.SIGKILL)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.kind != "nan_weights" or not self._due(trainer):
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
