"""Spectrum code against analytic cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from consisid_lab.analysis import (
    SCALAR_NAMES,
    SpectrumAccumulator,
    SpectrumResult,
    centred_radius,
    compute_spectrum,
    crop_faces,
    tokens_to_maps,
)
from consisid_lab.analysis.spectrum import num_radial_bins
from consisid_lab.data.spectral_filters import radial_frequency


def _sinusoid(h: int, w: int, ky: int, kx: int) -> torch.Tensor:
    """1 + cos with ky cycles per height and kx per width: normalised radius sqrt((2ky/h)^2 + (2kx/w)^2)."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return (1 + torch.cos(2 * math.pi * (ky * y / h + kx * x / w)))[None, None]  # (1, 1, H, W)


def _low_pass(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    r = torch.from_numpy(radial_frequency(h, w))  # unshifted, as fft2 lays out its output
    return torch.fft.ifft2(torch.fft.fft2(x) * (r <= cutoff)).real


@pytest.mark.parametrize(("h", "w", "ky", "kx"), [(32, 32, 0, 5), (32, 32, 4, 4), (16, 40, 3, 10), (24, 12, 2, 2)])
def test_sinusoid_peaks_at_its_radius(h, w, ky, kx):
    result = compute_spectrum(_sinusoid(h, w, ky, kx))
    r0 = math.hypot(2 * ky / h, 2 * kx / w)
    peak = result.radius[1:][np.argmax(result.rel_curve[1:])]  # bin 0 is DC
    assert abs(peak - r0) <= 0.5 / num_radial_bins(h, w) + 1e-9
    assert result.scalars["spectral_centroid"] == pytest.approx(r0, abs=1e-6)  # all AC power sits at r0
    assert result.scalars["hf_ratio_025"] == pytest.approx(float(r0 > 0.25), abs=1e-6)


def test_white_noise_has_a_flat_relative_curve():
    g = torch.Generator().manual_seed(0)
    result = compute_spectrum(torch.randn(64, 3, 32, 32, generator=g))
    ac = result.rel_curve[1:]
    assert np.ptp(ac) < 0.1  # flat away from DC
    assert abs(result.scalars["radial_slope"]) < 0.05
    # the power of white noise is uniform over frequencies, so the ratios are area fractions
    r = centred_radius(32, 32)
    assert result.scalars["hf_ratio_050"] == pytest.approx(((r > 0.5).sum() / ((r > 0).sum())).item(), abs=0.02)


def test_low_pass_lowers_high_frequency_ratio_and_slope():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(16, 1, 32, 32, generator=g, dtype=torch.float64)
    full = compute_spectrum(noise).scalars
    low = compute_spectrum(_low_pass(noise, 0.4)).scalars
    assert low["hf_ratio_025"] < full["hf_ratio_025"]
    assert low["hf_ratio_050"] < 1e-6 < full["hf_ratio_050"]
    assert low["spectral_centroid"] < full["spectral_centroid"]
    assert low["radial_slope"] < full["radial_slope"]
    assert low["rel_log_amp_nyquist"] < full["rel_log_amp_nyquist"] - 5


def test_non_square_maps_have_nyquist_at_one_on_both_axes():
    h, w = 8, 20
    r = centred_radius(h, w)
    assert r[h // 2, w // 2] == 0
    assert r[0, w // 2] == pytest.approx(1.0) and r[h // 2, 0] == pytest.approx(1.0)
    # a sinusoid at Nyquist along either axis lands in the last bin
    for ky, kx in ((h // 2, 0), (0, w // 2)):
        result = compute_spectrum(_sinusoid(h, w, ky, kx))
        assert result.radius[np.argmax(result.rel_curve[1:]) + 1] == pytest.approx(1.0)
        assert result.log_amp.shape == (h, w)
        assert len(result.radius) == num_radial_bins(h, w) + 1


def test_accumulator_equals_one_big_batch_and_npz_round_trip(tmp_path):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, 10, 14, generator=g, dtype=torch.float64)
    acc = SpectrumAccumulator()
    acc.update(x[:2])
    acc.update(x[2:])
    split, whole = acc.result("x"), compute_spectrum(x, "x")
    np.testing.assert_allclose(split.log_amp, whole.log_amp, atol=1e-10)
    np.testing.assert_allclose(split.power, whole.power, rtol=1e-10)
    loaded = SpectrumResult.from_npz(whole.to_npz(tmp_path / "x.npz"))
    assert loaded.name == "x" and loaded.count == 24
    assert list(loaded.scalars) == list(SCALAR_NAMES)
    assert loaded.scalars == pytest.approx(whole.scalars)
    np.testing.assert_array_equal(loaded.rel_curve, whole.rel_curve)
    np.savez(tmp_path / "bad.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not a spectrum file"):
        SpectrumResult.from_npz(tmp_path / "bad.npz")


def test_bad_inputs_name_the_shape():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        compute_spectrum(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="2x2"):
        compute_spectrum(torch.zeros(1, 1, 1, 8))


def test_tokens_to_maps_drops_text_and_round_trips_layout():
    b, f, h, w, c, text = 2, 3, 4, 5, 6, 7
    maps = torch.randn(b, f, c, h, w)
    # the patch embedding's order: frame-major, then rows, then columns, channels last
    video_tokens = maps.permute(0, 1, 3, 4, 2).reshape(b, f * h * w, c)
    tokens = torch.cat([torch.full((b, text, c), 1e6), video_tokens], dim=1)
    out = tokens_to_maps(tokens, f, h, w, num_text_tokens=text)
    assert out.shape == (b * f, c, h, w)
    torch.testing.assert_close(out, maps.reshape(b * f, c, h, w))
    torch.testing.assert_close(tokens_to_maps(video_tokens, f, h, w), out)
    with pytest.raises(ValueError, match="text tokens"):
        tokens_to_maps(tokens, f, h, w)


def test_face_crops_follow_the_mask():
    img = torch.zeros(2, 3, 32, 32)
    img[0, :, 8:16, 4:20] = 1.0  # a bright 8x16 box
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 8:16, 4:20] = 1  # frame 1 has no face
    crops = crop_faces(img, mask, size=16)
    assert crops.shape == (1, 1, 16, 16)
    # the box is grown to a 16x16 square around its centre, so the bright rows are the middle half
    rows = crops[0, 0].mean(dim=1)
    assert rows[4:12].min() > 0.9 and rows[:3].max() < 0.1 and rows[13:].max() < 0.1
    assert crop_faces(img, mask, size=8, channels="rgb").shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="gray"):
        crop_faces(img, mask, channels="hsv")


def test_constant_image_has_undefined_ratios():
    # a constant image has no power outside DC: ratios are undefined (NaN), not silently 0
    result = compute_spectrum(torch.ones(1, 1, 8, 8))
    assert math.isnan(result.scalars["hf_ratio_025"]) and math.isnan(result.scalars["spectral_centroid"])
