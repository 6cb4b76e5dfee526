"""Score generated videos with the real identity metrics:
`python -m consisid_lab.evaluate_videos videos=DIR references=DIR prompts=FILE metrics.arcface_dir=... ...`.

Writes ``evaluate_videos.json`` (means over videos with bootstrap confidence intervals, the dataset-level FID and the
detector / alignment / encoder versions used) and ``evaluate_videos.csv`` (one row per video) to the run folder.
Every weight file is checked before any video is decoded (:func:`~consisid_lab.metrics.real.check_weights`).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

log = logging.getLogger(__name__)

SUMMARY_FILE = "evaluate_videos.json"
TABLE_FILE = "evaluate_videos.csv"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
PER_VIDEO = ("facesim_arc", "facesim_cur", "face_rate", "clipscore")


def read_prompts(path: str | Path | None) -> dict[str, str]:
    """``stem -> prompt`` from a JSON object or JSON lines (``{"video": ..., "prompt": ...}``)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts={path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        return {Path(k).stem: str(v) for k, v in data.items()}
    if isinstance(data, list) and all(isinstance(r, dict) and "prompt" in r for r in data):
        return {Path(str(r.get("video", r.get("path", "")))).stem: str(r["prompt"]) for r in data}
    raise ValueError(f"{path}: expected a JSON object {{stem: prompt}} or JSON lines {{'video': ..., 'prompt': ...}}")


def pair_inputs(videos: Path, references: Path, prompts: dict[str, str], need_prompts: bool) -> list[dict]:
    """(video, reference photo, prompt) per mp4 of ``videos``; an error naming what is missing."""
    if not videos.is_dir():
        raise FileNotFoundError(f"videos={videos} is not a folder of mp4s")
    if not references.is_dir():
        raise FileNotFoundError(f"references={references} is not a folder of reference photos")
    files = sorted(videos.glob("*.mp4"))
    if not files:
        raise FileNotFoundError(f"no .mp4 in videos={videos}")
    photos = {p.stem: p for p in sorted(references.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    only = next(iter(photos.values())) if len(photos) == 1 else None
    pairs = []
    for v in files:
        ref = photos.get(v.stem, only)
        if ref is None:
            raise FileNotFoundError(
                f"no reference photo for {v.name} in {references} (looked for {v.stem}.{{png,jpg,jpeg,webp}})"
            )
        if need_prompts and v.stem not in prompts:
            raise KeyError(f"no prompt for {v.stem} in prompts (CLIPScore needs one per video)")
        pairs.append({"video": v, "reference": ref, "prompt": prompts.get(v.stem, "")})
    return pairs


def sample_frames(path: Path, num: int) -> np.ndarray:
    """``num`` frames evenly spaced over the video, ``(num, H, W, 3)`` uint8 (the paper's ``linspace`` sampling)."""
    from consisid_lab.data.video_io import probe_video, read_frames

    total = probe_video(path).num_frames
    idx = np.linspace(0, total - 1, num).astype(int)
    frames = read_frames(path, np.unique(idx))
    return np.stack([frames[int(i)] for i in idx])


def summarise(rows: list[dict], fid: float | None, versions: dict, bootstrap: int, seed: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"videos": len(rows), "metrics": {}, "versions": versions}
    for name in PER_VIDEO:
        values = [r[name] for r in rows if r.get(name) is not None]
        if not values:
            continue
        from consisid_lab.metrics.real import bootstrap_ci

        summary["metrics"][name] = {
            "mean": float(np.mean(values)),
            "ci95": bootstrap_ci(values, bootstrap, seed),
            "n": len(values),
        }
    if fid is not None:
        summary["metrics"]["fid"] = {"value": fid, "level": "dataset (aligned reference vs generated faces)"}
    return summary


def evaluate_videos(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Score every video of ``cfg.videos``; returns the summary written to ``evaluate_videos.json``."""
    from consisid_lab.faces.analysis import load_image
    from consisid_lab.metrics.real import RealMetrics, check_weights
    from consisid_lab.utils.instantiate import instantiate

    run_dir = Path(run_dir if run_dir is not None else cfg.paths.output_dir)
    mcfg = instantiate(cfg.metrics)
    files = check_weights(mcfg)  # before any video is decoded
    pairs = pair_inputs(
        Path(cfg.videos), Path(cfg.references), read_prompts(cfg.get("prompts")), "clipscore" in mcfg.metrics
    )
    metrics = RealMetrics(mcfg, files)
    rows = []
    for p in pairs:
        scores = metrics.score_video(
            sample_frames(p["video"], mcfg.num_frames), load_image(p["reference"]), p["prompt"],
            video=p["video"].name, reference_name=p["reference"].name,
        )  # fmt: skip
        rows.append(asdict(scores))
        log.info("%s: %s", p["video"].name, {k: v for k, v in rows[-1].items() if k in PER_VIDEO})
    summary = summarise(rows, metrics.fid_value(), metrics.versions(), int(cfg.bootstrap), int(cfg.seed))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
    with (run_dir / TABLE_FILE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    log.info("scored %d videos -> %s", len(rows), run_dir / SUMMARY_FILE)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate_videos")
def main(cfg: DictConfig) -> None:
    evaluate_videos(cfg)


if __name__ == "__main__":
    main()
