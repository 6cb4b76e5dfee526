"""Real-video datasets (plain folder; the released layout is in test_released_layout.py), video I/O, bad-sample
handling, face-track quality, the real local encoder."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from _real_videos import SIZE, face_frames, make_folder_dataset, two_person_frames

pytest.importorskip("mediapipe")
pytest.importorskip("av")

from consisid_lab.data.real import (  # noqa: E402
    ClipSampling,
    FolderVideoDataset,
    VideoEntry,
    collate_real_batch,
    folder_entries,
    split_entries,
)
from consisid_lab.data.real_datamodule import RealVideoDataModule  # noqa: E402
from consisid_lab.data.skip_log import SkipLog, read_skipped  # noqa: E402
from consisid_lab.data.video_io import (  # noqa: E402
    CropTransform,
    VideoDecodeError,
    clip_indices,
    probe_video,
    read_frames,
    write_video,
)
from consisid_lab.types import VideoBatch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*:FutureWarning")  # insightface's call into skimage


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    make_folder_dataset(root)
    return root


# ------------------------------------------------------------------------------------------------ video I/O
def test_clip_indices_respect_stride_and_skips():
    idx = clip_indices(40, 5, stride=3, skip_head=4, skip_tail=6, position=0.0)
    assert idx.tolist() == [4, 7, 10, 13, 16]
    end = clip_indices(40, 5, stride=3, skip_head=4, skip_tail=6, position=1.0)
    assert end[-1] == 40 - 6 - 1 and np.all(np.diff(end) == 3)
    with pytest.raises(VideoDecodeError, match="too short"):
        clip_indices(20, 5, stride=3, skip_head=4, skip_tail=6)


def test_read_frames_match_written_video(tmp_path):
    frames = face_frames(6)
    path = tmp_path / "v.mp4"
    write_video(path, frames)
    assert probe_video(path).num_frames == 6
    got = read_frames(path, [1, 4])
    assert set(got) == {1, 4}
    for k in (1, 4):  # lossy codec at high quality: close to the source, and each frame to its own
        err = np.abs(got[k].astype(int) - frames[k].astype(int)).mean()
        other = np.abs(got[k].astype(int) - frames[5 - k].astype(int)).mean()
        assert err < 4 and err < other


def test_crop_transform_moves_points_with_pixels():
    image = np.zeros((90, 160, 3), np.uint8)
    image[30:34, 120:124] = 255  # a bright square at (121.5, 31.5)
    tf = CropTransform.fit((90, 160), 48, 48)
    out = tf.image(image)
    ys, xs = np.nonzero(out[..., 0] > 100)
    centre = tf.points(np.array([121.5, 31.5]))
    assert abs(xs.mean() - centre[0]) < 1.0 and abs(ys.mean() - centre[1]) < 1.0


# -------------------------------------------------------------------------------------------- ConsisID layout
# ------------------------------------------------------------------------------------------------ folder layout
def test_folder_captions_from_txt_csv_and_jsonl(folder, tmp_path):
    log = SkipLog()
    entries = {e.key: e.caption for e in folder_entries(folder, log)}
    assert entries["face0.mp4"] == "a person talking, take 0"  # .txt beside the video
    assert entries["sub/csvface.mp4"] == "a person, captioned in a table"  # captions.csv
    assert "nocap.mp4" not in entries and log.counts["missing caption"] == 1

    other = tmp_path / "jsonl"
    other.mkdir()
    write_video(other / "clip.mp4", face_frames(6))
    (other / "captions.jsonl").write_text(json.dumps({"path": "clip.mp4", "caption": "from jsonl"}) + "\n")
    assert [(e.key, e.caption) for e in folder_entries(other, SkipLog())] == [("clip.mp4", "from jsonl")]


def test_bad_items_are_recorded_and_the_rest_load(folder, tmp_path):
    skipped = tmp_path / "skipped.jsonl"
    log = SkipLog(skipped)
    ds = FolderVideoDataset(folder, ClipSampling(64, 64, 5, stride=2), skip_log=log)
    keys = [e.key for e in ds.entries]
    loaded = {keys[i]: ds.try_load(i) for i in range(len(ds))}
    assert {k for k, v in loaded.items() if v is not None} == {
        "face0.mp4",
        "face1.mp4",
        "face2.mp4",
        "sub/csvface.mp4",
    }
    reasons = {r["path"].split("/")[-1]: r["reason"] for r in read_skipped(skipped)}
    assert reasons == {"nocap.mp4": "missing caption", "corrupt.mp4": "corrupt video", "coffee.mp4": "no face"}
    # indexing a bad item serves the next usable one instead of failing
    bad = keys.index("corrupt.mp4")
    item = ds[bad]
    assert item["key"] != "corrupt.mp4" and item["video"].shape == (5, 3, 64, 64)


def test_datamodule_batches_and_deterministic_splits(folder, tmp_path):
    dm = RealVideoDataModule(
        str(folder), layout="folder", height=64, width=64, num_frames=5, stride=2, val_fraction=0.2,
        test_fraction=0.2, batch_size=2, skipped_path=str(tmp_path / "skipped.jsonl"),
    )  # fmt: skip
    splits = dm.entries()
    keys = {s: {e.key for e in v} for s, v in splits.items()}
    assert (
        not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    )
    assert sum(map(len, keys.values())) == 6  # nocap left out at listing
    shuffled = split_entries(list(reversed(splits["train"] + splits["val"] + splits["test"])), 0.2, 0.2, seed=0)
    assert {s: {e.key for e in v} for s, v in shuffled.items()} == keys

    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, VideoBatch)
    b = batch.batch_size
    assert batch.video.shape == (b, 5, 3, 64, 64) and batch.video.min() >= -1 and batch.video.max() <= 1
    assert batch.ref_face.shape == batch.intra_face.shape == (b, 3, 64, 64)
    assert batch.kps.shape == (b, 5, 5, 2) and batch.face_mask.shape == (b, 5, 1, 64, 64)
    assert batch.boxes.shape == (b, 5, 4) and batch.ref_mask.shape == (b, 1, 64, 64)
    # references are parsed: white outside the face mask, and the cross-face one comes from another frame
    outside = batch.ref_mask.expand_as(batch.ref_face) == 0
    assert torch.allclose(batch.ref_face[outside], torch.ones(())) and (batch.ref_mask.flatten(1).sum(1) > 50).all()
    assert not torch.equal(batch.ref_face, batch.intra_face)
    # keypoints lie inside their face boxes
    x, y = batch.kps[..., 0], batch.kps[..., 1]
    bx = batch.boxes[..., None, :]
    assert bool(((x >= bx[..., 0] - 2) & (x <= bx[..., 2] + 2) & (y >= bx[..., 1] - 2) & (y <= bx[..., 3] + 2)).all())
    fixed = dm.fixed_batch("train", 2)
    assert torch.equal(fixed.video, dm.fixed_batch("train", 2).video)


def test_collate_refuses_mixed_cached_features():
    base = {
        "video": torch.zeros(1, 3, 4, 4), "caption": "c", "ref_face": torch.zeros(3, 4, 4),
        "ref_kps": torch.zeros(5, 2), "ref_mask": torch.zeros(1, 4, 4), "intra_face": torch.zeros(3, 4, 4),
        "intra_kps": torch.zeros(5, 2),
        "intra_mask": torch.zeros(1, 4, 4), "kps": torch.zeros(1, 5, 2), "face_mask": torch.zeros(1, 1, 4, 4),
        "boxes": torch.zeros(1, 4), "identity": 0, "clip_id": 0,
    }  # fmt: skip
    a = {**base, "cached": {"latents": torch.ones(1, 2)}}
    assert torch.equal(collate_real_batch([a, a]).cached["latents"], torch.ones(2, 1, 2))
    with pytest.raises(ValueError, match="cached"):
        collate_real_batch([a, base])


def test_split_fractions_are_checked():
    with pytest.raises(ValueError, match="val_fraction"):
        split_entries([VideoEntry(path=None, key="a", caption="c")], 0.6, 0.5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- real local encoder
class _TinyArcFace(torch.nn.Module):
    """ArcFace-shaped: (B, 3, 112, 112) -> (B, C, 7, 7) -> flatten -> 512."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(*[torch.nn.Conv2d(3 if i == 0 else c, c, 3, 2, 1) for i in range(4)])
        self.fc = torch.nn.Linear(c * 49, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.body(x), 1))


