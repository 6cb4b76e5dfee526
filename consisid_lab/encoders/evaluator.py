"""Evaluator identity networks, used only for metrics (never as a model input).

The evaluator is trained on other identities (the "evaluator" split), from another seed and with another
architecture than the identity network that conditions the generator, so a generator cannot score well by
matching the features it was conditioned on (the paper scores with ArcFace and CurricularFace for the same
reason).

The band evaluators measure identity inside one frequency band: the input is first low-passed (or
high-passed) at a normalised radius (1 = Nyquist), then embedded by a network trained, on filtered faces, to
recognise identities defined by that band's parameters only (see ``consisid_lab.encoders.training``).

The benchmark's full evaluator (``BandPairEvaluator``) joins the two band evaluators: its cosine is the mean
of the low-band and high-band cosines. A single network trained on whole faces learns the easy low-frequency
cues and ignores the marks (measured: ROC-AUC 0.50 on identities differing only in their high part), which
would make FaceSim blind to exactly the information the paper's local route is about.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from consisid_lab.encoders.identity_net import resize_to

BANDS = ("full", "low", "high")


@dataclass
class EvaluatorConfig:
    """Architecture and input band of an evaluator network (saved next to its weights)."""

    band: str = "full"  # "full", "low" (low-pass first) or "high" (high-pass first)
    cutoff: float = 0.25  # normalised radius of the band split, 1 = Nyquist
    image_size: int = 64  # filtered input is resized to this (a low band fits a smaller grid)
    widths: tuple[int, ...] = (24, 48, 96, 160)  # stem, then one max-pool + two convs per further width
    embed_dim: int = 128
    gem_p: float = 3.0  # generalised-mean pooling exponent (1 = average, large = max)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.band not in BANDS:
            raise ValueError(f"evaluator band={self.band!r} is not one of {BANDS}")
        if not 0.0 < self.cutoff < 1.0:
            raise ValueError(f"evaluator cutoff={self.cutoff} must be a normalised radius in (0, 1)")
        if self.image_size % (2 ** len(self.widths)) != 0:
            raise ValueError(
                f"evaluator image_size={self.image_size} must be divisible by 2**len(widths)={2 ** len(self.widths)}"
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "widths": list(self.widths)}


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class EvaluatorNet(nn.Module):
    """VGG-style plain CNN with max-pool downsampling and GeM pooling (unlike the residual identity net)."""

    def __init__(self, config: EvaluatorConfig | None = None) -> None:
        super().__init__()
        self.config = config or EvaluatorConfig()
        c = self.config
        # A strided 5x5 stem keeps single-pixel marks (it sees every input pixel) at a quarter of the cost.
        layers: list[nn.Module] = [conv_bn_relu(3, c.widths[0], stride=2, kernel=5)]
        for a, b in zip(c.widths[:-1], c.widths[1:]):
            layers += [nn.MaxPool2d(2), conv_bn_relu(a, b), conv_bn_relu(b, b)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(c.widths[-1], c.embed_dim), nn.BatchNorm1d(c.embed_dim))

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def band(self) -> str:
        return self.config.band

    def filter(self, x: Tensor) -> Tensor:
        """Band-limit ``(B, 3, H, W)`` images (identity for the full band), then resize to the model's grid."""
        if self.config.band == "low":
            from consisid_lab.data.spectral_filters import low_pass

            x = low_pass(x, self.config.cutoff)
        elif self.config.band == "high":
            from consisid_lab.data.spectral_filters import high_pass

            x = high_pass(x, self.config.cutoff)
        return resize_to(x, self.config.image_size)

    def forward(self, x: Tensor) -> Tensor:
        """Un-normalised embedding ``(B, D)`` of images ``(B, 3, H, W)`` in [-1, 1]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"evaluator expects images (B, 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        fmap = self.features(self.filter(x))  # (B, C, h', w')
        p = self.config.gem_p
        pooled = fmap.clamp_min(1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)  # (B, C)
        return self.head(pooled)

    @torch.no_grad()
    def embed(self, x: Tensor, chunk: int = 256) -> Tensor:
        """L2-normalised embedding ``(B, D)``; runs in chunks so whole videos fit in memory."""
        return torch.cat([F.normalize(self(part), dim=-1) for part in x.split(chunk)], dim=0)

    def hparams(self) -> dict:
        return self.config.to_dict()


class BandPairEvaluator(nn.Module):
    """Full-band evaluator made of a low-band and a high-band evaluator.

    Embedding = ``[normalise(low(x)), normalise(high(x))] / sqrt(2)``: unit norm, and the cosine of two faces is
    the mean of their per-band cosines, so identity in either band counts.
    """

    band = "full"

    def __init__(self, low: EvaluatorNet, high: EvaluatorNet) -> None:
        super().__init__()
        if low.band != "low" or high.band != "high":
            raise ValueError(
                f"BandPairEvaluator needs a low and a high evaluator, got bands {low.band!r}, {high.band!r}"
            )
        self.low = low
        self.high = high

    @property
    def embed_dim(self) -> int:
        return self.low.embed_dim + self.high.embed_dim

    def forward(self, x: Tensor) -> Tensor:
        both = torch.cat([F.normalize(self.low(x), dim=-1), F.normalize(self.high(x), dim=-1)], dim=-1)
        return both * 2**-0.5  # (B, D_low + D_high), unit norm

    @torch.no_grad()
    def embed(self, x: Tensor, chunk: int = 256) -> Tensor:
        return torch.cat([self(part) for part in x.split(chunk)], dim=0)
