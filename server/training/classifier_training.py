"""Training the reference classifier from scratch (the bootstrap's job, never a site's).

``ClassifierTrainConfig`` is the typed recipe (``paper``/``demo``/``ci``); ``train_classifier``
runs Adam + NLL on lesion-masked crops with the augmentation of ``server.training.classifier_augment``,
records per-epoch validation loss and AUC, and returns a ``ClassifierTrainResult`` with the
validation threshold. The model and its weights I/O are ``shared.models.classifier``'s.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
from typing import Any, Iterator, Literal

import numpy as np

from server.training.classifier_augment import (
    AugmentationConfig,
    augment_batch,
    build_augmenter,
)
from shared.models.classifier import (
    as_batch_tensor,
    build_model,
    model_log_probs,
    predict_log_probs,
)
from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)


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
    eval-mode predictions are then far off, so the short recipes turn it on.
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
    def named(cls, name: str) -> ClassifierTrainConfig:
        """The recipe ``paper``, ``demo`` or ``ci``."""
        recipes = {"paper": cls.paper, "demo": cls.demo, "ci": cls.ci}
        if name not in recipes:
            raise IchfedError(f"classifier recipe: must be one of {', '.join(map(repr, recipes))}, got {name!r}")
        return recipes[name]()




@dataclasses.dataclass
class ClassifierTrainResult:
    """A trained model (eval mode, CPU), its per-epoch history and the validation threshold."""

    model: Any
    history: list[dict[str, Any]]
    threshold: Any  # shared.evaluation.metrics.Threshold (p, log_p, sensitivity, specificity)
    seed: int = 0


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


@contextlib.contextmanager
def _seeded(seed: int, device) -> Iterator[None]:
    """Seed torch, numpy's and Python's global generators for a training run, with deterministic
    kernels (``shared.plumbing.determinism``), and restore all of them on exit.

    batchgenerators draws from the global numpy RNG and from Python's ``random`` (noise,
    contrast and spatial transforms), so both are seeded, not only torch.
    """
    import torch

    from shared.plumbing.determinism import deterministic_training

    np_state, py_state = np.random.get_state(), random.getstate()
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices), deterministic_training():
            torch.manual_seed(seed)
            np.random.seed(seed % (2**32))
            random.seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _train_epoch(model, opt, tr_x: np.ndarray, tr_y: np.ndarray, order: np.ndarray, cfg: ClassifierTrainConfig,
                 augmenter, device) -> float | None:
    """One pass over the training crops in ``order``; the mean training loss (None if no batch ran)."""
    import torch

    model.train()
    loss_fn = torch.nn.NLLLoss()
    total, seen = 0.0, 0
    for b in range(math.ceil(len(tr_x) / cfg.batch_size)):
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        if len(idx) < 2:  # BatchNorm cannot normalise a batch of one in training mode
            continue
        xb = tr_x[idx] if augmenter is None else augment_batch(augmenter, tr_x[idx])
        x = as_batch_tensor(xb, device)
        y = torch.from_numpy(tr_y[idx]).to(device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model_log_probs(model, x), y)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
    return total / seen if seen else None


def _validate(model, va_x: np.ndarray, va_y: np.ndarray, device, cfg: ClassifierTrainConfig) -> tuple[float, float | None]:
    """Validation NLL and AUC of the model in eval mode."""
    lp = predict_log_probs(model, va_x, device, cfg.eval_batch_size)
    return float(-lp[np.arange(len(va_y)), va_y].mean()), _auc(va_y, np.exp(lp[:, 1]))


def train_classifier(
    train_crops: np.ndarray,
    train_labels: np.ndarray,
    val_crops: np.ndarray,
    val_labels: np.ndarray,
    cfg: ClassifierTrainConfig,
    device="auto",
    seed: int = 0,
) -> ClassifierTrainResult:
    """Train the ResNet-34 from scratch on lesion-masked crops (N, z, y, x) with Adam + NLL loss.

    After each epoch the validation loss and AUC are recorded; the returned model is the last
    epoch's or the lowest-validation-loss epoch's (``cfg.keep``). The decision threshold is the
    one maximising sensitivity × specificity on the validation set (``shared.evaluation.metrics``).
    The global numpy and torch random states are restored on return. Training runs with
    deterministic kernels and a fixed thread count (``shared.plumbing.determinism``), so the same inputs,
    config and seed give bit-identical weights on the same machine.
    """
    import torch
    from tqdm import tqdm

    from shared.evaluation.metrics import best_threshold
    from shared.models.batchnorm_stats import reestimate
    from shared.plumbing.device import pick_device

    tr_x, tr_y = _check_inputs(train_crops, train_labels, "train")
    va_x, va_y = _check_inputs(val_crops, val_labels, "val")
    if tr_x.shape[1:] != va_x.shape[1:]:
        raise IchfedError(f"val_crops: shape {va_x.shape[1:]} differs from train_crops {tr_x.shape[1:]}")
    if len(np.unique(va_y)) < 2:
        raise IchfedError("val_labels: need both classes to choose a threshold")
    dev = device if not isinstance(device, str) else pick_device(device)
    rng = np.random.default_rng(seed)
    with _seeded(seed, dev):
        model = build_model().to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        augmenter = build_augmenter(cfg.augmentation, tuple(tr_x.shape[1:])) if cfg.augmentation.enabled else None
        history: list[dict[str, Any]] = []
        best_state, best_loss = None, math.inf
        bn_idx = np.sort(rng.permutation(len(tr_x))[: cfg.batchnorm_samples])
        for epoch in tqdm(range(1, cfg.epochs + 1), desc="train classifier", unit="epoch", disable=None):
            train_loss = _train_epoch(model, opt, tr_x, tr_y, rng.permutation(len(tr_x)), cfg, augmenter, dev)
            if cfg.precise_batchnorm:
                reestimate(model, tr_x[bn_idx], dev, cfg.batch_size)
            val_loss, val_auc = _validate(model, va_x, va_y, dev, cfg)
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_auc": val_auc}
            history.append(row)
            # Also at INFO: tqdm is silent when stderr is not a terminal (CI, make demo | tee).
            log.info("classifier epoch %d/%d: %s", epoch, cfg.epochs, row)
            if cfg.keep == "best_val_loss" and val_loss < best_loss:
                best_loss, best_state = val_loss, copy.deepcopy(model.state_dict())
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        threshold = best_threshold(va_y, np.exp(predict_log_probs(model, va_x, dev, cfg.eval_batch_size)[:, 1]))
    log.info("classifier trained: %d epochs, final val_loss %.4f, val_auc %s, threshold p=%.4f",
             cfg.epochs, history[-1]["val_loss"], history[-1]["val_auc"], threshold.p)
    return ClassifierTrainResult(model=model.cpu(), history=history, threshold=threshold, seed=seed)
