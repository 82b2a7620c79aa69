"""Typed records of a federated run: site rows, rounds, pooled metrics, the final evaluation, the report.

The coordinator builds and reads these; ``to_dict`` is their JSON (``report.json``, a checkpoint's
history, the events) and ``from_dict`` reads a checkpoint's history back on resume, so
``from_dict(x).to_dict() == x`` for anything ``to_dict`` wrote. The report's figures and tables
(``server/report.py``, ``server/report_arms.py``) render that JSON, because ``ichfed federate
report`` re-renders a ``report.json`` from disk.

A site is always named by the name it claimed *and* the node its SuperNode key authenticated
(:attr:`SiteRow.label`, "name (node 123)"): two nodes cannot hold one name in a run, but a reader
of a report should not have to trust that.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from shared.federation import protocol as P

# Row statuses
ACCEPTED = "accepted"  # a train update that went into the aggregate
REJECTED = "rejected"  # a reply the server refused (the row's reason says why)
MISSING = "missing"  # asked, never answered
OK = "ok"  # an evaluate or final reply that was admitted
FAILED = "failed"  # the site answered with a refusal or an error

# Flags on an accepted or rejected train update (``TrainRow.flags``)
FLAG_ZERO_CHANGE = "zero-change"  # the site returned exactly the head it was sent
FLAG_REPLAY = "replay"  # the site returned a head seen earlier in the run (an old global head or update)
FLAG_DUPLICATE = "duplicate"  # two sites returned the same head in one round


def site_label(site: str, node_id: int | None) -> str:
    """"name (node 123)": the name is the site's claim, the node ID the one its key authenticated."""
    return site if node_id is None else f"{site} (node {node_id})"


@dataclasses.dataclass
class SiteRow:
    """One site in one stage: who (claimed name, authenticated node), and how its reply fared."""

    site: str
    node_id: int | None  # None only in reports written before rows named their node
    status: str
    reason: str | None = None

    @property
    def label(self) -> str:
        return site_label(self.site, self.node_id)

    def _head(self) -> dict[str, Any]:
        out: dict[str, Any] = {"site": self.site, "node_id": self.node_id, "status": self.status}
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@dataclasses.dataclass
class TrainRow(SiteRow):
    """A site's train reply: its counts, its update's size and the weight it got."""

    n_fine_tune: int | None = None  # the count the site reported (the ledger keeps the first one)
    n_claimed: float | None = None  # the FedAvg weight it asked for (``num-examples``)
    train_loss: float | None = None
    update_norm: float | None = None  # L2 distance of the main head from the one sent
    update_norm_max: float | None = None  # the largest distance over all its heads (fold heads included)
    weight: float | None = None  # the weight it went into the aggregate with (capped)
    flags: tuple[str, ...] = ()  # FLAG_* notes, each "<flag>: <detail>"
    train_dice: float | None = None  # a segmenter round's nnU-Net pseudo Dice (issue 24)

    def to_dict(self) -> dict[str, Any]:
        out = self._head()
        for key in ("n_fine_tune", "n_claimed", "train_loss", "update_norm", "update_norm_max", "weight",
                    "train_dice"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.flags:
            out["flags"] = list(self.flags)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainRow:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"node_id": None, **{k: (tuple(v) if k == "flags" else v) for k, v in d.items() if k in fields}})


@dataclasses.dataclass
class MetricsRow(SiteRow):
    """A site's evaluate or final reply: metrics per model (arm), its counts and the reasons for
    undefined or withheld metrics; a final reply also says which bundle the site kept."""

    arms: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # model -> metric -> value
    counts: dict[str, Any] = dataclasses.field(default_factory=dict)  # protocol.SITE_COUNTS
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)  # metric key -> reason code
    kept_bundle: str | None = None
    bundle_problem: str | None = None
    adoption: str | None = None  # what the site did with the federated bundle (protocol.ADOPTIONS)
    final: bool = False  # a final-evaluation row (it says which bundle the site kept)

    def metric(self, model: str, name: str) -> Any:
        """One metric of one model, or None."""
        return (self.arms.get(model) or {}).get(name)

    def to_dict(self) -> dict[str, Any]:
        out = self._head()
        if self.status != OK:
            return out
        out.update(self.arms)
        out.update(counts=dict(self.counts), reasons=dict(self.reasons))
        if self.final:
            out.update(kept_bundle=self.kept_bundle, bundle_problem=self.bundle_problem, adoption=self.adoption)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetricsRow:
        return cls(site=d["site"], node_id=d.get("node_id"), status=d["status"], reason=d.get("reason"),
                   arms={m: dict(d[m]) for m in P.MODELS if m in d}, counts=dict(d.get("counts") or {}),
                   reasons=dict(d.get("reasons") or {}), kept_bundle=d.get("kept_bundle"),
                   bundle_problem=d.get("bundle_problem"), adoption=d.get("adoption"), final="kept_bundle" in d)


