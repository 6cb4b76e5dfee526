"""The released ConsisID training-data layout (``../shared/RELEASED_FORMAT.md``), read as it is.

::

    total_train_data.txt                 VIDEOS_DIR,CAPTIONS_JSON,ANNO_BASE   (one dataset per line; relative paths
                                         are relative to the data root, the directory the release trains from)
    <ANNO_BASE>/refine_bbox_jsons/<stem>.json
        {"<frame>": {"face" | "head" | "person": [{"confidence", "box": {"x1", "y1", "x2", "y2"}, "new_track_id",
        ...}, ...]}}
    <ANNO_BASE>/track_masks_data/<stem>/
        valid_frame.json                 {"<track>": {"face": [frames], "head": [...], "person": [...]}}
        control_sam2_frame.json          {"<track>": {"face": frame, ...}}   (where the mask tracker was prompted)
        corresponding_data.json          {"<track>": {"face": mask id, ...}}
        tracking_mask_results/<mask id>/annotated_frame_<frame:05d>.png   16-bit, value = mask id inside, 0 outside

This module turns one clip's annotation files into a :class:`ClipAnnotations` (tracks with their confidence-filtered
boxes, valid frames and mask folders) and samples a clip's frames from the longest valid segment of the chosen track,
as the released loader does (union of the track's valid face and head frames, gaps of up to ``tolerance`` frames
bridged). What differs from the released loader, on purpose:

- the mask of a track is read from the folder that ``corresponding_data.json`` names for it (the released loader
  reads the folder named by the track id, which is another part or another person in a multi-person clip);
- the track and the clip position are chosen by a fixed policy (not at random per step), so that a clip's content is
  a function of the config and can be cached;
- a segment too short for the clip is skipped as ``too short`` instead of padded by repeating frames.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from consisid_lab.data.video_io import VideoDecodeError, clip_indices, clip_span

logger = logging.getLogger(__name__)

TRAIN_LIST_NAME = "total_train_data.txt"
BOX_DIR = "refine_bbox_jsons"
TRACK_DIR = "track_masks_data"
VALID_FRAME_FILE = "valid_frame.json"
CONTROL_FRAME_FILE = "control_sam2_frame.json"
CORRESPONDING_FILE = "corresponding_data.json"
MASK_RESULTS_DIR = "tracking_mask_results"
MASK_FILE = "annotated_frame_{:05d}.png"
BOX_PARTS = ("face", "head", "person")
# Parts a track needs to be trainable (the released loader keeps only tracks with both).
REQUIRED_PARTS = ("face", "head")
# Released defaults: clips under 49 frames (fps x duration) are dropped from the list; boxes above this confidence
# count; valid frames closer than `tolerance` are one segment (the shipped scripts' `miss_tolerance`).
MIN_SOURCE_FRAMES = 49
BOX_CONFIDENCE = 0.88
SEGMENT_TOLERANCE = 6
TRACK_POLICIES = ("largest", "longest")


class AnnotationError(ValueError):
    """Annotation files of a clip that cannot be used; ``reason`` is the short tag recorded in ``skipped.jsonl``."""

    def __init__(self, message: str, reason: str = "bad annotation") -> None:
        self.reason = reason
        super().__init__(message)


# ------------------------------------------------------------------------------------------------- the list
@dataclass(frozen=True)
class ListedDataset:
    """One line of ``total_train_data.txt``."""

    videos_dir: Path
    captions_json: Path
    anno_base: Path
    line: int


def read_train_list(list_path: str | Path, root: str | Path) -> list[ListedDataset]:
    """The datasets of a released ``total_train_data.txt``; relative paths are taken relative to ``root``."""
    list_path, root = Path(list_path), Path(root)
    if not list_path.is_file():
        raise FileNotFoundError(
            f"data.list={list_path} does not exist; point it at the released {TRAIN_LIST_NAME} "
            "(lines VIDEOS_DIR,CAPTIONS_JSON,ANNO_BASE)"
        )
    out = []
    for n, raw in enumerate(list_path.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        parts = [p.strip() for p in raw.split(",")]
        if len(parts) != 3 or not all(parts):
            raise ValueError(
                f"{list_path}:{n}: expected VIDEOS_DIR,CAPTIONS_JSON,ANNO_BASE (three comma-separated paths), "
                f"got {raw.strip()!r}"
            )
        videos, captions, anno = (Path(p) if Path(p).is_absolute() else root / p for p in parts)
        if not captions.is_file():
            raise FileNotFoundError(
                f"{list_path}:{n}: caption JSON {captions} does not exist; relative paths in the list are taken "
                f"relative to data.root={root} (set data.root to the directory the list was written for)"
            )
        out.append(ListedDataset(videos, captions, anno, n))
    if not out:
        raise ValueError(f"{list_path} lists no dataset")
    return out


def read_captions(path: Path) -> list[dict]:
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        kind = type(rows).__name__
        raise ValueError(f"{path}: expected a JSON list of {{path, cap, fps, duration, ...}}, got a {kind}")
    return rows


def listed_frames(row: dict) -> float | None:
    """``fps x duration`` of a caption row (what the release filters on), or ``None`` when it does not say."""
    fps, duration = row.get("fps"), row.get("duration")
    if isinstance(fps, int | float) and isinstance(duration, int | float):
        return float(fps) * float(duration)
    return None


# ------------------------------------------------------------------------------------------ one clip's files
@dataclass
class TrackAnnotation:
    """One person (``new_track_id``) of a clip."""

    track_id: int
    boxes: dict[str, dict[int, np.ndarray]]  # part -> frame -> (4,) xyxy pixels, boxes above the confidence only
    valid: dict[str, list[int]]  # part -> frames where the mask tracker has the part
    control: dict[str, int]  # part -> frame where the mask tracker was prompted
    mask_ids: dict[str, int]  # part -> mask id (folder name and pixel value under tracking_mask_results)

    def face_boxes(self) -> dict[int, np.ndarray]:
        """Frame -> face box, the head box where the face detector has none."""
        return {**self.boxes.get("head", {}), **self.boxes.get("face", {})}

    def mean_face_area(self) -> float:
        boxes = self.face_boxes()
        if not boxes:
            return 0.0
        b = np.stack(list(boxes.values()))
        return float(np.mean((b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)))


@dataclass
class ClipAnnotations:
    """The annotation files of one clip, parsed."""

    stem: str
    track_dir: Path
    tracks: dict[int, TrackAnnotation] = field(default_factory=dict)

    def mask_folder(self, track: TrackAnnotation, part: str) -> Path:
        if part not in track.mask_ids:
            raise AnnotationError(
                f"{self.track_dir / CORRESPONDING_FILE}: track {track.track_id} has no {part!r} mask id "
                f"(has {sorted(track.mask_ids)}); pick data.mask_part from those",
                reason="missing masks",
            )
        folder = self.track_dir / MASK_RESULTS_DIR / str(track.mask_ids[part])
        if not folder.is_dir():
            raise AnnotationError(
                f"{folder}: mask folder of track {track.track_id} ({part}) does not exist", reason="missing masks"
            )
        return folder

    def read_masks(self, track: TrackAnnotation, part: str, frames: list[int]) -> list[np.ndarray]:
        """``(H, W)`` bool masks of ``part`` of ``track`` at ``frames``."""
        from PIL import Image

        folder = self.mask_folder(track, part)
        out = []
        for i in frames:
            path = folder / MASK_FILE.format(int(i))
            if not path.is_file():
                raise AnnotationError(f"{path}: mask of frame {i} does not exist", reason="missing masks")
            try:
                with Image.open(path) as im:
                    # 16-bit PNGs ("I;16"): read the values, never through an 8-bit conversion that could clip them.
                    out.append(np.asarray(im) > 0)
            except OSError as e:  # PIL's UnidentifiedImageError is an OSError
                raise AnnotationError(f"{path}: unreadable mask ({e})") from e
        return out


def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise AnnotationError(f"{path}: {what} does not exist", reason="missing annotation")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _box(obj: dict) -> np.ndarray:
    b = obj["box"]
    return np.array([b["x1"], b["y1"], b["x2"], b["y2"]], np.float32)


def load_clip_annotations(anno_base: Path, stem: str, confidence: float = BOX_CONFIDENCE) -> ClipAnnotations:
    """Parse the box file and the track files of clip ``stem`` under ``anno_base``."""
    box_path = anno_base / BOX_DIR / f"{stem}.json"
    track_dir = anno_base / TRACK_DIR / stem
    if not track_dir.is_dir():
        raise AnnotationError(f"{track_dir}: the clip's track folder does not exist", reason="missing annotation")
    boxes = _load_json(box_path, "box file")
    valid = _load_json(track_dir / VALID_FRAME_FILE, VALID_FRAME_FILE)
    control = _load_json(track_dir / CONTROL_FRAME_FILE, CONTROL_FRAME_FILE)
    corresponding = _load_json(track_dir / CORRESPONDING_FILE, CORRESPONDING_FILE)
    ann = ClipAnnotations(stem, track_dir)
    try:
        per_track: dict[int, dict[str, dict[int, np.ndarray]]] = {}
        for frame, parts in boxes.items():
            for part in BOX_PARTS:
                for obj in (parts or {}).get(part, []) or []:
                    if float(obj.get("confidence", 1.0)) <= confidence:
                        continue
                    tid = int(obj["new_track_id"])
                    per_track.setdefault(tid, {}).setdefault(part, {})[int(frame)] = _box(obj)
        for key, ids in corresponding.items():
            tid = int(key)
            ann.tracks[tid] = TrackAnnotation(
                track_id=tid,
                boxes=per_track.get(tid, {}),
                valid={p: sorted(int(i) for i in v) for p, v in (valid.get(key) or {}).items()},
                control={p: int(v) for p, v in (control.get(key) or {}).items()},
                mask_ids={p: int(v) for p, v in ids.items()},
            )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AnnotationError(f"{box_path} / {track_dir}: malformed annotation ({type(e).__name__}: {e})") from e
    return ann


# ---------------------------------------------------------------------------------------- track and frames
def choose_track(ann: ClipAnnotations, policy: str | int = "largest") -> TrackAnnotation:
    """The person a sample is built from: a track id, the largest mean face box or the most valid frames.

    Only tracks with face and head masks are candidates (as in the released loader); the chosen one must have boxes
    in the box file.
    """
    candidates = {t: tr for t, tr in ann.tracks.items() if all(p in tr.mask_ids for p in REQUIRED_PARTS)}
    where = ann.track_dir / CORRESPONDING_FILE
    if isinstance(policy, int) or (isinstance(policy, str) and policy.lstrip("-").isdigit()):
        tid = int(policy)
        if tid not in candidates:
            raise AnnotationError(
                f"{where}: track {tid} is not a track with face and head masks (tracks: {sorted(candidates)})",
                reason="missing track",
            )
        track = candidates[tid]
    elif policy in TRACK_POLICIES:
        if not candidates:
            raise AnnotationError(f"{where}: no track with face and head masks", reason="missing track")
        if policy == "largest":
            track = candidates[max(sorted(candidates), key=lambda t: candidates[t].mean_face_area())]
        else:
            track = candidates[max(sorted(candidates), key=lambda t: len(valid_frames(candidates[t])))]
    else:
        raise ValueError(f"unknown track policy {policy!r}; pick one of {TRACK_POLICIES} or a track id")
    if not track.face_boxes():
        raise AnnotationError(
            f"{ann.track_dir.parent.parent / BOX_DIR / (ann.stem + '.json')}: no face or head box of track "
            f"{track.track_id} above the confidence threshold",
            reason="missing track",
        )
    return track


def valid_frames(track: TrackAnnotation) -> list[int]:
    """Frames where the track has its face or its head."""
    return sorted(set(track.valid.get("face", [])) | set(track.valid.get("head", [])))


def valid_segments(frames: list[int], tolerance: int = SEGMENT_TOLERANCE) -> list[list[int]]:
    """Runs of sorted ``frames`` in which neighbours are at most ``tolerance`` frames apart."""
    segments: list[list[int]] = []
    for f in sorted(set(frames)):
        if segments and f - segments[-1][-1] <= tolerance:
            segments[-1].append(f)
        else:
            segments.append([f])
    return segments


def segment_clip_indices(
    track: TrackAnnotation,
    total: int,
    num_frames: int,
    stride: int,
    skip_head: int,
    skip_tail: int,
    position: float,
    tolerance: int,
    path: str | Path,
) -> np.ndarray:
    """Source frames ``(num_frames,)`` of a clip inside the longest valid segment of ``track`` (its first frames
    after ``skip_head`` and before ``skip_tail`` of the segment), placed at ``position``."""
    segments = valid_segments([f for f in valid_frames(track) if f < total], tolerance)
    if not segments:
        raise AnnotationError(f"{path}: track {track.track_id} has no valid frame", reason="missing track")
    seg = max(segments, key=len)  # the first of equally long ones
    lo, hi = seg[0] + skip_head, seg[-1] + 1 - skip_tail
    if hi - lo < clip_span(num_frames, stride):
        raise VideoDecodeError(
            path,
            "too short",
            f"the longest valid segment of track {track.track_id} is frames {seg[0]}..{seg[-1]}; with "
            f"{skip_head} + {skip_tail} skipped a clip of {num_frames} frames at stride {stride} needs "
            f"{clip_span(num_frames, stride)}",
        )
    return clip_indices(hi, num_frames, stride, lo, 0, position, path)
