"""No harm at adoption: a delivered federated bundle becomes the site's model only if it is not
clearly worse than the model the site uses now, on the site's own out-of-sample evidence.

The site's model is the **active model** (``<state_dir>/active.json``: bundle hash and path); it is
what ``ichfed predict --site-config`` and the reader load when no ``--bundle`` is given. Before a
run it is the bundle the site was given (the reference); a federated bundle replaces it only here.

The evidence is the site's fine-tune cases scored out of sample: the federated head through its
cross-fit fold heads (each case scored by the fold head that no site trained on that case's fold),
the current model's head as it is (the reference never trained on these cases; an earlier
federated head may have, which favours the current model: the comparison errs towards keeping it).
Each model is read at the threshold it would use: the candidate at the site's new out-of-fold
threshold, the current model at its overlay's threshold (else its bundle's).

A candidate is **clearly worse** when either

- its sensitivity or specificity at that threshold is 0 on the evidence while the current model's
  is not (it would call every case one class: ``kept-zero-sensitivity-or-specificity``), or
- its paired AUC difference to the current model (DeLong, same cases) is below ``-margin``
  (site config ``adoption_margin``, default 0.05) **and** its one-sided 95 % upper bound is below 0
  (``kept-clearly-worse``): a drop both material and beyond the noise of a dozen cases.

Fewer than two fine-tune cases of a class leave no AUC evidence: the bundle is kept, not activated
(``kept-insufficient-evidence``). With ``adoption = "manual"`` nothing is activated automatically
(``kept-awaiting-approval``, or the clearly-worse code when it is). Every kept bundle stays in the
site's cache with its overlay, and its evidence (aggregates only) in ``<state_dir>/adoption/<hash>.json``;
``ichfed site approve`` activates one (a clearly worse one only with ``--force``). The reply to the
coordinator carries the code alone.

**The segmenter** (issue 24, ``compare_segmenters``) is held to the same rule on its own evidence: the
per-case ICH Dice of the federated and the reference segmenter on the site's held-out cases with a
reference mask (the masked fine-tune cases trained it). It is clearly worse when the mean paired
difference is below ``-margin`` and its one-sided 95 % upper bound below 0; fewer than ``min_cases``
masked held-out cases is insufficient evidence. Either way the site keeps the reference segmenter
(``client.segmenter_site``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared.federation import protocol as P
from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)

ACTIVE_FILE = "active.json"
ADOPTION_DIR = "adoption"
Z_ONE_SIDED_95 = 1.6448536269514722


@dataclasses.dataclass(frozen=True)
class ActiveModel:
    """The site's model: the bundle ``predict --site-config`` and the reader use."""

    bundle_hash: str
    bundle_path: str
    since_utc: str
    source: str  # "federated run", "reference", "approved by hand"


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The candidate against the current model on the site's fine-tune cases (aggregates only)."""

    code: str
    evidence: dict[str, Any]


def compare(labels: np.ndarray, candidate: np.ndarray, current: np.ndarray, candidate_threshold: float,
            current_threshold: float, *, margin: float, evidence: str) -> Comparison:
    """The adoption code of a candidate scoring ``candidate`` against the current model's
    ``current`` on the same cases (the rule in the module doc); ``evidence`` says how the
    candidate's scores were made ("out-of-fold" or "in-sample")."""
    from shared.evaluation.rocstats import delong_paired

    y = np.asarray(labels, np.int64)
    facts: dict[str, Any] = {"n": int(y.size), "n_pos": int((y == 1).sum()), "n_neg": int((y == 0).sum()),
                             "candidate_scores": evidence, "margin": float(margin)}
    cand = _operating_point(y, candidate, candidate_threshold)
    cur = _operating_point(y, current, current_threshold)
    facts.update({f"candidate_{k}": v for k, v in cand.items()} | {f"current_{k}": v for k, v in cur.items()})
    if min(facts["n_pos"], facts["n_neg"]) < 2:
        return Comparison(P.ADOPTION_INSUFFICIENT, facts)
    d = delong_paired(y, candidate, current)
    upper = d.estimate + Z_ONE_SIDED_95 * d.se
    facts.update(auc_difference=d.estimate, auc_difference_se=d.se, auc_difference_upper_95=upper)
    if d.estimate < -margin and upper < 0.0:
        return Comparison(P.ADOPTION_CLEARLY_WORSE, facts)
    if _degenerate(cand) and not _degenerate(cur):
        return Comparison(P.ADOPTION_ZERO_OPERATING_POINT, facts)
    return Comparison(P.ADOPTION_ACTIVATED, facts)


