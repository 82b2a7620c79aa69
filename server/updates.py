"""What the server accepts as a site's head update: the record's form, a norm bound on every head,
and zero-change and replayed updates.

Every head a site returns (the main head and each cross-fit fold head) must fit the ResNet-34
(``Head.problem``) and lie within ``max-update-norm`` of the head the server sent for it: a fold
head of 3e38 averaged into fold k would otherwise make every honest site's out-of-fold scores NaN.
The distances are computed once per update (:func:`check_update`) and reported with the row.

:class:`UpdateRegistry` remembers the digest of every head record of the run: the global record
sent each round and every update received. An update equal to

- this round's global record is a *zero-change* update: accepted (early stopping may keep the
  start head) and flagged, since it carries no information and still holds its weight;
- an earlier round's global record, or any earlier update (the site's own or another site's),
  is a *replay*: rejected and flagged, because it was not trained on this round's head;
- another site's update of the same round is a *duplicate*: flagged, naming the first sender
  (which site copied cannot be told; each is still bounded by the norm limit and the rule).

Equality is bitwise (sha256 of the float32 arrays): a replay with noise added is not caught here,
only bounded by the norm limit, the share cap and the robust rules.

Segmenter rounds (issue 24) are held to the same: :func:`check_segmenter_update` (exactly the tensors
sent, their shapes, finite, bounded, an update-norm limit of their own) and an ``UpdateRegistry`` of
their own (it needs only ``digest()`` of what it sees).
"""

from __future__ import annotations

import dataclasses

from shared.models.head import HeadSet
from shared.models.segment_weights import SegmenterWeights
from shared.plumbing.errors import IchfedError

from .records import FLAG_DUPLICATE, FLAG_REPLAY, FLAG_ZERO_CHANGE, site_label


@dataclasses.dataclass(frozen=True)
class CheckedUpdate:
    """A train reply's heads after the checks: the heads and their distances from the ones sent,
    or the reason they are refused."""

    heads: HeadSet | None
    norms: dict[str, float]  # prefix ("" main, "fold<k>.") -> L2 distance from the head sent
    reason: str | None = None

    @property
    def norm(self) -> float | None:
        """The main head's update norm."""
        return self.norms.get("")

    @property
    def norm_max(self) -> float | None:
        """The largest update norm over all the heads."""
        return max(self.norms.values()) if self.norms else None


def check_update(record, sent: HeadSet, max_norm: float) -> CheckedUpdate:
    """Read a reply's head record and check it against the record ``sent`` this round.

    It must hold exactly the heads sent (the main head and as many fold heads), each finite and of
    the ResNet-34's shape, and each within ``max_norm`` (L2) of the head sent for it.
    """
    try:
        heads = HeadSet.from_record(record)
    except IchfedError as e:
        return CheckedUpdate(None, {}, str(e))
    if heads.n_folds != sent.n_folds:
        return CheckedUpdate(None, {}, f"head record holds {heads.n_folds} fold heads, {sent.n_folds} were sent")
    why = heads.problem(sent.main.n_features)  # the bundle's layout: 512, or 515 for a hybrid head
    if why:
        return CheckedUpdate(None, {}, why)
    norms = heads.distances(sent)
    for prefix, norm in norms.items():
        if not norm <= max_norm:
            head = f"'{prefix}' head" if prefix else "main head"
            return CheckedUpdate(None, norms, f"{head} update norm {norm:.3g} exceeds the limit {max_norm:g}")
    return CheckedUpdate(heads, norms)


@dataclasses.dataclass(frozen=True)
class _Seen:
    round: int
    what: str  # "the global head" or a site label


class UpdateRegistry:
    """Digests of every head record of one run (global and received), for zero-change and replays;
    anything with ``digest()`` (a segmenter's tensors) works the same way."""

    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}
        self._round = 0
        self._sent = ""
        self._this_round: dict[str, str] = {}  # digest -> label of the site that sent it this round

    def sent(self, round_: int, heads: HeadSet) -> None:
        """Round ``round_`` sends ``heads``."""
        self._round, self._sent, self._this_round = round_, heads.digest(), {}
        self._seen.setdefault(self._sent, _Seen(round_, "the global head"))

    def judge(self, heads: HeadSet) -> tuple[list[str], str | None]:
        """The flags of an update received this round and, for a replay, why it is rejected."""
        digest = heads.digest()
        if digest == self._sent:
            return [f"{FLAG_ZERO_CHANGE}: returned the head it was sent"], None
        seen = self._seen.get(digest)
        if seen is not None and seen.round < self._round:
            why = f"replays {seen.what}'s round {seen.round} head" if seen.what != "the global head" else \
                f"replays the global head of round {seen.round}"
            return [f"{FLAG_REPLAY}: {why}"], why
        other = self._this_round.get(digest)
        return ([f"{FLAG_DUPLICATE}: the same head as {other}"] if other else []), None

    def received(self, heads: HeadSet, site: str, node_id: int) -> None:
        """Remember an accepted update (its digest, round and sender)."""
        digest, label = heads.digest(), site_label(site, node_id)
        self._seen.setdefault(digest, _Seen(self._round, label))
        self._this_round.setdefault(digest, label)


@dataclasses.dataclass(frozen=True)
class CheckedSegmenterUpdate:
    """A segmenter round reply's tensors after the checks, and their distance from those sent,
    or the reason they are refused (issue 24)."""

    weights: SegmenterWeights | None
    norm: float | None
    reason: str | None = None


def check_segmenter_update(record, sent: SegmenterWeights, max_norm: float) -> CheckedSegmenterUpdate:
    """Read a segmenter reply's tensors and check them against those ``sent`` this round.

    Exactly the tensors sent, each of the shape sent, float32, finite and bounded
    (``SegmenterWeights.problem``), and within ``max_norm`` (L2 over every tensor) of what was sent.
    """
    try:
        weights = SegmenterWeights.from_record(record)
    except IchfedError as e:
        return CheckedSegmenterUpdate(None, None, str(e))
    why = weights.problem(like=sent)
    if why:
        return CheckedSegmenterUpdate(None, None, why)
    norm = weights.distance(sent)
    if not norm <= max_norm:
        return CheckedSegmenterUpdate(None, norm, f"segmenter update norm {norm:.3g} exceeds the limit {max_norm:g}")
    return CheckedSegmenterUpdate(weights, norm)
