"""Server-side rendering of axial CT slices and ICH/PHE overlays as PNG.

The page composites a grey-scale slice (windowed here) with one transparent overlay per label,
so toggling ICH or PHE, or changing their opacity, needs no new request. Images are turned to
LPS first: rows run anterior to posterior and columns patient-right to patient-left, which is
the radiological convention (the patient's right on the viewer's left).
"""

from __future__ import annotations

import dataclasses
import io
import threading
from collections import OrderedDict

import numpy as np
import SimpleITK as sitk

from shared.plumbing.errors import IchfedError

# (low HU, high HU). Brain and subdural follow common reading-room settings
# (W80/L40 and W200/L80); stroke is the narrow W40/L40 that shows subtle edema.
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (0.0, 80.0),
    "subdural": (-20.0, 180.0),
    "stroke": (20.0, 60.0),
    "bone": (-450.0, 1050.0),
}

LABELS = {"ich": 1, "phe": 2}
# Hemorrhage green, edema red, as in the paper's Figure 4.
COLOURS = {"ich": (0, 230, 64), "phe": (255, 40, 40)}
_FILL_ALPHA = 110
_EDGE_ALPHA = 255


@dataclasses.dataclass
class CaseView:
    """One case's display volumes, held in memory only while the reader shows it.

    ``hu`` is int16 (z, y, x) in LPS order; ``labels`` is uint8 with 0 background, 1 ICH, 2 PHE.
    """

    hu: np.ndarray
    labels: np.ndarray
    spacing_xyz: tuple[float, float, float]
    best_slice: int
    _cache: OrderedDict = dataclasses.field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])

    def describe(self) -> dict:
        """Geometry the page needs to lay out the viewer."""
        nz, ny, nx = self.hu.shape
        sx, sy, sz = self.spacing_xyz
        per_slice = {name: (self.labels == v).reshape(nz, -1).sum(axis=1) for name, v in LABELS.items()}
        return {
            "n_slices": int(nz),
            "width": int(nx),
            "height": int(ny),
            "spacing_mm": [round(sx, 4), round(sy, 4), round(sz, 4)],
            # Physical width/height, so non-square pixels are shown undistorted.
            "aspect": round((nx * sx) / (ny * sy), 6),
            "best_slice": int(self.best_slice),
            "slices_with": {name: [int(z) for z in np.flatnonzero(c)] for name, c in per_slice.items()},
            "windows": {k: list(v) for k, v in WINDOWS.items()},
        }

    def slice_png(self, z: int, window: str) -> bytes:
        """Grey-scale PNG of slice ``z`` in the named window."""
        if window not in WINDOWS:
            raise IchfedError(f"window: must be one of {', '.join(WINDOWS)}, got {window!r}")
        return self._cached(("slice", self._check_z(z), window), lambda: _grey_png(self.hu[z], *WINDOWS[window]))

    def overlay_png(self, z: int, label: str) -> bytes:
        """Transparent RGBA PNG of one label on slice ``z``: a translucent fill with a solid edge."""
        if label not in LABELS:
            raise IchfedError(f"label: must be one of {', '.join(LABELS)}, got {label!r}")
        return self._cached(
            ("overlay", self._check_z(z), label),
            lambda: _overlay_png(self.labels[z] == LABELS[label], COLOURS[label]),
        )

    def probe(self, z: int, y: int, x: int) -> dict:
        """HU and label at one voxel, for the density read-out under the mouse."""
        self._check_z(z)
        ny, nx = self.hu.shape[1:]
        if not (0 <= y < ny and 0 <= x < nx):
            raise IchfedError(f"voxel: ({x}, {y}) is outside the {nx} x {ny} slice")
        names = {v: k for k, v in LABELS.items()}
        return {"hu": int(self.hu[z, y, x]), "label": names.get(int(self.labels[z, y, x]))}

    def _check_z(self, z: int) -> int:
        if not 0 <= z < self.n_slices:
            raise IchfedError(f"slice: must be between 0 and {self.n_slices - 1}, got {z}")
        return z

    def _cached(self, key, make) -> bytes:
        # Scrolling back and forth re-requests the same slices; a small LRU keeps that cheap
        # without holding every rendered slice of a long series.
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = make()
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > 256:
                self._cache.popitem(last=False)
        return data


def make_view(image: sitk.Image, mask: sitk.Image) -> CaseView:
    """Reorient the HU image and label map to LPS and pick the slice with the most ICH."""
    if mask.GetSize() != image.GetSize():
        # The segmenter returns labels on the image grid; resample defensively if not.
        mask = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    image = sitk.DICOMOrient(image, "LPS")
    mask = sitk.DICOMOrient(mask, "LPS")
    hu = sitk.GetArrayFromImage(image)
    hu = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    labels = sitk.GetArrayFromImage(mask).astype(np.uint8)
    return CaseView(hu=hu, labels=labels, spacing_xyz=tuple(float(s) for s in image.GetSpacing()),
                    best_slice=best_slice(labels))


def best_slice(labels: np.ndarray) -> int:
    """The slice with the most ICH voxels; failing that the most PHE; failing that the middle."""
    nz = labels.shape[0]
    for value in (LABELS["ich"], LABELS["phe"]):
        counts = (labels == value).reshape(nz, -1).sum(axis=1)
        if counts.max(initial=0) > 0:
            return int(np.argmax(counts))
    return nz // 2


def _grey_png(hu: np.ndarray, lo: float, hi: float) -> bytes:
    grey = np.clip((hu.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    return _png(grey)


def _overlay_png(region: np.ndarray, rgb: tuple[int, int, int]) -> bytes:
    rgba = np.zeros(region.shape + (4,), dtype=np.uint8)
    if region.any():
        # 4-neighbour erosion; what it removes is the outline, drawn opaque so the border stays
        # visible when the fill is faded out to read the density underneath.
        inner = region.copy()
        inner[1:, :] &= region[:-1, :]
        inner[:-1, :] &= region[1:, :]
        inner[:, 1:] &= region[:, :-1]
        inner[:, :-1] &= region[:, 1:]
        edge = region & ~inner
        rgba[region, :3] = rgb
        rgba[region, 3] = _FILL_ALPHA
        rgba[edge, 3] = _EDGE_ALPHA
    return _png(rgba)


def _png(array: np.ndarray) -> bytes:
    # (y, x) uint8 becomes L, (y, x, 4) uint8 becomes RGBA.
    from PIL import Image

    buf = io.BytesIO()
    # Level 1: a 512x512 slice encodes in a few ms; the bytes only cross loopback.
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
