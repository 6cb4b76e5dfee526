"""Real video datasets: the ConsisID data layout and a plain folder of captioned videos.

**ConsisID layout** (folder names configurable)::

    root/
      total_train_data.txt        # caption JSON files of the dataset, one per line (relative to root)
      <captions>.json             # list of {"path": "videos/a.mp4", "cap": "..." or ["...", ...], ...}
      bbox/<video stem>.json      # per frame: {"<frame>": {"face": [{"track_id": 0, "box": [x0, y0, x1, y1]}, ...],
                                  #                          "head": [...], "person": [...]}}
      masks/<video stem>/<track id>/<frame:05d>.png   # one mask folder per track (non-zero = inside)

A clip with several people has several tracks; ONE track is chosen per clip (``track="largest"``: the largest mean
face box; ``"longest"``: present in the most frames; or a track id) and that track's boxes and masks are used (the
reference code always reads mask folder 0, which is another person in a group clip).

**Folder layout**: every video under ``root`` (recursively) with its caption in a ``.txt`` beside it
(``a.mp4`` + ``a.txt``), or in one ``captions.csv`` (columns ``path`` and ``caption``) or ``captions.jsonl``
(``{"path": ..., "caption": ...}``) at the root. Faces are found with MediaPipe and tracked by box overlap.

Every item is a dict that :func:`collate_real_batch` stacks into a :class:`~consisid_lab.types.VideoBatch`. Frames
are resized to cover ``(height, width)`` and centre-cropped; keypoints and face masks come from the MediaPipe
analysis of the source frames, mapped to the resized ones (the layout's track masks replace the face masks where
present). ``intra_face`` is the face of a frame inside the clip, ``ref_face`` one from outside the clip (the
cross-face reference; the intra face when the video has no usable frame outside the clip); both are parsed (white
outside the face oval).

A corrupt or too short video, a clip without a detectable face or an entry without a caption is recorded in
``skipped.jsonl`` and the next item is served instead, so a run never stops on one bad sample.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from consisid_lab.data.skip_log import SkipLog
from consisid_lab.data.video_io import (
    VIDEO_EXTENSIONS,
    CropTransform,
    VideoDecodeError,
    check_num_frames,
    clip_indices,
    probe_video,
    read_frames,
)
from consisid_lab.faces.analysis import (
    FaceAnalyzer,
    FaceInfo,
    FacePolicy,
    LazyFaceAnalyzer,
    NoFaceError,
    parse_face,
    select_face,
)
from consisid_lab.types import VideoBatch

logger = logging.getLogger(__name__)

TRACK_POLICIES = ("largest", "longest")
# Two boxes of one face in neighbouring frames overlap far more than this; faces of two people rarely do.
MIN_TRACK_IOU = 0.2
# How many frames outside the clip are tried for the cross-face reference before falling back to the intra face.
CROSS_REF_TRIES = 3
# A failing item is replaced by the next one; after this many failures in a row the dataset is considered broken.
MAX_CONSECUTIVE_SKIPS = 50
SKIP_REASONS = (
    "missing caption",
    "missing video",
    "no video stream",
    "corrupt video",
    "empty video",
    "too short",
    "no face",
    "bad annotation",
)


class MissingCaptionError(ValueError):
    """An entry without a caption."""


class AnnotationError(ValueError):
    """A box JSON or mask PNG of the ConsisID layout that cannot be read."""


# ----------------------------------------------------------------------------------------------------- entries
@dataclass
class VideoEntry:
    """One video of a dataset. ``key`` (the path relative to the root) names it in splits, caches and logs."""

    path: Path
    key: str
    caption: str
    bbox_json: Path | None = None  # ConsisID layout: per-frame boxes with track ids
    mask_dir: Path | None = None  # ConsisID layout: one sub-folder of mask PNGs per track
    meta: dict = field(default_factory=dict)


def _caption_text(cap) -> str:
    if isinstance(cap, list | tuple):
        cap = next((c for c in cap if isinstance(c, str) and c.strip()), "")
    return cap.strip() if isinstance(cap, str) else ""


def consisid_entries(
    root: Path, caption_json: str | list[str] | None, bbox_dir: str, mask_dir: str, skip_log: SkipLog
) -> list[VideoEntry]:
    """Entries of a ConsisID-layout dataset; entries without a caption are recorded and dropped."""
    if caption_json is None:
        listing = root / "total_train_data.txt"
        if not listing.is_file():
            raise FileNotFoundError(
                f"{root} has no total_train_data.txt; pass caption_json=<file relative to the root> or add the "
                "listing (one caption JSON per line)"
            )
        files = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    else:
        files = [caption_json] if isinstance(caption_json, str) else list(caption_json)
    entries: list[VideoEntry] = []
    for name in files:
        path = Path(name) if Path(name).is_absolute() else root / name
        if not path.is_file():
            raise FileNotFoundError(f"caption JSON {path} (listed for {root}) does not exist")
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of {{path, cap, ...}} objects, got {type(rows).__name__}")
        for row in rows:
            rel = row.get("path")
            if not rel:
                skip_log.record(f"{path}:{row}", "missing video", "entry without a path")
                continue
            video = Path(rel) if Path(rel).is_absolute() else root / rel
            caption = _caption_text(row.get("cap", row.get("caption")))
            if not caption:
                skip_log.record(video, "missing caption")
                continue
            stem = video.stem
            bbox = root / bbox_dir / f"{stem}.json"
            masks = root / mask_dir / stem
            entries.append(
                VideoEntry(
                    path=video,
                    key=str(rel),
                    caption=caption,
                    bbox_json=bbox if bbox.is_file() else None,
                    mask_dir=masks if masks.is_dir() else None,
                    meta={k: v for k, v in row.items() if k not in ("path", "cap") and _is_plain(v)},
                )
            )
    return entries


def _is_plain(v) -> bool:
    return isinstance(v, str | int | float | bool) or v is None


def _read_caption_table(root: Path) -> dict[str, str]:
    """``captions.csv`` / ``captions.jsonl`` at the root: relative (or absolute) video path -> caption."""
    table: dict[str, str] = {}
    csv_path, jsonl_path = root / "captions.csv", root / "captions.jsonl"
    if csv_path.is_file():
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or ())
            path_col = next((c for c in ("path", "video", "file") if c in cols), None)
            cap_col = next((c for c in ("caption", "cap", "text", "prompt") if c in cols), None)
            if path_col is None or cap_col is None:
                raise ValueError(f"{csv_path} needs a 'path' and a 'caption' column, got {sorted(cols)}")
            for row in reader:
                table[row[path_col]] = _caption_text(row[cap_col])
    if jsonl_path.is_file():
        for n, line in enumerate(jsonl_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            rel = row.get("path") or row.get("video")
            if not rel:
                raise ValueError(f"{jsonl_path}:{n}: expected {{'path': ..., 'caption': ...}}, got {row}")
            table[rel] = _caption_text(row.get("caption", row.get("cap", row.get("text"))))
    return table


def folder_entries(root: Path, skip_log: SkipLog) -> list[VideoEntry]:
    """Entries of a plain folder of videos; videos without a caption are recorded and dropped."""
    table = _read_caption_table(root)
    entries = []
    for video in sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()):
        rel = video.relative_to(root).as_posix()
        txt = video.with_suffix(".txt")
        caption = txt.read_text().strip() if txt.is_file() else table.get(rel, table.get(str(video), ""))
        if not caption:
            skip_log.record(video, "missing caption", "no .txt beside it and no row in captions.csv / .jsonl")
            continue
        entries.append(VideoEntry(path=video, key=rel, caption=caption))
    return entries


# ------------------------------------------------------------------------------------------------------ tracks
def load_tracks(bbox_json: Path, part: str = "face") -> dict[int, dict[int, np.ndarray]]:
    """``track id -> {frame index -> box xyxy}`` of one box kind (``face``, ``head`` or ``person``)."""
    data = json.loads(bbox_json.read_text())
    tracks: dict[int, dict[int, np.ndarray]] = {}
    for frame, parts in data.items():
        for obj in parts.get(part, []) or []:
            tracks.setdefault(int(obj["track_id"]), {})[int(frame)] = np.asarray(obj["box"], np.float32)[:4]
    return tracks


def choose_track(tracks: dict[int, dict[int, np.ndarray]], policy: str | int = "largest") -> int:
    """The track id of the clip's subject: the largest mean face box, the longest track, or a given id."""
    if not tracks:
        raise NoFaceError("the box file lists no face track")
    if isinstance(policy, int) or (isinstance(policy, str) and policy.isdigit()):
        tid = int(policy)
        if tid not in tracks:
            raise ValueError(f"track {tid} not in the box file (tracks: {sorted(tracks)})")
        return tid
    if policy == "longest":
        return max(sorted(tracks), key=lambda t: len(tracks[t]))
    if policy == "largest":

        def mean_area(t: int) -> float:
            b = np.stack(list(tracks[t].values()))
            return float(np.mean((b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)))

        return max(sorted(tracks), key=mean_area)
    raise ValueError(f"unknown track policy {policy!r}; pick one of {TRACK_POLICIES} or a track id")


