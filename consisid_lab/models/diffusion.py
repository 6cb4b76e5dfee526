"""The diffusion objective and sampler on diffusers' ``CogVideoXDPMScheduler`` (v-prediction, zero terminal SNR).

The model is a plain callable ``model_fn(x_t (B, f, C, h, w), t (B,), cond: dict) -> v (B, f, C, h, w)``; the
loss and the sampling loop are written out here and know nothing about the network.

Loss. With ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` and ``v = sqrt(a) eps - sqrt(1 - a) x0`` (``a = alpha_bar_t``),
the x0 implied by a predicted v is ``x0_pred = sqrt(a) x_t - sqrt(1 - a) v_pred``, hence
``x0_pred - x0 = -sqrt(1 - a) (v_pred - v)`` and

    ||x0_pred - x0||^2 / (1 - a) = ||v_pred - v||^2   (exactly, for every t).

So the paper's x0 reconstruction weighted by ``1 / (1 - alpha_bar_t)`` *is* the v-prediction MSE (the CogVideoX
training recipe); :func:`weighted_x0_loss` computes that form, which is also what a face mask restricts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import CogVideoXDPMScheduler

ModelFn = Callable[[Tensor, Tensor, Mapping[str, Any]], Tensor]

# The CogVideoX / ConsisID scheduler config; snr_shift_scale is 1.0 for CogVideoX-5B (and ConsisID), 3.0 for 2B.
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "snr_shift_scale": 1.0,
}


def make_scheduler(**overrides: Any) -> CogVideoXDPMScheduler:
    """A ``CogVideoXDPMScheduler`` with the CogVideoX settings above, any of them overridable from the config."""
    from diffusers import CogVideoXDPMScheduler  # imported here: diffusers costs seconds to import

    unknown = set(overrides) - set(SCHEDULER_DEFAULTS) - {"trained_betas", "clip_sample_range", "sample_max_value"}
    if unknown:
        raise ValueError(f"unknown scheduler settings {sorted(unknown)}; known: {sorted(SCHEDULER_DEFAULTS)}")
    cfg = {**SCHEDULER_DEFAULTS, **overrides}
    if cfg["prediction_type"] != "v_prediction":
        raise ValueError(
            f"prediction_type={cfg['prediction_type']!r}: the objective and sampler here are written for "
            "'v_prediction' (CogVideoX / ConsisID)"
        )
    return CogVideoXDPMScheduler(**cfg)


def alphas_cumprod_at(scheduler: CogVideoXDPMScheduler, timesteps: Tensor) -> Tensor:
    """``alpha_bar_t`` per sample, float32 on the timesteps' device: ``(B,)``."""
    return scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]


def _per_sample(a: Tensor, ndim: int) -> Tensor:
    return a.reshape(-1, *([1] * (ndim - 1)))


