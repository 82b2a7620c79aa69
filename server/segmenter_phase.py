"""Segmenter rounds before the head rounds (issue 24): federated fine-tuning of the nnU-Net segmenter.

With ``segmenter-rounds`` R > 0 a run, after the bundle distribution, and before its head rounds:

1. runs R rounds of ``train.segmenter`` at the sites that opted in (``segmenter_fine_tune = true``, and
   at least ``min_cases`` masked fine-tune cases: their bundle-offer reply said how many) through
   Flower's ``Strategy.start`` with ``server.segmenter_strategy.SegmenterStrategy``, starting from the
   bundle's own segmenter; it needs as many opted-in sites as ``min-sites`` and the rule ask for;
2. signs the bundle carrying the federated segmenter (``shared.bundle.derive_bundle(..., segmenter=)``:
   the run's bundle with one new nnU-Net checkpoint) and sends it to every ready site as
   ``query.segmenter``, against the run's bundle (only the checkpoint and the manifest travel);
3. each site scores the reference, federated and local-only segmenters on its held-out masked cases and
   decides by the no-harm rule which one it goes on with; its reply is aggregates and that code.

The head rounds then name the segmenter bundle beside the run's bundle, and each site runs the segmenter
it chose (``client.segmenter_site``). A phase that cannot run or stops early (too few opted-in sites,
too few usable updates) is recorded with the reason, and the run goes on with the reference segmenter.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from shared.federation import protocol as P
from shared.plumbing.errors import IchfedError

from . import replies as R
from .admission import SiteLedger, admit_metrics_reply
from .distribution import send
from .records import (
    FAILED,
    MISSING,
    REJECTED,
    FederatedBundleInfo,
    MetricsRow,
    SegmenterPhase,
)
from .robust import AggregationRule
from .segmenter_strategy import SegmenterStrategy
from .settings import ServerSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SegmenterOutcome:
    """What the run goes on with: the phase's record, the segmenter bundle (None: none was made) and
    the nodes that adopted its segmenter."""

    record: SegmenterPhase
    bundle: Any = None
    adopted: set[int] = dataclasses.field(default_factory=set)


def run_segmenter_phase(grid, bundle, ready: dict[int, str], planned: dict[int, int], settings: ServerSettings,
                        ledger: SiteLedger, rule: AggregationRule, progress=None) -> SegmenterOutcome:
    """The segmenter rounds, the segmenter bundle and the sites' decisions (see the module doc)."""
    s = settings
    record = SegmenterPhase(settings={"rounds": s.segmenter_rounds, "trainable": s.segmenter_trainable,
                                      "epochs": s.segmenter_epochs, "iterations": s.segmenter_iterations,
                                      "learning_rate": s.segmenter_learning_rate,
                                      "max_update_norm": s.segmenter_max_update_norm})
    nodes = {n: ready[n] for n in sorted(planned) if n in ready}
    record.opted_in = {name: planned[n] for n, name in nodes.items()}
    why = _cannot_run(len(nodes), s.min_sites, rule)
    if why:
        return _stopped(record, why, progress)
    start = _reference_weights(bundle, s.segmenter_trainable)
    strategy = SegmenterStrategy(rule=rule, nodes=nodes, config=_train_config(bundle, s), min_sites=s.min_sites,
                                 max_update_norm=s.segmenter_max_update_norm, max_site_share=s.max_site_share,
                                 ledger=ledger, progress=progress)
    record.bytes = _bytes(bundle, start, s)
    try:
        result = strategy.start(grid=grid, initial_arrays=start.to_record(), num_rounds=s.segmenter_rounds,
                                timeout=s.round_timeout_s)
    except IchfedError as e:
        record.rounds = strategy.rounds
        return _stopped(record, str(e), progress)
    record.rounds = strategy.rounds
    from shared.models.segment_weights import SegmenterWeights

    seg_bundle = _segmenter_bundle(bundle, SegmenterWeights.from_record(result.arrays), record, s)
    record.bundle = FederatedBundleInfo(path=str(seg_bundle.path), hash=seg_bundle.hash, parent_hash=bundle.hash,
                                        threshold=float(seg_bundle.threshold.p),
                                        lineage=dict(seg_bundle.manifest.lineage))
    adopted = _evaluate(grid, ready, bundle, seg_bundle, s, ledger, record)
    if progress is not None:
        progress.event("segmenter_evaluated", bundle_hash=seg_bundle.hash, decisions=dict(record.decisions))
    return SegmenterOutcome(record=record, bundle=seg_bundle, adopted=adopted)


