"""FaceSim: identity similarity between a reference face and every frame of a generated video.

Computed like the paper's FaceSim-Arc: cosine of evaluator embeddings between the reference and each frame,
clamped at 0, averaged over frames, then over clips. ``FaceSimLow`` / ``FaceSimHigh`` do the same with an
evaluator that only sees one frequency band (see ``consisid_lab.encoders.evaluator``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from consisid_lab.metrics.evaluator_frozen import FrozenEmbedder, check_ref_video, embed_video
from consisid_lab.utils.faults import require_finite


def facesim_per_clip(embedder: FrozenEmbedder, ref: Tensor, video: Tensor) -> Tensor:
    """Per-clip FaceSim ``(B,)``: mean over frames of ``max(0, cos(ref, frame))``."""
    check_ref_video(ref, video)
    ref_emb = embedder(ref)  # (B, D)
    frame_emb = embed_video(embedder, video)  # (B, F, D)
    cos = (frame_emb * ref_emb[:, None]).sum(-1)  # (B, F)
    return cos.clamp_min(0).mean(dim=1)


class FaceSim(Metric):
    """Mean over clips of the per-clip FaceSim; in [0, 1], higher is better."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    expected_band: str | None = "full"

    def __init__(self, evaluator: nn.Module, **kwargs) -> None:
        super().__init__(**kwargs)
        band = getattr(evaluator, "band", None)
        if self.expected_band is not None and band is not None and band != self.expected_band:
            raise ValueError(
                f"{type(self).__name__} needs an evaluator for band {self.expected_band!r}, got one for band "
                f"{band!r}; pass standins.evaluator{'' if self.expected_band == 'full' else '_' + self.expected_band}"
            )
        self.embedder = FrozenEmbedder(evaluator)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_clips", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ref: Tensor, video: Tensor) -> None:
        """ref ``(B, 3, H, W)``, video ``(B, F, 3, H, W)``, both in [-1, 1]."""
        require_finite(type(self).__name__, ref=ref, video=video)
        scores = facesim_per_clip(self.embedder, ref, video)
        self.score_sum += scores.sum().double()
        self.num_clips += scores.numel()

    def compute(self) -> Tensor:
        if self.num_clips == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() called before any update()")
        return (self.score_sum / self.num_clips).float()


class FaceSimLow(FaceSim):
    """FaceSim with the low-band evaluator: identity carried by low-frequency parameters only."""

    expected_band = "low"


class FaceSimHigh(FaceSim):
    """FaceSim with the high-band evaluator: identity carried by high-frequency parameters only."""

    expected_band = "high"
