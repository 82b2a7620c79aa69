"""nnU-Net v2 trainer subclasses for the short ``ci`` and ``demo`` profiles, and the stage runner.

nnU-Net finds trainers by class name. ``shared.training.segment_train.train`` writes a one-line module into a
folder named by ``nnUNet_extTrainer`` that re-exports the classes below, which is how nnunetv2 2.8
discovers trainers that live outside its own package (``recursive_find_trainer_class_by_name``
imports every module of each folder in that variable, so it cannot point at ``shared/`` itself:
its modules use relative imports).

``run_stage`` is the entry point of the subprocess that ``shared.training.segment_train`` starts for planning,
preprocessing and training. It runs in its own process so that nnU-Net's environment variables,
worker pools and ``print`` output never touch the caller. This module imports nnunetv2 at import
time; only that subprocess and the predictor's trainer lookup import it.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class _ShortTrainer(nnUNetTrainer):
    """nnU-Net training shortened to a few hundred iterations or fewer.

    Data loading, augmentation, loss (Dice + CE with deep supervision) and the poly learning-rate
    schedule are nnU-Net's. The optimizer is AdamW at 1e-2 instead of SGD (momentum 0.99) at 1e-2:
    measured on 64x64x16 synthetic cases with the ichfed small plans, SGD still predicted only
    background after 100 iterations while AdamW reached pseudo Dice 0.91 (ICH) / 0.87 (PHE) after 25.
    """

    EPOCHS = 1
    ITERATIONS_PER_EPOCH = 1
    VAL_ITERATIONS_PER_EPOCH = 1
    INITIAL_LR = 1e-2

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.EPOCHS
        self.num_iterations_per_epoch = self.ITERATIONS_PER_EPOCH
        self.num_val_iterations_per_epoch = self.VAL_ITERATIONS_PER_EPOCH
        self.initial_lr = self.INITIAL_LR
        # Only checkpoint_final matters for a bundle; periodic checkpoints just cost disk time.
        self.save_every = self.EPOCHS + 1

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        # nnU-Net's final validation spawns a pool of nnUNet_def_n_proc workers (8 by default) to
        # export predictions; with fold 'all' it only re-segments the training cases. On 2 CPU cores
        # that costs more than the training itself, so the short profiles measure Dice elsewhere.
        self.print_to_log_file("ichfed: final validation skipped for the short profile")


class nnUNetTrainer_ichfedCI(_ShortTrainer):  # noqa: N801 - nnU-Net finds trainers by this naming scheme
    """Tests: 8 epochs x 12 iterations, ~40-80 s of training on one CPU thread with the ichfed small plans."""

    EPOCHS = 8
    ITERATIONS_PER_EPOCH = 12
    VAL_ITERATIONS_PER_EPOCH = 1


class nnUNetTrainer_ichfedDemo(_ShortTrainer):  # noqa: N801
    """Demo bundle: 40 epochs x 15 iterations with the ichfed small plans (demo scale, 16x96x80 patch), trained
    under the scanner physics of every shipped site profile (``CTScannerTransform``).

    nnU-Net's own augmentation covers the smooth side (Gaussian blur, low-resolution simulation for slice
    thickness) but not the sharp, noisy and miscalibrated scanners: its Gaussian noise (variance <= 0.1, 1 sample
    in 10) is at most a third of the low-dose profile's 14 HU on this dataset's z-scale. Measured with a segmenter
    trained without it (benchmarks/bench_segment_sites.py, docs/segmentation.md): a sharp kernel or noise of
    9-14 HU alone fragments the ICH into specks, and the two together cut the median ICH Dice to about a third.
    """

    EPOCHS = 40
    ITERATIONS_PER_EPOCH = 15
    VAL_ITERATIONS_PER_EPOCH = 2

    def get_training_transforms(self, *args, **kwargs):  # nnU-Net calls it on the instance: the plans are known
        props = self.plans_manager.foreground_intensity_properties_per_channel["0"]
        physics = CTScannerTransform.from_intensity_properties(props)
        return with_transform_before_noise(nnUNetTrainer.get_training_transforms(*args, **kwargs), physics)


def with_transform_before_noise(compose, transform):
    """nnU-Net's training transform chain ``compose`` with ``transform`` inserted just before its Gaussian noise
    (after the spatial transform), as in a scanner, where kernel and calibration act before the noise."""
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import (
        GaussianNoiseTransform,
    )

    transforms = list(compose.transforms)
    at = next((i for i, t in enumerate(transforms)
               if isinstance(getattr(t, "transform", None), GaussianNoiseTransform)), len(transforms))
    compose.transforms = transforms[:at] + [transform] + transforms[at:]
    return compose


def _ct_scanner_base():
    from batchgeneratorsv2.transforms.base.basic_transform import ImageOnlyTransform

    return ImageOnlyTransform


class CTScannerTransform(_ct_scanner_base()):
    """A random CT scanner applied to an nnU-Net-normalised patch (C, z, y, x), in HU-calibrated units.

    Per sample, in a scanner's order: a reconstruction kernel (smooth: in-plane Gaussian blur; sharp: unsharp
    masking, which adds the edge overshoot of bone kernels), a calibration offset, then CT noise whose texture
    follows the kernel (white for sharp, correlated for smooth), and finally nnU-Net's own CT clipping. Ranges
    are in HU and cover the shipped profiles (noise 5-14 HU, offsets -8..+9 HU, smooth/standard/sharp kernels)
    with margin. Most samples get a scanner (a site's scans always carry noise and some calibration offset):
    with the effects drawn rarely and independently, their combination (sharp and noisy and offset, as at
    ``hamburg-like``) was too rare in training and still fragmented the bleed (docs/segmentation.md).
    ``hu_scale`` (the foreground intensity SD nnU-Net's ``CTNormalization`` divides by) converts them to the
    normalised units the network sees.
    """

    def __init__(self, hu_scale: float, clip: tuple[float, float], noise_hu: tuple[float, float] = (0.0, 16.0),
                 offset_hu: float = 10.0, p_noise: float = 0.9, p_offset: float = 0.8, p_sharp: float = 0.4,
                 p_smooth: float = 0.3, sharp_strength: tuple[float, float] = (0.3, 1.5),
                 smooth_sigma: tuple[float, float] = (0.4, 1.0)):
        super().__init__()
        self.hu_scale, self.clip = float(hu_scale), (float(clip[0]), float(clip[1]))
        self.noise_hu, self.offset_hu = noise_hu, offset_hu
        self.p_noise, self.p_offset, self.p_sharp, self.p_smooth = p_noise, p_offset, p_sharp, p_smooth
        self.sharp_strength, self.smooth_sigma = sharp_strength, smooth_sigma

    @classmethod
    def from_intensity_properties(cls, props: dict, **kwargs) -> "CTScannerTransform":
        """From nnU-Net's foreground intensity properties of the CT channel (the plans' fingerprint)."""
        mean, std = float(props["mean"]), max(float(props["std"]), 1e-6)
        clip = ((float(props["percentile_00_5"]) - mean) / std, (float(props["percentile_99_5"]) - mean) / std)
        return cls(hu_scale=std, clip=clip, **kwargs)

    def get_parameters(self, **data_dict) -> dict:
        u = np.random.uniform
        kernel = np.random.choice(["sharp", "smooth", "standard"],
                                  p=[self.p_sharp, self.p_smooth, 1.0 - self.p_sharp - self.p_smooth])
        return {
            "kernel": kernel,
            "strength": u(*self.sharp_strength) if kernel == "sharp" else u(*self.smooth_sigma),
            "offset": u(-self.offset_hu, self.offset_hu) / self.hu_scale if np.random.rand() < self.p_offset else 0.0,
            "noise_sd": u(*self.noise_hu) / self.hu_scale if np.random.rand() < self.p_noise else 0.0,
        }

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        from scipy import ndimage

        x = img.numpy().astype(np.float32, copy=True)
        inplane = (0.0,) * (x.ndim - 2) + (1.0, 1.0)  # (C, z, y, x): kernels act within the slice
        if params["kernel"] == "sharp":
            wide = ndimage.gaussian_filter(x, sigma=inplane, mode="nearest", truncate=3.0)
            x += np.float32(params["strength"]) * (x - wide)
        elif params["kernel"] == "smooth":
            x = ndimage.gaussian_filter(x, sigma=tuple(params["strength"] * s for s in inplane), mode="nearest")
        x += np.float32(params["offset"])
        if params["noise_sd"] > 0:
            n = np.random.standard_normal(x.shape).astype(np.float32)
            if params["kernel"] == "smooth":  # correlated texture; rescaled so the SD is the one drawn
                n = ndimage.gaussian_filter(n, sigma=tuple(0.7 * s for s in inplane), mode="wrap")
            x += n * np.float32(params["noise_sd"] / max(float(n.std()), 1e-6))
        np.clip(x, *self.clip, out=x)
        return torch.from_numpy(x)


TRAINERS = {cls.__name__: cls for cls in (nnUNetTrainer_ichfedCI, nnUNetTrainer_ichfedDemo)}


def derive_small_plans(preprocessed_dataset: Path, source_plans: str, target_plans: str,
                       configuration: str, width_divisor: int) -> None:
    """Write plans ``target_plans`` = ``source_plans`` with every stage ``width_divisor`` times narrower.

    The planner's 3d_fullres network (32..320 features) takes ~3.5 s per iteration on one CPU thread;
    a quarter of the width takes ~0.4 s and still separates bright ICH from its darker edema rim.
    Topology, patch size, spacing and normalisation stay exactly as nnU-Net planned them, and the
    data identifier is kept so the preprocessed arrays are shared.
    """
    plans = json.loads((preprocessed_dataset / f"{source_plans}.json").read_text(encoding="utf-8"))
    plans["plans_name"] = target_plans
    conf = plans["configurations"][configuration]
    conf.setdefault("data_identifier", f"{source_plans}_{configuration}")
    kwargs = conf["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [max(4, int(f) // width_divisor) for f in kwargs["features_per_stage"]]
    plans["configurations"] = {configuration: conf}
    (preprocessed_dataset / f"{target_plans}.json").write_text(json.dumps(plans, indent=1), encoding="utf-8")


def run_stage(spec: dict) -> None:
    """Run one nnU-Net stage described by ``spec`` (see ``shared.training.segment_train``) in this process."""
    seed = int(spec.get("seed", 0))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(int(spec.get("num_threads", 1)))
    dataset_id = int(spec["dataset_id"])
    configuration = spec["configuration"]
    if spec["stage"] == "plan":
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprints,
            plan_experiments,
            preprocess,
        )
        from nnunetv2.paths import nnUNet_preprocessed
        from nnunetv2.utilities.dataset_name_id_conversion import (
            convert_id_to_dataset_name,
        )

        n = int(spec.get("num_processes", 1))
        extract_fingerprints([dataset_id], num_processes=n, check_dataset_integrity=True)
        default_plans = plan_experiments([dataset_id], gpu_memory_target_in_gb=spec.get("gpu_memory_target_gb"))
        plans = spec["plans_identifier"]
        if plans != default_plans:
            folder = Path(str(nnUNet_preprocessed)) / convert_id_to_dataset_name(dataset_id)
            derive_small_plans(folder, default_plans, plans, configuration, int(spec["width_divisor"]))
        preprocess([dataset_id], plans_identifier=plans, configurations=(configuration,), num_processes=[n])
    elif spec["stage"] == "train":
        from nnunetv2.run.run_training import run_training

        from shared.plumbing.determinism import deterministic_training

        # Without deterministic kernels two runs on one machine with the same seed and threads drift apart
        # (docs/segmentation.md, "Reproducibility"); the thread count is part of the arithmetic too.
        with deterministic_training(int(spec.get("num_threads", 1))):
            for fold in spec["folds"]:
                run_training(str(dataset_id), configuration, fold, trainer_class_name=spec["trainer"],
                             plans_identifier=spec["plans_identifier"], device=torch.device(spec["device"]))
    else:
        raise ValueError(f"unknown stage {spec['stage']!r}")


def main() -> None:
    """``python -c 'from shared.training.nnunet_trainers import main; main()' SPEC_JSON``."""
    run_stage(json.loads(sys.argv[1]))


class nnUNetTrainer_ichfedFineTune(_ShortTrainer):  # noqa: N801
    """A site's short fine-tune of a received segmenter (issue 24), on its own masked fine-tune cases.

    nnU-Net's data loading, augmentation, loss (Dice + CE with deep supervision) and poly schedule;
    AdamW as in the short recipes. ``shared.training.segment_finetune`` configures it through the
    environment variable ``ICHFED_FINETUNE`` (JSON: ``start`` safetensors of every canonical tensor,
    ``trainable`` part, ``epochs``, ``iterations``, ``learning_rate``, ``summary`` path), because
    nnU-Net builds the trainer itself from its class name. The start weights are loaded in full,
    segmentation layers included (nnU-Net's ``load_pretrained_weights`` skips those, reads with
    pickle, and is meant for transfer to another label set), and from safetensors, never pickle.
    Only the trainable part (``decoder`` or ``all``) gets gradients and an optimizer.
    """

    def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        import os

        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ichfed = json.loads(os.environ["ICHFED_FINETUNE"])
        self.num_epochs = int(self.ichfed["epochs"])
        self.num_iterations_per_epoch = int(self.ichfed["iterations"])
        self.num_val_iterations_per_epoch = 1
        self.initial_lr = float(self.ichfed["learning_rate"])
        self.save_every = self.num_epochs + 1

    def initialize(self):
        super().initialize()
        from safetensors.torch import load_file

        start = load_file(self.ichfed["start"])
        tensors = dict(self.network.named_parameters())
        tensors.update({k: b for k, b in self.network.named_buffers() if b.is_floating_point()})
        if set(start) != set(tensors):
            raise RuntimeError(f"ichfed fine-tune: start weights do not name the network's tensors "
                               f"(missing {sorted(set(tensors) - set(start))[:3]}, extra {sorted(set(start) - set(tensors))[:3]})")
        trainable = self.ichfed["trainable"]
        with torch.no_grad():
            for name, t in tensors.items():
                t.copy_(start[name].to(t.device))
        for name, p in self.network.named_parameters():
            p.requires_grad_(trainable == "all" or name.startswith("decoder."))
        # the optimizer sees only the trainable part (nnU-Net built one over every parameter)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()

    def configure_optimizers(self):
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def save_checkpoint(self, filename: str) -> None:
        # Only the final weights are used; nnU-Net's per-epoch "best" checkpoint would cost a write per epoch.
        if filename.endswith("checkpoint_final.pth"):
            super().save_checkpoint(filename)

    def on_train_end(self):
        super().on_train_end()
        get = self.logger.get_value
        dice = [float(d) for d in get("dice_per_class_or_region", step=-1)]
        summary = {"train_loss": float(get("train_losses", step=-1)), "pseudo_dice": dice,
                   "iterations": int(self.num_epochs * self.num_iterations_per_epoch)}
        Path(self.ichfed["summary"]).write_text(json.dumps(summary), encoding="utf-8")
