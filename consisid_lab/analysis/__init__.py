"""Fourier analysis of activations and images (Park & Kim's recipe, DESIGN.md section 5)."""

from consisid_lab.analysis.face_crops import crop_faces
from consisid_lab.analysis.spectrum import (
    SCALAR_NAMES,
    SpectrumAccumulator,
    SpectrumResult,
    centred_radius,
    compute_spectrum,
    radial_profile,
    spectrum_scalars,
    tokens_to_maps,
)

__all__ = [
    "SCALAR_NAMES",
    "SpectrumAccumulator",
    "SpectrumResult",
    "centred_radius",
    "compute_spectrum",
    "crop_faces",
    "radial_profile",
    "spectrum_scalars",
    "tokens_to_maps",
]
