"""The stand-in video codec: a linear autoencoder with CogVideoX's latent layout, fitted on benchmark renders.

The real ConsisID denoises CogVideoX VAE latents: ``4k+1`` frames become ``k+1`` latent frames (the first frame on
its own, then groups of 4) at 1/8 of the spatial size. Denoising raw pixels instead asks each DiT token to predict
every pixel value of its patch, which a CPU-sized DiT cannot learn in minutes (its samples stay per-pixel noise).
This codec gives the embedded benchmark the same structure at CPU scale:

    video (B, 4k+1, 3, H, W) --frame 0 repeated 4x, then groups of 4 frames stacked on channels-->
    (B, k+1, 12, H, W) --4x4 space-to-depth--> blocks (B, k+1, 192, H/4, W/4)
    --projection on C principal directions--> latents (B, k+1, C, H/4, W/4), per-channel standardised
    --back-projection + a convolutional refiner--> video

The principal directions are those of the benchmark's own blocks (the training renders of the "encoder" split,
and their mirror images), fitted in closed form: the optimal linear autoencoder for the squared error, with one
basis for the first latent frame (frame 0 alone, as CogVideoX's causal first frame, so a one-frame video such as a
reference face is one latent frame) and one for the groups of 4 frames.

The decoder adds a small convolutional refiner to the back-projection, trained (with the projection fixed) to
reconstruct the clips from latents with Gaussian noise of a random level added. A denoiser's samples are never
exact latents: back-projected linearly, their errors show as 4x4 blocks of colour noise (a 600-step default run's
face rate 0.57); the refiner maps them back to faces (face rate 1.00 on the same samples) at a small cost on exact
latents (identity gap of the round trip 0.43 against 0.44).

Why linear: a small convolutional autoencoder trained for the same build budget (800 steps, L1 plus an L1 on
high-passed frames) reconstructed with 5x the L1 error of this projection and erased the high-frequency identity
marks entirely (FaceSim-High of its reconstructions 0.08 against 0.79 for the originals; this codec keeps 0.40 at
16 channels). A codec that erases one identity band makes the frequency study meaningless: how much of each band
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
STANDARDIZE = ("channel", "global")


@dataclass
class CodecConfig:
    """Architecture of the stand-in codec (saved next to its weights)."""

    latent_channels: int = 16
    temporal_factor: int = FRAMES_PER_GROUP
    spatial_factor: int = 4
    # "channel": every latent channel to unit variance (the DiT sees fine and coarse directions alike);
    # "global": one scale for all channels of a basis (fine directions stay small, as in pixel space).
    standardize: str = "channel"
    refiner_widths: tuple[int, ...] = (96, 48)  # channels at the latent and twice the latent size; () for none

    def __post_init__(self) -> None:
        self.refiner_widths = tuple(int(w) for w in self.refiner_widths)
        if self.refiner_widths and (len(self.refiner_widths) != 2 or any(w % 16 for w in self.refiner_widths)):
            raise ValueError(f"codec refiner_widths={self.refiner_widths} must be () or two multiples of 16")
        if self.spatial_factor < 1 or (self.refiner_widths and self.spatial_factor % 2):
            raise ValueError(
                f"codec spatial_factor={self.spatial_factor} must be >= 1, and even with a refiner "
                "(it works at twice the latent size)"
            )
        if self.temporal_factor < 1:
            raise ValueError(f"codec temporal_factor={self.temporal_factor} must be >= 1")
        if not 1 <= self.latent_channels <= self.block_dim:
            raise ValueError(
                f"codec latent_channels={self.latent_channels} must be in [1, {self.block_dim}] "
                f"(3 x {self.temporal_factor} frames x {self.spatial_factor}^2 pixels per block)"
            )
        if self.standardize not in STANDARDIZE:
            raise ValueError(f"codec standardize={self.standardize!r} must be one of {STANDARDIZE}")

    @property
    def block_dim(self) -> int:
        return 3 * self.temporal_factor * self.spatial_factor**2

    def to_dict(self) -> dict:
        return {**asdict(self), "refiner_widths": list(self.refiner_widths)}


def _res_block(c: int) -> nn.Sequential:
    return nn.Sequential(
        nn.GroupNorm(16, c),
        nn.SiLU(),
        nn.Conv2d(c, c, 3, padding=1),
        nn.GroupNorm(16, c),
        nn.SiLU(),
        nn.Conv2d(c, c, 3, padding=1),
    )


class Refiner(nn.Module):
    """Latents ``(N, C, h, w)`` -> a correction of the grouped frames ``(N, 3g, s h, s w)``; zero at initialisation
    (the last convolution starts at zero), so an untrained codec decodes exactly linearly."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        w1, w2 = config.refiner_widths
        self.shuffle = config.spatial_factor // 2
        self.stem = nn.Conv2d(config.latent_channels, w1, 3, padding=1)
        self.block1 = _res_block(w1)
        self.up = nn.Conv2d(w1, w2, 3, padding=1)
        self.block2 = _res_block(w2)
        self.out = nn.Conv2d(w2, 3 * config.temporal_factor * self.shuffle**2, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: Tensor) -> Tensor:
        x = self.stem(z)
        x = x + self.block1(x)
        x = self.up(F.interpolate(x, scale_factor=2, mode="nearest"))
        x = x + self.block2(x)
        return F.pixel_shuffle(self.out(F.silu(x)), self.shuffle)


