"""A deformable head phantom: scalp, skull, CSF spaces, grey and white matter, ventricles.

Everything is evaluated analytically at voxel centres in head coordinates (mm, x left, y
posterior, z cranial; 0 = centre of the brain), so the same head has the same physical size
at every scale. Shapes are deformed by smooth random fields built from separable Gaussian
bases (cheap tensor contractions rather than full-volume interpolation), so no two heads
are identical. The gantry tilt of the site pitches the head relative to the axial grid.

Tissue HU (before the scanner model): skull tables ~1400, diploe ~750, scalp 25-40 with a
fat layer, grey matter 35-40, white matter 25-30, deep grey matter ~35, CSF 0-15, air -1000.
Age-related atrophy widens the subarachnoid space and the sulci and enlarges the ventricles.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .scanner import Grid

# Tissue codes in ``Head.tissue``.
AIR, SCALP, SKULL, CSF, VENTRICLE, GM, WM, DEEP_GM = range(8)
BRAIN_TISSUES = (GM, WM, DEEP_GM)
TISSUE_NAMES = {AIR: "air", SCALP: "scalp", SKULL: "skull", CSF: "csf", VENTRICLE: "ventricle",
                GM: "grey matter", WM: "white matter", DEEP_GM: "deep grey matter"}


@dataclasses.dataclass
class Head:
    """One head on a grid: ideal HU, tissue labels and depth below the inner skull (mm)."""

    grid: "Grid"
    hu: np.ndarray  # float32 (z, y, x): HU before the scanner model (phantom) or as read (real)
    tissue: np.ndarray  # uint8 (z, y, x): tissue codes above
    depth_mm: np.ndarray  # float32 (z, y, x): distance inside the inner skull surface (<0 outside)
    age: float
    atrophy: float
    kind: str  # "phantom" or "real"

    @property
    def parenchyma(self) -> np.ndarray:
        """Brain tissue where a hemorrhage or edema may sit (not CSF, not ventricles)."""
        return self.tissue >= GM


def smooth_field(axes: tuple[np.ndarray, np.ndarray, np.ndarray], wavelength_mm: float,
                 rng: np.random.Generator, extent_mm: float = 260.0) -> np.ndarray:
    """A zero-mean, unit-SD random field on the grid, smooth on the scale of ``wavelength_mm``.

    Built as sum_abc C_abc Bz_a(z) By_b(y) Bx_c(x) with Gaussian bumps spaced half a wavelength
    apart, so it costs three small matrix products instead of filtering a full volume.
    """
    x, y, z = axes
    step = wavelength_mm / 2.0
    n = max(3, int(np.ceil(extent_mm / step)) + 1)
    centres = (np.arange(n) - (n - 1) / 2) * step

    def basis(v: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * ((v[:, None] - centres[None, :]) / (0.6 * step)) ** 2).astype(np.float32)

    bx, by, bz = basis(x), basis(y), basis(z)
    c = rng.standard_normal((n, n, n)).astype(np.float32)
    f = np.einsum("abc,xc->abx", c, bx)
    f = np.einsum("abx,yb->ayx", f, by)
    f = (bz @ f.reshape(n, -1)).reshape(len(z), len(y), len(x))
    sd = float(f[:: max(1, len(z) // 8), ::4, ::4].std())
    f *= np.float32(1.0 / max(sd, 1e-6))
    return f


def _rotation(pitch_deg: float, yaw_deg: float, roll_deg: float) -> np.ndarray:
    p, yw, r = np.deg2rad([pitch_deg, yaw_deg, roll_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(yw), -np.sin(yw), 0], [np.sin(yw), np.cos(yw), 0], [0, 0, 1]])
    ry = np.array([[np.cos(r), 0, np.sin(r)], [0, 1, 0], [-np.sin(r), 0, np.cos(r)]])
    return rz @ ry @ rx


def head_coordinates(grid: Grid, rotation: np.ndarray, shift_mm: np.ndarray) -> tuple[np.ndarray, ...]:
    """Head-frame coordinates (x, y, z) of every voxel as float32 (z, y, x) arrays."""
    x, y, z = grid.axes_mm()
    gx, gy, gz = x[None, None, :] - shift_mm[0], y[None, :, None] - shift_mm[1], z[:, None, None] - shift_mm[2]
    r = rotation.astype(np.float32)
    hx = r[0, 0] * gx + r[0, 1] * gy + r[0, 2] * gz
    hy = r[1, 0] * gx + r[1, 1] * gy + r[1, 2] * gz
    hz = r[2, 0] * gx + r[2, 1] * gy + r[2, 2] * gz
    return hx, hy, hz


def _ellipsoid(hx, hy, hz, centre, semi) -> np.ndarray:
    return ((hx - centre[0]) / semi[0]) ** 2 + ((hy - centre[1]) / semi[1]) ** 2 + ((hz - centre[2]) / semi[2]) ** 2 < 1.0


def sample_age(rng: np.random.Generator, median: float, sd: float) -> float:
    """Age at presentation (years), clipped to adult range."""
    return float(np.clip(rng.normal(median, sd), 18.0, 97.0))


def make_phantom(grid: Grid, rng: np.random.Generator, age: float, atrophy_scale: float = 1.0,
                 tilt_deg: float = 0.0) -> Head:
    """Build one phantom head on ``grid``; all randomness comes from ``rng``."""
    atrophy = float(np.clip((age - 45.0) / 35.0, 0.0, 1.4) * atrophy_scale * rng.uniform(0.7, 1.3))
    axes = grid.axes_mm()
    rot = _rotation(tilt_deg + rng.normal(0, 4), rng.normal(0, 3), rng.normal(0, 2))
    shift = np.array([rng.normal(0, 3), rng.normal(0, 4), rng.normal(0, 3)])
    hx, hy, hz = head_coordinates(grid, rot, shift)

    # Inner skull surface: an egg-shaped ellipsoid (narrower frontally, flatter at the base).
    a, b, c = rng.normal(70, 3), rng.normal(86, 3.5), rng.normal(66, 3)
    a_eff = a * (1.0 - 0.10 * np.clip(-hy / b, 0, 1))
    c_eff = np.where(hz < 0, c * 0.85, c).astype(np.float32)
    rho2 = (hx / a_eff) ** 2 + (hy / b) ** 2 + (hz / c_eff) ** 2
    rho = np.sqrt(rho2)
    del rho2
    lump = smooth_field(axes, 90.0, rng)
    rho *= 1.0 + np.float32(0.035) * lump
    r = np.sqrt(hx * hx + hy * hy + hz * hz)
    depth = r * (1.0 / np.maximum(rho, 1e-3) - 1.0)  # mm inside the inner skull surface
    del r

    skull_t = (rng.uniform(4.0, 6.5) * (1.0 + 0.25 * smooth_field(axes, 60.0, rng))
               + np.clip(-hz - 25.0, 0, None) * 0.15).astype(np.float32)
    scalp_t = np.float32(rng.uniform(4.5, 7.5))
    gap = np.float32(0.8 + 2.0 * atrophy)

    tissue = np.zeros(grid.shape_zyx, np.uint8)
    tissue[depth > -(skull_t + scalp_t)] = SCALP
    tissue[depth > -skull_t] = SKULL
    tissue[depth > 0] = CSF
    brain_depth = depth - gap  # depth below the brain surface
    tissue[brain_depth > 0] = WM

    # Cortex with gyri: zero crossings of a band-limited field form sheet-like sulci.
    gyri = smooth_field(axes, 22.0, rng)
    cortex_t = np.float32(2.8) + np.float32(0.8) * lump
    sulcal_depth = np.float32(rng.uniform(10, 16))
    near_surface = (brain_depth > 0) & (brain_depth < sulcal_depth + 3.0)
    sulcus_w = np.float32(0.10 + 0.16 * atrophy)
    ag = np.abs(gyri)
    tissue[near_surface & ((brain_depth < cortex_t) | (ag < sulcus_w + 0.28))] = GM
    tissue[near_surface & (brain_depth < sulcal_depth) & (ag < sulcus_w)] = CSF
    del ag

    # Interhemispheric fissure with a falx that bows a little.
    falx_x = np.float32(rng.normal(0, 1.0)) + np.float32(1.5) * np.sin(hy / 60.0)
    dx = np.abs(hx - falx_x)
    fissure = (dx < 0.9 + 1.2 * atrophy) & (brain_depth > 0) & ((hz > 18) | (np.abs(hy) > 45))
    tissue[(dx < 3.5 + 1.2 * atrophy) & (brain_depth > 0) & ((hz > 14) | (np.abs(hy) > 40)) & (tissue == WM)] = GM
    tissue[fissure] = CSF
    del dx, fissure

    # Deep grey matter and ventricles, pushed apart as the ventricles enlarge with atrophy.
    v = float((0.85 + 0.8 * atrophy) * rng.uniform(0.85, 1.15))
    lat = 1.0 + 0.25 * (v - 1.0)
    deep = np.zeros(grid.shape_zyx, bool)
    for side in (-1, 1):
        deep |= _ellipsoid(hx, hy, hz, (side * 21 * lat, -2, 2), (6.5, 13, 9))  # lentiform nucleus
        deep |= _ellipsoid(hx, hy, hz, (side * 12 * lat, -14, 10), (4.5, 8, 7))  # caudate head
        deep |= _ellipsoid(hx, hy, hz, (side * 9 * lat, 12, 3), (7.5, 10, 7))  # thalamus
    tissue[deep & (brain_depth > 0)] = DEEP_GM
    vent = np.zeros(grid.shape_zyx, bool)
    for side in (-1, 1):
        vent |= _ellipsoid(hx, hy, hz, (side * 5.5 * lat, 0, 16), (4.0 * v, 24, 4.5 * v))  # body
        vent |= _ellipsoid(hx, hy, hz, (side * 7 * lat, -20, 9), (3.5 * v, 10, 6 * v))  # frontal horn
        vent |= _ellipsoid(hx, hy, hz, (side * 13 * lat, 25, 8), (4.0 * v, 10, 5.5 * v))  # atrium
        vent |= _ellipsoid(hx, hy, hz, (side * 27 * lat, 4, -12), (1.8 * v, 9, 2.5 * v))  # temporal horn
    vent |= _ellipsoid(hx, hy, hz, (0, 8, 1), (1.3 * v, 11, 7))  # third ventricle
    vent |= _ellipsoid(hx, hy, hz, (0, 38, -42), (4.5, 3.0, 5))  # fourth ventricle
    tissue[vent & (brain_depth > 4)] = VENTRICLE
    del deep, vent, hx, hy, hz

    hu = _tissue_hu(tissue, depth, skull_t, scalp_t, axes, rng)
    return Head(grid=grid, hu=hu, tissue=tissue, depth_mm=depth, age=age, atrophy=atrophy, kind="phantom")


def _tissue_hu(tissue: np.ndarray, depth: np.ndarray, skull_t: np.ndarray, scalp_t: np.float32,
               axes, rng: np.random.Generator) -> np.ndarray:
    gm, wm = rng.uniform(35.5, 39.5), rng.uniform(25.5, 29.5)
    lut = np.array([-1000.0, 35.0, 0.0, rng.uniform(4, 10), rng.uniform(3, 9), gm, wm, gm - 1.5], np.float32)
    hu = lut[tissue]
    # Skull: dense outer and inner tables around lower-density diploe.
    bone = tissue == SKULL
    u = -depth[bone] / skull_t[bone]
    table = (u < 0.3) | (u > 0.7)
    hu[bone] = np.where(table, rng.uniform(1300, 1500), rng.uniform(700, 850)).astype(np.float32)
    # Scalp: skin and galea ~35-40 HU around a subcutaneous fat layer.
    scalp = tissue == SCALP
    w = (-depth[scalp] - skull_t[scalp]) / scalp_t
    hu[scalp] = np.where((w > 0.55) & (w < 0.8), -70.0, 38.0).astype(np.float32)
    # Slow inhomogeneity and fine texture in soft tissue (before scanner noise).
    soft = tissue >= CSF
    hu[soft] += (1.2 * smooth_field(axes, 70.0, rng) + 0.8 * smooth_field(axes, 8.0, rng))[soft]
    return hu
