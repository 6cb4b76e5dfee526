"""The face-presence gate of the benchmark metrics: a small face / non-face classifier.

The paper's FaceSim is computed on *detected* faces: a frame without a face has no identity to score. Identity
evaluators alone cannot say that (they embed whatever they are given, and an embedding of noise still has a
positive cosine with many faces), so every identity metric first asks this gate whether a frame shows a face.

Positives: rendered benchmark frames and reference faces (other identities than train / val / test), degraded the
way generated frames are (softened, noisy, lighting jitter), so a recognisable but imperfect face still counts.
Negatives, made on the fly from the positives: Gaussian noise, colour-matched noise (each image's channel means
and standard deviations), smooth colour-matched noise (blotches at the scale of facial features: what an untrained
generator makes), faces drowned in such blotches (as strong as the face's own contrast: a head-shaped smear whose
eyes and mouth no longer read), constant frames, blurs that leave a blob but no face, scrambled patches, and
background-only frames (two-colour gradients with a faint pattern, like the benchmark's backgrounds).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from consisid_lab.encoders.evaluator import conv_bn_relu

NEGATIVE_KINDS = ("noise", "colour_noise", "smooth_noise", "blotched", "constant", "blob", "scrambled", "background")
THRESHOLD = 0.5  # probability above which a frame counts as showing a face


@dataclass
class FaceGateConfig:
    image_size: int = 32  # frames are resized to this before classification
    widths: tuple[int, ...] = (16, 32, 64)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.image_size % (2 ** len(self.widths)) != 0:
            raise ValueError(
                f"face gate image_size={self.image_size} must be divisible by 2**len(widths)={2 ** len(self.widths)}"
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "widths": list(self.widths)}


class FaceGate(nn.Module):
    """``forward(images (N, 3, H, W) in [-1, 1]) -> face logit (N,)``; ``probability`` and ``is_face`` on top."""

    band = None  # not an identity evaluator

    def __init__(self, config: FaceGateConfig | None = None) -> None:
        super().__init__()
        self.config = config or FaceGateConfig()
        c = self.config
        layers: list[nn.Module] = [conv_bn_relu(3, c.widths[0])]
        for a, b in zip(c.widths[:-1], c.widths[1:]):
            layers += [nn.MaxPool2d(2), conv_bn_relu(a, b), conv_bn_relu(b, b)]
        layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = c.image_size // 2 ** len(c.widths)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c.widths[-1] * side * side, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"face gate expects images (N, 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "bilinear")
        return self.head(self.features(x)).squeeze(-1)

    @torch.no_grad()
    def probability(self, x: Tensor, chunk: int = 512) -> Tensor:
        return torch.cat([torch.sigmoid(self(part).float()) for part in x.split(chunk)])

    @torch.no_grad()
    def is_face(self, x: Tensor) -> Tensor:
        """Boolean ``(N,)``: the frame shows a face."""
        return self.probability(x) > THRESHOLD

    def hparams(self) -> dict:
        return self.config.to_dict()


# ---------------------------------------------------------------------------------------------- training data


def _rand(gen: torch.Generator, *shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def degrade_positive(x: Tensor, gen: torch.Generator) -> Tensor:
    """Faces as an imperfect generator makes them: softened, noisy, with other contrast and brightness."""
    from consisid_lab.data.spectral_filters import low_pass

    b = x.shape[0]
    soft = _rand(gen, b) < 0.5
    if soft.any():
        cutoff = float(_rand(gen, 1, low=0.12, high=0.6))
        x = torch.where(soft.view(b, 1, 1, 1), low_pass(x, cutoff), x)
    noisy = (_rand(gen, b) < 0.5).view(b, 1, 1, 1)
    sigma = _rand(gen, b, 1, 1, 1, high=0.12)
    x = torch.where(noisy, x + sigma * torch.randn(x.shape, generator=gen), x)
    gain = _rand(gen, b, 1, 1, 1, low=0.75, high=1.25)
    bias = _rand(gen, b, 1, 1, 1, low=-0.15, high=0.15)
    return (x * gain + bias).clamp(-1, 1)


def make_negatives(x: Tensor, gen: torch.Generator) -> Tensor:
    """One non-face image per input face ``(B, 3, H, W)``, kinds drawn uniformly from ``NEGATIVE_KINDS``."""
    from consisid_lab.data.spectral_filters import low_pass

    b, _, h, w = x.shape
    kind = torch.randint(len(NEGATIVE_KINDS), (b,), generator=gen)
    mean = x.mean(dim=(2, 3), keepdim=True)  # (B, 3, 1, 1)
    std = x.std(dim=(2, 3), keepdim=True)
    out = torch.empty_like(x)
    for k, name in enumerate(NEGATIVE_KINDS):
        idx = (kind == k).nonzero().flatten()
        n = idx.numel()
        if n == 0:
            continue
        if name == "noise":
            neg = _rand(gen, n, 1, 1, 1, low=-0.3, high=0.3) + _rand(gen, n, 1, 1, 1, low=0.1, high=1.0) * torch.randn(
                n, 3, h, w, generator=gen
            )
        elif name == "colour_noise":
            neg = mean[idx] + std[idx] * torch.randn(n, 3, h, w, generator=gen)
        elif name == "smooth_noise":
            blotches = low_pass(torch.randn(n, 3, h, w, generator=gen), float(_rand(gen, 1, low=0.05, high=0.5)))
            blotches = blotches / blotches.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
            neg = mean[idx] + std[idx] * blotches
        elif name == "blotched":
            blotches = low_pass(torch.randn(n, 3, h, w, generator=gen), float(_rand(gen, 1, low=0.1, high=0.4)))
            blotches = blotches / blotches.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
            neg = x[idx] + _rand(gen, n, 1, 1, 1, low=0.8, high=1.5) * std[idx] * blotches
        elif name == "constant":
            neg = torch.where(
                _rand(gen, n, 1, 1, 1) < 0.5, mean[idx], _rand(gen, n, 3, 1, 1, low=-1.0, high=1.0)
            ).expand(n, 3, h, w)
        elif name == "blob":
            neg = low_pass(x[idx], float(_rand(gen, 1, low=0.02, high=0.06)))
        elif name == "scrambled":
            neg = _scramble(x[idx], int([4, 8, 16, 32][int(torch.randint(4, (), generator=gen))]), gen)
        else:  # background
            neg = _backgrounds(n, h, w, gen)
        out[idx] = neg.clamp(-1, 1)
    return out


def _scramble(x: Tensor, patch: int, gen: torch.Generator) -> Tensor:
    """Shuffle the ``patch x patch`` tiles of each image."""
    b, c, h, w = x.shape
    patch = min(patch, h, w)
    tiles = F.unfold(x, patch, stride=patch)  # (B, c*p*p, T)
    perm = torch.stack([torch.randperm(tiles.shape[-1], generator=gen) for _ in range(b)])
    tiles = torch.gather(tiles, 2, perm[:, None].expand_as(tiles))
    return F.fold(tiles, (h - h % patch, w - w % patch), patch, stride=patch)


def _backgrounds(n: int, h: int, w: int, gen: torch.Generator) -> Tensor:
    """Two-colour linear gradients with a faint sinusoidal pattern ``(n, 3, h, w)``."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    angle = _rand(gen, n, 1, 1, high=2 * math.pi)
    t = (xs * torch.cos(angle) + ys * torch.sin(angle)).clamp(-1, 1)[:, None] * 0.5 + 0.5  # (n, 1, h, w)
    c0, c1 = _rand(gen, n, 3, 1, 1, low=-1.0, high=1.0), _rand(gen, n, 3, 1, 1, low=-1.0, high=1.0)
    kx, ky = _rand(gen, n, 1, 1, 1, low=1.0, high=8.0), _rand(gen, n, 1, 1, 1, low=1.0, high=8.0)
    pattern = _rand(gen, n, 1, 1, 1, high=0.1) * torch.sin(math.pi * (kx * xs + ky * ys))
    return c0 + (c1 - c0) * t + pattern