class StandInVideoCodec(nn.Module):
    """Projection of each block of pixels onto fitted principal directions, and back.

    Buffers (all the state, saved and hashed like other stand-in weights): ``block_mean (2, D)``, ``basis (2, D, C)``
    (orthonormal columns; index 0 for the first latent frame, 1 for the groups), ``latent_std (2, C)``. Until
    :func:`train_codec` fits them the basis is the first ``C`` block coordinates, so the layout can be tested
    without a fit. ``encode``/``decode`` speak the project's frame-major layout.
    """

    def __init__(self, config: CodecConfig | None = None) -> None:
        super().__init__()
        self.config = config or CodecConfig()
        d, c = self.config.block_dim, self.config.latent_channels
        self.register_buffer("block_mean", torch.zeros(2, d))
        self.register_buffer("basis", torch.eye(d)[:, :c].repeat(2, 1, 1))
        self.register_buffer("latent_std", torch.ones(2, c))
        self.refiner = Refiner(self.config) if self.config.refiner_widths else None

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

    def blocks(self, video: Tensor) -> Tensor:
        """``(B, 4k+1, 3, H, W)`` -> ``(B, k+1, D, H/s, W/s)``: each latent position's pixels as one vector."""
        s = self.config.spatial_factor
        h, w = video.shape[-2:]
        if h % s or w % s:
            raise ValueError(f"the codec needs frame sizes that are multiples of {s}, got {h} x {w}")
        grouped = self.group_frames(video)
        return F.pixel_unshuffle(grouped.flatten(0, 1), s).unflatten(0, grouped.shape[:2])

    def unblocks(self, blocks: Tensor) -> Tensor:
        """Inverse of :meth:`blocks`."""
        grouped = F.pixel_shuffle(blocks.flatten(0, 1), self.config.spatial_factor).unflatten(0, blocks.shape[:2])
        return self.ungroup_frames(grouped)

    def _per_frame(self, buf: Tensor, n: int, like: Tensor) -> Tensor:
        """Buffer ``(2, ...)`` -> ``(n, ...)``: the first latent frame's entry, then the groups' for the others."""
        index = torch.ones(n, dtype=torch.long, device=buf.device)
        index[0] = 0
        return buf.index_select(0, index).to(like)

    # ------------------------------------------------------------------ maps
    def encode(self, video: Tensor) -> Tensor:
        """``(B, 4k+1, 3, H, W)`` in [-1, 1] -> standardised latents ``(B, k+1, C, H/s, W/s)``."""
        x = self.blocks(video)
        n = x.shape[1]
        mean = self._per_frame(self.block_mean, n, x)[None, :, :, None, None]
        z = torch.einsum("bndhw,ndc->bnchw", x - mean, self._per_frame(self.basis, n, x))
        return z / self._per_frame(self.latent_std, n, x)[None, :, :, None, None]

    def decode_linear(self, latents: Tensor) -> Tensor:
        """The back-projection alone: latents ``(B, n, C, h, w)`` -> video ``(B, g(n-1)+1, 3, s h, s w)``."""
        n = latents.shape[1]
        z = latents * self._per_frame(self.latent_std, n, latents)[None, :, :, None, None]
        x = torch.einsum("bnchw,ndc->bndhw", z, self._per_frame(self.basis, n, latents))
        return self.unblocks(x + self._per_frame(self.block_mean, n, latents)[None, :, :, None, None])

    def decode(self, latents: Tensor) -> Tensor:
        """Standardised latents ``(B, n, C, h, w)`` -> video: the back-projection plus the refiner's correction."""
        video = self.decode_linear(latents)
        if self.refiner is None:
            return video
        b, n = latents.shape[:2]
        return video + self.ungroup_frames(self.refiner(latents.flatten(0, 1)).unflatten(0, (b, n)))

    def hparams(self) -> dict:
        return self.config.to_dict()


