"""The training objective as plain functions around the denoiser.

One training step (every random draw from one generator seeded by (seed, global step), in this order, so that a
resumed run repeats it exactly):

1. caption dropout (classifier-free guidance): ``B`` uniforms;
2. dynamic cross-face reference (probability beta, plus Gaussian noise): ``B`` uniforms, then the noise;
   2b. (``image_noise`` only) the released image noise: ``B`` normals (log sigma), then the noise on the face
   image and, with keypoints, on the keypoint image;
3. identity dropout (both identity routes of a sample at once): ``B`` uniforms;
   3b. (``image_dropout > 0`` only) image-latent dropout: ``B`` uniforms;
4. timesteps; 5. the noise; 6. dynamic mask loss (probability alpha, for the whole batch): one uniform.

The draws marked "only" happen only when their augmentation is on, so the default run draws exactly what it drew
before they existed (same loss for the same seed). Posterior sampling of the VAE latents (``sample_posterior``)
draws from a generator of its own (:func:`posterior_generator`), so it leaves the sequence above unchanged too.

The loss is the x0 reconstruction weighted by ``1 / (1 - alpha_bar_t)`` (the v-loss, exactly; see
:mod:`consisid_lab.models.diffusion`), on the face mask when the mask loss is on; the masked loss is normalised
per sample (``per_sample``, the default) or over the whole batch as the released code does (``batch``:
``sum(w_i * err * mask) / sum(mask)``).

The released recipe's augmentations (``+experiment=consisid_release_recipe``; all off by default):
``image_noise`` (sigma = exp(N(image_noise_log_mean, image_noise_log_std)) per sample, added to the face and
keypoint images before the codec encodes them for the global route; the local encoder sees the clean face),
``image_dropout`` (the global route's image latent alone zeroed per sample), ``sample_posterior`` (the video and
image latents drawn from the VAE posterior instead of its mean).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from consisid_lab.models.denoiser import Conditions, IdentityDenoiser
from consisid_lab.models.diffusion import sample_timesteps, v_to_x0, weighted_x0_loss
from consisid_lab.types import IdentityFeatures, VideoBatch

if TYPE_CHECKING:
    from diffusers import CogVideoXDPMScheduler

    from consisid_lab.models.frozen_memo import FrozenFeatureMemo

log = logging.getLogger(__name__)

MASK_NORMALISATIONS = ("per_sample", "batch")


@dataclass(frozen=True)
class LossSettings:
    """``model.loss`` of the config (defaults: the paper's alpha = beta = 0.5)."""

    mask_prob: float = 0.5  # alpha: probability of the dynamic mask loss
    # Weight of the background in a masked step (0: the paper's face-only loss; 1: no mask at all).
    mask_background_weight: float = 0.0
    cross_face_prob: float = 0.5  # beta: probability of a reference from outside the clip
    cross_face_noise: float = 0.05  # std of the Gaussian noise on a cross-face reference, in [-1, 1] units
    text_dropout: float = 0.1
    identity_dropout: float = 0.0
    high_noise_bias: float = 1.0
    weight_cap: float | None = None  # cap of the v-loss weight 1 / (1 - alpha_bar_t) (Min-SNR); None: exact v-loss
    seed: int = 0
    # The released recipe's augmentations (off by default: the default run is unchanged).
    image_noise: bool = False  # noise on the face / keypoint images before the codec (global route)
    image_noise_log_mean: float = -3.0  # log sigma ~ N(mean, std): sigma = exp(N(-3, 0.5)) as released
    image_noise_log_std: float = 0.5
    image_dropout: float = 0.0  # probability that a sample's image latent (the global route) is zeroed
    sample_posterior: bool = False  # video and image latents drawn from the VAE posterior, not its mean
    mask_normalisation: str = "per_sample"  # per_sample | batch (released: sum(loss * mask) / sum(mask))

    def __post_init__(self) -> None:
        if self.mask_normalisation not in MASK_NORMALISATIONS:
            raise ValueError(
                f"model.loss.mask_normalisation={self.mask_normalisation!r} is not one of "
                f"{list(MASK_NORMALISATIONS)}; "
                "use per_sample (each sample's masked mean, the default) or batch (sum over the batch / mask sum, "
                "as released)"
            )
        if not 0.0 <= self.mask_background_weight <= 1.0:
            raise ValueError(
                f"model.loss.mask_background_weight={self.mask_background_weight} must be in [0, 1] (0: the "
                "paper's face-only mask loss, 1: the background weighs as much as the face)"
            )
        probs = ("mask_prob", "cross_face_prob", "text_dropout", "identity_dropout", "image_dropout")
        for name in probs:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"model.loss.{name}={value} must be a probability in [0, 1]")
        if self.image_noise_log_std < 0:
            raise ValueError(f"model.loss.image_noise_log_std={self.image_noise_log_std} must be >= 0")

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> LossSettings:
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown model.loss settings {unknown}; known: {sorted(known)}")
        values = {}
        for k, v in raw.items():
            if k == "weight_cap":  # optional: null or a number >= 1
                if v is not None and (isinstance(v, bool) or float(v) < 1):
                    raise ValueError(f"model.loss.weight_cap={v!r} must be null (exact v-loss) or a number >= 1")
                values[k] = None if v is None else float(v)
                continue
            kind = type(getattr(cls, k))
            if kind is bool and not isinstance(v, bool):
                raise ValueError(f"model.loss.{k}={v!r} must be true or false")
            values[k] = kind(v)
        return cls(**values)


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


