"""Validate the embedded synthetic benchmark and its stand-in encoders; print one JSON object (last line).

    python -m consisid_lab.validate_benchmark [--cache-dir DIR] [--rebuild] [--pairs N]

Figures (all on held-out "test" identities, which no stand-in saw):
- evaluator_auc: verification ROC-AUC of FaceSim (reference of one video vs frames of another video), same
  identity vs different identity.
- high_only_auc / low_only_auc: FaceSim-High (FaceSim-Low) separating identities that share the low (high)
  part and differ only in the high (low) part.
- high_metric_on_low_only_change / low_metric_on_high_only_change: cross-band leakage, the mean drop of
  FaceSim-High (FaceSim-Low) when only the *other* band's identity changes (should be small), next to the
  in-band drops for scale.
- controls: every identity metric (FaceSim, FaceSim-Low, FaceSim-High, all gated by the face gate, and the face
  rate) on real clips of the reference's identity, another identity's real clips, Gaussian noise, colour-matched
  noise, constant grey, blurred real clips (high band removed), high-passed real clips and the reference pasted into
  every frame; flat keys ``noise_facesim``, ``grey_facesim``, ``real_face_rate``, ``blurred_over_real_facesim_high``...
- codec: how much of each identity band survives the stand-in codec's round trip (the band evaluators' AUCs on
  reconstructions scored against the original references), its PSNR and the high-frequency energy it keeps, and
  ``codec_identity_gap``: the identity gap of the reconstructed real clips, the most a generated video can score in
  the codec's latent space (``codec_gap_over_real``: its share of the real clips' gap).
- frames_per_s of the generator on one thread, its frequency-separation report, and the stand-ins' build time.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

TEST_SPLIT = "test"


@dataclass
class ClipSet:
    """Reference faces and videos of rendered test clips, in [-1, 1] channels-first."""

    refs: Tensor  # (K, 3, H, W)
    videos: Tensor  # (K, F, 3, H, W)


def _to_tensor(array: np.ndarray) -> Tensor:
    """(..., H, W, 3) in [0, 1] -> (..., 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).float().movedim(-1, -3).mul(2).sub(1)


def render_set(cfg, identities: list, video_tag: int) -> ClipSet:
    """One clip per identity; the video seed depends on (tag, position) so sets never share a video."""
    from consisid_lab.data.synthetic import render_clip, sample_motion

    refs, videos = [], []
    for i, identity in enumerate(identities):
        motion = sample_motion(cfg, 1_000_003 * video_tag + 2 * i)
        clip = render_clip(cfg, identity, motion, ref_motion_seed=1_000_003 * video_tag + 2 * i + 1)
        refs.append(_to_tensor(clip.ref_face))
        videos.append(_to_tensor(clip.frames))
    return ClipSet(torch.stack(refs), torch.stack(videos))


def facesim_matrix(evaluator, refs: Tensor, videos: Tensor, gate=None) -> Tensor:
    """``S[i, j]`` = FaceSim of reference i against video j ``(K, K)``: mean over frames of max(0, cos), 0 on the
    frames where ``gate`` finds no face."""
    from consisid_lab.metrics.evaluator_frozen import FrozenEmbedder, embed_video, face_presence

    embedder = FrozenEmbedder(evaluator)
    ref_emb = embedder(refs)  # (K, D)
    frame_emb = embed_video(embedder, videos)  # (K, F, D)
    cos = torch.einsum("id,jfd->ijf", ref_emb, frame_emb).clamp_min(0)
    return (cos * face_presence(gate, videos)[None]).mean(dim=-1)


CONTROLS = ("real", "other_identity", "noise", "colour_noise", "grey", "blurred", "high_passed", "pasted_reference")
BAND_CUTOFF = 0.25  # the benchmark's band split (normalised radius)


