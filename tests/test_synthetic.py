"""The synthetic benchmark generator and its spectral filters."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from consisid_lab.data.spectral_filters import band_energy_ratio, high_pass, low_pass, radial_frequency
from consisid_lab.data.synthetic import (
    SPLIT_CAPACITY,
    SPLITS,
    SyntheticConfig,
    border_window,
    caption_for,
    frequency_separation_report,
    identity_seed,
    identity_texture,
    make_clip,
    render_clip,
    render_frames,
    sample_identity,
    sample_motion,
)

CFG = SyntheticConfig()
SMALL = SyntheticConfig(num_frames=5)


# --------------------------------------------------------------------------------------- spectral filters


def test_radial_frequency_normalises_each_axis_to_nyquist() -> None:
    r = radial_frequency(8, 16)
    assert r.shape == (8, 16)
    assert r[0, 0] == 0.0
    assert r[4, 0] == pytest.approx(1.0)  # Nyquist along H
    assert r[0, 8] == pytest.approx(1.0)  # Nyquist along W, although W != H
    assert r.max() == pytest.approx(np.sqrt(2.0))
    assert radial_frequency(8, 16, rfft=True).shape == (8, 9)


@pytest.mark.parametrize("transition", [0.0, 0.1])
def test_low_and_high_pass_split_a_signal_exactly(transition: float) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 24, 40))
    lo, hi = low_pass(x, 0.25, transition=transition), high_pass(x, 0.25, transition=transition)
    np.testing.assert_allclose(lo + hi, x, atol=1e-10)
    # torch tensors take the same path through torch.fft and agree with numpy
    t = torch.from_numpy(x)
    torch.testing.assert_close(low_pass(t, 0.25, transition=transition), torch.from_numpy(lo))
    assert low_pass(t.float(), 0.25).dtype == torch.float32


def test_filters_keep_or_remove_a_sinusoid_by_its_radius() -> None:
    h = w = 32
    y, x = np.mgrid[:h, :w]
    slow = np.cos(2 * np.pi * 2 * x / w)  # 2 cycles per 32 px: radius 0.125
    fast = np.cos(2 * np.pi * 10 * y / h)  # radius 0.625
    np.testing.assert_allclose(low_pass(slow + fast, 0.25), slow, atol=1e-9)
    np.testing.assert_allclose(high_pass(slow + fast, 0.25), fast, atol=1e-9)
    assert band_energy_ratio(fast, 0.25) == pytest.approx(1.0)
    assert band_energy_ratio(slow, 0.25) == pytest.approx(0.0, abs=1e-12)
    assert band_energy_ratio(slow + fast + 5.0, 0.25) == pytest.approx(0.5)  # DC excluded by default
    assert band_energy_ratio(slow + fast + 5.0, 0.25, include_dc=True) < 0.5
    assert band_energy_ratio(np.zeros((4, 4)), 0.25) == 0.0


def test_filters_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="cutoff"):
        low_pass(np.zeros((4, 4)), -0.1)
    with pytest.raises(ValueError, match="shape"):
        high_pass(np.zeros(4), 0.25)


# ------------------------------------------------------------------------------------------ config, seeds


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"height": 16}, "height"),
        ({"width": 31}, "width"),
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": 8}, "num_frames"),
        ({"supersample": 0}, "supersample"),
        ({"low_strength": -0.5}, "low_strength"),
        ({"low_strength": 1.5}, "low_strength"),
        ({"high_strength": 3.0}, "high_strength"),
        ({"identity_mode": "mid_only"}, "identity_mode"),
    ],
)
def test_bad_settings_raise_naming_the_setting(changes: dict, name: str) -> None:
    cfg = replace(CFG, **changes)
    with pytest.raises(ValueError, match=name):
        cfg.validate()
    with pytest.raises(ValueError, match=name):
        make_clip(cfg, 0, 0)  # before any rendering


def test_identity_seed_spaces_are_disjoint_and_checked() -> None:
    seeds = {s: {identity_seed(s, i) for i in (0, 1, SPLIT_CAPACITY - 1)} for s in SPLITS}
    for a in SPLITS:
        for b in SPLITS:
            if a != b:
                assert not seeds[a] & seeds[b]
    with pytest.raises(ValueError, match="split"):
        identity_seed("holdout", 0)
    with pytest.raises(ValueError, match="index"):
        identity_seed("train", SPLIT_CAPACITY)
    with pytest.raises(ValueError, match="index"):
        identity_seed("test", -1)


# ------------------------------------------------------------------------------------------- determinism


def _arrays(clip) -> dict[str, np.ndarray]:
    names = ("frames", "keypoints", "masks", "boxes", "ref_face", "ref_keypoints", "ref_mask", "ref_box")
    return {n: getattr(clip, n) for n in names}


def test_same_seeds_give_bit_identical_clips() -> None:
    a, b = make_clip(SMALL, 7, 11), make_clip(SMALL, 7, 11)
    for name, arr in _arrays(a).items():
        assert np.array_equal(arr, getattr(b, name)), name
    assert a.caption == b.caption
    # also when the caller's torch runs several threads (rendering pins one thread)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        c = make_clip(SMALL, 7, 11)
    finally:
        torch.set_num_threads(previous)
    assert np.array_equal(a.frames, c.frames)
    assert torch.get_num_threads() == previous


def test_clips_are_identical_in_a_fresh_process() -> None:
    """A new interpreter (other thread settings, empty caches) renders the same bytes."""
    import hashlib
    import subprocess
    import sys

    code = (
        "import hashlib, torch; torch.set_num_threads(2)\n"
        "from consisid_lab.data.synthetic import SyntheticConfig, make_clip\n"
        "c = make_clip(SyntheticConfig(num_frames=5), 7, 11)\n"
        "print(hashlib.sha256(c.frames.tobytes() + c.ref_face.tobytes() + c.keypoints.tobytes()).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    clip = make_clip(SMALL, 7, 11)
    expected = hashlib.sha256(clip.frames.tobytes() + clip.ref_face.tobytes() + clip.keypoints.tobytes())
    assert out.stdout.strip().splitlines()[-1] == expected.hexdigest()


def test_different_seeds_change_the_clip() -> None:
    base = make_clip(SMALL, 7, 11)
    other_video = make_clip(SMALL, 7, 12)
    other_identity = make_clip(SMALL, 8, 11)
    assert np.abs(base.frames - other_video.frames).mean() > 0.01
    assert np.abs(base.frames - other_identity.frames).mean() > 0.005
    # same video seed: the non-identity parameters (and hence the caption) are shared
    assert base.caption == other_identity.caption
    assert base.identity == make_clip(SMALL, 7, 12).identity


@pytest.mark.parametrize("frames", [1, 5, 13])
def test_any_4k_plus_1_frame_count_renders(frames: int) -> None:
    clip = make_clip(replace(CFG, num_frames=frames), 3, 4)
    assert clip.frames.shape == (frames, 64, 64, 3)
    assert clip.keypoints.shape == (frames, 5, 2)
    assert clip.masks.shape == (frames, 64, 64) and clip.masks.dtype == bool
    assert clip.boxes.shape == (frames, 4)


def test_large_non_square_frames_render() -> None:
    cfg = SyntheticConfig(height=120, width=180, num_frames=5)
    clip = make_clip(cfg, 3, 4)
    assert clip.frames.shape == (5, 120, 180, 3) and clip.frames.dtype == np.float32
    assert clip.ref_face.shape == (120, 180, 3)
    assert clip.frames.min() >= 0.0 and clip.frames.max() <= 1.0
    # the face scales with the shorter side and stays centred
    box = clip.boxes[0]
    assert 30 < box[2] - box[0] < 90 and 40 < (box[0] + box[2]) / 2 < 140


@pytest.mark.slow
def test_cogvideox_size_renders() -> None:
    cfg = SyntheticConfig(height=480, width=720, num_frames=49)
    clip = make_clip(cfg, 3, 4)
    assert clip.frames.shape == (49, 480, 720, 3)
    assert clip.masks[:, clip.keypoints[0, 2, 1].round().astype(int)].any()


# ---------------------------------------------------------------------------------------- geometry


def test_keypoints_masks_and_boxes_agree() -> None:
    for k in range(12):
        clip = make_clip(CFG, identity_seed("train", k), 100 + k)
        assert np.isfinite(clip.frames).all() and np.isfinite(clip.ref_face).all()
        kps = np.concatenate([clip.keypoints, clip.ref_keypoints[None]])  # (F + 1, 5, 2)
        masks = np.concatenate([clip.masks, clip.ref_mask[None]])
        boxes = np.concatenate([clip.boxes, clip.ref_box[None]])
        x, y = kps[..., 0], kps[..., 1]
        # inside the box
        assert (x >= boxes[:, None, 0]).all() and (x <= boxes[:, None, 2]).all()
        assert (y >= boxes[:, None, 1]).all() and (y <= boxes[:, None, 3]).all()
        # anatomical order (ArcFace): left eye left of right eye, eyes above nose above mouth
        assert (x[:, 0] < x[:, 1]).all() and (x[:, 3] < x[:, 4]).all()
        assert (y[:, :2].max(axis=1) < y[:, 2]).all()
        assert (y[:, 2] < y[:, 3:].min(axis=1)).all()
        # the face mask covers every keypoint
        f = np.arange(len(kps))[:, None]
        assert masks[f, np.rint(y).astype(int), np.rint(x).astype(int)].all()
        # boxes are tight around the masks
        rows = np.flatnonzero(masks[0].any(axis=1))
        assert boxes[0, 1] == rows[0] - 0.5 and boxes[0, 3] == rows[-1] + 0.5


def test_keypoints_follow_the_rendered_eyes() -> None:
    """The eye keypoints sit on the centres of the eye blobs as rendered (same geometry, not a guess)."""
    checked = 0
    for k in range(4):
        identity = sample_identity(CFG, identity_seed("train", k))
        no_eyes = replace(identity, low=replace(identity.low, eye_dark=0.0))
        motion = sample_motion(CFG, 30 + k)
        frames, kps, _, _ = render_frames(CFG, identity, motion)
        eyes = (render_frames(CFG, no_eyes, motion)[0] - frames).mean(axis=-1)  # (F, H, W) darkening by the eyes
        for f in np.flatnonzero(motion.eye_open > 0.9):
            for e in range(2):
                x, y = kps[f, e]
                xi, yi = int(np.rint(x)), int(np.rint(y))
                win = eyes[f, yi - 3 : yi + 4, xi - 3 : xi + 4]  # (7, 7)
                gy, gx = np.mgrid[yi - 3 : yi + 4, xi - 3 : xi + 4]
                cx, cy = (win * gx).sum() / win.sum(), (win * gy).sum() / win.sum()
                assert abs(cx - x) < 0.75 and abs(cy - y) < 0.75
                checked += 1
    assert checked > 20


def test_reference_is_whitened_outside_the_head_and_uses_other_params() -> None:
    clip = make_clip(CFG, 3, 4)
    assert clip.head_alpha is not None and clip.ref_head_alpha is not None
    outside = clip.ref_head_alpha < 0.01  # soft edges: alpha decays over a few pixels
    assert outside.mean() > 0.15
    np.testing.assert_allclose(clip.ref_face[outside], 1.0, atol=0.011)
    inside = clip.ref_head_alpha > 0.99
    assert inside.mean() > 0.1 and clip.ref_face[inside].mean() < 0.9
    assert clip.ref_motion is not None
    assert not np.allclose(clip.ref_motion.light[0], clip.motion.light[0])
    # the reference pose is near frontal
    assert abs(clip.ref_motion.yaw[0]) < 0.15
    # explicit reference seeds are honoured
    again = render_clip(CFG, clip.identity, clip.motion, ref_motion_seed=123)
    assert np.array_equal(again.frames, clip.frames) and not np.array_equal(again.ref_face, clip.ref_face)


def test_caption_speaks_of_non_identity_content_only() -> None:
    clip = make_clip(CFG, 3, 4)
    text = clip.caption.lower()
    assert text == caption_for(clip.motion).lower()
    for word in ("light", "background", "camera"):
        assert word in text
    for identity_word in ("hair", "skin", "mole", "eyes"):
        assert identity_word not in text


def test_caption_names_the_rendered_background_colour_first() -> None:
    """The caption determines the background: its colour word (5th) names the palette colour the corners show."""
    from consisid_lab.data.synthetic import _COLOUR_NAMES, colour_name

    hits = 0
    for seed in range(40):
        clip = make_clip(CFG, 1, 100 + seed)
        words = clip.caption.split()
        assert words[:4] == ["In", "front", "of", "a"] and words[4] == "plain", clip.caption
        name = " ".join(words[5:7]) if words[6] not in ("background", "background,") else words[5]
        assert name in _COLOUR_NAMES, clip.caption
        corners = clip.frames[0][[0, 0, -1, -1], [0, -1, 0, -1]]  # (4, 3) pixels away from the head
        hits += colour_name(corners.mean(axis=0)) == name
    # gradient, lighting-free background and the faint pattern keep the corner mean near the named colour
    assert hits >= 36, hits


# ------------------------------------------------------------------------------------ identity families


def test_identity_modes_fix_the_other_family() -> None:
    low_only = replace(CFG, identity_mode="low_only")
    a, b = sample_identity(low_only, 10), sample_identity(low_only, 11)
    assert a.high == b.high and a.low != b.low
    high_only = replace(CFG, identity_mode="high_only")
    a, b = sample_identity(high_only, 10), sample_identity(high_only, 11)
    assert a.low == b.low and a.high != b.high


def test_strength_zero_makes_identities_share_the_family() -> None:
    no_low = replace(CFG, low_strength=0.0)
    assert sample_identity(no_low, 10).low == sample_identity(no_low, 11).low
    no_high = replace(CFG, high_strength=0.0)
    assert not identity_texture(sample_identity(no_high, 10)).any()
    half = replace(CFG, high_strength=0.5)
    np.testing.assert_allclose(
        identity_texture(sample_identity(half, 10)), 0.5 * identity_texture(sample_identity(CFG, 10)), atol=1e-7
    )


def _pair_frames(cfg: SyntheticConfig, first: tuple[int, int], second: tuple[int, int], video_seed: int):
    motion = sample_motion(cfg, video_seed)
    a = render_frames(cfg, sample_identity(cfg, *first), motion)[0]
    b = render_frames(cfg, sample_identity(cfg, *second), motion)[0]
    w = border_window(cfg.height, cfg.width)  # see border_window: no false wrap-around edge
    return (a.transpose(0, 3, 1, 2) * w).astype(np.float64), (b.transpose(0, 3, 1, 2) * w).astype(np.float64)


def _rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x) / np.linalg.norm(y))


# Thresholds (relative L2 of the filtered difference to the raw difference, energy = its square). Measured at
# 64x64: high-only pairs ~0.01 after the low-pass, low-only pairs ~0.06 after the high-pass. The bounds leave
# 3-4x headroom and still mean "near-identical": 0.05 is 0.25% of the difference energy, 0.15 is 2.3%.
HIGH_ONLY_LOWPASS_MAX = 0.05
LOW_ONLY_HIGHPASS_MAX = 0.15


def test_high_only_identities_vanish_under_a_low_pass() -> None:
    s, o = identity_seed("test", 0), identity_seed("test", 1)
    a, b = _pair_frames(SMALL, (s, s), (s, o), video_seed=5)
    diff = a - b
    assert np.abs(diff).max() > 0.05  # the marks differ visibly
    assert _rel(low_pass(a, 0.25) - low_pass(b, 0.25), diff) < HIGH_ONLY_LOWPASS_MAX
    assert _rel(high_pass(a, 0.25) - high_pass(b, 0.25), diff) > 0.99


def test_low_only_identities_vanish_under_a_high_pass() -> None:
    s, o = identity_seed("test", 0), identity_seed("test", 1)
    a, b = _pair_frames(SMALL, (s, s), (o, s), video_seed=5)
    diff = a - b
    assert np.abs(diff).max() > 0.1
    assert _rel(high_pass(a, 0.25) - high_pass(b, 0.25), diff) < LOW_ONLY_HIGHPASS_MAX
    assert _rel(low_pass(a, 0.25) - low_pass(b, 0.25), diff) > 0.98


def test_high_frequency_marks_move_with_the_head() -> None:
    """The same marks under two poses: their difference images are not a fixed pattern on screen."""
    s, o = identity_seed("test", 2), identity_seed("test", 3)
    a1, b1 = _pair_frames(SMALL, (s, s), (s, o), video_seed=21)
    a2, b2 = _pair_frames(SMALL, (s, s), (s, o), video_seed=22)
    d1, d2 = a1 - b1, a2 - b2
    assert np.abs(d1 - d2).max() > 0.5 * np.abs(d1).max()


def test_frequency_separation_report() -> None:
    report = frequency_separation_report(SMALL, n_pairs=3)
    assert report["high_only_energy_below"] < HIGH_ONLY_LOWPASS_MAX**2
    assert report["low_only_energy_above"] < LOW_ONLY_HIGHPASS_MAX**2
    assert report["high_only_energy_below"] + report["high_only_energy_above"] == pytest.approx(1.0)
    assert report["low_only_lowpass_rel_l2"] == pytest.approx(np.sqrt(report["low_only_energy_below"]))
    # separation holds at other sizes: mark sizes are in output pixels, low-frequency shapes in face units
    large = frequency_separation_report(SyntheticConfig(height=96, width=144, num_frames=1), n_pairs=2)
    assert large["high_only_energy_below"] < HIGH_ONLY_LOWPASS_MAX**2
    assert large["low_only_energy_above"] < LOW_ONLY_HIGHPASS_MAX**2
