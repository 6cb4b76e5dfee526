"""Real video datasets: the released ConsisID data layout and a plain folder of captioned videos.

**ConsisID layout**: exactly the released one (:mod:`consisid_lab.data.released_layout`, ``RELEASED_FORMAT.md``): a
``total_train_data.txt`` of ``VIDEOS_DIR,CAPTIONS_JSON,ANNO_BASE`` lines, caption JSONs, ``refine_bbox_jsons`` and
``track_masks_data``. Rows whose ``fps x duration`` is under 49 frames are dropped while listing, as in the release.
ONE track is chosen per clip (``track="largest"``: the largest mean face box; ``"longest"``: the most valid frames;
or a track id), the clip is sampled from the longest valid segment of that track, and its masks are the track's
per-frame masks.

**Folder layout**: every video under ``root`` (recursively) with its caption in a ``.txt`` beside it
(``a.mp4`` + ``a.txt``), or in one ``captions.csv`` (columns ``path`` and ``caption``) or ``captions.jsonl``
(``{"path": ..., "caption": ...}``) at the root. Faces are found with MediaPipe and tracked by box overlap.

Every item is a dict that :func:`collate_real_batch` stacks into a :class:`~consisid_lab.types.VideoBatch`. Frames
are resized to cover ``(height, width)`` and centre-cropped; keypoints and face masks come from the MediaPipe
analysis of the source frames, mapped to the resized ones (the layout's track masks replace the face masks). A clip
is used only if the chosen person's face is found (detected and confirmed by the face mesh) in at least
``min_face_share`` of its frames. ``intra_face`` is the face of a frame inside the clip, ``ref_face`` one from outside
the clip (the cross-face reference; the intra face when the video has no usable frame outside the clip); both are
made as the release makes its reference faces: the aligned 512 crop of the source frame, parsed, resized to the video
size (``face_pipeline``: ``mediapipe``, white outside the face oval, or ``released``, diffusers' own functions with
the released label set whitened; :mod:`consisid_lab.faces.released`).

A corrupt or too short video, a clip without enough face, an entry without a caption or with missing annotations is
recorded in ``skipped.jsonl`` with its reason and the next item is served instead, so a run never stops on one bad
sample.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from consisid_lab.data.released_layout import (
    BOX_CONFIDENCE,
    MIN_SOURCE_FRAMES,
    SEGMENT_TOLERANCE,
    AnnotationError,
    ClipAnnotations,
    choose_track,
    listed_frames,
    load_clip_annotations,
    read_captions,
    read_train_list,
    segment_clip_indices,
)
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
    MESH_AGREEMENT,
    FaceAnalyzer,
    FaceInfo,
    FacePolicy,
    LazyFaceAnalyzer,
    NoFaceError,
    select_face,
)
from consisid_lab.faces.released import check_pipeline, reference_crop, to_video_size
from consisid_lab.types import VideoBatch

logger = logging.getLogger(__name__)

# Two boxes of one face in neighbouring frames overlap far more than this; faces of two people rarely do.
MIN_TRACK_IOU = 0.2
# How many frames outside the clip are tried for the cross-face reference before falling back to the intra face.
CROSS_REF_TRIES = 3
# A failing item is replaced by the next one; after this many failures in a row the dataset is considered broken.
MAX_CONSECUTIVE_SKIPS = 50
# A clip enters training only if the chosen face is found in at least this share of its frames ("most of them").
MIN_FACE_SHARE = 0.75
SKIP_REASONS = (
    "missing caption",
    "missing video",
    "no video stream",
    "corrupt video",
    "empty video",
    "too short",
    "no face",
    "missing annotation",
    "missing track",
    "missing masks",
    "bad annotation",
)


class MissingCaptionError(ValueError):
    """An entry without a caption."""


# ----------------------------------------------------------------------------------------------------- entries
@dataclass
class VideoEntry:
    """One video of a dataset. ``key`` (the path relative to the root) names it in splits, caches and logs."""

    path: Path
    key: str
    caption: str
    anno_base: Path | None = None  # ConsisID layout: the ANNO_BASE holding refine_bbox_jsons / track_masks_data
    meta: dict = field(default_factory=dict)


def _caption_text(cap) -> str:
    if isinstance(cap, list | tuple):
        cap = next((c for c in cap if isinstance(c, str) and c.strip()), "")
    return cap.strip() if isinstance(cap, str) else ""


def _key(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def consisid_entries(
    list_path: str | Path, root: str | Path, skip_log: SkipLog, min_source_frames: int = MIN_SOURCE_FRAMES
) -> list[VideoEntry]:
    """Entries of a released-layout dataset list (``total_train_data.txt``); relative paths relative to ``root``.

    Rows whose ``fps x duration`` is under ``min_source_frames`` are dropped (``too short``), rows without a caption
    (``missing caption``) or whose video is absent (``missing video``) are recorded and dropped.
    """
    root = Path(root)
    entries: list[VideoEntry] = []
    for listed in read_train_list(list_path, root):
        for row in read_captions(listed.captions_json):
            rel = row.get("path") if isinstance(row, dict) else None
            if not rel:
                skip_log.record(f"{listed.captions_json}:{row}", "missing video", "entry without a path")
                continue
            # The release joins the basename of "path" to VIDEOS_DIR.
            video = listed.videos_dir / Path(str(rel)).name
            key = _key(video, root)
            caption = _caption_text(row.get("cap", row.get("caption")))
            if not caption:
                skip_log.record(video, "missing caption", f"no 'cap' in {listed.captions_json}", key=key)
                continue
            frames = listed_frames(row)
            if frames is not None and frames < min_source_frames:
                skip_log.record(
                    video, "too short", f"fps x duration = {frames:.1f} frames < {min_source_frames}", key=key
                )
                continue
            if not video.is_file():
                skip_log.record(video, "missing video", f"listed in {listed.captions_json}", key=key)
                continue
            entries.append(
                VideoEntry(
                    path=video,
                    key=key,
                    caption=caption,
                    anno_base=listed.anno_base,
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
def _area(box: np.ndarray) -> float:
    return float(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0))


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
    """How a clip is cut from a video and sized; every field changes the content of a cached clip.

    ``track``, ``tolerance``, ``box_confidence`` and ``mask_part`` apply to the ConsisID layout only.
    """

    height: int = 64
    width: int = 64
    num_frames: int = 9
    stride: int = 1
    skip_head: int = 0
    skip_tail: int = 0
    position: float = 0.5
    face_policy: str = "largest"
    track: str | int = "largest"
    min_face_share: float = MIN_FACE_SHARE
    tolerance: int = SEGMENT_TOLERANCE
    box_confidence: float = BOX_CONFIDENCE
    mask_part: str = "face"
    mesh_agreement: float | None = MESH_AGREEMENT
    # How the reference faces (ref_face / intra_face) are made: the aligned 512 crop, parsed, resized to the video
    # size (consisid_lab.faces.released). "released" reads face_models/face_encoder/ (a published directory).
    face_pipeline: str = "mediapipe"
    face_models: str | None = None

    def validate(self) -> None:
        check_num_frames(self.num_frames)
        check_pipeline(self.face_pipeline)
        if self.face_pipeline == "released" and self.face_models is None:
            raise ValueError(
                "data.face_pipeline=released needs data.face_models=DIR, the published ConsisID directory whose "
                "face_encoder/ holds the release's face weights"
            )
        for name in ("height", "width", "stride"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.height % 2 or self.width % 2:
            raise ValueError(f"height and width must be even, got {self.height}x{self.width}")
        if not 0.0 < float(self.min_face_share) <= 1.0:
            raise ValueError(
                f"min_face_share={self.min_face_share} must be in (0, 1]: the share of a clip's frames in which the "
                "chosen face must be found (e.g. 0.75)"
            )
        if self.mask_part not in ("face", "head"):
            raise ValueError(f"mask_part={self.mask_part!r}: pick 'face' or 'head' (the track mask used per frame)")
        if self.mesh_agreement is not None and not float(self.mesh_agreement) > 0:
            raise ValueError(f"mesh_agreement={self.mesh_agreement} must be > 0 (a share of the face box) or null")
        if int(self.tolerance) < 1:
            raise ValueError(f"tolerance={self.tolerance} must be >= 1 (frames between valid frames of one segment)")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _to_tensor_image(x: np.ndarray) -> torch.Tensor:
    """RGB ``uint8`` ``(..., H, W, 3)`` -> float ``(..., 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).movedim(-1, -3).float() / 127.5 - 1.0


