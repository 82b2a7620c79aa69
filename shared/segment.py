"""ICH (label 1) and perihematomal edema (label 2) segmentation with nnU-Net v2, through its own API.

Four things live here:

- ``export_dataset``: a site-layout cohort becomes an nnU-Net raw dataset (channel ``CT``, labels
  background / ICH / PHE, ``.nii.gz``) written with nnU-Net's own ``generate_dataset_json``.
- ``train``: nnU-Net's fingerprint extractor, experiment planner, preprocessor and trainer, run in a
  subprocess whose environment carries ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results``
  / ``nnUNet_extTrainer``, so the caller's environment is never changed. Profiles: ``paper``
  (nnU-Net defaults, 3d_fullres), ``demo`` and ``ci`` (short trainers from
  ``shared.nnunet_trainers`` on narrower plans derived from the planner's own).
- ``validate_model_folder`` / ``copy_model_folder``: an nnU-Net results folder (``dataset.json``,
  ``plans.json``, ``fold_*/checkpoint_final.pth``) is checked and copied with slim checkpoints.
- ``Segmenter``: ``nnUNetPredictor`` initialised by hand. nnU-Net's own loader calls
  ``torch.load(weights_only=False)``, i.e. full pickle; here checkpoints are read with
  ``weights_only=True`` and the network is rebuilt from ``plans.json``. Prediction runs in the
  calling process (no worker pools), so it works inside a Flower client and a web request.

Slim checkpoints: nnU-Net's ``checkpoint_final.pth`` holds numpy scalars (training logs, best EMA
Dice) and a ``torch.device``, which plain ``weights_only=True`` refuses. Folders written by
``train``/``copy_model_folder`` keep only tensors and plain values (``network_weights``,
``trainer_name``, ``init_args.configuration``/``fold``, ``inference_allowed_mirroring_axes``,
``current_epoch``); they load with plain ``torch.load(weights_only=True)`` and still work with
nnU-Net's own ``nnUNetv2_predict``. Foreign checkpoints are read with ``weights_only=True`` and an
allow-list of exactly the numpy scalar/dtype reconstructors nnU-Net's logs need.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import SimpleITK as sitk

from .device import pick_device
from .errors import BundleVerificationError, IchfedError
from .model_policy import build_network, check_plans
from .verified import read_verified

log = logging.getLogger(__name__)

LABELS = {"background": 0, "ICH": 1, "PHE": 2}
CHANNELS = {"0": "CT"}
FILE_ENDING = ".nii.gz"
CHECKPOINT = "checkpoint_final.pth"

# Reader/writers whose voxel array for a NIfTI equals sitk.GetArrayFromImage (z, y, x) of the image.
_ARRAY_READERS = {"SimpleITKIO", "NibabelIO"}
# nnU-Net reorients to RAS with SimpleITK before prediction; done here the same way.
_REORIENT_READERS = {"SimpleITKIOWithReorient": "RAS"}


@dataclasses.dataclass(frozen=True)
class TrainingProfile:
    """How ``train`` runs nnU-Net.

    ``width_divisor`` > 1 derives plans ``plans_identifier`` from the planner's default plans with
    every stage that many times narrower (see ``shared.nnunet_trainers.derive_small_plans``).
    ``n_proc_da`` sets ``nnUNet_n_proc_DA`` for training (0 = augmentation in the training process,
    which is deterministic given the seed); ``None`` keeps nnU-Net's default. ``compile`` sets
    ``nnUNet_compile``; compiling costs more than it saves on a run of a few hundred iterations.
    ``gpu_memory_target_gb`` is passed to nnU-Net's planner (default 8 GB): a smaller budget makes
    the planner itself choose a smaller patch and a matching network topology.
    """

    trainer: str
    plans_identifier: str
    width_divisor: int = dataclasses.field(default=1, metadata={"range": (1, 64)})
    configuration: str = "3d_fullres"
    n_proc_da: int | None = None
    compile: bool | None = None
    gpu_memory_target_gb: float | None = None
    epochs: int = 1000


PROFILES: dict[str, TrainingProfile] = {
    "paper": TrainingProfile(trainer="nnUNetTrainer", plans_identifier="nnUNetPlans"),
    # demo scale (128 x 128 x 28 voxels): a 0.5 GB budget gives a 16 x 96 x 80 patch instead of the
    # whole image, ~3x less work per iteration on a CPU
    "demo": TrainingProfile(trainer="nnUNetTrainer_ichfedDemo", plans_identifier="nnUNetPlans_ichfedSmall",
                            width_divisor=4, n_proc_da=0, compile=False, gpu_memory_target_gb=0.5, epochs=40),
    "ci": TrainingProfile(trainer="nnUNetTrainer_ichfedCI", plans_identifier="nnUNetPlans_ichfedSmall",
                          width_divisor=4, n_proc_da=0, compile=False, epochs=8),
}

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_CASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ----------------------------------------------------------------------------------------------
# raw dataset export


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name for a dataset, e.g. ``Dataset501_ICH``."""
    return f"Dataset{dataset_id:03d}_{name}"


