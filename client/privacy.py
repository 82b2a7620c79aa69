"""The privacy boundary: the one place that builds what a site sends, and the allow-list it obeys.

A reply may carry only
- the head (``weight`` (2, 512) and ``bias`` (2,), finite float32), and in a cross-fitted run
  its K fold heads (``fold<k>.weight`` / ``fold<k>.bias``, ``protocol.head_keys``),
- in a segmenter round (issue 24), the segmenter's trainable tensors (``protocol.SEGMENTER``: network
  parameter names, finite float32 within ``segment_weights.MAX_WEIGHT_ABS``, bounded in number and size;
  ``SegmenterWeights.problem``), fine-tuned on at least ``min_cases`` masked cases, with the masked
  case count and nnU-Net's pseudo Dice of the fine-tune as aggregates,
- named aggregate metrics (counts, AUC and its DeLong variance, paired AUC differences and their
  variances, accuracy, sensitivity, specificity, confusion counts (also intention-to-treat),
  mean Dice, a ROC curve sampled at fixed false-positive rates, and per-class score histograms
  on fixed bins with at least ``protocol.MIN_CASES_FLOOR`` cases per class); every count of cases
  (``n``, ``n-pos``, ``n-neg``, ``n-no-lesion``, quality-flag counts, ``n-held-out``, ``n-unusable``)
  is 0 or at least the floor (``floor_counts`` applies the site's own minimum at the source;
  ``num-examples`` and ``n-fine-tune`` are the FedAvg weight of a train reply, which a site sends
  only above its minimum, and are floored at the source in other replies),
- thresholds only on the fixed grid ``protocol.THRESHOLD_GRID`` (the reference arm's is the
  bundle's own, public value),
- a few short fields from a fixed vocabulary (site name, status, reason codes, bundle hash,
  the adoption code of a delivered federated bundle, the site's segmenter decision),
- a Table 1 (``query.stats``, ``shared/federation/stats_protocol.py``): counts and fixed-bin histograms by
  class, each count and bin 0 or at least ``protocol.MIN_CASES_FLOOR``, and scanner categories
  (short printable labels) with such counts.

Case IDs, per-case values, images and file paths have no key to travel under, so they cannot
leave. ``build_reply`` constructs every reply and checks it; ``privacy_mod`` checks every
message again on its way out of the ClientApp, so a reply built some other way is stopped too.
``client.audit`` keeps a copy of every reply that left.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np

from shared.federation import protocol as P
from shared.federation import stats_protocol as S
from shared.models.head import HeadSet
from shared.plumbing import rules
from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)

_MAX_ABS = 1e6  # no honest metric or head entry is this large; a larger one is a bug or a leak
_COUNT_METRICS = {"n", "n-pos", "n-neg", "n-no-lesion", "tp", "fp", "tn", "fn", "withheld",
                  "itt-tp", "itt-fp", "itt-tn", "itt-fn", "n-masked", *P.QUALITY_METRICS}
_UNIT_METRICS = {"auc", "accuracy", "sensitivity", "specificity", "threshold", "dice-ich", "dice-phe",
                 "auc-var", "auc-minus-reference-var", "auc-minus-local-var", "largest-on-lesion"}
_DIFF_METRICS = {"auc-minus-reference", "auc-minus-local"}  # paired differences lie in [-1, 1]
_HIST_METRICS = {P.HIST_NEG, P.HIST_POS}


#: case counts that are 0 or at least the floor wherever they appear (model-scoped metrics)
_FLOORED_COUNTS = {"n", "n-pos", "n-neg", "n-no-lesion", "n-masked", *P.QUALITY_METRICS}
#: site counts the allow-list floors (the FedAvg weight keys are floored where they are made)
_FLOORED_SITE_COUNTS = {P.N_HELD_OUT, P.N_UNUSABLE, P.N_MASKED_FINE_TUNE}


def floor_counts(counts: Mapping[str, int], k: int, metrics: dict[str, Any], reasons: dict[str, str]) -> None:
    """Put each count in ``metrics`` when it is 0 or at least ``k``; otherwise say why in ``reasons``.

    A count of 1..k-1 singles out a case or a few (a flag on one held-out case, two unusable scans).
    """
    for key, n in counts.items():
        if 0 < int(n) < k:
            reasons[key] = P.REASON_TOO_FEW
        else:
            metrics[key] = int(n)


class PrivacyViolation(RuntimeError):
    """A reply held something outside the allow-list; it is a bug, and nothing was sent."""


def build_reply(
    site: str,
    status: str = P.STATUS_OK,
    *,
    head: HeadSet | None = None,
    metrics: Mapping[str, Any] | None = None,
    reasons: Mapping[str, str] | None = None,
    reason: str | None = None,
    bundle_hash: str | None = None,
    scanner: Mapping[str, Mapping[str, int]] | None = None,
    adoption: str | None = None,
    segmenter=None,
    segmenter_adoption: str | None = None,
):
    """Build the content (a Flower ``RecordDict``) of a site's reply and check it.

    ``metrics`` values that are ``None`` are left out (a MetricRecord has no null); say why
    in ``reasons`` under the same key. ``scanner`` maps a scanner field to its category counts
    (a stats reply). ``segmenter``: a ``shared.models.segment_weights.SegmenterWeights`` (a segmenter
    round's update); ``segmenter_adoption``: the site's segmenter decision (``protocol.ADOPTIONS``).
    Raises ``PrivacyViolation`` for anything not allowed.
    """
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    content = RecordDict()
    info: dict[str, Any] = {P.INFO_SITE: site, P.INFO_STATUS: status}
    if reason is not None:
        info[P.INFO_REASON] = reason
    if bundle_hash is not None:
        info[P.INFO_BUNDLE_HASH] = bundle_hash
    if adoption is not None:
        info[P.INFO_ADOPTION] = adoption
    if segmenter_adoption is not None:
        info[P.INFO_SEG_ADOPTION] = segmenter_adoption
    for key, code in (reasons or {}).items():
        info[f"{key}{P.REASON_SUFFIX}"] = code
    if head is not None:
        content[P.HEAD] = head.to_record()
    if segmenter is not None:
        content[P.SEGMENTER] = segmenter.to_record()
    if metrics is not None:
        content[P.METRICS] = MetricRecord(_plain_metrics(metrics))
    if scanner:
        record: dict[str, Any] = {}
        for field, counts in scanner.items():
            record[field] = [str(c) for c in counts]
            record[f"{field}.n"] = [int(n) for n in counts.values()]
        content[S.SCANNER] = ConfigRecord(record)
    content[P.INFO] = ConfigRecord(info)
    check_content(content)
    return content


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metric values as a MetricRecord holds them: lists of floats, ints, floats; None left out."""
    clean: dict[str, Any] = {}
    for k, v in metrics.items():
        if v is None:
            continue
        if isinstance(v, (list, tuple, np.ndarray)):
            clean[k] = [float(x) for x in v]
        elif isinstance(v, (bool, np.bool_, int, np.integer)):
            clean[k] = int(v)
        else:
            clean[k] = float(v)
    return clean


def check_content(content) -> None:
    """Raise ``PrivacyViolation`` unless every record, key and value of ``content`` is allowed."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    for name, record in content.items():
        if name == P.HEAD and isinstance(record, ArrayRecord):
            _check_head(record)
        elif name == P.SEGMENTER and isinstance(record, ArrayRecord):
            _check_segmenter(record)
        elif name == P.METRICS and isinstance(record, MetricRecord):
            for key, value in record.items():
                _check_metric(key, value)
        elif name == P.INFO and isinstance(record, ConfigRecord):
            for key, value in record.items():
                _check_info(key, value)
        elif name == S.SCANNER and isinstance(record, ConfigRecord):
            _check_scanner(record)
        else:
            raise PrivacyViolation(f"reply record '{name}' ({type(record).__name__}) is not on the allow-list")


def privacy_mod(message, context, call_next):
    """Flower ClientApp mod: every outgoing reply passes ``check_content`` or is replaced by an error."""
    from flwr.app import Error, Message

    reply = call_next(message, context)
    if reply.has_content():
        try:
            check_content(reply.content)
        except PrivacyViolation as e:
            log.error("reply to %s withheld: %s", message.metadata.message_type, e)
            return Message(Error(code=0, reason="reply withheld by the privacy allow-list"), reply_to=message)
    return reply


def _check_head(record) -> None:
    keys = set(record.keys())
    if P.cross_fit_folds(keys) is None:
        raise PrivacyViolation(f"head arrays must be exactly {sorted(P.HEAD_SHAPES)} plus cross-fit fold heads "
                               f"'{P.fold_prefix(0)}...', got {sorted(keys)}")
    for key in keys:  # float32 only: a wider dtype is room for other bytes
        if record[key].dtype != "float32":
            raise PrivacyViolation(f"head '{key}' must be float32, got {record[key].dtype}")
    try:
        heads = HeadSet.from_record(record)
        width = heads.main.n_features
        why = (heads.problem(width) if width in P.HEAD_WIDTHS else
               f"main head reads {width} features; a head reads one of {list(P.HEAD_WIDTHS)}")
    except IchfedError as e:
        why = str(e)
    if why:
        raise PrivacyViolation(why)


def _check_segmenter(record) -> None:
    """Network tensors only: parameter names, float32, finite, bounded (``SegmenterWeights.problem``)."""
    from shared.models.segment_weights import SegmenterWeights

    try:
        why = SegmenterWeights.from_record(record).problem()
    except IchfedError as e:
        why = str(e)
    if why:
        raise PrivacyViolation(why)


def _check_metric(key: str, value: Any) -> None:
    stats = S.split_key(key)
    if stats is not None:
        _check_stats_metric(key, stats[1], value)
        return
    model = None
    if key == P.TRAIN_DICE:
        _check_number(key, value, 0.0, 1.0)
        return
    if key in P.SITE_COUNTS or key == P.N_MASKED_FINE_TUNE:
        metric = "n" if key != P.TRAIN_LOSS else "train-loss"
    else:
        parts = P.split_metric_key(key)
        if parts is None:
            raise PrivacyViolation(f"metric '{key}' is not on the allow-list")
        model, metric = parts
    if metric in _HIST_METRICS:
        _check_histogram(key, value)
        return
    if metric in P.LIST_METRICS:
        if not isinstance(value, list) or len(value) != P.LIST_METRICS[metric]:
            raise PrivacyViolation(f"metric '{key}' must be a list of {P.LIST_METRICS[metric]} values")
        for v in value:
            _check_number(key, v, 0.0, 1.0)
        return
    if isinstance(value, list):
        raise PrivacyViolation(f"metric '{key}' must be a single number, got a list")
    if metric in _COUNT_METRICS or metric == "n":
        if not isinstance(value, int) or value < 0:
            raise PrivacyViolation(f"metric '{key}' must be a count, got {value!r}")
        if (metric in _FLOORED_COUNTS if model is not None else key in _FLOORED_SITE_COUNTS) \
                and 0 < value < P.MIN_CASES_FLOOR:
            raise PrivacyViolation(f"metric '{key}' holds a count of {value}, below the floor of {P.MIN_CASES_FLOOR}")
        return
    if metric in _UNIT_METRICS:
        _check_number(key, value, 0.0, 1.0)
        if metric == "threshold" and model != P.MODEL_REFERENCE:
            _check_on_grid(key, value)
        return
    if metric in _DIFF_METRICS:
        _check_number(key, value, -1.0, 1.0)
        return
    # nnU-Net's training loss is cross-entropy minus soft Dice, so it goes down to -1 (segmenter rounds)
    _check_number(key, value, -1.0 if key == P.TRAIN_LOSS else 0.0, _MAX_ABS)


def _check_histogram(key: str, value: Any) -> None:
    """SCORE_BINS non-negative whole counts summing to at least the floor (or nothing at all)."""
    if not isinstance(value, list) or len(value) != P.SCORE_BINS:
        raise PrivacyViolation(f"metric '{key}' must be a list of {P.SCORE_BINS} counts")
    for v in value:
        _check_number(key, v, 0.0, _MAX_ABS)
        if float(v) != int(v):
            raise PrivacyViolation(f"metric '{key}' must hold whole counts, got {v!r}")
    if sum(value) < P.MIN_CASES_FLOOR:
        raise PrivacyViolation(f"metric '{key}' describes fewer than {P.MIN_CASES_FLOOR} cases")


def _check_on_grid(key: str, value: float) -> None:
    if rules.grid_steps(value, P.THRESHOLD_GRID) is None:  # the one grid rule (shared.plumbing.rules)
        raise PrivacyViolation(f"metric '{key}' = {value!r} is not on the {P.THRESHOLD_GRID} threshold grid")


def _check_number(key: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivacyViolation(f"metric '{key}' must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not (lo <= value <= hi):
        raise PrivacyViolation(f"metric '{key}' = {value!r} is outside [{lo}, {hi}]")


def _check_info(key: str, value: Any) -> None:
    if not isinstance(value, str):
        raise PrivacyViolation(f"info '{key}' must be a string, got {type(value).__name__}")
    if key == P.INFO_SITE:
        ok = bool(P.SITE_NAME_RE.match(value))
    elif key == P.INFO_STATUS:
        ok = value in P.STATUSES
    elif key == P.INFO_REASON:
        ok = value in P.REASONS
    elif key == P.INFO_BUNDLE_HASH:
        ok = bool(P.HASH_RE.match(value))
    elif key in (P.INFO_ADOPTION, P.INFO_SEG_ADOPTION):
        ok = value in P.ADOPTIONS
    elif key.endswith(P.REASON_SUFFIX):
        target = key[: -len(P.REASON_SUFFIX)]
        ok = (target in P.SITE_COUNTS or target in P.SEGMENTER_COUNTS or P.split_metric_key(target) is not None
              or S.split_key(target) is not None) and value in P.REASONS
    else:
        raise PrivacyViolation(f"info '{key}' is not on the allow-list")
    if not ok:
        raise PrivacyViolation(f"info '{key}' has a value outside its fixed vocabulary")


def _check_small_count(key: str, v: Any) -> None:
    """A whole count that is 0 or at least the floor: 1..floor-1 would single out a case or two."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or float(v) != int(v) \
            or not 0 <= v <= _MAX_ABS:
        raise PrivacyViolation(f"metric '{key}' must hold whole counts, got {v!r}")
    if 0 < v < P.MIN_CASES_FLOOR:
        raise PrivacyViolation(f"metric '{key}' holds a count of {int(v)}, below the floor of {P.MIN_CASES_FLOOR}")


def _check_stats_metric(key: str, metric: str, value: Any) -> None:
    """Table 1 keys: counts, or histograms on the protocol's fixed bins."""
    if metric in S.HISTOGRAMS:
        bins = S.n_bins(S.HISTOGRAMS[metric])
        if not isinstance(value, list) or len(value) != bins:
            raise PrivacyViolation(f"metric '{key}' must be a list of {bins} counts")
        for v in value:
            _check_small_count(key, v)
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise PrivacyViolation(f"metric '{key}' must be a count, got {value!r}")
    _check_small_count(key, value)


def _check_scanner(record) -> None:
    """Scanner fields: "<field>" -> labels, "<field>.n" -> counts, the same length, each count above the floor."""
    for key, value in record.items():
        field = key[:-2] if key.endswith(".n") else key
        if field not in S.SCANNER_FIELDS:
            raise PrivacyViolation(f"scanner '{key}' is not on the allow-list")
        if not isinstance(value, list) or len(value) > S.MAX_CATEGORIES:
            raise PrivacyViolation(f"scanner '{key}' must be a list of at most {S.MAX_CATEGORIES} entries")
        if key.endswith(".n"):
            labels = record.get(field)
            if not isinstance(labels, list) or len(labels) != len(value):
                raise PrivacyViolation(f"scanner '{key}' must count the labels of '{field}' one for one")
            for n in value:
                if not isinstance(n, int) or n < P.MIN_CASES_FLOOR:
                    raise PrivacyViolation(f"scanner '{key}' holds a count below the floor of {P.MIN_CASES_FLOOR}")
        else:
            if f"{field}.n" not in record.keys():
                raise PrivacyViolation(f"scanner '{key}' has no counts")
            for label in value:
                if not isinstance(label, str) or not S.CATEGORY_RE.match(label):
                    raise PrivacyViolation(f"scanner '{key}' has a label outside the category form")
