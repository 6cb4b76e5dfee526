"""Reference faces as the release prepares them: the aligned 512 crop, parsed, with the released label set whitened.

Two pipelines, picked by name (``face_pipeline``):

- ``released``: diffusers' own ``pipelines.consisid.consisid_utils`` functions (``prepare_face_models`` and
  ``process_face_embeddings_infer``), so the inputs are the release's by construction: the photo resized to a 1024
  long side; insightface antelopev2 (SCRFD + glintr100) embeds the largest face; facexlib's RetinaFace picks the
  face nearest the image centre and aligns it to the FFHQ 512 template; facexlib's BiSeNet parsing whitens
  :data:`RELEASED_WHITE_LABELS`. Needs the optional extra (``pip install -e .[released]``: facexlib,
  consisid-eva-clip) and the weights under the published directory's ``face_encoder/`` (:data:`RELEASED_FILES`).
- ``mediapipe`` (default, no extra dependency): MediaPipe's detection and mesh; the five mesh keypoints aligned to
  the same FFHQ 512 template with the same estimator (OpenCV's partial affine, LMEDS) and warp; whitened outside
  the face oval, which also removes hair, ears and neck. What differs from ``released``, measured where it can be
  without the released weights, is in ``docs/reference_faces.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

FACE_PIPELINES = ("mediapipe", "released")
CROP_SIZE = 512
WHITE = 255
# BiSeNet labels the release whitens: background, cloth, hat, ears, earring, neck, necklace (hair, glasses kept).
# diffusers keeps this list inside process_face_embeddings; it is repeated here for the docs and the tests only.
RELEASED_WHITE_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)
# facexlib's FFHQ template for a 512 crop (FaceRestoreHelper, face_size=512, crop_ratio=(1, 1)): image-left eye,
# image-right eye, nose tip, image-left / image-right mouth corner, in crop pixels.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    np.float32,
)
ANTELOPE = "face_encoder/models/antelopev2"
# Everything prepare_face_models reads, relative to the published directory. facexlib downloads a missing .pth and
# insightface a missing antelopev2 folder: both are checked here first, so nothing is fetched.
RELEASED_FILES = (
    "face_encoder/detection_Resnet50_Final.pth",
    "face_encoder/parsing_parsenet.pth",  # loaded by facexlib's helper before diffusers swaps in BiSeNet
    "face_encoder/parsing_bisenet.pth",
    f"{ANTELOPE}/glintr100.onnx",
    "face_encoder/EVA02_CLIP_L_336_psz14_s6B.pt",
)
INSTALL_HINT = "pip install -e .[released]  (facexlib and consisid-eva-clip, pinned in pyproject.toml)"


def check_pipeline(name: str) -> str:
    if name not in FACE_PIPELINES:
        raise ValueError(
            f"face_pipeline={name!r} is not a face pipeline; pick one of {FACE_PIPELINES} ('released' needs "
            f"{INSTALL_HINT} and the published face_encoder/ weights)"
        )
    return name


def consisid_utils() -> Any:
    """diffusers' ``consisid_utils`` module; an ImportError saying how to install the extra when it is missing."""
    try:
        from diffusers.pipelines.consisid import consisid_utils as utils
    except ImportError as e:
        raise ImportError(f"face_pipeline=released needs the optional extra: {INSTALL_HINT} ({e})") from e
    return utils


def check_face_encoder(model_path: str | Path) -> Path:
    """The published directory, after checking that every face weight the release loads is in it."""
    root = Path(model_path)
    missing = [name for name in RELEASED_FILES if not (root / name).is_file()]
    ante = root / ANTELOPE
    detectors = [p for p in ante.glob("*.onnx") if p.name != "glintr100.onnx"] if ante.is_dir() else []
    if not detectors:
        missing.append(f"{ANTELOPE}/scrfd_10g_bnkps.onnx (or another antelopev2 detector .onnx)")
    if missing:
        raise FileNotFoundError(
            f"face_pipeline=released: {len(missing)} face weight file(s) not found under {root}: "
            + ", ".join(missing)
            + ". Point model_path at the published ConsisID directory (it carries them under face_encoder/), or use "
            "face_pipeline=mediapipe"
        )
    return root


