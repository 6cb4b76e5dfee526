"""The paper's local facial extractor on real faces: insightface ArcFace + EVA-CLIP, fed from one face selection.

Each reference image is analysed once with MediaPipe (:class:`~consisid_lab.faces.analysis.FaceAnalyzer`) and one
face is picked by ``face_policy``; ArcFace then sees that face aligned to its 112x112 template and CLIP sees the same
face parsed (everything outside the face oval whitened). The released code detects separately in insightface and in
facexlib with different policies, so a group photo can send two different people to the two encoders; here both
encoders always see the same person.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from consisid_lab.faces.analysis import (
    FaceAnalyzer,
    FaceInfo,
    FacePolicy,
    LazyFaceAnalyzer,
    align_face,
    parse_face,
    select_face,
    to_rgb_uint8,
)
from consisid_lab.models.local_encoder import ArcFaceLayer, LocalEncoder
from consisid_lab.types import FeatureSpec, IdentityFeatures

log = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "EVA02-L-14-336"
DEFAULT_CLIP_BLOCKS = (4, 8, 12, 16, 20)


def has_real_weights(arcface_dir: str | None, clip_checkpoint: str | None, clip_random_init: bool = False) -> bool:
    """Whether a :class:`RealFaceLocalEncoder` config names anything to load (else callers fall back to stand-ins)."""
    return bool(arcface_dir) or bool(clip_checkpoint) or bool(clip_random_init)


class RealFaceLocalEncoder(LazyFaceAnalyzer, LocalEncoder):
    """ArcFace (insightface ONNX pack) and/or EVA-CLIP (open_clip) behind the :class:`LocalEncoder` interface.

    Args:
        arcface_dir: insightface model directory (``antelopev2`` or ``buffalo_l``); ``None`` drops the ArcFace half.
        clip_checkpoint: EVA-CLIP or open_clip checkpoint file; ``None`` drops the CLIP half.
        arcface_layer: ``last`` (the 512-d embedding), ``penultimate`` (the spatial map as tokens instead) or
            ``both``.
        clip_blocks: CLIP hidden states entering these blocks become token maps.
        face_policy: which face of a multi-face image is used (``largest``, ``center``, ``highest_score``).
        clip_model_name: open_clip model config of the checkpoint.
        clip_random_init: build the CLIP tower with random weights when no checkpoint is given (tests, timing).
        onnx_cache_dir: where the ArcFace graph with the penultimate output is cached.
    """

    def __init__(
        self,
        arcface_dir: str | Path | None = None,
        clip_checkpoint: str | Path | None = None,
        arcface_layer: ArcFaceLayer = "last",
        clip_blocks: Sequence[int] = DEFAULT_CLIP_BLOCKS,
        face_policy: FacePolicy = "largest",
        clip_model_name: str = DEFAULT_CLIP_MODEL,
        clip_random_init: bool = False,
        onnx_cache_dir: str | Path | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        super().__init__()
        if not has_real_weights(arcface_dir, clip_checkpoint, clip_random_init):
            raise ValueError(
                "RealFaceLocalEncoder has no weights configured: set arcface_dir=<insightface model dir> and/or "
                "clip_checkpoint=<EVA-CLIP .pt>, or use model/local_encoder=arcface_clip (the stand-in encoders)"
            )
        self.face_policy = face_policy
        # Where the weights came from (the export task copies them to the published face_encoder/ folder).
        self.arcface_dir = str(arcface_dir) if arcface_dir else None
        self.clip_checkpoint = str(clip_checkpoint) if clip_checkpoint else None
        self.arcface = None
        if arcface_dir:
            from consisid_lab.faces.arcface import InsightFaceArcFace

            self.arcface = InsightFaceArcFace(
                arcface_dir,
                providers=tuple(providers),
                layer=arcface_layer,
                cache_dir=onnx_cache_dir,
                face_policy=face_policy,
            )
        self.clip = None
        if clip_checkpoint or clip_random_init:
            from consisid_lab.faces.eva_clip import EvaClipEncoder

            self.clip = EvaClipEncoder(clip_checkpoint or None, model_name=clip_model_name, blocks=tuple(clip_blocks))
        vectors: dict[str, int] = {}
        tokens: dict[str, int] = {}
        for part in (self.arcface, self.clip):
            if part is not None:
                vectors.update(part.vector_dims)
                tokens.update(part.token_dims)
        self.spec = FeatureSpec(
            vectors, tokens, source=f"model/local_encoder=insightface_evaclip (arcface_layer={arcface_layer})"
        )
        self._analyzer: FaceAnalyzer | None = None
        self.eval()

    def train(self, mode: bool = True) -> RealFaceLocalEncoder:
        return super().train(False)  # frozen feature extractor

    def select(self, image: np.ndarray, source: str | Path | None = None) -> FaceInfo:
        """The one face every encoder sees; :class:`NoFaceError` naming ``source`` when the image holds none."""
        return select_face(self.analyzer(image), self.face_policy, source=source)

    def encode_faces(self, images: Sequence[np.ndarray], faces: Sequence[FaceInfo]) -> IdentityFeatures:
        """Features of RGB ``uint8`` images with their already selected faces (one per image)."""
        if len(images) != len(faces):
            raise ValueError(f"got {len(images)} images but {len(faces)} faces; pass one selected face per image")
        feats = IdentityFeatures()
        if self.arcface is not None:
            aligned = np.stack([align_face(im, f.kps) for im, f in zip(images, faces)])  # (B, 112, 112, 3)
            arc = self.arcface.features(aligned)
            feats.vectors.update(arc.vectors)
            feats.tokens.update(arc.tokens)
        if self.clip is not None:
            parsed = np.stack([parse_face(im, f) for im, f in zip(images, faces)])  # (B, H, W, 3), white outside
            x = torch.from_numpy(parsed).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
            clip = self.clip(x)
            feats.vectors.update(clip.vectors)
            feats.tokens.update(clip.tokens)
        return feats

    @torch.no_grad()
    def forward(self, face: Tensor) -> IdentityFeatures:
        """Reference images ``(B, 3, H, W)`` in [-1, 1] -> features; :class:`NoFaceError` for an image without one."""
        images = [to_rgb_uint8(f) for f in face]
        faces = [self.select(im, source=f"reference image {i} of the batch") for i, im in enumerate(images)]
        return self.encode_faces(images, faces).to(device=face.device)

    @torch.no_grad()
    def encode_image(self, image: np.ndarray | str | Path) -> IdentityFeatures:
        """Features of the policy's face in one photo (an RGB array or a path): one row."""
        from consisid_lab.faces.analysis import load_image

        source = image if isinstance(image, (str, Path)) else None
        image = load_image(image) if source is not None else to_rgb_uint8(image)
        return self.encode_faces([image], [self.select(image, source=source)])
