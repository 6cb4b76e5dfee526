"""Sampling a video from the denoiser: conditions once, the explicit solver loop of
:func:`consisid_lab.models.diffusion.sample`, then the codec's decoder.

Used by validation / test sampling (``IdentityVideoModule.generate``) and by the generate task for our training
checkpoints; the published-model path (:func:`consisid_lab.generate.sample_published`) builds its conditions as
the released pipeline does and calls the same denoiser.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from consisid_lab.models.denoiser import Conditions, IdentityDenoiser
from consisid_lab.models.diffusion import sample
from consisid_lab.models.knobs import IdentityKV, SamplingKnobs, StepCache, repeat_batch
from consisid_lab.models.knobs import applied as knobs_applied

if TYPE_CHECKING:
    from diffusers import CogVideoXDPMScheduler

GUIDANCE_DROPS = ("text", "identity")  # what guidance's unconditional branch may leave out


def check_guidance_drops(value: str | Sequence[str]) -> tuple[str, ...]:
    """``guidance_drops`` (one name or a list of them) as a tuple; a ValueError naming the valid set otherwise."""
    drops = (value,) if isinstance(value, str) else tuple(str(v) for v in value)
    if not drops or set(drops) - set(GUIDANCE_DROPS):
        raise ValueError(
            f"guidance_drops={list(drops)}: name what the unconditional branch drops, a non-empty subset of "
            "[text, identity], e.g. guidance_drops=[text,identity]"
        )
    return drops


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
    guidance_drops: Sequence[str] = ("text",),
) -> Tensor:
    """Videos ``(B, F, 3, H, W)`` in [-1, 1] for reference faces ``(B, 3, H, W)`` (keypoints ``(B, 5, 2)``) and
    captions; ``negative`` are the unconditional captions of classifier-free guidance.

    Guidance runs for ``guidance_scale != 1`` (a pure function of the scale), or with ``released_cfg_rule`` only
    for ``guidance_scale > 1`` (the released pipelines: a scale <= 1 means no unconditional pass at all).
    ``guidance_drops``: what the unconditional branch leaves out: ``text`` (the ``negative`` captions: ConsisID's
    guidance, the identity kept in both branches), ``identity`` (both identity routes zeroed, as
    ``model.loss.identity_dropout`` trains them: guidance on the identity), or both.
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
    drops = check_guidance_drops(guidance_drops)
    g, tokens = denoiser.identity(face.to(device), kps.to(device), f)
    text = denoiser.encode_text(list(captions)).float()
    do_cfg = guidance_scale > 1.0 if released_cfg_rule else guidance_scale != 1.0
    if do_cfg and "identity" in drops and g is None and tokens is None:
        raise ValueError(
            "guidance_drops includes 'identity', but this composition has no identity route (no global encoder, "
            "no injector): drop 'text' instead, or set guidance_scale=1"
        )
    cache = StepCache(knobs.step_cache) if knobs.step_cache is not None else None
    calls = [0]

    def kv_of(t: Tensor | None) -> IdentityKV | Tensor | None:
        return IdentityKV(t) if t is not None and knobs.identity_kv_cache else t

    # Model inputs of each branch; the batched [cond; uncond] call gets their concatenation. The sampler hands
    # back these very dicts, so ``is`` tells the branches apart: each keeps its own step cache and identity K/V.
    cond_in = {"text": text, "global": g}
    cond_kv = uncond_kv = both_kv = kv_of(tokens)
    uncond_in = None
    if do_cfg:
        drop_id = "identity" in drops
        uncond_in = {
            "text": denoiser.encode_text(list(negative)).float() if "text" in drops else text,
            "global": torch.zeros_like(g) if drop_id and g is not None else g,
        }
        if drop_id and tokens is not None:
            zeros = torch.zeros_like(tokens)
            uncond_kv, both_kv = kv_of(zeros), kv_of(torch.cat([tokens, zeros]))

    def model_fn(x_t: Tensor, t: Tensor, inputs: dict[str, Tensor]) -> Tensor:
        n = x_t.shape[0]  # B, or 2B when the CFG halves are batched
        if inputs is cond_in:
            branch, id_tokens = "cond", cond_kv
        elif inputs is uncond_in:
            branch, id_tokens = "uncond", uncond_kv
        else:
            branch, id_tokens = "both", both_kv
        calls[0] += 1
        glob = inputs["global"]
        return denoiser(
            x_t,
            t,
            Conditions(
                text=inputs["text"],
                global_latent=None if glob is None else repeat_batch(glob, n),
                identity_tokens=repeat_batch(id_tokens, n) if isinstance(id_tokens, Tensor) else id_tokens,
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
            cond=cond_in,
            uncond=uncond_in,
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
            identity_kv_computed=sum(
                kv.computed for kv in {id(kv): kv for kv in (cond_kv, uncond_kv, both_kv)}.values()
            )
            if isinstance(cond_kv, IdentityKV)
            else None,
        )
    return codec.decode(x0.to(text.dtype)).float().clamp(-1, 1)