def export_dataset(site, raw_root: Path, dataset_id: int = 501, name: str = "ICH") -> Path:
    """Write the cases of ``site`` (a ``shared.sitedata.SiteData``) that have a mask as an nnU-Net raw dataset.

    Images are read with ``shared.ingest.read_image`` (NIfTI, DICOM folder or zip -> float32 HU) and
    masks with ``shared.sitedata.read_mask`` (geometry checked against the image). Cases without a
    mask are skipped. The dataset folder is built beside its target and swapped in, so a failed
    export leaves the previous one intact. Returns ``raw_root/DatasetXXX_name``.
    """
    from tqdm import tqdm

    from .ingest import read_image
    from .sitedata import read_mask

    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise IchfedError(f"dataset_id: must be an integer between 1 and 999, got {dataset_id!r}")
    if not _NAME_RE.fullmatch(name):
        raise IchfedError(f"name: must be letters, digits, '-' or '_', got {name!r}")
    raw_root = Path(raw_root)
    folder = raw_root / dataset_folder_name(dataset_id, name)
    if raw_root.is_dir():
        clash = [p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.name != folder.name]
        if clash:
            raise IchfedError(f"{raw_root}: dataset id {dataset_id} is already used by {clash[0]}")
    cases = [c for c in site.cases if c.mask_path is not None]
    skipped = len(site.cases) - len(cases)
    if skipped:
        log.info("%s: %d case(s) without a mask are not used for segmentation training", site.root, skipped)
    if not cases:
        raise IchfedError(f"{site.root}: no case has an ICH/PHE mask; nnU-Net training needs masks")
    for case in cases:
        if not _CASE_RE.fullmatch(str(case.case_id)):
            raise IchfedError(f"{site.root}: case_id {case.case_id!r} cannot be an nnU-Net file name")

    raw_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=raw_root))
    try:
        (staging / "imagesTr").mkdir()
        (staging / "labelsTr").mkdir()
        for case in tqdm(cases, desc="export nnU-Net dataset", unit="case", disable=None, file=sys.stderr):
            image = read_image(case.image_path).image
            mask = read_mask(case.mask_path, like=image)  # checks geometry and values {0, 1, 2}
            sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(staging / "imagesTr" / f"{case.case_id}_0000{FILE_ENDING}"), True)
            sitk.WriteImage(sitk.Cast(mask, sitk.sitkUInt8), str(staging / "labelsTr" / f"{case.case_id}{FILE_ENDING}"), True)
        from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

        generate_dataset_json(str(staging), channel_names=CHANNELS, labels=LABELS,
                              num_training_cases=len(cases), file_ending=FILE_ENDING,
                              dataset_name=folder.name, converted_by="ichfed",
                              description="Non-contrast head CT; labels ICH and perihematomal edema (PHE)",
                              license="site-internal")
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote nnU-Net raw dataset %s (%d cases)", folder, len(cases))
    return folder


def _swap_in(new: Path, target: Path) -> None:
    # Directories cannot be os.replace'd over non-empty ones: move the old one aside first.
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# training


def _dataset(raw_root: Path, dataset_id: int, profile: str) -> tuple[Path, int]:
    """Check the profile and find the raw dataset; no side effects."""
    if profile not in PROFILES:
        raise IchfedError(f"profile: must be one of {', '.join(map(repr, PROFILES))}, got {profile!r}")
    dataset = _find_raw_dataset(Path(raw_root).resolve(), dataset_id)
    return dataset, _count_raw_cases(dataset)


