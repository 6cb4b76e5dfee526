"""Stand-in face-recognition network trained with the ArcFace additive angular margin loss.

It plays the role of the paper's ArcFace backbone on the synthetic benchmark: ``last`` is the final
L2-normalisable embedding (what the released code feeds the fuser) and ``penultimate`` is the last spatial
feature map (what the paper says it uses), exposed as tokens ``(B, h' * w', C)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class IdentityNetConfig:
    """Architecture of the stand-in identity network (saved next to its weights)."""

    image_size: int = 64  # inputs of another size are resized to this
    stem_width: int = 24
    widths: tuple[int, ...] = (32, 64, 128)  # one residual stage each, every stage halves the resolution
    embed_dim: int = 128

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.image_size % (2 ** (len(self.widths) + 1)) != 0:
            raise ValueError(
                f"identity net image_size={self.image_size} must be divisible by 2**(stages + 1) = "
                f"{2 ** (len(self.widths) + 1)}; pick 64 or change widths"
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "widths": list(self.widths)}


def resize_to(x: Tensor, size: int) -> Tensor:
    """Bilinear resize with anti-aliasing of a ``(B, C, H, W)`` batch to ``size x size`` (no-op when equal)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class ResidualStage(nn.Module):
    """Strided 3x3 conv followed by a residual 3x3 block: halves the resolution."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
        )
        self.res = nn.Sequential(
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x)
        return x + self.res(x)


class IdentityNet(nn.Module):
    """Small residual CNN: face image ``(B, 3, H, W)`` in [-1, 1] -> identity embedding ``(B, D)``.

    Faces on the benchmark are not aligned (pose, translation and zoom vary), so the head pools the
    penultimate map with average + max pooling instead of ArcFace's flatten-and-project, which assumes
    aligned crops.
    """

    def __init__(self, config: IdentityNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or IdentityNetConfig()
        c = self.config
        self.stem = nn.Sequential(
            nn.Conv2d(3, c.stem_width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c.stem_width),
            nn.ReLU(inplace=True),
        )
        widths = (c.stem_width, *c.widths)
        self.stages = nn.Sequential(*[ResidualStage(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.head = nn.Sequential(nn.Linear(2 * widths[-1], c.embed_dim), nn.BatchNorm1d(c.embed_dim))

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def token_dim(self) -> int:
        return self.config.widths[-1]

    @property
    def num_tokens(self) -> int:
        side = self.config.image_size // 2 ** (len(self.config.widths) + 1)
        return side * side

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(last (B, D) un-normalised embedding, penultimate (B, C, h', w') spatial map)``."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"identity net expects images (B, 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        x = resize_to(x, self.config.image_size)
        fmap = self.stages(self.stem(x))  # (B, C, h', w')
        pooled = torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], dim=1)  # (B, 2C)
        return self.head(pooled), fmap

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[0]

    def embed(self, x: Tensor) -> Tensor:
        """L2-normalised ``last`` embedding ``(B, D)``."""
        return F.normalize(self.forward_features(x)[0], dim=-1)

    def tokens(self, x: Tensor) -> Tensor:
        """``penultimate`` feature map as tokens ``(B, h' * w', C)``."""
        fmap = self.forward_features(x)[1]  # (B, C, h', w')
        return fmap.flatten(2).transpose(1, 2)

    def hparams(self) -> dict:
        return self.config.to_dict()


class ArcMarginLoss(nn.Module):
    """ArcFace additive angular margin softmax loss (Deng et al., 2019).

    logits = s * cos(theta_j) for other classes and s * cos(theta_y + m) for the target class, where
    theta is the angle between the normalised embedding and the normalised class centre.
    """

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.4) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ArcFace loss needs at least 2 classes, got num_classes={num_classes}")
        self.scale = scale
        self.margin = margin
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, embedding: Tensor, labels: Tensor, margin: float | None = None) -> Tensor:
        m = self.margin if margin is None else margin
        cos = F.normalize(embedding, dim=-1) @ F.normalize(self.weight, dim=-1).t()  # (B, K)
        cos = cos.clamp(-1 + 1e-6, 1 - 1e-6)
        cos_y = cos.gather(1, labels[:, None])  # (B, 1)
        sin_y = (1 - cos_y.square()).sqrt()
        cos_y_margin = cos_y * math.cos(m) - sin_y * math.sin(m)  # cos(theta + m)
        # Past theta = pi - m, cos(theta + m) is no longer monotonic in theta; fall back to a linear penalty
        # (the usual ArcFace trick) so the target logit keeps decreasing with the angle.
        fallback = cos_y - math.sin(math.pi - m) * m
        cos_y_margin = torch.where(cos_y > math.cos(math.pi - m), cos_y_margin, fallback)
        logits = cos.scatter(1, labels[:, None], cos_y_margin) * self.scale
        return F.cross_entropy(logits, labels)
