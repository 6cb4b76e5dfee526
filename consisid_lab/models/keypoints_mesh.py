"""The ``mesh`` keypoint renderer: MediaPipe's 478-point face mesh drawn as an RGB image.

A denser alternative to the five-point drawing for the low-frequency route: the face contours (oval, eyes, brows,
lips, irises) or the full tesselation, drawn on a black canvas in [-1, 1] like every image in the project. It runs
MediaPipe on the image itself (the given 5 keypoints are not needed) and picks the face with the project's one
selection policy, so it draws the same person the encoders see.

MediaPipe misses some faces that the data vouches for (on the benchmark's 32 x 32 references, one in six at the
default seeds; upscaling the image does not recover them). A training step must not die on one of them, so by default
such an image gets the five-point drawing of the keypoints the batch carries (``on_no_face="five_point"``, counted in
``fallbacks`` and logged once); ``on_no_face="raise"`` raises :class:`~consisid_lab.faces.analysis.NoFaceError`.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from consisid_lab.faces.analysis import FaceAnalyzer, FacePolicy, NoFaceError, to_rgb_uint8
from consisid_lab.models.keypoints import FivePointRenderer, KeypointRenderer

logger = logging.getLogger(__name__)

# RGB per facial region (uint8, for cv2): regions stay distinguishable after VAE encoding.
REGION_COLORS: dict[str, tuple[int, int, int]] = {
    "FACEMESH_TESSELATION": (96, 96, 96),
    "FACEMESH_FACE_OVAL": (255, 255, 255),
    "FACEMESH_LEFT_EYEBROW": (0, 255, 0),
    "FACEMESH_RIGHT_EYEBROW": (255, 0, 0),
    "FACEMESH_LEFT_EYE": (0, 255, 0),
    "FACEMESH_RIGHT_EYE": (255, 0, 0),
    "FACEMESH_LEFT_IRIS": (0, 255, 255),
    "FACEMESH_RIGHT_IRIS": (255, 255, 0),
    "FACEMESH_LIPS": (255, 0, 255),
}
CONTOUR_REGIONS = tuple(k for k in REGION_COLORS if k != "FACEMESH_TESSELATION")
# Line width as a fraction of the shorter image side (floored at one pixel for tiny frames).
LINE_WIDTH = 1 / 256

MeshStyle = Literal["contours", "tesselation"]
NoFacePolicy = Literal["five_point", "raise"]


class MeshKeypointRenderer(KeypointRenderer):
    """``forward(image (B, 3, H, W) in [-1, 1], kps unused) -> (B, 3, H, W)`` in [-1, 1].

    Args:
        style: ``contours`` (regions only) or ``tesselation`` (the whole mesh, contours on top).
        face_policy: which face to draw when there are several.
        on_no_face: an image where MediaPipe finds no face gets the five-point drawing of its ``kps``
            (``five_point``), or raises :class:`~consisid_lab.faces.analysis.NoFaceError` (``raise``).
    """

    def __init__(
        self,
        style: MeshStyle = "contours",
        face_policy: FacePolicy = "largest",
        on_no_face: NoFacePolicy = "five_point",
    ) -> None:
        super().__init__()
        if style not in ("contours", "tesselation"):
            raise ValueError(f"mesh style must be 'contours' or 'tesselation', got {style!r}")
        if on_no_face not in ("five_point", "raise"):
            raise ValueError(f"on_no_face must be 'five_point' or 'raise', got {on_no_face!r}")
        self.style = style
        self.face_policy = face_policy
        self.on_no_face = on_no_face
        self.fallback = FivePointRenderer()
        self.fallbacks = 0  # images drawn by the fallback so far
        self._analyzer: FaceAnalyzer | None = None

    def __getstate__(self) -> dict:
        # MediaPipe graphs do not pickle (DDP spawn, dataloader workers): each process opens its own.
        state = self.__dict__.copy()
        state["_analyzer"] = None
        return state

    def _regions(self) -> list[tuple[frozenset, tuple[int, int, int]]]:
        import mediapipe as mp

        names = (("FACEMESH_TESSELATION",) if self.style == "tesselation" else ()) + CONTOUR_REGIONS
        return [(getattr(mp.solutions.face_mesh, n), REGION_COLORS[n]) for n in names]

    def draw(self, mesh: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """The mesh ``(478, 2)`` drawn on a black ``(H, W, 3)`` uint8 canvas."""
        import cv2

        h, w = size
        canvas = np.zeros((h, w, 3), np.uint8)
        width = max(1, round(min(h, w) * LINE_WIDTH))
        # cv2 draws with integer coordinates; 4 fractional bits keep sub-pixel positions on small frames
        shift = 4
        pts = np.round(mesh * (1 << shift)).astype(np.int32)
        for edges, color in self._regions():
            for a, b in edges:
                cv2.line(canvas, tuple(pts[a]), tuple(pts[b]), color, width, cv2.LINE_AA, shift)
        return canvas

    def forward(self, image: Tensor, kps: Tensor | None = None) -> Tensor:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
        if self._analyzer is None:
            self._analyzer = FaceAnalyzer()
        out: list[Tensor] = []
        for i, img in enumerate(image):
            rgb = to_rgb_uint8(img)
            try:
                face = self._analyzer.analyze(rgb, self.face_policy, source=f"image {i} of the batch")
            except NoFaceError:
                if self.on_no_face == "raise" or kps is None:
                    raise
                if self.fallbacks == 0:
                    logger.warning(
                        "mesh keypoint renderer: no face found in a %dx%d image; drawing its 5 keypoints instead "
                        "(further cases counted in .fallbacks)",
                        *rgb.shape[:2],
                    )
                self.fallbacks += 1
                drawn = self.fallback(img[None].float(), kps[i : i + 1].float())[0]  # (3, H, W) in [-1, 1]
                out.append(((drawn.cpu() + 1) * 127.5).permute(1, 2, 0))
                continue
            out.append(torch.from_numpy(self.draw(face.mesh, rgb.shape[:2])).float())
        canvas = torch.stack(out).permute(0, 3, 1, 2).to(image.device, torch.float32)  # (B, 3, H, W) in [0, 255]
        return (canvas / 127.5 - 1).to(image.dtype)
