"""Frames per second of the synthetic benchmark generator on one CPU core.

    python benchmarks/bench_synthetic.py [--height 64 --width 64 --frames 9 --clips 200]
        [--separation-pairs 8] [--figure experiments/synthetic_frequency_separation.png]

Counts the clip frames only (the reference face rendered alongside each clip is extra work, not counted), and
times whole clips as the datamodule makes them: identity and motion sampling, rendering, keypoints, masks,
boxes, reference and caption. Prints wall-clock and CPU-time rates (CPU time is steadier on a shared machine)
and a JSON line last. ``--figure`` also draws the frequency-separation proof: for a pair of identities that differ
only in high-frequency parameters and a pair that differ only in low-frequency ones (same motion), the frames,
their difference, its low-pass and high-pass at normalised radius 0.25, and the radial energy profile of the
differences.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from consisid_lab.data.spectral_filters import high_pass, low_pass, radial_frequency
from consisid_lab.data.synthetic import (
    SyntheticConfig,
    border_window,
    frequency_separation_report,
    identity_seed,
    make_clip,
    render_frames,
    sample_identity,
    sample_motion,
)

CUTOFF = 0.25


def _radial_profile(diff: np.ndarray, bins: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Mean spectral energy of ``diff (..., H, W)`` per normalised-radius bin."""
    power = (np.abs(np.fft.fft2(diff)) ** 2).reshape(-1, *diff.shape[-2:]).sum(axis=0)
    r = radial_frequency(*diff.shape[-2:])
    edges = np.linspace(0.0, np.sqrt(2.0), bins + 1)
    idx = np.clip(np.digitize(r, edges) - 1, 0, bins - 1)
    energy = np.bincount(idx.ravel(), weights=power.ravel(), minlength=bins)
    count = np.maximum(np.bincount(idx.ravel(), minlength=bins), 1)
    return 0.5 * (edges[1:] + edges[:-1]), energy / count


def draw_separation_figure(cfg: SyntheticConfig, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, o = identity_seed("test", 0), identity_seed("test", 1)
    motion = sample_motion(cfg, 7)
    pairs = {
        "high-only pair": (sample_identity(cfg, s, s), sample_identity(cfg, s, o)),
        "low-only pair": (sample_identity(cfg, s, s), sample_identity(cfg, o, s)),
    }
    window = border_window(cfg.height, cfg.width)
    fig, axes = plt.subplots(2, 6, figsize=(17, 6))
    for row, (name, (a, b)) in enumerate(pairs.items()):
        fa, fb = render_frames(cfg, a, motion)[0], render_frames(cfg, b, motion)[0]
        diff = (fa - fb).transpose(0, 3, 1, 2).astype(np.float64) * window  # (F, 3, H, W)
        parts = {
            "A": fa[0],
            "B": fb[0],
            "|A - B|": np.abs(diff[0]).mean(axis=0),
            f"|low-pass {CUTOFF}|": np.abs(low_pass(diff[0], CUTOFF)).mean(axis=0),
            f"|high-pass {CUTOFF}|": np.abs(high_pass(diff[0], CUTOFF)).mean(axis=0),
        }
        vmax = float(parts["|A - B|"].max())
        for col, (title, img) in enumerate(parts.items()):
            ax = axes[row, col]
            ax.imshow(img, vmin=None if img.ndim == 3 else 0.0, vmax=None if img.ndim == 3 else vmax, cmap="magma")
            ax.set_title(f"{name}: {title}" if col == 0 else title, fontsize=9)
            ax.axis("off")
        radius, energy = _radial_profile(diff)
        axes[0, 5].semilogy(radius, energy / energy.max(), label=name)
        power = (np.abs(np.fft.fft2(diff)) ** 2).reshape(-1, cfg.height, cfg.width).sum(axis=0)
        r = radial_frequency(cfg.height, cfg.width).ravel()
        order = np.argsort(r)
        axes[1, 5].plot(r[order], np.cumsum(power.ravel()[order]) / power.sum(), label=name)
    axes[0, 5].set_title("radial energy of A - B (mean per bin)", fontsize=9)
    axes[1, 5].set_title("fraction of the energy of A - B below radius", fontsize=9)
    for r in range(2):
        axes[r, 5].axvline(CUTOFF, color="k", ls="--", lw=1)
        axes[r, 5].set_xlabel("normalised radius (1 = Nyquist)")
        axes[r, 5].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--supersample", type=int, default=2)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--identities", type=int, default=50)
    parser.add_argument("--separation-pairs", type=int, default=0, help="also report frequency separation")
    parser.add_argument("--figure", default=None, help="also draw the frequency-separation figure to this path")
    args = parser.parse_args()

    torch.set_num_threads(1)
    cfg = SyntheticConfig(height=args.height, width=args.width, num_frames=args.frames, supersample=args.supersample)
    cfg.validate()
    for i in range(3):  # warm-up: allocator, texture cache
        make_clip(cfg, identity_seed("train", i), i)

    wall0, cpu0 = time.perf_counter(), time.process_time()
    for k in range(args.clips):
        make_clip(cfg, identity_seed("train", k % args.identities), 10_000 + k)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    frames = args.clips * cfg.num_frames
    result = {
        "height": cfg.height,
        "width": cfg.width,
        "num_frames": cfg.num_frames,
        "supersample": cfg.supersample,
        "clips": args.clips,
        "frames_per_s": frames / wall,
        "frames_per_cpu_s": frames / cpu,
        "ms_per_clip": 1e3 * wall / args.clips,
        "threads": torch.get_num_threads(),
    }
    print(
        f"{frames} frames in {wall:.2f} s wall ({result['frames_per_s']:.0f} frames/s), "
        f"{cpu:.2f} s CPU ({result['frames_per_cpu_s']:.0f} frames/CPU-s) on one thread"
    )
    if args.separation_pairs:
        result["separation"] = frequency_separation_report(cfg, n_pairs=args.separation_pairs)
    if args.figure:
        draw_separation_figure(cfg, args.figure)
        result["figure"] = args.figure
    print(json.dumps(result))


if __name__ == "__main__":
    main()
