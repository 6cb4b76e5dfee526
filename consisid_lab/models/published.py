"""The published ConsisID model directory (diffusers layout) loaded into our composition.

Layout (what ``BestWishYsh/ConsisID-preview`` ships)::

    model_index.json
    transformer/   config.json + diffusion_pytorch_model[.safetensors | -0000k-of-0000n.safetensors + index]
    vae/           config.json + weights           (AutoencoderKLCogVideoX)
    text_encoder/  config.json + weights           (T5 encoder)
    tokenizer/     spiece.model / tokenizer_config.json
    scheduler/     scheduler_config.json           (CogVideoXDPMScheduler)
    face_encoder/  models/antelopev2/*.onnx (ArcFace), EVA02_CLIP_L_336_psz14_s6B.pt (EVA-CLIP)

Loading is strict and checked before any weight is read: every required file is looked for and all missing ones
are named at once; the transformer's weight shapes are compared with its config (and with an expected composition,
if one is given) and every mismatching component is listed (``in_channels``, ``num_layers``, ``cross_attn_interval``,
``LFE_*``), instead of failing with a shape error deep in ``load_state_dict``. The transformer's safetensors are
read straight into the meta-built :class:`~consisid_lab.models.denoiser.IdentityDenoiser` (the one denoiser that
also trains) through the explicit key map of :mod:`consisid_lab.models.consisid` (the diffusers model is never
instantiated).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from consisid_lab.models.backbone import PRESETS
from consisid_lab.models.consisid import build_from_config, diffusers_to_ours, ours_to_diffusers
from consisid_lab.models.denoiser import IdentityDenoiser
from consisid_lab.models.vae import torch_dtype

if TYPE_CHECKING:
    from diffusers import CogVideoXDPMScheduler

    from consisid_lab.models.text_encoder import T5TextEncoder
    from consisid_lab.models.vae import CogVideoXCodec

logger = logging.getLogger(__name__)

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "face_encoder")
# Weight files diffusers / transformers write (single file or a sharded index), in order of preference.
_DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
ARCFACE_SUBDIR = "face_encoder/models/antelopev2"
CLIP_CHECKPOINT = "face_encoder/EVA02_CLIP_L_336_psz14_s6B.pt"

# The released transformer (``ConsisIDTransformer3DModel`` of ConsisID-preview, DESIGN.md section 1): the
# CogVideoX-5B-I2V backbone plus the identity modules.
RELEASED_CONFIG: dict[str, Any] = {
    **PRESETS["cogvideox_5b_i2v"],
    "is_train_face": True,
    "is_kps": False,
    "cross_attn_interval": 2,
    "cross_attn_dim_head": 128,
    "cross_attn_num_heads": 16,
    "LFE_id_dim": 1280,
    "LFE_vit_dim": 1024,
    "LFE_depth": 10,
    "LFE_dim_head": 64,
    "LFE_num_heads": 16,
    "LFE_num_id_token": 5,
    "LFE_num_querie": 32,
    "LFE_output_dim": 2048,
    "LFE_ff_mult": 4,
    "LFE_num_scale": 5,
    "local_face_scale": 1.0,
}


class CompositionMismatchError(ValueError):
    """A checkpoint whose components do not fit the composition it is loaded into."""


# ----------------------------------------------------------------------------------------------- locating files
def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def missing_files(root: Path, need_text_encoder: bool = True, need_face_encoder: bool = True) -> list[str]:
    """Relative paths (or ``a | b`` alternatives) of the required files that ``root`` lacks."""
    missing = []
    if not (root / "model_index.json").is_file():
        missing.append("model_index.json")
    required: list[tuple[str, Sequence[str]]] = [
        ("transformer", ("config.json",)),
        ("transformer", _DIFFUSERS_WEIGHTS),
        ("vae", ("config.json",)),
        ("vae", _DIFFUSERS_WEIGHTS),
        ("scheduler", ("scheduler_config.json",)),
    ]
    if need_text_encoder:
        required += [("text_encoder", ("config.json",)), ("text_encoder", _TRANSFORMERS_WEIGHTS)]
        required += [("tokenizer", _TOKENIZER_FILES)]
    for sub, names in required:
        if _first_existing(root / sub, names) is None:
            missing.append(" | ".join(f"{sub}/{n}" for n in names))
    if need_face_encoder:
        arc = root / ARCFACE_SUBDIR
        if not (arc.is_dir() and any(arc.glob("*.onnx"))):
            missing.append(f"{ARCFACE_SUBDIR}/*.onnx")
        if not (root / CLIP_CHECKPOINT).is_file():
            missing.append(CLIP_CHECKPOINT)
    return missing


def check_layout(root: str | Path, need_text_encoder: bool = True, need_face_encoder: bool = True) -> Path:
    """``root`` as a Path; ``FileNotFoundError`` naming every missing subfolder/file and where it was looked for."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"published model directory {root} does not exist")
    missing = missing_files(root, need_text_encoder, need_face_encoder)
    if missing:
        listing = "\n  ".join(missing)
        raise FileNotFoundError(
            f"{root} is not a complete ConsisID model directory (diffusers layout); missing:\n  {listing}\n"
            "Download the released model (e.g. `huggingface-cli download BestWishYsh/ConsisID-preview --local-dir "
            "DIR`) and pass model_path=DIR"
        )
    return root


