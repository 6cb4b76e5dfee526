"""Generation task: ``python -m consisid_lab.generate model_path=DIR|ckpt_path=RUN_DIR face=PHOTO 'prompt="..."'``.

face photo + prompt -> identity features -> explicit sampling loop with classifier-free guidance -> VAE decode ->
``video.mp4`` and ``contact_sheet.png`` in the Hydra output dir.

Two sources of models:
- ``model_path``: a published ConsisID directory (or hub id) loaded into our composition
  (:mod:`consisid_lab.models.published`); identity features from its ArcFace + EVA-CLIP face encoders. The
  sampling path reproduces diffusers' ``ConsisIDPipeline`` step for step (same random draws in the same order:
  image-latent posterior sample, initial noise, the solver's per-step noise), see :func:`sample_published`.
- ``ckpt_path``: one of our training runs (its directory, or a checkpoint file); the model is rebuilt from the
  checkpoint's stored hyper-parameters (its own codec included), the reference face is a photo placed as the run's
  references were, or ``face=benchmark:<i>``, a held-out identity of the synthetic benchmark
  (:mod:`consisid_lab.data.reference_faces`), and it runs through the checkpoint's own identity components.

Video size, frame count, steps and guidance left at ``null`` are the model's own: for a training checkpoint what
its run trained and sampled with, for a published model the released pipeline's (``published`` in
``conf/generate.yaml``). After the first denoising step one log line says what is being generated and how long it
will take on this device; progress follows in the log (and as a bar in the terminal with ``progress=true``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from consisid_lab.models.consisid import consisid_features
from consisid_lab.models.denoiser import Conditions
from consisid_lab.models.diffusion import sample
from consisid_lab.models.sampling import check_guidance_drops

log = logging.getLogger(__name__)

StepCallback = Callable[[], None]


# --------------------------------------------------------------------------------------------------- settings
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU (what the released model runs in), float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    from consisid_lab.models.vae import torch_dtype

    return torch_dtype(name)


@dataclass(frozen=True)
class SamplingSettings:
    """What one generation samples: the video size and the sampler's settings."""

    num_frames: int
    height: int
    width: int
    num_steps: int
    guidance_scale: float
    use_dynamic_cfg: bool
    guidance_drops: tuple[str, ...] = ("text",)  # what the unconditional branch leaves out (text, identity)

    @property
    def size(self) -> dict[str, int]:
        return {"num_frames": self.num_frames, "height": self.height, "width": self.width}

    @property
    def guidance(self) -> dict[str, Any]:
        return {
            "num_steps": self.num_steps,
            "guidance_scale": self.guidance_scale,
            "use_dynamic_cfg": self.use_dynamic_cfg,
        }

    def describe(self) -> str:
        if self.guidance_scale > 1.0:
            on = " and ".join(self.guidance_drops)
            cfg = f"guidance {self.guidance_scale:g} on {on}{' (dynamic)' if self.use_dynamic_cfg else ''}"
        else:
            cfg = "no guidance"
        return f"{self.num_frames} frames of {self.height} x {self.width}, {self.num_steps} steps, {cfg}"


SETTINGS = tuple(f.name for f in fields(SamplingSettings))


def sampling_settings(cfg: Mapping[str, Any], defaults: Mapping[str, Any], source: str) -> SamplingSettings:
    """Each setting from the command line where it is given (not ``null``), else the model's own ``defaults``."""
    given = {k: cfg.get(k) for k in SETTINGS if cfg.get(k) is not None}
    values = {k: given.get(k, defaults.get(k)) for k in SETTINGS}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(
            f"{source} does not say which {', '.join(missing)} to sample with; pass "
            + " ".join(f"{k}=..." for k in missing)
        )
    settings = SamplingSettings(
        num_frames=int(values["num_frames"]),
        height=int(values["height"]),
        width=int(values["width"]),
        num_steps=int(values["num_steps"]),
        guidance_scale=float(values["guidance_scale"]),
        use_dynamic_cfg=bool(values["use_dynamic_cfg"]),
        guidance_drops=check_guidance_drops(values["guidance_drops"]),
    )
    if settings.num_steps < 1:
        raise ValueError(f"num_steps={settings.num_steps} must be >= 1")
    inherited = [f"{k}={values[k]}" for k in SETTINGS if k not in given]
    log.info(
        "sampling settings from %s: %s; from the command line: %s",
        source,
        " ".join(inherited) or "none",
        " ".join(f"{k}={v}" for k, v in given.items()) or "none",
    )
    return settings


