"""The 3D ResNet-34 classifier: model, backbone/head split, training, weights I/O.

The model is MONAI's ``resnet34(spatial_dims=3, n_input_channels=1, num_classes=2)``. It reads
the lesion-masked crop as a tensor of shape (N, 1, z, y, x) and, through ``log_probs``, gives
log-softmax scores for class 0 (non-neoplastic) and class 1 (neoplastic), as in the paper
(NLL loss on log-softmax outputs, threshold on the log-probability of the positive class).

Federated sites never train the backbone: ``backbone_and_head`` splits the model into the
frozen feature extractor (everything up to the global-pooled 512-d vector) and the final
``nn.Linear(512, 2)`` (MONAI's ``fc``). The two share parameters with the model they came from,
so training the head trains the model's ``fc``.

Weights are stored only as safetensors (no pickle).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .atomic import atomic_path, write_json
from .errors import IchfedError

if TYPE_CHECKING:  # torch is heavy; import it only where it is used
    import torch
    from torch import nn

log = logging.getLogger(__name__)

N_FEATURES = 512
N_CLASSES = 2


# ----------------------------------------------------------------------------- model


def build_model():
    """A freshly initialised MONAI 3D ResNet-34 with one input channel and two outputs.

    The network ends in adaptive average pooling, so any crop size of at least ~16 voxels
    per axis works; the paper's crop is (z, y, x) = (20, 200, 200).
    """
    from monai.networks.nets import resnet34

    return resnet34(spatial_dims=3, n_input_channels=1, num_classes=N_CLASSES)


def _backbone_class():
    from torch import nn

    class Backbone(nn.Module):
        """MONAI ResNet up to (and including) the global average pool, flattened to (N, 512).

        It holds the very submodules of the model it was split from, so the two stay in sync.
        """

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.conv1 = model.conv1
            self.bn1 = model.bn1
            self.act = model.act
            self.no_max_pool = model.no_max_pool
            self.maxpool = model.maxpool
            self.layer1 = model.layer1
            self.layer2 = model.layer2
            self.layer3 = model.layer3
            self.layer4 = model.layer4
            self.avgpool = model.avgpool

        def forward(self, x):
            # Mirrors monai.networks.nets.ResNet.forward minus the final fc.
            x = self.act(self.bn1(self.conv1(x)))
            if not self.no_max_pool:
                x = self.maxpool(x)
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.avgpool(x)
            return x.view(x.size(0), -1)

    return Backbone


def backbone_and_head(model) -> tuple[nn.Module, nn.Linear]:
    """Split ``model`` into (backbone producing (N, 512) features, head = ``model.fc``).

    Both share parameters with ``model``; ``head(backbone(x)) == model(x)``.
    """
    from torch import nn

    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear) or fc.in_features != N_FEATURES or fc.out_features != N_CLASSES:
        raise IchfedError("classifier: model must be a MONAI ResNet with fc = Linear(512, 2)")
    return _backbone_class()(model), fc


def log_probs(head, features) -> torch.Tensor:
    """Log-softmax class scores (N, 2) from the head applied to (N, 512) features.

    ``features`` may be a tensor or a numpy array; the result lives on the head's device.
    """
    import torch

    if not isinstance(features, torch.Tensor):
        features = torch.as_tensor(np.asarray(features, dtype=np.float32))
    features = features.to(next(head.parameters()).device, dtype=torch.float32)
    return torch.log_softmax(head(features), dim=1)


def p_neoplastic(head, features) -> np.ndarray:
    """Probability of the neoplastic class (N,) as a float64 numpy array (no gradient)."""
    import torch

    with torch.no_grad():
        lp = log_probs(head, features)[:, 1]
    return np.exp(lp.double().cpu().numpy())


def model_log_probs(model, x) -> torch.Tensor:
    """Log-softmax scores (N, 2) of the full model on an (N, 1, z, y, x) tensor."""
    import torch

    return torch.log_softmax(model(x), dim=1)


def _as_batch_tensor(crops: np.ndarray, device):
    import torch

    arr = np.asarray(crops, dtype=np.float32)
    if arr.ndim != 4:
        raise IchfedError(f"crops: expected an array of shape (N, z, y, x), got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(1).to(device)


def embed(backbone, crops: np.ndarray, device, batch_size: int = 8) -> np.ndarray:
    """Compute (N, 512) float32 features for crops of shape (N, z, y, x), without gradients.

    The backbone is put in eval mode (BatchNorm uses its running statistics), so a case's
    features do not depend on which other cases share its batch.
    """
    import torch
    from tqdm import tqdm

    arr = np.asarray(crops, dtype=np.float32)
    if arr.ndim != 4:
        raise IchfedError(f"crops: expected an array of shape (N, z, y, x), got shape {arr.shape}")
    if batch_size < 1:
        raise IchfedError(f"batch_size: must be at least 1, got {batch_size}")
    backbone = backbone.to(device).eval()
    out = np.empty((arr.shape[0], N_FEATURES), dtype=np.float32)
    starts = range(0, arr.shape[0], batch_size)
    with torch.no_grad():
        for s in tqdm(starts, desc="embed", unit="batch", disable=None if len(starts) > 1 else True, leave=False):
            x = _as_batch_tensor(arr[s : s + batch_size], device)
            out[s : s + x.shape[0]] = backbone(x).float().cpu().numpy()
    return out


def predict_log_probs(model, crops: np.ndarray, device, batch_size: int = 8) -> np.ndarray:
    """Log-softmax scores (N, 2) of the full model on crops (N, z, y, x), eval mode, no gradient."""
    import torch

    model = model.to(device).eval()
    arr = np.asarray(crops, dtype=np.float32)
    out = np.empty((arr.shape[0], N_CLASSES), dtype=np.float64)
    with torch.no_grad():
        for s in range(0, arr.shape[0], batch_size):
            x = _as_batch_tensor(arr[s : s + batch_size], device)
            out[s : s + x.shape[0]] = model_log_probs(model, x).double().cpu().numpy()
    return out


def predict_proba(model, crops: np.ndarray, device="auto", batch_size: int = 8) -> np.ndarray:
    """p(neoplastic) (N,) float64 of the full model on crops (N, z, y, x), eval mode, no gradient."""
    from .device import pick_device

    dev = pick_device(device) if isinstance(device, str) else device
    return np.exp(predict_log_probs(model, crops, dev, batch_size)[:, 1])


# ----------------------------------------------------------------------------- weights I/O


def save_weights(module_or_state_dict, path: str | Path) -> None:
    """Write a module's (or a state dict's) tensors to ``path`` as safetensors, atomically."""
    from safetensors.torch import save_file

    state = module_or_state_dict.state_dict() if hasattr(module_or_state_dict, "state_dict") else module_or_state_dict
    # safetensors refuses shared or non-contiguous storage; BatchNorm buffers are tiny, copies are cheap.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        # One metadata key only: safetensors writes several in random order, and a site must be
        # able to rebuild a derived bundle's weights byte for byte (shared.transport).
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def load_weights(path: str | Path, data: bytes | None = None) -> dict[str, Any]:
    """Read a safetensors file into a CPU state dict; a missing or corrupt file is an IchfedError.

    ``data``: the file's bytes, already read and hash-checked (``path`` then only names it in errors).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    p = Path(path)
    if data is None and not p.is_file():
        raise IchfedError(f"{p}: weights file not found")
    try:
        return load_file(str(p), device="cpu") if data is None else load(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise IchfedError(f"{p}: not a valid safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def load_classifier(path: str | Path, device="cpu", data: bytes | None = None):
    """Build the ResNet-34 and load weights from a safetensors file (strict), in eval mode.

    ``data``: the file's verified bytes (see ``load_weights``).
    """
    state = load_weights(path, data)
    model = build_model()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise IchfedError(f"{path}: weights do not fit the 3D ResNet-34 classifier ({first} {detail})".strip()) from None
    return model.to(device).eval()


# ----------------------------------------------------------------------------- training config


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


@dataclasses.dataclass(frozen=True)
class ClassifierTrainConfig:
    """Hyper-parameters for training the reference classifier.

    ``paper()`` gives the published setting: 182 epochs, batch 64, Adam, lr 2.96e-4, NLL loss,
    batchgenerators augmentation. ``demo()`` and ``ci()`` are short runs for laptops and tests.
    ``keep`` chooses the returned weights: the last epoch (the paper reports a fixed epoch
    count) or the epoch with the lowest validation loss. ``precise_batchnorm`` re-estimates
    the BatchNorm running statistics on (a seeded subset of ``batchnorm_samples``) unaugmented
    training crops after every epoch;
    after only a few dozen optimiser steps the running averages still lag the weights, and
    eval-mode predictions are then far off, so the short profiles turn it on.
    """

    epochs: int = dataclasses.field(default=182, metadata={"range": (1, 100_000)})
    batch_size: int = dataclasses.field(default=64, metadata={"range": (1, 4096)})
    learning_rate: float = dataclasses.field(default=2.96e-4, metadata={"range": (1e-8, 1.0)})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"range": (0.0, 1.0)})
    eval_batch_size: int = dataclasses.field(default=8, metadata={"range": (1, 4096)})
    keep: Literal["last", "best_val_loss"] = "last"
    precise_batchnorm: bool = False
    # Running statistics of a few batches are as good as those of hundreds of crops, and cheaper.
    batchnorm_samples: int = dataclasses.field(default=128, metadata={"range": (2, 1_000_000)})
    augmentation: AugmentationConfig = dataclasses.field(default_factory=AugmentationConfig)

    @classmethod
    def paper(cls) -> ClassifierTrainConfig:
        """The setting reported by Nawabi et al."""
        return cls()

    @classmethod
    def demo(cls) -> ClassifierTrainConfig:
        """A short run on a CPU: five epochs over a few hundred reduced crops (32 x 32 x 20).

        Sized by the recipe sweep (``benchmarks/bench_classifier_recipes.py``) to what two CPU
        cores afford in the demo's 15 minutes. At the paper's 200 x 200 x 20 crop one CPU training
        step at batch 8 takes about 45 s; use a GPU there (an H100 does a batch-64 step in 0.85 s).
        """
        return cls(epochs=5, batch_size=8, learning_rate=1e-3, keep="best_val_loss", precise_batchnorm=True)

    @classmethod
    def ci(cls) -> ClassifierTrainConfig:
        """Seconds on a CI CPU with tiny crops; augmentation off so the easy signal is learnt fast."""
        return cls(
            epochs=4,
            batch_size=8,
            learning_rate=1e-3,
            keep="best_val_loss",
            precise_batchnorm=True,
            augmentation=AugmentationConfig(enabled=False),
        )

    @classmethod
    def profile(cls, name: str) -> ClassifierTrainConfig:
        """``paper``, ``demo`` or ``ci``."""
        profiles = {"paper": cls.paper, "demo": cls.demo, "ci": cls.ci}
        if name not in profiles:
            raise IchfedError(f"profile: must be one of {', '.join(map(repr, profiles))}, got {name!r}")
        return profiles[name]()


