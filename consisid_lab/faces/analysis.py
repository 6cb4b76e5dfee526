"""MediaPipe face analysis: detection, the 478-point mesh, ArcFace-order keypoints, a face mask and alignment.

This is the project's one face analyser: every encoder (ArcFace, CLIP, CurricularFace, keypoint renderers) is fed
from the same :class:`FaceInfo`, picked once by :func:`select_face`, so a group photo never sends one person to one
encoder and another person to the next.

MediaPipe 0.10.21 ships its face detection and face mesh models inside the wheel, so nothing is downloaded.
Detection runs on the whole image (it finds small faces); the mesh then runs on a square crop around each detected
face, which ties every mesh to its detection and keeps small faces large enough for the mesh model.

Images are RGB ``uint8`` arrays ``(H, W, 3)`` (a grayscale ``(H, W)`` or ``(H, W, 1)`` array is replicated to three
channels). Points are pixel ``(x, y)``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

# --- MediaPipe face-mesh landmark indices (named, so the keypoint order is readable) ---------------------------
# MediaPipe names eyes anatomically ("right" = the subject's right); in a frontal photo the subject's right eye is on
# the image left, which is where insightface's ArcFace template puts its first ("left") keypoint.
MESH_IRIS_CENTER_IMAGE_LEFT = 468  # subject's right iris centre (refined mesh only)
MESH_IRIS_CENTER_IMAGE_RIGHT = 473  # subject's left iris centre (refined mesh only)
MESH_NOSE_TIP = 1
MESH_MOUTH_CORNER_IMAGE_LEFT = 61
MESH_MOUTH_CORNER_IMAGE_RIGHT = 291
NUM_MESH_POINTS_REFINED = 478  # 468 face points + 2 x 5 iris points

# The 5-point ArcFace order (insightface's template): left eye, right eye, nose tip, left / right mouth corner,
# where "left" is the image left of a frontal face.
ARCFACE_KEYPOINT_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
ARCFACE_SIZE = 112

# A square crop of this many detection-box sides around the box centre is what the mesh model sees.
MESH_CROP_SCALE = 2.0
# With ``mesh_agreement``, a detection is a face only if the mesh fitted in its box agrees with the detector's own eye
# and nose keypoints to this share of the box side. On real faces (scikit-image's astronaut, cut and scaled) the worst
# disagreement measured is 0.10; on the cat photo (scikit-image's chelsea), where the detector sees faces in fur in one
# crop in three, at least 0.19: the mesh model draws a face into any crop, but not where the detector put the eyes.
# The benchmark's procedural faces reach 0.27 (at 128 px), so the check is off by default and on for real clips.
MESH_AGREEMENT = 0.15
# The detector's keypoints that the mesh is checked against (MediaPipe order: image-left eye, image-right eye, nose
# tip, mouth centre, two ear tragions), and the ArcFace-order mesh keypoints they correspond to.
DETECTOR_EYES_NOSE = (0, 1, 2)
ARCFACE_EYES_NOSE = (0, 1, 2)
# MediaPipe's full-range detector (model 1) finds faces up to ~5 m away; the short-range one (model 0) is better on
# close-ups. The first that finds a face wins.
DETECTOR_MODELS = (1, 0)

FacePolicy = Literal["largest", "center", "highest_score"]
FACE_POLICIES: tuple[str, ...] = ("largest", "center", "highest_score")


class NoFaceError(ValueError):
    """Raised when an image holds no detectable face."""


@dataclass
class FaceInfo:
    """One analysed face, in the pixel coordinates of the image it came from."""

    box: np.ndarray  # (4,) float xyxy, clipped to the image
    score: float  # detector confidence in [0, 1]
    mesh: np.ndarray | None  # (478, 2) float (x, y) MediaPipe face-mesh points; None from a box+keypoint detector
    kps: np.ndarray  # (5, 2) float (x, y) in ArcFace order, see ARCFACE_KEYPOINT_NAMES
    image_size: tuple[int, int]  # (H, W) of the source image
    _mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return float(max(x1 - x0, 0.0) * max(y1 - y0, 0.0))

    @property
    def center(self) -> np.ndarray:
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2])

    @property
    def mask(self) -> np.ndarray:
        """Filled face-oval polygon, ``(H, W)`` bool: forehead to chin, without hair, ears and neck."""
        if self.mesh is None:
            raise ValueError("this face came from a detector without a face mesh; analyse it with FaceAnalyzer")
        if self._mask is None:
            self._mask = face_oval_mask(self.mesh, self.image_size)
        return self._mask


def _solutions():
    try:
        import mediapipe as mp
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("face analysis needs mediapipe==0.10.21: pip install 'mediapipe==0.10.21'") from e
    return mp.solutions


@functools.cache
def face_oval_polygon() -> tuple[int, ...]:
    """Mesh indices of the face oval, in order around the face (chained from MediaPipe's oval edge set)."""
    edges = list(_solutions().face_mesh.FACEMESH_FACE_OVAL)
    nxt = dict(edges)
    start = min(nxt)
    order = [start]
    while (n := nxt[order[-1]]) != start:
        order.append(n)
    assert len(order) == len(edges), "MediaPipe's face oval is not a single closed loop"
    return tuple(order)


def face_oval_mask(mesh: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Fill the face-oval polygon of ``mesh`` ``(N, 2)`` into a ``(H, W)`` bool mask."""
    import cv2

    h, w = image_size
    poly = np.round(mesh[list(face_oval_polygon())]).astype(np.int32)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [poly], 1)
    return mask.astype(bool)


def arcface_keypoints(mesh: np.ndarray) -> np.ndarray:
    """The five ArcFace-order keypoints ``(5, 2)`` from a face mesh ``(468 or 478, 2)``.

    Eyes are the iris centres on a refined mesh, else the mean of the eye contour.
    """
    if mesh.shape[0] >= NUM_MESH_POINTS_REFINED:
        eye_l, eye_r = mesh[MESH_IRIS_CENTER_IMAGE_LEFT], mesh[MESH_IRIS_CENTER_IMAGE_RIGHT]
    else:
        fm = _solutions().face_mesh
        eye_l = mesh[sorted({i for e in fm.FACEMESH_RIGHT_EYE for i in e})].mean(0)
        eye_r = mesh[sorted({i for e in fm.FACEMESH_LEFT_EYE for i in e})].mean(0)
    return np.stack(
        [
            eye_l,
            eye_r,
            mesh[MESH_NOSE_TIP],
            mesh[MESH_MOUTH_CORNER_IMAGE_LEFT],
            mesh[MESH_MOUTH_CORNER_IMAGE_RIGHT],
        ]
    ).astype(np.float32)


def to_rgb_uint8(image) -> np.ndarray:
    """An RGB ``uint8`` ``(H, W, 3)`` array from a numpy image or a torch ``(3, H, W)`` tensor in [-1, 1]."""
    if hasattr(image, "detach"):  # torch tensor, channels first, in [-1, 1] (the project's image convention)
        t = image.detach().float().cpu()
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"expected an image tensor (3, H, W) in [-1, 1], got shape {tuple(t.shape)}")
        image = ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image (H, W, 3) or grayscale (H, W), got shape {image.shape}")
    image = image[..., :3]
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.max(initial=0) <= 1.0:
            image = image * 255.0
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB ``uint8`` ``(H, W, 3)``."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def describe(image: np.ndarray, source: str | Path | None) -> str:
    return str(source) if source is not None else f"the image of shape {tuple(np.shape(image))}"


def select_face(
    faces: list[FaceInfo], policy: FacePolicy = "largest", *, source: str | Path | None = None
) -> FaceInfo:
    """Pick one face: the largest box, the box centre nearest the image centre, or the highest detector score."""
    if policy not in FACE_POLICIES:
        raise ValueError(f"unknown face selection policy {policy!r}; pick one of {FACE_POLICIES}")
    if not faces:
        raise NoFaceError(
            f"no face found in {source if source is not None else 'the image'}; use a photo with a clearly "
            "visible, roughly frontal face"
        )
    if policy == "largest":
        return max(faces, key=lambda f: f.area)
    if policy == "highest_score":
        return max(faces, key=lambda f: f.score)
    h, w = faces[0].image_size
    mid = np.array([w / 2, h / 2])
    return min(faces, key=lambda f: float(np.linalg.norm(f.center - mid)))


def parse_face(image: np.ndarray, face: FaceInfo, fill: int = 255) -> np.ndarray:
    """Whiten everything outside the face mask (background, hair, ears, neck), as the paper's preprocessing does."""
    image = to_rgb_uint8(image)
    if image.shape[:2] != face.image_size:
        raise ValueError(f"face was found in an image of size {face.image_size}, got an image of {image.shape[:2]}")
    out = image.copy()
    out[~face.mask] = fill
    return out


def align_face(image: np.ndarray, kps: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """Warp ``image`` so that ``kps`` ``(5, 2)`` land on insightface's ArcFace template: ``(size, size, 3)``."""
    from insightface.utils import face_align

    kps = np.asarray(kps, dtype=np.float32)
    if kps.shape != (5, 2):
        raise ValueError(f"alignment needs 5 keypoints (5, 2) in ArcFace order, got shape {kps.shape}")
    return face_align.norm_crop(to_rgb_uint8(image), landmark=kps, image_size=size)


def mesh_disagreement(mesh_kps: np.ndarray, detector_kps: np.ndarray, box: np.ndarray) -> float:
    """Largest distance between the mesh's eyes / nose (ArcFace order ``(5, 2)``) and the detector's (MediaPipe
    order ``(6, 2)``), in box sides."""
    side = max(float(box[2] - box[0]), float(box[3] - box[1]), 1e-6)
    d = mesh_kps[list(ARCFACE_EYES_NOSE)] - detector_kps[list(DETECTOR_EYES_NOSE)]
    return float(np.linalg.norm(d, axis=1).max() / side)


class FaceAnalyzer:
    """Detect faces and fit the refined face mesh to each.

    Args:
        min_detection_confidence: detector threshold.
        max_faces: at most this many faces are meshed (highest detector scores first).
        mesh_agreement: a detection counts as a face only if its mesh's eyes and nose lie within this share of the
            box side of the detector's (``None``: no check).
    """

    def __init__(
        self, min_detection_confidence: float = 0.5, max_faces: int = 8, mesh_agreement: float | None = None
    ) -> None:
        self.min_detection_confidence = min_detection_confidence
        self.max_faces = max_faces
        self.mesh_agreement = mesh_agreement
        self._detectors: dict[int, object] = {}
        self._mesh = None

    # MediaPipe graphs are created on first use: importing this module and building the analyser stay cheap.
    def _detector(self, model: int):
        if model not in self._detectors:
            self._detectors[model] = _solutions().face_detection.FaceDetection(
                model_selection=model, min_detection_confidence=self.min_detection_confidence
            )
        return self._detectors[model]

    def _mesher(self):
        if self._mesh is None:
            self._mesh = _solutions().face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=1, refine_landmarks=True, min_detection_confidence=0.3
            )
        return self._mesh

    def close(self) -> None:
        for d in self._detectors.values():
            d.close()
        if self._mesh is not None:
            self._mesh.close()
        self._detectors, self._mesh = {}, None

    def __enter__(self) -> FaceAnalyzer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _detect(self, image: np.ndarray) -> list[tuple[np.ndarray, float, np.ndarray]]:
        """``(box (4,), score, detector keypoints (6, 2))`` per detection, highest score first."""
        h, w = image.shape[:2]
        for model in DETECTOR_MODELS:
            res = self._detector(model).process(image)
            if res.detections:
                out = []
                for det in res.detections:
                    bb = det.location_data.relative_bounding_box
                    box = np.array([bb.xmin * w, bb.ymin * h, (bb.xmin + bb.width) * w, (bb.ymin + bb.height) * h])
                    box = np.clip(box, 0, [w, h, w, h]).astype(np.float32)
                    kps = np.array([[k.x * w, k.y * h] for k in det.location_data.relative_keypoints], np.float32)
                    out.append((box, float(det.score[0]), kps))
                return sorted(out, key=lambda d: -d[1])[: self.max_faces]
        return []

    def _mesh_in_box(self, image: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        import cv2

        h, w = image.shape[:2]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        half = max(box[2] - box[0], box[3] - box[1]) * MESH_CROP_SCALE / 2
        x0, y0 = int(np.floor(cx - half)), int(np.floor(cy - half))
        side = int(np.ceil(2 * half))
        # pad with black where the square crop leaves the image, so the face stays centred and unscaled
        crop = cv2.copyMakeBorder(
            image[max(y0, 0) : min(y0 + side, h), max(x0, 0) : min(x0 + side, w)],
            max(-y0, 0),
            max(y0 + side - h, 0),
            max(-x0, 0),
            max(x0 + side - w, 0),
            cv2.BORDER_CONSTANT,
            value=(0, 0, 0),
        )
        res = self._mesher().process(np.ascontiguousarray(crop))
        if not res.multi_face_landmarks:
            return None
        lm = res.multi_face_landmarks[0].landmark
        ch, cw = crop.shape[:2]
        return np.array([[p.x * cw + x0, p.y * ch + y0] for p in lm], dtype=np.float32)

    def __call__(self, image) -> list[FaceInfo]:
        """All faces found in ``image`` (possibly none), highest detector score first."""
        image = to_rgb_uint8(image)
        faces = []
        for box, score, det_kps in self._detect(image):
            mesh = self._mesh_in_box(image, box)
            if mesh is None:
                logger.debug("face detected at %s (score %.2f) but the mesh did not fit; skipped", box, score)
                continue
            kps = arcface_keypoints(mesh)
            error = mesh_disagreement(kps, det_kps, box)
            if self.mesh_agreement is not None and error > self.mesh_agreement:
                logger.debug(
                    "detection at %s (score %.2f): the mesh's eyes / nose are %.2f box sides from the detector's "
                    "(> %.2f); not a face",
                    box, score, error, self.mesh_agreement,
                )  # fmt: skip
                continue
            faces.append(FaceInfo(box=box, score=score, mesh=mesh, kps=kps, image_size=image.shape[:2]))
        return faces

    def analyze(self, image, policy: FacePolicy = "largest", source: str | Path | None = None) -> FaceInfo:
        """The one face the policy picks; :class:`NoFaceError` naming ``source`` (or the shape) when there is none."""
        image = to_rgb_uint8(image)
        return select_face(self(image), policy, source=describe(image, source))


class LazyFaceAnalyzer:
    """Mixin: a ``FaceAnalyzer`` built on first use and dropped when pickled or deep-copied.

    MediaPipe graphs can be neither pickled nor copied (DataLoader workers, EMA copies), so each process or
    copy builds its own.
    """

    _analyzer: FaceAnalyzer | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_analyzer"] = None
        return state

    @property
    def analyzer(self) -> FaceAnalyzer:
        if self._analyzer is None:
            self._analyzer = FaceAnalyzer()
        return self._analyzer
