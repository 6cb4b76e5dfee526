"""Preprocessing throughput (clips/s on CPU, stand-in encoders) and training epoch time with the feature cache
against decoding + face analysis on the fly (the ratio). Prints one JSON line.

    python benchmarks/bench_preprocess.py [--videos N] [--frames F] [--size S] [--workers W] [--threads T]

Builds a folder dataset of short real-face videos (cut from ``skimage.data.astronaut()``) in a temporary folder,
runs ``consisid_lab.preprocess`` on it, then times one training epoch (forward, backward, AdamW over every train
batch, data loading included) of the tiny composition twice: reading the cache, and decoding on the fly.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONF = Path(__file__).resolve().parents[1] / "conf"
# Model sizes shared by the preprocessing and the training composition (the cache key includes the encoders).
MODEL_OVERRIDES = [
    "standins_recipe=tiny",
    "model.text_encoder.dim=32",
    "model.text_encoder.max_length=16",
]
TRAIN_OVERRIDES = [
    "logger=csv",
    "model.backbone.config.num_layers=2",
    "model.backbone.config.num_attention_heads=2",
    "model.backbone.config.sample_frames=9",
    "model.backbone.config.sample_height=16",
    "model.backbone.config.sample_width=16",
]


def write_videos(root: Path, n: int, frames: int, size: int) -> None:
    import cv2
    from skimage.data import astronaut

    from consisid_lab.data.video_io import write_video

    a = astronaut()
    root.mkdir(parents=True, exist_ok=True)
    for v in range(n):
        rng = np.random.default_rng(v)
        clip = []
        for _ in range(frames):
            dx, dy = rng.integers(-12, 13, size=2)
            side = int(rng.integers(236, 276))
            x0, y0 = 100 + int(dx), max(0, int(dy))
            clip.append(cv2.resize(a[y0 : y0 + side, x0 : x0 + side], (size, size), interpolation=cv2.INTER_AREA))
        write_video(root / f"v{v:03d}.mp4", np.stack(clip))
        (root / f"v{v:03d}.txt").write_text(f"a person in video {v}")


def compose(name: str, overrides: list[str], run_dir: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def epoch_seconds(cfg, feature_cache_dir: str | None) -> tuple[float, int]:
    from consisid_lab.utils.instantiate import instantiate

    torch.manual_seed(0)
    datamodule = instantiate(cfg.data, feature_cache_dir=feature_cache_dir)
    model = instantiate(cfg.model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    start = time.perf_counter()
    steps = 0
    for batch in datamodule.train_dataloader():
        loss, _ = model.compute_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    return time.perf_counter() - start, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=128, help="side of the source videos")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from consisid_lab.encoders.store import load_standins
    from consisid_lab.encoders.training import Recipe
    from consisid_lab.preprocess import preprocess

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        write_videos(tmp / "videos", args.videos, args.frames, args.size)
        load_standins(tmp / "standins", recipe=Recipe.tiny())  # built once, outside the timings
        data = [
            "data=folder",
            f"data.root={tmp / 'videos'}",
            "data.height=64",
            "data.width=64",
            "data.num_frames=9",
            "data.stride=2",
            "data.batch_size=2",
            f"data.num_workers={args.workers}",
            f"paths.cache_dir={tmp}",
            f"paths.standin_dir={tmp / 'standins'}",
        ]
        pre_cfg = compose(
            "preprocess",
            [
                *data,
                *MODEL_OVERRIDES,
                f"cache_dir={tmp / 'features'}",
                f"num_workers={args.workers}",
                "progress=false",
            ],
            tmp / "run_pre",
        )
        metrics = preprocess(pre_cfg)

        train_cfg = compose("train", [*data, *MODEL_OVERRIDES, *TRAIN_OVERRIDES], tmp / "run_train")
        epoch_seconds(train_cfg, str(tmp / "features"))  # warm-up: imports, MediaPipe graphs, allocator
        cached_s, steps = epoch_seconds(train_cfg, str(tmp / "features"))
        live_s, live_steps = epoch_seconds(train_cfg, None)
        assert steps == live_steps, "both epochs must cover the same clips"

    print(
        json.dumps(
            {
                "threads": args.threads,
                "workers": args.workers,
                "videos": args.videos,
                "clip": "9 frames, 64x64, stride 2",
                "source": f"{args.frames} frames, {args.size}x{args.size}",
                "preprocess_clips": metrics["clips_built"],
                "preprocess_s": metrics["seconds"],
                "preprocess_clips_per_s": metrics["clips_per_s"],
                "train_steps_per_epoch": steps,
                "epoch_s_cached": round(cached_s, 3),
                "epoch_s_on_the_fly": round(live_s, 3),
                "speedup_cached": round(live_s / cached_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