def compare_segmenters(candidate: dict[str, Any], current: dict[str, Any], *, margin: float,
                       min_cases: int) -> Comparison:
    """The code of a candidate segmenter against the current one on the same masked cases.

    ``candidate`` / ``current``: ``shared.evaluation.segmentation.SegmentationScore`` by case ID (a
    ``client.features.Part.seg_scores``); the cases scored by both with a defined ICH Dice are paired.
    """
    ids = sorted(c for c in set(candidate) & set(current)
                 if candidate[c].ich_dice is not None and current[c].ich_dice is not None)
    cand = np.array([candidate[c].ich_dice for c in ids], np.float64)
    cur = np.array([current[c].ich_dice for c in ids], np.float64)
    facts: dict[str, Any] = {"n": len(ids), "margin": float(margin), "measure": "ICH Dice, held-out masked cases",
                             "candidate_mean": float(cand.mean()) if ids else None,
                             "current_mean": float(cur.mean()) if ids else None,
                             "candidate_median": float(np.median(cand)) if ids else None,
                             "current_median": float(np.median(cur)) if ids else None}
    if len(ids) < max(int(min_cases), 2):
        return Comparison(P.ADOPTION_INSUFFICIENT, facts)
    d = cand - cur
    se = float(d.std(ddof=1) / np.sqrt(d.size))
    upper = float(d.mean()) + Z_ONE_SIDED_95 * se
    facts.update(dice_difference=float(d.mean()), dice_difference_se=se, dice_difference_upper_95=upper)
    if d.mean() < -margin and upper < 0.0:
        return Comparison(P.ADOPTION_CLEARLY_WORSE, facts)
    return Comparison(P.ADOPTION_ACTIVATED, facts)


def _operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    called = np.asarray(p, np.float64) >= threshold
    pos, neg = y == 1, y == 0
    return {"threshold": float(threshold),
            "auc": float(roc_auc_score(y, p)) if pos.any() and neg.any() else None,
            "sensitivity": float(called[pos].mean()) if pos.any() else None,
            "specificity": float((~called[neg]).mean()) if neg.any() else None}


def _degenerate(op: dict[str, Any]) -> bool:
    return op["sensitivity"] == 0.0 or op["specificity"] == 0.0


def decide(comparison: Comparison, mode: str) -> str:
    """The code to act on: ``manual`` turns an activation into waiting for approval."""
    if mode == "manual" and comparison.code == P.ADOPTION_ACTIVATED:
        return P.ADOPTION_AWAITING_APPROVAL
    return comparison.code


def active_path(state_dir: str | os.PathLike) -> Path:
    """``<state_dir>/active.json``."""
    return Path(state_dir) / ACTIVE_FILE


