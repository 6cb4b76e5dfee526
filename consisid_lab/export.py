"""Export task: ``python -m consisid_lab.export ckpt_path=RUN_OR_CKPT out_dir=DIR [layout=backbone]``.

``layout=backbone`` writes the run's backbone alone (``transformer/``, and ``text_encoder/`` for the trainable
caption encoder) as a base to fine-tune from: ``+experiment=from_base base_dir=DIR``. The default layout:

Writes one of our training checkpoints of the ConsisID composition in the published diffusers layout
(``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), the EMA
weights by default, so that ``diffusers.ConsisIDPipeline.from_pretrained(DIR)`` loads it. LoRA adapters are fused
into the weights they adapt. The face encoders that compute ``id_cond`` / ``id_vit_hidden`` are not part of the
pipeline: real ones (``model/local_encoder=insightface_evaclip``) are copied to ``face_encoder/`` as released;
stand-in encoders are not exported (their features must be computed with this project).

A composition that diffusers cannot express raises :class:`~consisid_lab.models.consisid.NotExpressibleError`
naming the component (another injection place, another fuser, a codec or text encoder other than CogVideoX's VAE
and T5) before anything is written.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)

LAYOUTS = ("published", "backbone")


def check_pipeline_components(denoiser: Any) -> dict[str, Any]:
    """The transformer config of ``denoiser`` for ``ConsisIDPipeline``, after checking the pipeline's other parts."""
    from consisid_lab.models.consisid import NotExpressibleError, consisid_config
    from consisid_lab.models.text_encoder import T5TextEncoder
    from consisid_lab.models.vae import CogVideoXCodec

    if not isinstance(denoiser.vae, CogVideoXCodec):
        raise NotExpressibleError(
            f"model/vae: {type(denoiser.vae).__name__} has no counterpart in ConsisIDPipeline, which decodes with "
            "AutoencoderKLCogVideoX; train with model/vae=cogvideox to export"
        )
    if not isinstance(denoiser.text_encoder, T5TextEncoder):
        raise NotExpressibleError(
            f"model/text_encoder: {type(denoiser.text_encoder).__name__} has no counterpart in ConsisIDPipeline, "
            "which encodes captions with T5; train with model/text_encoder=t5 to export"
        )
    config = consisid_config(denoiser)
    if config["is_kps"]:
        raise NotExpressibleError(
            "model/keypoint_renderer: the pipeline draws its keypoint image with its own draw_kps, which "
            f"{type(denoiser.keypoint_renderer).__name__} does not reproduce; train with "
            "model.global_encoder.use_kps=false to export"
        )
    if config["max_text_seq_length"] != denoiser.text_encoder.max_length:
        raise NotExpressibleError(
            f"model/text_encoder: max_length={denoiser.text_encoder.max_length} but the backbone's "
            f"max_text_seq_length={config['max_text_seq_length']}; ConsisID reads one length for both"
        )
    return config