@pytest.fixture(scope="module")
def arcface_dir(tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("insightface")
    d = tmp_path_factory.mktemp("antelopev2")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _TinyArcFace().eval(), torch.zeros(1, 3, 112, 112), str(d / "glintr100.onnx"), dynamo=False,
            input_names=["data"], output_names=["fc1"], dynamic_axes={"data": {0: "b"}, "fc1": {0: "b"}},
        )  # fmt: skip
    return d


TINY_CLIP = "consisid-test-real-data-tiny-EVA02"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip config with a timm EVA tower (EVA02-CLIP's block design, two blocks)."""
    open_clip = pytest.importorskip("open_clip")
    timm = pytest.importorskip("timm")
    name = "consisid_test_real_data_tiny_eva"
    if not timm.is_model(name):

        def tiny_eva(pretrained: bool = False, **kwargs):
            from timm.models.eva import Eva

            for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(k, None)
            args = dict(img_size=28, patch_size=14, embed_dim=16, depth=2, num_heads=2, swiglu_mlp=True,
                        use_rot_pos_emb=True, ref_feat_shape=(2, 2))  # fmt: skip
            return Eva(**{**args, **kwargs})

        tiny_eva.__name__ = name
        timm.models.register_model(tiny_eva)
    cfg = {
        "embed_dim": 8,
        "vision_cfg": {"image_size": 28, "timm_model_name": name, "timm_pool": "token", "timm_proj": None},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
        "custom_text": True,
    }
    path = tmp_path_factory.mktemp("clipcfg") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return TINY_CLIP


def test_real_local_encoder_one_face_for_both_halves(arcface_dir, tiny_clip, tmp_path):
    from consisid_lab.faces.analysis import FaceAnalyzer, NoFaceError
    from consisid_lab.models.local_encoder_real import RealFaceLocalEncoder

    with pytest.raises(ValueError, match="no weights configured"):
        RealFaceLocalEncoder()
    torch.manual_seed(0)
    enc = RealFaceLocalEncoder(
        arcface_dir=str(arcface_dir), arcface_layer="both", onnx_cache_dir=str(tmp_path),
        clip_model_name=tiny_clip, clip_random_init=True, clip_blocks=(1, 2),
    )  # fmt: skip
    assert enc.vector_dims == {"arcface": 512, "clip": 8}
    assert enc.token_dims == {"arcface_penultimate": 8, "clip_block1": 16, "clip_block2": 16}

    group, _, _ = two_person_frames(1)
    image = group[0]
    feats = enc.encode_image(image)
    assert feats.vectors["arcface"].shape == (1, 512) and feats.tokens["arcface_penultimate"].shape == (1, 49, 8)
    faces = sorted(FaceAnalyzer()(image), key=lambda f: f.area)
    assert len(faces) == 2
    small, large = faces
    want, other = enc.encode_faces([image], [large]), enc.encode_faces([image], [small])
    for name in ("arcface", "clip"):  # both halves see the large face, picked once
        assert torch.allclose(feats.vectors[name], want.vectors[name])
        assert not torch.allclose(want.vectors[name], other.vectors[name])

    x = torch.from_numpy(face_frames(2, SIZE)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert enc(x).vectors["arcface"].shape == (2, 512)

    from skimage.data import coffee

    with pytest.raises(NoFaceError, match="no face"):
        enc.encode_image(coffee())
    with pytest.raises(FileNotFoundError, match="glintr100|recognition"):
        RealFaceLocalEncoder(arcface_dir=str(tmp_path / "empty_dir_does_not_exist"))
