"""MediaPipe face analysis on a real photo (scikit-image's astronaut) and transformed copies of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("mediapipe")
cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

from consisid_lab.faces.analysis import (  # noqa: E402
    ARCFACE_KEYPOINT_NAMES,
    FaceAnalyzer,
    NoFaceError,
    align_face,
    load_image,
    parse_face,
    select_face,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*:FutureWarning")  # insightface's skimage call

LEFT_EYE, RIGHT_EYE, NOSE, MOUTH_LEFT, MOUTH_RIGHT = range(5)


def _affine(image: np.ndarray, m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.warpAffine(image, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def _variants() -> dict[str, tuple[np.ndarray, np.ndarray | None, bool]]:
    """name -> (image, 2x3 map from original to variant pixels or None, mirrored)."""
    img = skimage_data.astronaut()  # (512, 512, 3) RGB
    h, w = img.shape[:2]
    out = {"original": (img, np.array([[1.0, 0, 0], [0, 1.0, 0]]), False)}
    out["flip"] = (np.ascontiguousarray(img[:, ::-1]), np.array([[-1.0, 0, w - 1], [0, 1.0, 0]]), True)
    for angle in (15, -15):
        m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
        out[f"rotate{angle:+d}"] = (_affine(img, m, (w, h)), m, False)
    m = np.array([[0.5, 0, -0.25], [0, 0.5, -0.25]])  # pixel centres under a 2x downscale
    out["scale0.5"] = (cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA), m, False)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)  # (H, W): the analyser replicates it to RGB
    out["gray"] = (gray, np.array([[1.0, 0, 0], [0, 1.0, 0]]), False)
    return out


VARIANTS = _variants()


@pytest.fixture(scope="module")
def analyzer():
    with FaceAnalyzer() as fa:
        yield fa


@pytest.fixture(scope="module")
def original(analyzer):
    return analyzer.analyze(VARIANTS["original"][0])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_keypoints_in_anatomical_order_inside_the_face(analyzer, original, name):
    image, m, mirrored = VARIANTS[name]
    faces = analyzer(image)
    assert len(faces) == 1
    face = faces[0]
    assert face.mesh.shape == (478, 2) and face.kps.shape == (5, 2)
    assert face.image_size == image.shape[:2]
    k = face.kps
    assert k[LEFT_EYE, 0] < k[RIGHT_EYE, 0] and k[MOUTH_LEFT, 0] < k[MOUTH_RIGHT, 0]  # image-left first
    eye_y, mouth_y = k[[LEFT_EYE, RIGHT_EYE], 1].mean(), k[[MOUTH_LEFT, MOUTH_RIGHT], 1].mean()
    assert eye_y < k[NOSE, 1] < mouth_y
    x0, y0, x1, y1 = face.box
    assert ((k[:, 0] > x0) & (k[:, 0] < x1) & (k[:, 1] > y0) & (k[:, 1] < y1)).all()

    mask = face.mask
    assert mask.shape == image.shape[:2] and mask.dtype == bool
    assert mask[np.round(k[:, 1]).astype(int), np.round(k[:, 0]).astype(int)].all()
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 4, (y1 - y0) / 4
    centre = mask[int(cy - hh) : int(cy + hh), int(cx - hw) : int(cx + hw)]
    assert centre.mean() > 0.9
    assert mask.sum() < 2 * (x1 - x0) * (y1 - y0)  # the face, not the picture

    # the same anatomical points move with the image (a mirror swaps image-left and image-right)
    expected = _apply(m, original.kps)
    if mirrored:
        expected = expected[[RIGHT_EYE, LEFT_EYE, NOSE, MOUTH_RIGHT, MOUTH_LEFT]]
    scale = np.linalg.norm(m[:, :2], ord=2)
    assert np.abs(k - expected).max() < 6.0 * scale


@pytest.mark.parametrize(
    "image", [skimage_data.coffee(), np.full((240, 320, 3), 128, np.uint8)], ids=["coffee", "flat"]
)
def test_no_face_is_a_clear_error(analyzer, image):
    assert analyzer(image) == []
    with pytest.raises(NoFaceError, match=rf"shape \({image.shape[0]}, {image.shape[1]}, 3\).*frontal face"):
        analyzer.analyze(image)


def test_no_face_error_names_the_file(analyzer, tmp_path):
    from PIL import Image

    path = tmp_path / "coffee.png"
    Image.fromarray(skimage_data.coffee()).save(path)
    with pytest.raises(NoFaceError, match="coffee.png") as err:
        analyzer.analyze(load_image(path), source=path)
    assert isinstance(err.value, ValueError)


def _collage() -> tuple[np.ndarray, tuple[int, int, int], tuple[int, int, int]]:
    """The astronaut's head pasted twice: large near the top-left corner, small at the centre."""
    head = skimage_data.astronaut()[20:240, 110:340]  # (220, 230, 3) head and shoulders
    canvas = np.full((600, 800, 3), 200, np.uint8)
    big, small = (10, 10, 330), (235, 335, 150)  # (y, x, height)
    for y, x, s in (big, small):
        canvas[y : y + s, x : x + int(s * 230 / 220)] = cv2.resize(head, (int(s * 230 / 220), s))
    return canvas, big, small


