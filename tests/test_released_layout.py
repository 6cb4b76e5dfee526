"""The released ConsisID data layout: the list, valid-segment sampling, 16-bit track masks, one track per sample,
bad input skipped with its reason, and training through `data=consisid` on a fixture the tests write."""

from __future__ import annotations

import json
import logging
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from _real_videos import make_consisid_dataset

from consisid_lab.faces.released import FFHQ_TEMPLATE_512

pytest.importorskip("mediapipe")
pytest.importorskip("av")

from consisid_lab.data.real import ClipSampling, ConsisIDLayoutDataset  # noqa: E402
from consisid_lab.data.real_datamodule import RealVideoDataModule  # noqa: E402
from consisid_lab.data.released_layout import (  # noqa: E402
    AnnotationError,
    choose_track,
    load_clip_annotations,
    read_train_list,
    segment_clip_indices,
    valid_segments,
)
from consisid_lab.data.skip_log import SkipLog, read_skipped  # noqa: E402
from consisid_lab.data.video_io import CropTransform, VideoDecodeError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*:FutureWarning")

SOLO, DUO, SOLO_B = "data/videos/solo.mp4", "data/videos/duo.mp4", "data/videos/solo_b.mp4"


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return root, make_consisid_dataset(root)


def _sampling(**kw) -> ClipSampling:
    return ClipSampling(**{"height": 64, "width": 128, "num_frames": 5, "stride": 2, **kw})


def test_list_paths_are_relative_to_the_root(released, tmp_path, monkeypatch):
    root, info = released
    (listed,) = read_train_list(info["list"], root)
    assert listed.videos_dir == root / "data" / "videos" and listed.anno_base == root / "data"
    # default root = the current directory, as in the release
    monkeypatch.chdir(root)
    log = SkipLog()
    ds = ConsisIDLayoutDataset("total_train_data.txt", sampling=_sampling(), skip_log=log)
    assert [e.key for e in ds.entries] == [SOLO, DUO, SOLO_B]
    assert dict(log.counts) == {"missing caption": 1, "missing video": 1, "too short": 1}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="relative to data.root"):
        ConsisIDLayoutDataset(info["list"], root=tmp_path)
    bad = tmp_path / "total_train_data.txt"
    bad.write_text("videos,captions.json\n")
    with pytest.raises(ValueError, match="VIDEOS_DIR,CAPTIONS_JSON,ANNO_BASE"):
        read_train_list(bad, tmp_path)


def test_valid_segments_bridge_small_gaps_only():
    assert valid_segments([0, 1, 2, 8, 20, 21], tolerance=6) == [[0, 1, 2, 8], [20, 21]]
    assert valid_segments([5, 3, 3, 4], tolerance=1) == [[3, 4, 5]]


def test_clip_frames_come_from_the_longest_valid_segment(released):
    root, _ = released
    ann = load_clip_annotations(root / "data", "solo")
    track = choose_track(ann)
    assert track.track_id == 1 and track.mask_ids == {"face": 1, "head": 2, "person": 3}
    for position in (0.0, 0.5, 1.0):
        idx = segment_clip_indices(track, 52, 9, 3, 0, 0, position, 6, "solo")
        assert idx.min() >= 20 and idx.max() <= 51 and np.all(np.diff(idx) == 3)  # never the 0..9 segment
    assert segment_clip_indices(track, 52, 5, 1, 7, 7, 0.0, 6, "solo")[0] == 27  # skips count inside the segment
    with pytest.raises(VideoDecodeError, match="longest valid segment of track 1"):
        segment_clip_indices(track, 52, 13, 3, 0, 0, 0.5, 6, "solo")  # 37 frames needed, 32 valid
    # the item's masks are the track's 16-bit masks of those frames (the fixture puts them elsewhere before frame 20)
    item = ConsisIDLayoutDataset(released[1]["list"], root, _sampling()).load(0)
    tf = CropTransform.fit((96, 96), 64, 128)
    expected = torch.from_numpy(tf.mask(_box_mask((96, 96), released[1]["solo_box"]))).float()
    assert item["track_id"] == 1 and item["face_share"] == 1.0
    assert all(torch.equal(item["face_mask"][j, 0], expected) for j in range(5))


