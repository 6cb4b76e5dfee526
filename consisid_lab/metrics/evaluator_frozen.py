"""Shared plumbing for metrics that embed faces with a frozen evaluator network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def check_ref_video(ref: Tensor, video: Tensor) -> None:
    """Validate the ``update(ref (B, 3, H, W), video (B, F, 3, H, W))`` contract shared by the face metrics."""
    if ref.ndim != 4 or ref.shape[1] != 3:
        raise ValueError(f"ref must be (B, 3, H, W) in [-1, 1], got shape {tuple(ref.shape)}")
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"video must be (B, F, 3, H, W) in [-1, 1], got shape {tuple(video.shape)}")
    if ref.shape[0] != video.shape[0]:
        raise ValueError(f"ref and video batch sizes differ: {ref.shape[0]} vs {video.shape[0]}")


def embed_video(embedder: FrozenEmbedder, video: Tensor) -> Tensor:
    """``(B, F, 3, H, W)`` -> normalised frame embeddings ``(B, F, D)``."""
    b, f = video.shape[:2]
    return embedder(video.flatten(0, 1)).view(b, f, -1)
