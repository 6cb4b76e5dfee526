"""Does the generated video have its caption's background?

The benchmark's captions name the background (``In front of a plain <colour> background, ...``), and its clips
frame the head in the middle with the shoulders at the bottom, so the two top corners of every frame show
background only. ``BackgroundError`` is the mean absolute difference between the corners' mean colour in a
generated video and in a target video, in [0, 1] colour units (0: the same colour; two palette colours differ
by about 0.3). Against the clip of the same caption it measures how well the caption's background is followed;
against a clip of another caption it is the chance level, and their difference is the background gap
(``BenchmarkMetrics``: ``background_gap``), like the identity gap.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from consisid_lab.metrics.evaluator_frozen import check_video
from consisid_lab.utils.faults import require_finite

CORNER_FRACTION = 0.25  # each corner patch covers this fraction of the frame's height and width


def corner_colour(video: Tensor, fraction: float = CORNER_FRACTION) -> Tensor:
    """Mean RGB ``(B, 3)`` in [0, 1] of the top-left and top-right corner patches of ``(B, F, 3, H, W)`` videos
    in [-1, 1], over all frames."""
    check_video(video)
    h, w = video.shape[-2:]
    ph, pw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top = video[..., :ph, :]
    corners = torch.cat([top[..., :pw], top[..., w - pw :]], dim=-1)  # (B, F, 3, ph, 2 pw)
    return (corners.float().mean(dim=(1, 3, 4)) + 1) / 2


class BackgroundError(Metric):
    """Mean over clips of ``mean |corner colour(generated) - corner colour(target)|``; lower is better."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, fraction: float = CORNER_FRACTION, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 < fraction <= 0.5:
            raise ValueError(f"corner fraction={fraction} must be in (0, 0.5] (two corners side by side)")
        self.fraction = fraction
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_clips", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, target: Tensor, generated: Tensor) -> None:
        """``target`` and ``generated``: ``(B, F, 3, H, W)`` videos in [-1, 1] of the same shape."""
        require_finite(type(self).__name__, target=target, generated=generated)
        if target.shape != generated.shape:
            raise ValueError(
                f"target video {tuple(target.shape)} and generated video {tuple(generated.shape)} must have the "
                "same shape"
            )
        diff = (corner_colour(generated, self.fraction) - corner_colour(target, self.fraction)).abs().mean(dim=1)
        self.total += diff.sum().double()
        self.num_clips += generated.shape[0]

    def compute(self) -> Tensor:
        if self.num_clips == 0:
            raise RuntimeError("BackgroundError.compute() called before any update()")
        return (self.total / self.num_clips).float()
