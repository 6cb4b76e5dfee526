"""Local (high-frequency) facial encoders: a face image -> ``IdentityFeatures``.

The embedded benchmark uses stand-in encoders trained on synthetic identities (an ArcFace-loss identity
network and a small open_clip CLIP); the real insightface / EVA-CLIP encoders implement the same interface.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, nn

from consisid_lab.types import FeatureSpec, IdentityFeatures

log = logging.getLogger(__name__)

ArcFaceLayer = Literal["last", "penultimate", "both"]
ARCFACE_LAYERS = ("last", "penultimate", "both")


def arcface_outputs(layer: str) -> tuple[bool, bool]:
    """``(embedding, spatial map)`` that ``arcface_layer`` asks for: ``last`` the 512-d embedding (the released
    code), ``penultimate`` the spatial map instead of it (the paper's ablation), ``both`` the two."""
    if layer not in ARCFACE_LAYERS:
        raise ValueError(f"arcface_layer must be one of {list(ARCFACE_LAYERS)}, got {layer!r}")
    return layer in ("last", "both"), layer in ("penultimate", "both")


class LocalEncoder(nn.Module):
    """Interface: frozen feature extractor. ``spec`` (a :class:`FeatureSpec`) declares what ``forward`` returns;
    fusers are built from it alone."""

    frozen = True  # declared: trainable selectors never unfreeze it
    spec: FeatureSpec

    def forward(self, face: Tensor) -> IdentityFeatures:  # face: (B, 3, H, W) in [-1, 1]
        raise NotImplementedError

    @property
    def vector_dims(self) -> dict[str, int]:
        return dict(self.spec.vectors)

    @property
    def token_dims(self) -> dict[str, int]:
        return dict(self.spec.tokens)

    @property
    def has_tokens(self) -> bool:
        return self.spec.has_tokens


class NoLocalEncoder(LocalEncoder):
    """No high-frequency route (the paper's plan b)."""

    def __init__(self) -> None:
        super().__init__()
        self.spec = FeatureSpec(source="model/local_encoder=none")

    def forward(self, face: Tensor) -> IdentityFeatures:
        return IdentityFeatures()


class PrecomputedFeatures(LocalEncoder):
    """Features computed outside the model (the released pipeline's face preprocessing: ``id_cond`` and the CLIP
    hidden states ``vit_{k}``), declared here so that the fuser is built for them."""

    def __init__(self, vector_dims: dict[str, int], token_dims: dict[str, int]) -> None:
        super().__init__()
        self.spec = FeatureSpec(dict(vector_dims), dict(token_dims), source="the published face encoder")

    def forward(self, face: Tensor) -> IdentityFeatures:
        raise RuntimeError(
            f"this model's identity features ({list(self.vector_dims)} + {list(self.token_dims)}) are computed "
            "outside it (consisid_lab.models.published.PublishedFaceEncoder); pass them as features="
        )


class StandInLocalEncoder(LocalEncoder):
    """ArcFace-loss identity network and/or small CLIP from the stand-in cache (built on first use).

    ``arcface_layer='last'`` gives the final embedding as the vector ``arcface`` (the released code's choice);
    ``'penultimate'`` gives the last spatial feature map as the token map ``arcface_penultimate`` instead (the
    paper's choice: it keeps spatial information), fused as one more scale; ``'both'`` gives the two.
    CLIP gives the projected embedding ``clip`` and the hidden states of ``clip_layers`` as token maps.
    """

    def __init__(
        self,
        arcface: bool = True,
        clip: bool = True,
        arcface_layer: ArcFaceLayer = "last",
        clip_layers: list[int] | None = None,
        cache_dir: str | None = None,
        image_size: int = 64,
        recipe: str = "default",
    ) -> None:
        super().__init__()
        if not (arcface or clip):
            raise ValueError(
                "StandInLocalEncoder needs arcface=True or clip=True; for no local route use model/local_encoder=none"
            )
        self._arc_embedding, self._arc_map = arcface_outputs(arcface_layer)
        from consisid_lab.encoders.recipes import named_recipe
        from consisid_lab.encoders.store import load_standins

        standins = load_standins(cache_dir, recipe=named_recipe(recipe))
        self.use_arcface = arcface
        self.use_clip = clip
        self.arcface_layer = arcface_layer
        self.clip_layers = list(clip_layers) if clip_layers is not None else None
        self.identity_net = standins.identity_net if arcface else None
        self.clip = standins.clip if clip else None
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        # Dimensions are read off one dry forward so the fuser can be built with explicit sizes.
        with torch.no_grad():
            probe = self._extract(torch.zeros(1, 3, image_size, image_size))
        self.spec = FeatureSpec(
            {k: int(v.shape[-1]) for k, v in probe.vectors.items()},
            {k: int(v.shape[-1]) for k, v in probe.tokens.items()},
            source=f"the stand-in local encoder (arcface={arcface}, clip={clip}, arcface_layer={arcface_layer})",
        )
        self.token_counts = {k: v.shape[1] for k, v in probe.tokens.items()}

    def train(self, mode: bool = True) -> StandInLocalEncoder:
        # Frozen feature extractor: stays in eval mode (BatchNorm statistics fixed) whatever the trainer does.
        return super().train(False)

    def _extract(self, face: Tensor) -> IdentityFeatures:
        feats = IdentityFeatures()
        if self.identity_net is not None:
            if self._arc_embedding:
                feats.vectors["arcface"] = self.identity_net.embed(face)  # (B, D_id)
            if self._arc_map:
                feats.tokens["arcface_penultimate"] = self.identity_net.tokens(face)  # (B, h*w, C)
        if self.clip is not None:
            embedding, hidden = self.clip.encode(face)  # (B, D_clip), {name: (B, N, D_vit)}
            feats.vectors["clip"] = embedding
            for name, tokens in hidden.items():
                if self.clip_layers is None or _layer_index(name) in self.clip_layers:
                    feats.tokens[f"clip_{name}" if not name.startswith("clip") else name] = tokens
        return feats

    @torch.no_grad()
    def forward(self, face: Tensor) -> IdentityFeatures:
        return self._extract(face)


def _layer_index(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else -1
