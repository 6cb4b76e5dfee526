"""Shared plumbing for metrics that embed faces with a frozen evaluator network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from consisid_lab.utils.faults import require_finite


class FrozenEmbedder(nn.Module):
    """Wraps an evaluator so it stays frozen and in eval mode whatever its parent's mode is.

    Lightning flips every submodule to train mode during fitting; an evaluator with batch norm would then
    score with batch statistics, so ``train()`` is pinned to eval here.
    """

    def __init__(self, evaluator: nn.Module, chunk: int = 256) -> None:
        super().__init__()
        self.evaluator = evaluator.eval().requires_grad_(False)
        self.chunk = chunk
        dim = getattr(evaluator, "embed_dim", None)
        if dim is not None:
            self.num_features = int(dim)  # read by torchmetrics' FID for its state sizes

    def train(self, mode: bool = True) -> FrozenEmbedder:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """L2-normalised embeddings ``(N, D)`` of images ``(N, 3, H, W)`` in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        out = [F.normalize(self.evaluator(part).float(), dim=-1) for part in images.split(self.chunk)]
        return torch.cat(out, dim=0)


RANGE_TOLERANCE = 1e-3  # rounding slack on the [-1, 1] contract


def check_range(x: Tensor, name: str) -> None:
    """Images handed to a metric must be finite and in [-1, 1] (a [0, 1] or [0, 255] tensor is a caller's bug)."""
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    require_finite("metric input", **{name: x})
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must be in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]; map [0, 1] images with x * 2 - 1 "
            "and [0, 255] ones with x / 127.5 - 1"
        )


def check_video(video: Tensor) -> None:
    """Validate a ``(B, F, 3, H, W)`` video in [-1, 1] handed to a metric on its own."""
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"video must be (B, F, 3, H, W) in [-1, 1], got shape {tuple(video.shape)}")
    check_range(video, "video")


def check_ref_video(ref: Tensor, video: Tensor) -> None:
    """Validate the ``update(ref (B, 3, H, W), video (B, F, 3, H, W))`` contract shared by the face metrics."""
    if ref.ndim != 4 or ref.shape[1] != 3:
        raise ValueError(
            f"ref must be (B, 3, H, W) in [-1, 1], got shape {tuple(ref.shape)} (video: {tuple(video.shape)})"
        )
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(
            f"video must be (B, F, 3, H, W) in [-1, 1], got shape {tuple(video.shape)} (ref: {tuple(ref.shape)})"
        )
    if ref.shape[0] != video.shape[0]:
        raise ValueError(f"ref and video batch sizes differ: ref {tuple(ref.shape)} vs video {tuple(video.shape)}")
    check_range(ref, "ref")
    check_range(video, "video")


def face_presence(gate: nn.Module | None, video: Tensor) -> Tensor:
    """``(B, F)`` float {0, 1}: the face gate's decision per frame (all ones without a gate)."""
    b, f = video.shape[:2]
    if gate is None:
        return torch.ones(b, f, device=video.device)
    return gate.is_face(video.flatten(0, 1)).view(b, f).float()


class FrozenGate(nn.Module):
    """Keeps the face gate frozen and in eval mode inside metrics (see :class:`FrozenEmbedder`)."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenGate:
        return super().train(False)

    @torch.no_grad()
    def is_face(self, images: Tensor) -> Tensor:
        return self.gate.is_face(images)


def embed_video(embedder: FrozenEmbedder, video: Tensor) -> Tensor:
    """``(B, F, 3, H, W)`` -> normalised frame embeddings ``(B, F, D)``."""
    b, f = video.shape[:2]
    return embedder(video.flatten(0, 1)).view(b, f, -1)
