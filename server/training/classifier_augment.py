"""Training-time augmentation of the lesion-masked crop (batchgenerators), for the classifier.

``AugmentationConfig`` is the typed, range-checked recipe (part of ``ClassifierTrainConfig``);
``build_augmenter`` turns it into a batchgenerators transform chain; ``augment_batch`` applies
it to a batch of crops and re-masks to the transformed lesion, so training inputs look like
inference inputs (zero outside ICH∪PHE).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from server.training.physics_augment import (
    BatchgeneratorsPhysics,
    PhysicsAugment,
    PhysicsAugmentConfig,
)


@dataclasses.dataclass(frozen=True)
class AugmentationConfig:
    """batchgenerators augmentation applied to the lesion-masked crop during training.

    Axes are those of the crop (z, y, x). Rotation is in-plane only (about z) because the
    crop has few, thick slices; mirroring is left-right (x) only, the one flip that keeps
    head anatomy plausible. Intensity transforms act inside the lesion mask only: after
    every transform, voxels outside the (spatially transformed) ICH∪PHE mask are set back
    to 0, so training inputs look like inference inputs.
    """

    enabled: bool = True
    rotation_deg: float = dataclasses.field(default=15.0, metadata={"range": (0.0, 180.0)})
    scale: tuple[float, ...] = dataclasses.field(default=(0.9, 1.1), metadata={"length": 2, "range": (0.5, 2.0)})
    p_rotation: float = dataclasses.field(default=0.3, metadata={"range": (0.0, 1.0)})
    p_scale: float = dataclasses.field(default=0.3, metadata={"range": (0.0, 1.0)})
    mirror_x: bool = True
    brightness: tuple[float, ...] = dataclasses.field(
        default=(0.9, 1.1), metadata={"length": 2, "range": (0.1, 10.0)}
    )
    p_brightness: float = dataclasses.field(default=0.3, metadata={"range": (0.0, 1.0)})
    contrast: tuple[float, ...] = dataclasses.field(default=(0.9, 1.1), metadata={"length": 2, "range": (0.1, 10.0)})
    p_contrast: float = dataclasses.field(default=0.3, metadata={"range": (0.0, 1.0)})
    noise_variance: tuple[float, ...] = dataclasses.field(
        default=(0.0, 0.002), metadata={"length": 2, "range": (0.0, 1.0)}
    )
    p_noise: float = dataclasses.field(default=0.15, metadata={"range": (0.0, 1.0)})
    # Scanner physics of the site profiles (kernel, noise, HU offset, slice thickness): server.training.physics_augment.
    physics: PhysicsAugmentConfig = dataclasses.field(default_factory=PhysicsAugmentConfig)


def build_augmenter(cfg: AugmentationConfig, crop_zyx: tuple[int, int, int],
                    spacing_mm: tuple[float, float, float] = (2.8, 2.8, 5.0),
                    hu_window: tuple[float, float] = (-20.0, 120.0)):
    """The batchgenerators transform chain for batches {'data': (B,1,z,y,x), 'seg': (B,1,z,y,x)}.

    ``spacing_mm`` (x, y, z) and ``hu_window`` are the crops' (``CropSpec``), used by the physics
    transforms to express blur in mm and noise and offsets in HU.
    """
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import (
        BrightnessMultiplicativeTransform,
        ContrastAugmentationTransform,
    )
    from batchgenerators.transforms.noise_transforms import GaussianNoiseTransform
    from batchgenerators.transforms.spatial_transforms import (
        MirrorTransform,
        SpatialTransform,
    )

    a = math.radians(cfg.rotation_deg)
    transforms = [
        SpatialTransform(
            patch_size=crop_zyx,
            patch_center_dist_from_border=None,
            do_elastic_deform=False,
            do_rotation=cfg.rotation_deg > 0,
            # angle_x rotates about the first spatial axis, which is z for (z, y, x) crops.
            angle_x=(-a, a),
            angle_y=(0.0, 0.0),
            angle_z=(0.0, 0.0),
            do_scale=True,
            scale=tuple(cfg.scale),
            border_mode_data="constant",
            border_cval_data=0,
            order_data=1,
            border_mode_seg="constant",
            border_cval_seg=0,
            order_seg=0,
            random_crop=False,
            p_rot_per_sample=cfg.p_rotation,
            p_scale_per_sample=cfg.p_scale,
            p_el_per_sample=0.0,
        ),
    ]
    if cfg.mirror_x:
        transforms.append(MirrorTransform(axes=(2,)))
    if cfg.physics.enabled:
        transforms.append(BatchgeneratorsPhysics(PhysicsAugment(cfg.physics, spacing_mm, hu_window)))
    transforms += [
        BrightnessMultiplicativeTransform(multiplier_range=tuple(cfg.brightness), per_channel=True, p_per_sample=cfg.p_brightness),
        ContrastAugmentationTransform(contrast_range=tuple(cfg.contrast), per_channel=True, p_per_sample=cfg.p_contrast),
        GaussianNoiseTransform(noise_variance=tuple(cfg.noise_variance), p_per_sample=cfg.p_noise),
    ]
    return Compose(transforms)


def augment_batch(augmenter, crops: np.ndarray) -> np.ndarray:
    """Apply ``augmenter`` to crops (B, z, y, x) and re-mask to the transformed lesion.

    The lesion mask is taken as the crop's non-zero voxels (everything outside ICH∪PHE is 0 by
    construction) and travels through the spatial transforms as a segmentation, with nearest
    interpolation; intensity changes outside it are discarded.
    """
    data = np.ascontiguousarray(crops[:, None], dtype=np.float32)
    seg = (data != 0).astype(np.float32)
    out = augmenter(data=data, seg=seg)
    aug = out["data"][:, 0].astype(np.float32)
    aug[out["seg"][:, 0] < 0.5] = 0.0
    return aug


