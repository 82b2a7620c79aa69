"""The final reply's four arms, all scored on the same held-out cases of one site.

- ``reference``: the bundle's head at the bundle's threshold (the paper's "before fine-tuning");
- ``reference-site``: the same head at the site's own threshold, chosen on the fine-tune split
  (the reference head never trained on it, so its scores there are out-of-sample);
- ``local``: last-layer fine-tuning on this site alone, thresholded on out-of-fold scores;
- ``federated``: the final federated head, thresholded by the same rule on out-of-fold scores of
  its cross-fit fold heads (``client.cross_fit``; in-sample scores when the run has no folds).

Comparing ``reference`` with ``reference-site`` isolates what re-thresholding alone does;
``local`` and ``federated`` against ``reference-site`` isolate training. AUC, which needs no
threshold, is the primary comparison; the paired DeLong differences federated - reference and
federated - local (and local - reference) travel with their variances.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from shared.federation import protocol as P
from shared.models.head import Head

from .calibrate import SiteThreshold, TrainFn, out_of_fold_scores, site_threshold
from .evaluate import arm_metrics, paired_metrics
from .features import SiteFeatures
from .site_config import SiteConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FinalArms:
    """The reply's metrics and reasons; ``labels`` and ``scores`` (per arm) of the held-out cases stay at the site."""

    metrics: dict[str, Any]
    reasons: dict[str, str]
    labels: np.ndarray | None = None
    scores: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def final_arms(config: SiteConfig, feats: SiteFeatures, reference: Head, federated: Head, t_fed: SiteThreshold,
               bundle_threshold: float, train: TrainFn, *, seed: int) -> FinalArms:
    """Metrics of the four arms on ``feats.held_out`` plus the paired AUC differences.

    Parameters
    ----------
    config : the site's config (``min_cases``, ``seed``)
    feats : the site's fine-tune and held-out parts
    reference, federated : the bundle's head and the final federated head
    t_fed : the site's threshold for ``federated`` (``SiteSession.threshold``: out-of-fold with
        cross-fit folds, else on the head's own fine-tune scores)
    bundle_threshold : the bundle's threshold (the reference arm's)
    train : ``train(start, x, y, seed) -> head``, the local-only baseline's training
    seed : the local-only baseline's seed (``client.seeds.round_seed(site seed)``)
    """
    fine, held = feats.fine_tune, feats.held_out
    ref_fine, ref_held = feats.reference_parts  # the bundle as shipped (its own BatchNorm statistics)
    min_cases = config.min_cases
    local = train(reference, fine.features, fine.labels, seed)
    t_ref_site = site_threshold(ref_fine.labels, reference.p_neoplastic(ref_fine.features), bundle_threshold)
    t_local = site_threshold(fine.labels, out_of_fold_scores(reference, fine.features, fine.labels, train, seed=seed),
                             bundle_threshold)

    scores = {P.MODEL_REFERENCE: reference.p_neoplastic(ref_held.features),
              P.MODEL_LOCAL: local.p_neoplastic(held.features),
              P.MODEL_FEDERATED: federated.p_neoplastic(held.features)}
    scores[P.MODEL_REFERENCE_SITE] = scores[P.MODEL_REFERENCE]
    arms = ((P.MODEL_REFERENCE, float(bundle_threshold), None), (P.MODEL_REFERENCE_SITE, t_ref_site.p, t_ref_site.reason),
            (P.MODEL_LOCAL, t_local.p, t_local.reason), (P.MODEL_FEDERATED, t_fed.p, t_fed.reason))
    metrics: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for model, threshold, why in arms:
        m, r = arm_metrics(model, held, scores[model], threshold, min_cases=min_cases, seed=config.seed,
                           threshold_reason=why)
        metrics.update(m), reasons.update(r)
    for model, others in ((P.MODEL_FEDERATED, (P.MODEL_REFERENCE, P.MODEL_LOCAL)), (P.MODEL_LOCAL, (P.MODEL_REFERENCE,))):
        m, r = paired_metrics(model, held.labels, scores[model], {o: scores[o] for o in others}, min_cases=min_cases)
        metrics.update(m), reasons.update(r)
    return FinalArms(metrics=metrics, reasons=reasons, labels=np.asarray(held.labels, np.int64), scores=scores)