_FRAME_NUMBER = re.compile(r"(\d+)")


def track_mask_files(mask_dir: Path, track_id: int) -> dict[int, Path]:
    """``frame index -> mask PNG`` of one track (the last number in each file name is the frame index)."""
    folder = mask_dir / str(track_id)
    if not folder.is_dir():
        return {}
    out = {}
    for p in folder.iterdir():
        nums = _FRAME_NUMBER.findall(p.stem)
        if p.suffix.lower() == ".png" and nums:
            out[int(nums[-1])] = p
    return out


def read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 0


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def match_face(faces: list[FaceInfo], box: np.ndarray, min_iou: float = MIN_TRACK_IOU) -> FaceInfo | None:
    """The face overlapping ``box`` most (at least ``min_iou``), else ``None``."""
    best = max(faces, key=lambda f: box_iou(f.box, box), default=None)
    return best if best is not None and box_iou(best.box, box) >= min_iou else None


def track_faces(
    found: list[list[FaceInfo]], policy: FacePolicy, guide: list[np.ndarray | None] | None = None
) -> list[FaceInfo | None]:
    """One face per frame for one person.

    With ``guide`` boxes (the layout's track), each frame takes the face overlapping its guide box. Without, the
    policy picks the face in the first frame that has one and the person is followed forwards and backwards by box
    overlap with the neighbouring frame. Raises :class:`NoFaceError` when no frame has the person.
    """
    n = len(found)
    chosen: list[FaceInfo | None] = [None] * n
    if guide is not None:
        chosen = [match_face(f, g) if g is not None else None for f, g in zip(found, guide)]
    else:
        start = next((j for j in range(n) if found[j]), None)
        if start is not None:
            chosen[start] = select_face(found[start], policy)
            for order in (range(start + 1, n), range(start - 1, -1, -1)):
                prev = chosen[start]
                for j in order:
                    face = match_face(found[j], prev.box) if prev is not None else None
                    chosen[j] = face
                    prev = face or prev
    if all(c is None for c in chosen):
        raise NoFaceError("no face found in any frame of the clip")
    return chosen


