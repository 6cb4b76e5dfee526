"""FaceSim: identity similarity between a reference face and every frame of a generated video.

Computed like the paper's FaceSim-Arc: cosine of evaluator embeddings between the reference and each frame,
clamped at 0, averaged over frames, then over clips. ``FaceSimLow`` / ``FaceSimHigh`` do the same with an
evaluator that only sees one frequency band (see ``consisid_lab.encoders.evaluator``).

The paper scores detected faces only. With a face gate (``consisid_lab.encoders.face_gate``) a frame in which the
gate finds no face scores 0, whatever its embedding: noise, constant frames and backgrounds carry no identity.
``FaceRate`` reports the share of frames the gate accepts; ``CopyPaste`` how much closer generated frames are to
the reference image itself than real frames are (a generator that pastes the reference scores far above 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from consisid_lab.metrics.evaluator_frozen import (
    FrozenEmbedder,
    FrozenGate,
    check_ref_video,
    check_video,
    embed_video,
    face_presence,
)
from consisid_lab.utils.faults import require_finite


def facesim_per_clip(embedder: FrozenEmbedder, ref: Tensor, video: Tensor, gate: nn.Module | None = None) -> Tensor:
    """Per-clip FaceSim ``(B,)``: mean over frames of ``max(0, cos(ref, frame))``, 0 where ``gate`` sees no face."""
    check_ref_video(ref, video)
    ref_emb = embedder(ref)  # (B, D)
    frame_emb = embed_video(embedder, video)  # (B, F, D)
    cos = (frame_emb * ref_emb[:, None]).sum(-1)  # (B, F)
    return (cos.clamp_min(0) * face_presence(gate, video)).mean(dim=1)


class FaceSim(Metric):
    """Mean over clips of the per-clip FaceSim; in [0, 1], higher is better."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    expected_band: str | None = "full"

    def __init__(self, evaluator: nn.Module, gate: nn.Module | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        band = getattr(evaluator, "band", None)
        if self.expected_band is not None and band is not None and band != self.expected_band:
            raise ValueError(
                f"{type(self).__name__} needs an evaluator for band {self.expected_band!r}, got one for band "
                f"{band!r}; pass standins.evaluator{'' if self.expected_band == 'full' else '_' + self.expected_band}"
            )
        self.embedder = FrozenEmbedder(evaluator)
        self.gate = FrozenGate(gate) if gate is not None else None
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_clips", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ref: Tensor, video: Tensor) -> None:
        """ref ``(B, 3, H, W)``, video ``(B, F, 3, H, W)``, both in [-1, 1]."""
        require_finite(type(self).__name__, ref=ref, video=video)
        scores = facesim_per_clip(self.embedder, ref, video, self.gate)
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


class FaceRate(Metric):
    """Share of frames in which the face gate finds a face; in [0, 1]."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, gate: nn.Module, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gate = FrozenGate(gate)
        self.add_state("faces", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("frames", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, video: Tensor) -> None:
        """video ``(B, F, 3, H, W)`` in [-1, 1]."""
        require_finite(type(self).__name__, video=video)
        check_video(video)
        present = face_presence(self.gate, video)
        self.faces += present.sum().double()
        self.frames += present.numel()

    def compute(self) -> Tensor:
        if self.frames == 0:
            raise RuntimeError("FaceRate.compute() called before any update()")
        return (self.faces / self.frames).float()


COPY_FLOOR = 2.0 / 255.0


class CopyPaste(Metric):
    """``mean |real frame - reference| / mean |generated frame - reference|`` over all pixels seen.

    About 1 when generated frames are as far from the reference image as real frames of the identity are (other
    pose, lighting, background); far above 1 when the generator pastes the reference into its frames.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("real_dist", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("gen_dist", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_clips", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ref: Tensor, real: Tensor, generated: Tensor) -> None:
        """ref ``(B, 3, H, W)``; real and generated ``(B, F, 3, H, W)``; all in [-1, 1]."""
        require_finite(type(self).__name__, ref=ref, real=real, generated=generated)
        check_ref_video(ref, generated)
        check_ref_video(ref, real)
        self.real_dist += (real - ref[:, None]).abs().mean(dim=(1, 2, 3, 4)).sum().double()
        self.gen_dist += (generated - ref[:, None]).abs().mean(dim=(1, 2, 3, 4)).sum().double()
        self.num_clips += ref.shape[0]

    def compute(self) -> Tensor:
        if self.num_clips == 0:
            raise RuntimeError("CopyPaste.compute() called before any update()")
        # Distances below one 8-bit grey level (2 / 255 in [-1, 1] units) all mean "identical".
        return (self.real_dist / self.gen_dist.clamp_min(COPY_FLOOR * self.num_clips)).float()