@dataclass
class ReleasedFace:
    """One reference face as the release prepares it."""

    image: np.ndarray  # (512, 512, 3) uint8: the aligned crop, parsed labels white, colour
    id_cond: Tensor  # (1, 512 + D_clip): antelopev2 embedding (raw) and the L2-normalised EVA-CLIP embedding
    id_vit_hidden: list[Tensor]  # EVA-CLIP hidden states entering blocks 4, 8, 12, 16, 20
    kps: np.ndarray  # (5, 2) the release's face_kps (insightface's, else facexlib's), in `photo` pixels
    crop_kps: np.ndarray  # (5, 2) facexlib's five points mapped into the crop
    affine: np.ndarray  # (2, 3) photo pixels -> crop pixels
    mask: np.ndarray  # (512, 512) bool: what the parsing kept


class ReleasedFacePipeline:
    """diffusers' ``prepare_face_models`` on ``model_path`` and ``process_face_embeddings_infer`` per photo."""

    def __init__(self, model_path: str | Path, device: str | torch.device = "cpu", dtype=torch.float32) -> None:
        utils = consisid_utils()
        root = check_face_encoder(model_path)
        self.utils, self.device, self.dtype = utils, torch.device(device), dtype
        self.models = utils.prepare_face_models(str(root), self.device, dtype)

    @torch.no_grad()
    def __call__(self, photo: np.ndarray, source: str | Path | None = None) -> ReleasedFace:
        """``photo``: RGB uint8 ``(H, W, 3)``. A photo where facexlib finds no face raises ``NoFaceError``."""
        from consisid_lab.faces.analysis import NoFaceError, describe, to_rgb_uint8

        photo = to_rgb_uint8(photo)
        helper_1, helper_2, clip, app, mean, std = self.models
        try:
            id_cond, hidden, image, kps = self.utils.process_face_embeddings_infer(
                helper_1, clip, helper_2, mean, std, app, self.device, self.dtype, photo
            )
        except RuntimeError as e:
            if "align face fail" not in str(e):
                raise
            raise NoFaceError(
                f"no face found in {describe(photo, source)} by the release's facexlib RetinaFace; use a photo "
                "with a clearly visible, roughly frontal face"
            ) from e
        except IndexError as e:  # facexlib's landmarks list is empty when RetinaFace finds nothing
            where = describe(photo, source)
            raise NoFaceError(f"no face found in {where} by the release's facexlib RetinaFace") from e
        # The release works on the photo resized to a 1024 long side; report points in the photo's own pixels.
        s = _resize_scale(photo.shape[:2])
        affine = np.asarray(helper_1.affine_matrices[0], np.float64).copy()
        affine[:, :2] *= s  # photo -> resized photo -> crop
        landmarks = np.asarray(helper_1.all_landmarks_5[0], np.float64) / s
        crop = np.asarray(image, np.uint8)
        return ReleasedFace(
            image=crop,
            id_cond=id_cond,
            id_vit_hidden=list(hidden),
            kps=np.asarray(kps, np.float32) / s,
            crop_kps=(landmarks @ affine[:, :2].T + affine[:, 2]).astype(np.float32),
            affine=affine,
            mask=~(crop == WHITE).all(axis=-1),
        )


def _resize_scale(shape: tuple[int, int], long_side: int = 1024) -> float:
    """The factor ``resize_numpy_image_long`` applies (only shrinking; ``int`` sizes, so per axis it differs by
    less than a pixel: the long side's factor is used)."""
    h, w = shape
    if max(h, w) <= long_side:
        return 1.0
    k = long_side / max(h, w)
    return (int(w * k) if w >= h else int(h * k)) / max(h, w)