def _nearest_filled(values: list, j: int):
    for d in range(len(values)):
        for k in (j - d, j + d):
            if 0 <= k < len(values) and values[k] is not None:
                return values[k]
    raise AssertionError("track_faces guarantees one filled frame")


# -------------------------------------------------------------------------------------------------- clip items
@dataclass
class ClipSampling:
    """How a clip is cut from a video and sized; every field changes the content of a cached clip."""

    height: int = 64
    width: int = 64
    num_frames: int = 9
    stride: int = 1
    skip_head: int = 0
    skip_tail: int = 0
    position: float = 0.5
    face_policy: str = "largest"
    track: str | int = "largest"

    def validate(self) -> None:
        check_num_frames(self.num_frames)
        for name in ("height", "width", "stride"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.height % 2 or self.width % 2:
            raise ValueError(f"height and width must be even, got {self.height}x{self.width}")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _to_tensor_image(x: np.ndarray) -> torch.Tensor:
    """RGB ``uint8`` ``(..., H, W, 3)`` -> float ``(..., 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).movedim(-1, -3).float() / 127.5 - 1.0


def _to_tensor_mask(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(-3).float()


class ClipBuilder(LazyFaceAnalyzer):
    """Turn one video entry into a training item (decode, sample, resize, analyse, pick references)."""

    def __init__(self, sampling: ClipSampling, box_part: str = "face") -> None:
        sampling.validate()
        self.sampling = sampling
        self.box_part = box_part
        self._analyzer: FaceAnalyzer | None = None

    def build(self, entry: VideoEntry, identity: int, clip_id: int) -> dict:
        """The item of ``entry``; raises :class:`VideoDecodeError` or :class:`NoFaceError` for an unusable one."""
        s = self.sampling
        info = probe_video(entry.path)
        idx = clip_indices(info.num_frames, s.num_frames, s.stride, s.skip_head, s.skip_tail, s.position, entry.path)
        tracks = self._load_tracks(entry)
        track_id = choose_track(tracks, s.track) if tracks is not None else None
        track = tracks[track_id] if tracks is not None else None
        cross_candidates = self._cross_candidates(info.num_frames, idx, track)
        frames = read_frames(entry.path, [*idx.tolist(), *cross_candidates])
        first = frames[int(idx[0])]
        tf = CropTransform.fit(first.shape[:2], s.height, s.width)
        clip = np.stack([tf.image(frames[int(i)]) for i in idx])  # (F, H, W, 3)

        found = [self._analyze(frames[int(i)], tf) for i in idx]
        guide = [tf.boxes(track[int(i)]) if int(i) in track else None for i in idx] if track is not None else None
        try:
            chosen = track_faces(found, s.face_policy, guide)  # type: ignore[arg-type]
        except NoFaceError as e:
            raise NoFaceError(f"{entry.path}: {e}") from None

        masks = self._track_masks(entry, track_id, idx, tf)
        boxes, kps, face_masks = [], [], []
        for j, face in enumerate(chosen):
            near = face or _nearest_filled(chosen, j)
            box = face.box if face is not None else (guide[j] if guide is not None and guide[j] is not None else None)
            boxes.append(box if box is not None else near.box)
            kps.append(near.kps)
            if masks is not None and masks[j] is not None:
                face_masks.append(masks[j])
            else:
                face_masks.append(face.mask if face is not None else np.zeros((s.height, s.width), bool))

        # Intra reference: the tracked face nearest the clip centre.
        mid = len(chosen) // 2
        j_intra = min((j for j, c in enumerate(chosen) if c is not None), key=lambda j: abs(j - mid))
        intra = chosen[j_intra]
        assert intra is not None
        ref_image, ref_face = self._cross_reference(frames, cross_candidates, tf, track, intra)
        if ref_face is None:
            logger.debug("%s: no face outside the clip; the cross-face reference is the intra face", entry.path)
            ref_image, ref_face = clip[j_intra], intra
        return {
            "video": _to_tensor_image(clip),  # (F, 3, H, W)
            "caption": entry.caption,
            "ref_face": _to_tensor_image(parse_face(ref_image, ref_face)),  # (3, H, W)
            "ref_kps": torch.from_numpy(ref_face.kps.copy()),  # (5, 2)
            "ref_mask": _to_tensor_mask(ref_face.mask),  # (1, H, W)
            "intra_face": _to_tensor_image(parse_face(clip[j_intra], intra)),
            "intra_kps": torch.from_numpy(intra.kps.copy()),
            "intra_mask": _to_tensor_mask(intra.mask),
            "kps": torch.from_numpy(np.stack(kps).astype(np.float32)),  # (F, 5, 2)
            "face_mask": _to_tensor_mask(np.stack(face_masks)),  # (F, 1, H, W)
            "boxes": torch.from_numpy(np.stack(boxes).astype(np.float32)),  # (F, 4)
            "identity": identity,
            "clip_id": clip_id,
            "key": entry.key,
            "track_id": -1 if track_id is None else int(track_id),
        }

    def _load_tracks(self, entry: VideoEntry) -> dict[int, dict[int, np.ndarray]] | None:
        if entry.bbox_json is None:
            return None
        try:
            return load_tracks(entry.bbox_json, self.box_part)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise AnnotationError(f"{entry.bbox_json}: unreadable box file ({type(e).__name__}: {e})") from e

    def _analyze(self, frame: np.ndarray, tf: CropTransform) -> list[FaceInfo]:
        """Faces of a source frame, mapped to the output frame.

        Analysing at the source resolution and mapping the points keeps small training sizes (e.g. 32x32, where the
        detector starts to see faces in textures) from hurting detection.
        """
        out = []
        for f in self.analyzer(frame):
            mapped = FaceInfo(
                box=tf.boxes(f.box),
                score=f.score,
                mesh=tf.points(f.mesh) if f.mesh is not None else None,
                kps=tf.points(f.kps),
                image_size=(tf.height, tf.width),
            )
            if mapped.area > 0:  # a face cropped away entirely is not in the clip
                out.append(mapped)
        return out

    def _cross_candidates(self, total: int, idx: np.ndarray, track: dict[int, np.ndarray] | None) -> list[int]:
        """Frames outside the clip to try as the cross-face reference, the middle of the longer side first."""
        s = self.sampling
        lo, hi = s.skip_head, total - s.skip_tail
        before = list(range(lo, int(idx[0])))
        after = list(range(int(idx[-1]) + 1, hi))
        if track is not None:  # only frames where the layout has the person
            before = [i for i in before if i in track]
            after = [i for i in after if i in track]
        sides = sorted([before, after], key=len, reverse=True)
        order: list[int] = []
        for side in sides:
            if side:
                order.append(side[len(side) // 2])
        for side in sides:  # then spread over the sides
            order.extend(side[:: max(1, len(side) // CROSS_REF_TRIES)])
        seen: list[int] = []
        for i in order:
            if i not in seen:
                seen.append(i)
        return seen[:CROSS_REF_TRIES]

    def _cross_reference(
        self,
        frames: dict[int, np.ndarray],
        candidates: list[int],
        tf: CropTransform,
        track: dict[int, np.ndarray] | None,
        intra: FaceInfo,
    ) -> tuple[np.ndarray | None, FaceInfo | None]:
        for i in candidates:
            image = tf.image(frames[i])
            faces = self._analyze(frames[i], tf)
            if not faces:
                continue
            if track is not None:
                face = match_face(faces, tf.boxes(track[i]))
            else:
                # Without a track outside the clip the policy decides, as it did inside the clip.
                face = select_face(faces, self.sampling.face_policy)  # type: ignore[arg-type]
            if face is not None:
                return image, face
        return None, None

    def _track_masks(
        self, entry: VideoEntry, track_id: int | None, idx: np.ndarray, tf: CropTransform
    ) -> list[np.ndarray | None] | None:
        if entry.mask_dir is None or track_id is None:
            return None
        files = track_mask_files(entry.mask_dir, track_id)
        if not files:
            logger.debug("%s: no mask folder for track %d; using MediaPipe face masks", entry.path, track_id)
            return None
        try:
            return [tf.mask(read_mask(files[int(i)])) if int(i) in files else None for i in idx]
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise AnnotationError(f"{entry.mask_dir}: unreadable mask of track {track_id} ({e})") from e


# --------------------------------------------------------------------------------------------------- datasets
SAMPLE_ERRORS = (VideoDecodeError, NoFaceError, MissingCaptionError, AnnotationError)


def skip_reason(err: Exception) -> str:
    if isinstance(err, VideoDecodeError):
        return err.reason
    if isinstance(err, NoFaceError):
        return "no face"
    if isinstance(err, MissingCaptionError):
        return "missing caption"
    if isinstance(err, AnnotationError):
        return "bad annotation"
    return f"error: {type(err).__name__}"


class RealVideoDataset(Dataset):
    """Items of a list of :class:`VideoEntry`; an unusable item is recorded and replaced by the next one."""

    def __init__(self, entries: list[VideoEntry], sampling: ClipSampling, skip_log: SkipLog | None = None) -> None:
        self.entries = list(entries)
        self.builder = ClipBuilder(sampling)
        self.skip_log = skip_log if skip_log is not None else SkipLog()
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> dict:
        """The item at ``index``; raises a ``SAMPLE_ERRORS`` error for an unusable one (preprocessing uses this)."""
        return self.builder.build(self.entries[index], identity=index, clip_id=index)

    def try_load(self, index: int) -> dict | None:
        """The item, or ``None`` after recording why it is unusable."""
        entry = self.entries[index]
        try:
            return self.load(index)
        except SAMPLE_ERRORS as e:
            self._bad.add(index)
            self.skip_log.record(entry.path, skip_reason(e), str(e), key=entry.key)
            return None
        except Exception as e:  # noqa: BLE001 - one unforeseen bad file must not end a long run; logged with traceback
            logger.exception("unexpected error while loading %s", entry.path)
            self._bad.add(index)
            self.skip_log.record(entry.path, skip_reason(e), str(e), key=entry.key)
            return None

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if n == 0:
            raise IndexError("the dataset is empty: every video was skipped (see skipped.jsonl)")
        for step in range(min(n, MAX_CONSECUTIVE_SKIPS)):
            k = (index + step) % n
            if k in self._bad:
                continue
            item = self.try_load(k)
            if item is not None:
                return item
        where = self.skip_log.path or "the log"
        if len(self._bad) == n:
            raise ValueError(
                f"none of the {n} videos of this split is usable (reasons in {where}); add videos or change "
                "val_fraction / test_fraction so that each split holds usable ones"
            )
        raise RuntimeError(f"{MAX_CONSECUTIVE_SKIPS} items in a row from index {index} are unusable; see {where}")


class ConsisIDLayoutDataset(RealVideoDataset):
    """A dataset in the ConsisID layout (see the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        caption_json: str | list[str] | None = None,
        sampling: ClipSampling | None = None,
        bbox_dir: str = "bbox",
        mask_dir: str = "masks",
        skip_log: SkipLog | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root {root} does not exist")
        skip_log = skip_log if skip_log is not None else SkipLog()
        super().__init__(
            consisid_entries(root, caption_json, bbox_dir, mask_dir, skip_log), sampling or ClipSampling(), skip_log
        )
        self.root = root


class FolderVideoDataset(RealVideoDataset):
    """A plain folder of captioned videos (see the module docstring)."""

    def __init__(
        self, root: str | Path, sampling: ClipSampling | None = None, skip_log: SkipLog | None = None
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root {root} does not exist")
        skip_log = skip_log if skip_log is not None else SkipLog()
        super().__init__(folder_entries(root, skip_log), sampling or ClipSampling(), skip_log)
        self.root = root


def collate_real_batch(items: list[dict]) -> VideoBatch:
    """Stack items (from :class:`RealVideoDataset` or the feature cache) into a :class:`VideoBatch`."""
    from consisid_lab.data.datamodule import collate_video_batch

    batch = collate_video_batch(items)
    names = set(items[0].get("cached", {}))
    for it in items[1:]:
        if set(it.get("cached", {})) != names:
            raise ValueError("items with different cached features cannot share a batch; rebuild the feature cache")
    batch.cached = {k: torch.stack([it["cached"][k] for it in items]) for k in sorted(names)}
    return batch


def split_entries(
    entries: list[VideoEntry], val_fraction: float, test_fraction: float, seed: int = 0
) -> dict[str, list[VideoEntry]]:
    """Deterministic split by video: entries ordered by a hash of ``(seed, key)``, the first go to val, then test.

    The assignment depends only on the set of keys (not on listing order or the machine). With three or more videos
    each non-zero fraction gets at least one video.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1), sum < 1")
    ordered = sorted(entries, key=lambda e: hashlib.sha256(f"{seed}:{e.key}".encode()).hexdigest())
    n = len(ordered)

    def count(frac: float) -> int:
        k = int(round(frac * n))
        return max(k, 1) if frac > 0 and n >= 3 else k

    n_val, n_test = count(val_fraction), count(test_fraction)
    splits = {
        "val": ordered[:n_val],
        "test": ordered[n_val : n_val + n_test],
        "train": ordered[n_val + n_test :],
    }
    return {k: sorted(v, key=lambda e: e.key) for k, v in splits.items()}