def add_noise(scheduler: CogVideoXDPMScheduler, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """``x_t = sqrt(a) x0 + sqrt(1 - a) noise`` (computed in float32, returned in x0's dtype)."""
    a = _per_sample(alphas_cumprod_at(scheduler, timesteps), x0.ndim)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def v_target(scheduler: CogVideoXDPMScheduler, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """``v = sqrt(a) noise - sqrt(1 - a) x0``, the regression target of v-prediction."""
    a = _per_sample(alphas_cumprod_at(scheduler, timesteps), x0.ndim)
    return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)


def v_to_x0(scheduler: CogVideoXDPMScheduler, x_t: Tensor, v: Tensor, timesteps: Tensor) -> Tensor:
    """The x0 implied by a v prediction: ``sqrt(a) x_t - sqrt(1 - a) v`` (float32)."""
    a = _per_sample(alphas_cumprod_at(scheduler, timesteps), x_t.ndim)
    return a.sqrt() * x_t.float() - (1 - a).sqrt() * v.float()


def weighted_x0_loss(
    x0_pred: Tensor,
    x0: Tensor,
    alphas_cumprod_t: Tensor,
    mask: Tensor | None = None,
    weight_cap: float | None = None,
) -> Tensor:
    """Per-sample ``mean(||x0_pred - x0||^2) / (1 - alpha_bar_t)``: ``(B,)``, float32.

    ``weight_cap``: the weight ``1 / (1 - alpha_bar_t) = SNR_t + 1`` is capped at ``weight_cap`` (Min-SNR-gamma
    weighting with gamma = weight_cap - 1, Hang et al. 2023, in its v-prediction form): the nearly clean
    timesteps, which carry most of the exact v-loss, stop dominating the gradient. ``None``: the exact v-loss.

    x0_pred, x0: ``(B, f, C, h, w)``; alphas_cumprod_t: ``(B,)``; mask: ``(B, f, 1, h, w)`` in {0, 1} (or soft),
    broadcast over channels. With a mask the squared error is averaged over the masked elements only; a sample
    whose mask is empty (no face in the clip) falls back to the unmasked mean instead of contributing 0 / 0.
    The weight is finite for every training timestep since ``alpha_bar_0 < 1``.
    """
    if x0_pred.shape != x0.shape:
        raise ValueError(f"x0_pred {tuple(x0_pred.shape)} and x0 {tuple(x0.shape)} must have the same shape")
    err = (x0_pred.float() - x0.float()).square()  # (B, f, C, h, w)
    full = err.flatten(1).mean(1)  # (B,)
    if mask is None:
        per_sample = full
    else:
        if mask.ndim != err.ndim or mask.shape[0] != err.shape[0]:
            raise ValueError(f"mask must be (B, f, 1, h, w) matching x0 {tuple(x0.shape)}, got {tuple(mask.shape)}")
        m = mask.float().expand_as(err)
        count = m.flatten(1).sum(1)  # (B,)
        masked = (err * m).flatten(1).sum(1) / count.clamp_min(1e-8)
        per_sample = torch.where(count > 0, masked, full)
    weight = 1.0 / (1 - alphas_cumprod_t.float())
    if weight_cap is not None:
        if weight_cap < 1:
            raise ValueError(f"weight_cap={weight_cap} must be >= 1 (the weight at pure noise), or null for none")
        weight = weight.clamp(max=float(weight_cap))
    return per_sample * weight


@dataclass
class DiffusionLoss:
    """One training step's objective. ``loss`` is per sample ``(B,)``; the caller reduces and logs."""

    loss: Tensor  # (B,)
    x0_pred: Tensor  # (B, f, C, h, w)
    v_pred: Tensor  # (B, f, C, h, w)
    timesteps: Tensor  # (B,)


def diffusion_loss(
    model_fn: ModelFn,
    x0: Tensor,
    cond: Mapping[str, Any],
    scheduler: CogVideoXDPMScheduler,
    timesteps: Tensor,
    noise: Tensor,
    mask: Tensor | None = None,
) -> DiffusionLoss:
    """Noise ``x0`` to ``timesteps``, predict v, and score the implied x0 with :func:`weighted_x0_loss`."""
    x_t = add_noise(scheduler, x0, noise, timesteps)
    v_pred = model_fn(x_t, timesteps, cond)
    x0_pred = v_to_x0(scheduler, x_t, v_pred, timesteps)
    loss = weighted_x0_loss(x0_pred, x0, alphas_cumprod_at(scheduler, timesteps), mask)
    return DiffusionLoss(loss=loss, x0_pred=x0_pred, v_pred=v_pred, timesteps=timesteps)


def sample_timesteps(
    scheduler: CogVideoXDPMScheduler,
    batch_size: int,
    generator: torch.Generator | None = None,
    device=None,
    high_noise_bias: float = 1.0,
) -> Tensor:
    """Training timesteps ``(B,)`` in ``[0, num_train_timesteps)``: uniform, or with ``high_noise_bias = p > 1``
    drawn as ``floor(N u^(1/p))`` (density rising as ``t^(p-1)``), which spends more steps where the global
    structure of a sample is decided."""
    if high_noise_bias <= 0:
        raise ValueError(f"high_noise_bias must be > 0 (1 = uniform), got {high_noise_bias}")
    n = scheduler.config.num_train_timesteps
    gen_device = generator.device if generator is not None else None
    if high_noise_bias == 1.0:
        t = torch.randint(0, n, (batch_size,), generator=generator, device=gen_device)
    else:
        u = torch.rand(batch_size, generator=generator, device=gen_device)
        t = (n * u.pow(1.0 / high_noise_bias)).long().clamp_(0, n - 1)
    return t.to(device) if device is not None else t


def dynamic_guidance_scale(guidance_scale: float, timestep: int, num_steps: int) -> float:
    """CogVideoX's dynamic CFG: ``1 + g (1 - cos(pi ((N - t) / N) ** 5)) / 2``.

    Same formula as the CogVideoX / ConsisID pipelines, including their use of the *training* timestep value ``t``
    (not the step index) next to the number of inference steps ``N``, so sampled videos match theirs.
    """
    return 1 + guidance_scale * (1 - math.cos(math.pi * ((num_steps - timestep) / num_steps) ** 5.0)) / 2


def _concat_cond(cond: Any, uncond: Any, key: str = "cond") -> Any:
    """Concatenate a conditional and an unconditional input along the batch, for one batched CFG call."""
    if isinstance(cond, Tensor) and isinstance(uncond, Tensor):
        return torch.cat([cond, uncond], dim=0)
    if cond is None and uncond is None:
        return None
    if isinstance(cond, Mapping) and isinstance(uncond, Mapping):
        if set(cond) != set(uncond):
            raise ValueError(f"{key}: cond keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
        return {k: _concat_cond(cond[k], uncond[k], f"{key}.{k}") for k in cond}
    if isinstance(cond, list) and isinstance(uncond, list):
        return cond + uncond
    if is_dataclass(cond) and type(cond) is type(uncond):
        return type(cond)(
            **{f.name: _concat_cond(getattr(cond, f.name), getattr(uncond, f.name), key) for f in fields(cond)}
        )
    if isinstance(cond, (int, float, str, bool)) and cond == uncond:
        return cond
    raise TypeError(
        f"{key}: cannot batch {type(cond).__name__} with {type(uncond).__name__} for CFG; "
        "pass cfg_batching=False to call the model twice"
    )


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    scheduler: CogVideoXDPMScheduler,
    num_steps: int,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    use_dynamic_cfg: bool = False,
    generator: torch.Generator | None = None,
    latents: Tensor | None = None,
    cfg_batching: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    on_step: Callable[[], None] | None = None,
) -> Tensor:
    """Denoise Gaussian noise of ``shape`` ``(B, f, C, h, w)`` to x0 latents with the DPM-Solver++ (2M) steps of
    ``CogVideoXDPMScheduler``, with optional classifier-free guidance.

    Args:
        model_fn: ``(x_t, t (B,), cond) -> v``.
        shape: latent shape; ignored when ``latents`` (the initial noise) is given.
        scheduler: reconfigured in place by ``set_timesteps(num_steps)`` (training only reads its alphas).
        cond / uncond: model inputs; with ``uncond`` the guided prediction is ``u + g (c - u)``, even for g = 1,
            so that guidance is a pure function of the scale; without it, ``guidance_scale`` must be 1.
        use_dynamic_cfg: ramp the scale over steps (:func:`dynamic_guidance_scale`).
        generator: seeds the initial noise and the solver's per-step noise (the scheduler step is stochastic).
        cfg_batching: one model call on the concatenated [cond; uncond] batch instead of two calls.
        device: where the initial noise goes (it is drawn on the generator's device, so seeds give the same noise
            on CPU and GPU).
        dtype: dtype of the model's input ``x_t`` (e.g. bfloat16); the solver state stays float32.
        on_step: called after each denoising step (progress reports), whatever the number of model calls in it.

    Returns:
        x0 latents ``(B, f, C, h, w)``, float32.
    """
    if uncond is None and (guidance_scale != 1.0 or use_dynamic_cfg):
        raise ValueError(
            f"guidance_scale={guidance_scale}, use_dynamic_cfg={use_dynamic_cfg} need an unconditional input; "
            "pass uncond=... or guidance_scale=1.0, use_dynamic_cfg=False"
        )
    if latents is None:
        gen_device = generator.device if generator is not None else device
        x = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        x = x.to(device) if device is not None else x
    else:
        x = latents.float()
    x = x * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_steps, device=x.device)
    timesteps = scheduler.timesteps
    batched = _concat_cond(cond, uncond) if (uncond is not None and cfg_batching) else None

    old_x0 = None  # the solver's previous x0 prediction (2nd-order multistep)
    for i, t in enumerate(timesteps):
        t_batch = t.expand(x.shape[0])  # (B,)
        x_in = x.to(dtype) if dtype is not None else x
        if uncond is None:
            v = model_fn(x_in, t_batch, cond).float()
        else:
            if batched is not None:
                v_both = model_fn(torch.cat([x_in, x_in]), torch.cat([t_batch, t_batch]), batched)
                v_cond, v_uncond = v_both.float().chunk(2)
            else:
                v_cond = model_fn(x_in, t_batch, cond).float()
                v_uncond = model_fn(x_in, t_batch, uncond).float()
            scale = dynamic_guidance_scale(guidance_scale, int(t), num_steps) if use_dynamic_cfg else guidance_scale
            v = v_uncond + scale * (v_cond - v_uncond)
        # Python ints, not device tensors: the scheduler indexes its CPU alphas with them.
        x, old_x0 = scheduler.step(
            v,
            old_x0,
            int(t),
            int(timesteps[i - 1]) if i > 0 else None,
            x,
            generator=generator,
            return_dict=False,
        )
        if on_step is not None:
            on_step()
    return x
