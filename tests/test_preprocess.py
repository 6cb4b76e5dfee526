"""`consisid_lab.preprocess` end to end on a tiny folder dataset with the stand-in encoders: cache contents, resume,
config-hash mismatch, parallel workers, and training-side reads of the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _real_videos import make_folder_dataset

pytest.importorskip("mediapipe")
pytest.importorskip("av")

from hydra import compose, initialize_config_dir  # noqa: E402

from consisid_lab.data.feature_cache import INDEX_FILE, CachedFeatureDataset, read_index  # noqa: E402
from consisid_lab.data.real import RealVideoDataset  # noqa: E402
from consisid_lab.data.skip_log import read_skipped  # noqa: E402
from consisid_lab.preprocess import Encoders, preprocess  # noqa: E402
from consisid_lab.utils.instantiate import instantiate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"face0.mp4", "face1.mp4", "face2.mp4", "sub/csvface.mp4"}


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory):
    from consisid_lab.encoders.store import load_standins
    from consisid_lab.encoders.training import Recipe

    d = tmp_path_factory.mktemp("standins")
    load_standins(d, recipe=Recipe.tiny())
    return d


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    make_folder_dataset(root)
    return root


def _cfg(dataset, standin_dir, run_dir, cache_dir, *extra: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "preprocess",
            overrides=[
                f"data.root={dataset}",
                f"paths.output_dir={run_dir}",
                f"paths.standin_dir={standin_dir}",
                f"cache_dir={cache_dir}",
                "standins_recipe=tiny",
                "data.height=32",
                "data.width=32",
                "data.num_frames=5",
                "data.stride=2",
                "data.val_fraction=0.2",
                "data.test_fraction=0.2",
                "model.text_encoder.dim=16",
                "model.text_encoder.max_length=8",
                "progress=false",
                "encode_batch_size=2",
                "shard_size=2",
                *extra,
            ],
        )


def test_end_to_end_cache_matches_the_on_the_fly_items(dataset, standin_dir, tmp_path):
    cfg = _cfg(dataset, standin_dir, tmp_path / "run", tmp_path / "cache")
    m = preprocess(cfg)
    assert m["clips_total"] == 6 and m["clips_built"] == 4 and m["clips_in_cache"] == 4
    assert m["skipped"] == {"missing caption": 1, "corrupt video": 1, "no face": 1}
    assert json.loads((tmp_path / "run" / "preprocess_metrics.json").read_text())["clips_built"] == 4
    assert {Path(r["path"]).name: r["reason"] for r in read_skipped(tmp_path / "run" / "skipped.jsonl")} == {
        "nocap.mp4": "missing caption",
        "corrupt.mp4": "corrupt video",
        "coffee.mp4": "no face",
    }
    folder = Path(m["cache_dir"])
    assert {r["key"] for r in read_index(folder)} == GOOD
    assert len(list((folder / "shards").glob("*.safetensors"))) >= 2  # shard_size=2: several shards

    dm = instantiate(cfg.data, skipped_path=None)
    encoders = Encoders(cfg)
    seen = 0
    for split in ("train", "val", "test"):
        live = RealVideoDataset(dm.entries()[split], dm.sampling)
        by_key = {e.key: i for i, e in enumerate(live.entries)}
        for item in CachedFeatureDataset(folder, split):
            ref = live.load(by_key[item["key"]])
            for name in ("video", "ref_face", "intra_face", "kps", "face_mask", "boxes", "ref_kps", "intra_mask"):
                assert torch.equal(item[name], ref[name]), name
            assert item["caption"] == ref["caption"] and item["clip_id"] == ref["clip_id"]
            cached = item["cached"]
            assert torch.allclose(cached["latents"], encoders.vae.encode(ref["video"][None])[0])
            assert torch.allclose(cached["text"], encoders.text([ref["caption"]])[0], atol=1e-6)
            feats = encoders.local(ref["intra_face"][None])
            for k, v in feats.vectors.items():
                assert torch.allclose(cached[f"id_vec/{k}"], v[0], atol=1e-5)
            for k, v in feats.tokens.items():
                assert torch.allclose(cached[f"id_tok/{k}"], v[0], atol=1e-5)
            ref_feats = encoders.local(ref["ref_face"][None])
            assert all(
                torch.allclose(cached[f"ref_id_vec/{k}"], v[0], atol=1e-5) for k, v in ref_feats.vectors.items()
            )
            seen += 1
    assert seen == 4


def test_resume_skips_finished_clips_and_hash_mismatch_rebuilds(dataset, standin_dir, tmp_path, monkeypatch):
    from consisid_lab.data.real import ClipBuilder

    built: list[str] = []
    build = ClipBuilder.build
    monkeypatch.setattr(ClipBuilder, "build", lambda self, e, **kw: built.append(e.key) or build(self, e, **kw))
    cfg = _cfg(dataset, standin_dir, tmp_path / "run", tmp_path / "cache")
    first = preprocess(cfg)
    folder = Path(first["cache_dir"])
    assert len(built) == 6 and first["clips_failed_before"] == 0
    built.clear()
    again = preprocess(cfg)
    assert again["clips_built"] == 0 and again["clips_cached_before"] == 4 and again["cache_dir"] == str(folder)
    # the corrupt and the face-free clip failed under this config: remembered, reported, not decoded again
    assert built == [] and again["clips_failed_before"] == 2
    assert again["skipped"] == {"missing caption": 1, "corrupt video": 1, "no face": 1}
    retried = preprocess(_cfg(dataset, standin_dir, tmp_path / "run_retry", tmp_path / "cache", "retry_failed=true"))
    assert sorted(built) == ["coffee.mp4", "corrupt.mp4"] and retried["clips_failed_before"] == 0
    assert retried["skipped"] == again["skipped"]  # they fail again, and are remembered again
    assert preprocess(cfg)["clips_failed_before"] == 2

    # an interrupted run: the last clip never reached the index -> only that clip is rebuilt
    lines = (folder / INDEX_FILE).read_text().splitlines()
    (folder / INDEX_FILE).write_text("\n".join(lines[:-1]) + "\n")
    resumed = preprocess(cfg)
    assert resumed["clips_built"] == 1 and resumed["clips_in_cache"] == 4

    # content settings change the key: a new folder, nothing reused
    taller = preprocess(_cfg(dataset, standin_dir, tmp_path / "run2", tmp_path / "cache", "data.height=48"))
    assert taller["cache_dir"] != str(folder) and taller["clips_cached_before"] == 0 and taller["clips_built"] == 4
    assert CachedFeatureDataset(taller["cache_dir"])[0]["video"].shape[-2:] == (48, 32)

    # a folder whose stored config does not match is rebuilt, not used
    cfg_file = folder / "config.json"
    stored = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**stored, "hash": "0" * 64}))
    rebuilt = preprocess(cfg)
    assert rebuilt["clips_cached_before"] == 0 and rebuilt["clips_built"] == 4


def test_training_reads_the_cache_and_refuses_a_mismatch(dataset, standin_dir, tmp_path):
    cache = tmp_path / "cache"
    cfg = _cfg(dataset, standin_dir, tmp_path / "run", cache)
    preprocess(cfg)
    dm = instantiate(cfg.data, feature_cache_dir=str(cache), skipped_path=None)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch.cached) >= {"latents", "text"} and any(k.startswith("id_vec/") for k in batch.cached)
    assert batch.cached["latents"].shape[:2] == (batch.batch_size, 2)  # 5 frames -> 2 latent frames (4k+1 -> k+1)
    assert batch.video.shape[1:] == (5, 3, 32, 32)

    other = _cfg(dataset, standin_dir, tmp_path / "run", cache, "data.num_frames=9")
    with pytest.raises(FileNotFoundError, match="no feature cache for this config"):
        instantiate(other.data, feature_cache_dir=str(cache), skipped_path=None).setup()


@pytest.mark.slow
def test_cli_with_parallel_workers(dataset, standin_dir, tmp_path):
    cmd = [
        sys.executable, "-m", "consisid_lab.preprocess", "data=folder", f"data.root={dataset}",
        f"hydra.run.dir={tmp_path / 'run'}", f"paths.standin_dir={standin_dir}", f"cache_dir={tmp_path / 'cache'}",
        "standins_recipe=tiny", "data.height=32", "data.width=32", "data.num_frames=5", "model.text_encoder.dim=16",
        "num_workers=2", "progress=false",
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "preprocess_metrics.json").read_text())
    assert metrics["clips_built"] == 4 and metrics["num_workers"] == 2 and metrics["skipped_total"] == 3
    assert (tmp_path / "run" / "skipped.jsonl").is_file()


@pytest.fixture(scope="module")
def cat_folder(tmp_path_factory):
    """Two clips of a real face, a cat the face detector fires on, a face in only the first few frames and a corrupt
    file (the folder a new user tried)."""
    import numpy as np
    from _real_videos import cat_frames, face_frames, write_corrupt

    from consisid_lab.data.video_io import write_video

    root = tmp_path_factory.mktemp("cat_folder")
    clips = {
        "face_a": face_frames(12, seed=1),
        "face_b": face_frames(12, seed=2),
        "cat": cat_frames(12),
        "brief": np.concatenate([face_frames(6, seed=3), cat_frames(6)]),  # sampled frames 2, 4 of 2..10 show the face
    }
    for name, frames in clips.items():
        write_video(root / f"{name}.mp4", frames)
        (root / f"{name}.txt").write_text(f"a clip called {name}")
    write_corrupt(root / "broken.mp4")
    (root / "broken.txt").write_text("a broken file")
    return root


def test_a_cat_and_a_corrupt_file_are_skipped_and_the_faces_cached(cat_folder, standin_dir, tmp_path):
    # what made the cat pass before: the detector and the mesh both find a "face" in most of its frames
    from _real_videos import cat_frames

    from consisid_lab.faces.analysis import FaceAnalyzer

    unchecked = FaceAnalyzer(mesh_agreement=None)
    assert sum(bool(unchecked(f)) for f in cat_frames(7)) >= 4
    unchecked.close()

    cfg = _cfg(
        cat_folder, standin_dir, tmp_path / "run", tmp_path / "cache", "data.val_fraction=0", "data.test_fraction=0"
    )
    m = preprocess(cfg)
    assert {r["key"] for r in read_index(Path(m["cache_dir"]))} == {"face_a.mp4", "face_b.mp4"}
    records = {Path(r["path"]).name: r for r in read_skipped(tmp_path / "run" / "skipped.jsonl")}
    assert {k: r["reason"] for k, r in records.items()} == {
        "cat.mp4": "no face",
        "brief.mp4": "no face",
        "broken.mp4": "corrupt video",
    }
    assert "found in 2 of 5 frames (40%)" in records["brief.mp4"]["detail"]  # the share is in the record
    assert m["skipped"] == {"no face": 2, "corrupt video": 1}


def test_released_layout_preprocesses_and_counts_each_reason(standin_dir, tmp_path):
    import json as _json
    import shutil

    from _real_videos import make_consisid_dataset

    root = tmp_path / "released"
    info = make_consisid_dataset(root)
    shutil.rmtree(root / "data" / "track_masks_data" / "solo" / "tracking_mask_results" / "1")
    boxes = _json.loads((root / "data" / "refine_bbox_jsons" / "duo.json").read_text())
    (root / "data" / "refine_bbox_jsons" / "duo.json").write_text(
        _json.dumps({t: {**parts, "face": [], "head": []} for t, parts in boxes.items()})
    )
    cfg = _cfg(
        root, standin_dir, tmp_path / "run", tmp_path / "cache", "data=consisid", f"data.list={info['list']}",
        "data.val_fraction=0", "data.test_fraction=0",
    )  # fmt: skip
    m = preprocess(cfg)
    assert {r["key"] for r in read_index(Path(m["cache_dir"]))} == {"data/videos/solo_b.mp4"}
    assert m["skipped"] == {
        "missing caption": 1, "missing video": 1, "too short": 1, "missing masks": 1, "missing track": 1,
    }  # fmt: skip
    (row,) = read_index(Path(m["cache_dir"]))
    assert row["track_id"] == 4 and row["face_share"] == 1.0
