"""A deformable head phantom: scalp, skull, CSF spaces, grey and white matter, ventricles.

Everything is evaluated analytically at voxel centres in head coordinates (mm, x left, y
posterior, z cranial; 0 = centre of the brain), so the same head has the same physical size
at every scale. Shapes are deformed by smooth random fields built from separable Gaussian
bases (cheap tensor contractions rather than full-volume interpolation), so no two heads
are identical. The gantry tilt of the site pitches the head relative to the axial grid.

Tissue HU (before the scanner model): skull tables ~1400, diploe ~750, scalp 25-40 with a
fat layer, grey matter 35-40, white matter 25-30, deep grey matter ~35, CSF 0-15, air -1000.
Extracranial muscle (temporalis over the temporal squama, the nuchal muscles over the occiput
towards the skull base) lies between skull and scalp at 40-60 HU, the density of acute blood:
the demo segmenter trained without it called muscle hemorrhage on real heads (issue 13). It is
tissue ``SCALP`` (extracranial soft tissue) with its own HU, and its shape is drawn from a
child generator so that adding it left every other draw of a head unchanged.
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
                 rng: np.random.Generator) -> np.ndarray:
    """A zero-mean, unit-SD random field on the grid spanned by ``axes`` (x, y, z in mm).

    Built as sum_abc C_abc Bz_a(z) By_b(y) Bx_c(x) with Gaussian bumps spaced half a wavelength
    apart along each axis, so it costs three small matrix products instead of filtering a volume.
    """
    step = wavelength_mm / 2.0

    def basis(v: np.ndarray) -> np.ndarray:
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
        n = int(np.ceil((hi - lo) / step)) + 3
        centres = lo - step + step * np.arange(n)
        return np.exp(-0.5 * ((v[:, None] - centres[None, :]) / (0.6 * step)) ** 2).astype(np.float32)

    x, y, z = axes
    bx, by, bz = basis(x), basis(y), basis(z)
    c = rng.standard_normal((bz.shape[1], by.shape[1], bx.shape[1])).astype(np.float32)
    # Contract one axis at a time with BLAS matrix products: (a,b,c) -> (a,b,x) -> (a,y,x) -> (z,y,x).
    f = c @ bx.T
    f = np.matmul(by[None, :, :], f)
    f = (bz @ f.reshape(bz.shape[1], -1)).reshape(len(z), len(y), len(x))
    sd = float(f[:: max(1, len(z) // 8), ::4, ::4].std())
    f *= np.float32(1.0 / max(sd, 1e-6))
    return f


def _rotation(pitch_deg: float, yaw_deg: float, roll_deg: float) -> np.ndarray:
    p, yw, r = np.deg2rad([pitch_deg, yaw_deg, roll_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(yw), -np.sin(yw), 0], [np.sin(yw), np.cos(yw), 0], [0, 0, 1]])
    ry = np.array([[np.cos(r), 0, np.sin(r)], [0, 1, 0], [-np.sin(r), 0, np.cos(r)]])
    return rz @ ry @ rx


def head_coordinates(grid: Grid, rotation: np.ndarray, shift_mm: np.ndarray,
                     box: tuple[slice, slice, slice] | None = None) -> tuple[np.ndarray, ...]:
    """Head-frame coordinates (x, y, z) of every voxel (of ``box``) as float32 (z, y, x) arrays."""
    x, y, z = grid.axes_mm()
    if box is not None:
        x, y, z = x[box[2]], y[box[1]], z[box[0]]
    gx, gy, gz = x[None, None, :] - shift_mm[0], y[None, :, None] - shift_mm[1], z[:, None, None] - shift_mm[2]
    r = rotation.astype(np.float32)
    # The first two terms are 2-D; only the last addition touches the full volume.
    hx = (r[0, 0] * gx + r[0, 1] * gy) + r[0, 2] * gz
    hy = (r[1, 0] * gx + r[1, 1] * gy) + r[1, 2] * gz
    hz = (r[2, 0] * gx + r[2, 1] * gy) + r[2, 2] * gz
    return hx, hy, hz


def _ellipsoid(hx, hy, hz, centre, semi) -> np.ndarray:
    f = np.float32
    q = np.square((hx - f(centre[0])) * f(1 / semi[0]))
    q += np.square((hy - f(centre[1])) * f(1 / semi[1]))
    q += np.square((hz - f(centre[2])) * f(1 / semi[2]))
    return q < 1.0


def _central_box(grid: Grid, rot: np.ndarray, shift: np.ndarray, half_mm: tuple[float, float, float],
                 centre_z_mm: float) -> tuple[slice, slice, slice]:
    """Grid index box holding the head-frame box |x|,|y| < half, |z - centre_z| < half (any rotation)."""
    corners = np.array([[sx * half_mm[0], sy * half_mm[1], centre_z_mm + sz * half_mm[2]]
                        for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    grid_pts = corners @ rot + shift  # head = R (p - shift)  =>  p = R^T head + shift
    lo, hi = grid_pts.min(axis=0), grid_pts.max(axis=0)
    x, y, z = grid.axes_mm()
    sl = []
    for axis, a, b in ((z, lo[2], hi[2]), (y, lo[1], hi[1]), (x, lo[0], hi[0])):
        idx = np.flatnonzero((axis >= a) & (axis <= b))
        sl.append(slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0))
    return tuple(sl)


def sample_age(rng: np.random.Generator, median: float, sd: float) -> float:
    """Age at presentation (years), clipped to adult range."""
    return float(np.clip(rng.normal(median, sd), 18.0, 97.0))


def make_phantom(grid: Grid, rng: np.random.Generator, age: float, atrophy_scale: float = 1.0,
                 tilt_deg: float = 0.0) -> Head:
    """Build one phantom head on ``grid``; all randomness comes from ``rng``.

    The helpers below draw from ``rng`` in a fixed order (this function's order): a head of a given
    seed is the same voxel for voxel whatever the helpers' split.
    """
    f32 = np.float32
    atrophy = float(np.clip((age - 45.0) / 35.0, 0.0, 1.4) * atrophy_scale * rng.uniform(0.7, 1.3))
    rot = _rotation(tilt_deg + rng.normal(0, 4), rng.normal(0, 3), rng.normal(0, 2))
    shift = np.array([rng.normal(0, 3), rng.normal(0, 4), rng.normal(0, 3)])
    a, b, c = rng.normal(70, 3), rng.normal(86, 3.5), rng.normal(66, 3)
    skull_mean, scalp_t = rng.uniform(4.0, 6.5), f32(rng.uniform(4.5, 7.5))
    gap = f32(0.8 + 2.0 * atrophy)

    # Work only inside the box that can hold the head: the rest of the grid is air.
    margin = 1.3 * (skull_mean + scalp_t) + 12.0
    hbox = _central_box(grid, rot, shift, half_mm=(a + margin, b + margin, c + margin), centre_z_mm=0.0)
    full_axes = grid.axes_mm()
    axes = (full_axes[0][hbox[2]], full_axes[1][hbox[1]], full_axes[2][hbox[0]])
    hx, hy, hz = head_coordinates(grid, rot, shift, box=hbox)

    lump = smooth_field(axes, 90.0, rng)
    depth = _inner_skull_depth(hx, hy, hz, a, b, c, lump)
    skull_t, drift = _skull_thickness(smooth_field(axes, 60.0, rng), skull_mean, hz)
    muscle_t = _muscle_thickness(hx, hy, hz, a, b, c, rng.spawn(1)[0])
    tissue = np.zeros(depth.shape, np.uint8)
    tissue[depth > -(skull_t + scalp_t + muscle_t)] = SCALP
    tissue[depth > -skull_t] = SKULL
    tissue[depth > 0] = CSF
    brain_depth = depth - gap  # depth below the brain surface
    inside = np.flatnonzero(brain_depth > 0)
    tissue.flat[inside] = WM
    # Everything inside the brain is computed on its voxels only (gathered), not on the whole box.
    brain = _Brain(bd=brain_depth.ravel()[inside], lump=lump.ravel()[inside], x=hx.ravel()[inside],
                   y=hy.ravel()[inside], z=hz.ravel()[inside], tis=tissue.ravel()[inside])
    del lump, hx, hy, hz
    _cortex_and_fissure(brain, smooth_field(axes, 22.0, rng).ravel()[inside], atrophy, rng)
    _deep_structures(brain, atrophy, rng)
    tissue.flat[inside] = brain.tis
    del brain

    hu_box = _tissue_hu(tissue, depth, skull_t, scalp_t, drift, rng)
    # Muscle: the inner muscle_t mm of the soft tissue outside the skull, 40-60 HU.
    muscle = (tissue == SCALP) & (-depth - skull_t < muscle_t) & (muscle_t > 0.5)
    hu_box[muscle] = (f32(50.0) + f32(4.0) * drift[muscle]).clip(40.0, 60.0)
    del muscle_t
    full_tissue = np.zeros(grid.shape_zyx, np.uint8)
    full_tissue[hbox] = tissue
    full_depth = np.full(grid.shape_zyx, -100.0, np.float32)
    full_depth[hbox] = depth
    hu = np.full(grid.shape_zyx, -1000.0, np.float32)
    hu[hbox] = hu_box
    return Head(grid=grid, hu=hu, tissue=full_tissue, depth_mm=full_depth, age=age, atrophy=atrophy, kind="phantom")


def _inner_skull_depth(hx: np.ndarray, hy: np.ndarray, hz: np.ndarray, a: float, b: float, c: float,
                       lump: np.ndarray) -> np.ndarray:
    """Radial distance (mm) inside the inner skull surface: an egg-shaped ellipsoid (narrower
    frontally, flatter at the base) deformed by ``lump``. In place on scratch arrays: the head box
    is the largest array a case holds."""
    f32 = np.float32
    q = np.clip(hy, -b, 0)
    q *= f32(0.10 / b)
    q += f32(1.0)
    q *= f32(a)  # a_eff: lateral semi-axis, narrower frontally
    np.divide(hx, q, out=q)
    rho = np.square(q, out=q)
    t = np.square(hy * f32(1.0 / b))
    rho += t
    np.divide(hz, np.where(hz < 0, f32(c * 0.85), f32(c)), out=t)
    rho += np.square(t, out=t)
    np.sqrt(rho, out=rho)
    rho *= f32(0.035) * lump + f32(1.0)
    r = np.square(hx)
    r += np.square(hy, out=t)
    r += np.square(hz, out=t)
    np.sqrt(r, out=r)
    np.maximum(rho, f32(1e-3), out=rho)
    np.reciprocal(rho, out=rho)
    rho -= f32(1.0)
    return np.multiply(r, rho, out=r)


def _skull_thickness(slow: np.ndarray, skull_mean: float, hz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(skull thickness mm, soft-tissue HU drift) from one slow field.

    One slow field drives skull thickness and the soft-tissue HU drift (beam hardening is
    stronger under thick bone), which saves a full-volume field per head.
    """
    f32 = np.float32
    drift = slow * f32(1.5)
    skull_t = slow
    skull_t *= f32(0.25 * skull_mean)
    skull_t += f32(skull_mean)
    base = np.minimum(hz, f32(-25.0))  # the skull thickens towards the skull base
    base += f32(25.0)
    base *= f32(-0.15)
    skull_t += base
    return skull_t, drift


@dataclasses.dataclass
class _Brain:
    """The brain's voxels, gathered: depth below the brain surface, the skull's lump field, head
    coordinates (mm) and tissue codes (written back into the box by ``make_phantom``)."""

    bd: np.ndarray
    lump: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    tis: np.ndarray


def _cortex_and_fissure(brain: _Brain, gyri: np.ndarray, atrophy: float, rng: np.random.Generator) -> None:
    """Cortex with gyri (zero crossings of the band-limited field ``gyri`` form sheet-like sulci),
    then the interhemispheric fissure with a falx that bows a little."""
    f32 = np.float32
    bd, tis = brain.bd, brain.tis
    cortex_t = f32(2.8) + f32(0.8) * brain.lump
    sulcal_depth = f32(rng.uniform(10, 16))
    near_surface = bd < sulcal_depth + 3.0
    sulcus_w = f32(0.10 + 0.16 * atrophy)
    ag = np.abs(gyri)
    tis[near_surface & ((bd < cortex_t) | (ag < sulcus_w + 0.28))] = GM
    tis[near_surface & (bd < sulcal_depth) & (ag < sulcus_w)] = CSF

    dx = np.abs(brain.x - (f32(rng.normal(0, 1.0)) + f32(1.5) * np.sin(brain.y * f32(1 / 60.0))))
    ay, pz = np.abs(brain.y), brain.z
    tis[(dx < 3.5 + 1.2 * atrophy) & ((pz > 14) | (ay > 40)) & (tis == WM)] = GM
    tis[(dx < 0.9 + 1.2 * atrophy) & ((pz > 18) | (ay > 45))] = CSF


def _deep_structures(brain: _Brain, atrophy: float, rng: np.random.Generator) -> None:
    """Deep grey matter and ventricles, pushed apart as the ventricles enlarge with atrophy."""
    px, py, pz, tis = brain.x, brain.y, brain.z, brain.tis
    v = float((0.85 + 0.8 * atrophy) * rng.uniform(0.85, 1.15))
    lat = 1.0 + 0.25 * (v - 1.0)
    central = (np.abs(px) < 40) & (np.abs(py) < 50) & (pz > -50) & (pz < 32)  # holds every structure below
    ci = np.flatnonzero(central)
    cx, cy, cz = px[ci], py[ci], pz[ci]
    deep = np.zeros(ci.size, bool)
    for side in (-1, 1):
        deep |= _ellipsoid(cx, cy, cz, (side * 21 * lat, -2, 2), (6.5, 13, 9))  # lentiform nucleus
        deep |= _ellipsoid(cx, cy, cz, (side * 12 * lat, -14, 10), (4.5, 8, 7))  # caudate head
        deep |= _ellipsoid(cx, cy, cz, (side * 9 * lat, 12, 3), (7.5, 10, 7))  # thalamus
    vent = np.zeros(ci.size, bool)
    for side in (-1, 1):
        vent |= _ellipsoid(cx, cy, cz, (side * 5.5 * lat, 0, 16), (4.0 * v, 24, 4.5 * v))  # body
        vent |= _ellipsoid(cx, cy, cz, (side * 7 * lat, -20, 9), (3.5 * v, 10, 6 * v))  # frontal horn
        vent |= _ellipsoid(cx, cy, cz, (side * 13 * lat, 25, 8), (4.0 * v, 10, 5.5 * v))  # atrium
        vent |= _ellipsoid(cx, cy, cz, (side * 27 * lat, 4, -12), (1.8 * v, 9, 2.5 * v))  # temporal horn
    vent |= _ellipsoid(cx, cy, cz, (0, 8, 1), (1.3 * v, 11, 7))  # third ventricle
    vent |= _ellipsoid(cx, cy, cz, (0, 38, -42), (4.5, 3.0, 5))  # fourth ventricle
    sub = tis[ci]
    sub[deep] = DEEP_GM
    sub[vent & (brain.bd[ci] > 4)] = VENTRICLE
    tis[ci] = sub


def _muscle_thickness(hx: np.ndarray, hy: np.ndarray, hz: np.ndarray, a: float, b: float, c: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Thickness (mm) of muscle on the outer skull: temporalis laterally, nuchal muscles at the back and base."""
    f32 = np.float32
    temporal_mm, nuchal_mm = f32(rng.uniform(6.0, 11.0)), f32(rng.uniform(8.0, 16.0))
    z_top = f32(rng.uniform(0.25, 0.45) * c)  # superior temporal line
    lateral = np.clip((np.abs(hx) - f32(0.55 * a)) / f32(0.3 * a), 0, 1)
    # Temporal fossa: mid-anterior, from the skull base region up to the superior temporal line.
    temporal = lateral * np.exp(-np.square((hy + f32(0.1 * b)) / f32(0.35 * b)))
    temporal *= np.clip((z_top - hz) / f32(15.0), 0, 1) * np.clip((hz + f32(0.75 * c)) / f32(15.0), 0, 1)
    # Nuchal muscles: posterior, below the inion, thickening towards the neck.
    nuchal = np.clip((hy - f32(0.45 * b)) / f32(0.3 * b), 0, 1) * np.clip(-(hz + f32(0.1 * c)) / f32(0.35 * c), 0, 1)
    return (temporal_mm * temporal + nuchal_mm * nuchal).astype(np.float32)


def _tissue_hu(tissue: np.ndarray, depth: np.ndarray, skull_t: np.ndarray, scalp_t: np.float32,
               drift: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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
    # Slow inhomogeneity in soft tissue (fine texture comes from the scanner noise).
    soft = tissue >= CSF
    hu[soft] += drift[soft]
    return hu