def check_video_size(
    codec: Any, patch_size: int, num_frames: int, height: int, width: int, note: str = "480 x 720 as released"
) -> None:
    """``ValueError`` naming the valid values when the VAE or the DiT's patching cannot take this size
    (``note``: the model's own size, named next to the suggestion)."""
    codec.check_size(num_frames, height, width)  # frames (CogVideoX: 8k+1) and the VAE's spatial factor
    step = codec.spatial_factor * patch_size
    for axis, size in (("height", height), ("width", width)):
        if size % step:
            below = max(step, size // step * step)
            raise ValueError(
                f"{axis}={size} is not a multiple of {step} (VAE factor {codec.spatial_factor} x patch size "
                f"{patch_size}); use a multiple of {step}, e.g. {below} or {below + step} ({note})"
            )


@contextlib.contextmanager
def on_device(module: nn.Module | None, device: torch.device, offload: bool) -> Iterator[None]:
    """Model CPU offload: with ``offload`` the module lives on the CPU and visits ``device`` only while used."""
    if module is None or not offload:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- published model
def prepare_image(image: Any, height: int, width: int, spatial_factor: int) -> Tensor:
    """A PIL image / array / tensor -> ``(B, 3, height, width)`` in [-1, 1], resized as the released pipeline does
    (diffusers' ``VideoProcessor``: Lanczos resize to the video size, no crop)."""
    from diffusers.video_processor import VideoProcessor
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return VideoProcessor(vae_scale_factor=spatial_factor).preprocess(image, height=height, width=width)


def encode_image_latent(codec: Any, image: Tensor, generator: torch.Generator | None) -> Tensor:
    """``(B, 3, H, W)`` -> scaled latent ``(B, 1, C, h, w)``, a *sample* of the VAE posterior drawn with
    ``generator`` (the released pipeline samples here, and this draw comes before the initial noise)."""
    x = image.to(device=codec.vae.device, dtype=codec.dtype)[:, :, None]  # (B, 3, 1, H, W)
    z = codec.vae.encode(x).latent_dist.sample(generator)  # (B, C, 1, h, w)
    return z.permute(0, 2, 1, 3, 4).float() * codec.scaling_factor


def draw_keypoints(image: Any, kps: np.ndarray) -> Any:
    """The released keypoint image (``is_kps`` models): diffusers' own drawing, so the latents match."""
    from diffusers.pipelines.consisid.pipeline_consisid import draw_kps
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    return draw_kps(image, np.asarray(kps))


@torch.no_grad()
def sample_published(
    model: Any,
    image: Any,
    id_cond: Tensor | None,
    id_vit_hidden: Sequence[Tensor] | None,
    prompt_embeds: Tensor,
    negative_prompt_embeds: Tensor | None = None,
    num_frames: int = 49,
    height: int = 480,
    width: int = 720,
    num_steps: int = 50,
    guidance_scale: float = 6.0,
    use_dynamic_cfg: bool = False,
    generator: torch.Generator | None = None,
    latents: Tensor | None = None,
    kps: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
    on_step: StepCallback | None = None,
    decode: bool = True,
    knobs: Any = None,
) -> Tensor:
    """A video ``(B, F, 3, H, W)`` in [-1, 1] from a :class:`~consisid_lab.models.published.PublishedModel`
    (with ``decode=False`` the denoised latents ``(B, f, C, h, w)``).

    Args:
        image: the reference face image (PIL / array / tensor in [-1, 1]) for the global route; resized to the video.
        id_cond / id_vit_hidden: the local route's inputs (``(B, LFE_id_dim)``, ``LFE_num_scale`` maps).
        prompt_embeds / negative_prompt_embeds: ``(B, L, D_text)``; guidance runs when ``guidance_scale > 1``.
        latents: the initial noise ``(B, f, C, h, w)`` (drawn from ``generator`` when ``None``).
        kps: ArcFace-order keypoints in ``image``'s pixels, for ``is_kps`` models.
        on_step: called once per denoising step (progress bars).
        knobs: the speed knobs (:class:`~consisid_lab.models.knobs.SamplingKnobs` or its config); the released
            pipeline batches the CFG halves, so ``cfg_batching`` is on here whatever the knob says.
    """
    from consisid_lab.models.knobs import IdentityKV, SamplingKnobs, StepCache
    from consisid_lab.models.knobs import applied as knobs_applied

    knobs = SamplingKnobs.from_config(knobs)
    knobs.check(device)
    device = torch.device(device)
    codec, denoiser = model.vae, model.denoiser
    check_video_size(codec, denoiser.backbone.patch_size, num_frames, height, width)
    f, c, h, w = codec.latent_shape(num_frames, height, width)
    b = prompt_embeds.shape[0]
    do_cfg = guidance_scale > 1.0  # as the released pipeline: scale <= 1 means no unconditional pass at all
    if do_cfg and negative_prompt_embeds is None:
        raise ValueError(f"guidance_scale={guidance_scale} > 1 needs negative_prompt_embeds (an empty prompt's)")

    # Global route: the face latent at frame 0 (and the keypoint image's at frame 1), zeros elsewhere.
    pixels = prepare_image(image, height, width, codec.spatial_factor)  # (B, 3, H, W)
    with on_device(codec, device, cpu_offload):
        face = encode_image_latent(codec, pixels, generator)  # (B, 1, C, h, w)
        parts = [face]
        if model.is_kps:
            if kps is None:
                raise ValueError("this model was trained with is_kps=true: pass the face keypoints (kps=...)")
            kps_pixels = prepare_image(draw_keypoints(image, kps), height, width, codec.spatial_factor)
            parts.append(encode_image_latent(codec, kps_pixels, generator))
    cond_latent = torch.cat(parts, dim=1)  # (B, 1 or 2, C, h, w)
    pad = cond_latent.new_zeros(b, f - cond_latent.shape[1], c, h, w)
    cond_latent = torch.cat([cond_latent, pad], dim=1).to(device)  # (B, f, C, h, w)

    # Local route: the released preprocessing's features, fused once (the pipeline fuses the same inputs per call).
    features = consisid_features(
        id_cond.to(device=device, dtype=dtype) if id_cond is not None else None,
        [t.to(device=device, dtype=dtype) for t in id_vit_hidden] if id_vit_hidden else None,
    )

    cache = StepCache(knobs.step_cache) if knobs.step_cache is not None else None

    def model_fn(x_t: Tensor, t: Tensor, inputs: dict[str, Tensor]) -> Tensor:
        reps = x_t.shape[0] // b  # 2 when the CFG halves are batched
        # memoised keys and values (per batch size): the same numbers as repeating the tokens
        identity = id_kv if id_kv is not None else (tokens.repeat(reps, 1, 1) if tokens is not None else None)
        cond = Conditions(
            text=inputs["text"],
            global_latent=cond_latent.repeat(reps, 1, 1, 1, 1),  # (rB, f, C, h, w)
            identity_tokens=identity,
        )
        return denoiser(x_t, t, cond, step_cache=cache.branch(str(reps)) if cache is not None else None)

    with (
        on_device(denoiser.backbone, device, cpu_offload),
        on_device(denoiser.fuser, device, cpu_offload),
        knobs_applied(knobs, denoiser, device),
    ):
        tokens = denoiser.identity_tokens(features)  # (B, Q, D_kv) | None
        # the denoiser casts the tokens to x_t's dtype; the memoised path starts from the same cast tokens
        id_kv = IdentityKV(tokens.to(dtype)) if tokens is not None and knobs.identity_kv_cache else None
        x0 = sample(
            model_fn,
            shape=(b, f, c, h, w),
            scheduler=model.scheduler,
            num_steps=num_steps,
            cond={"text": prompt_embeds.to(device)},
            uncond={"text": negative_prompt_embeds.to(device)} if do_cfg else None,
            guidance_scale=guidance_scale if do_cfg else 1.0,
            use_dynamic_cfg=use_dynamic_cfg and do_cfg,
            generator=generator,
            latents=latents,
            cfg_batching=True,
            device=device,
            dtype=dtype,
            on_step=on_step,
        )  # (B, f, C, h, w), float32
    if not decode:
        return x0
    with on_device(codec, device, cpu_offload):
        video = codec.decode(x0.to(codec.dtype))  # (B, F, 3, H, W)
    return video.float().clamp(-1, 1)


def encode_prompts(
    text_encoder: Any, prompt: str, negative_prompt: str, device: torch.device, offload: bool
) -> tuple[Tensor, Tensor]:
    """``(1, L, D)`` embeddings of the prompt and the negative prompt (over-long prompts warn with the count)."""
    with on_device(text_encoder, device, offload):
        embeds = text_encoder([prompt, negative_prompt]).float().cpu()  # (2, L, D)
    return embeds[:1], embeds[1:]


# ------------------------------------------------------------------------------------------ training checkpoints
def checkpoint_defaults(module: Any) -> dict[str, Any]:
    """A training checkpoint's own settings: the video size of its run's data (``run_config.data``) and the
    sampler settings it validated and tested with (``model.sampling``, stored in its hyper-parameters)."""
    data = (module.run_config or {}).get("data") or {}
    sampling = module.sampling_cfg
    return {
        **{k: data[k] for k in ("num_frames", "height", "width") if data.get(k) is not None},
        # the defaults of IdentityVideoModule.generate, which validation and test sample with
        "num_steps": sampling.get("num_steps", 10),
        "guidance_scale": sampling.get("guidance_scale", 1.0),
        "use_dynamic_cfg": sampling.get("use_dynamic_cfg", False),
        "guidance_drops": list(sampling.get("guidance_drops", ["text"])),
    }


@torch.no_grad()
def sample_checkpoint(
    module: Any,
    face: Tensor,
    kps: Tensor,
    prompt: str,
    negative_prompt: str,
    num_frames: int,
    height: int,
    width: int,
    num_steps: int,
    guidance_scale: float,
    use_dynamic_cfg: bool,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    on_step: StepCallback | None = None,
    knobs: Any = None,
    guidance_drops: tuple[str, ...] = ("text",),
) -> Tensor:
    """A video ``(1, F, 3, H, W)`` in [-1, 1] from one of our ``IdentityVideoModule`` checkpoints.

    ``face`` ``(1, 3, H, W)`` in [-1, 1] and ``kps`` ``(1, 5, 2)``: the reference at the video size
    (:func:`consisid_lab.data.reference_faces.reference_face`).
    """
    from consisid_lab.models.sampling import sample_video

    module = module.to(device).eval()
    check_video_size(module.denoiser.vae, module.denoiser.backbone.patch_size, num_frames, height, width)
    return sample_video(
        module.denoiser,
        module.noise_scheduler,
        face=face,
        kps=kps,
        captions=[prompt],
        negative=[negative_prompt],
        num_frames=num_frames,
        height=height,
        width=width,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        use_dynamic_cfg=use_dynamic_cfg,
        generator=generator,
        device=device,
        dtype=dtype,
        released_cfg_rule=True,
        on_step=on_step,
        knobs=knobs,
        guidance_drops=guidance_drops,
    )


# --------------------------------------------------------------------------------------------------- the task
def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class SamplingProgress:
    """Progress of one sampling run, called once per denoising step.

    After the first step one log line says what is being generated (``plan``) and how long all ``total`` steps
    will take on this device, from the timed first step; then a line every fifth of the way or every
    ``REPORT_SECONDS`` (the log file shows progress, not only the terminal). With ``bar`` a Rich progress bar runs
    in the terminal as well.
    """

    REPORTS = 5
    REPORT_SECONDS = 30.0

    def __init__(self, plan: str, total: int, device: torch.device, bar: bool = False) -> None:
        self.plan, self.total, self.device, self.bar = plan, int(total), device, bar
        self.done = 0
        self.every = max(1, -(-self.total // self.REPORTS))
        self.start = self.last_report = time.perf_counter()
        self._advance: StepCallback | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> SamplingProgress:
        if self.bar:
            self._advance = self._stack.enter_context(progress_bar(self.total))
        log.info("denoising on %s: timing the first of %d steps", self.device, self.total)
        self.start = self.last_report = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def __call__(self) -> None:
        self.done += 1
        now = time.perf_counter()
        elapsed = now - self.start
        if self._advance is not None:
            self._advance()
        if self.done == 1:
            log.info(
                "%s: about %s on %s (%s for the first of %d steps), plus decoding",
                self.plan, format_seconds(elapsed * self.total), self.device, format_seconds(elapsed), self.total,
            )  # fmt: skip
        elif self.done == self.total or self.done % self.every == 0 or now - self.last_report >= self.REPORT_SECONDS:
            left = elapsed / self.done * (self.total - self.done)
            log.info(
                "step %d/%d, %s elapsed, about %s left",
                self.done, self.total, format_seconds(elapsed), format_seconds(left),
            )  # fmt: skip
        else:
            return
        self.last_report = now


@contextlib.contextmanager
def progress_bar(total: int) -> Iterator[StepCallback]:
    """A Rich progress bar over the denoising steps; yields the per-step callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress("[progress.description]{task.description}", *columns, transient=False) as bar:
        task = bar.add_task("denoising", total=total)
        yield lambda: bar.advance(task)


def write_outputs(video: Tensor, out_dir: Path, fps: int, reference: Tensor | None = None) -> dict[str, Path]:
    """``video.mp4`` and ``contact_sheet.png`` (8 evenly spaced frames) of one video ``(F, 3, H, W)``, and
    ``reference.png``, the reference face ``(3, H, W)`` the model saw, when given."""
    import imageio.v3 as iio

    from consisid_lab.utils.media import contact_sheet, to_uint8_frames, write_mp4

    out_dir.mkdir(parents=True, exist_ok=True)
    mp4 = write_mp4(video, out_dir / "video.mp4", fps=fps)
    idx = torch.linspace(0, video.shape[0] - 1, min(8, video.shape[0])).round().long()
    png = out_dir / "contact_sheet.png"
    iio.imwrite(png, contact_sheet([video[idx]]))
    files = {"video": mp4, "contact_sheet": png}
    if reference is not None:
        files["reference"] = out_dir / "reference.png"
        iio.imwrite(files["reference"], to_uint8_frames(reference[None])[0])
    return files


def generate_published(
    cfg: DictConfig, device: torch.device, dtype: torch.dtype, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A video ``(1, F, 3, H, W)`` and the face image ``(3, h, w)`` from the published model at ``model_path``."""
    from consisid_lab.data.reference_faces import benchmark_identity
    from consisid_lab.faces.analysis import load_image
    from consisid_lab.models.published import PublishedFaceEncoder, load_published

    if benchmark_identity(str(cfg.face)) is not None:
        raise ValueError(
            f"face={cfg.face} picks a synthetic-benchmark identity, which only our training checkpoints "
            "(ckpt_path=RUN_DIR) know; a published model takes a face photo (face=path/to/photo.png)"
        )
    settings = sampling_settings(cfg, cfg.published, "the released pipeline (published)")
    if settings.guidance_drops != ("text",):
        raise ValueError(
            f"guidance_drops={list(settings.guidance_drops)}: the released pipeline guides on the prompt alone (its "
            "unconditional branch keeps the face); drop guidance_drops=... for model_path, or sample one of our "
            "training checkpoints (ckpt_path=RUN_DIR) trained with model.loss.identity_dropout > 0"
        )
    model = load_published(cfg.model_path, dtype=dtype, vae_tiling=cfg.vae_tiling, vae_slicing=cfg.vae_slicing)
    # Validate the size before the face encoders run: a bad size fails in a second, not after a minute.
    check_video_size(model.vae, model.denoiser.backbone.patch_size, **settings.size)
    photo = load_image(cfg.face)
    encoder = PublishedFaceEncoder(model.root, **dict(cfg.face_encoder))
    try:
        # NoFaceError (a ValueError) when the photo has no face; raised before anything is written.
        ref = encoder(photo, source=str(cfg.face))
    finally:
        encoder.close()
    log.info("face found; id_cond %s, %d CLIP scales", tuple(ref.id_cond.shape), len(ref.id_vit_hidden))
    # T5 visits the GPU only to encode the two prompts (its 4.7 B parameters are not needed afterwards).
    prompt, negative = encode_prompts(model.text_encoder, cfg.prompt, cfg.negative_prompt, device, offload=True)
    if not cfg.cpu_offload:
        # The transformer parts and the VAE; the T5 the denoiser also holds stays where it is.
        model.denoiser.backbone.to(device)
        if model.denoiser.fuser is not None:
            model.denoiser.fuser.to(device)
        model.vae.to(device)
    face_image = ((ref.image[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    plan = f"generating {settings.describe()} from {cfg.model_path} with the face in {Path(str(cfg.face)).name}"
    with SamplingProgress(plan, settings.num_steps, device, bar=cfg.progress) as progress:
        video = sample_published(
            model,
            face_image,
            ref.id_cond.to(dtype),
            [t.to(dtype) for t in ref.id_vit_hidden],
            prompt.to(dtype),
            negative.to(dtype),
            **settings.size,
            **settings.guidance,
            generator=generator,
            # is_kps models: drawn on the face image at the photo's keypoint coordinates, as released
            kps=ref.kps,
            device=device,
            dtype=dtype,
            cpu_offload=cfg.cpu_offload,
            on_step=progress,
            knobs=knobs_config(cfg),
        )
    return video, ref.image[0].float()


def generate_from_checkpoint(
    cfg: DictConfig, device: torch.device, dtype: torch.dtype, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A video ``(1, F, 3, H, W)`` and its reference face ``(3, H, W)`` from the training run at ``ckpt_path``."""
    from consisid_lab.data.reference_faces import reference_face
    from consisid_lab.eval import load_module
    from consisid_lab.utils.run import resolve_ckpt_path

    ckpt = resolve_ckpt_path(cfg.ckpt_path)
    # Built from the checkpoint's stored hyper-parameters: its own codec, encoders and backbone.
    module = load_module(ckpt)
    defaults = checkpoint_defaults(module)
    settings = sampling_settings(cfg, defaults, f"the checkpoint {ckpt}")
    trained = f"{defaults.get('height', '?')} x {defaults.get('width', '?')} as trained"
    check_video_size(module.denoiser.vae, module.denoiser.backbone.patch_size, **settings.size, note=trained)
    data_cfg = (module.run_config or {}).get("data")
    ref = reference_face(str(cfg.face), data_cfg, settings.height, settings.width)
    plan = (
        f"generating {settings.describe()} ({type(module.denoiser.vae).__name__}) from {ckpt} with {ref.description}"
    )
    with SamplingProgress(plan, settings.num_steps, device, bar=cfg.progress) as progress:
        video = sample_checkpoint(
            module,
            ref.face,
            ref.kps,
            cfg.prompt,
            cfg.negative_prompt,
            **settings.size,
            **settings.guidance,
            guidance_drops=settings.guidance_drops,
            generator=generator,
            device=device,
            dtype=dtype,
            on_step=progress,
            knobs=knobs_config(cfg),
        )
    return video, ref.face[0]


def knobs_config(cfg: Mapping[str, Any]) -> Any:
    """The task's ``knobs`` group as :class:`~consisid_lab.models.knobs.SamplingKnobs` (unknown keys refused)."""
    from consisid_lab.models.knobs import SamplingKnobs

    knobs = cfg.get("knobs")
    return SamplingKnobs.from_config(OmegaConf.to_container(knobs) if isinstance(knobs, DictConfig) else knobs)


def generate(cfg: DictConfig) -> dict[str, Path]:
    """Run the task for a composed config; returns the written files."""
    if (cfg.model_path is None) == (cfg.ckpt_path is None):
        raise ValueError(
            "pass exactly one of model_path=DIR (a published model) or ckpt_path=RUN_DIR (one of our training "
            "runs, or a .ckpt file of one)"
        )
    device = resolve_device(cfg.device)
    # A knob this machine cannot run is refused here, before any model is loaded.
    knobs_config(cfg).check(device)
    dtype = resolve_dtype(cfg.dtype, device)
    generator = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
    start = time.perf_counter()
    if cfg.model_path is not None:
        video, reference = generate_published(cfg, device, dtype, generator)
    else:
        video, reference = generate_from_checkpoint(cfg, device, dtype, generator)
    files = write_outputs(video[0].cpu(), Path(cfg.output_dir), int(cfg.fps), reference=reference.cpu())
    log.info(
        "wrote %s and %s in %s", files["video"], files["contact_sheet"], format_seconds(time.perf_counter() - start)
    )
    return files


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
