"""Video decoding, clip sampling and the resize / centre-crop that takes a frame to the training size.

Decoding goes through PyAV (FFmpeg). Anything that makes a file unusable (missing, not a video, no decodable frame,
fewer frames than a clip needs) raises :class:`VideoDecodeError`, which callers record in ``skipped.jsonl`` instead of
stopping a run. :class:`CropTransform` carries the geometry of the resize / crop so that boxes, keypoints and masks
given in the source video's pixels follow the frames.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


class VideoDecodeError(ValueError):
    """A video that cannot provide a clip: missing, corrupt, empty or too short. ``reason`` is a short tag."""

    def __init__(self, path: str | Path, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count (demuxed packets: no decoding), rate and size of ``path``; :class:`VideoDecodeError` if unusable."""
    import av

    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(path, "missing video", "the file does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            stream = container.streams.video[0]
            n = sum(1 for p in container.demux(stream) if p.size > 0)
            info = VideoInfo(n, float(stream.average_rate or 0.0), stream.height, stream.width)
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(path, "corrupt video", f"{type(e).__name__}: {e}") from e
    if info.num_frames == 0:
        raise VideoDecodeError(path, "empty video", "no frames")
    return info


def read_frames(path: str | Path, indices: list[int] | np.ndarray) -> dict[int, np.ndarray]:
    """RGB ``uint8`` ``(H, W, 3)`` frames at ``indices`` (decoded in one pass; only the wanted ones are converted).

    Raises :class:`VideoDecodeError` when any requested frame cannot be decoded.
    """
    import av

    wanted = {int(i) for i in indices}
    out: dict[int, np.ndarray] = {}
    last = max(wanted) if wanted else -1
    try:
        with av.open(str(path)) as container:
            for k, frame in enumerate(container.decode(video=0)):
                if k in wanted:
                    out[k] = frame.to_ndarray(format="rgb24")
                if k >= last:
                    break
    except (av.error.FFmpegError, OSError, ValueError) as e:
        if wanted - out.keys():
            raise VideoDecodeError(path, "corrupt video", f"{type(e).__name__}: {e}") from e
    missing = sorted(wanted - out.keys())
    if missing:
        raise VideoDecodeError(path, "corrupt video", f"frames {missing[:5]} could not be decoded")
    return out


def write_video(path: str | Path, frames: np.ndarray, fps: float = 8.0) -> None:
    """Write RGB ``uint8`` frames ``(T, H, W, 3)`` as an H.264 mp4 (even sizes required by yuv420p)."""
    import av

    frames = np.asarray(frames, dtype=np.uint8)
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"mp4 frames need even height and width, got {h}x{w}")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "10"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def check_num_frames(num_frames: int) -> None:
    """Clips have ``4k + 1`` frames: the CogVideoX VAE keeps the first frame and groups the rest by four."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1 (1, 5, 9, 13, 49, ...), got {num_frames}")


def clip_span(num_frames: int, stride: int) -> int:
    """Source frames covered by a clip of ``num_frames`` frames taken every ``stride`` frames."""
    return (num_frames - 1) * stride + 1


def clip_indices(
    total: int,
    num_frames: int,
    stride: int = 1,
    skip_head: int = 0,
    skip_tail: int = 0,
    position: float = 0.5,
    path: str | Path = "<video>",
) -> np.ndarray:
    """Source frame indices ``(num_frames,)`` of one clip inside ``[skip_head, total - skip_tail)``.

    ``position`` in [0, 1] places the clip in the usable range (0 = start, 0.5 = centre, 1 = end). A video too
    short for the clip raises :class:`VideoDecodeError` (``too short``), so the item is recorded and skipped.
    """
    if stride < 1 or skip_head < 0 or skip_tail < 0:
        raise ValueError(f"stride must be >= 1 and skips >= 0, got stride={stride}, {skip_head=}, {skip_tail=}")
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"clip position must be in [0, 1], got {position}")
    span = clip_span(num_frames, stride)
    usable = total - skip_head - skip_tail
    if usable < span:
        raise VideoDecodeError(
            path,
            "too short",
            f"{total} frames, {skip_head} + {skip_tail} skipped, a clip of {num_frames} frames at stride {stride} "
            f"needs {span}",
        )
    start = skip_head + int(round(position * (usable - span)))
    return start + stride * np.arange(num_frames)


@dataclass(frozen=True)
class CropTransform:
    """Resize to ``resized`` ``(H', W')`` then crop ``(height, width)`` at ``(x0, y0)`` (integer pixels)."""

    source_size: tuple[int, int]  # (H, W) of the source frames
    resized: tuple[int, int]  # (H', W') after the aspect-preserving resize
    x0: int
    y0: int
    height: int
    width: int

    @classmethod
    def fit(cls, source_size: tuple[int, int], height: int, width: int) -> CropTransform:
        """Cover ``(height, width)`` with the smallest resize that keeps the aspect ratio; crop the centre."""
        h, w = source_size
        scale = max(height / h, width / w)
        rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
        return cls((h, w), (rh, rw), (rw - width) // 2, (rh - height) // 2, height, width)

    @property
    def scale_xy(self) -> np.ndarray:
        return np.array([self.resized[1] / self.source_size[1], self.resized[0] / self.source_size[0]], np.float32)

    def points(self, xy: np.ndarray) -> np.ndarray:
        """Pixel ``(..., 2)`` ``(x, y)`` from the source to the output frame."""
        xy = np.asarray(xy, dtype=np.float32)
        return (xy * self.scale_xy - np.array([self.x0, self.y0], np.float32)).astype(np.float32)

    def boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes ``(..., 4)`` xyxy from the source to the output frame, clipped to it."""
        b = np.asarray(boxes, dtype=np.float32)
        out = self.points(b.reshape(*b.shape[:-1], 2, 2)).reshape(b.shape)
        return np.clip(out, 0, [self.width, self.height, self.width, self.height]).astype(np.float32)

    def _apply(self, image: np.ndarray, interpolation: int) -> np.ndarray:
        import cv2

        out = cv2.resize(image, (self.resized[1], self.resized[0]), interpolation=interpolation)
        return np.ascontiguousarray(out[self.y0 : self.y0 + self.height, self.x0 : self.x0 + self.width])

    def image(self, image: np.ndarray) -> np.ndarray:
        """An RGB ``uint8`` ``(H_src, W_src, 3)`` frame to ``(height, width, 3)`` (area filter when shrinking)."""
        import cv2

        shrink = self.resized[0] < self.source_size[0]
        return self._apply(image, cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A ``(H_src, W_src)`` mask to a ``(height, width)`` bool mask."""
        import cv2

        return self._apply(np.asarray(mask, np.uint8), cv2.INTER_NEAREST).astype(bool)
