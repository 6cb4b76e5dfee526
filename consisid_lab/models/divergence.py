"""Divergence handling for training: detect non-finite steps, undo them, stop when they do not end.

A step fails when its loss is non-finite (no update is made) or when the optimiser step leaves any optimised
parameter non-finite. Weights can also break while staying finite (a too-high learning rate makes them huge, and
only the next loss turns NaN), so a finite loss is what *confirms* the weights that produced it: they become the
last good state (a snapshot of the optimised parameters and their optimiser state, taken before the update). A
failed step restores that state, undoing the update before a non-finite loss too, since that update may be what
broke the weights.

``nan_policy='skip'`` goes on with the next batch and stops after ``max_nonfinite_steps`` failed steps without a
confirmed update in between (retrying from the same weights and learning rate rarely recovers); ``'stop'``
stops at the first one. Training that ends with an unconfirmed update inside such a streak gets one more
forward pass to confirm its final weights.

The snapshot lives on the parameters' device and is refreshed at every step: memory for one more copy of what
trains and of its optimiser state, and one device-side copy per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

NAN_POLICIES = ("skip", "stop")


def check_nan_settings(nan_policy: str, max_nonfinite_steps: int) -> None:
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {', '.join(map(repr, NAN_POLICIES))}, got {nan_policy!r}")
    if isinstance(max_nonfinite_steps, bool) or not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 1:
        raise ValueError(
            f"max_nonfinite_steps must be an integer >= 1 (failed steps in a row that nan_policy=skip tolerates), "
            f"got {max_nonfinite_steps!r}"
        )


def _copy_all(targets: list[Tensor], sources: list[Tensor]) -> None:
    """``t.copy_(s)`` for every pair, one foreach call per (dtype, device) group."""
    groups: dict[tuple[torch.dtype, torch.device], tuple[list[Tensor], list[Tensor]]] = {}
    for t, s in zip(targets, sources, strict=True):
        ts, ss = groups.setdefault((t.dtype, t.device), ([], []))
        ts.append(t)
        ss.append(s)
    for ts, ss in groups.values():
        torch._foreach_copy_(ts, ss)


def optimised_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def all_finite(tensors: list[Tensor]) -> bool:
    if not tensors:
        return True
    # one reduction and one host sync for the whole model
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


@dataclass
class DivergenceGuard:
    """Last good weights and optimiser state, and the count of failed steps since the last confirmed update."""

    nan_policy: str = "skip"
    max_nonfinite_steps: int = 3
    consecutive: int = 0
    first_bad_step: int | None = None
    reasons: list[str] = field(default_factory=list)
    _failed: bool = False
    _fresh: bool = False  # the weights come from an update that no finite loss has confirmed yet
    _snapshot_step: int | None = None
    _params: list[Tensor] = field(default_factory=list, repr=False)
    _state: dict[int, dict[str, object]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_nan_settings(self.nan_policy, self.max_nonfinite_steps)

    @property
    def step_failed(self) -> bool:
        return self._failed

    @property
    def unconfirmed_streak(self) -> bool:
        """Inside a streak of failed steps, with weights that an update changed since the last failure."""
        return self.consecutive > 0 and self._fresh

    # -- step accounting --------------------------------------------------------------------------------------
    def confirm(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """A finite loss at the current weights: they are good; snapshot them before this step's update."""
        if self._fresh:  # the update that made them worked: the streak (if any) is over
            self.consecutive, self.first_bad_step, self.reasons = 0, None, []
        self._fresh = False
        if self._snapshot_step != step:  # once per optimiser step (gradient accumulation calls this per batch)
            self.snapshot(optimizer)
            self._snapshot_step = step

    def fail(self, step: int, reason: str) -> None:
        """Mark the current step failed (once or more per step)."""
        if not self._failed:
            self.consecutive += 1
            if self.first_bad_step is None:
                self.first_bad_step = step
        self._failed = True
        self.reasons.append(f"step {step}: {reason}")

    def end_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """After the optimiser step: undo it if it failed; ``True`` if the run must stop (per the policy)."""
        failed, self._failed = self._failed, False
        if not failed:
            self._fresh = True
            return False
        self.restore(optimizer)
        self._fresh = False
        return self.nan_policy == "stop" or self.consecutive >= self.max_nonfinite_steps

    # -- snapshot --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def snapshot(self, optimizer: torch.optim.Optimizer) -> None:
        """Copy the optimised parameters and their optimiser state (buffers reused from step to step)."""
        params = optimised_parameters(optimizer)
        # Reused buffers are filled at the end, by one foreach copy per dtype and device.
        targets: list[Tensor] = []
        sources: list[Tensor] = []
        if len(self._params) != len(params) or any(b.shape != p.shape for b, p in zip(self._params, params)):
            self._params = [p.detach().clone() for p in params]
        else:
            targets.extend(self._params)
            sources.extend(p.detach() for p in params)
        state: dict[int, dict[str, object]] = {}
        for i, p in enumerate(params):
            old = self._state.get(i, {})
            saved: dict[str, object] = {}
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    buf = old.get(key)
                    if (
                        isinstance(buf, Tensor)
                        and buf.shape == value.shape
                        and buf.dtype == value.dtype
                        and buf.device == value.device
                    ):
                        targets.append(buf)
                        sources.append(value.detach())
                    else:
                        buf = value.detach().clone()
                    saved[key] = buf
                else:
                    saved[key] = value
            state[i] = saved
        _copy_all(targets, sources)
        self._state = state

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the snapshot back: weights, and optimiser state as it was (state created since then dropped).

        Without a snapshot (the very first loss was non-finite) no update has been made: nothing to undo.
        """
        if not self._params:
            return
        params = optimised_parameters(optimizer)
        if len(params) != len(self._params):
            raise RuntimeError(
                f"the optimiser holds {len(params)} parameters but the snapshot {len(self._params)}; "
                "the optimiser's parameter groups changed during training"
            )
        for buf, p in zip(self._params, params):
            p.copy_(buf)
        for i, p in enumerate(params):
            saved = self._state.get(i, {})
            if not saved:
                optimizer.state.pop(p, None)
                continue
            live = optimizer.state[p]
            for key in list(live):
                if key not in saved:
                    del live[key]
            for key, value in saved.items():
                if isinstance(value, Tensor) and isinstance(live.get(key), Tensor):
                    live[key].copy_(value)
                else:
                    live[key] = value.clone() if isinstance(value, Tensor) else value