@dataclasses.dataclass(frozen=True)
class PooledMetrics:
    """One model's metrics pooled over the sites (``server.pooling.pool_model``'s summary).

    The statistics' full schema is ``server/pooling.py``'s; the run reads only the properties.
    """

    values: Mapping[str, Any]

    @classmethod
    def pool(cls, rows: list[MetricsRow], model: str) -> PooledMetrics:
        """Pool ``model`` over the admitted rows (withheld sites are left out by the pooling)."""
        from .pooling import pool_model

        return cls(pool_model([r.to_dict() for r in rows if r.status == OK], model))

    @property
    def pooled_auc(self) -> float | None:
        return self.values.get("pooled_auc")

    @property
    def mean_site_auc(self) -> float | None:
        return self.values.get("mean_site_auc")

    @property
    def n_sites(self) -> int:
        return int(self.values.get("n_sites") or 0)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)


@dataclasses.dataclass
class RoundRecord:
    """One round: the train rows, the aggregate's metrics, the evaluate rows and their pooled metrics."""

    round: int
    train: list[TrainRow] = dataclasses.field(default_factory=list)
    evaluate: list[MetricsRow] = dataclasses.field(default_factory=list)
    aggregated: dict[str, Any] = dataclasses.field(default_factory=dict)  # n-fine-tune-total, train-loss, n-sites
    trimmed: int | None = None  # updates cut at each end (trimmed-mean)
    pooled: PooledMetrics | None = None

    def accepted(self) -> list[TrainRow]:
        return [r for r in self.train if r.status == ACCEPTED]

    def to_dict(self) -> dict[str, Any]:
        train: dict[str, Any] = {"sites": [r.to_dict() for r in self.train], "aggregated": dict(self.aggregated)}
        if self.trimmed is not None:
            train["trimmed"] = self.trimmed
        return {"round": self.round, "train": train,
                "evaluate": {"sites": [r.to_dict() for r in self.evaluate],
                             "pooled": self.pooled.to_dict() if self.pooled is not None else None}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundRecord:
        train, evaluate = d.get("train") or {}, d.get("evaluate") or {}
        pooled = evaluate.get("pooled")
        return cls(round=int(d["round"]), train=[TrainRow.from_dict(r) for r in train.get("sites", [])],
                   evaluate=[MetricsRow.from_dict(r) for r in evaluate.get("sites", [])],
                   aggregated=dict(train.get("aggregated") or {}), trimmed=train.get("trimmed"),
                   pooled=PooledMetrics(pooled) if pooled is not None else None)


@dataclasses.dataclass
class Distribution:
    """How the reference bundle reached the sites (the run's first message)."""

    had: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (site, node) already holding it
    received: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # sent and verified
    refused: list[SiteRow] = dataclasses.field(default_factory=list)  # refused by the site or by the server
    planned_fine_tune: dict[str, int] = dataclasses.field(default_factory=dict)  # site -> its planned count
    # node -> planned masked fine-tune cases of a site that opted in to segmenter rounds (issue 24)
    planned_masked: dict[int, int] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"had": sorted(s for s, _ in self.had), "received": sorted(s for s, _ in self.received),
                "refused": sorted(r.label for r in self.refused),
                "reasons": {r.label: r.reason for r in sorted(self.refused, key=lambda r: r.label)},
                "planned_fine_tune": dict(sorted(self.planned_fine_tune.items()))}

    def counts(self) -> dict[str, int]:
        return {"had": len(self.had), "received": len(self.received), "refused": len(self.refused)}


@dataclasses.dataclass
class FinalEvaluation:
    """The four arms at every site, and pooled per arm."""

    sites: list[MetricsRow]
    pooled: dict[str, PooledMetrics]

    def to_dict(self) -> dict[str, Any]:
        return {"sites": [r.to_dict() for r in self.sites], "pooled": {m: p.to_dict() for m, p in self.pooled.items()}}


