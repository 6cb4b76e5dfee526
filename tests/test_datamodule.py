"""SyntheticDataModule, its dataset and collate, and the disk cache of rendered clips."""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from itertools import islice

import numpy as np
import pytest
import torch

from consisid_lab.data.cache import ClipCache, config_hash
from consisid_lab.data.datamodule import SyntheticClipDataset, SyntheticDataModule, collate_video_batch
from consisid_lab.data.synthetic import SPLIT_CAPACITY, SPLITS, SyntheticConfig, identity_seed, make_clip
from consisid_lab.types import VideoBatch

TINY = {"height": 32, "width": 32, "num_frames": 5}


def _dm(**kwargs) -> SyntheticDataModule:
    args = {
        "num_train_identities": 4,
        "num_val_identities": 2,
        "num_test_identities": 3,
        "clips_per_identity": 2,
        "batch_size": 3,
        **TINY,
        **kwargs,
    }
    dm = SyntheticDataModule(**args)
    dm.setup("fit")
    return dm


def _assert_batches_equal(a: VideoBatch, b: VideoBatch) -> None:
    for f in fields(VideoBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def test_batch_shapes_dtypes_and_ranges() -> None:
    dm = _dm()
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, VideoBatch)
    B, F, H, W = 3, 5, 32, 32
    assert batch.video.shape == (B, F, 3, H, W) and batch.video.dtype == torch.float32
    assert batch.ref_face.shape == batch.intra_face.shape == (B, 3, H, W)
    assert batch.ref_kps.shape == batch.intra_kps.shape == (B, 5, 2)
    assert batch.kps.shape == (B, F, 5, 2)
    assert batch.face_mask.shape == (B, F, 1, H, W) and batch.ref_mask.shape == (B, 1, H, W)
    assert batch.boxes.shape == (B, F, 4)
    assert batch.identity.dtype == batch.clip_id.dtype == torch.long
    assert len(batch.caption) == B and all(isinstance(c, str) and c for c in batch.caption)
    for images in (batch.video, batch.ref_face, batch.intra_face):
        assert images.min() >= -1.0 and images.max() <= 1.0 and images.min() < 0.0
    for mask in (batch.face_mask, batch.ref_mask, batch.intra_mask):
        assert set(mask.unique().tolist()) == {0.0, 1.0}
    # val is not shuffled but clip-major (2 identities x 2 clips): identity 0 clip 0, identity 1 clip 0, identity 0
    # clip 1 (item indices 0, 2, 1)
    assert batch.clip_id.tolist() == [0, 2, 1]
    assert batch.identity.tolist() == [0, 1, 0]


def test_items_match_the_clip_they_come_from() -> None:
    dm = _dm()
    ds = dm.dataset("train")
    index = 5
    item, clip = ds[index], ds.clip(index)
    assert ds.identity_of(index) == item["identity"] == 2
    torch.testing.assert_close(item["video"], torch.from_numpy(clip.frames).permute(0, 3, 1, 2) * 2 - 1)
    torch.testing.assert_close(item["ref_face"], torch.from_numpy(clip.ref_face).permute(2, 0, 1) * 2 - 1)
    # the in-clip reference is one frame of the clip, whitened outside its head
    j = ds.intra_frame(index)
    assert 0 <= j < 5
    torch.testing.assert_close(item["intra_kps"], item["kps"][j])
    torch.testing.assert_close(item["intra_mask"], item["face_mask"][j])
    head = torch.from_numpy(clip.head_alpha[j])
    frame = item["video"][j]
    torch.testing.assert_close(item["intra_face"], frame * head + (1 - head), atol=1e-5, rtol=0)
    assert ds.seeds(index) == (identity_seed("train", 2), ds.seeds(index)[1])


def test_first_frame_reference_is_the_clips_own_first_frame_in_every_split() -> None:
    dm = _dm(reference_image="first_frame")
    for split in ("train", "test"):
        ds = dm.dataset(split)
        item, clip = ds[3], ds.clip(3)
        assert ds.intra_frame(3) == 0
        for face, kps, mask in (("ref_face", "ref_kps", "ref_mask"), ("intra_face", "intra_kps", "intra_mask")):
            torch.testing.assert_close(item[face], item["video"][0])  # background included, not whitened
            torch.testing.assert_close(item[kps], item["kps"][0])
            torch.testing.assert_close(item[mask], item["face_mask"][0])
        # Not vacuous: the identity reference of the same clip is another image.
        assert not torch.allclose(item["ref_face"], torch.from_numpy(clip.ref_face).permute(2, 0, 1) * 2 - 1)


