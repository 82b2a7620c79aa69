"""Site adaptation beyond the paper's last layer, all of it kept at the site (issue #14).

- **Local normalisation statistics** (AdaBN/FedBN, ``shared.models.batchnorm_stats``): the classifier
  backbone's BatchNorm running mean and variance are re-estimated on the site's own crops (the
  fine-tune split plus, optionally, the unlabelled cases; never the held-out split) and every
  embedding at the site uses them. They are kept in the site overlay, never sent.
- **Unlabelled cases** (empty label in ``cases.csv``) only feed those statistics.
- **A regularised head**: the FedProx proximal term toward the received global head and early
  stopping by inner folds (``client.finetune.local_update``).
- **The converged fit** (``head_fit = "converged"``, issue #20): instead of the paper's fixed
  Adam epochs, the head that minimises NLL + lambda/2 ||theta - theta_received||^2 with lambda
  chosen by inner folds (``client.head_fit``); the proximal term, epochs, learning rate, batch size
  and early stopping do not apply to it. With local statistics on, this is "AdaBN + head refit":
  the features are re-normalised at the site and the head is refitted to them to convergence.

Each is switched in the site config (``local_norm_stats``, ``unlabelled_for_norm_stats``,
``proximal_mu`` = 0, ``early_stopping``, ``head_fit``); with the first four off and ``head_fit =
"paper"`` a site runs the paper's plain last-layer fine-tuning. ``settings(config)`` reads the
switches from any config object that has them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """The site's adaptation switches (defaults: all on, the paper's head training; ``paper()``: all off)."""

    local_norm_stats: bool = True
    unlabelled_for_norm_stats: bool = True
    proximal_mu: float = 1.0
    early_stopping: bool = True
    head_fit: str = "paper"  # "paper": Adam for a number of epochs; "converged": client.head_fit

    @classmethod
    def paper(cls) -> "Adaptation":
        """The paper's plain last-layer fine-tuning: bundle statistics, no proximal term, fixed epochs."""
        return cls(local_norm_stats=False, unlabelled_for_norm_stats=False, proximal_mu=0.0, early_stopping=False)


def settings(config: Any) -> Adaptation:
    """The switches of a site config (fields of the same names; missing ones keep their defaults)."""
    names = [f.name for f in dataclasses.fields(Adaptation)]
    return Adaptation(**{n: getattr(config, n) for n in names if hasattr(config, n)})


def stats_crops(crops: dict[str, np.ndarray | None], fine_tune: Sequence[str], unlabelled: Sequence[str],
                use_unlabelled: bool) -> list[np.ndarray]:
    """The crops the site's statistics are estimated on (those of :func:`stats_case_ids`)."""
    return [crops[c] for c in stats_case_ids(crops, fine_tune, unlabelled, use_unlabelled)]


def stats_case_ids(crops: dict[str, np.ndarray | None], fine_tune: Sequence[str], unlabelled: Sequence[str],
                   use_unlabelled: bool) -> list[str]:
    """The cases the site's statistics are estimated on: fine-tune cases (and unlabelled ones when
    ``use_unlabelled``) with a segmented lesion. Held-out cases are never passed in."""
    ids = list(fine_tune) + (list(unlabelled) if use_unlabelled else [])
    return [c for c in ids if crops.get(c) is not None]


def site_norm_stats(bundle, crops: list[np.ndarray], device: str = "cpu"):
    """``NormStats`` of the bundle's backbone on ``crops``; None when there are fewer than two."""
    from shared.models import batchnorm_stats
    from shared.models.classifier import backbone_and_head

    if len(crops) < batchnorm_stats.MIN_BATCH:
        log.warning("local normalisation statistics need at least %d crops, got %d; using the bundle's",
                    batchnorm_stats.MIN_BATCH, len(crops))
        return None
    backbone, _ = backbone_and_head(bundle.build_classifier("cpu").eval())
    return batchnorm_stats.estimate(backbone, np.stack(crops).astype(np.float32), device)


def embed_with(bundle, stats, crops: np.ndarray, device: str = "cpu") -> np.ndarray:
    """(N, 512) features of ``crops`` from the bundle's backbone with the site's ``stats`` applied."""
    from shared.models import batchnorm_stats
    from shared.models.classifier import backbone_and_head, embed

    backbone, _ = backbone_and_head(bundle.build_classifier("cpu").eval())
    batchnorm_stats.apply(backbone, stats, where="site norm stats")
    if len(crops) == 0:
        return np.zeros((0, 512), np.float32)
    return embed(backbone, np.asarray(crops, np.float32), device)


def local_update(adaptation: Adaptation, head, features: np.ndarray, labels: np.ndarray, *, epochs: int,
                 learning_rate: float, batch_size: int, seed: int, device: str = "cpu"):
    """The site's training of ``head`` under its switches: ``client.finetune.local_update`` (the
    paper's recipe; ``epochs`` is the most it trains, early stopping may choose fewer) or, with
    ``head_fit = "converged"``, ``client.head_fit.converged_update`` (a ``HeadTrainResult`` whose
    ``loss`` is the training NLL and ``epochs`` the Newton iterations)."""
    from .finetune import HeadTrainResult
    from .finetune import local_update as update

    if adaptation.head_fit == "converged":
        from .head_fit import converged_update

        fit = converged_update(head, np.asarray(features, np.float32), np.asarray(labels, np.int64), seed=seed)
        return HeadTrainResult(head=fit.head, loss=fit.nll if len(labels) else float("nan"), epochs=fit.iterations)

    return update(head, features, labels, max_epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                  seed=seed, device=device, proximal_mu=adaptation.proximal_mu,
                  early_stopping=adaptation.early_stopping)


def adapted_features(bundle, crops: dict[str, np.ndarray | None], fine_tune: Sequence[str],
                     unlabelled: Sequence[str], adaptation: Adaptation, device: str = "cpu", *,
                     cache=None, keys: dict[str, str] | None = None):
    """``({case_id: features}, NormStats)`` of every case with a crop, embedded with the site's own
    statistics (estimated on ``stats_crops``); ``({}, None)`` when local statistics are off or too
    few crops. Held-out cases are embedded with them but never contribute to them.

    With ``cache`` (a ``client.cache.AdaptedCache``) and ``keys`` (each case's cache key), the
    statistics of the same cases and the features already embedded under them are reused.
    """
    if not adaptation.local_norm_stats:
        return {}, None
    stats_ids = stats_case_ids(crops, fine_tune, unlabelled, adaptation.unlabelled_for_norm_stats)
    digest = None
    if cache is not None and keys is not None:
        digest = cache.digest(bundle.hash, bundle.crop_spec.key(), [keys[c] for c in stats_ids])
    stats = cache.stats(digest) if digest else None
    if stats is None:
        stats = site_norm_stats(bundle, [crops[c] for c in stats_ids], device)
        if stats is None:
            return {}, None
        if digest:
            cache.put_stats(digest, stats)
    ids = [c for c, crop in crops.items() if crop is not None]
    feats = {c: cache.features(digest, keys[c]) for c in ids} if digest else {}
    todo = [c for c in ids if feats.get(c) is None]
    if todo:
        new = embed_with(bundle, stats, np.stack([crops[c] for c in todo]), device)
        for c, f in zip(todo, new):
            feats[c] = f
            if digest:
                cache.put_features(digest, keys[c], f)
    log.info("local normalisation statistics from %d crops; %d cases re-embedded, %d from the cache",
             stats.n_cases, len(todo), len(ids) - len(todo))
    return {c: feats[c] for c in ids}, stats
