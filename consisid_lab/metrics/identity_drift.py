"""Identity drift: how much the evaluator's identity embedding wanders across the frames of one video."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from consisid_lab.metrics.evaluator_frozen import FrozenEmbedder, check_video, embed_video
from consisid_lab.utils.faults import require_finite


def drift_per_clip(embedder: FrozenEmbedder, video: Tensor) -> Tensor:
    """``1 - mean_f cos(e_f, mean embedding)`` per clip ``(B,)``; 0 when every frame embeds identically."""
    check_video(video)
    emb = embed_video(embedder, video)  # (B, F, D)
    centre = F.normalize(emb.mean(dim=1), dim=-1)  # (B, D)
    return 1.0 - (emb * centre[:, None]).sum(-1).mean(dim=1)


class IdentityDrift(Metric):
    """Mean over clips of the per-clip identity drift; in [0, 2], lower is better."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, evaluator: nn.Module, **kwargs) -> None:
        super().__init__(**kwargs)
        self.embedder = FrozenEmbedder(evaluator)
        self.add_state("drift_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_clips", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ref: Tensor | None, video: Tensor) -> None:
        """video ``(B, F, 3, H, W)`` in [-1, 1]; ``ref`` is accepted for a uniform interface and unused."""
        require_finite(type(self).__name__, ref=ref, video=video)
        drift = drift_per_clip(self.embedder, video)
        self.drift_sum += drift.sum().double()
        self.num_clips += drift.numel()

    def compute(self) -> Tensor:
        if self.num_clips == 0:
            raise RuntimeError("IdentityDrift.compute() called before any update()")
        return (self.drift_sum / self.num_clips).float()
