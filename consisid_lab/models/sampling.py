"""Sampling a video from the denoiser: conditions once, the explicit solver loop of
:func:`consisid_lab.models.diffusion.sample`, then the codec's decoder.

Used by validation / test sampling (``IdentityVideoModule.generate``) and by the generate task for our training
checkpoints; the published-model path (:func:`consisid_lab.generate.sample_published`) builds its conditions as
the released pipeline does and calls the same denoiser.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from consisid_lab.models.denoiser import Conditions, IdentityDenoiser
from consisid_lab.models.diffusion import sample
from consisid_lab.models.knobs import IdentityKV, SamplingKnobs, StepCache, repeat_batch
from consisid_lab.models.knobs import applied as knobs_applied

if TYPE_CHECKING:
    from diffusers import CogVideoXDPMScheduler


@torch.no_grad()
def sample_video(
    denoiser: IdentityDenoiser,
    scheduler: CogVideoXDPMScheduler,
    face: Tensor,
    kps: Tensor,
    captions: list[str],
    negative: list[str],
    num_frames: int,
    height: int,
    width: int,
    num_steps: int,
    guidance_scale: float,
    use_dynamic_cfg: bool,
    generator: torch.Generator,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    released_cfg_rule: bool = False,
    on_step: Callable[[], None] | None = None,
    knobs: SamplingKnobs | Mapping[str, Any] | None = None,
    stats: dict[str, Any] | None = None,
) -> Tensor:
    """Videos ``(B, F, 3, H, W)`` in [-1, 1] for reference faces ``(B, 3, H, W)`` (keypoints ``(B, 5, 2)``) and
    captions; ``negative`` are the unconditional captions of classifier-free guidance.

    Guidance runs for ``guidance_scale != 1`` (a pure function of the scale), or with ``released_cfg_rule`` only
    for ``guidance_scale > 1`` (the released pipelines: a scale <= 1 means no unconditional pass at all).
    ``dtype``: autocast dtype for the network (our checkpoints hold float32 weights; the solver stays float32).
    ``knobs``: the speed knobs (:class:`~consisid_lab.models.knobs.SamplingKnobs`, or its config mapping), checked
    against the device before anything runs and undone afterwards. ``stats``: filled with what the knobs did
    (model calls, steps served from the step cache, identity K/V computations).
    """
    knobs = SamplingKnobs.from_config(knobs)
    knobs.check(device)
    device = torch.device(device)
    codec = denoiser.vae
    b = len(captions)
    f, c, h, w = codec.latent_shape(num_frames, height, width)
    g, tokens = denoiser.identity(face.to(device), kps.to(device), f)
    text = denoiser.encode_text(list(captions)).float()
    do_cfg = guidance_scale > 1.0 if released_cfg_rule else guidance_scale != 1.0
    uncond = denoiser.encode_text(list(negative)).float() if do_cfg else None
    cond = Conditions(text=text, global_latent=g, identity_tokens=tokens)
    id_kv = IdentityKV(tokens) if tokens is not None and knobs.identity_kv_cache else None
    cache = StepCache(knobs.step_cache) if knobs.step_cache is not None else None
    calls = [0]

    def model_fn(x_t: Tensor, t: Tensor, inputs: dict[str, Tensor]) -> Tensor:
        n = x_t.shape[0]  # B, or 2B when the CFG halves are batched
        branch = "both" if n != b else ("uncond" if inputs["text"] is uncond else "cond")
        calls[0] += 1
        return denoiser(
            x_t,
            t,
            Conditions(
                text=inputs["text"],
                global_latent=None if g is None else repeat_batch(g, n),
                identity_tokens=id_kv if id_kv is not None else (None if tokens is None else repeat_batch(tokens, n)),
            ),
            step_cache=cache.branch(branch) if cache is not None else None,
        )

    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and dtype != torch.float32)
    with autocast, knobs_applied(knobs, denoiser, device):
        x0 = sample(
            model_fn,
            shape=(b, f, c, h, w),
            scheduler=scheduler,
            num_steps=num_steps,
            cond={"text": cond.text},
            uncond={"text": uncond} if uncond is not None else None,
            guidance_scale=guidance_scale if do_cfg else 1.0,
            use_dynamic_cfg=use_dynamic_cfg and do_cfg,
            generator=generator,
            device=device,
            dtype=None if dtype is not None else text.dtype,
            on_step=on_step,
            cfg_batching=knobs.cfg_batching,
        )  # (B, f, C, h, w)
    if stats is not None:
        stats.update(
            model_calls=calls[0],
            step_cache_hits=cache.hits if cache is not None else 0,
            identity_kv_computed=id_kv.computed if id_kv is not None else None,
        )
    return codec.decode(x0.to(text.dtype)).float().clamp(-1, 1)
