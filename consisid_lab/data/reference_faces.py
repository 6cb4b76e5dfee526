"""The reference face a training checkpoint samples with: a held-out benchmark identity, or a face photo.

A checkpoint only knows the references it was trained on. On the synthetic benchmark those are near-frontal faces
placed in the frame by the generator and whitened outside the head (:func:`~consisid_lab.data.synthetic.render_clip`);
on real data, frames whitened outside the face oval (:func:`~consisid_lab.faces.analysis.parse_face`). So:

- ``face=benchmark:<i>``: the reference of identity ``i`` of the benchmark's test split (identities no run trains
  on), rendered with the checkpoint's own data config at the video size, exactly as evaluation sees it.
- ``face=<photo>``: the largest face is found with MediaPipe, the photo is scaled and shifted (no rotation) so that
  its face box takes the place and size of the benchmark references' average face box
  (:func:`mean_reference_box`), resampled to the video size and whitened outside the
  face oval. Checkpoints of real data get the square of twice the face box instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

BENCHMARK_PREFIX = "benchmark:"
SYNTHETIC_DATAMODULE = "SyntheticDataModule"
# Checkpoints of real data: a square of this many face-box sides around the face fills the frame's shorter side.
REAL_CROP_SCALE = 2.0
WHITE = 255


@dataclass
class ReferenceFace:
    """One reference face at the video size."""

    face: Tensor  # (1, 3, H, W) in [-1, 1]
    kps: Tensor  # (1, 5, 2) pixel (x, y) with pixel centres at integers, ArcFace order
    description: str  # what it is, for the log


def is_synthetic(data_cfg: Mapping[str, Any] | None) -> bool:
    """Whether a stored data config is the embedded benchmark's."""
    return bool(data_cfg) and str(data_cfg.get("_target_", "")).endswith(SYNTHETIC_DATAMODULE)


def benchmark_identity(face: str) -> int | None:
    """The identity index of ``face=benchmark:<i>``; ``None`` for anything else (a photo path)."""
    if not face.startswith(BENCHMARK_PREFIX):
        return None
    value = face[len(BENCHMARK_PREFIX) :].strip()
    if not value.isdigit():
        raise ValueError(
            f"face={face}: the part after {BENCHMARK_PREFIX!r} must be the index of an identity of the benchmark's "
            f"test split (0, 1, 2, ...), e.g. face={BENCHMARK_PREFIX}0"
        )
    return int(value)


def reference_face(face: str, data_cfg: Mapping[str, Any] | None, height: int, width: int) -> ReferenceFace:
    """The reference for ``face=...`` (``benchmark:<i>`` or a photo path) at ``height x width``, prepared for a
    checkpoint trained on ``data_cfg`` (its stored ``data`` config; ``None`` when it stored none)."""
    identity = benchmark_identity(face)
    if identity is not None:
        if not is_synthetic(data_cfg):
            target = (data_cfg or {}).get("_target_", "no stored data config")
            raise ValueError(
                f"face={face} picks an identity of the synthetic benchmark, but this checkpoint was trained on "
                f"{target}; pass a face photo instead (face=path/to/photo.png)"
            )
        return benchmark_reference(data_cfg, identity, height, width)
    from consisid_lab.faces.analysis import load_image

    template = None
    if is_synthetic(data_cfg):
        template = mean_reference_box(synthetic_config(data_cfg, height, width))
    return photo_reference(load_image(face), height, width, template=template, source=face)


def synthetic_config(data_cfg: Mapping[str, Any], height: int, width: int) -> Any:
    """The checkpoint's benchmark rendering settings (a :class:`SyntheticConfig`) at ``height x width``."""
    from consisid_lab.data.datamodule import SyntheticDataModule

    return SyntheticDataModule(**_datamodule_kwargs(data_cfg, height=height, width=width)).cfg