def resolve_model_path(path_or_id: str | Path, need_text_encoder: bool = True, need_face_encoder: bool = True) -> Path:
    """A local model directory, or a hub id (``owner/name``) fetched with ``snapshot_download`` when online.

    Offline (``HF_HUB_OFFLINE=1`` or no network) a hub id resolves only to a copy already in the local hub cache;
    otherwise the error names the id and the places that were searched.
    """
    local = Path(path_or_id).expanduser()
    if local.exists():
        return check_layout(local, need_text_encoder, need_face_encoder)
    text = str(path_or_id)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise FileNotFoundError(f"model path {local} does not exist (and {text!r} is not a hub id 'owner/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    errors = []
    for local_only in (True, False) if not offline else (True,):
        try:
            folder = Path(snapshot_download(repo_id=text, local_files_only=local_only))
        except Exception as err:  # not cached / no network: try the next way, then report all of them
            errors.append(f"{'hub cache' if local_only else 'download'}: {type(err).__name__}: {err}")
            continue
        return check_layout(folder, need_text_encoder, need_face_encoder)
    raise FileNotFoundError(
        f"cannot find the model {text!r}: not a local directory ({local.resolve()}), not in the hub cache "
        f"({HF_HUB_CACHE})" + (" and HF_HUB_OFFLINE is set" if offline else "") + ". Tried:\n  " + "\n  ".join(errors)
    )


# ------------------------------------------------------------------------------------------ composition checks
def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"no safetensors weights in {folder} (expected diffusion_pytorch_model.safetensors or its sharded index); "
        "convert .bin weights with diffusers' save_pretrained(safe_serialization=True)"
    )


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor in the transformer's safetensors, read from the headers only."""
    from safetensors import safe_open

    shapes = {}
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _count(shapes: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def infer_composition(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The config values that a ConsisID transformer's weight shapes determine (read off the key layout)."""
    out: dict[str, Any] = {}
    proj = shapes.get("patch_embed.proj.weight")  # (D, C_in, p, p)
    if proj is not None and len(proj) == 4:
        out["inner_dim"], out["in_channels"], out["patch_size"] = proj[0], proj[1], proj[2]
        head = shapes.get("proj_out.weight")  # (p * p * C_out, D)
        if head is not None:
            out["out_channels"] = head[0] // (proj[2] * proj[3])
    if (text := shapes.get("patch_embed.text_proj.weight")) is not None:
        out["text_embed_dim"] = text[1]
    if (temb := shapes.get("time_embedding.linear_1.weight")) is not None:
        out["time_embed_dim"] = temb[0]
    layers = _count(shapes, r"transformer_blocks\.(\d+)\.")
    out["num_layers"] = layers
    cross = _count(shapes, r"perceiver_cross_attention\.(\d+)\.")
    out["is_train_face"] = cross > 0
    if cross:
        out["cross_attn_interval"] = layers // cross
        q = shapes.get("perceiver_cross_attention.0.to_q.weight")  # (heads * dim_head, D)
        if q is not None:
            out["cross_attn_inner_dim"] = q[0]
    lfe = "local_facial_extractor."
    if (idm := shapes.get(lfe + "id_embedding_mapping.0.weight")) is not None:
        out["LFE_id_dim"] = idm[1]
    if (m0 := shapes.get(lfe + "mapping_0.0.weight")) is not None:
        out["LFE_vit_dim"] = m0[1]
    if (lat := shapes.get(lfe + "latents")) is not None:
        out["LFE_num_querie"] = lat[1]
    if (po := shapes.get(lfe + "proj_out")) is not None:
        out["LFE_output_dim"] = po[1]
    if any(k.startswith(lfe) for k in shapes):
        out["LFE_num_scale"] = _count(shapes, r"local_facial_extractor\.mapping_(\d+)\.")
        out["LFE_depth"] = _count(shapes, r"local_facial_extractor\.layers\.(\d+)\.")
    return out


def _composition_of_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`infer_composition` would read from weights saved with ``config``."""
    out = {
        "inner_dim": config["num_attention_heads"] * config["attention_head_dim"],
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "patch_size": config["patch_size"],
        "text_embed_dim": config["text_embed_dim"],
        "time_embed_dim": config["time_embed_dim"],
        "num_layers": config["num_layers"],
        "is_train_face": bool(config.get("is_train_face", False)),
    }
    if out["is_train_face"]:
        out["cross_attn_interval"] = config["cross_attn_interval"]
        out["cross_attn_inner_dim"] = config["cross_attn_num_heads"] * config["cross_attn_dim_head"]
        for key in ("LFE_id_dim", "LFE_vit_dim", "LFE_num_querie", "LFE_output_dim", "LFE_num_scale", "LFE_depth"):
            out[key] = config[key]
    return out


def composition_mismatches(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    expected: Mapping[str, Any] | None = None,
    components: Mapping[str, Any] | None = None,
) -> list[str]:
    """Human-readable mismatches between a transformer config and its weights, an expected composition and the
    other components of the directory (``components``: ``vae_latent_channels``, ``text_dim``)."""
    problems = []
    if shapes is not None:
        from_weights = infer_composition(shapes)
        from_config = _composition_of_config(config)
        for key, value in from_config.items():
            if key in from_weights and from_weights[key] != value:
                problems.append(f"{key}: weights have {from_weights[key]}, transformer/config.json says {value}")
    for key, value in (expected or {}).items():
        if key in config and config[key] != value:
            problems.append(f"{key}: checkpoint has {config[key]}, the expected composition has {value}")
        elif key not in config:
            problems.append(f"{key}: missing from the checkpoint's config (expected {value})")
    comp = dict(components or {})
    if "vae_latent_channels" in comp:
        c = comp["vae_latent_channels"]
        if config["in_channels"] != 2 * c:
            problems.append(
                f"in_channels: {config['in_channels']}, but the VAE's {c} latent channels plus the face latent make "
                f"{2 * c}"
            )
        if config["out_channels"] != c:
            problems.append(f"out_channels: {config['out_channels']}, but the VAE has {c} latent channels")
    if "text_dim" in comp and config["text_embed_dim"] != comp["text_dim"]:
        problems.append(f"text_embed_dim: {config['text_embed_dim']}, but the text encoder gives {comp['text_dim']}")
    return problems


def _raise_mismatches(where: Path, problems: list[str]) -> None:
    if problems:
        raise CompositionMismatchError(
            f"{where} holds a model of another composition; mismatched components:\n  " + "\n  ".join(problems)
        )


# ----------------------------------------------------------------------------------------------- the transformer
def load_denoiser(
    folder: str | Path, dtype: str | torch.dtype = "float32", expected: Mapping[str, Any] | None = None
) -> IdentityDenoiser:
    """Our composition with the weights of a published ``transformer/`` folder, strictly.

    The composition is checked first (weights vs config vs ``expected``); the safetensors are then read into the
    meta-built model with ``strict=True, assign=True`` through :func:`diffusers_to_ours`.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config = _read_json(folder / "config.json")
    _raise_mismatches(folder, composition_mismatches(config, checkpoint_shapes(folder), expected))
    with torch.device("meta"):
        model = build_from_config(config)
    want = torch_dtype(dtype)
    # Parameters take the requested dtype; buffers keep the stored one (the learned position table is float64,
    # as diffusers computes and saves it).
    params = {name for name, _ in model.named_parameters()}
    state: dict[str, Tensor] = {}
    for path in _weight_files(folder):
        for key, value in load_file(str(path)).items():
            name = diffusers_to_ours(key)
            state[name] = value.to(want) if name in params else value
    expected_keys = set(model.state_dict())
    missing, unexpected = sorted(expected_keys - set(state)), sorted(set(state) - expected_keys)
    if missing or unexpected:
        raise CompositionMismatchError(
            f"{folder}: {len(missing)} missing and {len(unexpected)} unexpected weights after the key map, e.g. "
            f"missing {[ours_to_diffusers(k) for k in missing[:5]]}, unexpected "
            f"{[ours_to_diffusers(k) for k in unexpected[:5]]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    materialise_buffers(model, model.backbone.transformer.config)
    return model.eval().requires_grad_(False)


def materialise_buffers(module: torch.nn.Module, config: Any) -> None:
    """Buffers of ``module`` left on the meta device after a load (the sin-cos position table without learned
    positions, outside the state dict) are computed from the transformer ``config``; any other one is an error."""
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if attr != "pos_embedding":
            raise RuntimeError(f"buffer {name!r} is neither in the checkpoint nor computable")
        with torch.device("cpu"):
            table = owner._get_positional_embeddings(config.sample_height, config.sample_width, config.sample_frames)
        owner.register_buffer(attr, table, persistent=False)


# ----------------------------------------------------------------------------------------------- whole model
@dataclass
class PublishedModel:
    """The published model in our composition (all modules frozen, in eval mode)."""

    root: Path
    denoiser: IdentityDenoiser
    vae: CogVideoXCodec
    text_encoder: T5TextEncoder | None
    scheduler: CogVideoXDPMScheduler
    config: dict[str, Any] = field(default_factory=dict)  # the transformer's config.json

    @property
    def is_kps(self) -> bool:
        return bool(self.config.get("is_kps", False))


def load_published(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    vae_tiling: bool = False,
    vae_slicing: bool = False,
    expected: Mapping[str, Any] | None = None,
    load_text_encoder: bool = True,
    need_face_encoder: bool = True,
) -> PublishedModel:
    """Load a published ConsisID directory (or hub id, see :func:`resolve_model_path`) into our composition."""
    from diffusers import CogVideoXDPMScheduler

    from consisid_lab.models.text_encoder import T5TextEncoder
    from consisid_lab.models.vae import CogVideoXCodec

    root = resolve_model_path(path, need_text_encoder=load_text_encoder, need_face_encoder=need_face_encoder)
    config = _read_json(root / "transformer" / "config.json")
    components = {"vae_latent_channels": _read_json(root / "vae" / "config.json")["latent_channels"]}
    if load_text_encoder:
        components["text_dim"] = _read_json(root / "text_encoder" / "config.json")["d_model"]
    _raise_mismatches(root, composition_mismatches(config, None, None, components))
    name = str(torch_dtype(dtype)).removeprefix("torch.")
    denoiser = load_denoiser(root / "transformer", dtype, expected)
    vae = CogVideoXCodec(str(root), subfolder="vae", dtype=name, tiling=vae_tiling, slicing=vae_slicing)
    text_encoder = None
    if load_text_encoder:
        text_encoder = T5TextEncoder(str(root), max_length=int(config["max_text_seq_length"]), dtype=name)
    # The denoiser holds the directory's codec and text encoder too (both frozen): one model, whole.
    denoiser.vae, denoiser.text_encoder = vae, text_encoder
    scheduler = CogVideoXDPMScheduler.from_pretrained(str(root), subfolder="scheduler", local_files_only=True)
    logger.info(
        "loaded ConsisID from %s: %d layers, in_channels %d, identity modules %s",
        root,
        config["num_layers"],
        config["in_channels"],
        "on" if denoiser.fuser is not None else "off",
    )
    return PublishedModel(root, denoiser, vae, text_encoder, scheduler, config)


# ----------------------------------------------------------------------------------------------- face encoders
@dataclass
class ReferenceFace:
    """A face photo prepared as the released inference prepares it."""

    image: Tensor  # (1, 3, S, S) aligned face, background and hair whitened, in [-1, 1] (the global route)
    id_cond: Tensor  # (1, D_arc + D_clip) ArcFace embedding ++ normalised CLIP embedding
    id_vit_hidden: list[Tensor]  # num_scale x (1, 1 + N, D_vit) CLIP hidden states
    kps: np.ndarray  # (5, 2) ArcFace-order keypoints in the photo's pixels


class PublishedFaceEncoder:
    """ArcFace + EVA-CLIP from the ``face_encoder/`` folder, fed by the project's MediaPipe face analysis.

    Steps (the released ``process_face_embeddings`` with our analyser): pick the largest face; ArcFace on the
    112-px aligned face; align the photo and the face mask to ``align_size`` and whiten outside the mask; EVA-CLIP
    (grayscale) on that parsed face. A photo without a face raises :class:`consisid_lab.faces.NoFaceError`.

    Args:
        root: the published model directory.
        arcface_dir / clip_checkpoint: relative to ``root`` (or absolute).
        clip_model: open_clip model name; ``clip_model_config`` registers a custom config json first.
        clip_blocks: the hidden states entering these blocks, in order (``LFE_num_scale`` of them).
    """

    def __init__(
        self,
        root: str | Path,
        arcface_dir: str = ARCFACE_SUBDIR,
        clip_checkpoint: str = CLIP_CHECKPOINT,
        clip_model: str = "EVA02-L-14-336",
        clip_model_config: str | None = None,
        clip_blocks: Sequence[int] = (4, 8, 12, 16, 20),
        align_size: int = 512,
    ) -> None:
        from consisid_lab.faces.analysis import FaceAnalyzer
        from consisid_lab.faces.arcface import InsightFaceArcFace
        from consisid_lab.faces.eva_clip import EvaClipEncoder

        root = Path(root)
        if clip_model_config is not None:
            import open_clip

            open_clip.add_model_config(str(clip_model_config))
        self.analyzer = FaceAnalyzer()
        self.arcface = InsightFaceArcFace(root / arcface_dir)
        self.clip = EvaClipEncoder(root / clip_checkpoint, model_name=clip_model, blocks=tuple(clip_blocks))
        self.align_size = int(align_size)

    @property
    def id_dim(self) -> int:
        return sum(self.arcface.vector_dims.values()) + sum(self.clip.vector_dims.values())

    def close(self) -> None:
        self.analyzer.close()

    @torch.no_grad()
    def __call__(self, photo: np.ndarray | str | Path, source: str | Path | None = None) -> ReferenceFace:
        """``photo``: an RGB array or an image path; ``source`` names it in errors."""
        from consisid_lab.faces.analysis import align_face, load_image, to_rgb_uint8

        is_path = isinstance(photo, (str, Path))
        image = load_image(photo) if is_path else to_rgb_uint8(photo)
        source = photo if is_path else source
        face = self.analyzer.analyze(image, source=source)  # NoFaceError when there is none
        arc = self.arcface.features(align_face(image, face.kps)[None]).vectors  # (1, 512)
        aligned = align_face(image, face.kps, self.align_size)  # (S, S, 3)
        mask = align_face(np.repeat(face.mask[..., None].astype(np.uint8) * 255, 3, axis=2), face.kps, self.align_size)
        parsed = np.where(mask > 127, aligned, 255).astype(np.uint8)
        x = torch.from_numpy(parsed).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, S, S)
        clip = self.clip(x)
        id_cond = torch.cat([*arc.values(), *clip.vectors.values()], dim=-1).float()  # (1, D_arc + D_clip)
        return ReferenceFace(image=x, id_cond=id_cond, id_vit_hidden=list(clip.tokens.values()), kps=face.kps)
