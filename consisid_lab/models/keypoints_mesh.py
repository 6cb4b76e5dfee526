"""The ``mesh`` keypoint renderer: MediaPipe's 478-point face mesh drawn as an RGB image.

A denser alternative to the five-point drawing for the low-frequency route: the face contours (oval, eyes, brows,
lips, irises) or the full tesselation, drawn on a black canvas in [-1, 1] like every image in the project. It runs
MediaPipe on the image itself (the given 5 keypoints are not needed) and picks the face with the project's one
selection policy, so it draws the same person the encoders see.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from consisid_lab.faces.analysis import FaceAnalyzer, FacePolicy, to_rgb_uint8
from consisid_lab.models.keypoints import KeypointRenderer

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


class MeshKeypointRenderer(KeypointRenderer):
    """``forward(image (B, 3, H, W) in [-1, 1], kps unused) -> (B, 3, H, W)`` in [-1, 1].

    Raises :class:`~consisid_lab.faces.analysis.NoFaceError` for an image without a face.

    Args:
        style: ``contours`` (regions only) or ``tesselation`` (the whole mesh, contours on top).
        face_policy: which face to draw when there are several.
    """

    def __init__(self, style: MeshStyle = "contours", face_policy: FacePolicy = "largest") -> None:
        super().__init__()
        if style not in ("contours", "tesselation"):
            raise ValueError(f"mesh style must be 'contours' or 'tesselation', got {style!r}")
        self.style = style
        self.face_policy = face_policy
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
        out = []
        for i, img in enumerate(image):
            rgb = to_rgb_uint8(img)
            face = self._analyzer.analyze(rgb, self.face_policy, source=f"image {i} of the batch")
            out.append(torch.from_numpy(self.draw(face.mesh, rgb.shape[:2])))
        canvas = torch.stack(out).permute(0, 3, 1, 2).to(image.device, torch.float32)  # (B, 3, H, W) in [0, 255]
        return (canvas / 127.5 - 1).to(image.dtype)