def _box_mask(shape, box) -> np.ndarray:
    m = np.zeros(shape, bool)
    x0, y0, x1, y1 = np.round(box).astype(int)
    m[y0:y1, x0:x1] = True
    return m


def test_multi_person_clip_one_track_per_sample_with_its_own_masks(released):
    root, info = released
    tracks = root / "data" / "track_masks_data" / "duo" / "tracking_mask_results"
    assert not (tracks / "1").exists() and not (tracks / "2").exists()  # the folder named by the track id is absent
    ds = ConsisIDLayoutDataset(info["list"], root, _sampling())
    duo = ds.load(1)
    assert duo["track_id"] == 2  # the large face on the left ("largest")
    mask = duo["face_mask"][:, 0]  # (F, H, W)
    assert bool((mask.flatten(1).sum(1) > 0).all()) and float(torch.nonzero(mask[0])[:, 1].max()) < 64
    assert float(duo["boxes"][:, 2].max()) < 64
    # the reference is the aligned 512 crop resized to the 64 x 128 video: its points sit on the FFHQ template
    template = torch.from_numpy(FFHQ_TEMPLATE_512 + 0.5) * torch.tensor([128 / 512, 64 / 512]) - 0.5
    assert float((duo["ref_kps"] - template).abs().max()) < 8

    small = ConsisIDLayoutDataset(info["list"], root, _sampling(track=1)).load(1)
    assert small["track_id"] == 1  # mask folder 11
    assert float(torch.nonzero(small["face_mask"][0, 0])[:, 1].min()) >= 64
    assert float(small["boxes"][:, 0].min()) >= 64
    assert float((small["intra_kps"] - template).abs().max()) < 8
    assert not torch.equal(small["ref_face"], duo["ref_face"])  # the other person's face
    longest = ConsisIDLayoutDataset(info["list"], root, _sampling(track="longest")).load(1)
    assert longest["track_id"] == 1  # both are valid everywhere: the first of equal tracks


