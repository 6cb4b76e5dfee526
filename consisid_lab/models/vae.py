"""Frozen latent codecs: video frames in [-1, 1] <-> scaled diffusion latents.

Every codec speaks the project's frame-major layout ``(B, F, C, H, W)``; the diffusers VAE works channel-major
``(B, C, F, H, W)`` and the permutation stays inside :class:`CogVideoXCodec`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (what a yaml file can hold) -> a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use one of 'float32', 'bfloat16', 'float16'")
    return dtype


class LatentCodec(nn.Module):
    """Interface of a frozen latent codec.

    Attributes:
        latent_channels: C of the latents.
        spatial_factor: H / h.
        temporal_factor: how many frames (after the first) share one latent frame; 1 means frames map 1:1.
        scaling_factor: latents are ``scaling_factor * raw_latents`` so that they have roughly unit variance.
    """

    frozen = True  # declared: trainable selectors never unfreeze it
    # Whether encodings come from a posterior that can be sampled (a real VAE); deterministic codecs say False.
    has_posterior = False

    latent_channels: int
    spatial_factor: int
    temporal_factor: int
    scaling_factor: float

    def encode(self, video: Tensor) -> Tensor:
        """``(B, F, 3, H, W)`` in [-1, 1] -> scaled latents ``(B, f, C, h, w)``."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents ``(B, f, C, h, w)`` -> video ``(B, F, 3, H, W)`` in (roughly) [-1, 1]."""
        raise NotImplementedError

    @contextlib.contextmanager
    def posterior_sampling(self, generator: torch.Generator) -> Iterator[None]:
        """Inside, :meth:`encode` draws from the posterior with ``generator`` (codecs with ``has_posterior``)."""
        raise ValueError(
            f"{type(self).__name__} has no posterior to sample (a deterministic encoder); posterior sampling needs a "
            "real VAE (model/vae=cogvideox), or set model.loss.sample_posterior=false"
        )
        yield  # pragma: no cover

    def encode_image(self, image: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> one latent frame ``(B, 1, C, h, w)`` (a one-frame video)."""
        return self.encode(image[:, None])

    def num_latent_frames(self, num_frames: int) -> int:
        # Causal video VAEs keep the first frame on its own and group the rest by temporal_factor.
        return 1 + (num_frames - 1) // self.temporal_factor

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(f, C, h, w)`` of the latents of a ``num_frames x height x width`` video (validated)."""
        self.check_size(num_frames, height, width)
        return (
            self.num_latent_frames(num_frames),
            self.latent_channels,
            height // self.spatial_factor,
            width // self.spatial_factor,
        )

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        """Raise ``ValueError`` naming the valid values when the codec cannot encode this size exactly."""
        name = type(self).__name__
        if num_frames < 1 or (num_frames - 1) % self.temporal_factor != 0:
            valid = ", ".join(str(1 + k * self.temporal_factor) for k in range(5))
            raise ValueError(
                f"{name} needs num_frames = {self.temporal_factor}k+1 (e.g. {valid}, ...), got {num_frames}"
            )
        for axis, size in (("height", height), ("width", width)):
            if size < self.spatial_factor or size % self.spatial_factor != 0:
                raise ValueError(
                    f"{name} needs {axis} to be a positive multiple of {self.spatial_factor}, got {size}; "
                    f"use e.g. {max(self.spatial_factor, round(size / self.spatial_factor) * self.spatial_factor)}"
                )

    def _check_video(self, video: Tensor) -> None:
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"{type(self).__name__}.encode expects video (B, F, 3, H, W), got {tuple(video.shape)}")
        self.check_size(video.shape[1], video.shape[3], video.shape[4])


class PixelCodec(LatentCodec):
    """Exact, invertible space-to-depth: each ``s x s`` pixel patch becomes ``3 s^2`` channels.

    No parameters and no temporal compression (frames map 1:1), so it needs no weights: the embedded default.
    ``decode(encode(x)) == x`` exactly (up to the float rounding of the scaling).
    """

    def __init__(self, spatial_factor: int = 4, scaling_factor: float = 1.0) -> None:
        super().__init__()
        if spatial_factor < 1:
            raise ValueError(f"spatial_factor must be >= 1, got {spatial_factor}")
        if scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {scaling_factor}")
        self.spatial_factor = int(spatial_factor)
        self.temporal_factor = 1
        self.latent_channels = 3 * self.spatial_factor**2
        self.scaling_factor = float(scaling_factor)

    def encode(self, video: Tensor) -> Tensor:
        self._check_video(video)
        b, f = video.shape[:2]
        z = F.pixel_unshuffle(video.flatten(0, 1), self.spatial_factor)  # (B*F, C, h, w)
        return z.unflatten(0, (b, f)) * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(
                f"PixelCodec.decode expects latents (B, f, {self.latent_channels}, h, w), got {tuple(latents.shape)}"
            )
        b, f = latents.shape[:2]
        x = F.pixel_shuffle(latents.flatten(0, 1) / self.scaling_factor, self.spatial_factor)  # (B*F, 3, H, W)
        return x.unflatten(0, (b, f))


