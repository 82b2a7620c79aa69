"""The signed bundle that carries the federated head, and the threshold it is signed with.

The threshold is a robust combination of the thresholds the sites chose for this very head in the
last round (each site still keeps and uses its own, in its overlay). A site's vote weighs what
its FedAvg weight weighed: the fine-tune count it reported in training (the ledger's; an
evaluate reply stating another count was already dropped, and one stating none does not vote),
capped at ``max-site-share`` of the votes like a training round. The combination is the weighted
median, so one site, however many cases it claims, cannot set it while it holds at most half the
weight; where a site holds exactly half, the median is an interval and the point of it nearest
the sites' plain median is taken.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from shared.federation import protocol as P
from shared.models.head import Head

from .admission import SiteLedger, as_count, share_capped
from .records import OK, FederatedBundleInfo, RoundRecord
from .settings import ServerSettings

log = logging.getLogger(__name__)

RULE = "weighted median of the site thresholds for this head (weights: fine-tune counts, share-capped)"


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
    """The federated bundle's threshold and the votes it came from (``votes``: site label -> (t, weight))."""

    p: float
    rule: str
    votes: dict[str, tuple[float, float]]


def weighted_median(values: list[float], weights: list[float]) -> float:
    """The weighted median of ``values``; where it is an interval (a value holds exactly half the
    weight), the point of that interval nearest the plain median of ``values``."""
    order = np.argsort(values, kind="stable")
    v = np.asarray(values, np.float64)[order]
    w = np.asarray(weights, np.float64)[order]
    half = w.sum() / 2.0
    cum = np.cumsum(w)
    lower = v[int(np.searchsorted(cum, half - 1e-12 * w.sum()))]  # first value with cumulative weight >= half
    upper = v[int(np.searchsorted(cum, half + 1e-12 * w.sum(), side="right"))] if cum[-1] - half > 0 else lower
    return float(np.clip(np.median(v), min(lower, upper), max(lower, upper)))


def federated_threshold(last: RoundRecord | None, ledger: SiteLedger, max_share: float,
                        fallback: float) -> ThresholdChoice:
    """The threshold for the federated head from the last round's admitted evaluate rows (see the module)."""
    votes: dict[str, tuple[float, float]] = {}
    for row in (last.evaluate if last else []):
        t = row.metric(P.MODEL_GLOBAL, "threshold")
        if row.status != OK or t is None:
            continue
        trained = ledger.counts.get(row.node_id)
        stated = as_count(row.counts.get(P.N_FINE_TUNE))
        if trained is None or stated != trained:
            log.warning("federated threshold: site %s does not vote (fine-tune count %r, %r in training)",
                        row.label, row.counts.get(P.N_FINE_TUNE), trained)
            continue
        votes[row.label] = (float(t), float(trained))
    if not votes:
        return ThresholdChoice(float(fallback), "parent's threshold (no site threshold to combine)", {})
    capped = share_capped({k: w for k, (_, w) in votes.items()}, max_share)
    votes = {k: (t, capped[k]) for k, (t, _) in votes.items()}
    p = weighted_median([t for t, _ in votes.values()], [w for _, w in votes.values()])
    return ThresholdChoice(p, RULE, votes)


def write_federated_bundle(bundle, head: Head, last: RoundRecord | None, ledger: SiteLedger,
                           settings: ServerSettings, tag: str = "federated") -> tuple[object | None, FederatedBundleInfo | None]:
    """Derive and sign the bundle carrying the federated ``head`` (the main head; fold heads serve only
    the sites' thresholds); ``(None, None)`` without a signing key. ``tag`` names its folder
    (``<state_dir>/bundles/<name>-<tag>-<head digest>``): a run with a federated segmenter derives one
    from each segmenter's bundle.

    Returns the loaded bundle (sent to the sites in the final message) and its report record.
    """
    if settings.signing_key is None:
        log.info("no signing-key configured: the federated head stays in the checkpoints, no bundle is written")
        return None, None
    from shared.bundle import derive_bundle, load_bundle

    choice = federated_threshold(last, ledger, settings.max_site_share, float(bundle.threshold.p))
    digest = head.digest()
    out = Path(settings.state_dir) / "bundles" / f"{bundle.manifest.name}-{tag}-{digest[:12]}"
    admitted = [r for r in (last.evaluate if last else []) if r.status == OK]
    lineage = {"federated": {
        "rounds": settings.num_rounds, "n_sites": len(admitted), "sites": sorted(r.site for r in admitted),
        "aggregate_metrics": last.pooled.to_dict() if last and last.pooled else None,
        "threshold": choice.rule, "threshold_votes": {k: list(v) for k, v in choice.votes.items()},
        "head_sha256": digest,
    }}
    if not out.exists():
        # Layout v2: only the head file is new; the parent's other files are linked and checked against its manifest.
        derive_bundle(bundle, out, head, choice.p, version=f"{bundle.manifest.version}+fed{settings.num_rounds}",
                      lineage=lineage, private_key=settings.signing_key)
    new = load_bundle(out, settings.public_key)
    log.info("federated bundle %s written to %s (threshold %.4f, %s)", new.hash[:12], out, new.threshold.p,
             choice.rule)
    return new, FederatedBundleInfo(path=str(out), hash=new.hash, parent_hash=bundle.hash,
                                    threshold=float(new.threshold.p), lineage=dict(new.manifest.lineage))
