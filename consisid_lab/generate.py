"""Generation task: ``python -m consisid_lab.generate model_path=DIR|ckpt_path=CKPT face=PHOTO prompt="..."``.

face photo + prompt -> identity features -> explicit sampling loop with classifier-free guidance -> VAE decode ->
``video.mp4`` and ``contact_sheet.png`` in the Hydra output dir.

Two sources of models:
- ``model_path``: a published ConsisID directory (or hub id) loaded into our composition
  (:mod:`consisid_lab.models.published`); identity features from its ArcFace + EVA-CLIP face encoders. The
  sampling path reproduces diffusers' ``ConsisIDPipeline`` step for step (same random draws in the same order:
  image-latent posterior sample, initial noise, the solver's per-step noise), see :func:`sample_published`.
- ``ckpt_path``: one of our training checkpoints; the face is cropped around the detected face, resized to the
  video size, and run through the checkpoint's own identity components.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from consisid_lab.models.diffusion import sample

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


def check_video_size(codec: Any, patch_size: int, num_frames: int, height: int, width: int) -> None:
    """``ValueError`` naming the valid values when the VAE or the DiT's patching cannot take this size."""
    codec.check_size(num_frames, height, width)  # frames (CogVideoX: 8k+1) and the VAE's spatial factor
    step = codec.spatial_factor * patch_size
    for axis, size in (("height", height), ("width", width)):
        if size % step:
            raise ValueError(
                f"{axis}={size} is not a multiple of {step} (VAE factor {codec.spatial_factor} x patch size "
                f"{patch_size}); use e.g. {max(step, round(size / step) * step)} (480 x 720 as released)"
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
    use_dynamic_cfg: bool = True,
    generator: torch.Generator | None = None,
    latents: Tensor | None = None,
    kps: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
    on_step: StepCallback | None = None,
    decode: bool = True,
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
    """
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

    rotary = denoiser.rotary_embedding(f, h, w, device=device)
    vit = [t.to(device) for t in id_vit_hidden] if id_vit_hidden else None
    idc = id_cond.to(device) if id_cond is not None else None

    def model_fn(x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        reps = x_t.shape[0] // b  # 2 when the CFG halves are batched
        inp = torch.cat([x_t, cond_latent.to(x_t.dtype).repeat(reps, 1, 1, 1, 1)], dim=2)  # (rB, f, 2C, h, w)
        out = denoiser(
            inp,
            cond["text"].to(x_t.dtype),
            t,
            image_rotary_emb=rotary,
            id_cond=idc.repeat(reps, 1) if idc is not None else None,
            id_vit_hidden=[v.repeat(reps, 1, 1) for v in vit] if vit else None,
        )
        if on_step is not None:
            on_step()
        return out

    with on_device(denoiser, device, cpu_offload):
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
def face_crop(photo: np.ndarray, size: tuple[int, int], source: str | None = None) -> tuple[Tensor, Tensor]:
    """The largest face of ``photo`` as a square crop (twice the face box) resized to ``size`` = (H, W):
    ``(1, 3, H, W)`` in [-1, 1] and its keypoints ``(1, 5, 2)`` in the crop's pixels."""
    from PIL import Image

    from consisid_lab.faces.analysis import FaceAnalyzer

    with FaceAnalyzer() as analyzer:
        face = analyzer.analyze(photo, source=source)  # NoFaceError when there is none
    cx, cy = face.center
    half = max(face.box[2] - face.box[0], face.box[3] - face.box[1])  # crop side = 2 x the face box
    box = (cx - half, cy - half, cx + half, cy + half)
    height, width = size
    crop = Image.fromarray(photo).crop(tuple(int(round(v)) for v in box)).resize((width, height), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    kps = (face.kps - np.array(box[:2])) * np.array([width, height]) / (2 * half)
    return x, torch.from_numpy(kps.astype(np.float32))[None]


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
) -> Tensor:
    """A video ``(1, F, 3, H, W)`` in [-1, 1] from one of our ``IdentityVideoModule`` checkpoints."""
    module = module.to(device).eval()
    codec = module.vae
    check_video_size(codec, module.backbone.patch_size, num_frames, height, width)
    f, c, h, w = codec.latent_shape(num_frames, height, width)
    g, tokens, _ = module.identity_conditions(face.to(device), kps.to(device), f)
    text = module.encode_text([prompt]).float()
    do_cfg = guidance_scale > 1.0
    uncond = module.encode_text([negative_prompt]).float() if do_cfg else None

    def model_fn(x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        out = module.denoise(x_t, t, cond["text"].to(x_t.dtype), g, tokens)
        if on_step is not None:
            on_step()
        return out

    # Our checkpoints hold float32 weights: reduced precision runs as autocast, the solver state stays float32.
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        x0 = sample(
            model_fn,
            shape=(1, f, c, h, w),
            scheduler=module.noise_scheduler,
            num_steps=num_steps,
            cond={"text": text},
            uncond={"text": uncond} if do_cfg else None,
            guidance_scale=guidance_scale if do_cfg else 1.0,
            use_dynamic_cfg=use_dynamic_cfg and do_cfg,
            generator=generator,
            device=device,
        )
    return codec.decode(x0.to(text.dtype)).float().clamp(-1, 1)


# --------------------------------------------------------------------------------------------------- the task
@contextlib.contextmanager
def progress_bar(total: int, enabled: bool = True) -> Iterator[StepCallback]:
    """A Rich progress bar over the denoising steps; yields the per-step callback."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress("[progress.description]{task.description}", *columns, transient=False) as bar:
        task = bar.add_task("denoising", total=total)
        yield lambda: bar.advance(task)


def write_outputs(video: Tensor, out_dir: Path, fps: int) -> dict[str, Path]:
    """``video.mp4`` and ``contact_sheet.png`` (8 evenly spaced frames) of one video ``(F, 3, H, W)``."""
    import imageio.v3 as iio

    from consisid_lab.utils.media import contact_sheet, write_mp4

    out_dir.mkdir(parents=True, exist_ok=True)
    mp4 = write_mp4(video, out_dir / "video.mp4", fps=fps)
    idx = torch.linspace(0, video.shape[0] - 1, min(8, video.shape[0])).round().long()
    png = out_dir / "contact_sheet.png"
    iio.imwrite(png, contact_sheet([video[idx]]))
    return {"video": mp4, "contact_sheet": png}


def generate(cfg: DictConfig) -> dict[str, Path]:
    """Run the task for a composed config; returns the written files."""
    from consisid_lab.faces.analysis import load_image

    if (cfg.model_path is None) == (cfg.ckpt_path is None):
        raise ValueError("pass exactly one of model_path=DIR (published model) or ckpt_path=CKPT (our checkpoint)")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    out_dir = Path(cfg.output_dir)
    generator = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
    sizes = {"num_frames": cfg.num_frames, "height": cfg.height, "width": cfg.width}
    guidance = {
        "num_steps": cfg.num_steps,
        "guidance_scale": cfg.guidance_scale,
        "use_dynamic_cfg": cfg.use_dynamic_cfg,
    }
    if cfg.model_path is not None:
        from consisid_lab.models.published import PublishedFaceEncoder, load_published

        model = load_published(cfg.model_path, dtype=dtype, vae_tiling=cfg.vae_tiling, vae_slicing=cfg.vae_slicing)
        # Validate the size before the face encoders run: a bad size fails in a second, not after a minute.
        check_video_size(model.vae, model.denoiser.backbone.patch_size, **sizes)
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
            model.denoiser.to(device)
            model.vae.to(device)
        face_image = ((ref.image[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        with progress_bar(int(cfg.num_steps), cfg.progress) as step:
            video = sample_published(
                model,
                face_image,
                ref.id_cond.to(dtype),
                [t.to(dtype) for t in ref.id_vit_hidden],
                prompt.to(dtype),
                negative.to(dtype),
                **sizes,
                **guidance,
                generator=generator,
                # is_kps models: drawn on the face image at the photo's keypoint coordinates, as released
                kps=ref.kps,
                device=device,
                dtype=dtype,
                cpu_offload=cfg.cpu_offload,
                on_step=step,
            )
    else:
        from consisid_lab.eval import load_module

        module = load_module(str(cfg.ckpt_path))
        check_video_size(module.vae, module.backbone.patch_size, **sizes)
        photo = load_image(cfg.face)
        face, kps = face_crop(photo, (cfg.height, cfg.width), source=str(cfg.face))
        with progress_bar(int(cfg.num_steps), cfg.progress) as step:
            video = sample_checkpoint(
                module,
                face,
                kps,
                cfg.prompt,
                cfg.negative_prompt,
                **sizes,
                **guidance,
                generator=generator,
                device=device,
                dtype=dtype,
                on_step=step,
            )
    files = write_outputs(video[0].cpu(), out_dir, int(cfg.fps))
    log.info("wrote %s and %s", files["video"], files["contact_sheet"])
    return files


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