def resume_segmenter_phase(saved: Path, bundle, ready: dict[int, str], settings: ServerSettings) -> SegmenterOutcome:
    """The phase a resumed run recorded (``<state_dir>/segmenter_phase.json``): its record, its segmenter
    bundle (verified again) and the ready sites whose recorded decision adopted it."""
    from shared.bundle import load_bundle
    from shared.plumbing.files import read_json

    from .records import site_label

    record = SegmenterPhase.from_dict(read_json(saved))
    if record.bundle is None:
        return SegmenterOutcome(record=record)
    if record.bundle.parent_hash != bundle.hash:
        raise IchfedError(f"{saved}: segmenter phase of bundle {record.bundle.parent_hash[:12]}, not {bundle.hash[:12]}")
    seg_bundle = load_bundle(record.bundle.path, settings.public_key)
    adopted = {n for n, name in ready.items() if record.decisions.get(site_label(name, n)) == P.ADOPTION_ACTIVATED}
    log.info("resumed run: segmenter bundle %s from %s (%d site(s) adopted it)", seg_bundle.hash[:12], saved,
             len(adopted))
    return SegmenterOutcome(record=record, bundle=seg_bundle, adopted=adopted)


def _cannot_run(n: int, min_sites: int, rule: AggregationRule) -> str | None:
    if n < min_sites:
        return (f"only {n} ready site(s) opted in to segmenter rounds with enough masked fine-tune cases "
                f"(segmenter_fine_tune = true; min-sites is {min_sites})")
    return rule.problem(n)


def _stopped(record: SegmenterPhase, why: str, progress) -> SegmenterOutcome:
    record.stopped = why
    log.warning("segmenter rounds: %s; the run goes on with the reference segmenter", why)
    if progress is not None:
        progress.event("segmenter_stopped", reason=why)
    return SegmenterOutcome(record=record)


def _reference_weights(bundle, trainable: str):
    from shared.models.segment_weights import SegmenterNetwork

    return SegmenterNetwork(bundle.nnunet_dir, bundle.nnunet_file_hashes).weights(trainable)


def _train_config(bundle, s: ServerSettings) -> dict[str, Any]:
    return {P.CFG_BUNDLE_HASH: bundle.hash, P.CFG_NUM_ROUNDS: s.segmenter_rounds, P.CFG_SEED: s.seed,
            P.CFG_SEG_TRAINABLE: s.segmenter_trainable, P.CFG_SEG_EPOCHS: s.segmenter_epochs,
            P.CFG_SEG_ITERATIONS: s.segmenter_iterations, P.CFG_SEG_LEARNING_RATE: s.segmenter_learning_rate}


def _bytes(bundle, start, s: ServerSettings) -> dict[str, int]:
    """Bytes on the wire per site and round: the segmenter's tensors each way, and the head record's."""
    from flwr.app import ConfigRecord, RecordDict

    from shared.bundle.transport import records_size
    from shared.models.head import Head, HeadSet

    heads = HeadSet.replicate(Head.from_bundle(bundle), s.cross_fit_folds).to_record()
    cfg = ConfigRecord(_train_config(bundle, s))
    return {"segmenter_round_sent": records_size(RecordDict({P.SEGMENTER: start.to_record(), P.CONFIG: cfg})),
            "segmenter_reply_tensors": records_size(start.to_record()),
            "head_round_sent": records_size(RecordDict({P.HEAD: heads, P.CONFIG: cfg})),
            "head_reply_tensors": records_size(heads)}