def image_noise_sigma(batch_size: int, log_mean: float, log_std: float, gen: torch.Generator) -> Tensor:
    """The released image-noise level per sample: ``sigma = exp(N(log_mean, log_std))``, ``(B,)``."""
    return torch.exp(log_mean + log_std * torch.randn(batch_size, generator=gen))


def image_noiser(sigma: Tensor, gen: torch.Generator) -> Callable[[Tensor], Tensor]:
    """A function adding ``sigma[i] * N(0, 1)`` to each image ``(B, 3, H, W)`` (no clamping, as released).

    Called for the face image, then (with keypoints) the keypoint image: each call draws its own noise.
    """

    def add(image: Tensor) -> Tensor:
        noise = torch.randn(image.shape, generator=gen).to(image)
        return image + noise * sigma.to(image).view(-1, *([1] * (image.ndim - 1)))

    return add


def image_dropout(cond: Conditions, prob: float, gen: torch.Generator) -> Conditions:
    """The global route's image latent alone zeroed per sample with probability ``prob`` (drawn only if > 0)."""
    if prob <= 0 or cond.global_latent is None:
        return cond
    keep = (torch.rand(cond.text.shape[0], generator=gen) >= prob).to(cond.global_latent)  # (B,)
    return replace(cond, global_latent=cond.global_latent * keep.view(-1, 1, 1, 1, 1))


def posterior_generator(seed: int, step: int) -> torch.Generator:
    """The generator of the posterior draws of one step: apart from :func:`step_generator`'s sequence."""
    return torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + int(step) + 7_919_000_000)


_warned_no_posterior: set[str] = set()


@contextlib.contextmanager
def posterior_sampling(codec: Any, settings: LossSettings, seed: int, step: int) -> Iterator[bool]:
    """Inside, the codec draws its latents from its posterior (``settings.sample_posterior``); yields whether it does.

    A codec without a posterior (the stand-in and pixel codecs are deterministic) encodes as always, and says so
    in the log once per codec class.
    """
    if not settings.sample_posterior:
        yield False
        return
    if not getattr(codec, "has_posterior", False):
        name = type(codec).__name__
        if name not in _warned_no_posterior:
            _warned_no_posterior.add(name)
            log.warning(
                "model.loss.sample_posterior=true, but model/vae (%s) has no posterior (a deterministic encoder): its "
                "latents are used as they are. Only a real VAE samples (model/vae=cogvideox)",
                name,
            )
        yield False
        return
    with codec.posterior_sampling(posterior_generator(seed, step)):
        yield True


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
    mask_normalisation: str = "per_sample",
    weight_cap: float | None = None,
) -> Tensor:
    """Per-sample x0-reconstruction loss ``(B,)`` weighted by ``1 / (1 - alpha_bar_t)`` (capped at ``weight_cap``).

    With a mask and ``mask_normalisation='batch'`` the returned terms are normalised by the whole batch's mask
    sum, so their sum (not mean) is the loss; :func:`reduce_loss` reduces either kind.
    """
    x_t = scheduler.add_noise(x0, noise, t)
    x0_hat = v_to_x0(scheduler, x_t, denoiser(x_t, t, cond), t)
    alphas_cumprod = scheduler.alphas_cumprod.to(x0.device)[t]  # (B,)
    if mask is not None and mask_normalisation == "batch":
        return batch_masked_loss(x0_hat, x0, alphas_cumprod, mask, weight_cap)
    return weighted_x0_loss(x0_hat, x0, alphas_cumprod, mask=mask, weight_cap=weight_cap)