def control_videos(refs: Tensor, videos: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """Every control of DESIGN.md section 6 for references ``(K, 3, H, W)`` and real videos ``(K, F, 3, H, W)``."""
    from consisid_lab.data.spectral_filters import high_pass, low_pass

    gen = torch.Generator().manual_seed(seed)
    mean = videos.mean(dim=(1, 3, 4), keepdim=True)  # (K, 1, 3, 1, 1): each clip's colour
    std = videos.std(dim=(1, 3, 4), keepdim=True)
    return {
        "real": videos,
        "other_identity": videos.roll(1, dims=0),
        "noise": torch.randn(videos.shape, generator=gen).clamp(-1, 1),
        "colour_noise": (mean + std * torch.randn(videos.shape, generator=gen)).clamp(-1, 1),
        "grey": torch.zeros_like(videos),
        "blurred": low_pass(videos, BAND_CUTOFF).clamp(-1, 1),
        "high_passed": high_pass(videos, BAND_CUTOFF).clamp(-1, 1),
        "pasted_reference": refs[:, None].expand_as(videos).contiguous(),
    }


def control_table(standins, refs: Tensor, videos: Tensor) -> dict[str, dict[str, float]]:
    """``{control: {metric: value}}``: gated FaceSim / -Low / -High of each control against the references, the
    identity gap in each band (own reference minus every other one; 0 for a control that carries no identity), its
    face rate, its copy-paste ratio and its background gap (the corners' colour error against a clip of another
    caption minus against the clip's own, ``consisid_lab.metrics.background``)."""
    from consisid_lab.metrics.background import corner_colour
    from consisid_lab.metrics.evaluator_frozen import face_presence
    from consisid_lab.metrics.facesim import COPY_FLOOR

    gate = standins.face_gate
    out: dict[str, dict[str, float]] = {}
    own_bg = corner_colour(videos)
    # another clip's background: the previous one (other_identity is the next one, so it is not its own chance)
    other_bg = own_bg.roll(-1, dims=0)
    for name, vids in control_videos(refs, videos).items():
        bg = corner_colour(vids)
        full, low, high = (
            facesim_matrix(ev, refs, vids, gate)
            for ev in (standins.evaluator, standins.evaluator_low, standins.evaluator_high)
        )
        row = {
            "facesim": full.diagonal().mean(),
            "facesim_low": low.diagonal().mean(),
            "facesim_high": high.diagonal().mean(),
            # own reference against every other one: which identity, in each band, the control carries
            "identity_gap": _own_minus_others(full),
            "identity_gap_low": _own_minus_others(low),
            "identity_gap_high": _own_minus_others(high),
            "face_rate": face_presence(gate, vids).mean(),
            "copy_paste": (videos - refs[:, None]).abs().mean()
            / (vids - refs[:, None]).abs().mean().clamp_min(COPY_FLOOR),
            "background_gap": (bg - other_bg).abs().mean() - (bg - own_bg).abs().mean(),
        }
        out[name] = {k: float(v) for k, v in row.items()}
    return out


def _own_minus_others(sim: Tensor) -> Tensor:
    """Mean of the diagonal of a ``(K, K)`` reference x video FaceSim matrix minus the mean of its off-diagonal."""
    off = ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    return sim.diagonal().mean() - sim[off].mean()


def codec_survival(standins, ref_set: ClipSet, same: ClipSet, high: ClipSet, low: ClipSet) -> dict[str, float]:
    """The identity bands through the stand-in codec: band AUCs on reconstructions against the original references."""
    from consisid_lab.metrics.benchmark import horizontal_energy

    codec = standins.codec

    def roundtrip(v: Tensor) -> Tensor:
        return torch.cat([codec.decode(codec.encode(part)).clamp(-1, 1) for part in v.split(16)])

    same_r, high_r, low_r = roundtrip(same.videos), roundtrip(high.videos), roundtrip(low.videos)
    refs = ref_set.refs
    k = refs.shape[0]
    off = ~torch.eye(k, dtype=torch.bool)
    full = facesim_matrix(standins.evaluator, refs, same_r)
    hi_same = facesim_matrix(standins.evaluator_high, refs, same_r).diagonal()
    lo_same = facesim_matrix(standins.evaluator_low, refs, same_r).diagonal()
    mse = (same_r - same.videos).square().mean()
    energy = horizontal_energy(same_r).mean() / horizontal_energy(same.videos).mean()
    # The identity gap a perfect generator in this latent space would score (gated, as the runs' metric): FaceSim of
    # the reconstructions against their own references minus against another identity's (rolled, as the control).
    gated = facesim_matrix(standins.evaluator, refs, same_r, standins.face_gate)
    own = gated.diagonal().mean()
    other = gated[torch.arange(k), torch.arange(k).roll(1)].mean()  # reference i against video i - 1
    return {
        "codec_facesim": float(own),
        "codec_identity_gap": float(own - other),
        "codec_evaluator_auc": auroc(full.diagonal(), full[off]),
        "codec_high_only_auc": auroc(hi_same, facesim_matrix(standins.evaluator_high, refs, high_r).diagonal()),
        "codec_low_only_auc": auroc(lo_same, facesim_matrix(standins.evaluator_low, refs, low_r).diagonal()),
        "codec_facesim_high": float(hi_same.mean()),
        "codec_facesim_low": float(lo_same.mean()),
        "codec_psnr_db": float(10 * torch.log10(4.0 / mse)),
        "codec_hf_energy_ratio": float(energy),
    }


def auroc(positive: Tensor, negative: Tensor) -> float:
    from torchmetrics.functional.classification import binary_auroc

    scores = torch.cat([positive.flatten(), negative.flatten()])
    target = torch.cat([torch.ones(positive.numel()), torch.zeros(negative.numel())]).long()
    return float(binary_auroc(scores, target))


def generator_speed(cfg) -> float:
    """Frames per second of the generator on one thread (its own benchmark when it has one)."""
    from consisid_lab.data import synthetic

    bench = getattr(synthetic, "benchmark_frames_per_second", None)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if callable(bench):
            return float(bench(cfg))
        synthetic.make_clip(cfg, synthetic.identity_seed(TEST_SPLIT, 0), 0)  # warm-up
        frames, start, n = 0, time.perf_counter(), 0
        while time.perf_counter() - start < 3.0:
            frames += synthetic.make_clip(cfg, synthetic.identity_seed(TEST_SPLIT, n % 50), n).frames.shape[0]
            n += 1
        return frames / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


def frequency_report(cfg) -> dict:
    from consisid_lab.data import synthetic

    report_fn = getattr(synthetic, "frequency_separation_report", None)
    if not callable(report_fn):
        return {}
    try:
        report = report_fn(cfg)
    except TypeError:
        report = report_fn()
    return report if isinstance(report, dict) else {"report": str(report)}


def validate(standins, generator_config, pairs: int) -> dict:
    """Render held-out test identities and compute every validation figure."""
    from consisid_lab.data.synthetic import identity_seed, sample_identity

    cfg = generator_config
    k = pairs
    low = [identity_seed(TEST_SPLIT, i) for i in range(k)]
    other = [identity_seed(TEST_SPLIT, k + i) for i in range(k)]  # other test seeds for the changed band
    base = [sample_identity(cfg, s, s) for s in low]
    high_changed = [sample_identity(cfg, s, o) for s, o in zip(low, other)]
    low_changed = [sample_identity(cfg, o, s) for s, o in zip(low, other)]

    t0 = time.perf_counter()
    ref_set = render_set(cfg, base, video_tag=1)  # references (and their own videos, unused)
    same_set = render_set(cfg, base, video_tag=2)  # same identity, other video
    high_set = render_set(cfg, high_changed, video_tag=3)
    low_set = render_set(cfg, low_changed, video_tag=4)
    render_s = time.perf_counter() - t0

    def diag(m: Tensor) -> Tensor:
        return m.diagonal()

    off = ~torch.eye(k, dtype=torch.bool)
    full = facesim_matrix(standins.evaluator, ref_set.refs, same_set.videos)
    id_full = facesim_matrix(standins.identity_net, ref_set.refs, same_set.videos)

    refs = ref_set.refs
    hi_same = diag(facesim_matrix(standins.evaluator_high, refs, same_set.videos))
    hi_on_high = diag(facesim_matrix(standins.evaluator_high, refs, high_set.videos))
    hi_on_low = diag(facesim_matrix(standins.evaluator_high, refs, low_set.videos))
    lo_same = diag(facesim_matrix(standins.evaluator_low, refs, same_set.videos))
    lo_on_low = diag(facesim_matrix(standins.evaluator_low, refs, low_set.videos))
    lo_on_high = diag(facesim_matrix(standins.evaluator_low, refs, high_set.videos))
    full_on_high = diag(facesim_matrix(standins.evaluator, refs, high_set.videos))
    full_on_low = diag(facesim_matrix(standins.evaluator, refs, low_set.videos))

    controls = control_table(standins, refs, same_set.videos)
    flat = {
        f"{control}_{metric}": controls[control][metric]
        for control in ("noise", "colour_noise", "grey")
        for metric in ("facesim", "facesim_low", "facesim_high", "face_rate")
    }
    real_high = controls["real"]["facesim_high"]
    real_gap = controls["real"]["facesim"] - controls["other_identity"]["facesim"]
    codec = codec_survival(standins, ref_set, same_set, high_set, low_set)
    return {
        "controls": controls,
        **flat,
        "real_face_rate": controls["real"]["face_rate"],
        "blurred_over_real_facesim_high": controls["blurred"]["facesim_high"] / max(real_high, 1e-6),
        **codec,
        "real_identity_gap": real_gap,
        # The share of the real clips' identity gap that survives the codec: the ceiling of a generated video's gap
        # (the default run's target asks for half of the real gap).
        "codec_gap_over_real": codec["codec_identity_gap"] / real_gap if abs(real_gap) > 1e-9 else float("nan"),
        "evaluator_auc": auroc(diag(full), full[off]),
        "high_only_auc": auroc(hi_same, hi_on_high),
        "low_only_auc": auroc(lo_same, lo_on_low),
        "high_metric_on_low_only_change": float(hi_same.mean() - hi_on_low.mean()),
        "low_metric_on_high_only_change": float(lo_same.mean() - lo_on_high.mean()),
        "high_metric_on_high_only_change": float(hi_same.mean() - hi_on_high.mean()),
        "low_metric_on_low_only_change": float(lo_same.mean() - lo_on_low.mean()),
        "facesim_same_identity": float(diag(full).mean()),
        "facesim_other_identity": float(full[off].mean()),
        "facesim_high_only_change": float(full_on_high.mean()),
        "facesim_low_only_change": float(full_on_low.mean()),
        "evaluator_auc_high_only": auroc(diag(full), full_on_high),
        "evaluator_auc_low_only": auroc(diag(full), full_on_low),
        "identity_net_auc": auroc(diag(id_full), id_full[off]),
        "test_identities": k,
        "validation_render_s": render_s,
    }


def targets(result: dict) -> dict[str, bool]:
    """The benchmark's acceptance targets, each by name (DESIGN.md section 6)."""
    out = {
        "evaluator_auc>=0.98": result["evaluator_auc"] >= 0.98,
        "high_only_auc>=0.95": result["high_only_auc"] >= 0.95,
        "low_only_auc>=0.95": result["low_only_auc"] >= 0.95,
        "real_face_rate>=0.95": result["real_face_rate"] >= 0.95,
        "blurred_over_real_facesim_high<=0.5": result["blurred_over_real_facesim_high"] <= 0.5,
    }
    for control in ("noise", "colour_noise", "grey"):
        for metric in ("facesim", "facesim_low", "facesim_high", "face_rate"):
            out[f"{control}_{metric}<=0.05"] = result[f"{control}_{metric}"] <= 0.05
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m consisid_lab.validate_benchmark", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="stand-in cache (default: $CONSISID_LAB_CACHE/standins or ~/.cache/consisid_lab/standins)",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild every stand-in even when cached")
    parser.add_argument("--pairs", type=int, default=200, help="held-out test identities (positive pairs) per figure")
    parser.add_argument("--recipe", choices=("default", "tiny"), default="default", help="stand-in training recipe")
    args = parser.parse_args(argv)
    if args.pairs < 2:
        parser.error(f"--pairs must be >= 2 (negatives need a second identity), got {args.pairs}")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The same filter as the Hydra tasks' logs: open_clip's model-config lines stay out.
    from consisid_lab.utils.logging_filters import ThirdPartyInfoFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(ThirdPartyInfoFilter())
    from consisid_lab.encoders.store import default_generator_config, load_standins
    from consisid_lab.encoders.training import Recipe

    torch.set_num_threads(2)
    cfg = default_generator_config()
    recipe = Recipe.tiny() if args.recipe == "tiny" else Recipe()
    start = time.perf_counter()
    standins = load_standins(
        args.cache_dir, build_if_missing=True, recipe=recipe, generator_config=cfg, rebuild=args.rebuild
    )
    load_s = time.perf_counter() - start
    with torch.no_grad():
        result = validate(standins, cfg, args.pairs)
    result["frames_per_s"] = generator_speed(cfg)
    result["frequency_separation"] = frequency_report(cfg)
    result["build_seconds"] = standins.build_seconds
    result["rebuilt"] = standins.rebuilt
    result["load_or_build_s"] = load_s
    result["cached_build_seconds"] = {n: i.get("train", {}).get("seconds") for n, i in standins.info.items()}
    result["recipe"] = recipe.name
    result["targets"] = targets(result)
    result["targets_met"] = all(result["targets"].values())
    print(json.dumps(result, sort_keys=True, default=float))
    return result


if __name__ == "__main__":
    main()
