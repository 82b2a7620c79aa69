"""The scanner model: the voxel grid of a scale and site, and ideal HU -> reconstructed int16 HU.

A scale fixes the field of view along z and the resolution relative to the paper's protocol
(0.45 mm in-plane, 5 mm slices). The profile modulates it: in-plane spacing is
``scale.inplane_mm * profile.inplane_spacing_mm / 0.45`` and the number of in-plane voxels is
``round(profile.fov_mm / spacing)``; slice spacing is ``scale.slice_mm * profile.slice_thickness_mm / 5``
with the slice count chosen to keep the scale's z coverage. So a 2.5 mm site has twice the
slices of a 5 mm site at every scale, and physical sizes (mm, ml) are the same at every scale.

Acquisition is applied as a scanner would: HU calibration offset, blur with the reconstruction
kernel, correlated noise whose texture depends on the kernel, then rounding to int16 HU.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from shared.plumbing.errors import IchfedError

from .profiles import ScannerProfile

ScaleName = Literal["paper", "demo", "ci"]
REFERENCE_INPLANE_MM = 0.45
REFERENCE_SLICE_MM = 5.0


@dataclasses.dataclass(frozen=True)
class Scale:
    """Resolution of a scale at the reference protocol (0.45 mm, 5 mm) and its z coverage."""

    inplane_mm: float
    slice_mm: float
    n_slices: int
    z_center_mm: float  # head coordinates: 0 is the centre of the brain, +z is cranial


SCALES: dict[str, Scale] = {
    "paper": Scale(inplane_mm=0.45, slice_mm=5.0, n_slices=30, z_center_mm=10.0),
    "demo": Scale(inplane_mm=1.8, slice_mm=5.0, n_slices=24, z_center_mm=12.0),
    "ci": Scale(inplane_mm=3.6, slice_mm=5.0, n_slices=16, z_center_mm=15.0),
}


def get_scale(name: str) -> Scale:
    """The named scale, or a one-line error listing the known ones."""
    if name not in SCALES:
        raise IchfedError(f"scale: must be one of {', '.join(SCALES)}, got {name!r}")
    return SCALES[name]


@dataclasses.dataclass(frozen=True)
class Grid:
    """A regular axial voxel grid centred on the head (identity direction, LPS like DICOM)."""

    shape_zyx: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    z_center_mm: float = 0.0

    @classmethod
    def for_profile(cls, scale: str, scanner: ScannerProfile) -> "Grid":
        """The grid a site with ``scanner`` produces at ``scale`` (see module docstring)."""
        s = get_scale(scale)
        dxy = s.inplane_mm * scanner.inplane_spacing_mm / REFERENCE_INPLANE_MM
        nxy = int(round(scanner.fov_mm / dxy))
        dz = s.slice_mm * scanner.slice_thickness_mm / REFERENCE_SLICE_MM
        nz = int(round(s.n_slices * s.slice_mm / dz))
        return cls((nz, nxy, nxy), (dxy, dxy, dz), s.z_center_mm)

    @property
    def origin_xyz(self) -> tuple[float, float, float]:
        nz, ny, nx = self.shape_zyx
        sx, sy, sz = self.spacing_xyz
        return (-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, self.z_center_mm - (nz - 1) / 2 * sz)

    @property
    def voxel_ml(self) -> float:
        sx, sy, sz = self.spacing_xyz
        return sx * sy * sz / 1000.0

    def axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Physical coordinates of voxel centres along x, y, z (float32, 1-D)."""
        nz, ny, nx = self.shape_zyx
        ox, oy, oz = self.origin_xyz
        sx, sy, sz = self.spacing_xyz
        return (
            (ox + sx * np.arange(nx)).astype(np.float32),
            (oy + sy * np.arange(ny)).astype(np.float32),
            (oz + sz * np.arange(nz)).astype(np.float32),
        )

    def to_image(self, array: np.ndarray) -> sitk.Image:
        """Wrap a (z, y, x) array as a SimpleITK image with this grid's geometry."""
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(tuple(float(v) for v in self.spacing_xyz))
        img.SetOrigin(tuple(float(v) for v in self.origin_xyz))
        return img


# Per kernel: in-plane blur (mm, the kernel's own MTF), noise texture correlation (voxels),
# and edge-enhancement amount (sharp kernels overshoot at the skull).
_KERNELS = {
    "smooth": (1.0, 1.0, 0.0),
    "standard": (0.6, 0.6, 0.0),
    "sharp": (0.35, 0.0, 0.7),
}
# Partial-volume of the voxel itself (sigma in voxels): keeps edges soft at every scale.
_APERTURE_PX = 0.4


def blur(ideal: np.ndarray, grid: Grid, kernel: str) -> np.ndarray:
    """Apply the reconstruction kernel to an ideal HU volume (float32, z,y,x)."""
    k_mm, _, sharpen = _KERNELS[kernel]
    sx, _, _ = grid.spacing_xyz
    s_xy = float(np.hypot(k_mm / sx, _APERTURE_PX))
    out = ndimage.gaussian_filter(ideal, sigma=(_APERTURE_PX, s_xy, s_xy), mode="nearest", truncate=3.0)
    if sharpen > 0:
        wide = ndimage.gaussian_filter(out, sigma=(0.0, 1.0, 1.0), mode="nearest", truncate=3.0)
        out += np.float32(sharpen) * (out - wide)
    return out


def noise(shape: tuple[int, ...], kernel: str, sd: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean CT-like noise with the kernel's texture, scaled to standard deviation ``sd``."""
    _, corr_px, _ = _KERNELS[kernel]
    n = rng.standard_normal(size=shape, dtype=np.float32)
    if corr_px > 0:
        n = ndimage.gaussian_filter(n, sigma=(0.0, corr_px, corr_px), mode="wrap", truncate=3.0)
    # Exact rescaling (not the analytic factor) so the measured SD equals the profile's.
    n *= np.float32(sd / max(float(n.std()), 1e-6))
    return n


def quantise(hu: np.ndarray) -> np.ndarray:
    """Round to the CT's int16 HU range."""
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def acquire(ideal: np.ndarray, grid: Grid, scanner: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """Ideal HU (float32, z,y,x) -> the int16 HU image the site's scanner would store."""
    out = blur(ideal, grid, scanner.kernel)
    out += np.float32(scanner.hu_offset)
    out += noise(out.shape, scanner.kernel, scanner.noise_sd, rng)
    return quantise(out)
