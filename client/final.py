"""The final reply's four arms, all scored on the same held-out cases of one site.

- ``reference``: the bundle's head at the bundle's threshold (the paper's "before fine-tuning");
- ``reference-site``: the same head at the site's own threshold, chosen on the fine-tune split
  (the reference head never trained on it, so its scores there are out-of-sample);
- ``local``: last-layer fine-tuning on this site alone, thresholded on out-of-fold scores;
- ``federated``: the final federated head, thresholded by the same rule on its fine-tune scores.

Comparing ``reference`` with ``reference-site`` isolates what re-thresholding alone does;
``local`` and ``federated`` against ``reference-site`` isolate training. AUC, which needs no
threshold, is the primary comparison; the paired DeLong differences federated - reference and
federated - local (and local - reference) travel with their variances.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any


from shared import protocol as P

from .calibrate import SiteThreshold, out_of_fold_scores, site_threshold
from .evaluate import arm_metrics, paired_metrics
from .finetune import Head, p_neoplastic, train_head

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FinalArms:
    metrics: dict[str, Any]
    reasons: dict[str, str]
    federated_threshold: SiteThreshold  # kept in the site overlay with the federated bundle


def final_arms(runtime, feats, reference: Head, federated: Head, bundle_threshold: float, rounds: int,
               device: str = "cpu") -> FinalArms:
    """Metrics of the four arms on ``feats.held_out`` plus the paired AUC differences."""
    c = runtime.config
    fine, held = feats.fine_tune, feats.held_out
    min_cases = runtime.min_cases
    # The paper's local-only baseline gets as many epochs as the site trained in the federation.
    train_kw = dict(epochs=rounds * c.local_epochs, learning_rate=c.learning_rate, batch_size=c.batch_size,
                    seed=c.seed * 100_003, device=device)
    local = train_head(reference, fine.features, fine.labels, **train_kw).head

    t_ref_site = site_threshold(fine.labels, p_neoplastic(reference, fine.features), bundle_threshold)
    t_local = site_threshold(fine.labels, out_of_fold_scores(reference, fine.features, fine.labels, **train_kw),
                             bundle_threshold)
    t_fed = site_threshold(fine.labels, p_neoplastic(federated, fine.features), bundle_threshold)

    scores = {P.MODEL_REFERENCE: p_neoplastic(reference, held.features),
              P.MODEL_LOCAL: p_neoplastic(local, held.features),
              P.MODEL_FEDERATED: p_neoplastic(federated, held.features)}
    scores[P.MODEL_REFERENCE_SITE] = scores[P.MODEL_REFERENCE]
    arms = ((P.MODEL_REFERENCE, float(bundle_threshold), None), (P.MODEL_REFERENCE_SITE, t_ref_site.p, t_ref_site.reason),
            (P.MODEL_LOCAL, t_local.p, t_local.reason), (P.MODEL_FEDERATED, t_fed.p, t_fed.reason))
    metrics: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for model, threshold, why in arms:
        m, r = arm_metrics(model, held, scores[model], threshold, min_cases=min_cases, seed=c.seed,
                           threshold_reason=why)
        metrics.update(m), reasons.update(r)
    for model, others in ((P.MODEL_FEDERATED, (P.MODEL_REFERENCE, P.MODEL_LOCAL)), (P.MODEL_LOCAL, (P.MODEL_REFERENCE,))):
        m, r = paired_metrics(model, held.labels, scores[model], {o: scores[o] for o in others}, min_cases=min_cases)
        metrics.update(m), reasons.update(r)
    return FinalArms(metrics=metrics, reasons=reasons, federated_threshold=t_fed)