def active_model(state_dir: str | os.PathLike) -> ActiveModel | None:
    """The site's active model, or None before it has one; a broken file is a one-line error."""
    path = active_path(state_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = ActiveModel(**{f.name: data[f.name] for f in dataclasses.fields(ActiveModel)})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IchfedError(f"{path}: not a readable active-model record ({type(e).__name__}: {e})"[:300]) from None
    if not isinstance(model.bundle_hash, str) or not P.HASH_RE.match(model.bundle_hash):
        raise IchfedError(f"{path}: bundle_hash: must be a 64-character hex bundle hash")
    return model


def activate(state_dir: str | os.PathLike, bundle_hash: str, bundle_path: str | os.PathLike,
             source: str) -> ActiveModel:
    """Make ``bundle_hash`` the site's model (atomically) and log it."""
    from shared.plumbing.atomic import write_json

    model = ActiveModel(bundle_hash=bundle_hash, bundle_path=str(bundle_path),
                        since_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), source=source)
    write_json(active_path(state_dir), dataclasses.asdict(model))
    log.info("active model is now bundle %s (%s)", bundle_hash[:12], source)
    return model


def record_path(state_dir: str | os.PathLike, bundle_hash: str) -> Path:
    """Where the adoption decision about ``bundle_hash`` is kept."""
    return Path(state_dir) / ADOPTION_DIR / f"{bundle_hash}.json"


def record(state_dir: str | os.PathLike, bundle_hash: str, bundle_path: str | os.PathLike, code: str,
           comparison: Comparison, current_hash: str) -> Path:
    """Keep the decision and its evidence (aggregates only) at the site."""
    from shared.plumbing.atomic import write_json

    path = record_path(state_dir, bundle_hash)
    write_json(path, {"bundle_hash": bundle_hash, "bundle_path": str(bundle_path), "decision": code,
                      "compared_with": current_hash, "decided_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "evidence": comparison.evidence})
    return path


def read_record(state_dir: str | os.PathLike, bundle_hash: str) -> dict[str, Any] | None:
    """The kept decision about ``bundle_hash``, or None."""
    path = record_path(state_dir, bundle_hash)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IchfedError(f"{path}: not a readable adoption record ({e})"[:300]) from None


def latest_kept(state_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The most recent decision that left its bundle kept but not active, or None."""
    folder = Path(state_dir) / ADOPTION_DIR
    active = active_model(state_dir)
    records = [read_record(state_dir, p.stem) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    kept = [r for r in records if r and r.get("decision") != P.ADOPTION_ACTIVATED
            and (active is None or r.get("bundle_hash") != active.bundle_hash)]
    return max(kept, key=lambda r: r.get("decided_utc", "")) if kept else None


def approve(config, bundle_hash: str | None = None, force: bool = False) -> tuple[ActiveModel, dict[str, Any]]:
    """Activate a kept bundle by hand (``ichfed site approve``): the latest kept one, or ``bundle_hash``.

    The bundle must be in the site's cache and verify with the site's key. A bundle kept as
    clearly worse (or with a zero operating point) needs ``force``. Raises ``IchfedError``.
    """
    from shared.bundle import load_bundle
    from shared.bundle.transport import bundle_cache_dir, cached_bundle

    state = Path(config.state_dir)
    rec = read_record(state, bundle_hash) if bundle_hash else latest_kept(state)
    if rec is None:
        what = f"bundle {bundle_hash[:12]}" if bundle_hash else "any bundle awaiting a decision"
        raise IchfedError(f"{state / ADOPTION_DIR}: no adoption record for {what}")
    wanted = rec["bundle_hash"]
    if rec.get("decision") in (P.ADOPTION_CLEARLY_WORSE, P.ADOPTION_ZERO_OPERATING_POINT) and not force:
        raise IchfedError(f"bundle {wanted[:12]}: kept as {rec['decision']} on this site's evidence; "
                          "approve it anyway with --force")
    path = cached_bundle(bundle_cache_dir(state), wanted)
    if path is None:
        raise IchfedError(f"bundle {wanted[:12]}: not in the site's bundle cache {bundle_cache_dir(state)}")
    if config.public_key is None:
        raise IchfedError("site config: public_key: needed to verify the bundle before it becomes the site's model")
    load_bundle(path, config.public_key)  # verified before it is trusted
    return activate(state, wanted, path, "approved by hand"), rec
