"""Real-background heads: the hemorrhage-free head CT shipped in ``../shared/data/ct/``.

The scan is ingested once per process with ``shared.imaging.ingest.read_image`` (which corrects its
gantry tilt). Its tissues are labelled by thresholds (bone, intracranial space, CSF,
parenchyma) and its depth below the inner skull is a distance transform. Each case then
samples it onto the case grid through a random left-right flip, in-plane rotation, small
shift and a mild smooth elastic displacement, so that no two cases share a background.
The scanner model is not applied to real backgrounds: their noise, kernel and calibration are
the real scanner's, and voxels outside the inserted lesions keep the scan's HU.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import numpy as np
from scipy import ndimage

from shared.plumbing.errors import IchfedError

from .phantom import AIR, CSF, GM, SCALP, SKULL, VENTRICLE, WM, Head, smooth_field
from .scanner import Grid

log = logging.getLogger(__name__)

DEFAULT_SCAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "ge-hispeed-head-tilt"


@dataclasses.dataclass(frozen=True)
class _Source:
    hu: np.ndarray  # float32 (z, y, x)
    tissue: np.ndarray  # uint8
    depth: np.ndarray  # float32 mm inside the intracranial space
    spacing_zyx: np.ndarray
    centre_index_zyx: np.ndarray  # centroid of the intracranial space


def default_scan() -> Path:
    """Where the real background scan is expected (``<repo>/../shared/data/ct/ge-hispeed-head-tilt``)."""
    return DEFAULT_SCAN


@functools.lru_cache(maxsize=2)
def _load(path: str) -> _Source:
    import SimpleITK as sitk

    from shared.imaging.ingest import read_image

    p = Path(path)
    if not p.exists():
        raise IchfedError(f"{p}: real background scan not found (needed for --background real)")
    ing = read_image(p)
    hu = sitk.GetArrayFromImage(ing.image).astype(np.float32)
    np.clip(hu, -1024, 3071, out=hu)
    sx, sy, sz = ing.image.GetSpacing()
    spacing = np.array([sz, sy, sx])
    tissue = np.full(hu.shape, AIR, np.uint8)
    body = hu > -300
    tissue[body] = SCALP
    bone = hu > 250
    tissue[bone] = SKULL
    # Intracranial space: what the skull encloses in each slice (closing bridges thin gaps).
    closed = ndimage.binary_closing(bone, structure=np.ones((1, 5, 5), bool))
    inside = np.zeros_like(bone)
    for k in range(hu.shape[0]):
        inside[k] = ndimage.binary_fill_holes(closed[k]) & ~closed[k]
    lab, n = ndimage.label(inside)
    if n == 0:
        raise IchfedError(f"{p}: no intracranial space found in the real background scan")
    sizes = ndimage.sum(inside, lab, index=np.arange(1, n + 1))
    inside = lab == (1 + int(np.argmax(sizes)))
    depth = ndimage.distance_transform_edt(inside, sampling=spacing).astype(np.float32)
    # Tissue classes from a ~1.5 mm smoothed scan: the raw noise would speckle grey/white matter.
    smooth = ndimage.gaussian_filter(hu, sigma=(0.0, 1.5 / sy, 1.5 / sx))
    csf = inside & (smooth < 16)
    tissue[inside] = WM
    tissue[inside & (smooth >= 31)] = GM
    tissue[csf] = CSF
    tissue[csf & (depth > 25)] = VENTRICLE
    # Vessels, calcifications and the dura are not parenchyma.
    tissue[inside & ((smooth > 60) | (depth < 3))] = CSF
    centre = np.array(ndimage.center_of_mass(inside))
    log.info("real background %s: %s voxels, spacing %s mm", p, hu.shape[::-1], tuple(spacing[::-1]))
    return _Source(hu, tissue, depth, spacing, centre)


def make_real_head(grid: Grid, rng: np.random.Generator, age: float, path: str | Path | None = None) -> Head:
    """The real scan resampled onto ``grid`` through a random flip, rotation and mild elastic warp."""
    src = _load(str(path or DEFAULT_SCAN))
    x, y, z = grid.axes_mm()
    theta = np.deg2rad(rng.uniform(-12, 12))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    shift = rng.normal(0, 2.0, size=3)
    gz, gy, gx = np.meshgrid(z - grid.z_center_mm, y, x, indexing="ij", sparse=True)
    # Output head frame -> source mm around the source's intracranial centre.
    warp = [2.0 * smooth_field((x, y, z), 60.0, rng) for _ in range(3)]
    ux = flip * (np.cos(theta) * gx - np.sin(theta) * gy) + shift[0] + warp[0]
    uy = np.sin(theta) * gx + np.cos(theta) * gy + shift[1] + warp[1]
    uz = gz + shift[2] + 0.5 * warp[2]
    del warp
    c = src.centre_index_zyx
    sp = src.spacing_zyx
    coords = np.stack([
        np.broadcast_to(c[0] + uz / sp[0], grid.shape_zyx),
        np.broadcast_to(c[1] + uy / sp[1], grid.shape_zyx),
        np.broadcast_to(c[2] + ux / sp[2], grid.shape_zyx),
    ]).astype(np.float32)
    del ux, uy, uz
    hu = ndimage.map_coordinates(src.hu, coords, order=1, mode="constant", cval=-1024.0, prefilter=False)
    tissue = ndimage.map_coordinates(src.tissue, coords, order=0, mode="constant", cval=AIR, prefilter=False)
    depth = ndimage.map_coordinates(src.depth, coords, order=1, mode="constant", cval=0.0, prefilter=False)
    return Head(grid=grid, hu=hu.astype(np.float32), tissue=tissue.astype(np.uint8), depth_mm=depth.astype(np.float32),
                age=age, atrophy=float("nan"), kind="real")