def _segmenter_bundle(bundle, weights, record: SegmenterPhase, s: ServerSettings):
    """Derive, sign and load the run's bundle with the federated segmenter."""
    from shared.bundle import derive_bundle, load_bundle
    from shared.models.head import Head

    digest = weights.digest()
    out = Path(s.state_dir) / "bundles" / f"{bundle.manifest.name}-segmenter-{digest[:12]}"
    accepted = sorted({r.site for rnd in record.rounds for r in rnd.train if r.status == "accepted"})
    lineage = {"federated_segmenter": {"rounds": s.segmenter_rounds, "sites": accepted, "weights_sha256": digest,
                                       **record.settings}}
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        derive_bundle(bundle, out, Head.from_bundle(bundle), bundle.threshold,
                      version=f"{bundle.manifest.version}+seg{s.segmenter_rounds}", lineage=lineage,
                      private_key=s.signing_key, segmenter=weights)
    seg_bundle = load_bundle(out, s.public_key)
    log.info("segmenter bundle %s written to %s", seg_bundle.hash[:12], out)
    return seg_bundle


def _evaluate(grid, ready: dict[int, str], bundle, seg_bundle, s: ServerSettings, ledger: SiteLedger,
              record: SegmenterPhase) -> set[int]:
    """``query.segmenter`` to every ready site; the rows, decisions and the nodes that adopted."""
    from flwr.app import ConfigRecord, RecordDict

    from shared.bundle.transport import bundle_to_records, records_size

    arrays, config = bundle_to_records(seg_bundle.path, parent=bundle)
    record.bytes["segmenter_bundle_delivery"] = records_size(arrays, config)
    content = RecordDict({P.CONFIG: ConfigRecord({**_train_config(bundle, s), P.CFG_SEG_BUNDLE_HASH: seg_bundle.hash,
                                                  P.CFG_DELIVER: True}),
                          P.BUNDLE_ARRAYS: arrays, P.BUNDLE_CONFIG: config})
    replies = [m for m in send(grid, sorted(ready), P.QUERY_SEGMENTER, content, s.round_timeout_s)
               if m.metadata.src_node_id in ready]
    adopted: set[int] = set()
    for msg in replies:
        row, code = _row(msg, ready, ledger)
        record.sites.append(row)
        if code is not None:
            record.decisions[row.label] = code
            if code == P.ADOPTION_ACTIVATED:
                adopted.add(row.node_id)
    for node in sorted(set(ready) - {m.metadata.src_node_id for m in replies}):
        log.warning("segmenter evaluation: no reply from site %s (node %s); it keeps the reference segmenter",
                    ready[node], node)
        record.sites.append(MetricsRow(site=ready[node], node_id=node, status=MISSING, reason="no reply"))
    record.sites.sort(key=lambda r: (r.site, r.node_id))
    return adopted


def _row(msg, ready: dict[int, str], ledger: SiteLedger) -> tuple[MetricsRow, str | None]:
    node = msg.metadata.src_node_id
    name = ready[node]
    if msg.has_error() or R.reply_status(msg) != P.STATUS_OK:
        row = MetricsRow(site=name, node_id=node, status=FAILED, reason=R.refusal_reason(msg))
        log.warning("segmenter evaluation: site %s failed: %s; it keeps the reference segmenter", row.label, row.reason)
        return row, None
    why = admit_metrics_reply(ledger, msg, P.QUERY_SEGMENTER)
    if why:
        row = MetricsRow(site=name, node_id=node, status=REJECTED, reason=why)
        log.warning("segmenter evaluation: reply of site %s dropped: %s", row.label, why)
        return row, None
    return R.metrics_row(msg, name, models=P.SEGMENTER_ARMS), R.info(msg).get(P.INFO_SEG_ADOPTION)
