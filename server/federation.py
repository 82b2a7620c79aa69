"""One federated run, start to end: bundle distribution, the segmenter rounds when asked for
(``server.segmenter_phase``, issue 24), the rounds (Flower's ``Strategy.start``), the federated
bundle(s), the final evaluation and the report, all in the run's own folder.

The rounds run inside Flower's ``start()``; its ``evaluate_fn`` hook, called after each round,
writes the checkpoint and the ``round_finished`` event, and its ``Result.arrays`` is the final
head record. A run that fails (a user error, too few sites, a crash) still leaves its story: a
``run_failed`` event with the reason, and a report that says so at its top with what was done
until then; the error is raised again for Flower (and ``ichfed simulate``) to report.
"""

from __future__ import annotations

import logging
import time

from shared.federation import protocol as P
from shared.models.head import Head, HeadSet
from shared.plumbing.errors import IchfedError

from .admission import SiteLedger
from .checkpoint import CheckpointStore
from .distribution import distribute_bundle
from .federated_bundle import write_federated_bundle
from .final_evaluation import final_evaluation
from .records import RoundRecord, RunInfo, RunReport
from .report import write_report
from .robust import AggregationRule
from .rounds import RoundBook
from .run_folder import new_run_folder
from .run_progress import RunProgress, reply_counts
from .settings import ServerSettings
from .strategy import HeadStrategy

log = logging.getLogger(__name__)