@dataclasses.dataclass
class FederatedBundleInfo:
    """The signed bundle carrying the federated head."""

    path: str
    hash: str
    parent_hash: str
    threshold: float
    lineage: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SegmenterRound:
    """One segmenter round (issue 24): its train rows (``n_fine_tune`` is the masked case count) and the
    aggregate's metrics."""

    round: int
    train: list[TrainRow] = dataclasses.field(default_factory=list)
    aggregated: dict[str, Any] = dataclasses.field(default_factory=dict)
    trimmed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "train": {"sites": [r.to_dict() for r in self.train],
                                               "aggregated": dict(self.aggregated), "trimmed": self.trimmed}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SegmenterRound:
        train = d.get("train") or {}
        return cls(round=int(d["round"]), train=[TrainRow.from_dict(r) for r in train.get("sites", [])],
                   aggregated=dict(train.get("aggregated") or {}), trimmed=train.get("trimmed"))


@dataclasses.dataclass
class SegmenterPhase:
    """The segmenter rounds of a run (issue 24): settings, rounds, the segmenter bundle, each site's
    segmenter arms and decision, the bytes a round costs; ``stopped`` says why it ended early or never ran."""

    settings: dict[str, Any]
    opted_in: dict[str, int] = dataclasses.field(default_factory=dict)  # site -> planned masked fine-tune cases
    rounds: list[SegmenterRound] = dataclasses.field(default_factory=list)
    bundle: FederatedBundleInfo | None = None  # the run's bundle with the federated segmenter
    sites: list[MetricsRow] = dataclasses.field(default_factory=list)  # query.segmenter replies (segmenter arms)
    decisions: dict[str, str] = dataclasses.field(default_factory=dict)  # site label -> protocol.ADOPTIONS code
    bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # per site and round, and the head's
    final_bundles: dict[str, FederatedBundleInfo] = dataclasses.field(default_factory=dict)  # by segmenter
    stopped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"settings": dict(self.settings), "opted_in": dict(sorted(self.opted_in.items())),
                "rounds": [r.to_dict() for r in self.rounds], "bundle": self.bundle.to_dict() if self.bundle else None,
                "sites": [r.to_dict() for r in self.sites], "decisions": dict(sorted(self.decisions.items())),
                "bytes": dict(self.bytes), "final_bundles": {k: v.to_dict() for k, v in self.final_bundles.items()},
                "stopped": self.stopped}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SegmenterPhase:
        """What ``to_dict`` wrote (a resumed run reads its segmenter phase back)."""
        return cls(settings=dict(d.get("settings") or {}), opted_in=dict(d.get("opted_in") or {}),
                   rounds=[SegmenterRound.from_dict(r) for r in d.get("rounds") or []],
                   bundle=FederatedBundleInfo(**d["bundle"]) if d.get("bundle") else None,
                   sites=[MetricsRow.from_dict(r) for r in d.get("sites") or []],
                   decisions=dict(d.get("decisions") or {}), bytes=dict(d.get("bytes") or {}),
                   final_bundles={k: FederatedBundleInfo(**v) for k, v in (d.get("final_bundles") or {}).items()},
                   stopped=d.get("stopped"))


@dataclasses.dataclass
class RunInfo:
    """Who ran what: the run's identity and settings, the sites, and how it ended."""

    run_id: str
    num_rounds: int
    min_sites: int
    seed: int
    aggregation: str
    max_update_norm: float
    max_site_share: float
    trim_fraction: float
    num_malicious_sites: int
    cross_fit_folds: int
    bundle_hash: str = ""
    bundle_name: str = ""
    bundle_version: str = ""
    resumed_from_round: int = 0
    site_nodes: dict[str, int] = dataclasses.field(default_factory=dict)  # name -> node, the sites that ran
    status: str = "running"  # running | finished | failed
    failure: str | None = None
    wall_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sites"] = sorted(self.site_nodes)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunInfo:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


@dataclasses.dataclass
class RunReport:
    """Everything ``report.json`` holds: the run, the bundle distribution, the rounds, the final
    evaluation and the federated bundle (the last three absent when the run failed before them)."""

    run: RunInfo
    distribution: Distribution | None = None
    rounds: list[RoundRecord] = dataclasses.field(default_factory=list)
    final: FinalEvaluation | None = None
    final_bundle: FederatedBundleInfo | None = None
    segmenter: SegmenterPhase | None = None  # segmenter rounds (issue 24), when the run config asks for them

    def to_dict(self) -> dict[str, Any]:
        out = {"run": self.run.to_dict(),
               "distribution": self.distribution.to_dict() if self.distribution else None,
               "rounds": [r.to_dict() for r in self.rounds],
               "final": self.final.to_dict() if self.final else None,
               "final_bundle": self.final_bundle.to_dict() if self.final_bundle else None}
        if self.segmenter is not None:
            out["segmenter"] = self.segmenter.to_dict()
        return out
