"""Typed tensor bundles passed between components (never positional tuples)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class FeatureSpec:
    """What a local encoder declares it emits: the one object fusers are built from.

    vectors: name -> width of each ``(B, D)`` vector, in emission order (e.g. ``{"arcface": 512, "clip": 768}``).
    tokens: name -> width of each ``(B, N, D)`` token map, in emission order.
    source: who declared it (named in errors, e.g. ``model/local_encoder=arcface_clip``).
    """

    vectors: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    source: str = "the local encoder"

    def __post_init__(self) -> None:
        for kind, dims in (("vector", self.vectors), ("token map", self.tokens)):
            for name, dim in dims.items():
                if not isinstance(dim, int) or dim < 1:
                    raise ValueError(f"{self.source} declares {kind} {name!r} of width {dim!r}; widths are ints >= 1")

    @property
    def id_dim(self) -> int:
        """Summed width of the vectors (what a fuser concatenating them takes)."""
        return sum(self.vectors.values())

    @property
    def vector_dims(self) -> list[int]:
        return list(self.vectors.values())

    @property
    def token_dims(self) -> list[int]:
        return list(self.tokens.values())

    @property
    def has_tokens(self) -> bool:
        return bool(self.tokens)

    def is_empty(self) -> bool:
        return not self.vectors and not self.tokens

    def check(self, features: IdentityFeatures) -> None:
        """Raise naming the difference when ``features`` are not what this spec declares."""
        got_v = {k: int(v.shape[-1]) for k, v in features.vectors.items()}
        got_t = {k: int(t.shape[-1]) for k, t in features.tokens.items()}
        if got_v != dict(self.vectors) or got_t != dict(self.tokens):
            raise ValueError(
                f"identity features {got_v} + token maps {got_t} are not what {self.source} declares "
                f"({dict(self.vectors)} + {dict(self.tokens)}); recompute cached features with this local encoder"
            )

    def random_features(self, batch_size: int, num_tokens: int = 4, generator: torch.Generator | None = None):
        """Features of the declared shapes filled with noise (contract tests, dry runs)."""
        g = generator
        return IdentityFeatures(
            vectors={k: torch.randn(batch_size, d, generator=g) for k, d in self.vectors.items()},
            tokens={k: torch.randn(batch_size, num_tokens, d, generator=g) for k, d in self.tokens.items()},
        )


@dataclass
class IdentityFeatures:
    """What a local encoder extracts from a reference face.

    vectors: named global descriptors, each ``(B, D)`` (e.g. ``arcface`` 512, ``clip`` 768).
    tokens: named token maps, each ``(B, N, D)``, in a stable order (e.g. ``clip_block4``..``clip_block20``,
        or ``arcface_penultimate`` = a spatial feature map flattened to tokens). Fusers treat each map as one scale.
    """

    vectors: dict[str, Tensor] = field(default_factory=dict)
    tokens: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        for t in (*self.vectors.values(), *self.tokens.values()):
            return t.shape[0]
        raise ValueError("IdentityFeatures is empty: the local encoder produced neither vectors nor tokens")

    def is_empty(self) -> bool:
        return not self.vectors and not self.tokens

    def to(self, *args, **kwargs) -> IdentityFeatures:
        return IdentityFeatures(
            vectors={k: v.to(*args, **kwargs) for k, v in self.vectors.items()},
            tokens={k: v.to(*args, **kwargs) for k, v in self.tokens.items()},
        )

    def index(self, idx: Tensor | slice) -> IdentityFeatures:
        return IdentityFeatures(
            vectors={k: v[idx] for k, v in self.vectors.items()},
            tokens={k: v[idx] for k, v in self.tokens.items()},
        )


@dataclass
class VideoBatch:
    """One training / evaluation batch.

    Images are float in [-1, 1], channels first. Keypoints are pixel ``(x, y)`` in the 5-point ArcFace order
    (left eye, right eye, nose, left mouth corner, right mouth corner), in the image they belong to.
    """

    video: Tensor  # (B, F, 3, H, W)
    caption: list[str]
    ref_face: Tensor  # (B, 3, H, W) reference rendered / taken outside the clip (cross-face reference)
    ref_kps: Tensor  # (B, 5, 2)
    ref_mask: Tensor  # (B, 1, H, W) face mask of the reference, {0, 1}
    intra_face: Tensor  # (B, 3, H, W) reference taken from inside the clip
    intra_kps: Tensor  # (B, 5, 2)
    intra_mask: Tensor  # (B, 1, H, W)
    kps: Tensor  # (B, F, 5, 2)
    face_mask: Tensor  # (B, F, 1, H, W), {0, 1}
    boxes: Tensor  # (B, F, 4) face boxes xyxy in pixels
    identity: Tensor  # (B,) long, identity index within its split
    clip_id: Tensor  # (B,) long, clip index within its split
    cached: dict[str, Tensor] = field(default_factory=dict)  # precomputed latents / text tokens / features

    @property
    def batch_size(self) -> int:
        return self.video.shape[0]

    def to(self, device: torch.device | str) -> VideoBatch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.to(device)
            elif f.name == "cached":
                v = {k: t.to(device) for k, t in v.items()}
            out[f.name] = v
        return replace(self, **out)