def _datamodule_kwargs(data_cfg: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    # No clip cache: one clip renders in milliseconds, and generating must not write into a training cache.
    kwargs = {k: v for k, v in data_cfg.items() if not k.startswith("_")}
    return {**kwargs, "cache_dir": None, **overrides}


def benchmark_reference(data_cfg: Mapping[str, Any], identity: int, height: int, width: int) -> ReferenceFace:
    """The reference face of test identity ``identity`` (its first clip), as evaluation renders it."""
    from consisid_lab.data.datamodule import SyntheticDataModule
    from consisid_lab.data.synthetic import SPLIT_CAPACITY, describe_identity, identity_seed, sample_identity

    if not 0 <= identity < SPLIT_CAPACITY:
        raise ValueError(f"face={BENCHMARK_PREFIX}{identity}: the test split has identities 0 .. {SPLIT_CAPACITY - 1}")
    trained_on = int(data_cfg.get("num_test_identities", 0))
    dm = SyntheticDataModule(
        **_datamodule_kwargs(
            data_cfg, height=height, width=width, num_test_identities=max(identity + 1, trained_on, 1)
        )
    )
    ds = dm.dataset("test")
    item = ds[identity * ds.clips_per_identity]
    looks = describe_identity(sample_identity(ds.cfg, identity_seed("test", identity)))
    among = "among" if identity < trained_on else "beyond"
    scope = f"never trained on; {among} the {trained_on} the run was tested on"
    return ReferenceFace(
        face=item["ref_face"][None],  # (1, 3, H, W)
        kps=item["ref_kps"][None],  # (1, 5, 2)
        description=f"benchmark test identity {identity} ({scope}): {looks}",
    )


def face_box(mask: np.ndarray) -> np.ndarray:
    """Tight xyxy box ``(4,)`` around a ``(H, W)`` bool mask, on pixel edges (pixel centres at integers), as the
    benchmark's face boxes are."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0] - 0.5, rows[0] - 0.5, cols[-1] + 0.5, rows[-1] + 0.5], np.float64)


def placement(box: np.ndarray, height: int, width: int, template: np.ndarray | None) -> tuple[float, np.ndarray]:
    """Scale ``s`` and shift ``t`` ``(2,)`` taking photo pixels to frame pixels (``frame = s * photo + t``, pixel
    centres at integers in both) for a face with box ``box`` ``(4,)`` xyxy.

    With a ``template`` box (``(4,)`` in the frame): the face box takes the template's centre and area. Without
    one: the square of ``REAL_CROP_SCALE`` box sides around the box centre fills the frame's shorter side, centred.
    """
    box = np.asarray(box, np.float64)
    size = box[2:] - box[:2]  # (2,) w, h
    centre = (box[:2] + box[2:]) / 2
    if template is not None:
        template = np.asarray(template, np.float64)
        target = template[2:] - template[:2]
        scale = float(np.sqrt(target.prod() / max(size.prod(), 1e-12)))
        return scale, (template[:2] + template[2:]) / 2 - scale * centre
    scale = min(height, width) / max(REAL_CROP_SCALE * float(size.max()), 1e-6)
    return scale, np.array([(width - 1) / 2, (height - 1) / 2]) - scale * centre


def resample(image: np.ndarray, scale: float, shift: np.ndarray, height: int, width: int, fill: float) -> np.ndarray:
    """The ``height x width`` frame that ``frame = scale * image + shift`` gives (pixel centres at integers),
    antialiased (Lanczos over the source region, so a large photo is averaged, not point-sampled). ``image``:
    ``(h, w, 3)`` uint8 or ``(h, w)`` float32; outside the image is ``fill``."""
    from PIL import Image

    # The source region the frame covers (pixel-edge coordinates), padded with `fill` where it leaves the image.
    x0, y0 = (-0.5 - shift) / scale + 0.5
    x1, y1 = x0 + width / scale, y0 + height / scale
    h, w = image.shape[:2]
    left, top = max(0, int(np.ceil(-x0))), max(0, int(np.ceil(-y0)))
    right, bottom = max(0, int(np.ceil(x1 - w))), max(0, int(np.ceil(y1 - h)))
    pad = ((top, bottom), (left, right)) + (((0, 0),) if image.ndim == 3 else ())
    pil = Image.fromarray(np.pad(image, pad, constant_values=fill))  # uint8 RGB, or float32 mode "F"
    box = (x0 + left, y0 + top, x1 + left, y1 + top)
    return np.asarray(pil.resize((width, height), Image.LANCZOS, box=box))


def photo_reference(
    photo: np.ndarray,
    height: int,
    width: int,
    template: np.ndarray | None = None,
    source: str | Path | None = None,
) -> ReferenceFace:
    """The largest face of ``photo`` ``(h, w, 3)`` uint8 as a reference at ``height x width``: placed by
    :func:`placement`, resampled, white outside the face oval. ``NoFaceError`` naming ``source`` without a face."""
    from consisid_lab.data.synthetic import whiten_outside
    from consisid_lab.faces.analysis import FaceAnalyzer, to_rgb_uint8

    photo = to_rgb_uint8(photo)
    with FaceAnalyzer() as analyzer:
        info = analyzer.analyze(photo, source=source)  # NoFaceError when there is none
    mask = info.mask  # (h, w) bool face oval
    scale, shift = placement(face_box(mask), height, width, template)
    rgb = resample(photo, scale, shift, height, width, fill=WHITE).astype(np.float32) / WHITE  # (H, W, 3)
    alpha = np.clip(resample(mask.astype(np.float32), scale, shift, height, width, fill=0.0), 0.0, 1.0)  # (H, W)
    face = whiten_outside(rgb, alpha)  # (H, W, 3) in [0, 1]
    kps = scale * (info.kps - 0.5) + shift  # (5, 2); MediaPipe's points have pixel edges at integers
    x = torch.from_numpy(np.ascontiguousarray(face)).permute(2, 0, 1)[None] * 2 - 1  # (1, 3, H, W)
    name = Path(source).name if source is not None else "the photo"
    how = "placed as the benchmark's references are" if template is not None else "a square around the face"
    return ReferenceFace(
        face=x.float().clamp(-1, 1),
        kps=torch.from_numpy(kps.astype(np.float32))[None],
        description=f"the face in {name} ({how}, scaled x{scale:.3g})",
    )


def mean_reference_box(cfg, num: int = 16, split: str = "test") -> np.ndarray:
    """The average face box ``(4,)`` xyxy of a benchmark reference face, in pixels of ``cfg``'s frame.

    The mean over the references of identities ``0 .. num - 1`` of ``split``, rendered (reference frame only) at
    the 64 x 64 reference size and carried over in scene units, which scale with the shorter side of any frame:
    what a face photo is fitted to so that it fills the frame as the benchmark's references do.
    """
    from dataclasses import replace

    from consisid_lab.data.synthetic import PX, identity_seed, render, sample_identity, sample_reference_motion

    cfg.validate()
    side = round(1 / PX)
    small = replace(cfg, height=side, width=side, num_frames=1)
    boxes = [
        render(small, sample_identity(small, identity_seed(split, i)), sample_reference_motion(i)).boxes[0]
        for i in range(num)
    ]
    # pixel-centre coordinates -> scene units about the frame centre -> pixels of cfg's frame
    scene = (np.mean(boxes, axis=0) + 0.5 - side / 2) / side  # (4,)
    centre = np.array([cfg.width, cfg.height, cfg.width, cfg.height]) / 2
    return (scene * min(cfg.height, cfg.width) + centre - 0.5).astype(np.float32)
