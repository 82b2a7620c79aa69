"""The demo nnU-Net trainer's augmentation adds the scanner physics nnU-Net's default lacks, in HU-calibrated
units: sharp and smooth kernels, a HU calibration offset and CT noise up to the low-dose profile's (issue 19,
docs/segmentation.md)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2")

from shared.training.nnunet_trainers import CTScannerTransform, nnUNetTrainer_ichfedDemo  # noqa: E402

ARGS = ((16, 48, 48), (-0.5, 0.5), None, (2,), False, [False], False, (1, 2), None, None)
# nnU-Net's fingerprint of a demo development cohort: lesion-voxel HU statistics.
PROPS = {"mean": 36.5, "std": 24.7, "percentile_00_5": 4.0, "percentile_99_5": 135.0}


def _names(compose):
    return [type(getattr(t, "transform", t)).__name__ for t in compose.transforms]


def test_demo_trainer_chain_has_the_scanner_before_the_noise():
    trainer = SimpleNamespace(plans_manager=SimpleNamespace(foreground_intensity_properties_per_channel={"0": PROPS}))
    names = _names(nnUNetTrainer_ichfedDemo.get_training_transforms(trainer, *ARGS))
    assert names.index("SpatialTransform") < names.index("CTScannerTransform") < names.index("GaussianNoiseTransform")
    for default in ("GaussianBlurTransform", "SimulateLowResolutionTransform", "ContrastTransform"):
        assert default in names  # nnU-Net's own augmentation is kept


def _scanner(**kw) -> CTScannerTransform:
    base = dict(p_noise=0.0, p_offset=0.0, p_sharp=0.0, p_smooth=0.0)
    return CTScannerTransform.from_intensity_properties(PROPS, **{**base, **kw})


def test_clip_bounds_are_nnunets_ct_normalisation():
    t = _scanner()
    assert t.clip == pytest.approx(((4.0 - 36.5) / 24.7, (135.0 - 36.5) / 24.7))


def test_noise_sd_is_drawn_in_hu_up_to_the_low_dose_profile():
    np.random.seed(0)
    t = _scanner(p_noise=1.0, noise_hu=(14.0, 14.0))
    out = t(image=torch.zeros((1, 4, 32, 32)))["image"]
    assert float(out.std()) * PROPS["std"] == pytest.approx(14.0, rel=0.05)


def test_offset_is_an_additive_shift_within_its_hu_range():
    np.random.seed(0)
    t = _scanner(p_offset=1.0, offset_hu=10.0)
    shifts = [float(t(image=torch.zeros((1, 2, 8, 8)))["image"].mean()) * PROPS["std"] for _ in range(40)]
    assert all(-10 - 1e-4 <= s <= 10 + 1e-4 for s in shifts) and np.std(shifts) > 2.0


def test_sharp_kernel_overshoots_and_smooth_kernel_blurs_the_edge():
    np.random.seed(1)
    img = torch.zeros((1, 4, 32, 32))
    img[:, :, :, 16:] = 1.0  # a step edge, in-plane
    sharp = _scanner(p_sharp=1.0, sharp_strength=(0.8, 0.8))(image=img.clone())["image"]
    smooth = _scanner(p_smooth=1.0, smooth_sigma=(1.0, 1.0))(image=img.clone())["image"]
    assert float(sharp.max()) > 1.05 and float(sharp.min()) < -0.05  # overshoot on both sides
    assert 0.05 < float(smooth[0, 0, 0, 15]) < 0.95  # the step is spread over neighbours
    assert torch.equal(sharp[:, 0], sharp[:, 3])  # within the slice only: slices stay identical
