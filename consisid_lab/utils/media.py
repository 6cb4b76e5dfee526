"""Writing and logging sample videos (mp4, uint8) and contact sheets."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from consisid_lab.utils.faults import nonfinite_summary, report_failure, require_finite

log = logging.getLogger(__name__)


def to_uint8_frames(video: Tensor) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] -> (F, H, W, 3) uint8; ``NonFiniteInputError`` on NaN or inf (no valid pixel)."""
    require_finite("to_uint8_frames", video=video)
    v = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(0, 2, 3, 1).cpu().numpy()


def write_mp4(video: Tensor, path: str | Path, fps: int = 8) -> Path:
    """Write one video (F, 3, H, W) in [-1, 1] as an H.264 mp4."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8_frames(video)
    # H.264 with yuv420p needs even sizes; macro_block_size=1 keeps small benchmark frames unscaled.
    iio.imwrite(path, frames, fps=fps, codec="libx264", macro_block_size=1, plugin="FFMPEG")
    return path


def contact_sheet(videos: list[Tensor]) -> np.ndarray:
    """Rows of frames: each video (F, 3, H, W) in [-1, 1] becomes one row; returns (rows*H, F*W, 3) uint8."""
    rows = [np.concatenate(list(to_uint8_frames(v)), axis=1) for v in videos]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def log_videos(loggers: list, key: str, samples: dict[str, Tensor], step: int, fps: int = 8) -> None:
    """Log generated videos (as mp4) and a real-vs-generated contact sheet to every logger that takes media.

    Non-finite samples (a diverged model) are not written: the failure is reported and nothing is logged.
    """
    video = samples["video"]  # (B, F, 3, H, W)
    real = samples.get("real")
    for name, x in (("video", video), ("real", real)):
        problem = None if x is None else nonfinite_summary(x)
        if problem is not None:
            report_failure("video writing", f"{key} step {step}: samples[{name!r}] not written, {problem}")
            return
    sheet_rows = []
    for i in range(video.shape[0]):
        if real is not None:
            sheet_rows.append(real[i])
        sheet_rows.append(video[i])
    sheet = contact_sheet(sheet_rows)
    for lg in loggers:
        save_dir = getattr(lg, "save_dir", None) or getattr(lg, "log_dir", None)
        name = type(lg).__name__
        if name == "WandbLogger":
            import wandb

            paths = [
                write_mp4(video[i], Path(save_dir) / "media" / f"{key.replace('/', '_')}_{step}_{i}.mp4", fps)
                for i in range(video.shape[0])
            ]
            lg.experiment.log(
                {key: [wandb.Video(str(p), format="mp4") for p in paths], f"{key}_sheet": wandb.Image(sheet)},
                step=step,
            )
        elif name == "TensorBoardLogger":
            lg.experiment.add_video(key, ((video + 1) / 2).clamp(0, 1), global_step=step, fps=fps)
        elif save_dir is not None:
            import imageio.v3 as iio

            out = Path(save_dir) / "media"
            out.mkdir(parents=True, exist_ok=True)
            iio.imwrite(out / f"{key.replace('/', '_')}_{step}.png", sheet)


def save_samples(samples: dict[str, Tensor], root: str | Path, split: str, step: int) -> Path:
    """Write ``<root>/media/<split>_samples.npz``: uint8 ``generated`` and ``real`` ``(B, F, H, W, 3)``, the
    reference faces ``(B, H, W, 3)`` and the global step, so any metric can be recomputed from what was made."""
    out = Path(root) / "media"
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"generated": np.stack([to_uint8_frames(v) for v in samples["video"]]), "step": np.array(step)}
    if samples.get("real") is not None:
        arrays["real"] = np.stack([to_uint8_frames(v) for v in samples["real"]])
    if samples.get("ref_face") is not None:
        arrays["reference"] = to_uint8_frames(samples["ref_face"])
    path = out / f"{split}_samples.npz"
    tmp = out / f"{split}_samples.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path
