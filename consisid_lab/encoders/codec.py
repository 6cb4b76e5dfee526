"""The stand-in video codec: a small autoencoder with CogVideoX's latent layout, trained on benchmark renders.

The real ConsisID denoises CogVideoX VAE latents: ``4k+1`` frames become ``k+1`` latent frames (the first frame on
its own, then groups of 4) at 1/8 of the spatial size. Denoising raw pixels instead asks each DiT token to predict
every pixel value of its patch, which a CPU-sized DiT cannot learn in minutes (its samples stay per-pixel noise).
This codec gives the embedded benchmark the same structure at CPU scale:

    video (B, 4k+1, 3, H, W) --frame 0 repeated 4x, then groups of 4 frames stacked on channels-->
    (B, k+1, 12, H, W) --2D conv encoder (x4 down)--> latents (B, k+1, C, H/4, W/4), per-channel standardised

A group's four frames share one latent, so the encoder must compress motion as a causal video VAE does. The first
latent frame depends on frame 0 only (like CogVideoX's causal first frame), which also makes a one-frame video
(a reference face) encode to one latent frame. The decoder maps a latent frame back to its 4 frames; for the first
group the 4 copies of frame 0 are averaged.

Training mixes an L1 loss with an L1 loss on high-passed images (normalised radius 0.25, the benchmark's band
split), so the fine identity marks are not traded away for a smaller overall error: how much of each identity band
survives the round trip is measured by ``python -m consisid_lab.validate_benchmark`` (``codec_*`` figures).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

FRAMES_PER_GROUP = 4  # temporal compression of CogVideoX's VAE


@dataclass
class CodecConfig:
    """Architecture of the stand-in codec (saved next to its weights)."""

    latent_channels: int = 16
    widths: tuple[int, int] = (48, 96)  # channels at 1/2 and 1/4 of the frame size
    temporal_factor: int = FRAMES_PER_GROUP
    spatial_factor: int = 4

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != 2:
            raise ValueError(f"codec widths={self.widths} must name two stages (1/2 and 1/4 of the frame size)")
        if self.spatial_factor != 4:
            raise ValueError(f"codec spatial_factor={self.spatial_factor}: only x4 is implemented")
        if self.temporal_factor < 1:
            raise ValueError(f"codec temporal_factor={self.temporal_factor} must be >= 1")
        if self.latent_channels < 1:
            raise ValueError(f"codec latent_channels={self.latent_channels} must be >= 1")

    def to_dict(self) -> dict:
        return {**asdict(self), "widths": list(self.widths)}


def _groups(c: int) -> int:
    return math.gcd(c, 16)


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(c), c),
            nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.GroupNorm(_groups(c), c),
            nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class StandInVideoCodec(nn.Module):
    """Encoder / decoder pair over groups of frames, with per-channel latent statistics as buffers.

    ``encode``/``decode`` speak the project's frame-major layout; latents are standardised with the statistics
    measured on the training renders after training (``latent_mean``, ``latent_std``), the role of a VAE's
    scaling factor.
    """

    def __init__(self, config: CodecConfig | None = None) -> None:
        super().__init__()
        self.config = config or CodecConfig()
        c = self.config
        g = c.temporal_factor
        w1, w2 = c.widths
        cin = 3 * g * 4  # a group's frames on channels, then a 2x2 space-to-depth
        self.encoder = nn.Sequential(
            nn.Conv2d(cin, w1, 3, padding=1),
            ResBlock(w1),
            nn.Conv2d(w1, w2, 3, stride=2, padding=1),
            ResBlock(w2),
            nn.GroupNorm(_groups(w2), w2),
            nn.SiLU(),
            nn.Conv2d(w2, c.latent_channels, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(c.latent_channels, w2, 3, padding=1),
            ResBlock(w2),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(w2, w1, 3, padding=1),
            ResBlock(w1),
            nn.GroupNorm(_groups(w1), w1),
            nn.SiLU(),
            nn.Conv2d(w1, cin, 3, padding=1),
        )
        self.register_buffer("latent_mean", torch.zeros(c.latent_channels))
        self.register_buffer("latent_std", torch.ones(c.latent_channels))

    # ------------------------------------------------------------------ layout
    def group_frames(self, video: Tensor) -> Tensor:
        """``(B, 4k+1, 3, H, W)`` -> ``(B, k+1, 3g, H, W)``: frame 0 repeated g times, then groups of g frames."""
        g = self.config.temporal_factor
        b, f, _, h, w = video.shape
        if (f - 1) % g != 0:
            raise ValueError(f"the codec needs num_frames = {g}k+1, got {f}")
        padded = torch.cat([video[:, :1].expand(b, g - 1, 3, h, w), video], dim=1)  # (B, g(k+1), 3, H, W)
        return padded.reshape(b, -1, g * 3, h, w)

    def ungroup_frames(self, groups: Tensor) -> Tensor:
        """Inverse of :meth:`group_frames`; the first group's g copies of frame 0 are averaged."""
        g = self.config.temporal_factor
        b, n, _, h, w = groups.shape
        frames = groups.reshape(b, n * g, 3, h, w)
        first = frames[:, :g].mean(dim=1, keepdim=True)  # (B, 1, 3, H, W)
        return torch.cat([first, frames[:, g:]], dim=1)  # (B, 4k+1, 3, H, W)

    # ------------------------------------------------------------------ raw (unstandardised) maps
    def encode_raw(self, video: Tensor) -> Tensor:
        """``(B, 4k+1, 3, H, W)`` in [-1, 1] -> raw latents ``(B, k+1, C, H/4, W/4)``."""
        grouped = self.group_frames(video)  # (B, n, 3g, H, W)
        b, n = grouped.shape[:2]
        x = F.pixel_unshuffle(grouped.flatten(0, 1), 2)  # (B*n, 12g, H/2, W/2)
        return self.encoder(x).unflatten(0, (b, n))

    def decode_raw(self, z: Tensor) -> Tensor:
        """Raw latents ``(B, n, C, h, w)`` -> video ``(B, g(n-1)+1, 3, 4h, 4w)``."""
        b, n = z.shape[:2]
        x = F.pixel_shuffle(self.decoder(z.flatten(0, 1)), 2)  # (B*n, 3g, H, W)
        return self.ungroup_frames(x.unflatten(0, (b, n)))

    # ------------------------------------------------------------------ standardised latents
    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, 1, -1, 1, 1)
        return self.latent_mean.view(shape).to(z), self.latent_std.view(shape).to(z)

    def encode(self, video: Tensor) -> Tensor:
        z = self.encode_raw(video)
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode(self, latents: Tensor) -> Tensor:
        mean, std = self._stats(latents)
        return self.decode_raw(latents * std + mean)

    def hparams(self) -> dict:
        return self.config.to_dict()


