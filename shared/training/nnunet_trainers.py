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
    """Demo bundle: 40 epochs x 15 iterations with the ichfed small plans (demo scale, 16x96x80 patch).

    nnU-Net's default augmentation already spans most of the site profiles' scanner physics
    (Gaussian noise, Gaussian blur for smooth kernels, brightness/contrast, low-resolution
    simulation for slice thickness; docs/simulations.md). It lacks the two physics the sharp-kernel
    and miscalibrated sites add, so this trainer inserts them before the noise: sharpening (a sharp
    kernel's edge overshoot) and an additive intensity shift (a HU calibration offset; ±0.3 in
    nnU-Net's z-scored CT units is about ±6-9 HU for this dataset's lesion-intensity SD of 20-30 HU).
    """

    EPOCHS = 40
    ITERATIONS_PER_EPOCH = 15
    VAL_ITERATIONS_PER_EPOCH = 2

    @staticmethod
    def get_training_transforms(*args, **kwargs):
        return with_physics_transforms(nnUNetTrainer.get_training_transforms(*args, **kwargs))


def with_physics_transforms(compose, p_sharpen: float = 0.2, sharpen_strength: tuple[float, float] = (0.1, 0.5),
                            p_offset: float = 0.2, offset: float = 0.3):
    """nnU-Net's training transform chain ``compose`` plus sharpening and an additive offset.

    They go just before nnU-Net's Gaussian noise (after the spatial transform), as in a scanner,
    where the kernel and the calibration act before the noise is added.
    """
    from batchgeneratorsv2.transforms.intensity.brightness import (
        BrightnessAdditiveTransform,
    )
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import (
        GaussianNoiseTransform,
    )
    from batchgeneratorsv2.transforms.noise.sharpen import SharpeningTransform
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    transforms = list(compose.transforms)
    at = next((i for i, t in enumerate(transforms)
               if isinstance(getattr(t, "transform", None), GaussianNoiseTransform)), len(transforms))
    extra = [RandomTransform(SharpeningTransform(strength=sharpen_strength, p_same_for_each_channel=1.0),
                             apply_probability=p_sharpen),
             RandomTransform(BrightnessAdditiveTransform(mu=-offset, sigma=offset, synchronize_channels=True),
                             apply_probability=p_offset)]
    compose.transforms = transforms[:at] + extra + transforms[at:]
    return compose


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

        for fold in spec["folds"]:
            run_training(str(dataset_id), configuration, fold, trainer_class_name=spec["trainer"],
                         plans_identifier=spec["plans_identifier"], device=torch.device(spec["device"]))
    else:
        raise ValueError(f"unknown stage {spec['stage']!r}")


def main() -> None:
    """``python -c 'from shared.training.nnunet_trainers import main; main()' SPEC_JSON``."""
    run_stage(json.loads(sys.argv[1]))