def batch_masked_loss(
    x0_pred: Tensor, x0: Tensor, alphas_cumprod_t: Tensor, mask: Tensor, weight_cap: float | None = None
) -> Tensor:
    """The released normalisation: ``sum_i w_i sum(err_i * m_i) / sum_i sum(m_i)`` split into its ``B`` terms.

    ``w_i = 1 / (1 - alpha_bar_t_i)``; the mask ``(B, f, 1, h, w)`` is broadcast over channels, so the denominator
    counts masked elements of every channel. Samples with a large face weigh more than with the per-sample
    normalisation. A batch whose masks are all empty falls back to the unmasked per-sample loss (``B`` terms whose
    mean is the loss, divided by ``B`` here so that the terms still sum to it).
    """
    err = (x0_pred.float() - x0.float()).square()  # (B, f, C, h, w)
    w = 1.0 / (1.0 - alphas_cumprod_t.float())  # (B,)
    if weight_cap is not None:
        w = w.clamp(max=float(weight_cap))
    m = mask.float().expand_as(err)
    total = m.sum()
    if total <= 0:
        return weighted_x0_loss(x0_pred, x0, alphas_cumprod_t, weight_cap=weight_cap) / err.shape[0]
    return w * (err * m).flatten(1).sum(1) / total


def reduce_loss(per_sample: Tensor, masked: bool, mask_normalisation: str) -> Tensor:
    """The scalar loss from :func:`denoising_loss`'s terms: their mean, or their sum for the batch normalisation."""
    return per_sample.sum() if masked and mask_normalisation == "batch" else per_sample.mean()


def training_loss(
    denoiser: IdentityDenoiser,
    scheduler: CogVideoXDPMScheduler,
    batch: VideoBatch,
    x0: Tensor,
    settings: LossSettings,
    gen: torch.Generator,
    memo: FrozenFeatureMemo | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One step's loss (a scalar) and its parts, for clean latents ``x0 (B, f, C, h, w)`` of ``batch``.

    ``memo``: the frozen encoders' outputs of the training clips (:mod:`consisid_lab.models.frozen_memo`), passed
    only for a batch it covers (:meth:`~consisid_lab.models.frozen_memo.FrozenFeatureMemo.covers`) and that carries
    no preprocessing cache; used for the intra references. The draws are the same with and without it."""
    b, f = x0.shape[:2]
    drop = caption_dropout(b, settings.text_dropout, gen)
    text = batch_text(denoiser, batch, drop)
    face, kps, use_cross = choose_reference(batch, settings.cross_face_prob, settings.cross_face_noise, gen)
    perturb = None
    if settings.image_noise:
        sigma = image_noise_sigma(b, settings.image_noise_log_mean, settings.image_noise_log_std, gen)
        perturb = image_noiser(sigma, gen)
    if memo is not None and perturb is None:
        g, feats = memo.identity(denoiser, batch, face, kps, use_cross, f)
        cond = Conditions(text=text, global_latent=g, identity_tokens=denoiser.identity_tokens(feats))
    else:
        features = cached_features(batch, use_cross)
        cond = denoiser.conditions(face, kps, text, f, features=features, perturb_image=perturb)
    cond = identity_dropout(cond, settings.identity_dropout, gen)
    cond = image_dropout(cond, settings.image_dropout, gen)
    t = sample_timesteps(scheduler, b, gen, x0.device, settings.high_noise_bias)
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    use_mask = torch.rand((), generator=gen).item() < settings.mask_prob
    mask = latent_mask(batch.face_mask, x0.shape) if use_mask else None
    if mask is not None and settings.mask_background_weight > 0:
        mask = mask + settings.mask_background_weight * (1 - mask)
    terms = denoising_loss(
        denoiser, scheduler, x0, noise, t, cond, mask, settings.mask_normalisation, settings.weight_cap
    )
    loss = reduce_loss(terms, use_mask, settings.mask_normalisation)
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
