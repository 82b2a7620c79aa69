"""What the server accepts from a site: range checks on arriving metrics, the case counts a site
may claim as its FedAvg weight, and one name per authenticated node.

A site is trusted no further than it must be. Its SuperNode key authenticates the node ID (the
SuperLink checks it), but everything inside a reply is the site's own claim: the name it gives,
the number of cases it says it trained on, the metrics it reports. Each claim is checked here on
arrival; a reply that fails is dropped by the caller and logged with the node ID.

A reply holds exactly the protocol's records and keys (``shared/federation/protocol.py``) for
its message type: a train reply the head, its site counts and INFO; an evaluate reply the global
head's metrics; a final reply the four arms'. Anything else (``global.foo``, a record named
otherwise, an INFO key off the vocabulary) refuses the reply: the protocol is the one list, so a
new metric is added there, and to the site's allow-list, before it is accepted.

The value checks are table-driven: probabilities in [0, 1], counts non-negative integers that add
up, variances non-negative, AUC differences in [-1, 1]; a protocol metric without a rule here
must still be a finite number or a list of them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from shared.federation import protocol as P

# The models (arms) whose metrics each reply may carry.
STAGE_MODELS = {P.TRAIN: (), P.EVALUATE: (P.MODEL_GLOBAL,), P.QUERY_FINAL: P.FINAL_ARMS, P.QUERY_BUNDLE: (),
                P.TRAIN_SEGMENTER: (), P.QUERY_SEGMENTER: P.SEGMENTER_ARMS}
# The records each reply may carry (a refusal carries only INFO).
STAGE_RECORDS = {P.TRAIN: {P.HEAD, P.METRICS, P.INFO}, P.EVALUATE: {P.METRICS, P.INFO},
                 P.QUERY_FINAL: {P.METRICS, P.INFO}, P.QUERY_BUNDLE: {P.METRICS, P.INFO},
                 P.TRAIN_SEGMENTER: {P.SEGMENTER, P.METRICS, P.INFO}, P.QUERY_SEGMENTER: {P.METRICS, P.INFO}}
_INFO_KEYS = {P.INFO_SITE, P.INFO_STATUS, P.INFO_REASON, P.INFO_BUNDLE_HASH}
# INFO keys only one reply may carry
STAGE_INFO = {P.QUERY_FINAL: {P.INFO_ADOPTION}, P.QUERY_SEGMENTER: {P.INFO_SEG_ADOPTION}}
# Site-level metric keys each reply may carry besides the protocol's site counts
STAGE_COUNTS = {P.QUERY_BUNDLE: (P.N_MASKED_FINE_TUNE,), P.TRAIN_SEGMENTER: P.SEGMENTER_COUNTS}

# No site fine-tunes on a million ICH cases; a claim above this is a lie or a bug, and a float
# this size can no longer overflow a weighted sum.
MAX_CASES = 1_000_000

_UNIT = "unit"  # a finite number in [0, 1]
_COUNT = "count"  # a non-negative integer
_VAR = "variance"  # a finite number >= 0
_DIFF = "difference"  # a finite number in [-1, 1]
_FLAG = "flag"  # 0 or 1
_UNIT_LIST = "unit-list"  # a list of numbers in [0, 1]
_COUNT_LIST = "count-list"  # a list of non-negative integers

# Rules for the "<model>.<metric>" keys (the metric part); unknown metrics fall back to finite.
MODEL_METRIC_RULES: dict[str, str] = {
    "auc": _UNIT, "accuracy": _UNIT, "sensitivity": _UNIT, "specificity": _UNIT, "threshold": _UNIT,
    "dice-ich": _UNIT, "dice-phe": _UNIT, "largest-on-lesion": _UNIT, "n-masked": _COUNT,
    "n": _COUNT, "n-pos": _COUNT, "n-neg": _COUNT, "n-no-lesion": _COUNT,
    "tp": _COUNT, "fp": _COUNT, "tn": _COUNT, "fn": _COUNT,
    "itt-tp": _COUNT, "itt-fp": _COUNT, "itt-tn": _COUNT, "itt-fn": _COUNT,
    "withheld": _FLAG,
    **{m: _COUNT for m in P.QUALITY_METRICS},
    "auc-var": _VAR, "auc-minus-reference-var": _VAR, "auc-minus-local-var": _VAR,
    "auc-minus-reference": _DIFF, "auc-minus-local": _DIFF,
    P.ROC_TPR: _UNIT_LIST, P.HIST_POS: _COUNT_LIST, P.HIST_NEG: _COUNT_LIST,
}
# Rules for the site-level keys (not model-scoped).
SITE_METRIC_RULES: dict[str, str] = {
    P.NUM_EXAMPLES: _COUNT, P.N_FINE_TUNE: _COUNT, P.N_HELD_OUT: _COUNT, P.N_UNUSABLE: _COUNT,
    P.N_MASKED_FINE_TUNE: _COUNT, P.TRAIN_DICE: _UNIT,
}


def as_count(value: Any) -> int | None:
    """``value`` as a non-negative integer no larger than MAX_CASES, else None.

    Integral floats are accepted (a MetricRecord may carry a count as 12.0); 12.5, NaN, bools,
    negatives and absurd sizes are not.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    if not 0 <= value <= MAX_CASES:
        return None
    return int(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_value(key: str, value: Any, rule: str | None) -> str | None:
    """Why ``value`` breaks ``rule`` (None: it is fine)."""
    if rule in (_UNIT_LIST, _COUNT_LIST) or isinstance(value, list):
        if not isinstance(value, list):
            return f"'{key}' is {value!r}, not a list"
        if rule not in (None, _UNIT_LIST, _COUNT_LIST):
            return f"'{key}' is a list, not a single value"
        for v in value:
            why = _check_value(key, v, _UNIT if rule == _UNIT_LIST else _COUNT if rule == _COUNT_LIST else None)
            if why:
                return why
        return None
    if rule == _COUNT:
        return None if as_count(value) is not None else f"'{key}' is {value!r}, not a case count"
    if rule == _FLAG:
        return None if value in (0, 1) and not isinstance(value, bool) else f"'{key}' is {value!r}, not 0 or 1"
    if not _finite(value):
        return f"'{key}' is {value!r}, not a finite number"
    if rule == _UNIT and not 0.0 <= value <= 1.0:
        return f"'{key}' is {value!r}, outside [0, 1]"
    if rule == _VAR and value < 0:
        return f"'{key}' is {value!r}, a negative variance"
    if rule == _DIFF and not -1.0 <= value <= 1.0:
        return f"'{key}' is {value!r}, outside [-1, 1]"
    return None


def check_reply_metrics(metrics: Mapping[str, Any], models: tuple[str, ...] = P.MODELS,
                        counts: tuple[str, ...] = ()) -> str | None:
    """Why an evaluate or final reply's metrics are impossible (None: they pass).

    Every key is the protocol's (a site count, or ``<model>.<metric>`` of one of ``models``) and
    every value is range-checked by its rule; then the counts must add up: per model
    ``n-pos + n-neg == n``, ``tp + fn == n-pos``, ``fp + tn == n-neg``, each score histogram
    holds no more cases than its class, and ``n`` equals the site's held-out count.
    """
    by_model: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        parts = P.split_metric_key(key)
        if parts is not None and parts[0] in models:
            rule = MODEL_METRIC_RULES.get(parts[1])
            by_model.setdefault(parts[0], {})[parts[1]] = value
        elif key in P.SITE_COUNTS or key in counts:
            rule = SITE_METRIC_RULES.get(key)
        else:
            return f"'{key}' is not a metric of this reply in the protocol"
        why = _check_value(key, value, rule)
        if why:
            return why
    held_out = metrics.get(P.N_HELD_OUT)
    for model, m in by_model.items():
        why = _counts_add_up(model, m, held_out)
        if why:
            return why
    return None


def _counts_add_up(model: str, m: dict[str, Any], held_out: Any) -> str | None:
    n, pos, neg = m.get("n"), m.get("n-pos"), m.get("n-neg")
    if None not in (n, pos, neg) and pos + neg != n:
        return f"'{model}': n-pos {pos} + n-neg {neg} != n {n}"
    if held_out is not None and n is not None and n != held_out:
        return f"'{model}': n {n} differs from the site's held-out count {held_out}"
    conf = [m.get(k) for k in ("tp", "fp", "tn", "fn")]
    if None not in conf and pos is not None and neg is not None:
        tp, fp, tn, fn = conf
        if tp + fn != pos or fp + tn != neg:
            return f"'{model}': confusion counts {conf} do not add up to n-pos {pos} / n-neg {neg}"
    for hist, total in ((P.HIST_POS, pos), (P.HIST_NEG, neg)):
        if isinstance(m.get(hist), list) and total is not None and sum(m[hist]) > total:
            return f"'{model}': {hist} holds {sum(m[hist])} cases, more than the {total} of its class"
    return None


def check_segmenter_claims(metrics: Mapping[str, Any]) -> tuple[int | None, str | None]:
    """The masked case count a segmenter train reply claims (its weight), or why the reply is unacceptable:
    ``num-examples`` and ``n-masked-fine-tune`` positive counts (the weight is the smaller), a finite
    loss, a pseudo Dice in [0, 1], and no other key."""
    for key, value in metrics.items():
        if key not in (P.NUM_EXAMPLES, P.N_MASKED_FINE_TUNE, P.TRAIN_LOSS, P.TRAIN_DICE):
            return None, f"'{key}' is not a metric of a segmenter train reply in the protocol"
        if key != P.TRAIN_LOSS:
            why = _check_value(key, value, SITE_METRIC_RULES[key])
            if why:
                return None, why
    counts = [as_count(metrics.get(k)) for k in (P.NUM_EXAMPLES, P.N_MASKED_FINE_TUNE)]
    if not all(counts):
        return None, f"'{P.NUM_EXAMPLES}' / '{P.N_MASKED_FINE_TUNE}' must be positive integer case counts"
    if not _finite(metrics.get(P.TRAIN_LOSS)):
        return None, f"'{P.TRAIN_LOSS}' is {metrics.get(P.TRAIN_LOSS)!r}, not a finite number"
    return min(counts), None


def check_train_claims(metrics: Mapping[str, Any]) -> tuple[int | None, str | None]:
    """The fine-tune count a train reply claims, or the reason the reply is unacceptable.

    ``num-examples`` (the FedAvg weight) must be a positive integer case count, ``n-fine-tune``
    (when sent) one too and not smaller, and the training loss a finite number: a NaN loss
    means the site's optimisation diverged, so its head is no better than a NaN weight.
    """
    n = metrics.get(P.NUM_EXAMPLES)
    count = as_count(n)
    if not count:
        return None, f"'{P.NUM_EXAMPLES}' is {n!r}, not a positive integer case count (at most {MAX_CASES})"
    if P.N_FINE_TUNE in metrics:
        reported = as_count(metrics[P.N_FINE_TUNE])
        if not reported:
            return None, f"'{P.N_FINE_TUNE}' is {metrics[P.N_FINE_TUNE]!r}, not a positive integer case count"
        # The weight is capped at the site's own fine-tune count rather than rejected.
        count = min(count, reported)
    loss = metrics.get(P.TRAIN_LOSS)
    if loss is not None and not _finite(loss):
        return None, f"'{P.TRAIN_LOSS}' is {loss!r}, not a finite number"
    for key, value in metrics.items():
        if key not in P.SITE_COUNTS:
            return None, f"'{key}' is not a metric of a train reply in the protocol"
        if key not in (P.NUM_EXAMPLES, P.N_FINE_TUNE, P.TRAIN_LOSS):
            why = _check_value(key, value, SITE_METRIC_RULES.get(key))
            if why:
                return None, why
    return count, None


def check_reply_records(msg, stage: str) -> str | None:
    """Why a reply's records or INFO keys are not exactly the protocol's for ``stage`` (None: they are).

    ``stage`` is the message type (``protocol.TRAIN``, ``EVALUATE``, ``QUERY_FINAL``, ``QUERY_BUNDLE``).
    """
    content = msg.content
    names = set(content.keys())
    extra = names - STAGE_RECORDS[stage]
    if extra:
        return f"record(s) {sorted(extra)} are not part of a {stage} reply"
    if P.INFO not in content.config_records:
        return "reply has no INFO record"
    for name, kind in ((P.HEAD, content.array_records), (P.SEGMENTER, content.array_records),
                       (P.METRICS, content.metric_records), (P.INFO, content.config_records)):
        if name in names and name not in kind:
            return f"record '{name}' is of the wrong kind"
    for key, value in content[P.INFO].items():
        target = key[: -len(P.REASON_SUFFIX)] if key.endswith(P.REASON_SUFFIX) else None
        if key not in _INFO_KEYS | STAGE_INFO.get(stage, set()) and not (
                target is not None and _known_target(target, stage)):
            return f"info '{key}' is not part of a {stage} reply"
        if not _info_value_ok(key, value):
            return f"info '{key}' holds a value outside the protocol's vocabulary"
    return None


def _info_value_ok(key: str, value: Any) -> bool:
    """INFO values are codes from fixed lists: free text is where a site could put anything."""
    if not isinstance(value, str):
        return False
    if key == P.INFO_SITE:
        return bool(P.SITE_NAME_RE.match(value))
    if key == P.INFO_STATUS:
        return value in P.STATUSES
    if key == P.INFO_BUNDLE_HASH:
        return bool(P.HASH_RE.match(value))
    if key in (P.INFO_ADOPTION, P.INFO_SEG_ADOPTION):
        return value in P.ADOPTIONS
    return value in P.REASONS  # INFO_REASON and every "<key>.reason"


def _known_target(key: str, stage: str) -> bool:
    parts = P.split_metric_key(key)
    return key in P.SITE_COUNTS or key in STAGE_COUNTS.get(stage, ()) or (
        parts is not None and parts[0] in STAGE_MODELS[stage])


class SiteLedger:
    """What the server has learned about each authenticated node during one run: the name it
    claimed first and the fine-tune count it reported first.

    A name belongs to the node that claimed it first; a later node claiming it is refused for
    the run, and a node cannot change its name or its fine-tune count mid-run.
    """

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.counts: dict[int, int] = {}

    def claim_name(self, node_id: int, name: str) -> str | None:
        """Register ``name`` for ``node_id``; the reason it is refused, or None."""
        holder = next((n for n, s in self.names.items() if s == name), None)
        if holder is not None and holder != node_id:
            return f"site name '{name}' is already held by node {holder}"
        known = self.names.get(node_id)
        if known is not None and known != name:
            return f"node {node_id} joined as '{known}' and now calls itself '{name}'"
        self.names[node_id] = name
        return None

    def name(self, node_id: int, fallback: str | None = None) -> str:
        """The name ``node_id`` holds, else ``fallback`` or ``node-<id>``."""
        return self.names.get(node_id) or fallback or f"node-{node_id}"

    def check_count(self, node_id: int, n_fine_tune: Any) -> str | None:
        """Record the node's fine-tune count the first time; later it must not change."""
        n = as_count(n_fine_tune)
        if n is None:
            return f"'{P.N_FINE_TUNE}' is {n_fine_tune!r}, not a case count"
        known = self.counts.setdefault(node_id, n)
        if known != n:
            return f"'{P.N_FINE_TUNE}' changed from {known} to {n} during the run"
        return None


def share_capped(weights: Mapping[int, float], max_share: float) -> dict[int, float]:
    """Cap each site's weight so that, against the others' claims, it holds at most
    ``max_share`` of the round: ``w_i <= max_share / (1 - max_share) * sum_{j != i} w_j``.

    With one site, or ``max_share >= 1``, nothing is capped. One site lying about its size can
    then move the weighted mean by at most ``max_share`` of its own deviation.
    """
    if len(weights) < 2 or max_share >= 1.0:
        return dict(weights)
    total = sum(weights.values())
    ratio = max_share / (1.0 - max_share)
    return {k: min(float(w), ratio * (total - w)) for k, w in weights.items()}


def check_identity(ledger: SiteLedger, msg) -> str | None:
    """A reply must come under the name its authenticated node holds (the first one it claimed)."""
    info = msg.content[P.INFO] if msg.has_content() and P.INFO in msg.content.config_records else {}
    name = info.get(P.INFO_SITE)
    if not isinstance(name, str) or not P.SITE_NAME_RE.match(name):
        return f"site name {name!r} is missing or malformed"
    return ledger.claim_name(msg.metadata.src_node_id, name)


def admit_metrics_reply(ledger: SiteLedger, msg, stage: str = P.EVALUATE) -> str | None:
    """Why an evaluate or final reply cannot be believed (None: admitted): exactly the protocol's
    records and keys for ``stage``, the sender's name, the range and consistency of its metrics,
    and its fine-tune count against earlier replies."""
    why = check_reply_records(msg, stage) or check_identity(ledger, msg)
    if why or P.METRICS not in msg.content.metric_records:
        return why
    metrics = dict(msg.content[P.METRICS])
    why = check_reply_metrics(metrics, STAGE_MODELS[stage], STAGE_COUNTS.get(stage, ()))
    if why is None and P.N_FINE_TUNE in metrics:
        why = ledger.check_count(msg.metadata.src_node_id, metrics[P.N_FINE_TUNE])
    return why


def train_refusal(msg, ledger: SiteLedger, stage: str, record: str, what: str) -> str | None:
    """Why a train reply of ``stage`` cannot be read as an update at all: an error, the site's refusal, any
    record but exactly one ``record`` (``what`` names it) and one metric record, or an identity it may not
    claim. None when it can be read. Shared by the head and the segmenter strategies."""
    from . import replies as R

    if msg.has_error():
        return R.refusal_reason(msg)
    if R.reply_status(msg) == P.STATUS_REFUSED:
        return f"site refused ({R.refusal_reason(msg)})"
    why = check_reply_records(msg, stage)
    if why is None and set(msg.content.keys()) != {record, P.METRICS, P.INFO}:
        why = f"reply does not hold exactly one {what} and one metric record"
    return why or check_identity(ledger, msg)

