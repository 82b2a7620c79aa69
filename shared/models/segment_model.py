"""nnU-Net model folders: checks, slim copies and the network, without pickle.

``validate_model_folder`` checks an nnU-Net results folder (``dataset.json``, ``plans.json``,
``fold_*/checkpoint_final.pth``); ``copy_model_folder`` copies one with slim checkpoints.

Slim checkpoints: nnU-Net's ``checkpoint_final.pth`` holds numpy scalars (training logs, best EMA
Dice) and a ``torch.device``, which plain ``weights_only=True`` refuses. Folders written by
``shared.training.segment_train.train``/``copy_model_folder`` keep only tensors and plain values
(``network_weights``, ``trainer_name``, ``init_args.configuration``/``fold``,
``inference_allowed_mirroring_axes``, ``current_epoch``); they load with plain
``torch.load(weights_only=True)`` and still work with nnU-Net's own ``nnUNetv2_predict``. Foreign
checkpoints are read with ``weights_only=True`` and an allow-list of exactly the numpy scalar/dtype
reconstructors nnU-Net's logs need.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from shared.models.model_policy import build_network, check_plans
from shared.plumbing.errors import IchfedError
from shared.plumbing.files import read_json, staged_dir
from shared.plumbing.verified import read_verified

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint_final.pth"

# Reader/writers whose voxel array for a NIfTI equals sitk.GetArrayFromImage (z, y, x) of the image.
ARRAY_READERS = {"SimpleITKIO", "NibabelIO"}
# nnU-Net reorients to RAS with SimpleITK before prediction; done here the same way.
REORIENT_READERS = {"SimpleITKIOWithReorient": "RAS"}


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
    dataset_json = read_json(model / "dataset.json")
    plans = read_json(model / "plans.json")
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or any(not isinstance(v, int) or isinstance(v, bool) for v in labels.values()):
        raise IchfedError(f"{model / 'dataset.json'}: 'labels' must map names to integer labels (region-based models are not supported)")
    if sorted(labels.values()) != [0, 1, 2]:
        raise IchfedError(f"{model / 'dataset.json'}: labels must be 0 background, 1 ICH, 2 PHE, got {labels}")
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(channels, dict) or len(channels) != 1:
        raise IchfedError(f"{model / 'dataset.json'}: expected exactly one input channel (CT), got {channels}")
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in ARRAY_READERS and reader not in REORIENT_READERS:
        raise IchfedError(f"{model / 'plans.json'}: image_reader_writer {reader!r} is not supported "
                          f"(use one of {', '.join(sorted(ARRAY_READERS | set(REORIENT_READERS)))})")
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or not configurations:
        raise IchfedError(f"{model / 'plans.json'}: no 'configurations'")
    check_plans(plans, model / "plans.json")
    checkpoints = sorted(model.glob(f"fold_*/{CHECKPOINT}"))
    if not checkpoints:
        raise IchfedError(f"{model}: no fold_*/{CHECKPOINT}")
    if check_weights:
        for ckpt in checkpoints:
            meta = load_checkpoint(ckpt)
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


def load_checkpoint(path: Path, data: bytes | None = None) -> dict[str, Any]:
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
    with staged_dir(dst, replace=True, mode=None) as staging:
        for name in ("dataset.json", "plans.json", "dataset_fingerprint.json", "postprocessing.json", "harmonisation.json"):
            if (model / name).is_file():
                shutil.copyfile(model / name, staging / name)
        for fold_dir in fold_dirs:
            meta = load_checkpoint(fold_dir / CHECKPOINT)
            slim = {
                "network_weights": {k: v.detach().cpu().contiguous() for k, v in meta["network_weights"].items()},
                "trainer_name": meta["trainer_name"],
                "init_args": {"configuration": meta["configuration"], "fold": meta["fold"]},
                "inference_allowed_mirroring_axes": meta["inference_allowed_mirroring_axes"],
                "current_epoch": meta["current_epoch"],
            }
            (staging / fold_dir.name).mkdir()
            torch.save(slim, staging / fold_dir.name / CHECKPOINT)
    validate_model_folder(dst)
    log.info("model folder %s (%s)", dst, ", ".join(p.name for p in fold_dirs))
    return dst


def verified_reader(model_dir: Path, file_hashes: dict[str, str] | None):
    """``read(rel) -> bytes | None``: the file's bytes checked against ``file_hashes`` (None without hashes)."""

    def read(rel: str) -> bytes | None:
        return None if file_hashes is None else read_verified(model_dir, rel, file_hashes)

    return read


def network_from_plans(trainer_name: str, plans_manager, configuration_manager, n_in: int, n_out: int):
    """The network in ``plans.json`` built from the allow-listed classes (``shared.models.model_policy``).

    Never through nnU-Net's ``build_network_architecture``: it resolves plan strings with
    ``pydoc.locate``. Our trainers and most nnU-Net variants change only training;
    ``nnUNetTrainerBN*`` swaps in batch norm, done here the same way. Any other variant that
    changes the network fails at ``load_state_dict`` with a clear message.
    """
    del plans_manager  # kept in the signature for callers (benchmarks) that pass it
    return build_network(configuration_manager, n_in, n_out, batch_norm=trainer_name.startswith("nnUNetTrainerBN"))
