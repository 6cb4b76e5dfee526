"""Tiny real-face videos for the data tests: frames cut from ``skimage.data.astronaut()`` (a real face MediaPipe
finds), a two-person clip, a face-free clip from ``skimage.data.coffee()``, and the two dataset layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from consisid_lab.data.video_io import write_video

SIZE = 96  # frame side of the test videos


def _resize(image: np.ndarray, w: int, h: int) -> np.ndarray:
    import cv2

    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


def face_frames(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """``(n, size, size, 3)``: the astronaut's head, shifted and zoomed a little per frame."""
    from skimage.data import astronaut

    a = astronaut()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        dx, dy = rng.integers(-12, 13, size=2)
        side = int(rng.integers(236, 276))
        x0, y0 = 100 + int(dx), max(0, int(dy))
        out.append(_resize(a[y0 : y0 + side, x0 : x0 + side], size, size))
    return np.stack(out)


def two_person_frames(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n, SIZE, 2 * SIZE, 3)`` with a large face on the left and a small one on the right; their face boxes."""
    from skimage.data import astronaut

    crop = astronaut()[0:256, 100:356]
    big = _resize(crop, SIZE, SIZE)
    small = _resize(crop, SIZE // 2, SIZE // 2)
    frames = []
    rng = np.random.default_rng(seed)
    for _ in range(n):
        canvas = np.full((SIZE, 2 * SIZE, 3), 200, np.uint8)
        canvas[:, :SIZE] = big
        oy = SIZE // 4 + int(rng.integers(-3, 4))
        canvas[oy : oy + SIZE // 2, SIZE + SIZE // 4 : SIZE + 3 * SIZE // 4] = small
        frames.append(canvas)
    # Face boxes of the two heads (the astronaut's face spans about 0.25..0.75 of the crop).
    big_box = np.array([0.15, 0.15, 0.75, 0.75]) * SIZE
    small_box = (
        np.array([SIZE * 1.25, oy, SIZE * 1.75, oy + SIZE / 2]) + np.array([0.15, 0.15, -0.25, -0.25]) * SIZE / 2
    )
    return np.stack(frames), big_box.astype(np.float32), small_box.astype(np.float32)


def coffee_frames(n: int, size: int = SIZE) -> np.ndarray:
    from skimage.data import coffee

    c = coffee()
    return np.stack([_resize(c[i * 4 : i * 4 + 400, i * 4 : i * 4 + 400], size, size) for i in range(n)])


# Square crops (side, x0, y0) of scikit-image's cat photo in which MediaPipe's detector sees a face in fur.
CAT_CROPS = ((300, 0, 0), (200, 60, 60), (200, 120, 0), (250, 0, 30), (300, 10, 0), (300, 20, 0), (280, 5, 5))


def cat_frames(n: int, size: int = SIZE) -> np.ndarray:
    """``(n, size, size, 3)``: a cat (``skimage.data.chelsea()``), framed so that the face detector fires on it."""
    from skimage.data import chelsea

    c = chelsea()
    crops = [CAT_CROPS[i % len(CAT_CROPS)] for i in range(n)]
    return np.stack([_resize(c[y : y + s, x : x + s], size, size) for s, x, y in crops])


def write_corrupt(path: Path) -> None:
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)


def make_folder_dataset(root: Path, n_faces: int = 3, frames: int = 12, caption_csv: bool = True) -> dict[str, Path]:
    """Face videos with ``.txt`` captions (and one captioned in ``captions.csv``), a corrupt video, a video without a
    caption and a face-free clip."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i in range(n_faces):
        p = root / f"face{i}.mp4"
        write_video(p, face_frames(frames, seed=i))
        p.with_suffix(".txt").write_text(f"a person talking, take {i}")
        paths[f"face{i}"] = p
    sub = root / "sub"
    sub.mkdir(exist_ok=True)
    p = sub / "csvface.mp4"
    write_video(p, face_frames(frames, seed=10))
    paths["csvface"] = p
    if caption_csv:
        (root / "captions.csv").write_text('path,caption\nsub/csvface.mp4,"a person, captioned in a table"\n')
    p = root / "nocap.mp4"
    write_video(p, face_frames(frames, seed=11))
    paths["nocap"] = p
    p = root / "corrupt.mp4"
    write_corrupt(p)
    p.with_suffix(".txt").write_text("a broken file")
    paths["corrupt"] = p
    p = root / "coffee.mp4"
    write_video(p, coffee_frames(frames))
    p.with_suffix(".txt").write_text("a cup of coffee")
    paths["coffee"] = p
    return paths


