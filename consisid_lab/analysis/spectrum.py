"""Fourier analysis of feature maps and images (Park & Kim, "How do vision transformers work?", ICLR 2022).

Recipe (DESIGN.md section 5): a 2D FFT per channel over the last two axes of ``(N, C, H, W)`` maps, the log
amplitude ``log(|F| + eps)``, shifted so that the zero frequency sits in the centre, averaged over ``N`` and
``C`` *after* the log. The relative log amplitude is that map minus its DC value.

Frequencies are measured by the normalised radius ``r = sqrt(fy^2 + fx^2)`` with ``fy``, ``fx`` in units of
the Nyquist frequency of *their own* axis, so ``r = 1`` is Nyquist on each axis even for non-square maps.
The radial curve has one bin per step of ``1 / n`` with ``n = min(H, W) // 2`` (the coarser axis' frequency
step, so every bin holds at least one frequency): bin ``k`` is centred at ``k / n`` and collects
``|r - k / n| < 1 / (2n)``. Corner frequencies beyond ``r = 1 + 1 / (2n)`` are left out of the curve (they exist
only diagonally and would mix axes with different sampling); they *are* counted in the energy ratios and the
centroid, which are computed on the full 2D power map.

Scalars per tensor (``SCALAR_NAMES``):

- ``rel_log_amp_nyquist``: relative log amplitude of the ``r = 1`` bin (Park & Kim's headline number);
- ``hf_ratio_025``, ``hf_ratio_050``: fraction of the power ``|F|^2`` at ``r > 0.25`` / ``r > 0.5``, DC excluded;
- ``spectral_centroid``: power-weighted mean radius, DC excluded;
- ``radial_slope``: least-squares slope of log radial power against log radius over the non-DC bins
  (0 for white noise, about -2 for natural images).

Power statistics use the mean power over ``N`` and ``C`` (a ratio of means, so high-energy channels weigh
more), the log-amplitude map the mean of logs, as in the recipe. Undefined scalars (no power outside DC, fewer
than two radial bins) are NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from consisid_lab.data.spectral_filters import radial_frequency
from consisid_lab.utils.faults import require_finite

SCALAR_NAMES = ("rel_log_amp_nyquist", "hf_ratio_025", "hf_ratio_050", "spectral_centroid", "radial_slope")
DEFAULT_EPS = 1e-8
# Upper bound on elements transformed at once: block outputs of a full-size DiT are (B*F, 3072, h, w); doing them
# in slices keeps the complex intermediate small.
_MAX_FFT_ELEMENTS = 1 << 25


def centred_radius(height: int, width: int) -> np.ndarray:
    """Normalised radius of every frequency of a *centred* (fftshifted) ``(height, width)`` spectrum.

    The project's convention (``consisid_lab.data.spectral_filters.radial_frequency``): each axis in units of its
    own Nyquist frequency, so ``1`` is Nyquist on either axis and the corners reach ``sqrt(2)``. The DC term
    (radius 0) is at ``(height // 2, width // 2)``.
    """
    return np.fft.fftshift(radial_frequency(height, width))  # (H, W)


def num_radial_bins(height: int, width: int) -> int:
    """Index of the ``r = 1`` bin, i.e. the curve has ``num_radial_bins + 1`` points (see module docstring)."""
    return max(min(height, width) // 2, 1)


def _check_spatial(height: int, width: int) -> None:
    if height < 2 or width < 2:
        raise ValueError(f"spectra need maps of at least 2x2 pixels, got {height}x{width}; analyse larger maps")


@dataclass
class SpectrumResult:
    """Spectrum of one tensor. Arrays are numpy so results can be saved, plotted and compared across runs."""

    name: str
    log_amp: np.ndarray  # (H, W) centred mean log amplitude
    power: np.ndarray  # (H, W) centred mean power |F|^2
    radius: np.ndarray  # (K,) radial bin centres, 0 .. 1
    rel_curve: np.ndarray  # (K,) relative log amplitude per radial bin, rel_curve[0] = 0 for the DC bin
    scalars: dict[str, float] = field(default_factory=dict)
    count: int = 0  # number of 2D maps averaged (N * C)

    @property
    def rel_log_amp(self) -> np.ndarray:
        """Centred map of the relative log amplitude (value minus the DC value)."""
        h, w = self.log_amp.shape
        return self.log_amp - self.log_amp[h // 2, w // 2]

    def to_npz(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = list(self.scalars)
        np.savez(
            path,
            name=np.array(self.name),
            log_amp=self.log_amp,
            power=self.power,
            radius=self.radius,
            rel_curve=self.rel_curve,
            scalar_names=np.array(names, dtype=str),
            scalar_values=np.array([self.scalars[k] for k in names], dtype=np.float64),
            count=np.array(self.count),
        )
        return path

    @classmethod
    def from_npz(cls, path: str | Path) -> SpectrumResult:
        path = Path(path)
        with np.load(path, allow_pickle=False) as data:
            missing = {"name", "log_amp", "power", "radius", "rel_curve", "scalar_names", "scalar_values"} - set(
                data.files
            )
            if missing:
                raise ValueError(
                    f"{path} is not a spectrum file (missing arrays {sorted(missing)}); write it with "
                    "SpectrumResult.to_npz"
                )
            names = [str(n) for n in data["scalar_names"]]
            return cls(
                name=str(data["name"]),
                log_amp=data["log_amp"],
                power=data["power"],
                radius=data["radius"],
                rel_curve=data["rel_curve"],
                scalars={n: float(v) for n, v in zip(names, data["scalar_values"], strict=True)},
                count=int(data["count"]) if "count" in data.files else 0,
            )


class SpectrumAccumulator:
    """Running mean of the centred log-amplitude and power maps over any number of ``(N, C, H, W)`` batches.

    Averaging per batch and then across batches equals averaging the concatenation, so a hooked module that
    fires several times (or activations too large to hold at once) gives the same result as one big batch.
    """

    def __init__(self, eps: float = DEFAULT_EPS) -> None:
        self.eps = eps
        self._log_amp_sum: Tensor | None = None  # (H, W) float64
        self._power_sum: Tensor | None = None  # (H, W) float64
        self.count = 0

    def update(self, maps: Tensor) -> None:
        if maps.ndim != 4:
            raise ValueError(f"expected maps of shape (N, C, H, W), got {tuple(maps.shape)}; reshape tokens first")
        n, c, h, w = maps.shape
        _check_spatial(h, w)
        require_finite("SpectrumAccumulator.update", maps=maps)
        if self._log_amp_sum is not None and self._log_amp_sum.shape != (h, w):
            raise ValueError(
                f"maps of size {h}x{w} cannot join a spectrum of size {tuple(self._log_amp_sum.shape)}; "
                "use one accumulator per spatial size"
            )
        flat = maps.detach().reshape(n * c, h, w)  # (N*C, H, W)
        step = max(_MAX_FFT_ELEMENTS // (h * w), 1)
        log_sum = torch.zeros(h, w, dtype=torch.float64, device=maps.device)
        power_sum = torch.zeros(h, w, dtype=torch.float64, device=maps.device)
        for start in range(0, n * c, step):
            # float32 at least: bf16/fp16 FFTs are unsupported or too coarse for log amplitudes.
            chunk = flat[start : start + step].to(torch.promote_types(flat.dtype, torch.float32))
            amp = torch.fft.fftshift(torch.fft.fft2(chunk, norm="ortho"), dim=(-2, -1)).abs()  # (n, H, W)
            log_sum += torch.log(amp + self.eps).sum(dim=0).double()
            power_sum += amp.square().sum(dim=0).double()
        if self._log_amp_sum is None:
            self._log_amp_sum, self._power_sum = log_sum, power_sum
        else:
            self._log_amp_sum += log_sum.to(self._log_amp_sum.device)
            self._power_sum += power_sum.to(self._power_sum.device)
        self.count += n * c

    def result(self, name: str = "") -> SpectrumResult:
        if self._log_amp_sum is None or self._power_sum is None:
            raise ValueError(f"spectrum {name!r} has no data: call update() with at least one batch of maps")
        log_amp = (self._log_amp_sum / self.count).cpu().numpy()
        power = (self._power_sum / self.count).cpu().numpy()
        return spectrum_from_maps(log_amp, power, name=name, count=self.count)


def radial_profile(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of a centred ``(H, W)`` map per radial bin: ``(radius centres (K,), means (K,))``."""
    h, w = values.shape
    _check_spatial(h, w)
    n = num_radial_bins(h, w)
    idx = np.rint(centred_radius(h, w) * n).astype(np.int64)  # (H, W) bin of each frequency
    keep = idx <= n  # corners beyond r = 1 + 1/(2n) are not part of the curve
    sums = np.bincount(idx[keep], weights=values[keep], minlength=n + 1)
    counts = np.bincount(idx[keep], minlength=n + 1)
    assert np.all(counts > 0), "every bin holds a frequency of the coarser axis"
    return np.arange(n + 1) / n, sums / counts


def spectrum_scalars(log_amp: np.ndarray, power: np.ndarray) -> dict[str, float]:
    """The ``SCALAR_NAMES`` of one spectrum from its centred mean log-amplitude and power maps."""
    h, w = log_amp.shape
    dc = (h // 2, w // 2)
    radius = centred_radius(h, w)  # (H, W)
    _, rel_curve = radial_profile(log_amp - log_amp[dc])
    ac = radius > 0  # everything but DC
    total = float(power[ac].sum())
    if total > 0:
        hf_025 = float(power[radius > 0.25].sum()) / total
        hf_050 = float(power[radius > 0.5].sum()) / total
        centroid = float((radius[ac] * power[ac]).sum()) / total
    else:
        hf_025 = hf_050 = centroid = float("nan")
    centres, radial_power = radial_profile(power)
    sel = (centres > 0) & (radial_power > 0)
    if sel.sum() >= 2:
        slope = float(np.polyfit(np.log(centres[sel]), np.log(radial_power[sel]), 1)[0])
    else:
        slope = float("nan")
    return {
        "rel_log_amp_nyquist": float(rel_curve[-1]),
        "hf_ratio_025": hf_025,
        "hf_ratio_050": hf_050,
        "spectral_centroid": centroid,
        "radial_slope": slope,
    }


def spectrum_from_maps(log_amp: np.ndarray, power: np.ndarray, name: str = "", count: int = 0) -> SpectrumResult:
    """Assemble a ``SpectrumResult`` (radial curve + scalars) from centred mean log-amplitude and power maps."""
    h, w = log_amp.shape
    radius, rel_curve = radial_profile(log_amp - log_amp[h // 2, w // 2])
    return SpectrumResult(
        name=name,
        log_amp=np.asarray(log_amp, dtype=np.float64),
        power=np.asarray(power, dtype=np.float64),
        radius=radius,
        rel_curve=rel_curve,
        scalars=spectrum_scalars(log_amp, power),
        count=count,
    )


def compute_spectrum(maps: Tensor, name: str = "", eps: float = DEFAULT_EPS) -> SpectrumResult:
    """Spectrum of ``(N, C, H, W)`` maps (images: ``C`` = colour channels; features: ``N`` = batch * frames)."""
    acc = SpectrumAccumulator(eps=eps)
    acc.update(maps)
    return acc.result(name)


def tokens_to_maps(tokens: Tensor, num_frames: int, h: int, w: int, num_text_tokens: int = 0) -> Tensor:
    """Video tokens ``(B, L, C)`` of a DiT to spatial maps ``(B * F, C, h, w)``.

    ``L = num_text_tokens + num_frames * h * w``: text tokens come first in the joint sequence (CogVideoX and
    ConsisID concatenate ``[text; video]``) and are dropped; video tokens are ordered frame-major, then rows,
    then columns, as the patch embedding flattens them.
    """
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens of shape (B, L, C), got {tuple(tokens.shape)}")
    b, length, c = tokens.shape
    expected = num_text_tokens + num_frames * h * w
    if length != expected:
        raise ValueError(
            f"token sequence of length {length} does not match the layout: {num_text_tokens} text tokens + "
            f"{num_frames} frames x {h} x {w} = {expected}; check the module's token_layout"
        )
    video = tokens[:, num_text_tokens:].reshape(b, num_frames, h, w, c)  # (B, F, h, w, C)
    return video.permute(0, 1, 4, 2, 3).reshape(b * num_frames, c, h, w)  # (B*F, C, h, w)
