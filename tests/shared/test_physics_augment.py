"""CT physics augmentation of classifier crops (kernel, noise, HU offset, slice thickness): each
transform does what the site profiles' scanner model does, inside the lesion only, seeded."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from server.training import classifier_augment as aug
from server.training.physics_augment import (
    CTNoise,
    HUOffset,
    KernelBlurSharpen,
    PhysicsAugment,
    PhysicsAugmentConfig,
    SliceThickness,
)

WIDTH = 140.0  # the default crop window, -20..120 HU
SPACING = (2.8, 2.8, 5.0)


def _lesion(seed: int = 0):
    """A (z, y, x) crop: a 60 HU clot with 20 HU edema around it, 0 outside, with 5 HU noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:8, :24, :24]
    r = np.sqrt(((z - 4) * 5 / 2.8) ** 2 + (y - 12) ** 2 + (x - 12) ** 2)
    mask = r < 9
    hu = np.where(r < 5, 60.0, 20.0) + rng.normal(0, 5, r.shape)
    crop = np.where(mask, np.clip((hu + 20) / WIDTH, 0, 1), 0).astype(np.float32)
    return crop, mask


def test_hu_offset_shifts_the_lesion_by_the_drawn_offset_and_leaves_the_background():
    crop, mask = _lesion()
    out = HUOffset((8.0, 8.0), WIDTH, prob=1.0)(crop, mask, np.random.default_rng(0))
    assert np.mean(out[mask] - crop[mask]) * WIDTH == pytest.approx(8.0, abs=0.2)
    assert (out[~mask] == 0).all()


def test_blur_smooths_and_sharpen_overshoots_at_the_clot_edge():
    crop, mask = _lesion()
    t = KernelBlurSharpen(SPACING, blur_sigma_mm=(3.0, 3.0), sharpen_amount=(0.8, 0.8), prob=1.0)
    outs = [t(crop, mask, np.random.default_rng(s)) for s in range(8)]
    inner = ndimage.binary_erosion(mask, np.ones((1, 5, 5), bool))  # away from the lesion's own border
    grad = lambda a: float(np.abs(ndimage.sobel(a, axis=2))[inner].mean())  # noqa: E731
    assert min(grad(o) for o in outs) < 0.8 * grad(crop)  # a blurred draw
    assert max(grad(o) for o in outs) > 1.2 * grad(crop)  # a sharpened draw
    for o in outs:
        assert (o[~mask] == 0).all() and o.min() >= 0 and o.max() <= 1
        # The zero background never bleeds in: the lesion's mean HU stays put (within 2 HU).
        assert abs(o[mask].mean() - crop[mask].mean()) * WIDTH < 2.0


def test_noise_adds_the_requested_sd_in_hu():
    crop = np.full((6, 32, 32), 0.5, np.float32)
    mask = np.ones(crop.shape, bool)
    out = CTNoise(sd_hu=(6.0, 6.0), corr_px=(0.0, 0.0), hu_width=WIDTH, prob=1.0)(crop, mask, np.random.default_rng(1))
    assert float(out.std()) * WIDTH == pytest.approx(6.0, rel=0.05)
    smooth = CTNoise(sd_hu=(6.0, 6.0), corr_px=(1.0, 1.0), hu_width=WIDTH, prob=1.0)(crop, mask, np.random.default_rng(1))
    # Correlated (smooth-kernel) texture: neighbours agree more than white noise.
    nb = lambda a: np.corrcoef(a[:, :, :-1].ravel(), a[:, :, 1:].ravel())[0, 1]  # noqa: E731
    assert nb(smooth) > 0.5 > nb(out)


def test_slice_thickness_blurs_along_z_only():
    crop, mask = _lesion()
    out = SliceThickness((0.6, 0.6), prob=1.0)(crop, mask, np.random.default_rng(0))
    dz = lambda a: float(np.abs(np.diff(a, axis=0))[mask[1:] & mask[:-1]].mean())  # noqa: E731
    assert dz(out) < 0.8 * dz(crop)
    assert (out[~mask] == 0).all()


def test_the_same_seed_gives_the_same_batch_and_the_chain_includes_physics():
    crop, mask = _lesion()
    crops = np.stack([crop] * 4)
    phys = PhysicsAugment(PhysicsAugmentConfig(p_offset=1, p_kernel=1, p_noise=1, p_slice=1), SPACING)
    a = phys(crops, np.stack([mask] * 4), np.random.default_rng(3))
    b = phys(crops, np.stack([mask] * 4), np.random.default_rng(3))
    assert np.array_equal(a, b) and not np.allclose(a, crops)
    only_physics = aug.AugmentationConfig(p_rotation=0, p_scale=0, mirror_x=False, p_brightness=0, p_contrast=0,
                                          p_noise=0, physics=PhysicsAugmentConfig(p_noise=1.0))
    augmenter = aug.build_augmenter(only_physics, crop.shape)
    np.random.seed(7)
    first = aug.augment_batch(augmenter, crops)
    np.random.seed(7)
    assert np.array_equal(first, aug.augment_batch(augmenter, crops))
    assert not np.allclose(first, crops) and (first[:, ~mask] == 0).all()
    off = aug.AugmentationConfig(p_rotation=0, p_scale=0, mirror_x=False, p_brightness=0, p_contrast=0, p_noise=0,
                                 physics=PhysicsAugmentConfig(enabled=False))
    assert np.array_equal(aug.augment_batch(aug.build_augmenter(off, crop.shape), crops), crops)


def test_physics_settings_are_validated_from_toml():
    from server.training.classifier_training import ClassifierTrainConfig
    from shared.plumbing.config import from_dict
    from shared.plumbing.errors import IchfedError

    cfg = from_dict(ClassifierTrainConfig, {"augmentation": {"physics": {"noise_sd_hu": [2.0, 4.0]}}})
    assert cfg.augmentation.physics.noise_sd_hu == (2.0, 4.0) and cfg.augmentation.physics.enabled
    with pytest.raises(IchfedError, match="augmentation.physics.p_kernel"):
        from_dict(ClassifierTrainConfig, {"augmentation": {"physics": {"p_kernel": 3}}})