@dataclass
class CodecRecipe:
    """How the codec is trained (hashed into its cache entry)."""

    name: str = "default"
    identities: int = 192  # identities of the "encoder" split
    videos_per_identity: int = 2
    num_frames: int = 9
    batch_size: int = 16  # clips per step
    crop: int = 32  # square crops (multiples of 4) of the frames: the network is convolutional, so this is 4x cheaper
    steps: int = 800
    lr: float = 2e-3
    high_weight: float = 4.0  # weight of the L1 loss on high-passed frames (radius 0.25)
    latent_noise: float = 0.05  # std of noise added to latents in training, relative to their std
    seed: int = 0

    @classmethod
    def tiny(cls) -> CodecRecipe:
        return cls(name="tiny", identities=4, videos_per_identity=1, batch_size=2, steps=3)

    def to_dict(self) -> dict:
        return asdict(self)


def render_clip_pool(generator_config, recipe: CodecRecipe, workers: int = 1) -> Tensor:
    """Training clips of the "encoder" split: ``(N, F, 3, H, W)`` uint8 (never train / val / test identities)."""
    from dataclasses import replace

    from consisid_lab.encoders.training import _render_clips_chunk, parallel_chunks

    cfg = replace(generator_config, num_frames=recipe.num_frames)
    results = parallel_chunks(
        _render_clips_chunk,
        [
            (cfg, chunk, recipe.videos_per_identity, recipe.seed)
            for chunk in np.array_split(np.arange(recipe.identities), max(1, workers * 2))
            if len(chunk)
        ],
        workers,
    )
    clips = np.concatenate(results)  # (N, F, H, W, 3) uint8
    return torch.from_numpy(clips).permute(0, 1, 4, 2, 3).contiguous()


def _to_float(x: Tensor) -> Tensor:
    return x.float().div_(127.5).sub_(1.0)


def _random_crop(clips: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """One random crop at a multiple of 4 pixels ``(B, F, 3, size, size)`` (the whole frame if it is smaller)."""
    h, w = clips.shape[-2:]
    if size >= min(h, w):
        return clips
    y = int(torch.randint((h - size) // 4 + 1, (), generator=generator)) * 4
    x = int(torch.randint((w - size) // 4 + 1, (), generator=generator)) * 4
    return clips[..., y : y + size, x : x + size]


def codec_loss(codec: StandInVideoCodec, video: Tensor, recipe: CodecRecipe, generator: torch.Generator) -> Tensor:
    from consisid_lab.data.spectral_filters import high_pass

    z = codec.encode_raw(video)
    if recipe.latent_noise > 0:
        z = z + recipe.latent_noise * z.detach().std() * torch.randn(z.shape, generator=generator)
    recon = codec.decode_raw(z)
    loss = (recon - video).abs().mean()
    if recipe.high_weight > 0:
        diff = (recon - video).flatten(0, 1)
        loss = loss + recipe.high_weight * high_pass(diff, 0.25).abs().mean()
    return loss


def train_codec(
    codec: StandInVideoCodec,
    clips: Tensor,
    recipe: CodecRecipe,
    on_step: Callable[[], None] | None = None,
) -> dict:
    """Train on ``clips (N, F, 3, H, W)`` uint8, then measure the per-channel latent statistics."""
    from consisid_lab.encoders.training import _lr_at

    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(codec.parameters(), lr=recipe.lr, weight_decay=1e-4)
    codec.train()
    losses: list[float] = []
    n = clips.shape[0]
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe.steps, recipe.lr)
        idx = torch.randint(n, (min(recipe.batch_size, n),), generator=gen)
        video = _to_float(_random_crop(clips[idx], recipe.crop, gen))
        if torch.rand((), generator=gen) < 0.5:  # mirrored clips: more poses for free
            video = video.flip(-1)
        loss = codec_loss(codec, video, recipe, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step()
    codec.eval()
    with torch.no_grad():
        zs = torch.cat([codec.encode_raw(_to_float(part)) for part in clips[: min(n, 256)].split(16)])
        codec.latent_mean.copy_(zs.mean(dim=(0, 1, 3, 4)))
        codec.latent_std.copy_(zs.std(dim=(0, 1, 3, 4)).clamp_min(1e-4))
        recon = codec.decode(codec.encode(_to_float(clips[: min(n, 32)])))
        err = (recon - _to_float(clips[: min(n, 32)])).abs().mean().item()
    tail = losses[-max(1, recipe.steps // 10) :]
    return {
        "steps": recipe.steps,
        "final_loss": float(np.mean(tail)),
        "first_loss": losses[0] if losses else None,
        "reconstruction_l1": err,
    }