def _box_obj(part: str, box, track: int, confidence: float = 0.95) -> dict:
    x1, y1, x2, y2 = (float(v) for v in box)
    return {
        "name": part.upper() if part == "face" else part,
        "class": 0,
        "confidence": confidence,
        "box": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
        "track_id": track,
        "new_track_id": track,
    }


def _save_mask16(path: Path, shape: tuple[int, int], box, value: int) -> None:
    """A 16-bit PNG as the release writes them: ``value`` (the mask id) inside ``box``, 0 elsewhere."""
    from PIL import Image

    m = np.zeros(shape, np.uint16)
    if box is not None:
        x0, y0, x1, y1 = np.round(box).astype(int)
        m[y0:y1, x0:x1] = value
    Image.fromarray(m).save(path)  # uint16 arrays are saved as mode "I;16"


def write_released_clip(anno: Path, stem: str, frames: np.ndarray, tracks: dict[int, dict], fps: float = 8.0) -> dict:
    """One clip in the released layout under ``anno`` (``videos/``, ``refine_bbox_jsons/``, ``track_masks_data/``).

    ``tracks``: ``track id -> {"box": face box (4,), "mask_ids": {"face": id, "head": id, "person": id},
    "valid": frames, "mask_box": frame -> box of the face mask (default: the face box), "confidence": 0.95}``.
    Returns the caption row.
    """
    n, h, w = frames.shape[:3]
    (anno / "videos").mkdir(parents=True, exist_ok=True)
    write_video(anno / "videos" / f"{stem}.mp4", frames, fps=fps)
    boxes: dict[str, dict] = {str(t): {"face": [], "head": [], "person": []} for t in range(n)}
    valid, control, corresponding = {}, {}, {}
    track_dir = anno / "track_masks_data" / stem
    for tid, tr in tracks.items():
        box = np.asarray(tr["box"], np.float32)
        head = box + np.array([-4, -8, 4, 2], np.float32)
        frames_valid = sorted(tr["valid"])
        for t in frames_valid:
            conf = tr.get("confidence", 0.95)
            boxes[str(t)]["face"].append(_box_obj("face", box, tid, conf))
            boxes[str(t)]["head"].append(_box_obj("head", head, tid, conf))
        valid[str(tid)] = {"face": frames_valid, "head": frames_valid, "person": frames_valid}
        control[str(tid)] = {"face": frames_valid[0], "head": frames_valid[0], "person": frames_valid[0]}
        corresponding[str(tid)] = dict(tr["mask_ids"])
        for part in ("face", "head"):  # the person masks are never read; the fixture leaves them out
            mid = tr["mask_ids"][part]
            d = track_dir / "tracking_mask_results" / str(mid)
            d.mkdir(parents=True, exist_ok=True)
            for t in range(n):
                mbox = tr.get("mask_box", {}).get(t, box if t in tr["valid"] else None)
                _save_mask16(d / f"annotated_frame_{t:05d}.png", (h, w), mbox if part == "face" else head, mid)
    (anno / "refine_bbox_jsons").mkdir(parents=True, exist_ok=True)
    (anno / "refine_bbox_jsons" / f"{stem}.json").write_text(json.dumps(boxes))
    track_dir.mkdir(parents=True, exist_ok=True)
    (track_dir / "valid_frame.json").write_text(json.dumps(valid))
    (track_dir / "control_sam2_frame.json").write_text(json.dumps(control))
    (track_dir / "corresponding_data.json").write_text(json.dumps(corresponding))
    return {
        "path": f"{stem}.mp4",
        "cap": f"a clip called {stem}",
        "size": (anno / "videos" / f"{stem}.mp4").stat().st_size,
        "resolution": {"height": h, "width": w},
        "fps": fps,
        "duration": n / fps,
    }


