"""EVA02-CLIP-L-14-336 through open_clip (timm's ``Eva`` vision tower), with the paper's face preprocessing.

The released ConsisID ships ``EVA02_CLIP_L_336_psz14_s6B.pt`` in the layout of the original EVA-CLIP repository.
:func:`eva_clip_to_open_clip` maps it onto open_clip's ``visual`` module (``trunk.*`` = timm ``Eva``), key by key:

============================================  ==========================================
EVA-CLIP (``visual.`` prefix)                 open_clip ``visual`` (timm ``Eva``)
============================================  ==========================================
``blocks.N.attn.q_bias``                      ``trunk.blocks.N.attn.q_proj.bias``
``blocks.N.attn.v_bias``                      ``trunk.blocks.N.attn.v_proj.bias``
``blocks.N.attn.inner_attn_ln.*``             ``trunk.blocks.N.attn.norm.*``
``blocks.N.mlp.w1.*`` / ``w2.*`` / ``w3.*``   ``trunk.blocks.N.mlp.fc1_g.*`` / ``fc1_x.*`` / ``fc2.*``
``blocks.N.mlp.ffn_ln.*``                     ``trunk.blocks.N.mlp.norm.*``
everything else of the tower                  ``trunk.`` + the same name
``rope.freqs_cos|sin`` (also per block)       dropped: timm recomputes rotary tables from the config
``text.*``, ``logit_scale``, ...               dropped: only the vision tower is used
============================================  ==========================================

(``q_proj``/``k_proj``/``v_proj`` stay separate: EVA02-L is built with ``qkv_fused=False``; ``k_proj`` has no bias in
either layout.) Loading is strict; any other key that is left over or missing is an error.

Inputs follow the paper: the parsed face (background whitened), grayscale replicated to 3 channels, bicubic resize
to the model size, the model's mean/std. Outputs: the projected embedding (L2-normalised, as the released code does
before concatenating it with ArcFace) and the hidden states *entering* chosen blocks: timm's
``forward_intermediates`` returns block *outputs*, so "entering block k" is the output of block ``k - 1``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from consisid_lab.types import IdentityFeatures

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "EVA02-L-14-336"
DEFAULT_BLOCKS = (4, 8, 12, 16, 20)
VECTOR_KEY = "clip"
TOKENS_PREFIX = "clip_block"
# ITU-R BT.601 luma weights (what the released code's grayscale conversion uses)
LUMA_RGB = (0.299, 0.587, 0.114)

# EVA-CLIP -> timm Eva renames inside ``blocks.N.`` (the only names that differ; see the module docstring).
EVA_TO_TIMM_BLOCK_RENAMES: dict[str, str] = {
    "attn.q_bias": "attn.q_proj.bias",
    "attn.v_bias": "attn.v_proj.bias",
    "attn.inner_attn_ln.weight": "attn.norm.weight",
    "attn.inner_attn_ln.bias": "attn.norm.bias",
    "mlp.w1.weight": "mlp.fc1_g.weight",
    "mlp.w1.bias": "mlp.fc1_g.bias",
    "mlp.w2.weight": "mlp.fc1_x.weight",
    "mlp.w2.bias": "mlp.fc1_x.bias",
    "mlp.w3.weight": "mlp.fc2.weight",
    "mlp.w3.bias": "mlp.fc2.bias",
    "mlp.ffn_ln.weight": "mlp.norm.weight",
    "mlp.ffn_ln.bias": "mlp.norm.bias",
}
# Rotary tables that the EVA-CLIP file stores as buffers (once on the tower and, because each attention holds the
# shared rope module, once per block); timm keeps them as non-persistent buffers computed from the config.
EVA_ROPE_BUFFERS = re.compile(r"^visual\.(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)$")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _unwrap(state: dict) -> dict[str, Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def is_eva_clip_layout(state: dict[str, Tensor]) -> bool:
    return "visual.pos_embed" in state and "visual.trunk.pos_embed" not in state


def eva_clip_to_open_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an EVA-CLIP-layout state dict to the state dict of open_clip's ``model.visual`` (strict-loadable)."""
    out: dict[str, Tensor] = {}
    dropped_other = set()
    for key, value in state.items():
        if not key.startswith("visual."):
            dropped_other.add(key.split(".")[0])
            continue
        if EVA_ROPE_BUFFERS.match(key):
            continue
        name = key.removeprefix("visual.")
        if m := _BLOCK_KEY.match(name):
            name = f"blocks.{m[1]}.{EVA_TO_TIMM_BLOCK_RENAMES.get(m[2], m[2])}"
        out[f"trunk.{name}"] = value
    if dropped_other:
        logger.info("EVA-CLIP checkpoint: vision tower only; dropped %s", sorted(dropped_other))
    return out


