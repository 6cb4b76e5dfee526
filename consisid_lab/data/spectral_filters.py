"""Radial low/high-pass filters and band-energy helpers over the last two axes ``(..., H, W)``.

Frequencies are *normalised radii*: each axis is scaled on its own so that 0.5 cycles/pixel (Nyquist) maps to 1,
``r = sqrt((2 fy)^2 + (2 fx)^2)``. A non-square map therefore bins the same way as a square one, and the corners
of the spectrum reach ``sqrt(2)``. This is the convention of the frequency analysis (DESIGN.md section 5).

Every function takes a numpy array or a torch tensor and returns the same kind (numpy through ``numpy.fft``,
torch through ``torch.fft``, so tensors keep their device and autograd graph). The FFT treats the map as periodic:
filter maps whose borders roughly agree, or differences of two images with the same background.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def radial_frequency(h: int, w: int, *, rfft: bool = False) -> np.ndarray:
    """Normalised radial frequency of each FFT bin, ``(h, w)`` (``(h, w // 2 + 1)`` for the rfft layout).

    The layout is unshifted, matching ``fft2`` / ``rfft2`` outputs: bin ``[0, 0]`` is DC.
    """
    if h < 1 or w < 1:
        raise ValueError(f"radial_frequency needs a positive size, got h={h}, w={w}")
    fy = np.fft.fftfreq(h) * 2.0  # (h,) in [-1, 1)
    fx = (np.fft.rfftfreq(w) if rfft else np.fft.fftfreq(w)) * 2.0
    return np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)  # (h, w) or (h, w // 2 + 1)


def _low_pass_gain(r: np.ndarray, cutoff: float, transition: float) -> np.ndarray:
    """Gain of the low-pass: 1 below the cutoff, 0 above; a raised-cosine ramp of width ``transition`` if > 0.

    The ideal filter keeps ``r <= cutoff``; low + high gains always sum to exactly 1.
    """
    if transition <= 0:
        return (r <= cutoff).astype(np.float64)
    lo, hi = cutoff - transition / 2, cutoff + transition / 2
    ramp = np.clip((r - lo) / (hi - lo), 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * ramp))


def _check(img: ArrayT, cutoff: float, transition: float) -> None:
    if img.ndim < 2:
        raise ValueError(f"spectral filters need an array of shape (..., H, W), got shape {tuple(img.shape)}")
    if not cutoff >= 0:
        raise ValueError(f"cutoff must be a normalised radius >= 0 (1 = Nyquist), got {cutoff}")
    if transition < 0:
        raise ValueError(f"transition must be >= 0 (0 = ideal filter), got {transition}")


def _apply_gain(img: ArrayT, gain_fn) -> ArrayT:
    h, w = img.shape[-2:]
    gain = gain_fn(radial_frequency(h, w, rfft=True))  # (h, w // 2 + 1)
    if isinstance(img, torch.Tensor):
        # Half precision FFTs are limited to powers of two on CUDA and missing on CPU: compute in float32.
        work = img if img.dtype in (torch.float32, torch.float64) else img.float()
        g = torch.as_tensor(gain, dtype=work.dtype, device=img.device)
        out = torch.fft.irfft2(torch.fft.rfft2(work) * g, s=(h, w))
        return out.to(img.dtype) if img.is_floating_point() else out
    work = np.asarray(img)
    out_dtype = work.dtype if np.issubdtype(work.dtype, np.floating) else np.float64
    out = np.fft.irfft2(np.fft.rfft2(work) * gain, s=(h, w))
    return out.astype(out_dtype, copy=False)


def low_pass(img: ArrayT, cutoff: float, *, transition: float = 0.0) -> ArrayT:
    """Keep spectral content at normalised radius ``<= cutoff`` over the last two axes.

    ``transition > 0`` gives a raised-cosine ramp of that width centred on the cutoff (less ringing).
    ``low_pass(x, c) + high_pass(x, c) == x`` up to float rounding, for either filter kind.
    """
    _check(img, cutoff, transition)
    return _apply_gain(img, lambda r: _low_pass_gain(r, cutoff, transition))


def high_pass(img: ArrayT, cutoff: float, *, transition: float = 0.0) -> ArrayT:
    """Keep spectral content above normalised radius ``cutoff`` over the last two axes (the complement of
    :func:`low_pass` with the same arguments)."""
    _check(img, cutoff, transition)
    return _apply_gain(img, lambda r: 1.0 - _low_pass_gain(r, cutoff, transition))


def band_energy_ratio(img: np.ndarray | torch.Tensor, cutoff: float, *, include_dc: bool = False) -> float:
    """Fraction of the spectral energy ``sum |FFT|^2`` strictly above normalised radius ``cutoff``.

    Energies are summed over all leading axes (channels, frames, batch) before the ratio is taken. The DC bin is
    excluded by default, so a constant offset (e.g. overall brightness) does not dilute the ratio; pass
    ``include_dc=True`` for the plain Parseval fraction (then ``||high_pass(x)||^2 / ||x||^2`` for the ideal
    filter). Returns 0.0 for an all-zero (or constant, with DC excluded) input.
    """
    _check(img, cutoff, 0.0)
    h, w = img.shape[-2:]
    r = radial_frequency(h, w)  # (h, w)
    if isinstance(img, torch.Tensor):
        x = img.detach().to(torch.float64).cpu().numpy()
    else:
        x = np.asarray(img, dtype=np.float64)
    power = np.abs(np.fft.fft2(x)) ** 2  # (..., h, w)
    per_bin = power.reshape(-1, h, w).sum(axis=0)  # (h, w)
    if not include_dc:
        per_bin[0, 0] = 0.0
    total = float(per_bin.sum())
    if total <= 0.0:
        return 0.0
    return float(per_bin[r > cutoff].sum()) / total