def _to_tensor_mask(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(-3).float()


def check_face_share(chosen: list[FaceInfo | None], min_share: float, path: str | Path) -> float:
    """The share of frames in which the chosen face was found; :class:`NoFaceError` (naming it) below ``min_share``.

    A detector alone sees faces in fur and textures in the odd frame; a person's clip has their face in most frames.
    """
    found = sum(c is not None for c in chosen)
    share = found / max(len(chosen), 1)
    if share < min_share:
        raise NoFaceError(
            f"{path}: the chosen face is found in {found} of {len(chosen)} frames ({share:.0%}); a clip needs "
            f"{min_share:.0%} (data.min_face_share)"
        )
    return share


class ClipBuilder(LazyFaceAnalyzer):
    """Turn one video entry into a training item (decode, sample, resize, analyse, pick references)."""

    def __init__(self, sampling: ClipSampling) -> None:
        sampling.validate()
        self.sampling = sampling
        self._analyzer: FaceAnalyzer | None = None

    @property
    def analyzer(self) -> FaceAnalyzer:
        # Real clips: a detection counts only where the face mesh confirms it (see MESH_AGREEMENT).
        if self._analyzer is None:
            self._analyzer = FaceAnalyzer(mesh_agreement=self.sampling.mesh_agreement)
        return self._analyzer

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_released"] = None  # face models are rebuilt in each worker
        return state

    def _reference(self, source: np.ndarray, tf: CropTransform, face: FaceInfo, what: str):
        """``(image (H, W, 3) uint8, kps (5, 2), mask (H, W) bool)``: the aligned 512 crop of ``face`` (a face of
        the output frame) from the ``source`` frame by the configured pipeline, resized to the video size."""
        s = self.sampling
        if s.face_pipeline == "released":
            if getattr(self, "_released", None) is None:
                from consisid_lab.faces.released import ReleasedFacePipeline

                self._released = ReleasedFacePipeline(s.face_models)
            crop, kps, mask = reference_crop(source, "released", released=self._released, source=what)
        else:
            own = next((f for f in self.analyzer(source) if np.allclose(tf.boxes(f.box), face.box)), None)
            if own is None:  # pragma: no cover - the same detector on the same frame
                raise NoFaceError(f"{what}: the chosen face was not found again in the source frame")
            crop, kps, mask = reference_crop(source, "mediapipe", face=own)
        return to_video_size(crop, kps, mask, s.height, s.width)

    def build(self, entry: VideoEntry, identity: int, clip_id: int) -> dict:
        """The item of ``entry``; raises a ``SAMPLE_ERRORS`` error for an unusable one."""
        s = self.sampling
        info = probe_video(entry.path)
        ann = self._annotations(entry)
        if ann is not None:
            chosen_track = choose_track(ann, s.track)
            idx = segment_clip_indices(
                chosen_track, info.num_frames, s.num_frames, s.stride, s.skip_head, s.skip_tail, s.position,
                s.tolerance, entry.path,
            )  # fmt: skip
            track = chosen_track.face_boxes()
            track_masks = ann.read_masks(chosen_track, s.mask_part, idx.tolist())
        else:
            chosen_track, track, track_masks = None, None, None
            idx = clip_indices(
                info.num_frames, s.num_frames, s.stride, s.skip_head, s.skip_tail, s.position, entry.path
            )
        cross_candidates = self._cross_candidates(info.num_frames, idx, track)
        frames = read_frames(entry.path, [*idx.tolist(), *cross_candidates])
        first = frames[int(idx[0])]
        tf = CropTransform.fit(first.shape[:2], s.height, s.width)
        clip = np.stack([tf.image(frames[int(i)]) for i in idx])  # (F, H, W, 3)

        found = [self._analyze(frames[int(i)], tf) for i in idx]
        guide = [tf.boxes(track[int(i)]) if int(i) in track else None for i in idx] if track is not None else None
        if guide is not None and all(g is None or _area(g) <= 0 for g in guide):
            h, w = first.shape[:2]
            raise NoFaceError(
                f"{entry.path}: the face boxes of track {chosen_track.track_id} lie outside the {s.height}x{s.width} "
                f"centre crop of the {h}x{w} video; pick data.height / data.width closer to the video's aspect"
            )
        try:
            chosen = track_faces(found, s.face_policy, guide)  # type: ignore[arg-type]
        except NoFaceError as e:
            raise NoFaceError(f"{entry.path}: {e}") from None
        share = check_face_share(chosen, s.min_face_share, entry.path)

        boxes, kps, face_masks = [], [], []
        for j, face in enumerate(chosen):
            near = face or _nearest_filled(chosen, j)
            box = face.box if face is not None else (guide[j] if guide is not None and guide[j] is not None else None)
            boxes.append(box if box is not None else near.box)
            kps.append(near.kps)
            if track_masks is not None:
                face_masks.append(tf.mask(track_masks[j]))
            else:
                face_masks.append(face.mask if face is not None else np.zeros((s.height, s.width), bool))

        # Intra reference: the tracked face nearest the clip centre.
        mid = len(chosen) // 2
        j_intra = min((j for j, c in enumerate(chosen) if c is not None), key=lambda j: abs(j - mid))
        intra = chosen[j_intra]
        assert intra is not None
        ref_at, ref_face = self._cross_reference(frames, cross_candidates, tf, track, intra)
        if ref_face is None:
            logger.debug("%s: no face outside the clip; the cross-face reference is the intra face", entry.path)
            ref_at, ref_face = int(idx[j_intra]), intra
        ref_image, ref_kps, ref_mask = self._reference(frames[ref_at], tf, ref_face, f"{entry.path} frame {ref_at}")
        intra_at = int(idx[j_intra])
        intra_image, intra_kps, intra_mask = self._reference(
            frames[intra_at], tf, intra, f"{entry.path} frame {intra_at}"
        )
        return {
            "video": _to_tensor_image(clip),  # (F, 3, H, W)
            "caption": entry.caption,
            "ref_face": _to_tensor_image(ref_image),  # (3, H, W): the aligned crop, parsed, at the video size
            "ref_kps": torch.from_numpy(ref_kps),  # (5, 2) in that image
            "ref_mask": _to_tensor_mask(ref_mask),  # (1, H, W)
            "intra_face": _to_tensor_image(intra_image),
            "intra_kps": torch.from_numpy(intra_kps),
            "intra_mask": _to_tensor_mask(intra_mask),
            "kps": torch.from_numpy(np.stack(kps).astype(np.float32)),  # (F, 5, 2)
            "face_mask": _to_tensor_mask(np.stack(face_masks)),  # (F, 1, H, W)
            "boxes": torch.from_numpy(np.stack(boxes).astype(np.float32)),  # (F, 4)
            "identity": identity,
            "clip_id": clip_id,
            "key": entry.key,
            "track_id": -1 if chosen_track is None else int(chosen_track.track_id),
            "face_share": share,
        }

    def _annotations(self, entry: VideoEntry) -> ClipAnnotations | None:
        if entry.anno_base is None:
            return None
        return load_clip_annotations(entry.anno_base, entry.path.stem, self.sampling.box_confidence)

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
    ) -> tuple[int | None, FaceInfo | None]:
        for i in candidates:
            faces = self._analyze(frames[i], tf)
            if not faces:
                continue
            if track is not None:
                face = match_face(faces, tf.boxes(track[i]))
            else:
                # Without a track outside the clip the policy decides, as it did inside the clip.
                face = select_face(faces, self.sampling.face_policy)  # type: ignore[arg-type]
            if face is not None:
                return i, face
        return None, None


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
        return err.reason
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
    """A dataset in the released ConsisID layout (see the module docstring): ``list_path`` is its
    ``total_train_data.txt``, ``root`` what the list's relative paths are relative to (default: the current
    directory, as in the release)."""

    def __init__(
        self,
        list_path: str | Path,
        root: str | Path = ".",
        sampling: ClipSampling | None = None,
        skip_log: SkipLog | None = None,
        min_source_frames: int = MIN_SOURCE_FRAMES,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"data.root={root} is not a folder; set it to the directory the list is relative to"
            )
        skip_log = skip_log if skip_log is not None else SkipLog()
        entries = consisid_entries(list_path, root, skip_log, min_source_frames)
        super().__init__(entries, sampling or ClipSampling(), skip_log)
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
