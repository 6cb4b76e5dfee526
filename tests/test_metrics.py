"""Benchmark metrics: FaceSim (full / low / high band), IdentityDrift, FaceFID."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from consisid_lab.encoders.evaluator import EvaluatorConfig, EvaluatorNet
from consisid_lab.metrics.face_fid import FaceFID
from consisid_lab.metrics.facesim import FaceSim, FaceSimHigh, FaceSimLow
from consisid_lab.metrics.identity_drift import IdentityDrift


def _random_evaluator(band: str = "full", seed: int = 0) -> EvaluatorNet:
    """Untrained evaluator whose batch-norm statistics are calibrated on random images, so that its
    embeddings are centred and differ between unrelated images (an uncalibrated one maps everything close)."""
    torch.manual_seed(seed)
    net = EvaluatorNet(EvaluatorConfig(band=band, widths=(8, 16), embed_dim=16, image_size=32))
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for _ in range(4):
            net(torch.rand(32, 3, 32, 32) * 2 - 1)
    return net.eval()


def _videos(b: int = 3, f: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
    video = torch.rand(b, f, 3, 32, 32, generator=g) * 2 - 1
    return ref, video


def test_facesim_is_one_for_a_static_copy_of_the_reference_and_in_unit_range() -> None:
    ev = _random_evaluator()
    ref, video = _videos()
    static = FaceSim(ev)
    static.update(ref, ref[:, None].expand(-1, 4, -1, -1, -1))
    assert float(static.compute()) == pytest.approx(1.0, abs=1e-5)
    other = FaceSim(ev)
    other.update(ref, video)
    value = float(other.compute())
    assert 0.0 <= value < 1.0


def test_facesim_averages_over_clips_across_updates() -> None:
    ev = _random_evaluator()
    ref, video = _videos(b=4)
    whole = FaceSim(ev)
    whole.update(ref, video)
    split = FaceSim(ev)
    split.update(ref[:1], video[:1])
    split.update(ref[1:], video[1:])
    assert float(split.compute()) == pytest.approx(float(whole.compute()), abs=1e-6)


def test_facesim_keeps_evaluator_frozen_in_train_mode() -> None:
    ev = _random_evaluator()
    metric = FaceSim(ev)
    metric.train()  # what Lightning does to every submodule during fit
    assert not ev.training
    assert not any(p.requires_grad for p in ev.parameters())
    ref, video = _videos(b=2)
    metric.update(ref, video)  # batch norm in train mode would also change the running stats
    first = float(metric.compute())
    metric.reset()
    metric.update(ref, video)
    assert float(metric.compute()) == pytest.approx(first, abs=1e-6)


def test_band_metrics_reject_an_evaluator_of_another_band() -> None:
    with pytest.raises(ValueError, match="band 'low'"):
        FaceSimLow(_random_evaluator("high"))
    with pytest.raises(ValueError, match="band 'high'"):
        FaceSimHigh(_random_evaluator("full"))
    FaceSimLow(_random_evaluator("low"))
    FaceSimHigh(_random_evaluator("high"))


def test_facesim_rejects_bad_shapes() -> None:
    ref, video = _videos(b=2)
    metric = FaceSim(_random_evaluator())
    with pytest.raises(ValueError, match="video must be"):
        metric.update(ref, video[:, 0])
    with pytest.raises(ValueError, match="batch sizes differ"):
        metric.update(ref[:1], video)


def test_identity_drift_zero_for_static_video_and_positive_when_frames_change() -> None:
    ev = _random_evaluator()
    ref, video = _videos(b=2, f=5)
    static = IdentityDrift(ev)
    static.update(ref, ref[:, None].expand(-1, 5, -1, -1, -1))
    assert float(static.compute()) == pytest.approx(0.0, abs=1e-5)
    moving = IdentityDrift(ev)
    moving.update(ref, video)
    assert float(moving.compute()) > 1e-3


def test_face_fid_near_zero_against_itself_and_grows_with_a_shift() -> None:
    ev = _random_evaluator()
    g = torch.Generator().manual_seed(1)
    real = torch.rand(64, 3, 32, 32, generator=g) * 2 - 1
    same = FaceFID(ev)
    same.update(real, real)
    self_fid = float(same.compute())
    assert abs(self_fid) < 1e-3
    scores = []
    for shift in (0.2, 0.6):
        fid = FaceFID(ev)
        fid.update(real, (real + shift).clamp(-1, 1))
        scores.append(float(fid.compute()))
    assert self_fid < scores[0] < scores[1]


def test_face_fid_accepts_videos_and_is_dataset_level() -> None:
    ev = _random_evaluator()
    ref, video = _videos(b=4, f=5)
    fid = FaceFID(ev)
    fid.update(video[:2], None)
    fid.update(None, video[2:])
    fid.update(video[2:], None)
    assert int(fid.real_features_num_samples) == 20
    assert int(fid.fake_features_num_samples) == 10
    assert np.isfinite(float(fid.compute()))


# --- behaviour on real benchmark clips with a briefly trained evaluator ---------------------------------


@pytest.fixture(scope="module")
def trained_low_evaluator():
    """A small low-band evaluator trained for a few seconds on "evaluator"-split identities (the low band is
    the quickest to learn; a small margin converges in few steps)."""
    pytest.importorskip("consisid_lab.data.synthetic")
    from consisid_lab.data.synthetic import SyntheticConfig
    from consisid_lab.encoders.training import Recipe, render_pool, train_margin_net

    recipe = Recipe(
        name="metrics-test",
        evaluator_identities=32,
        videos_per_identity=6,
        frames_per_video=1,
        batch_size=64,
        low_steps=120,
        arc_margin=0.1,
        render_workers=1,
    )
    pool = render_pool(SyntheticConfig(), "evaluator", recipe.evaluator_identities, recipe)
    torch.manual_seed(0)
    net = EvaluatorNet(EvaluatorConfig(band="low", image_size=32, widths=(16, 32, 64), embed_dim=64))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_margin_net(net, pool, recipe, recipe.low_steps, seed=0, band="low")
    finally:
        torch.set_num_threads(previous)
    return net.eval()


def _test_clips(n: int, video_offset: int):
    from consisid_lab.data.synthetic import SyntheticConfig, identity_seed, make_clip

    cfg = SyntheticConfig()
    refs, videos = [], []
    for i in range(n):
        clip = make_clip(cfg, identity_seed("test", i), video_offset + i)
        refs.append(torch.from_numpy(clip.ref_face).permute(2, 0, 1) * 2 - 1)
        videos.append(torch.from_numpy(clip.frames).permute(0, 3, 1, 2) * 2 - 1)
    return torch.stack(refs), torch.stack(videos)


def test_facesim_real_clips_score_higher_than_identity_shuffled(trained_low_evaluator) -> None:
    refs, _ = _test_clips(8, video_offset=100)
    _, videos = _test_clips(8, video_offset=200)  # same held-out identities, other videos
    matched = FaceSimLow(trained_low_evaluator)
    matched.update(refs, videos)
    shuffled = FaceSimLow(trained_low_evaluator)
    shuffled.update(refs, videos.roll(1, dims=0))  # every reference meets another identity's video
    assert float(matched.compute()) > float(shuffled.compute()) + 0.08
    drift = IdentityDrift(trained_low_evaluator)
    drift.update(refs, videos)
    cross = IdentityDrift(trained_low_evaluator)
    cross.update(refs, videos.transpose(0, 1))  # each "video" now holds one frame of every identity
    assert float(drift.compute()) < float(cross.compute())


class _HalfGate(torch.nn.Module):
    """A gate that sees a face only in frames whose mean is positive."""

    def is_face(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)) > 0


def test_frames_without_a_face_score_zero_and_count_in_the_face_rate() -> None:
    from consisid_lab.metrics.facesim import FaceRate

    ref, _ = _videos(b=2)
    video = ref[:, None].repeat(1, 4, 1, 1, 1).clamp(-0.5, 0.5)
    video[:, :2] = video[:, :2] * 0 + 0.5  # frames 0, 1: "faces" by the gate's rule; 2, 3: not
    video[:, 2:] = -0.5
    ungated, gated = FaceSim(_random_evaluator()), FaceSim(_random_evaluator(), gate=_HalfGate())
    ungated.update(ref, video)
    gated.update(ref, video)
    assert float(gated.compute()) < float(ungated.compute())
    rate = FaceRate(_HalfGate())
    rate.update(video)
    assert float(rate.compute()) == pytest.approx(0.5)
    blank = FaceSim(_random_evaluator(), gate=_HalfGate())
    blank.update(ref, torch.full_like(video, -0.5))
    assert float(blank.compute()) == 0.0


def test_metrics_name_the_range_and_both_shapes_of_bad_input() -> None:
    ref, video = _videos(b=2)
    metric = FaceSim(_random_evaluator())
    with pytest.raises(ValueError, match=r"\[-1, 1\].*\[0, 255"):
        metric.update(ref, (video + 1) * 127.5)
    with pytest.raises(ValueError, match="non-finite"):
        metric.update(ref, video * float("nan"))
    with pytest.raises(ValueError, match=r"\(2, 5, 3, 32, 32\).*ref: \(2, 3, 32, 32\)|ref: \(2, 3, 32, 32\)"):
        metric.update(ref, video[:, :, :2])


def test_copy_paste_flags_the_reference_pasted_into_every_frame() -> None:
    from consisid_lab.metrics.facesim import CopyPaste

    ref, real = _videos(b=3)
    honest, pasted = CopyPaste(), CopyPaste()
    honest.update(ref, real, real.roll(1, dims=1))
    pasted.update(ref, real, (ref[:, None].expand_as(real) + 0.01).clamp(-1, 1))
    assert float(honest.compute()) == pytest.approx(1.0, rel=0.05)
    assert float(pasted.compute()) > 20


def test_background_error_follows_the_corner_colour_and_ignores_the_centre() -> None:
    from consisid_lab.metrics.background import BackgroundError, corner_colour

    gen = torch.Generator().manual_seed(0)
    real = torch.full((2, 3, 3, 32, 32), -1.0)
    real[0, :, 0] = 0.6  # a red background in clip 0
    real[1, :, 2] = 0.6  # a blue one in clip 1
    same = real.clone()
    same[..., 8:, 8:24] = torch.rand(2, 3, 3, 24, 16, generator=gen) * 2 - 1  # another face in the centre
    torch.testing.assert_close(corner_colour(same), corner_colour(real))
    own, swapped = BackgroundError(), BackgroundError()
    own.update(real, same)
    swapped.update(real, same.flip(0))
    assert float(own.compute()) == pytest.approx(0.0, abs=1e-6)
    # red against blue: two of three channels differ by 0.8 in [0, 1] units
    assert float(swapped.compute()) == pytest.approx(1.6 / 3, abs=1e-5)
    with pytest.raises(ValueError, match=r"\(2, 3, 3, 32, 32\).*\(2, 3, 3, 16, 16\)"):
        own.update(real, real[..., :16, :16])
    with pytest.raises(ValueError, match="fraction"):
        BackgroundError(fraction=0.75)


class _AlwaysFace(torch.nn.Module):
    def is_face(self, images: torch.Tensor) -> torch.Tensor:
        return torch.ones(images.shape[0], dtype=torch.bool)


def _benchmark_scorer(monkeypatch, batch) -> Callable[[torch.Tensor], dict[str, float]]:
    """``BenchmarkMetrics`` on random evaluators and a gate that finds a face everywhere: generated videos -> the
    metrics of one pass over ``batch``."""
    from types import SimpleNamespace

    import consisid_lab.encoders.store as store
    from consisid_lab.metrics.benchmark import BenchmarkMetrics

    standins = SimpleNamespace(
        evaluator=_random_evaluator("full", 0),
        evaluator_low=_random_evaluator("low", 1),
        evaluator_high=_random_evaluator("high", 2),
        face_gate=_AlwaysFace(),
    )
    monkeypatch.setattr(store, "load_standins", lambda *a, **k: standins)

    def scores(generated: torch.Tensor) -> dict[str, float]:
        metrics = BenchmarkMetrics()
        metrics.update(batch, generated)
        return {k: float(v) for k, v in metrics.compute().items()}

    return scores


def test_band_identity_gaps_subtract_the_score_against_another_identity(monkeypatch) -> None:
    """``identity_gap_low`` / ``identity_gap_high``: a band's FaceSim against the clip's own reference minus against
    another identity's, for the generations and (``_real``) for the real clips. A generation that scores as high
    against every reference (the same face for all) has a gap of 0 in both bands, whatever its FaceSim."""
    from types import SimpleNamespace

    ref, video = _videos(b=4, f=3)
    face_mask = torch.zeros(video.shape[0], video.shape[1], 1, *video.shape[3:])
    batch = SimpleNamespace(ref_face=ref, video=video, identity=torch.arange(4), face_mask=face_mask)
    scores = _benchmark_scorer(monkeypatch, batch)
    pasted = scores(ref[:, None].expand_as(video).contiguous())
    for band in ("low", "high"):
        assert pasted[f"facesim_{band}"] == pytest.approx(1.0, abs=1e-5)
        assert pasted[f"identity_gap_{band}"] == pytest.approx(1.0 - pasted[f"facesim_{band}_shuffled"])
        assert pasted[f"identity_gap_{band}"] > 0.05
        # the real clips' own gap, the same for any generation
        assert pasted[f"identity_gap_{band}_real"] == pytest.approx(
            pasted[f"facesim_{band}_real"] - pasted[f"facesim_{band}_real_shuffled"]
        )
    same_face = scores(ref[:1, None].expand_as(video).contiguous())  # identity 0's face in every video
    for band in ("low", "high"):
        assert same_face[f"facesim_{band}"] > 0.05
        assert same_face[f"identity_gap_{band}"] == pytest.approx(0.0, abs=1e-6)
    real = scores(video)
    for band in ("low", "high"):
        assert real[f"identity_gap_{band}"] == pytest.approx(real[f"identity_gap_{band}_real"])


def test_hf_energy_ratio_places_an_excess_on_the_face_or_the_background(monkeypatch) -> None:
    """``hf_energy_ratio_face`` / ``_background`` split the HF energy ratio by the real clip's face mask: noise added
    outside the face raises the background ratio alone, a blurred face lowers the face ratio alone."""
    from types import SimpleNamespace

    ref, coarse = _videos(b=4, f=3)
    # smooth frames (4 x 4 noise upsampled bilinearly), so that added noise shows in the energy
    video = torch.nn.functional.interpolate(coarse[..., :4, :4].flatten(0, 1), size=(32, 32), mode="bilinear")
    video = video.unflatten(0, coarse.shape[:2])
    face_mask = torch.zeros(video.shape[0], video.shape[1], 1, *video.shape[3:])
    face_mask[..., 8:24, 8:24] = 1
    batch = SimpleNamespace(ref_face=ref, video=video, identity=torch.arange(4), face_mask=face_mask)
    scores = _benchmark_scorer(monkeypatch, batch)
    same = scores(video)
    for key in ("hf_energy_ratio", "hf_energy_ratio_face", "hf_energy_ratio_background"):
        assert same[key] == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(1)
    noisy = video + 0.5 * torch.randn(video.shape, generator=gen) * (1 - face_mask)
    noisy_bg = scores(noisy.clamp(-1, 1))
    assert noisy_bg["hf_energy_ratio_background"] > 1.5
    # pairs that touch the mask count as face: only its border changes
    assert noisy_bg["hf_energy_ratio_face"] < noisy_bg["hf_energy_ratio_background"] / 2
    blurred = video.clone()
    blurred[..., 8:24, 8:24] = video[..., 8:24, 8:24].mean(dim=(-2, -1), keepdim=True)
    flat_face = scores(blurred)
    assert flat_face["hf_energy_ratio_face"] < 0.8
    assert flat_face["hf_energy_ratio_background"] == pytest.approx(1.0)