@dataclass
class CodecRecipe:
    """What the codec is fitted on (hashed into its cache entry)."""

    name: str = "default"
    identities: int = 192  # identities of the "encoder" split
    videos_per_identity: int = 2
    num_frames: int = 9
    chunk: int = 16  # clips per pass of the statistics
    mirror: bool = True  # fit on the mirror images too: more poses and mark layouts for free
    # The refiner: trained on random square crops (multiples of 4; it is convolutional) of latents with noise of
    # std uniform in [0, refine_noise] (latent units) added, to an L1 loss plus an L1 loss on high-passed frames
    # (normalised radius 0.25, the benchmark's band split) so that it sharpens rather than blurs the marks.
    refine_steps: int = 800
    refine_noise: float = 0.5
    batch_size: int = 16
    crop: int = 32
    lr: float = 2e-3
    high_weight: float = 4.0
    seed: int = 0

    @classmethod
    def tiny(cls) -> CodecRecipe:
        return cls(name="tiny", identities=4, videos_per_identity=1, chunk=2, refine_steps=3, batch_size=2)

    @property
    def fit_passes(self) -> int:
        return math.ceil(self.identities * self.videos_per_identity / self.chunk) * (2 if self.mirror else 1)

    @property
    def steps(self) -> int:
        """Progress-bar steps of :func:`train_codec`: the passes of the fit, then the refiner's steps."""
        return self.fit_passes + self.refine_steps

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


def _principal(total: Tensor, outer: Tensor, count: int, channels: int) -> tuple[Tensor, Tensor, Tensor, float]:
    """Mean, top ``channels`` eigenvectors (sign-fixed: largest entry positive), their std, explained variance."""
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    top = vectors[:, :channels]
    pivot = top.abs().argmax(dim=0)
    top = top * torch.sign(top[pivot, torch.arange(channels)])
    explained = float(values[:channels].sum() / values.sum().clamp_min(1e-30))
    return mean, top, values[:channels].sqrt(), explained