class CogVideoXCodec(LatentCodec):
    """diffusers' ``AutoencoderKLCogVideoX`` loaded from a local folder, frozen.

    ``4k+1`` frames -> ``k+1`` latent frames (the causal VAE keeps frame 0 alone), ``x8`` spatial for the released
    VAE; the factors are read from the loaded config, so smaller test models work the same way. Decoding restores
    the frame count only for an odd number of latent frames, so :meth:`check_size` asks for ``8k+1`` frames
    (``49`` as released).

    Args:
        path: local model folder (a CogVideoX / ConsisID checkpoint root, or a folder holding the VAE itself).
        subfolder: the VAE's folder inside ``path`` (``"vae"`` in the released layout); ``None`` or ``""`` if
            ``path`` is the VAE folder.
        dtype: weights and compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).
        tiling / slicing: diffusers' memory savers (spatial tiles; one sample at a time).
        sample_posterior: draw from the posterior instead of taking its mean (the released training code samples;
            the mean keeps encodings deterministic, which cached latents and tests rely on).
    """

    has_posterior = True

    def __init__(
        self,
        path: str,
        subfolder: str | None = "vae",
        dtype: str = "float32",
        tiling: bool = False,
        slicing: bool = False,
        sample_posterior: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderKLCogVideoX

        folder = Path(path).expanduser() / (subfolder or "")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"no CogVideoX VAE at {folder} (expected {folder / 'config.json'}); set model.vae.path to a local "
                "CogVideoX/ConsisID checkpoint folder (weights are never downloaded) or use model/vae=pixel"
            )
        vae = AutoencoderKLCogVideoX.from_pretrained(
            str(Path(path).expanduser()),
            subfolder=subfolder or None,
            torch_dtype=torch_dtype(dtype),
            local_files_only=True,
        )
        vae.requires_grad_(False)
        vae.eval()
        if tiling:
            vae.enable_tiling()
        if slicing:
            vae.use_slicing = True
        self.vae = vae
        self.sample_posterior = sample_posterior
        self._posterior_generator: torch.Generator | None = None
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        num_down = len(cfg.block_out_channels) - 1  # the last encoder block does not downsample
        self.spatial_factor = 2**num_down
        # Time is halved by the first log2(ratio) downsampling blocks only, so a shallow VAE compresses less.
        self.temporal_factor = 2 ** min(int(math.log2(cfg.temporal_compression_ratio)), num_down)
        self.scaling_factor = float(cfg.scaling_factor)
        logger.info(
            "loaded CogVideoX VAE from %s (C=%d, x%d spatial, x%d temporal, scaling %.6g)",
            folder,
            self.latent_channels,
            self.spatial_factor,
            self.temporal_factor,
            self.scaling_factor,
        )

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        # The decoder upsamples time in batches of 2 latent frames and keeps a causal first frame only when the
        # latent count is odd, so a round trip needs an odd number of latent frames: 2k*temporal + 1 frames
        # (1, 9, 17, ..., 49 for the released VAE).
        step = 2 * self.temporal_factor
        if num_frames < 1 or (num_frames - 1) % step != 0:
            valid = ", ".join(str(1 + k * step) for k in range(7))
            raise ValueError(
                f"CogVideoXCodec needs num_frames = {step}k+1 (an odd number of latent frames: {valid}, ...), "
                f"got {num_frames}"
            )
        super().check_size(num_frames, height, width)

    def train(self, mode: bool = True) -> CogVideoXCodec:
        # Frozen: stays in eval mode whatever the surrounding module does.
        super().train(mode)
        self.vae.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        self._check_video(video)
        x = video.to(self.dtype).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W)
        posterior = self.vae.encode(x).latent_dist
        gen = self._posterior_generator
        if gen is not None:  # inside posterior_sampling: a seeded draw
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(posterior.mean)
        else:
            z = posterior.sample() if self.sample_posterior else posterior.mode()  # (B, C, f, h, w)
        return (z.permute(0, 2, 1, 3, 4) * self.scaling_factor).to(video.dtype)

    @contextlib.contextmanager
    def posterior_sampling(self, generator: torch.Generator) -> Iterator[None]:
        previous, self._posterior_generator = self._posterior_generator, generator
        try:
            yield
        finally:
            self._posterior_generator = previous

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(
                f"CogVideoXCodec.decode expects latents (B, f, {self.latent_channels}, h, w), "
                f"got {tuple(latents.shape)}"
            )
        z = (latents.to(self.dtype) / self.scaling_factor).permute(0, 2, 1, 3, 4)  # (B, C, f, h, w)
        video = self.vae.decode(z).sample  # (B, 3, F, H, W)
        return video.permute(0, 2, 1, 3, 4).to(latents.dtype)


class StandInCodec(LatentCodec):
    """The embedded benchmark's learned codec (``consisid_lab.encoders.codec``), frozen, with CogVideoX's layout:
    ``4k+1`` frames -> ``k+1`` latent frames, x4 spatial, standardised latents (no further scaling).

    Built on first use into the stand-in cache like the other stand-ins (hashed on the renderer, recipe and
    architecture; a stale or corrupt entry is rebuilt, never reused).
    """

    def __init__(self, cache_dir: str | None = None, recipe: str = "default") -> None:
        super().__init__()
        from consisid_lab.encoders.recipes import named_recipe
        from consisid_lab.encoders.store import load_standins

        codec = load_standins(cache_dir, recipe=named_recipe(recipe)).codec
        codec.requires_grad_(False)
        self.codec = codec.eval()
        cfg = codec.config
        self.latent_channels = int(cfg.latent_channels)
        self.spatial_factor = int(cfg.spatial_factor)
        self.temporal_factor = int(cfg.temporal_factor)
        self.scaling_factor = 1.0

    def train(self, mode: bool = True) -> StandInCodec:
        # Frozen: stays in eval mode (GroupNorm has no running statistics, but dropout-free eval is the contract).
        super().train(mode)
        self.codec.eval()
        return self

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        self._check_video(video)
        return self.codec.encode(video.float()).to(video.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(
                f"StandInCodec.decode expects latents (B, f, {self.latent_channels}, h, w), got {tuple(latents.shape)}"
            )
        return self.codec.decode(latents.float()).to(latents.dtype)