def ffhq_affine(kps: np.ndarray) -> np.ndarray:
    """The ``(2, 3)`` similarity taking five ArcFace-order points to the FFHQ 512 template, estimated as facexlib
    does (``cv2.estimateAffinePartial2D``, LMEDS)."""
    import cv2

    kps = np.asarray(kps, np.float32)
    if kps.shape != (5, 2):
        raise ValueError(f"alignment needs 5 keypoints (5, 2) in ArcFace order, got shape {kps.shape}")
    matrix = cv2.estimateAffinePartial2D(kps, FFHQ_TEMPLATE_512, method=cv2.LMEDS)[0]
    if matrix is None:
        raise ValueError(f"the keypoints {kps.tolist()} do not define an alignment (are they all the same point?)")
    return matrix


def mediapipe_crop(photo: np.ndarray, face) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``mediapipe`` pipeline's aligned 512 crop of ``face`` (a :class:`~consisid_lab.faces.analysis.FaceInfo`
    of ``photo``): ``(crop (512, 512, 3) uint8 white outside the face oval, kept mask (512, 512) bool, affine (2, 3)
    photo -> crop)``. The warp is facexlib's ``align_warp_face`` (bilinear, grey border BGR 135, 133, 132)."""
    import cv2

    affine = ffhq_affine(face.kps)
    size = (CROP_SIZE, CROP_SIZE)
    crop = cv2.warpAffine(photo, affine, size, borderMode=cv2.BORDER_CONSTANT, borderValue=(132, 133, 135))
    mask = cv2.warpAffine(face.mask.astype(np.uint8) * 255, affine, size, flags=cv2.INTER_LINEAR) > 127
    return np.where(mask[..., None], crop, WHITE).astype(np.uint8), mask, affine


def reference_crop(
    photo: np.ndarray,
    pipeline: str = "mediapipe",
    *,
    released: ReleasedFacePipeline | None = None,
    analyzer=None,
    face=None,
    source: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(crop (512, 512, 3) uint8, crop keypoints (5, 2), kept mask (512, 512) bool)`` of the reference face in
    ``photo`` by ``pipeline``. ``released`` needs a :class:`ReleasedFacePipeline`; ``mediapipe`` takes the
    ``face`` already chosen (else the largest one ``analyzer`` finds)."""
    check_pipeline(pipeline)
    if pipeline == "released":
        if released is None:
            raise ValueError("face_pipeline=released needs the released face models (a ReleasedFacePipeline)")
        out = released(photo, source=source)
        return out.image, out.crop_kps, out.mask
    from consisid_lab.faces.analysis import FaceAnalyzer, to_rgb_uint8

    photo = to_rgb_uint8(photo)
    if face is None:
        if analyzer is None:
            with FaceAnalyzer() as own:
                face = own.analyze(photo, source=source)
        else:
            face = analyzer.analyze(photo, source=source)
    crop, mask, affine = mediapipe_crop(photo, face)
    kps = (face.kps.astype(np.float64) @ affine[:, :2].T + affine[:, 2]).astype(np.float32)
    return crop, kps, mask


def to_video_size(crop: np.ndarray, kps: np.ndarray, mask: np.ndarray, height: int, width: int):
    """The 512 crop resized to ``height x width`` as the released pipeline feeds it (a plain resize, aspect not
    kept): ``(image (H, W, 3) uint8, keypoints (5, 2), mask (H, W) bool)``; pixel centres at integers. The mask is
    where the crop's mask covers most of a pixel; the image is white outside it (boundary pixels inside it keep the
    resize's blend with the white)."""
    import cv2

    sx, sy = width / crop.shape[1], height / crop.shape[0]
    image = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)
    small = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA) > 0.5
    image[~small] = WHITE
    points = (np.asarray(kps, np.float32) + 0.5) * np.array([sx, sy], np.float32) - 0.5
    return image, points.astype(np.float32), small