class FederatedRun:
    """The state of one run: its folder, events, report (filled as it goes) and checkpoints."""

    def __init__(self, settings: ServerSettings, run_id: int | str | None = None) -> None:
        s = settings
        self.settings = settings
        self.folder = new_run_folder(s.state_dir, run_id)
        self.progress = RunProgress(self.folder, s.num_rounds)
        self.store = CheckpointStore(s.state_dir)
        self.rule = AggregationRule(s.aggregation, s.trim_fraction, s.num_malicious_sites)
        self.report = RunReport(run=RunInfo(
            run_id=self.folder.name, num_rounds=s.num_rounds, min_sites=s.min_sites, seed=s.seed,
            aggregation=s.aggregation, max_update_norm=s.max_update_norm, max_site_share=s.max_site_share,
            trim_fraction=s.trim_fraction, num_malicious_sites=s.num_malicious_sites, cross_fit_folds=s.cross_fit_folds))
        self.book = RoundBook(progress=self.progress)
        self.ledger = SiteLedger()  # one name and one fine-tune count per authenticated node, for the whole run
        self._t0 = time.perf_counter()

    # -- the run --------------------------------------------------------------------------------
    def run(self, grid) -> RunReport:
        """The whole run on ``grid``; the report is written whether it finishes or fails."""
        try:
            self._run(grid)
            self._finish("finished")
        except BaseException as e:
            reason = str(e) if isinstance(e, IchfedError) else f"{type(e).__name__}: {e}"
            log.error("run %s failed: %s (report in %s)", self.folder.name, reason, self.folder)
            try:
                self._finish("failed", reason)
            except Exception:  # the run's own error is the one to raise; this one goes to the log
                log.exception("run %s: the failure report could not be written", self.folder.name)
                self.progress.failed(reason)
            raise
        return self.report

    def _run(self, grid) -> None:
        from shared.bundle import load_bundle

        s, info = self.settings, self.report.run
        bundle = load_bundle(s.bundle_path, s.public_key)
        info.bundle_hash, info.bundle_name, info.bundle_version = bundle.hash, bundle.manifest.name, bundle.manifest.version
        heads = self._resume(bundle)
        self.progress.head_features = bundle.head_inputs.n_features
        self.progress.start(first_round=self.book.offset + 1, run_id=info.run_id, bundle_hash=bundle.hash,
                            resumed_from_round=info.resumed_from_round)
        ready, self.report.distribution = distribute_bundle(grid, bundle, s, self.ledger)
        info.site_nodes = {name: node for node, name in sorted(ready.items())}
        self.progress.event("bundle_distributed", sites=len(ready), **self.report.distribution.counts(),
                            ready=[{"site": name, "node_id": node} for node, name in sorted(ready.items())])
        self.rule.check_sites(len(ready))
        seg = self._segmenter(grid, bundle, ready)
        seg_hash = seg.bundle.hash if seg is not None and seg.bundle is not None else None
        heads = self._rounds(grid, bundle, heads, ready, seg_hash)
        fed_bundle, groups = self._federated_bundles(bundle, heads.main, ready, seg)
        final = final_evaluation(grid, ready, heads, bundle, fed_bundle, s, self.ledger, groups=groups,
                                 segmenter_hash=seg_hash)
        self.report.final = final
        self.progress.event("final_evaluation", pooled_auc={m: p.pooled_auc for m, p in final.pooled.items()},
                            **reply_counts(final.sites))

    def _resume(self, bundle) -> HeadSet:
        """The first round's heads: the bundle's head (K+1 copies), or the last checkpoint's on resume."""
        s = self.settings
        heads = HeadSet.replicate(Head.from_bundle(bundle), s.cross_fit_folds)
        if not self.store.exists():
            if s.resume:
                log.warning("resume requested but %s holds no checkpoint; starting at round 1", self.store.dir)
            return heads
        if not s.resume:
            raise IchfedError(f"{self.store.dir}: holds checkpoints of an earlier run; resume it (resume=true / --resume) "
                              "or choose a new state folder")
        ckpt = self.store.latest()
        if ckpt.run.get("bundle_hash") != bundle.hash:
            raise IchfedError(f"{ckpt.path}: checkpoint is for bundle {str(ckpt.run.get('bundle_hash', '?'))[:12]}, "
                              f"not {bundle.hash[:12]}")
        if ckpt.heads.n_folds != heads.n_folds:
            raise IchfedError(f"{ckpt.path}: checkpoint holds {ckpt.heads.n_folds} cross-fit fold heads, "
                              f"the run config asks for {s.cross_fit_folds} ('cross-fit-folds')")
        self.book.rounds = [RoundRecord.from_dict(r) for r in ckpt.history]
        self.book.offset = self.report.run.resumed_from_round = ckpt.round
        log.info("resuming after round %d from %s", ckpt.round, ckpt.path)
        return ckpt.heads

    def _segmenter(self, grid, bundle, ready: dict[int, str]):
        """The segmenter rounds (``server.segmenter_phase``), or None when the run config asks for none.
        A resumed run reuses the phase its first run recorded (``<state_dir>/segmenter_phase.json``)."""
        from shared.plumbing.atomic import write_json

        from .segmenter_phase import resume_segmenter_phase, run_segmenter_phase

        s = self.settings
        if not s.segmenter_rounds:
            return None
        saved = s.state_dir / "segmenter_phase.json"
        if self.book.offset and saved.is_file():
            outcome = resume_segmenter_phase(saved, bundle, ready, s)
        else:
            outcome = run_segmenter_phase(grid, bundle, ready, self.report.distribution.planned_masked, s,
                                          self.ledger, self.rule, self.progress)
            write_json(saved, outcome.record.to_dict())
        self.report.segmenter = outcome.record
        return outcome

    def _federated_bundles(self, bundle, head: Head, ready: dict[int, str], seg):
        """The federated bundle(s) and who gets which: with a federated segmenter, the sites that adopted it
        get its bundle with the federated head, the others the run's bundle with it. Returns the report's
        bundle and the final evaluation's groups (None: every site gets the one bundle)."""
        s, last = self.settings, (self.book.rounds[-1] if self.book.rounds else None)
        if seg is None or seg.bundle is None:
            fed, self.report.final_bundle = write_federated_bundle(bundle, head, last, self.ledger, s)
            return fed, None
        groups, primary = [], None
        adopted = {n for n in ready if n in seg.adopted}
        for nodes, parent, tag in ((adopted, seg.bundle, "federated segmenter"),
                                   (set(ready) - adopted, bundle, "reference segmenter")):
            if not nodes:
                continue
            fed, info = write_federated_bundle(parent, head, last, self.ledger, s,
                                               tag="segmenter-federated" if parent is seg.bundle else "federated")
            if info is not None:
                seg.record.final_bundles[tag] = info
            groups.append((nodes, parent, fed))
            primary = primary or (fed, info)
        self.report.final_bundle = primary[1]
        return primary[0], groups

    def _rounds(self, grid, bundle, heads: HeadSet, ready: dict[int, str], segmenter_hash: str | None = None) -> HeadSet:
        """Flower's ``start()`` over the remaining rounds; returns the final heads. ``segmenter_hash``: the
        federated segmenter's bundle, named beside the run's bundle (each site runs the segmenter it chose)."""
        from flwr.app import ConfigRecord

        s = self.settings
        remaining = s.num_rounds - self.book.offset
        if remaining <= 0:
            return heads
        strategy = HeadStrategy(rule=self.rule, min_sites=s.min_sites, max_update_norm=s.max_update_norm,
                                max_site_share=s.max_site_share, ledger=self.ledger, book=self.book,
                                ready_nodes=ready.keys())
        cfg = ConfigRecord({P.CFG_BUNDLE_HASH: bundle.hash, P.CFG_NUM_ROUNDS: s.num_rounds, P.CFG_SEED: s.seed,
                            **({P.CFG_SEG_BUNDLE_HASH: segmenter_hash} if segmenter_hash else {})})
        result = strategy.start(grid=grid, initial_arrays=heads.to_record(), num_rounds=remaining,
                                timeout=s.round_timeout_s, train_config=cfg, evaluate_config=ConfigRecord(dict(cfg)),
                                evaluate_fn=self._after_round)
        return HeadSet.from_record(result.arrays)

    def _after_round(self, server_round: int, arrays):
        """Flower's ``evaluate_fn`` hook, after each round's evaluation: checkpoint and event.

        Round 0 (Flower's call with the initial heads) has nothing to record. Returns None: the
        server evaluates nothing itself.
        """
        if server_round == 0:
            return None
        record = self.book.current
        self.store.save(record.round, HeadSet.from_record(arrays), self.report.run.to_dict(),
                        [r.to_dict() for r in self.book.rounds])
        self.progress.round_finished(record)
        return None

    def _finish(self, status: str, failure: str | None = None) -> None:
        """Write the report (and its copy in ``report-dir``) and the last event."""
        info = self.report.run
        info.status, info.failure = status, failure
        info.wall_s = round(time.perf_counter() - self._t0, 2)
        self.report.rounds = self.book.rounds
        data = self.report.to_dict()
        paths = write_report(data, self.folder)
        if self.settings.report_dir is not None:
            write_report(data, self.settings.report_dir)
        if failure is None:
            self.progress.close(report=str(paths["markdown"]), wall_s=info.wall_s)
            log.info("run finished: report at %s", paths["markdown"])
        else:
            self.progress.failed(failure, report=str(paths["markdown"]), wall_s=info.wall_s)


def run_federation(grid, settings: ServerSettings, run_id: int | str | None = None) -> RunReport:
    """The whole run on ``grid`` in ``<state_dir>/runs/<run_id>/`` (``server.run_folder``); returns
    the report (also written there, and copied to ``settings.report_dir`` when set)."""
    return FederatedRun(settings, run_id).run(grid)