def open_clip_to_eva_clip(visual_state: dict[str, Tensor], rope: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The inverse of :func:`eva_clip_to_open_clip` (writes EVA-CLIP files, e.g. for tests); ``rope``: extra
    ``visual.``-prefixed rotary buffers to add."""
    inverse = {v: k for k, v in EVA_TO_TIMM_BLOCK_RENAMES.items()}
    out = {}
    for key, value in visual_state.items():
        if not key.startswith("trunk."):
            raise ValueError(f"expected open_clip timm-tower keys under 'trunk.', got {key!r}")
        name = key.removeprefix("trunk.")
        if m := _BLOCK_KEY.match(name):
            name = f"blocks.{m[1]}.{inverse.get(m[2], m[2])}"
        out[f"visual.{name}"] = value
    return {**out, **(rope or {})}


def load_visual_state(path: str | Path) -> dict[str, Tensor]:
    """State dict for open_clip's ``model.visual`` from an EVA-CLIP or open_clip checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {path} not found; expected e.g. EVA02_CLIP_L_336_psz14_s6B.pt")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = _unwrap(state)
    if is_eva_clip_layout(state):
        return eva_clip_to_open_clip(state)
    if any(k.startswith("visual.") for k in state):  # open_clip layout: the tower's keys under `visual.`
        return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    raise ValueError(f"{path} holds neither an EVA-CLIP nor an open_clip state dict (no 'visual.' keys)")


def to_gray(x: Tensor) -> Tensor:
    """``(B, 3, H, W)`` RGB -> ``(B, 3, H, W)`` luma replicated on three channels."""
    w = x.new_tensor(LUMA_RGB).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).expand(-1, 3, -1, -1)