def test_splits_hold_disjoint_identities_and_videos() -> None:
    dm = _dm(num_train_identities=50, num_val_identities=10, num_test_identities=10)
    id_seeds, video_seeds = {}, {}
    for split in ("train", "val", "test"):
        ds = dm.dataset(split)
        seeds = [ds.seeds(i) for i in range(len(ds))]
        id_seeds[split] = {s for s, _ in seeds}
        video_seeds[split] = {v for _, v in seeds}
        assert len(video_seeds[split]) == len(ds)  # every clip its own video
        assert len(id_seeds[split]) == ds.num_identities
    for a in id_seeds:
        for b in id_seeds:
            if a != b:
                assert not id_seeds[a] & id_seeds[b]
                assert not video_seeds[a] & video_seeds[b]
    # and disjoint from the identities the stand-in encoders and the evaluator train on
    others = {identity_seed(s, i) for s in ("encoder", "evaluator") for i in range(100)}
    assert not others & set().union(*id_seeds.values())
    # `seed` changes videos, never identities
    other = _dm(num_train_identities=50, seed=1).dataset("train")
    assert {other.seeds(i)[0] for i in range(len(other))} == id_seeds["train"]
    assert not {other.seeds(i)[1] for i in range(len(other))} & video_seeds["train"]


def test_workers_give_the_same_batches_as_the_main_process() -> None:
    # The training stream is endless (resumable by position); compare its first batches.
    main = list(islice(_dm(num_workers=0).train_dataloader(), 3))
    workers = list(islice(_dm(num_workers=2).train_dataloader(), 3))
    assert len(main) == len(workers) == 3
    for a, b in zip(main, workers):
        _assert_batches_equal(a, b)
    # shuffling is seeded: a fresh module sees the same order, another seed another order
    order = [b.clip_id.tolist() for b in main]
    assert order == [b.clip_id.tolist() for b in islice(_dm().train_dataloader(), 3)]
    assert order != [b.clip_id.tolist() for b in islice(_dm(seed=3).train_dataloader(), 3)]


def test_training_stream_starts_at_the_trainers_position() -> None:
    class _Trainer:
        global_step, accumulate_grad_batches, world_size, global_rank = 2, 1, 1, 0

    dm = _dm()
    stream = [b.clip_id.tolist() for b in islice(dm.train_dataloader(), 4)]
    dm.trainer = _Trainer()
    resumed = [b.clip_id.tolist() for b in islice(dm.train_dataloader(), 2)]
    assert resumed == stream[2:]


def test_fixed_test_clips_are_stable() -> None:
    dm = _dm()
    a, b = dm.fixed_batch("test", 3), _dm().fixed_batch("test", 3)
    _assert_batches_equal(a, b)
    assert a.identity.tolist() == [0, 1, 2]
    clips = dm.fixed_clips("test", 2)
    assert np.array_equal(clips[1].frames, dm.dataset("test").clip(2).frames)
    with pytest.raises(ValueError, match="num"):
        dm.fixed_indices("test", 4)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_test_identities": SPLIT_CAPACITY + 1}, "num_test_identities"),
        ({"num_train_identities": 0}, "num_train_identities"),
        ({"clips_per_identity": 0}, "clips_per_identity"),
        ({"batch_size": 0}, "batch_size"),
        ({"height": 8}, "height"),
        ({"num_frames": 4}, "num_frames"),
        ({"identity_mode": "none"}, "identity_mode"),
        ({"reference_image": "frame"}, "reference_image"),
    ],
)
def test_bad_settings_raise_before_any_work(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SyntheticDataModule(**{**TINY, **kwargs})


def test_dataset_rejects_bad_indices_and_splits() -> None:
    ds = SyntheticClipDataset("val", 2, 2, SyntheticConfig(**TINY))
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ValueError, match="split"):
        SyntheticClipDataset("holdout", 2, 2, SyntheticConfig(**TINY))
    assert set(SPLITS) >= {"train", "val", "test", "encoder", "evaluator"}
    with pytest.raises(ValueError, match="empty"):
        collate_video_batch([])


