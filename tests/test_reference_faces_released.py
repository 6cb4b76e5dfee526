"""Reference faces as released: ``face_pipeline=released`` is diffusers' ``consisid_utils`` on a real photo, and the
``mediapipe`` pipeline's crop follows the same FFHQ template.

The ``released`` tests need the optional extra (``pip install -e .[released]``); they are skipped without it unless
``CONSISID_LAB_REQUIRE_RELEASED=1`` says the extra is required, and then its absence fails.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from skimage.data import astronaut

from consisid_lab.faces.released import (
    FFHQ_TEMPLATE_512,
    RELEASED_WHITE_LABELS,
    check_face_encoder,
    check_pipeline,
    reference_crop,
    to_video_size,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


def _require_released() -> None:
    if os.environ.get("CONSISID_LAB_REQUIRE_RELEASED") == "1":
        import consisid_eva_clip  # noqa: F401  (declared required: fail loudly)
        import facexlib  # noqa: F401
    else:
        pytest.importorskip("facexlib", reason="the optional extra: pip install -e .[released]")
        pytest.importorskip("consisid_eva_clip", reason="the optional extra: pip install -e .[released]")


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory):
    _require_released()
    from _released_face_models import build_face_encoder

    with pytest.MonkeyPatch.context() as mp:
        root = build_face_encoder(tmp_path_factory.mktemp("published"), mp)
        yield root


def test_released_equals_diffusers_functions_on_a_real_photo(released_dir):
    from diffusers.pipelines.consisid import consisid_utils as cu

    from consisid_lab.faces.released import ReleasedFacePipeline

    photo = astronaut()
    # diffusers' functions, called directly
    models = cu.prepare_face_models(str(released_dir), "cpu", torch.float32)
    helper_1, helper_2, clip, app, mean, std = models
    want = cu.process_face_embeddings_infer(helper_1, clip, helper_2, mean, std, app, "cpu", torch.float32, photo)
    want_id, want_hidden, want_image, want_kps = want

    got = ReleasedFacePipeline(released_dir)(photo, source="astronaut")
    torch.testing.assert_close(got.id_cond, want_id, rtol=0, atol=0)
    assert got.id_cond.shape == (1, 512 + 32)  # antelopev2 (512) + the small EVA-CLIP's projection
    assert len(got.id_vit_hidden) == len(want_hidden) == 5
    for a, b in zip(got.id_vit_hidden, want_hidden):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    np.testing.assert_array_equal(got.image, np.asarray(want_image))
    np.testing.assert_array_equal(got.kps, want_kps)
    assert got.image.shape == (512, 512, 3) and got.image.dtype == np.uint8

    # the parsed crop: exactly the released labels are white, the rest is the aligned face in colour
    pipe = ReleasedFacePipeline(released_dir)
    helper = pipe.models[0]
    out = pipe(photo)
    aligned_bgr = helper.cropped_faces[0]
    x = torch.from_numpy(aligned_bgr[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255.0
    from torchvision.transforms.functional import normalize

    labels = helper.face_parse(normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))[0].argmax(1)[0].numpy()
    white = np.isin(labels, RELEASED_WHITE_LABELS)
    assert 0.0 < white.mean() < 1.0, "the test's parsing should whiten part of the crop"
    assert (out.image[white] == 255).all()
    # kept pixels are the aligned crop (through the release's float -> uint8 round trip: at most one level lower)
    kept = aligned_bgr[..., ::-1][~white].astype(int)
    assert np.abs(out.image[~white].astype(int) - kept).max() <= 1
    np.testing.assert_array_equal(out.mask, ~(out.image == 255).all(-1))
    # the five facexlib points land on the FFHQ template (a least-median similarity fit: close, not exact)
    assert np.abs(out.crop_kps - FFHQ_TEMPLATE_512).max() < 40


def test_released_missing_weights_are_named_before_anything_loads(released_dir, tmp_path):
    import shutil

    from consisid_lab.faces.released import ReleasedFacePipeline

    copy = tmp_path / "published"
    shutil.copytree(released_dir, copy)
    (copy / "face_encoder" / "parsing_bisenet.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"parsing_bisenet\.pth.*face_pipeline=mediapipe"):
        ReleasedFacePipeline(copy)
    assert not (copy / "face_encoder" / "parsing_bisenet.pth").exists()  # nothing was downloaded in its place
    with pytest.raises(FileNotFoundError, match="scrfd_10g_bnkps.onnx"):
        for p in (copy / "face_encoder" / "models" / "antelopev2").glob("scrfd*"):
            p.unlink()
        check_face_encoder(copy)


def test_unknown_pipeline_is_named():
    with pytest.raises(ValueError, match=r"face_pipeline='insightface'.*\('mediapipe', 'released'\)"):
        check_pipeline("insightface")


def test_mediapipe_crop_is_aligned_to_the_ffhq_template_and_whitened_outside_the_oval():
    from consisid_lab.faces.analysis import FaceAnalyzer

    photo = astronaut()
    with FaceAnalyzer() as analyzer:
        face = analyzer.analyze(photo)
        crop, kps, mask = reference_crop(photo, "mediapipe", analyzer=analyzer)
    assert crop.shape == (512, 512, 3) and mask.shape == (512, 512)
    # the similarity fit puts the eyes within a few pixels of the template; MediaPipe's nose tip (mesh point 1) and
    # mouth corners sit differently on the face than RetinaFace's (measured on the astronaut: 18 and 14 px)
    residual = np.linalg.norm(kps - FFHQ_TEMPLATE_512, axis=1)
    assert residual[:2].max() < 8 and residual.max() < 25
    assert (crop[~mask] == 255).all() and 0.2 < mask.mean() < 0.6
    assert not (crop[mask] == 255).all(-1).all()
    # the crop is the photo warped: the nose tip pixel is the photo's nose tip pixel
    nose = np.round(kps[2]).astype(int)
    src = np.round(face.kps[2]).astype(int)
    assert np.abs(crop[nose[1], nose[0]].astype(int) - photo[src[1], src[0]].astype(int)).max() < 40

    image, small_kps, small_mask = to_video_size(crop, kps, mask, 32, 48)
    assert image.shape == (32, 48, 3) and small_mask.shape == (32, 48)
    np.testing.assert_allclose(small_kps[:, 0], (kps[:, 0] + 0.5) * 48 / 512 - 0.5, rtol=1e-5)
    assert abs(small_mask.mean() - mask.mean()) < 0.05
