"""The identity cost of every sampling knob, on the embedded (synthetic) benchmark on the CPU, one thread.

    python benchmarks/bench_knobs.py [--steps 20 --guidance 4.0 --batches 1 --ckpt RUN.ckpt --with-compile]

For each knob, sampling the benchmark's test references with the same seed as the exact sampler: speed ratio
(knob seconds / exact seconds, the best of ``--repeats`` runs), deviation of the decoded video from the exact one
(max abs, PSNR in dB over [-1, 1]), FaceSim / FaceSim-High change (``BenchmarkMetrics``), and the generated face
crops' high-frequency scalars (``consisid_lab.analysis``: power beyond normalised radius 0.25, spectral centroid).
The last line is one JSON object ``{knob: {"speed_ratio", "max_abs_dev", "psnr_db", "facesim_delta", ...}}``.

Stand-ins: the tiny recipe, in ``$CONSISID_LAB_CACHE`` when set, else in a temporary folder (the default stand-ins
are never built here). Without ``--ckpt`` the model has random weights (its identity numbers are then a
sensitivity measure: how much each knob moves what the metrics see, not what a trained model scores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Benchmark sizes: the test suite's tiny composition, 4 blocks, 9 frames at 32 x 32.
OVERRIDES = [
    "debug=fast",
    "logger=csv",
    "standins_recipe=tiny",
    "data.num_frames=9",
    "data.height=32",
    "data.width=32",
    "model.backbone.config.num_layers=4",
    "model.backbone.config.num_attention_heads=2",
    "model.backbone.config.attention_head_dim=16",
    "model.backbone.config.sample_frames=9",
    "model.backbone.config.sample_height=8",
    "model.backbone.config.sample_width=8",
    "model.text_encoder.dim=32",
    "model.text_encoder.max_length=16",
    "~callbacks.progress",
]

EXACT = {"identity_kv_cache": False}
KNOBS: dict[str, dict[str, Any]] = {
    "identity_kv_cache": {"identity_kv_cache": True},
    "cfg_batching": {**EXACT, "cfg_batching": True},
    "attention_math": {**EXACT, "attention": "math"},
    "attention_flash": {**EXACT, "attention": "flash"},
    "fuse_qkv": {**EXACT, "fuse_qkv": True},
    "step_cache_0.1": {**EXACT, "step_cache": 0.1},
    "step_cache_0.3": {**EXACT, "step_cache": 0.3},
    "step_cache_0.6": {**EXACT, "step_cache": 0.6},
    "int8": {**EXACT, "quantize": "int8"},
    "compile": {**EXACT, "compile": True},
    "fast (kv+cfg+fuse+cache 0.3)": {"identity_kv_cache": True, "cfg_batching": True, "fuse_qkv": True,
                                     "step_cache": 0.3},
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--batches", type=int, default=1, help="test batches of the benchmark")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per knob (the best is kept)")
    p.add_argument("--ckpt", default=None, help="a training checkpoint (else random weights)")
    p.add_argument("--with-compile", action="store_true", help="also time regional torch.compile (minutes)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def compose(cache: Path, out: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[*OVERRIDES, f"paths.cache_dir={cache}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def face_hf_scalars(video: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """High-frequency scalars of the generated face crops (``(B, F, 3, H, W)`` video, ``(B, F, 1, H, W)`` masks)."""
    from consisid_lab.analysis.face_crops import crop_faces
    from consisid_lab.analysis.spectrum import compute_spectrum

    crops = crop_faces(video.flatten(0, 1), masks.flatten(0, 1).float())
    if crops.shape[0] == 0:
        return {"hf_ratio_025": float("nan"), "spectral_centroid": float("nan")}
    s = compute_spectrum(crops).scalars
    return {"hf_ratio_025": s["hf_ratio_025"], "spectral_centroid": s["spectral_centroid"]}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).square().mean())
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)  # peak-to-peak 2 over [-1, 1]


def available(knobs: dict[str, Any]) -> str | None:
    """Why a knob cannot run here, or None."""
    from consisid_lab.models.knobs import KnobUnavailable, SamplingKnobs

    try:
        SamplingKnobs(**knobs).check("cpu")
    except KnobUnavailable as err:
        return str(err)
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_knobs_"))
    cache = Path(os.environ.get("CONSISID_LAB_CACHE") or tmp / "cache")
    os.environ["CONSISID_LAB_CACHE"] = str(cache)
    from consisid_lab.metrics.benchmark import BenchmarkMetrics
    from consisid_lab.models.sampling import sample_video
    from consisid_lab.utils.instantiate import instantiate

    cfg = compose(cache, tmp / "run")
    if args.ckpt:
        from consisid_lab.eval import load_module

        module = load_module(args.ckpt)
    else:
        module = instantiate(cfg.model)
        # random everywhere, the zero-initialised adaLN and injector outputs too: every route moves the video
        gen = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for p in [*module.denoiser.fuser.parameters(), *module.denoiser.backbone.parameters()]:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    module.eval()
    dm = instantiate(cfg.data)
    dm.setup("test")
    batches = [b for _, b in zip(range(args.batches), dm.test_dataloader())]
    metrics = BenchmarkMetrics(str(cache), recipe="tiny")
    print(f"stand-ins (tiny recipe) in {cache}; {len(batches)} test batch(es) of {batches[0].video.shape[0]} clips, "
          f"{tuple(batches[0].video.shape[1:])}, {args.steps} steps, guidance {args.guidance}; "
          f"weights: {args.ckpt or 'random'}")  # fmt: skip

    def sample(knobs: dict[str, Any]) -> tuple[float, list[torch.Tensor], dict]:
        best, videos, stats = float("inf"), [], {}
        for _r in range(args.repeats):
            out = []
            start = time.perf_counter()
            for batch in batches:
                b, frames, _, height, width = batch.video.shape
                out.append(
                    sample_video(
                        module.denoiser,
                        module.noise_scheduler,
                        batch.ref_face,
                        batch.ref_kps,
                        list(batch.caption),
                        [""] * b,
                        num_frames=frames,
                        height=height,
                        width=width,
                        num_steps=args.steps,
                        guidance_scale=args.guidance,
                        use_dynamic_cfg=False,
                        generator=torch.Generator().manual_seed(args.seed),
                        device="cpu",
                        knobs=knobs,
                        stats=stats,
                    )
                )
            best = min(best, time.perf_counter() - start)
            videos = out
        return best, videos, stats

    def identity(videos: list[torch.Tensor]) -> dict[str, float]:
        metrics.reset()
        for batch, video in zip(batches, videos):
            metrics.update(batch, video)
        m = metrics.compute()
        hf = face_hf_scalars(torch.cat(videos), torch.cat([b.face_mask for b in batches]))
        return {"facesim": float(m["facesim"]), "facesim_high": float(m["facesim_high"]), **hf}

    with torch.no_grad():
        sample(EXACT)  # warm-up (first-call allocations and lazy imports), not timed
        exact_s, exact_v, _ = sample(EXACT)
        exact_id = identity(exact_v)
        fs, fh = exact_id["facesim"], exact_id["facesim_high"]
        print(f"exact: {exact_s:.2f} s, FaceSim {fs:.4f}, FaceSim-High {fh:.4f}")
        table: dict[str, Any] = {}
        for name, knobs in KNOBS.items():
            if name == "compile" and not args.with_compile:
                table[name] = {"skipped": "pass --with-compile (inductor on one CPU thread takes minutes)"}
                continue
            why = available(knobs)
            if why is not None:
                table[name] = {"skipped": why}
                continue
            if name == "compile":  # the first call compiles: not timed
                sample(knobs)
            seconds, videos, stats = sample(knobs)
            dev = max(float((v - e).abs().max()) for v, e in zip(videos, exact_v))
            ident = identity(videos)
            table[name] = {
                "speed_ratio": round(seconds / exact_s, 3),
                "max_abs_dev": float(f"{dev:.3g}"),
                "psnr_db": round(psnr(torch.cat(videos), torch.cat(exact_v)), 2),
                "facesim_delta": float(f"{ident['facesim'] - exact_id['facesim']:.3g}"),
                "facesim_high_delta": float(f"{ident['facesim_high'] - exact_id['facesim_high']:.3g}"),
                "hf_ratio_025_delta": float(f"{ident['hf_ratio_025'] - exact_id['hf_ratio_025']:.3g}"),
                "spectral_centroid_delta": float(f"{ident['spectral_centroid'] - exact_id['spectral_centroid']:.3g}"),
                "cached_calls": f"{stats.get('step_cache_hits', 0)}/{stats.get('model_calls', 0)}",
            }
    cols = ["speed_ratio", "max_abs_dev", "psnr_db", "facesim_delta", "facesim_high_delta", "hf_ratio_025_delta",
            "spectral_centroid_delta", "cached_calls"]  # fmt: skip
    print("| knob | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in table.items():
        if "skipped" in row:
            print(f"| {name} | skipped: {row['skipped'][:90]} |")
        else:
            print(f"| {name} | " + " | ".join(str(row[c]) for c in cols) + " |")
    shutil.rmtree(tmp / "run", ignore_errors=True)
    print(json.dumps(table))
    return table


if __name__ == "__main__":
    main()