def test_memory_cache_renders_each_training_clip_once_and_serves_the_same_batches(monkeypatch) -> None:
    from consisid_lab.data import datamodule

    calls: list[tuple[int, int]] = []
    render = datamodule.make_clip

    def counting(cfg, id_seed, vid_seed):
        calls.append((id_seed, vid_seed))
        return render(cfg, id_seed, vid_seed)

    monkeypatch.setattr(datamodule, "make_clip", counting)
    plain, kept = _dm(memory_cache=False, batch_size=2), _dm(memory_cache=True, batch_size=2)
    n = len(kept.dataset("train"))  # 8 clips: 4 batches a pass; the stream runs on, pass after pass
    for a, b in islice(zip(plain.train_dataloader(), kept.train_dataloader()), 3 * n // 2):
        _assert_batches_equal(a, b)
    assert len(calls) == 3 * n + n  # the plain module renders every pass, the kept one the first pass only
    assert kept.dataset("val")._memory is None  # evaluation splits are read once per pass: not kept


# ------------------------------------------------------------------------------------------------ cache


def test_cache_hits_and_returns_identical_clips(tmp_path) -> None:
    cfg = SyntheticConfig(**TINY)
    cache = ClipCache(tmp_path, cfg)
    first = cache.get(3, 4)
    assert (cache.misses, cache.hits) == (1, 0)
    again = ClipCache(tmp_path, cfg).get(3, 4)  # a fresh process would see the same directory
    fresh = make_clip(cfg, 3, 4)
    for name in ("frames", "keypoints", "masks", "boxes", "ref_face", "ref_mask", "head_alpha"):
        assert np.array_equal(getattr(again, name), getattr(fresh, name)), name
        assert np.array_equal(getattr(first, name), getattr(fresh, name)), name
    assert again.caption == fresh.caption and again.identity == fresh.identity
    # another config lives in another directory
    assert ClipCache(tmp_path, SyntheticConfig(**{**TINY, "high_strength": 0.5})).dir != cache.dir
    assert config_hash(cfg) != config_hash(SyntheticConfig())


def _tamper_header(path, **changes) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays["header"]))
    header.update(changes)
    arrays["header"] = np.array(json.dumps(header))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage", ["stale", "corrupt_bytes", "altered_pixels"])
def test_bad_cache_entries_are_logged_and_rebuilt(tmp_path, caplog, damage: str) -> None:
    cfg = SyntheticConfig(**TINY)
    cache = ClipCache(tmp_path, cfg)
    cache.get(3, 4)
    path = cache.path(3, 4)
    if damage == "stale":
        _tamper_header(path, config_hash="0" * 64)
    elif damage == "corrupt_bytes":
        path.write_bytes(path.read_bytes()[:200])
    else:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["frames"] = arrays["frames"] * 0.5  # header intact, pixels not
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    reader = ClipCache(tmp_path, cfg)
    with caplog.at_level(logging.WARNING, logger="consisid_lab.data.cache"):
        clip = reader.get(3, 4)
    assert reader.rebuilds == 1 and reader.hits == 0
    assert any("re-rendering" in r.getMessage() for r in caplog.records)
    assert np.array_equal(clip.frames, make_clip(cfg, 3, 4).frames)
    # the entry was rewritten and is good again
    healthy = ClipCache(tmp_path, cfg)
    healthy.get(3, 4)
    assert healthy.hits == 1 and healthy.rebuilds == 0


def test_datamodule_reads_through_the_cache(tmp_path) -> None:
    dm = _dm(cache_dir=str(tmp_path))
    batch = next(iter(dm.val_dataloader()))
    assert len(list(tmp_path.rglob("*.npz"))) == 3
    _assert_batches_equal(batch, next(iter(_dm(cache_dir=str(tmp_path)).val_dataloader())))
    _assert_batches_equal(batch, next(iter(_dm().val_dataloader())))


def test_evaluation_batches_interleave_identities() -> None:
    """Val / test batches come clip-major: each batch holds distinct identities (the shuffled-reference controls
    need another identity in the batch), and every clip is served exactly once."""
    dm = _dm(num_val_identities=5, num_test_identities=6, clips_per_identity=4, batch_size=4)
    for loader, n in ((dm.val_dataloader(), 5), (dm.test_dataloader(), 6)):
        batches = list(loader)
        first = batches[0]
        assert len(set(first.identity.tolist())) == 4, first.identity.tolist()
        seen = [(int(i), int(c)) for b in batches for i, c in zip(b.identity, b.clip_id)]
        assert len(seen) == len(set(seen)) == n * 4
        # the first n clips served are the first clip of every identity
        assert sorted(i for i, _ in seen[:n]) == list(range(n))
