"""The training objective as plain functions around the denoiser.

One training step (every random draw from one generator seeded by (seed, global step), in this order, so that a
resumed run repeats it exactly):

1. caption dropout (classifier-free guidance): ``B`` uniforms;
2. dynamic cross-face reference (probability beta, plus Gaussian noise): ``B`` uniforms, then the noise;
3. identity dropout (both identity routes of a sample at once): ``B`` uniforms;
4. timesteps; 5. the noise; 6. dynamic mask loss (probability alpha, for the whole batch): one uniform.

The loss is the x0 reconstruction weighted by ``1 / (1 - alpha_bar_t)`` (the v-loss, exactly; see
:mod:`consisid_lab.models.diffusion`), on the face mask when the mask loss is on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from consisid_lab.models.denoiser import Conditions, IdentityDenoiser
from consisid_lab.models.diffusion import sample_timesteps, v_to_x0, weighted_x0_loss
from consisid_lab.types import IdentityFeatures, VideoBatch

if TYPE_CHECKING:
    from diffusers import CogVideoXDPMScheduler


@dataclass(frozen=True)
class LossSettings:
    """``model.loss`` of the config (defaults: the paper's alpha = beta = 0.5)."""

    mask_prob: float = 0.5  # alpha: probability of the dynamic mask loss
    cross_face_prob: float = 0.5  # beta: probability of a reference from outside the clip
    cross_face_noise: float = 0.05  # std of the Gaussian noise on a cross-face reference, in [-1, 1] units
    text_dropout: float = 0.1
    identity_dropout: float = 0.0
    high_noise_bias: float = 1.0
    seed: int = 0

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> LossSettings:
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown model.loss settings {unknown}; known: {sorted(known)}")
        return cls(**{k: type(getattr(cls, k))(v) for k, v in raw.items()})


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one training step: a function of (seed, global step) only."""
    return torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + int(step))


def caption_dropout(batch_size: int, prob: float, gen: torch.Generator) -> list[bool]:
    """Which captions are replaced by the empty caption."""
    return [r < prob for r in torch.rand(batch_size, generator=gen).tolist()]


def choose_reference(
    batch: VideoBatch, prob: float, noise_std: float, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Dynamic cross-face reference: with probability ``prob`` the face comes from outside the clip, plus noise.

    Returns the reference faces ``(B, 3, H, W)``, their keypoints ``(B, 5, 2)`` and the choice ``(B,)`` (bool).
    """
    b = batch.batch_size
    use_cross = (torch.rand(b, generator=gen) < prob).to(batch.ref_face.device)  # (B,)
    sel = use_cross.view(b, 1, 1, 1)
    face = torch.where(sel, batch.ref_face, batch.intra_face)
    if noise_std > 0:
        noise = (torch.randn(face.shape, generator=gen) * noise_std).to(face)
        face = torch.where(sel, (face + noise).clamp(-1, 1), face)
    kps = torch.where(use_cross.view(b, 1, 1), batch.ref_kps, batch.intra_kps)
    return face, kps, use_cross


def cached_features(batch: VideoBatch, use_cross: Tensor) -> IdentityFeatures | None:
    """Local-encoder features from the preprocessing cache, intra or cross-face reference per sample.

    The cached cross-face features were computed without the training-time noise on the reference.
    """
    c = batch.cached
    vec = sorted(k.split("/", 1)[1] for k in c if k.startswith("id_vec/"))
    tok = sorted(k.split("/", 1)[1] for k in c if k.startswith("id_tok/"))
    if not vec and not tok:
        return None

    def pick(kind: str, name: str) -> Tensor:
        intra, cross = c[f"id_{kind}/{name}"], c.get(f"ref_id_{kind}/{name}", c[f"id_{kind}/{name}"])
        return torch.where(use_cross.view(-1, *([1] * (intra.ndim - 1))), cross, intra)

    return IdentityFeatures(vectors={n: pick("vec", n) for n in vec}, tokens={n: pick("tok", n) for n in tok})


def batch_text(denoiser: IdentityDenoiser, batch: VideoBatch, drop: list[bool]) -> Tensor:
    """Caption tokens ``(B, L, D)``, dropped captions replaced by the empty caption's.

    Cached tokens (from preprocessing) are used only with a frozen text encoder: a trainable one (the
    bag-of-words default) would make them stale after the first step.
    """
    frozen = not any(p.requires_grad for p in denoiser.text_encoder.parameters())
    if "text" in batch.cached and frozen:
        text = batch.cached["text"]
        if any(drop):
            empty = denoiser.encode_text([""]).to(text)  # (1, L, D)
            keep = torch.tensor([not d for d in drop], device=text.device).view(-1, 1, 1)
            text = torch.where(keep, text, empty)
        return text
    return denoiser.encode_text(["" if d else c for d, c in zip(drop, batch.caption)])


def identity_dropout(cond: Conditions, prob: float, gen: torch.Generator) -> Conditions:
    """Both identity routes of a sample zeroed with probability ``prob`` (the draw happens even at 0)."""
    keep = torch.rand(cond.text.shape[0], generator=gen) >= prob  # (B,)
    if prob <= 0:
        return cond
    k = keep.to(cond.text)
    g, tokens = cond.global_latent, cond.identity_tokens
    return Conditions(
        text=cond.text,
        global_latent=None if g is None else g * k.view(-1, 1, 1, 1, 1),
        identity_tokens=None if tokens is None else tokens * k.view(-1, 1, 1),
    )


def latent_mask(face_mask: Tensor, latent_shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Face mask ``(B, F, 1, H, W)`` -> latent grid ``(B, f, 1, h, w)`` (any pixel of a cell counts)."""
    b, f, _, h, w = latent_shape
    m = face_mask.flatten(0, 1).float()  # (B*F, 1, H, W)
    m = F.adaptive_max_pool2d(m, (h, w)).view(b, -1, 1, h, w)
    if m.shape[1] != f:  # temporal compression: a latent frame covers several frames
        m = F.adaptive_max_pool3d(m.transpose(1, 2), (f, h, w)).transpose(1, 2)
    return m


def denoising_loss(
    denoiser: IdentityDenoiser,
    scheduler: CogVideoXDPMScheduler,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    cond: Conditions,
    mask: Tensor | None = None,
) -> Tensor:
    """Per-sample x0-reconstruction loss ``(B,)`` weighted by ``1 / (1 - alpha_bar_t)``."""
    x_t = scheduler.add_noise(x0, noise, t)
    x0_hat = v_to_x0(scheduler, x_t, denoiser(x_t, t, cond), t)
    alphas_cumprod = scheduler.alphas_cumprod.to(x0.device)[t]  # (B,)
    return weighted_x0_loss(x0_hat, x0, alphas_cumprod, mask=mask)


def training_loss(
    denoiser: IdentityDenoiser,
    scheduler: CogVideoXDPMScheduler,
    batch: VideoBatch,
    x0: Tensor,
    settings: LossSettings,
    gen: torch.Generator,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One step's loss (a scalar) and its parts, for clean latents ``x0 (B, f, C, h, w)`` of ``batch``."""
    b, f = x0.shape[:2]
    drop = caption_dropout(b, settings.text_dropout, gen)
    text = batch_text(denoiser, batch, drop)
    face, kps, use_cross = choose_reference(batch, settings.cross_face_prob, settings.cross_face_noise, gen)
    cond = denoiser.conditions(face, kps, text, f, features=cached_features(batch, use_cross))
    cond = identity_dropout(cond, settings.identity_dropout, gen)
    t = sample_timesteps(scheduler, b, gen, x0.device, settings.high_noise_bias)
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    use_mask = torch.rand((), generator=gen).item() < settings.mask_prob
    mask = latent_mask(batch.face_mask, x0.shape) if use_mask else None
    loss = denoising_loss(denoiser, scheduler, x0, noise, t, cond, mask).mean()
    return loss, {"loss": loss.detach(), "mask_loss_on": torch.tensor(float(use_mask))}


def fixed_timestep_loss(
    denoiser: IdentityDenoiser,
    scheduler: CogVideoXDPMScheduler,
    batch: VideoBatch,
    x0: Tensor,
    seed: int,
    fractions: tuple[float, ...] = (0.1, 0.5, 0.9),
) -> Tensor:
    """A deterministic denoising loss at fixed timesteps (comparable across runs and epochs): a scalar."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cond = denoiser.conditions(batch.ref_face, batch.ref_kps, list(batch.caption), x0.shape[1])
    num_t = scheduler.config.num_train_timesteps
    losses = []
    for frac in fractions:
        t = torch.full((x0.shape[0],), int(frac * (num_t - 1)), device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        losses.append(denoising_loss(denoiser, scheduler, x0, noise, t, cond).mean())
    return torch.stack(losses).mean()
