"""Exponential moving average of the trainable parameters only.

Frozen modules (codec, stand-in encoders, a frozen backbone) are not copied: at the real scale a full-model
EMA would double the memory of a 6 B-parameter model to average the ~0.6 B that actually train.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)


class TrainableEMA(pl.Callback):
    """Keeps an EMA of every parameter with ``requires_grad`` and swaps it in for validation and test.

    The shadow weights live in the checkpoint (``state_dict`` of the callback), so a resumed run continues
    the same average.
    """

    def __init__(self, decay: float = 0.999, start_step: int = 0, use_for_eval: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.use_for_eval = use_for_eval
        self.shadow: dict[str, torch.Tensor] = {}
        self._backup: dict[str, torch.Tensor] = {}
        self._averaged_step: int | None = None

    @staticmethod
    def _trainable(pl_module: pl.LightningModule) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._trainable(pl_module)
        # Keep shadows restored from a checkpoint; start fresh for parameters that have none yet.
        self.shadow = {
            n: self.shadow[n].to(p.device) if n in self.shadow else p.detach().clone() for n, p in params.items()
        }

    @torch.no_grad()
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # Averages the weights that produced this loss, before the step updates them: Lightning only calls this for
        # a finite loss (a non-finite one is skipped), so an update that breaks the weights, even into finite but
        # huge values that only the next loss reveals, is never averaged in (see models/divergence.py).
        if trainer.global_step == self._averaged_step:
            return  # gradient accumulation: once per optimiser step
        self._averaged_step = trainer.global_step
        if trainer.global_step < self.start_step:
            for n, p in self._trainable(pl_module).items():
                self.shadow[n] = p.detach().clone()
            return
        shadows, weights = [], []
        for n, p in self._trainable(pl_module).items():
            if n not in self.shadow:  # a module unfrozen by a later training stage
                self.shadow[n] = p.detach().clone()
            else:
                shadows.append(self.shadow[n])
                weights.append(p.detach())
        if shadows:  # one call for all tensors instead of a Python loop over them (the same values)
            torch._foreach_lerp_(shadows, weights, 1.0 - self.decay)

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if not (self.use_for_eval and self.shadow):
            return
        params = dict(pl_module.named_parameters())
        with torch.no_grad():
            for n, s in self.shadow.items():
                if n in params:
                    self._backup[n] = params[n].detach().clone()
                    params[n].copy_(s.to(params[n].device))

    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        with torch.no_grad():
            for n, v in self._backup.items():
                params[n].copy_(v)
        self._backup = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = dict(state_dict.get("shadow", {}))
        log.info("restored EMA shadow weights for %d parameters", len(self.shadow))
