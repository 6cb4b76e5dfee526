"""Stand-in CLIP: a small open_clip model built from a custom config and trained on (face, attribute caption).

It plays the role of the paper's EVA02-CLIP image encoder: a projected image embedding plus the hidden
states entering chosen ViT blocks, computed on the grayscale face (the paper feeds the parsed face in
grayscale).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from consisid_lab.encoders.identity_net import resize_to

# ITU-R BT.601 luma weights, the usual RGB -> grayscale conversion.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass
class TinyClipConfig:
    """Architecture of the stand-in CLIP (both towers) and which hidden states it exposes."""

    image_size: int = 64
    patch_size: int = 16  # a 4 x 4 token grid: a quarter of the cost of 8 x 8 patches at 64 x 64
    width: int = 96
    layers: int = 6
    heads: int = 4
    embed_dim: int = 64
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    context_length: int = 64  # benchmark attribute captions take up to ~55 tokens
    # Hidden states *entering* these blocks (1-based like the paper's 4, 8, 12, 16, 20 of EVA02-L's 24),
    # i.e. the outputs of blocks ``b - 1``.
    hidden_blocks: tuple[int, ...] = (1, 2, 3, 4, 5)

    def __post_init__(self) -> None:
        self.hidden_blocks = tuple(int(b) for b in self.hidden_blocks)
        bad = [b for b in self.hidden_blocks if not 1 <= b < self.layers]
        if bad:
            raise ValueError(
                f"tiny CLIP hidden_blocks {bad} out of range: the hidden state entering block b exists for "
                f"1 <= b < layers={self.layers}"
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"tiny CLIP image_size={self.image_size} must be a multiple of patch_size={self.patch_size}"
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden_blocks": list(self.hidden_blocks)}

    def open_clip_config(self) -> dict:
        """The model config in open_clip's JSON schema."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "layers": self.layers,
                "width": self.width,
                "head_width": self.width // self.heads,
                "patch_size": self.patch_size,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": 49408,  # open_clip's SimpleTokenizer vocabulary (shipped with the package)
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }

    def registry_name(self) -> str:
        """open_clip registry name; the config hash keeps different sizes apart in the global registry."""
        digest = hashlib.sha256(json.dumps(self.open_clip_config(), sort_keys=True).encode()).hexdigest()[:10]
        return f"consisid_tiny_clip_{digest}"


def register_config(config: TinyClipConfig, directory: str | Path | None = None) -> str:
    """Write the open_clip JSON config as ``<name>.json`` and register it; returns the registry name."""
    import open_clip

    name = config.registry_name()
    if directory is None:
        directory = tempfile.mkdtemp(prefix="consisid_tiny_clip_")
    path = Path(directory) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.open_clip_config(), indent=2))
    open_clip.add_model_config(path)  # registry name = file stem
    return name


def to_grayscale(x: Tensor) -> Tensor:
    """``(B, 3, H, W)`` -> luma replicated on 3 channels, same value range."""
    w = x.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)


class TinyClip(nn.Module):
    """open_clip CLIP with the project's face interface: ``encode(x) -> (embedding, hidden states)``."""

    def __init__(self, config: TinyClipConfig | None = None, config_dir: str | Path | None = None) -> None:
        super().__init__()
        import open_clip

        self.config = config or TinyClipConfig()
        self.registry_name = register_config(self.config, config_dir)
        # pretrained=None: weights come from our own training (or a safetensors file), never a download.
        self.model, _, _ = open_clip.create_model_and_transforms(self.registry_name, pretrained=None)
        self._tokenizer = open_clip.get_tokenizer(self.registry_name)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def hidden_names(self) -> list[str]:
        return [f"block{b}" for b in self.config.hidden_blocks]

    @property
    def num_tokens(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2 + 1  # + class token

    def prepare(self, x: Tensor) -> Tensor:
        """Face ``(B, 3, H, W)`` in [-1, 1] -> grayscale, resized model input."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"tiny CLIP expects images (B, 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        return to_grayscale(resize_to(x, self.config.image_size))

    def encode(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(projected embedding (B, D_embed), {"block<b>": (B, 1 + N, D) hidden state entering block b})``.

        Token maps keep the class token first, like the paper's 577 = 1 + 24 * 24 EVA02 tokens.
        """
        out = self.model.visual.forward_intermediates(
            self.prepare(x),
            indices=[b - 1 for b in self.config.hidden_blocks],
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        hidden = {
            name: torch.cat([prefix, patches], dim=1)
            for name, prefix, patches in zip(
                self.hidden_names, out["image_intermediates_prefix"], out["image_intermediates"]
            )
        }
        return out["image_features"], hidden

    def encode_image(self, x: Tensor) -> Tensor:
        """L2-normalised projected image embedding ``(B, D_embed)``."""
        return F.normalize(self.model.encode_image(self.prepare(x)), dim=-1)

    def encode_text(self, captions: list[str]) -> Tensor:
        """L2-normalised projected text embedding ``(B, D_embed)``."""
        tokens = self._tokenizer(captions).to(self.model.logit_scale.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    def hparams(self) -> dict:
        return self.config.to_dict()