def train_codec(
    codec: StandInVideoCodec,
    clips: Tensor,
    recipe: CodecRecipe,
    on_step: Callable[[], None] | None = None,
) -> dict:
    """Fit the codec on ``clips (N, F, 3, H, W)`` uint8: the blocks' mean and principal directions, in float64,
    one basis for the first latent frame and one for the groups, with the latents' per-channel statistics (the
    principal values); then train the refiner, if the codec has one (:func:`train_refiner`)."""
    c = codec.config.latent_channels
    d = codec.config.block_dim
    sums = [torch.zeros(d, dtype=torch.float64) for _ in range(2)]
    outers = [torch.zeros(d, d, dtype=torch.float64) for _ in range(2)]
    counts = [0, 0]
    views = (False, True) if recipe.mirror else (False,)
    for mirrored in views:
        for part in clips.split(recipe.chunk):
            video = _to_float(part.flip(-1) if mirrored else part)
            x = codec.blocks(video).double()  # (B, n, D, h, w)
            for i, sel in enumerate((x[:, :1], x[:, 1:])):
                v = sel.movedim(2, -1).reshape(-1, d)
                sums[i] += v.sum(0)
                outers[i] += v.T @ v
                counts[i] += v.shape[0]
            if on_step is not None:
                on_step()
    if counts[1] == 0:  # one-frame clips: the groups share the first frame's basis
        sums[1], outers[1], counts[1] = sums[0], outers[0], counts[0]
    explained = []
    with torch.no_grad():
        for i in range(2):
            mean, basis, std, frac = _principal(sums[i], outers[i], counts[i], c)
            codec.block_mean[i] = mean.float()
            codec.basis[i] = basis.float()
            if codec.config.standardize == "global":
                std = std.square().mean().sqrt().expand(c)
            codec.latent_std[i] = std.float().clamp_min(1e-4)
            explained.append(frac)
    losses = train_refiner(codec, clips, recipe, on_step) if codec.refiner is not None else []
    with torch.no_grad():
        sample = _to_float(clips[: min(clips.shape[0], 32)])
        z = codec.encode(sample)
        err = (codec.decode(z) - sample).abs().mean().item()
        err_linear = (codec.decode_linear(z) - sample).abs().mean().item()
    codec.eval()
    return {
        "steps": recipe.steps,
        "blocks": counts,
        "explained_variance_first": explained[0],
        "explained_variance_groups": explained[1],
        "reconstruction_l1": err,
        "reconstruction_l1_linear": err_linear,
        # the refiner's loss over its last 10 % of steps; without a refiner, the reconstruction error
        "final_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])) if losses else err,
    }


def _random_crop(clips: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """One random crop at a multiple of 4 pixels ``(B, F, 3, size, size)`` (the whole frame if it is smaller)."""
    h, w = clips.shape[-2:]
    if size >= min(h, w):
        return clips
    y = int(torch.randint((h - size) // 4 + 1, (), generator=generator)) * 4
    x = int(torch.randint((w - size) // 4 + 1, (), generator=generator)) * 4
    return clips[..., y : y + size, x : x + size]


def train_refiner(
    codec: StandInVideoCodec, clips: Tensor, recipe: CodecRecipe, on_step: Callable[[], None] | None = None
) -> list[float]:
    """Train the refiner (the fitted projection stays fixed) on noisy latents of ``clips``; returns the losses."""
    from consisid_lab.data.spectral_filters import high_pass
    from consisid_lab.encoders.training import _lr_at

    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    params = list(codec.refiner.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-4)
    codec.refiner.train()
    losses: list[float] = []
    n = clips.shape[0]
    for step in range(recipe.refine_steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe.refine_steps, recipe.lr)
        idx = torch.randint(n, (min(recipe.batch_size, n),), generator=gen)
        video = _to_float(_random_crop(clips[idx], recipe.crop, gen))
        if torch.rand((), generator=gen) < 0.5:
            video = video.flip(-1)
        with torch.no_grad():
            z = codec.encode(video)
            level = torch.rand(z.shape[0], 1, 1, 1, 1, generator=gen) * recipe.refine_noise
            z = z + level * torch.randn(z.shape, generator=gen)
        diff = codec.decode(z) - video
        loss = diff.abs().mean() + recipe.high_weight * high_pass(diff.flatten(0, 1), 0.25).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step()
    codec.refiner.eval()
    return losses