@dataclasses.dataclass
class TrainResult:
    """A trained model (eval mode, CPU), its per-epoch history and the validation threshold."""

    model: Any
    history: list[dict[str, Any]]
    threshold: Any  # shared.metrics.Threshold (p, log_p, sensitivity, specificity)
    seed: int = 0


# ----------------------------------------------------------------------------- augmentation


def _build_augmenter(cfg: AugmentationConfig, crop_zyx: tuple[int, int, int]):
    """The batchgenerators transform chain for batches {'data': (B,1,z,y,x), 'seg': (B,1,z,y,x)}."""
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import (
        BrightnessMultiplicativeTransform,
        ContrastAugmentationTransform,
    )
    from batchgenerators.transforms.noise_transforms import GaussianNoiseTransform
    from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

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


# ----------------------------------------------------------------------------- training


def recalibrate_batchnorm(model, crops: np.ndarray, device, batch_size: int) -> None:
    """Replace every BatchNorm's running mean/variance by their average over ``crops``.

    Runs the model in train mode without gradients, with cumulative averaging (momentum None),
    then restores each layer's momentum. Weights are untouched.
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    try:
        with torch.no_grad():
            for s in range(0, len(crops), batch_size):
                chunk = crops[s : s + batch_size]
                if len(chunk) < 2:  # batch statistics of one case are degenerate
                    continue
                model(_as_batch_tensor(chunk, device))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.eval()


def _check_inputs(crops: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    crops = np.asarray(crops, dtype=np.float32)
    labels = np.asarray(labels)
    if crops.ndim != 4:
        raise IchfedError(f"{what}_crops: expected shape (N, z, y, x), got {crops.shape}")
    if labels.shape != (crops.shape[0],):
        raise IchfedError(f"{what}_labels: expected {crops.shape[0]} labels, got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise IchfedError(f"{what}_labels: must be 0 (non-neoplastic) or 1 (neoplastic)")
    return crops, labels.astype(np.int64)


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, p))


def train_classifier(
    train_crops: np.ndarray,
    train_labels: np.ndarray,
    val_crops: np.ndarray,
    val_labels: np.ndarray,
    cfg: ClassifierTrainConfig,
    device="auto",
    seed: int = 0,
) -> TrainResult:
    """Train the ResNet-34 from scratch on lesion-masked crops (N, z, y, x) with Adam + NLL loss.

    After each epoch the validation loss and AUC are recorded; the returned model is the last
    epoch's or the lowest-validation-loss epoch's (``cfg.keep``). The decision threshold is the
    one maximising sensitivity × specificity on the validation set (``shared.metrics``).
    The global numpy and torch random states are restored on return. Training runs with
    deterministic kernels and a fixed thread count (``shared.determinism``), so the same inputs,
    config and seed give bit-identical weights on the same machine.
    """
    import copy

    import torch
    from tqdm import tqdm

    from .determinism import deterministic_training
    from .device import pick_device
    from .metrics import best_threshold

    tr_x, tr_y = _check_inputs(train_crops, train_labels, "train")
    va_x, va_y = _check_inputs(val_crops, val_labels, "val")
    if tr_x.shape[1:] != va_x.shape[1:]:
        raise IchfedError(f"val_crops: shape {va_x.shape[1:]} differs from train_crops {tr_x.shape[1:]}")
    if len(np.unique(va_y)) < 2:
        raise IchfedError("val_labels: need both classes to choose a threshold")
    dev = device if not isinstance(device, str) else pick_device(device)
    rng = np.random.default_rng(seed)

    # batchgenerators draws from the global numpy RNG and from Python's ``random`` (noise,
    # contrast and spatial transforms); seed both and restore them afterwards.
    np_state = np.random.get_state()
    py_state = random.getstate()
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices), deterministic_training():
            torch.manual_seed(seed)
            np.random.seed(seed % (2**32))
            random.seed(seed)
            model = build_model().to(dev)
            opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
            loss_fn = torch.nn.NLLLoss()
            augmenter = _build_augmenter(cfg.augmentation, tuple(tr_x.shape[1:])) if cfg.augmentation.enabled else None
            history: list[dict[str, Any]] = []
            best_state, best_loss = None, math.inf
            n_batches = math.ceil(len(tr_x) / cfg.batch_size)
            bn_idx = np.sort(rng.permutation(len(tr_x))[: cfg.batchnorm_samples])
            for epoch in tqdm(range(1, cfg.epochs + 1), desc="train classifier", unit="epoch", disable=None):
                model.train()
                order = rng.permutation(len(tr_x))
                total, seen = 0.0, 0
                for b in range(n_batches):
                    idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                    # BatchNorm cannot normalise a batch of one in training mode.
                    if len(idx) < 2:
                        continue
                    xb = tr_x[idx]
                    if augmenter is not None:
                        xb = augment_batch(augmenter, xb)
                    x = _as_batch_tensor(xb, dev)
                    y = torch.from_numpy(tr_y[idx]).to(dev)
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model_log_probs(model, x), y)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                    seen += len(idx)
                if cfg.precise_batchnorm:
                    recalibrate_batchnorm(model, tr_x[bn_idx], dev, cfg.batch_size)
                lp = predict_log_probs(model, va_x, dev, cfg.eval_batch_size)
                val_loss = float(-lp[np.arange(len(va_y)), va_y].mean())
                row = {
                    "epoch": epoch,
                    "train_loss": total / seen if seen else None,
                    "val_loss": val_loss,
                    "val_auc": _auc(va_y, np.exp(lp[:, 1])),
                }
                history.append(row)
                # Also at INFO: tqdm is silent when stderr is not a terminal (CI, make demo | tee).
                log.info("classifier epoch %d/%d: %s", epoch, cfg.epochs, row)
                if cfg.keep == "best_val_loss" and val_loss < best_loss:
                    best_loss = val_loss
                    best_state = copy.deepcopy(model.state_dict())
            if best_state is not None:
                model.load_state_dict(best_state)
            model.eval()
            p_val = np.exp(predict_log_probs(model, va_x, dev, cfg.eval_batch_size)[:, 1])
            threshold = best_threshold(va_y, p_val)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    log.info(
        "classifier trained: %d epochs, final val_loss %.4f, val_auc %s, threshold p=%.4f",
        cfg.epochs,
        history[-1]["val_loss"],
        history[-1]["val_auc"],
        threshold.p,
    )
    return TrainResult(model=model.cpu(), history=history, threshold=threshold, seed=seed)


# ----------------------------------------------------------------------------- curves


def save_history(history: list[dict[str, Any]], json_path: str | Path) -> None:
    """Write the per-epoch history as JSON, atomically."""
    write_json(json_path, {"history": history})


def plot_history(history: list[dict[str, Any]], png_path: str | Path) -> None:
    """Plot train/validation loss and validation AUC per epoch to a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]

    def series(key: str) -> list[float]:
        return [math.nan if h.get(key) is None else h[key] for h in history]

    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, series("train_loss"), label="train")
    ax_loss.plot(epochs, series("val_loss"), label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("NLL loss")
    ax_loss.legend()
    ax_auc.plot(epochs, series("val_auc"), color="tab:green")
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("validation AUC")
    ax_auc.set_ylim(0.0, 1.0)
    fig.tight_layout()
    try:
        with atomic_path(png_path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