def _new_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a path, refused when it holds anything: an export never mixes with other files."""
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out_dir={out} is not empty; pass a new directory")
    return out


def write_published(denoiser: Any, scheduler: Any, out_dir: str | Path) -> Path:
    """``denoiser`` (with its codec and T5) and ``scheduler`` as a published ConsisID directory at ``out_dir``."""
    from diffusers import ConsisIDPipeline, ConsisIDTransformer3DModel

    from consisid_lab.models.consisid import to_diffusers_state_dict
    from consisid_lab.models.trainable import fuse_lora

    fuse_lora(denoiser.backbone.transformer)
    config = check_pipeline_components(denoiser)
    out = _new_out_dir(out_dir)
    state = to_diffusers_state_dict(denoiser)
    with torch.device("meta"):
        transformer = ConsisIDTransformer3DModel(**config)
    # The exported tensors are ours (assigned, not copied): the transformer exists once in memory.
    transformer.load_state_dict(state, strict=True, assign=True)
    _buffers_from(transformer, denoiser)
    t5 = denoiser.text_encoder
    pipe = ConsisIDPipeline(
        tokenizer=t5.tokenizer,
        text_encoder=t5.encoder,
        vae=denoiser.vae.vae,
        transformer=transformer.eval(),
        scheduler=scheduler,
    )
    pipe.save_pretrained(str(out))
    _write_face_encoders(denoiser.local_encoder, out)
    log.info("exported the ConsisID composition to %s (%d transformer weights)", out, len(state))
    return out


def write_backbone(denoiser: Any, out_dir: str | Path, source: dict | None = None) -> Path:
    """The backbone of ``denoiser`` as a base for fine-tuning: ``transformer/`` (a CogVideoX diffusers transformer,
    which ``model.backbone.pretrained=DIR`` loads) and, for the trainable bag-of-words caption encoder,
    ``text_encoder/`` (``model.text_encoder.pretrained=DIR``). Identity modules are left out: a fine-tune starts
    them new, as ConsisID starts its own on CogVideoX-5B-I2V."""
    from consisid_lab.models.consisid import NotExpressibleError
    from consisid_lab.models.text_encoder import BagOfWordsTextEncoder
    from consisid_lab.models.trainable import fuse_lora

    backbone = denoiser.backbone
    if getattr(backbone, "pooled_text_proj", None) is not None:
        raise NotExpressibleError(
            "model.backbone.pooled_text=true adds a route CogVideoX's transformer does not have; train the base "
            "without it to export its backbone"
        )
    out = _new_out_dir(out_dir)
    fuse_lora(backbone.transformer)
    backbone.transformer.save_pretrained(str(out / "transformer"))
    written = ["transformer/"]
    if isinstance(denoiser.text_encoder, BagOfWordsTextEncoder):
        denoiser.text_encoder.save_pretrained(out / "text_encoder")
        written.append("text_encoder/")
    if source:
        (out / "base.json").write_text(json.dumps(source, indent=2, default=str))
    log.info("exported the backbone to %s (%s)", out, ", ".join(written))
    return out


def _buffers_from(transformer: Any, denoiser: Any) -> None:
    """Non-persistent buffers (not in any state dict) come from our backbone, which computed them."""
    from consisid_lab.models.consisid import diffusers_to_ours

    ours = dict(denoiser.named_buffers())
    for name, buf in list(transformer.named_buffers()):
        if buf.is_meta:
            owner_name, _, attr = name.rpartition(".")
            transformer.get_submodule(owner_name).register_buffer(
                attr, ours[diffusers_to_ours(name)], persistent=False
            )


def _write_face_encoders(local_encoder: Any, out: Path) -> None:
    from consisid_lab.models.local_encoder_real import RealFaceLocalEncoder
    from consisid_lab.models.published import ARCFACE_SUBDIR, CLIP_CHECKPOINT

    if not isinstance(local_encoder, RealFaceLocalEncoder):
        log.warning(
            "the local encoder (%s) is not exported: compute id_cond / id_vit_hidden for this model with this "
            "project's encoders",
            type(local_encoder).__name__,
        )
        return
    arcface_dir, clip = local_encoder.arcface_dir, local_encoder.clip_checkpoint
    if arcface_dir:
        shutil.copytree(arcface_dir, out / ARCFACE_SUBDIR)
    if clip:
        (out / CLIP_CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(clip, out / CLIP_CHECKPOINT)


def export(cfg: DictConfig) -> Path:
    """Run the task for a composed config; returns the written directory."""
    from consisid_lab.eval import load_module
    from consisid_lab.utils.run import resolve_ckpt_path

    ckpt = resolve_ckpt_path(cfg.ckpt_path)
    if ckpt is None:
        raise ValueError("export needs ckpt_path=RUN_DIR (or a .ckpt file of one of our training runs)")
    layout = cfg.get("layout", "published")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; pick one of {LAYOUTS}")
    module = load_module(ckpt, use_ema=bool(cfg.use_ema))
    if layout == "backbone":
        # The run's config came with the module (on_load_checkpoint): the checkpoint is not read again.
        run = module.run_config or {}
        source = {"checkpoint": str(ckpt), "experiment": run.get("experiment_name"), "ema": bool(cfg.use_ema)}
        return write_backbone(module.denoiser, cfg.out_dir, source)
    return write_published(module.denoiser, module.noise_scheduler, cfg.out_dir)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