def _workspace(raw_root: Path, dataset_id: int, profile: str, work_dir: Path, num_threads: int | None,
               num_processes: int | None) -> tuple[dict[str, Path], dict[str, str], dict[str, Any]]:
    """Create the nnU-Net folders under ``work_dir``; return them, the subprocess environment and common spec."""
    spec = PROFILES[profile]
    cpus = os.cpu_count() or 1
    num_threads = num_threads or int(os.environ.get("OMP_NUM_THREADS") or cpus)
    num_processes = num_processes or max(1, min(4, cpus))
    work_dir = Path(work_dir).resolve()
    dirs = {name: work_dir / name for name in ("nnUNet_preprocessed", "nnUNet_results", "ext_trainers", "logs")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    _write_trainer_shim(dirs["ext_trainers"])
    env = _nnunet_env(Path(raw_root).resolve(), dirs, num_threads)
    common = {"dataset_id": dataset_id, "configuration": spec.configuration, "num_threads": num_threads,
              "plans_identifier": spec.plans_identifier, "num_processes": num_processes}
    return dirs, env, common


def plan(raw_root: Path, dataset_id: int, profile: Literal["ci", "demo", "paper"], work_dir: Path,
         seed: int = 0, *, num_threads: int | None = None, num_processes: int | None = None) -> Path:
    """Run nnU-Net's fingerprint extractor, experiment planner and preprocessor for ``profile``.

    Returns the preprocessed dataset folder (``work_dir/nnUNet_preprocessed/DatasetXXX_*``), which
    holds ``dataset.json`` and the profile's plans file (``PROFILES[profile].plans_identifier``).
    """
    dataset, n_cases = _dataset(raw_root, dataset_id, profile)
    dirs, env, common = _workspace(raw_root, dataset_id, profile, work_dir, num_threads, num_processes)
    return _run_plan(profile, dataset, n_cases, dirs, env, common, seed)


def _run_plan(profile: str, dataset: Path, n_cases: int, dirs: dict[str, Path], env: dict[str, str],
              common: dict[str, Any], seed: int) -> Path:
    spec = PROFILES[profile]
    log.info("nnU-Net %s: planning and preprocessing %s (%d cases)", profile, dataset.name, n_cases)
    plan_env = dict(env, nnUNet_def_n_proc=str(common["num_processes"]))
    _run_nnunet("plan", {**common, "seed": seed, "stage": "plan", "width_divisor": spec.width_divisor,
                         "gpu_memory_target_gb": spec.gpu_memory_target_gb}, plan_env, dirs["logs"])
    return dirs["nnUNet_preprocessed"] / dataset.name


def train(raw_root: Path, dataset_id: int, profile: Literal["ci", "demo", "paper"], work_dir: Path,
          seed: int = 0, *, folds: Sequence[int | str] | None = None, device: str = "auto",
          num_threads: int | None = None, num_processes: int | None = None) -> Path:
    """Plan, preprocess and train nnU-Net on ``raw_root/DatasetXXX_*``; return the trained model folder.

    ``work_dir`` receives ``nnUNet_preprocessed/``, ``nnUNet_results/``, ``logs/`` and ``model/``
    (the returned folder: ``dataset.json``, ``plans.json``, ``fold_*/checkpoint_final.pth`` with
    slim checkpoints, ready for a bundle). ``folds`` defaults to ``('all',)`` for ``ci``/``demo`` and
    for fewer than 5 cases (nnU-Net's folds 0-4 need 5), else nnU-Net's 5-fold ``(0, 1, 2, 3, 4)``.
    ``num_threads`` (torch threads in training) defaults to ``$OMP_NUM_THREADS`` or the CPU count;
    ``num_processes`` (planning/preprocessing workers) to min(4, CPU count).
    """
    dataset, n_cases = _dataset(raw_root, dataset_id, profile)
    spec = PROFILES[profile]
    torch_device = pick_device(device)
    if folds is None:
        folds = ("all",) if profile != "paper" or n_cases < 5 else (0, 1, 2, 3, 4)
    folds = tuple(str(f) for f in folds)
    for f in folds:
        if f != "all" and not (f in ("0", "1", "2", "3", "4") and n_cases >= 5):
            raise IchfedError(f"folds: fold {f!r} needs 'all' or 0-4 with at least 5 cases (have {n_cases})")

    dirs, env, common = _workspace(raw_root, dataset_id, profile, work_dir, num_threads, num_processes)
    _run_plan(profile, dataset, n_cases, dirs, env, common, seed)

    train_env = dict(env)
    if spec.n_proc_da is not None:
        train_env["nnUNet_n_proc_DA"] = str(spec.n_proc_da)
    if spec.compile is not None:
        train_env["nnUNet_compile"] = "true" if spec.compile else "false"
    log.info("nnU-Net %s: training %s fold(s) %s on %s with %s", profile, spec.configuration,
             ",".join(folds), torch_device.type, spec.trainer)
    _run_nnunet("train", {**common, "seed": seed, "stage": "train", "trainer": spec.trainer, "folds": list(folds),
                          "device": torch_device.type}, train_env, dirs["logs"],
                progress_total=spec.epochs * len(folds))

    results = (dirs["nnUNet_results"] / dataset.name
               / f"{spec.trainer}__{spec.plans_identifier}__{spec.configuration}")
    return copy_model_folder(results, work_dir / "model", folds=folds)


def _find_raw_dataset(raw_root: Path, dataset_id: int) -> Path:
    found = sorted(raw_root.glob(f"Dataset{int(dataset_id):03d}_*")) if raw_root.is_dir() else []
    found = [p for p in found if p.is_dir()]
    if not found:
        raise IchfedError(f"{raw_root}: no nnU-Net raw dataset with id {dataset_id} (expected Dataset{int(dataset_id):03d}_<name>/)")
    if len(found) > 1:
        raise IchfedError(f"{raw_root}: several datasets with id {dataset_id}: {', '.join(p.name for p in found)}")
    return found[0]


def _count_raw_cases(dataset: Path) -> int:
    meta = _read_json(dataset / "dataset.json")
    n = len(list((dataset / "labelsTr").glob(f"*{meta.get('file_ending', FILE_ENDING)}")))
    if n == 0:
        raise IchfedError(f"{dataset / 'labelsTr'}: no training labels")
    return n


def _write_trainer_shim(folder: Path) -> None:
    # nnU-Net imports every module in an nnUNet_extTrainer folder by its bare name; this one module
    # re-exports our trainers so that their real home stays the ``shared`` package.
    from .atomic import write_text

    write_text(folder / "ichfed_trainers.py",
               "# Generated by ichfed: exposes its trainers to nnU-Net via nnUNet_extTrainer.\n"
               "from shared.nnunet_trainers import nnUNetTrainer_ichfedCI, nnUNetTrainer_ichfedDemo  # noqa: F401\n")


def _nnunet_env(raw_root: Path, dirs: dict[str, Path], num_threads: int) -> dict[str, str]:
    env = dict(os.environ)
    project_root = str(Path(__file__).resolve().parent.parent)
    ext = str(dirs["ext_trainers"])
    env.update({
        "nnUNet_raw": str(raw_root),
        "nnUNet_preprocessed": str(dirs["nnUNet_preprocessed"]),
        "nnUNet_results": str(dirs["nnUNet_results"]),
        "nnUNet_extTrainer": os.pathsep.join(filter(None, [ext, os.environ.get("nnUNet_extTrainer")])),
        "PYTHONPATH": os.pathsep.join(filter(None, [project_root, os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(num_threads),
        "MPLBACKEND": "Agg",
    })
    return env


def _run_nnunet(stage: str, spec: dict, env: dict[str, str], log_dir: Path, progress_total: int | None = None) -> None:
    """Run one stage in a subprocess; its output goes to ``log_dir/<stage>.log`` and the DEBUG log."""
    from tqdm import tqdm

    out_log = logging.getLogger(f"{__name__}.nnunet")
    log_path = log_dir / f"{stage}.log"
    cmd = [sys.executable, "-c", "from shared.nnunet_trainers import main; main()", json.dumps(spec)]
    last = ""
    bar = tqdm(total=progress_total, desc=f"nnU-Net {stage}", unit="epoch", disable=None if progress_total else True,
               file=sys.stderr)
    with open(log_path, "w", encoding="utf-8", buffering=1) as f, bar:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1)
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                # tqdm bars of nnU-Net arrive as carriage-return updates; keep the last one only
                line = raw.rstrip("\n").split("\r")[-1].rstrip()
                f.write(line + "\n")
                if not line:
                    continue
                last = line
                body = line.split(": ", 1)[-1] if line[:2] == "20" else line  # drop nnU-Net's timestamp
                if body.startswith("Epoch ") and body[6:].strip().isdigit():
                    bar.update(1)
                if body.startswith(("Epoch time", "Pseudo dice", "train_loss")):
                    out_log.info("%s", body)
                else:
                    out_log.debug("%s", line)
            rc = proc.wait()
        except BaseException:
            # interrupted (Ctrl-C, a failing log handler): do not leave nnU-Net training in the background
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        raise IchfedError(f"nnU-Net {stage} failed (exit code {rc}): {last or 'no output'} (full log: {log_path})")


# ----------------------------------------------------------------------------------------------
# model folders


def validate_model_folder(path: Path, check_weights: bool = True) -> Path:
    """Check an nnU-Net results folder and return the model directory inside it.

    Accepts the model directory itself (``dataset.json``, ``plans.json``, ``fold_*/checkpoint_final.pth``)
    or a folder above it with exactly one such directory within two levels (e.g. an
    ``nnUNet_results/DatasetXXX_*`` folder). Checks labels {0, 1, 2}, one input channel, a network
    class from ``dynamic_network_architectures`` and, with ``check_weights``, that every checkpoint
    loads without pickle and has network weights. Raises a one-line ``IchfedError`` otherwise.
    """
    root = Path(path)
    if not root.is_dir():
        raise IchfedError(f"{root}: nnU-Net model folder not found")
    model = _locate_model_dir(root)
    dataset_json = _read_json(model / "dataset.json")
    plans = _read_json(model / "plans.json")
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or any(not isinstance(v, int) or isinstance(v, bool) for v in labels.values()):
        raise IchfedError(f"{model / 'dataset.json'}: 'labels' must map names to integer labels (region-based models are not supported)")
    if sorted(labels.values()) != [0, 1, 2]:
        raise IchfedError(f"{model / 'dataset.json'}: labels must be 0 background, 1 ICH, 2 PHE, got {labels}")
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(channels, dict) or len(channels) != 1:
        raise IchfedError(f"{model / 'dataset.json'}: expected exactly one input channel (CT), got {channels}")
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in _ARRAY_READERS and reader not in _REORIENT_READERS:
        raise IchfedError(f"{model / 'plans.json'}: image_reader_writer {reader!r} is not supported "
                          f"(use one of {', '.join(sorted(_ARRAY_READERS | set(_REORIENT_READERS)))})")
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or not configurations:
        raise IchfedError(f"{model / 'plans.json'}: no 'configurations'")
    check_plans(plans, model / "plans.json")
    checkpoints = sorted(model.glob(f"fold_*/{CHECKPOINT}"))
    if not checkpoints:
        raise IchfedError(f"{model}: no fold_*/{CHECKPOINT}")
    if check_weights:
        for ckpt in checkpoints:
            meta = _load_checkpoint(ckpt)
            if meta["configuration"] not in configurations:
                raise IchfedError(f"{ckpt}: configuration {meta['configuration']!r} is not in plans.json")
    return model


def _locate_model_dir(root: Path) -> Path:
    def is_model(p: Path) -> bool:
        return (p / "plans.json").is_file() and (p / "dataset.json").is_file() and any(p.glob("fold_*"))

    if is_model(root):
        return root
    found = [p for p in [*root.glob("*/"), *root.glob("*/*/")] if p.is_dir() and is_model(p)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise IchfedError(f"{root}: several nnU-Net model folders inside ({', '.join(str(p.relative_to(root)) for p in found[:3])}); name one")
    missing = [n for n in ("dataset.json", "plans.json") if not (root / n).is_file()]
    if not any(root.glob("fold_*")):
        missing.append("fold_*/")
    raise IchfedError(f"{root}: not an nnU-Net model folder (missing {', '.join(missing)})")


def _numpy_safe_globals() -> list:
    # Exactly what nnU-Net's training logs pickle: numpy scalars (best EMA Dice, losses) and dtypes.
    from numpy import dtypes

    scalar = getattr(getattr(np, "_core", np.core), "multiarray").scalar
    return [scalar, np.dtype, *(getattr(dtypes, n) for n in ("Float16DType", "Float32DType", "Float64DType",
                                                              "Int32DType", "Int64DType", "BoolDType"))]


def _load_checkpoint(path: Path, data: bytes | None = None) -> dict[str, Any]:
    """Read an nnU-Net checkpoint with ``weights_only=True``; return weights and inference metadata.

    ``data``: the checkpoint's bytes, already read and hash-checked (``path`` then only names it).
    """
    import io

    import torch

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            ckpt = torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IchfedError(f"{path}: not loadable without pickle ({reason[:200]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        raise IchfedError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    init_args = ckpt.get("init_args") if isinstance(ckpt.get("init_args"), dict) else {}
    configuration = init_args.get("configuration")
    if not isinstance(configuration, str):
        raise IchfedError(f"{path}: checkpoint does not name its configuration (init_args.configuration)")
    weights = {}
    for k, v in ckpt["network_weights"].items():
        if not isinstance(v, torch.Tensor):
            raise IchfedError(f"{path}: network weight {k!r} is not a tensor")
        # DDP training saves 'module.'-prefixed keys; nnU-Net strips them the same way
        weights[k[7:] if k.startswith("module.") else k] = v
    axes = ckpt.get("inference_allowed_mirroring_axes")
    return {
        "network_weights": weights,
        "trainer_name": str(ckpt.get("trainer_name", "nnUNetTrainer")),
        "configuration": configuration,
        "fold": str(init_args.get("fold", "")),
        "inference_allowed_mirroring_axes": None if axes is None else tuple(int(a) for a in axes),
        "current_epoch": int(ckpt.get("current_epoch", 0)),
    }


def copy_model_folder(src: Path, dst: Path, folds: Sequence[int | str] | None = None) -> Path:
    """Copy a validated nnU-Net model folder to ``dst`` with slim checkpoints (tensors and plain values only).

    The result loads with plain ``torch.load(weights_only=True)`` and is what goes into a bundle.
    ``folds`` limits which ``fold_*`` are copied (default: all). ``dst`` is replaced as a whole.
    """
    import torch

    model = validate_model_folder(src, check_weights=False)
    fold_dirs = sorted(p.parent for p in model.glob(f"fold_*/{CHECKPOINT}"))
    if folds is not None:
        wanted = {f"fold_{f}" for f in folds}
        fold_dirs = [p for p in fold_dirs if p.name in wanted]
        missing = wanted - {p.name for p in fold_dirs}
        if missing:
            raise IchfedError(f"{model}: missing {', '.join(sorted(missing))}/{CHECKPOINT}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        for name in ("dataset.json", "plans.json", "dataset_fingerprint.json", "postprocessing.json"):
            if (model / name).is_file():
                shutil.copyfile(model / name, staging / name)
        for fold_dir in fold_dirs:
            meta = _load_checkpoint(fold_dir / CHECKPOINT)
            slim = {
                "network_weights": {k: v.detach().cpu().contiguous() for k, v in meta["network_weights"].items()},
                "trainer_name": meta["trainer_name"],
                "init_args": {"configuration": meta["configuration"], "fold": meta["fold"]},
                "inference_allowed_mirroring_axes": meta["inference_allowed_mirroring_axes"],
                "current_epoch": meta["current_epoch"],
            }
            (staging / fold_dir.name).mkdir()
            torch.save(slim, staging / fold_dir.name / CHECKPOINT)
        _swap_in(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    validate_model_folder(dst)
    log.info("model folder %s (%s)", dst, ", ".join(p.name for p in fold_dirs))
    return dst


def _read_json(path: Path, raw: bytes | None = None) -> dict:
    if raw is None and not path.is_file():
        raise IchfedError(f"{path}: file not found")
    try:
        data = json.loads(path.read_bytes() if raw is None else raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IchfedError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise IchfedError(f"{path}: expected a JSON object")
    return data


def _verified_reader(model_dir: Path, file_hashes: dict[str, str] | None):
    """``read(rel) -> bytes | None``: the file's bytes checked against ``file_hashes`` (None without hashes)."""

    def read(rel: str) -> bytes | None:
        return None if file_hashes is None else read_verified(model_dir, rel, file_hashes)

    return read


# ----------------------------------------------------------------------------------------------
# inference


class Segmenter:
    """ICH/PHE segmentation of one CT at a time with a trained nnU-Net, in the calling process.

    ``device``: ``auto`` | ``cpu`` | ``cuda`` (via ``shared.device.pick_device``). ``use_mirroring``:
    nnU-Net's mirroring test-time augmentation; default on for CUDA, off on CPU (8x the work).
    ``folds``: which ``fold_*`` to ensemble; default the numbered folds if any, else ``all``.
    ``num_threads``: torch CPU threads during ``predict`` (restored afterwards); default unchanged.
    ``tile_step_size``: nnU-Net's sliding-window step as a fraction of the patch (its default 0.5;
    larger means fewer, less overlapping patches: faster, slightly less accurate at patch borders).
    ``file_hashes``: sha256 by path relative to ``model_dir`` (a bundle's verified manifest); when
    given, dataset.json, plans.json and the checkpoints are read once into memory, checked against
    it and built from those bytes, so a file swapped after verification is refused, not used.
    Thread-safe: concurrent ``predict`` calls are serialised.
    """

    def __init__(self, model_dir: Path, device: str = "auto", use_mirroring: bool | None = None,
                 folds: Sequence[int | str] | None = None, num_threads: int | None = None,
                 tile_step_size: float = 0.5, file_hashes: dict[str, str] | None = None):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        if not 0.0 < float(tile_step_size) <= 1.0:
            raise IchfedError(f"tile_step_size: must be in (0, 1], got {tile_step_size}")
        self.model_dir = validate_model_folder(model_dir, check_weights=False)
        self.device = pick_device(device)
        self.use_mirroring = self.device.type == "cuda" if use_mirroring is None else bool(use_mirroring)
        self.num_threads = num_threads
        self.folds = self._pick_folds(folds)
        self._lock = threading.Lock()
        from .postprocess import FILE_NAME as POSTPROCESSING, read_rule

        read = _verified_reader(self.model_dir, file_hashes)
        # The postprocessing rule changes the labels as much as the weights do, so it is verified
        # like them: a rule file not in the verified manifest is refused (read() raises).
        present = (self.model_dir / POSTPROCESSING).exists() or (file_hashes or {}).get(POSTPROCESSING)
        self.postprocessing = read_rule(self.model_dir, read(POSTPROCESSING) if present else None)
        dataset_json = _read_json(self.model_dir / "dataset.json", read("dataset.json"))
        plans = _read_json(self.model_dir / "plans.json", read("plans.json"))
        check_plans(plans, self.model_dir / "plans.json")  # the bytes used, not the ones validated above
        metas = [_load_checkpoint(self.model_dir / f"fold_{f}" / CHECKPOINT, read(f"fold_{f}/{CHECKPOINT}"))
                 for f in self.folds]
        first = metas[0]
        plans_manager = PlansManager(plans)
        try:
            configuration_manager = plans_manager.get_configuration(first["configuration"])
        except Exception:
            raise IchfedError(f"{self.model_dir / 'plans.json'}: no configuration {first['configuration']!r}") from None
        self.configuration = first["configuration"]
        self.trainer_name = first["trainer_name"]
        self._reader = plans.get("image_reader_writer", "SimpleITKIO")
        n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
        n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        network = _build_network(self.trainer_name, plans_manager, configuration_manager, n_in, n_out)
        for f, meta in zip(self.folds, metas):
            try:
                network.load_state_dict(meta["network_weights"])
            except RuntimeError as e:
                raise IchfedError(f"{self.model_dir}/fold_{f}/{CHECKPOINT}: weights do not fit the network in plans.json "
                                  f"({str(e).splitlines()[0][:160]})") from None
        network.to(self.device).eval()

        # nnU-Net prints its set-up remarks; they belong in the debug log, not on stdout
        with contextlib.redirect_stdout(_LogWriter(log)):
            self._predictor = nnUNetPredictor(
                tile_step_size=float(tile_step_size), use_gaussian=True, use_mirroring=self.use_mirroring,
                perform_everything_on_device=self.device.type == "cuda", device=self.device,
                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
            self._predictor.manual_initialization(
                network, plans_manager, configuration_manager, [m["network_weights"] for m in metas],
                dataset_json, self.trainer_name, first["inference_allowed_mirroring_axes"])
        log.info("nnU-Net segmenter %s (%s, folds %s) on %s, mirroring %s", self.model_dir, self.configuration,
                 ",".join(self.folds), self.device.type, "on" if self.use_mirroring else "off")

    def _pick_folds(self, folds: Sequence[int | str] | None) -> tuple[str, ...]:
        available = sorted(p.parent.name[5:] for p in self.model_dir.glob(f"fold_*/{CHECKPOINT}"))
        if folds is None:
            numbered = [f for f in available if f != "all"]
            return tuple(sorted(numbered, key=int)) if numbered else ("all",)
        chosen = tuple(str(f) for f in folds)
        missing = [f for f in chosen if f not in available]
        if not chosen or missing:
            raise IchfedError(f"folds: {', '.join(missing) or 'none given'} not in {self.model_dir} (available: {', '.join(available)})")
        return chosen

    def predict(self, image: sitk.Image) -> sitk.Image:
        """Segment ``image`` (float HU); return uint8 labels 0/1 ICH/2 PHE with the image's exact geometry.

        The labels are gated to soft tissue, kept inside the intracranial space and postprocessed
        with the model folder's rule (``segment_case`` returns what each step removed).
        """
        return self.segment_case(image).labels

    def segment_case(self, image: sitk.Image) -> Segmentation:
        """``predict`` plus the intracranial mask and the volume it removed (``Segmentation``)."""
        from .intracranial import intracranial_mask, restrict_labels, voxel_ml
        from .postprocess import apply_rule

        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise IchfedError(f"image: expected a 3D single-channel CT, got {image.GetDimension()}D with "
                              f"{image.GetNumberOfComponentsPerPixel()} component(s)")
        work = image
        orientation = _REORIENT_READERS.get(self._reader)
        if orientation is not None:
            work = sitk.DICOMOrient(image, orientation)
        array = sitk.GetArrayFromImage(work).astype(np.float32, copy=False)[None]
        properties = {
            "spacing": [abs(s) for s in work.GetSpacing()[::-1]],
            "sitk_stuff": {"spacing": work.GetSpacing(), "origin": work.GetOrigin(), "direction": work.GetDirection()},
        }
        with self._lock, _torch_threads(self.num_threads):
            seg = self._predictor.predict_single_npy_array(array, properties)
        seg = gate_soft_tissue(np.asarray(seg).astype(np.uint8, copy=False), array[0])
        # Hemorrhage is intracranial: muscle and scalp at blood density are the demo model's
        # commonest error, and a crop centred on them is meaningless.
        inside = intracranial_mask(work)
        # No skull in the image (skull-stripped or cropped input): the mask cannot be trusted, so
        # the labels are kept and the case is flagged (quality "no_intracranial_mask") instead.
        found = inside.volume_ml >= MIN_INTRACRANIAL_ML
        removed = 0
        if found:
            seg, removed = restrict_labels(seg, sitk.GetArrayViewFromImage(inside.mask))
        seg = apply_rule(seg, self.postprocessing, voxel_ml(work))
        labels = _like(seg, work, image, orientation)
        mask = _like(sitk.GetArrayFromImage(inside.mask), work, image, orientation)
        return Segmentation(labels=labels, intracranial=mask, extracranial_ml_removed=removed * voxel_ml(work),
                            postprocessing=self.postprocessing.name, intracranial_found=found)


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """One case's labels and what was removed on the way (``Segmenter.segment_case``)."""

    labels: sitk.Image
    intracranial: sitk.Image
    extracranial_ml_removed: float
    postprocessing: str
    intracranial_found: bool = True  # False: no skull found, labels not restricted


# Less intracranial space than this (an adult's is 1200-1700 ml; a scan cut at the vertex or the
# skull base still holds several hundred) means no skull was found.
MIN_INTRACRANIAL_ML = 100.0


def _like(array: np.ndarray, work: sitk.Image, image: sitk.Image, orientation: str | None) -> sitk.Image:
    """A uint8 array on ``work``'s grid back on ``image``'s grid (undoing the reorientation)."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    out.CopyInformation(work)
    if orientation is not None:
        original = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        out = sitk.DICOMOrient(out, original)
    out.CopyInformation(image)
    return out


# Blood and edema are soft tissue. A label on air or bone is always a model error (seen on
# unfamiliar scanners as speckle of "PHE" in the air around the head), so it is removed before
# anything is measured. The window is wide enough for acute clot (up to ~100 HU) plus noise.
SOFT_TISSUE_HU = (-100.0, 200.0)


def gate_soft_tissue(labels: np.ndarray, hu: np.ndarray, window: tuple[float, float] = SOFT_TISSUE_HU) -> np.ndarray:
    """Set labels to background wherever the CT is outside the soft-tissue HU ``window``."""
    outside = (hu < window[0]) | (hu > window[1])
    if outside.any():
        labels = labels.copy()
        labels[outside] = 0
    return labels


def _build_network(trainer_name: str, plans_manager, configuration_manager, n_in: int, n_out: int):
    """The network in ``plans.json`` built from the allow-listed classes (``shared.model_policy``).

    Never through nnU-Net's ``build_network_architecture``: it resolves plan strings with
    ``pydoc.locate``. Our trainers and most nnU-Net variants change only training;
    ``nnUNetTrainerBN*`` swaps in batch norm, done here the same way. Any other variant that
    changes the network fails at ``load_state_dict`` with a clear message.
    """
    del plans_manager  # kept in the signature for callers (benchmarks) that pass it
    return build_network(configuration_manager, n_in, n_out, batch_norm=trainer_name.startswith("nnUNetTrainerBN"))


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _LogWriter:
    """A file-like sink for nnU-Net's ``print`` output during set-up: lines go to the DEBUG log."""

    def __init__(self, logger: logging.Logger):
        self._logger = logger

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self._logger.debug("nnU-Net: %s", line)
        return len(text)

    def flush(self) -> None:
        pass