class EvaClipEncoder(nn.Module):
    """The CLIP half of ConsisID's local facial extractor: projected embedding + hidden states per scale.

    Args:
        checkpoint: EVA-CLIP or open_clip checkpoint; ``None`` keeps random weights (tests, benchmarks).
        model_name: an open_clip model config (built-in or registered with ``open_clip.add_model_config``) with a timm
            ``Eva`` vision tower.
        blocks: hidden states entering these blocks (1-based count of blocks run, e.g. 4 = output of block index 3).
        grayscale: feed the luma of the face (the paper's choice, so CLIP sees structure rather than colour).
        normalize_embedding: L2-normalise the projected embedding (the released code does).
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        model_name: str = DEFAULT_MODEL,
        blocks: Sequence[int] = DEFAULT_BLOCKS,
        grayscale: bool = True,
        normalize_embedding: bool = True,
    ) -> None:
        super().__init__()
        try:
            import open_clip
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError("the CLIP encoder needs open_clip: pip install 'open_clip_torch==3.3.0'") from e
        if checkpoint is None:
            model = open_clip.create_model(model_name, pretrained=None)  # random weights
        else:
            # Skeleton on the meta device (no random init of ~400 M parameters), then the checkpoint's tensors.
            with torch.device("meta"):
                model = open_clip.create_model(model_name, pretrained=None, device="meta")
        visual = model.visual
        if not hasattr(getattr(visual, "trunk", None), "forward_intermediates"):
            raise ValueError(f"open_clip model {model_name!r} has no timm vision tower with forward_intermediates")
        depth = len(visual.trunk.blocks)
        self.blocks = tuple(int(b) for b in blocks)
        if any(not 1 <= b <= depth for b in self.blocks):
            raise ValueError(f"blocks {self.blocks} must lie in 1..{depth} (the tower has {depth} blocks)")
        if checkpoint is not None:
            self._load(visual, checkpoint, model_name)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.visual = visual.eval().requires_grad_(False)  # the text tower is dropped with `model`
        self.grayscale = grayscale
        # Declared output sizes (the local-encoder contract).
        self.vector_dims = {VECTOR_KEY: open_clip.get_model_config(model_name)["embed_dim"]}
        self.token_dims = {f"{TOKENS_PREFIX}{b}": visual.trunk.embed_dim for b in self.blocks}
        self.normalize_embedding = normalize_embedding

    @staticmethod
    def _load(visual: nn.Module, checkpoint: str | Path, model_name: str) -> None:
        """Strictly load ``checkpoint`` into a meta-device ``visual``; rebuild the buffers no checkpoint holds."""
        from timm.models._manipulate import reinit_non_persistent_buffers

        state = load_visual_state(checkpoint)
        pos = state.get("trunk.pos_embed")
        if pos is not None and pos.shape != visual.trunk.pos_embed.shape:
            raise ValueError(
                f"{checkpoint}: pos_embed {tuple(pos.shape)} does not fit {model_name} "
                f"({tuple(visual.trunk.pos_embed.shape)}); pick the model config the checkpoint was trained with"
            )
        visual.to_empty(device="cpu")
        visual.load_state_dict(state, strict=True)
        # Rotary tables are non-persistent buffers computed from the config (timm's own helper recomputes them);
        # any other buffer outside the state dict would stay uninitialised, so it is an error.
        rebuilt = set(reinit_non_persistent_buffers(visual))
        persistent = set(visual.state_dict())
        for name, _ in visual.named_buffers():
            owner = name.rpartition(".")[0]
            if name not in persistent and owner not in rebuilt:
                raise RuntimeError(f"buffer {name!r} of {model_name} is neither in the checkpoint nor recomputable")

    def train(self, mode: bool = True) -> EvaClipEncoder:
        return super().train(False)  # frozen feature extractor

    def preprocess(self, faces: Tensor) -> Tensor:
        """``(B, 3, H, W)`` parsed faces in [-1, 1] -> normalised model input ``(B, 3, S, S)``."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import resize

        x = (faces.float() + 1) / 2  # (B, 3, H, W) in [0, 1]
        if self.grayscale:
            x = to_gray(x)
        x = resize(x, list(self.image_size), interpolation=InterpolationMode.BICUBIC, antialias=True)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, faces: Tensor) -> IdentityFeatures:
        """Parsed faces ``(B, 3, H, W)`` in [-1, 1] -> ``clip`` ``(B, D_proj)``; ``clip_block{k}`` ``(B, 1 + N, D)``.

        Token maps keep the class token first, as the released code feeds them to its Q-Former.
        """
        x = self.preprocess(faces)
        trunk = self.visual.trunk
        final, states = trunk.forward_intermediates(
            x, indices=[b - 1 for b in self.blocks], return_prefix_tokens=True, output_fmt="NLC"
        )
        emb = self.visual.head(trunk.forward_head(final))  # (B, D_proj)
        if self.normalize_embedding:
            emb = F.normalize(emb, dim=-1)
        tokens = {
            f"{TOKENS_PREFIX}{b}": torch.cat([prefix, spatial], dim=1)  # (B, 1 + N, D), class token first
            for b, (spatial, prefix) in zip(self.blocks, states)
        }
        return IdentityFeatures(vectors={VECTOR_KEY: emb}, tokens=tokens)
