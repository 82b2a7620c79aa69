"""CT physics augmentation of lesion-masked classifier crops, spanning the site profiles' scanners.

The simulated sites (``simulations/profiles/*.toml``, applied by ``simulations/scanner.acquire``)
differ in reconstruction kernel (smooth / standard / sharp: blur, noise texture, edge overshoot),
noise level (3-15 HU), HU calibration offset (±10 HU) and slice thickness (2.5 or 5 mm). A
classifier trained at one site sees only one of each; these transforms show it the others.

Each transform is MONAI-style: settings (ranges, probability) in ``__init__``, data in
``__call__(crop, mask, rng)``, where ``crop`` is one (z, y, x) crop normalised by the crop's HU
window to [0, 1] (``shared.imaging.crop``), ``mask`` the lesion (ICH∪PHE) it was masked to, and ``rng`` a
``numpy.random.Generator``. Filters are normalised convolutions inside the mask (blur of
``crop·mask`` over blur of ``mask``), so the zero background never bleeds into the lesion, and
every output is clipped to [0, 1] and re-masked, exactly as ``shared.imaging.crop`` makes crops.

``PhysicsAugment`` composes them for a batch; ``BatchgeneratorsPhysics`` wraps it as a
batchgenerators transform (``server.training.classifier_augment`` puts it in the chain) that draws its
generator from NumPy's global state, which classifier training seeds, so a seed gives the same
augmented batches.

Mapping from site physics to transforms (crops are at ~2.8 x 2.8 x 5 mm, demo; 0.45 mm paper):

=====================  =====================================  ================================
site profile knob       scanner model (simulations/scanner)    transform here
=====================  =====================================  ================================
``hu_offset``           constant added to every voxel          ``HUOffset`` (±10 HU)
``kernel`` smooth       in-plane Gaussian blur ~1 mm            ``KernelBlurSharpen`` blur
``kernel`` sharp        unsharp masking, amount 0.7             ``KernelBlurSharpen`` sharpen
``noise_sd`` + kernel   correlated Gaussian noise, 3-15 HU      ``CTNoise`` (SD, correlation)
``slice_thickness_mm``  5 mm vs 2.5 mm partial volume along z   ``SliceThickness`` (z blur)
=====================  =====================================  ================================
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

_EPS = 1e-6


def _masked_blur(crop: np.ndarray, mask: np.ndarray, sigma_zyx: tuple[float, float, float]) -> np.ndarray:
    """Gaussian blur inside ``mask`` only (normalised convolution); outside the mask the input is kept."""
    m = mask.astype(np.float32)
    num = ndimage.gaussian_filter(crop * m, sigma_zyx, mode="nearest", truncate=3.0)
    den = ndimage.gaussian_filter(m, sigma_zyx, mode="nearest", truncate=3.0)
    return np.where(mask & (den > _EPS), num / np.maximum(den, _EPS), crop).astype(np.float32)


def _finish(crop: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.clip(crop, 0.0, 1.0).astype(np.float32)
    out[~mask] = 0.0
    return out


class HUOffset:
    """A constant HU calibration offset, drawn uniformly from ``offset_hu``, added inside the lesion."""

    def __init__(self, offset_hu: tuple[float, float] = (-10.0, 10.0), hu_width: float = 140.0,
                 prob: float = 0.5) -> None:
        self.offset_hu, self.hu_width, self.prob = tuple(offset_hu), float(hu_width), float(prob)

    def __call__(self, crop: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.prob:
            return crop
        return _finish(crop + np.float32(rng.uniform(*self.offset_hu) / self.hu_width), mask)


class KernelBlurSharpen:
    """Reconstruction kernel: in-plane blur (smooth kernel) or unsharp masking (sharp kernel).

    With probability ``prob`` one of the two is applied (each equally likely): a Gaussian blur of
    in-plane SD drawn from ``blur_sigma_mm``, or ``x + a (x - blur_1px(x))`` with ``a`` from
    ``sharpen_amount`` (the scanner model's sharp kernel uses 0.7).
    """

    def __init__(self, spacing_mm: tuple[float, float, float], blur_sigma_mm: tuple[float, float] = (0.3, 1.2),
                 sharpen_amount: tuple[float, float] = (0.2, 0.8), prob: float = 0.5) -> None:
        self.spacing_xyz = tuple(float(s) for s in spacing_mm)
        self.blur_sigma_mm, self.sharpen_amount, self.prob = tuple(blur_sigma_mm), tuple(sharpen_amount), float(prob)

    def __call__(self, crop: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.prob:
            return crop
        if rng.random() < 0.5:
            s = rng.uniform(*self.blur_sigma_mm)
            return _finish(_masked_blur(crop, mask, (0.0, s / self.spacing_xyz[1], s / self.spacing_xyz[0])), mask)
        wide = _masked_blur(crop, mask, (0.0, 1.0, 1.0))
        return _finish(crop + np.float32(rng.uniform(*self.sharpen_amount)) * (crop - wide), mask)


class CTNoise:
    """Extra CT noise: Gaussian, SD (HU) from ``sd_hu``, in-plane texture correlation (voxels) from ``corr_px``."""

    def __init__(self, sd_hu: tuple[float, float] = (1.0, 8.0), corr_px: tuple[float, float] = (0.0, 1.0),
                 hu_width: float = 140.0, prob: float = 0.5) -> None:
        self.sd_hu, self.corr_px, self.hu_width, self.prob = tuple(sd_hu), tuple(corr_px), float(hu_width), float(prob)

    def __call__(self, crop: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.prob:
            return crop
        n = rng.standard_normal(crop.shape).astype(np.float32)
        c = rng.uniform(*self.corr_px)
        if c > 0.05:
            n = ndimage.gaussian_filter(n, (0.0, c, c), mode="wrap", truncate=3.0)
        n *= np.float32(rng.uniform(*self.sd_hu) / self.hu_width / max(float(n.std()), _EPS))
        return _finish(crop + n, mask)


class SliceThickness:
    """Thicker-slice partial volume: a blur along z of SD (in slices) drawn from ``sigma_slices``."""

    def __init__(self, sigma_slices: tuple[float, float] = (0.2, 0.6), prob: float = 0.3) -> None:
        self.sigma_slices, self.prob = tuple(sigma_slices), float(prob)

    def __call__(self, crop: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.prob or crop.shape[0] < 2:
            return crop
        return _finish(_masked_blur(crop, mask, (rng.uniform(*self.sigma_slices), 0.0, 0.0)), mask)


@dataclasses.dataclass(frozen=True)
class PhysicsAugmentConfig:
    """Ranges and probabilities of the physics transforms (HU are those of the native scan)."""

    enabled: bool = True
    p_offset: float = dataclasses.field(default=0.5, metadata={"range": (0.0, 1.0)})
    offset_hu: tuple[float, ...] = dataclasses.field(default=(-10.0, 10.0), metadata={"length": 2, "range": (-50.0, 50.0)})
    p_kernel: float = dataclasses.field(default=0.5, metadata={"range": (0.0, 1.0)})
    blur_sigma_mm: tuple[float, ...] = dataclasses.field(default=(0.3, 1.2), metadata={"length": 2, "range": (0.0, 5.0)})
    sharpen_amount: tuple[float, ...] = dataclasses.field(default=(0.2, 0.8), metadata={"length": 2, "range": (0.0, 2.0)})
    p_noise: float = dataclasses.field(default=0.5, metadata={"range": (0.0, 1.0)})
    noise_sd_hu: tuple[float, ...] = dataclasses.field(default=(1.0, 8.0), metadata={"length": 2, "range": (0.0, 30.0)})
    noise_corr_px: tuple[float, ...] = dataclasses.field(default=(0.0, 1.0), metadata={"length": 2, "range": (0.0, 3.0)})
    p_slice: float = dataclasses.field(default=0.3, metadata={"range": (0.0, 1.0)})
    slice_sigma: tuple[float, ...] = dataclasses.field(default=(0.2, 0.6), metadata={"length": 2, "range": (0.0, 2.0)})


class PhysicsAugment:
    """All four transforms in scanner order (offset, kernel, noise, slice thickness) on a batch of crops."""

    def __init__(self, cfg: PhysicsAugmentConfig, spacing_mm: tuple[float, float, float] = (2.8, 2.8, 5.0),
                 hu_window: tuple[float, float] = (-20.0, 120.0)) -> None:
        width = float(hu_window[1] - hu_window[0])
        self.transforms = [
            HUOffset(tuple(cfg.offset_hu), width, cfg.p_offset),
            KernelBlurSharpen(tuple(spacing_mm), tuple(cfg.blur_sigma_mm), tuple(cfg.sharpen_amount), cfg.p_kernel),
            CTNoise(tuple(cfg.noise_sd_hu), tuple(cfg.noise_corr_px), width, cfg.p_noise),
            SliceThickness(tuple(cfg.slice_sigma), cfg.p_slice),
        ]

    def __call__(self, crops: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment crops (B, z, y, x) inside ``masks`` (same shape, bool); returns a new float32 array."""
        out = np.array(crops, dtype=np.float32, copy=True)
        for i in range(out.shape[0]):
            m = masks[i].astype(bool)
            for t in self.transforms:
                out[i] = t(out[i], m, rng)
        return out


class BatchgeneratorsPhysics:
    """``PhysicsAugment`` as a batchgenerators transform on {'data': (B,1,z,y,x), 'seg': (B,1,z,y,x)}.

    The generator is drawn from NumPy's global state (as batchgenerators' own transforms do), which
    ``server.training.classifier_training`` seeds: the same seed gives the same augmentation.
    """

    def __init__(self, physics: PhysicsAugment) -> None:
        self.physics = physics

    def __call__(self, **data_dict):
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        data, seg = data_dict["data"], data_dict["seg"]
        data[:, 0] = self.physics(data[:, 0], seg[:, 0] >= 0.5, rng)
        return data_dict