def _inside(face, region) -> bool:
    y, x, s = region
    cx, cy = face.center
    return x < cx < x + s and y < cy < y + s


def test_selection_policy_on_two_faces(analyzer):
    canvas, big, small = _collage()
    faces = analyzer(canvas)
    assert len(faces) == 2
    largest = select_face(faces, "largest")
    center = select_face(faces, "center")
    assert largest is not center
    assert _inside(largest, big) and _inside(center, small)
    assert analyzer.analyze(canvas).area == largest.area  # "largest" is the default
    with pytest.raises(ValueError, match="policy"):
        select_face(faces, "leftmost")

    # parsing with the chosen face keeps that face and whitens the other person entirely
    parsed = parse_face(canvas, center)
    oy, ox, _ = big
    other = parsed[largest.mask]
    assert (other == 255).all()
    assert (parsed[center.mask] == canvas[center.mask]).all()
    assert (parsed[~center.mask] == 255).all()
    assert oy >= 0 and ox >= 0


def test_alignment_puts_keypoints_on_the_arcface_template(original):
    from insightface.utils import face_align

    aligned = align_face(VARIANTS["original"][0], original.kps)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    m = face_align.estimate_norm(original.kps, 112)
    residual = np.abs(_apply(m, original.kps) - face_align.arcface_dst).max()
    assert residual < 10.0  # a smiling real face fits the template to a few pixels; a wrong order does not
    swapped = original.kps[[1, 0, 2, 4, 3]]
    m_bad = face_align.estimate_norm(swapped, 112)
    assert np.abs(_apply(m_bad, swapped) - face_align.arcface_dst).max() > 2 * residual
    assert len(ARCFACE_KEYPOINT_NAMES) == 5


def test_mesh_renderer_draws_the_chosen_face():
    from consisid_lab.models.keypoints_mesh import MeshKeypointRenderer

    canvas, big, small = _collage()
    x = torch.from_numpy(canvas).permute(2, 0, 1).float().div(127.5).sub(1)[None]  # (1, 3, H, W) in [-1, 1]
    for policy, region in (("largest", big), ("center", small)):
        out = MeshKeypointRenderer(face_policy=policy)(x, torch.zeros(1, 5, 2))
        assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
        drawn = (out[0] > -1).any(0).numpy()  # (H, W) non-black pixels
        ys, xs = np.nonzero(drawn)
        y, x0, s = region
        assert drawn.sum() > 200
        assert ((xs >= x0) & (xs < x0 + s * 1.1) & (ys >= y) & (ys < y + s)).mean() > 0.99

    coffee = torch.from_numpy(skimage_data.coffee()).permute(2, 0, 1).float().div(127.5).sub(1)[None]
    with pytest.raises(NoFaceError, match="image 0 of the batch"):
        MeshKeypointRenderer(on_no_face="raise")(coffee, torch.zeros(1, 5, 2))


def test_mesh_renderer_draws_the_keypoints_where_mediapipe_misses_a_small_face():
    from consisid_lab.data.datamodule import SyntheticDataModule
    from consisid_lab.faces.analysis import FaceAnalyzer, to_rgb_uint8
    from consisid_lab.models.keypoints import FivePointRenderer
    from consisid_lab.models.keypoints_mesh import MeshKeypointRenderer

    dm = SyntheticDataModule(
        num_train_identities=2, num_val_identities=1, num_test_identities=6, clips_per_identity=1, height=32,
        width=32, num_frames=5, cache_dir=None,
    )  # fmt: skip
    items = [dm.dataset("test")[i] for i in range(6)]
    faces, kps = torch.stack([it["ref_face"] for it in items]), torch.stack([it["ref_kps"] for it in items])
    with FaceAnalyzer() as fa:
        missed = [not fa(to_rgb_uint8(f)) for f in faces]
    assert any(missed) and not all(missed)  # the case of the issue: some 32 x 32 references have no MediaPipe face
    renderer = MeshKeypointRenderer()
    out = renderer(faces, kps)  # a training step goes on
    assert renderer.fallbacks == sum(missed)
    five = FivePointRenderer()(faces, kps)
    for i, miss in enumerate(missed):
        assert torch.allclose(out[i], five[i], atol=1e-5) == miss, i
    with pytest.raises(NoFaceError):
        MeshKeypointRenderer(on_no_face="raise")(faces, kps)