def write_released_list(root: Path, name: str, rows: list[dict]) -> Path:
    """``<root>/<name>/captions/<name>_captions.json`` and ``<root>/total_train_data.txt`` (paths relative to root)."""
    (root / name / "captions").mkdir(parents=True, exist_ok=True)
    (root / name / "captions" / f"{name}_captions.json").write_text(json.dumps(rows, indent=1))
    listing = root / "total_train_data.txt"
    listing.write_text(f"{name}/videos,{name}/captions/{name}_captions.json,{name}\n")
    return listing


RELEASED_FRAMES = 52  # >= 49, the release's minimum


def make_consisid_dataset(root: Path, frames: int = RELEASED_FRAMES) -> dict:
    """A dataset in the released layout under ``root`` (lists relative to ``root``):

    - ``solo``: one person (track 1, mask ids 1 / 2 / 3 as in the release's demo clip), valid in frames 0..9 and
      20..end (a gap wider than the tolerance); in frames before 20 the face mask sits in the wrong place, so a clip
      sampled outside the longest valid segment shows up in its masks.
    - ``duo``: two people, track 1 the small face on the right, track 2 the large one on the left, mask ids 11 / 12
      and 21 / 22 (so the folder named by the track id, which the released loader reads, does not exist).
    - ``solo_b``: another single-person clip (track 4), valid everywhere.
    - a row without a caption, a row whose video is absent and a row under 49 frames.
    """
    anno = root / "data"
    single = face_frames(frames, seed=3)
    solo_box = np.array([14.0, 14.0, 72.0, 72.0], np.float32)
    wrong = np.array([70.0, 70.0, 94.0, 94.0], np.float32)
    solo_valid = [*range(0, 10), *range(20, frames)]
    rows = [
        write_released_clip(
            anno,
            "solo",
            single,
            {
                1: {
                    "box": solo_box,
                    "mask_ids": {"face": 1, "head": 2, "person": 3},
                    "valid": solo_valid,
                    "mask_box": {t: wrong for t in range(20)},
                }
            },
        )
    ]
    group, big_box, small_box = two_person_frames(frames)
    everywhere = list(range(frames))
    rows.append(
        write_released_clip(
            anno,
            "duo",
            group,
            {
                1: {"box": small_box, "mask_ids": {"face": 11, "head": 12, "person": 13}, "valid": everywhere},
                2: {"box": big_box, "mask_ids": {"face": 21, "head": 22, "person": 23}, "valid": everywhere},
            },
        )
    )
    rows[-1]["cap"] = "two people, one close to the camera"
    other = face_frames(frames, seed=5)
    rows.append(
        write_released_clip(
            anno,
            "solo_b",
            other,
            {4: {"box": solo_box, "mask_ids": {"face": 7, "head": 8, "person": 9}, "valid": everywhere}},
        )
    )
    rows.append({**rows[0], "path": "no_caption.mp4", "cap": ""})
    rows.append({**rows[0], "path": "absent.mp4", "cap": "a clip whose video is not there"})
    rows.append({**rows[0], "path": "short.mp4", "cap": "listed as too short", "duration": 40 / 8.0})
    listing = write_released_list(root, "data", rows)
    h, w = group.shape[1:3]
    return {"list": listing, "big_box": big_box, "small_box": small_box, "size": (h, w), "solo_box": solo_box}
