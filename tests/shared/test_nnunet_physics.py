"""The demo nnU-Net trainer's augmentation adds the scanner physics nnU-Net's default lacks:
a sharp kernel's overshoot and a HU calibration offset (issue 13, docs/simulations.md)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2")

from shared.training.nnunet_trainers import (  # noqa: E402
    nnUNetTrainer_ichfedDemo,
    with_physics_transforms,
)

ARGS = ((16, 48, 48), (-0.5, 0.5), None, (2,), False, [False], False, (1, 2), None, None)


def _names(compose):
    return [type(getattr(t, "transform", t)).__name__ for t in compose.transforms]


def test_demo_trainer_chain_has_sharpening_and_offset_before_the_noise():
    names = _names(nnUNetTrainer_ichfedDemo.get_training_transforms(*ARGS))
    i_noise = names.index("GaussianNoiseTransform")
    assert names.index("SharpeningTransform") < i_noise and names.index("BrightnessAdditiveTransform") < i_noise
    assert names.index("SpatialTransform") < names.index("SharpeningTransform")
    for default in ("GaussianBlurTransform", "SimulateLowResolutionTransform", "ContrastTransform"):
        assert default in names  # nnU-Net's own physics-like augmentation is kept


def _only_physics(**kw):
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import (
        GaussianNoiseTransform,
    )
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    base = ComposeTransforms([RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0)), apply_probability=0.0)])
    return with_physics_transforms(base, **kw)


def test_offset_is_an_additive_shift_within_its_range():
    torch.manual_seed(0), np.random.seed(0)
    chain = _only_physics(p_sharpen=0.0, p_offset=1.0, offset=0.3)
    img = torch.zeros((1, 4, 16, 16))
    shifts = [float(chain(image=img.clone())["image"].mean()) for _ in range(40)]
    assert all(-0.3 - 1e-6 <= s <= 0.3 + 1e-6 for s in shifts) and np.std(shifts) > 0.05


def test_sharpening_raises_the_edge_contrast():
    torch.manual_seed(1), np.random.seed(1)
    chain = _only_physics(p_sharpen=1.0, sharpen_strength=(0.5, 0.5), p_offset=0.0)
    img = torch.zeros((1, 8, 32, 32))
    img[:, :, :, 16:] = 1.0  # a step edge
    out = chain(image=img.clone())["image"]
    assert float(out.max()) > 1.05 and float(out.min()) < -0.05  # overshoot on both sides
