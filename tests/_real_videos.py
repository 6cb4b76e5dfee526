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


def make_consisid_dataset(root: Path, frames: int = 12) -> dict:
    """A ConsisID-layout dataset: one single-person clip and one two-person clip (track 0 = the small face, track
    1 = the large one, so picking folder 0 would be wrong), per-frame boxes, per-track mask PNGs."""
    from PIL import Image

    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / "bbox").mkdir(exist_ok=True)
    rows = []
    info: dict = {}

    single = face_frames(frames, seed=3)
    write_video(root / "videos" / "solo.mp4", single)
    boxes = {str(t): {"face": [{"track_id": 0, "box": [14.0, 14.0, 72.0, 72.0]}], "head": [], "person": []}
             for t in range(frames)}  # fmt: skip
    (root / "bbox" / "solo.json").write_text(json.dumps(boxes))
    rows.append({"path": "videos/solo.mp4", "cap": ["a person looks around"], "fps": 8})

    group, big_box, small_box = two_person_frames(frames)
    write_video(root / "videos" / "duo.mp4", group)
    boxes = {
        str(t): {
            "face": [
                {"track_id": 0, "box": small_box.tolist()},
                {"track_id": 1, "box": big_box.tolist()},
            ],
            "head": [],
            "person": [],
        }
        for t in range(frames)
    }
    (root / "bbox" / "duo.json").write_text(json.dumps(boxes))
    h, w = group.shape[1:3]
    for tid, box in ((0, small_box), (1, big_box)):
        d = root / "masks" / "duo" / str(tid)
        d.mkdir(parents=True, exist_ok=True)
        m = np.zeros((h, w), np.uint8)
        x0, y0, x1, y1 = np.round(box).astype(int)
        m[y0:y1, x0:x1] = 255
        for t in range(frames):
            Image.fromarray(m).save(d / f"{t:05d}.png")
    rows.append({"path": "videos/duo.mp4", "cap": "two people, one close to the camera", "fps": 8})
    rows.append({"path": "videos/missing_caption.mp4", "cap": ""})
    (root / "captions_a.json").write_text(json.dumps(rows))
    (root / "total_train_data.txt").write_text("captions_a.json\n")
    info.update(big_box=big_box, small_box=small_box, size=(h, w))
    return info