def _copy(released, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(released[0], dst)
    return dst


def test_bad_input_is_skipped_with_its_reason_and_the_run_goes_on(released, tmp_path):
    root = _copy(released, tmp_path)
    anno = root / "data"
    shutil.rmtree(anno / "track_masks_data" / "solo" / "tracking_mask_results" / "1")  # the face mask folder
    boxes = json.loads((anno / "refine_bbox_jsons" / "duo.json").read_text())
    for parts in boxes.values():  # the box file loses the faces and heads of both people
        for part in ("face", "head"):
            parts[part] = []
    (anno / "refine_bbox_jsons" / "duo.json").write_text(json.dumps(boxes))
    skipped = tmp_path / "skipped.jsonl"
    ds = ConsisIDLayoutDataset(root / "total_train_data.txt", root, _sampling(), SkipLog(skipped))
    assert ds[0]["key"] == SOLO_B  # solo and duo are unusable: the next usable clip is served
    with pytest.raises(AnnotationError, match="no face or head box of track 1"):
        ds.load(1)
    reasons = {Path(r["path"]).name: r["reason"] for r in read_skipped(skipped)}
    assert reasons == {
        "no_caption.mp4": "missing caption",
        "absent.mp4": "missing video",
        "short.mp4": "too short",
        "solo.mp4": "missing masks",
        "duo.mp4": "missing track",
    }
    detail = {Path(r["path"]).name: r.get("detail", "") for r in read_skipped(skipped)}
    assert "tracking_mask_results/1" in detail["solo.mp4"]


def test_datamodule_keys_resume_and_end_of_run_summary(released, tmp_path, caplog, monkeypatch):
    root, info = released
    with pytest.raises(ValueError, match="data.list=PATH/total_train_data.txt"):
        RealVideoDataModule(layout="consisid")
    monkeypatch.chdir(root)  # data.root defaults to the current directory
    dm = RealVideoDataModule(
        list="total_train_data.txt", layout="consisid", height=32, width=64, num_frames=5, stride=2,
        val_fraction=0.0, test_fraction=0.0, batch_size=1, skipped_path=str(tmp_path / "skipped.jsonl"),
    )  # fmt: skip
    assert {e.key for e in dm.entries()["train"]} == {SOLO, DUO, SOLO_B}

    class _Trainer:
        global_step, accumulate_grad_batches, world_size = 2, 1, 1

    stream = [b.clip_id.tolist() for b in islice(dm.train_dataloader(), 5)]
    dm.trainer = _Trainer()
    assert [b.clip_id.tolist() for b in islice(dm.train_dataloader(), 3)] == stream[2:]
    with caplog.at_level(logging.WARNING, logger="consisid_lab.data.real_datamodule"):
        dm.teardown("fit")
    assert "3 items skipped (missing caption: 1, missing video: 1, too short: 1)" in caplog.text
    # the layout's keys are part of the cache key
    other = RealVideoDataModule(list="total_train_data.txt", layout="consisid", height=32, width=64, num_frames=5,
                                stride=2, val_fraction=0.0, test_fraction=0.0, mask_part="head")  # fmt: skip
    assert other.content_hash() != dm.content_hash()


def test_trains_through_data_consisid_with_masks_and_cross_face(released, tmp_path, standin_cache):
    from conftest import TINY_OVERRIDES, compose_train

    from consisid_lab.train import train

    root, info = released
    tiny = [o for o in TINY_OVERRIDES if o != "debug=fast"]  # debug=fast sizes the synthetic benchmark
    cfg = compose_train(
        [
            *tiny, "trainer.val_check_interval=2", "++trainer.limit_val_batches=1", "++trainer.limit_test_batches=1",
            "model.sampling.test_batches=1", "data=consisid", f"data.list={info['list']}", f"data.root={root}",
            "data.num_frames=5", "data.stride=2",
            "data.val_fraction=0.34", "data.test_fraction=0.34", "data.batch_size=1", "trainer.max_steps=2",
            "model.loss.mask_prob=1.0", "model.loss.cross_face_prob=1.0",
        ],
        tmp_path / "run", standin_cache, tiny=False,
    )  # fmt: skip
    metrics = train(cfg)
    assert np.isfinite(metrics["test/loss"]) and metrics["test/face_rate"] > 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    # what it trained on: the track masks and a cross-face reference from frames outside each clip
    from consisid_lab.utils.instantiate import instantiate

    dm = instantiate(cfg.data, skipped_path=None)
    batch = next(iter(dm.train_dataloader()))
    assert bool((batch.face_mask.flatten(2).sum(-1) > 0).all())
    items = [dm.dataset(split)[0] for split in ("train", "val", "test")]
    assert {it["key"] for it in items} == {SOLO, DUO, SOLO_B}
    # (the large face of the duo fixture is the same still image in every frame, so only the solo clips can show it)
    assert all(not torch.equal(it["ref_face"], it["intra_face"]) for it in items if it["key"] != DUO)


def test_unreadable_annotation_names_the_file(released, tmp_path):
    root = _copy(released, tmp_path)
    box = root / "data" / "refine_bbox_jsons" / "solo_b.json"
    box.write_text("{not json")
    with pytest.raises(AnnotationError, match="solo_b.json: unreadable box file") as err:
        load_clip_annotations(root / "data", "solo_b")
    assert err.value.reason == "bad annotation"
    shutil.rmtree(root / "data" / "track_masks_data" / "solo")
    with pytest.raises(AnnotationError, match="track folder does not exist") as err:
        load_clip_annotations(root / "data", "solo")
    assert err.value.reason == "missing annotation"