@dataclass
class GateRecipe:
    name: str = "default"
    steps: int = 200
    batch_size: int = 64  # faces per step (plus as many negatives)
    lr: float = 2e-3
    seed: int = 0

    @classmethod
    def tiny(cls) -> GateRecipe:
        return cls(name="tiny", steps=3, batch_size=8)

    def to_dict(self) -> dict:
        return asdict(self)


def train_face_gate(
    gate: FaceGate, faces: Tensor, recipe: GateRecipe, on_step: Callable[[], None] | None = None
) -> dict:
    """Binary cross-entropy on degraded faces (``faces (N, 3, H, W)`` uint8) against generated negatives."""
    from consisid_lab.encoders.training import _lr_at

    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(gate.parameters(), lr=recipe.lr, weight_decay=1e-4)
    gate.train()
    losses, accs = [], []
    n = faces.shape[0]
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe.steps, recipe.lr)
        idx = torch.randint(n, (min(recipe.batch_size, n),), generator=gen)
        x = faces[idx].float().div(127.5).sub(1.0)
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        pos, neg = degrade_positive(x, gen), make_negatives(x, gen)
        logits = gate(torch.cat([pos, neg]))
        target = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
        loss = F.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        accs.append(((logits > 0).float() == target).float().mean().item())
        if on_step is not None:
            on_step()
    gate.eval()
    tail = max(1, recipe.steps // 10)
    return {
        "steps": recipe.steps,
        "final_loss": float(np.mean(losses[-tail:])),
        "first_loss": losses[0] if losses else None,
        "train_accuracy": float(np.mean(accs[-tail:])),
    }
