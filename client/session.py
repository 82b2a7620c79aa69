"""A site's session: the experiment protocol, one method per message of the federation.

``client/app.py`` maps each Flower message to one method here and turns a ``Refusal`` or an
exception into a refusal reply; the session does the site's work and builds every reply with
``client.privacy.build_reply``. One session serves one site for one run (the ClientApp's
lifespan hook opens it and drops it when the run or the site config changes), so it may
remember verified bundles and features between messages.

=======================  ====================  =================================================
message                  method                reply
=======================  ====================  =================================================
``query.bundle``         ``prepare``           have / need / refused (bundle verified and cached)
``train``                ``train_round``       trained head(s) + site counts
``evaluate``             ``evaluate``          the global head's held-out metrics
``query.final``          ``final_comparison``  the four arms (``client.final``); keeps the bundle
``query.stats``          ``stats``             the site's Table 1 (``client.stats``)
``train.segmenter``      ``train_segmenter``   the fine-tuned segmenter's tensors + aggregates
``query.segmenter``      ``segmenter_arms``    the segmenter arms' held-out metrics + decision
=======================  ====================  =================================================

The segmenter messages (issue 24) are ``client.segmenter_site``'s; every other message runs the
segmenter the site chose there (``_run_bundle``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from shared.federation import protocol as P
from shared.models.head import Head, HeadSet
from shared.plumbing.errors import IchfedError

from .calibrate import SiteThreshold, site_threshold
from .cross_fit import case_folds, cross_fit_scores, train_head_set
from .features import FeatureStore, Part, SiteFeatures
from .privacy import build_reply
from .seeds import cross_fit_seed, fold_head_seed, round_seed
from .segmenter_site import SegmenterSite
from .site_bundles import Refusal, SiteBundles
from .site_config import SiteConfig

log = logging.getLogger(__name__)

FINAL_SCORES = "final_scores.npz"  # the held-out labels and every arm's scores, kept at the site


class SiteSession:
    """The protocol of one site for one run. Each public method takes a message's content and
    returns the reply's content; it raises ``Refusal`` when the site declines."""

    def __init__(self, config: SiteConfig, store=None) -> None:
        """``store``: where the site's features come from (default ``FeatureStore(config)``, the
        site's cases through the cache); anything with ``features(bundle) -> SiteFeatures``, e.g.
        a benchmark's precomputed features, runs the same protocol on them."""
        self.config = config
        self.bundles = SiteBundles(config)
        self.store = store if store is not None else FeatureStore(config)
        self.segmenter = SegmenterSite(config, self.bundles, self.store)

    @property
    def name(self) -> str:
        return self.config.name

    def device(self) -> str:
        """The torch device of this site's training and scoring (``device`` in its config)."""
        from shared.plumbing.device import pick_device

        return str(pick_device(self.config.device))

    # -- query.bundle --------------------------------------------------------------------
    def prepare(self, content):
        """Say whether the site holds the announced bundle (verifying it), receiving it when sent.

        When the run trains, the site first checks that its split gives enough fine-tune cases
        (planned from the labelled cases, before any preprocessing) and says how many; below its
        minimum it refuses now, before the coordinator sends a bundle.
        """
        cfg = content[P.CONFIG]
        wanted = str(cfg[P.CFG_BUNDLE_HASH])
        counts = self._planned_counts() if cfg.get(P.CFG_TRAINS, False) else None
        if cfg.get(P.CFG_DELIVER, False):
            got = self.bundles.receive(content[P.BUNDLE_ARRAYS], content[P.BUNDLE_CONFIG])
            if got != wanted:
                log.error("site %s: delivered bundle %s is not the announced %s", self.name, got[:12], wanted[:12])
                raise Refusal(P.REASON_BUNDLE_VERIFICATION)
        if not self.bundles.has(wanted):
            return build_reply(self.name, P.STATUS_NEED, metrics=counts)
        self.bundles.get(wanted)  # full verification before the site says it has it
        return build_reply(self.name, P.STATUS_HAVE, bundle_hash=wanted, metrics=counts)

    def _planned_counts(self) -> dict[str, int]:
        """``{n-fine-tune: k}`` of the split the run will use; a ``Refusal`` when k is below the minimum."""
        planned = len(self.store.split(self.store.read_site()).fine_tune)
        if planned < self.config.min_cases:
            log.error("site %s: the split gives %d fine-tune cases, fewer than the minimum %d; raise "
                      "fine_tune_fraction or add labelled cases (`ichfed site check` shows the split)",
                      self.name, planned, self.config.min_cases)
            raise Refusal(P.REASON_TOO_FEW)
        return {P.N_FINE_TUNE: planned, **self.segmenter.planned()}

    # -- train -----------------------------------------------------------------------------
    def train_round(self, content):
        """Train the received head(s) on the fine-tune split; reply with the trained heads and counts."""
        cfg = content[P.CONFIG]
        server_round = int(cfg.get(P.CFG_ROUND, 0))
        feats = self._features(cfg)
        fine = feats.fine_tune
        if fine.n == 0:
            log.error("site %s: no usable fine-tune cases; not training", self.name)
            raise Refusal(P.REASON_NO_CASES)
        if fine.n < self.config.min_cases:
            # A head trained on one or two cases is close to a copy of their features.
            log.error("site %s: %d fine-tune cases, fewer than the minimum %d; not sending a head update",
                      self.name, fine.n, self.config.min_cases)
            raise Refusal(P.REASON_TOO_FEW)
        heads = _head_set(content)
        device = self.device()

        def train(start: Head, x: np.ndarray, y: np.ndarray, fold: int) -> tuple[Head, float]:
            seed = round_seed(self.config.seed, server_round) if fold < 0 else \
                fold_head_seed(self.config.seed, server_round, fold)
            return self.local_update(start, x, y, seed=seed, device=device)

        trained, loss = train_head_set(heads, fine, self._folds(fine, heads.n_folds), train)
        log.info("site %s: round %s trained on %d cases (%d fold heads), loss %.4f",
                 self.name, server_round, fine.n, heads.n_folds, loss)
        return build_reply(self.name, head=trained,
                           metrics={**feats.counts(fine.n), P.TRAIN_LOSS: loss})

    def local_update(self, start: Head, x: np.ndarray, y: np.ndarray, *, seed: int, device: str,
                     epochs: int | None = None) -> tuple[Head, float]:
        """The site's training of one head (main or fold) from ``start``: ``(head, last-epoch loss)``.

        The one place a round trains; the local-only baseline (``client.final``) uses it too with
        ``epochs`` = rounds x local epochs. The site's switches (``client.adaptation``) add the
        proximal term toward ``start`` and early stopping by inner folds (``epochs`` is then the most).
        """
        from .adaptation import local_update, settings

        c = self.config
        r = local_update(settings(c), start, x, y, epochs=c.local_epochs if epochs is None else epochs,
                         learning_rate=c.learning_rate, batch_size=c.batch_size, seed=seed, device=device)
        return r.head, r.loss

    # -- evaluate ----------------------------------------------------------------------------
    def evaluate(self, content):
        """The global head on the held-out split, at the site's threshold for it."""
        from .evaluate import arm_metrics

        cfg = content[P.CONFIG]
        bundle = self._run_bundle(cfg)
        feats = self.store.features(bundle)
        heads = _head_set(content)
        t = self.threshold(heads, feats.fine_tune, float(bundle.threshold.p))
        held = feats.held_out
        metrics, reasons = arm_metrics(P.MODEL_GLOBAL, held, heads.main.p_neoplastic(held.features), t.p,
                                       min_cases=self.config.min_cases, seed=self.config.seed,
                                       threshold_reason=t.reason)
        return build_reply(self.name, metrics={**metrics, **feats.counts(held.n)}, reasons=reasons)

    def threshold(self, heads: HeadSet, fine: Part, fallback: float) -> SiteThreshold:
        """The site's threshold (and calibration) for ``heads.main``, chosen on its fine-tune split.

        With fold heads the scores are out-of-fold (each case scored by the aggregated head of its
        own fold, which no site trained on that fold's cases); without them they are the main
        head's own, partly in-sample, scores.
        """
        return site_threshold(fine.labels, self._fine_tune_scores(heads, fine)[0], fallback)

    def _fine_tune_scores(self, heads: HeadSet, fine: Part) -> tuple[np.ndarray, str]:
        """``heads.main``'s scores of the fine-tune cases and how they were made: out-of-fold
        through the cross-fit fold heads, else the main head's own (in-sample) scores."""
        if heads.n_folds:
            return cross_fit_scores(heads, fine, self._folds(fine, heads.n_folds)), "out-of-fold"
        return heads.main.p_neoplastic(fine.features), "in-sample"

    # -- query.final ---------------------------------------------------------------------------
    def final_comparison(self, content):
        """The four arms on the held-out split (``client.final``); keep the final bundle and its overlay."""
        from .final import final_arms

        cfg = content[P.CONFIG]
        bundle = self._run_bundle(cfg)
        feats = self.store.features(bundle)
        rounds = int(cfg.get(P.CFG_NUM_ROUNDS, 1))
        heads = _head_set(content)
        t_fed = self.threshold(heads, feats.fine_tune, float(bundle.threshold.p))
        device = self.device()

        def local_only(start: Head, x: np.ndarray, y: np.ndarray, seed: int) -> Head:
            # The paper's local-only baseline gets as many epochs as the site trained in the federation.
            return self.local_update(start, x, y, seed=seed, device=device, epochs=rounds * self.config.local_epochs)[0]

        arms = final_arms(self.config, feats, self.bundles.reference_head(bundle), heads.main, t_fed,
                          float(bundle.threshold.p), local_only, seed=round_seed(self.config.seed))
        final_hash, problem, adopted = None, None, None
        if cfg.get(P.CFG_DELIVER, False):
            try:
                final_hash = self.bundles.receive(content[P.BUNDLE_ARRAYS], content[P.BUNDLE_CONFIG])
                self.bundles.get(final_hash)
            except Refusal as refusal:
                final_hash, problem = None, refusal.reason
        if final_hash:
            adopted = self._adopt(bundle, final_hash, heads, feats, t_fed)
        self._keep(bundle, final_hash, t_fed, rounds, cross_fit=heads.n_folds, norm_stats=feats.norm_stats,
                   adoption=adopted)
        _keep_scores(self.config.state_dir, arms)
        return build_reply(self.name, metrics={**feats.counts(feats.held_out.n), **arms.metrics},
                           reasons=arms.reasons, reason=problem, bundle_hash=final_hash, adoption=adopted)

    def _adopt(self, bundle, final_hash: str, heads: HeadSet, feats: SiteFeatures, t_fed: SiteThreshold) -> str:
        """No harm at adoption (``client.adoption``): compare the federated bundle with the site's
        current model on the fine-tune cases' out-of-fold scores; activate it unless clearly worse
        (or wait for approval). Returns the aggregate code the reply carries."""
        from . import adoption

        state, fine = self.config.state_dir, feats.fine_tune
        scores, kind = self._fine_tune_scores(heads, fine)
        current_hash, current_scores, current_t = self._current_model(bundle, feats)
        comparison = adoption.compare(fine.labels, scores, current_scores, t_fed.p, current_t,
                                      margin=self.config.adoption_margin, evidence=kind)
        code = adoption.decide(comparison, self.config.adoption)
        path = self.bundles.folder / final_hash
        adoption.record(state, final_hash, path, code, comparison, current_hash)
        if code == P.ADOPTION_ACTIVATED:
            adoption.activate(state, final_hash, path, "federated run")
        else:
            ev = comparison.evidence
            log.warning("site %s: federated bundle %s kept but not activated: %s (fine-tune AUC %s vs %s of the "
                        "current model %s; see %s; 'ichfed site approve' activates it)", self.name, final_hash[:12],
                        code, _fmt(ev.get("candidate_auc")), _fmt(ev.get("current_auc")), current_hash[:12],
                        adoption.record_path(state, final_hash))
            if adoption.active_model(state) is None:  # the site goes on with the model it was given
                adoption.activate(state, bundle.hash, bundle.path, "reference")
        return code

    def _current_model(self, bundle, feats: SiteFeatures) -> tuple[str, np.ndarray, float]:
        """The model the site uses now (its active model, else the run's bundle): its hash, its
        scores of the fine-tune cases and its threshold (its overlay's, else its bundle's)."""
        from .adoption import active_model
        from .overlay import load_overlay

        state = self.config.state_dir
        ref_fine = feats.reference_parts[0]
        active = active_model(state)
        if active is not None and active.bundle_hash != bundle.hash:
            try:
                other = self.bundles.get(active.bundle_hash)
            except Refusal:
                other = None
            if other is not None and _same_backbone(other, bundle):
                overlay = load_overlay(state, other.hash)
                site_stats = overlay is not None and overlay.norm_stats is not None and feats.norm_stats is not None
                part = feats.fine_tune if site_stats else ref_fine
                t = overlay.threshold if overlay else float(other.threshold.p)
                return other.hash, self.bundles.reference_head(other).p_neoplastic(part.features), t
            log.warning("site %s: the active model %s cannot be scored on this run's features (missing, or another "
                        "backbone); the federated bundle is compared with the run's bundle %s instead",
                        self.name, active.bundle_hash[:12], bundle.hash[:12])
        overlay = load_overlay(state, bundle.hash)
        t = overlay.threshold if overlay else float(bundle.threshold.p)
        return bundle.hash, self.bundles.reference_head(bundle).p_neoplastic(ref_fine.features), t

    def _keep(self, bundle, final_hash: str | None, t_fed: SiteThreshold, rounds: int, cross_fit: int,
              norm_stats=None, adoption: str | None = None) -> None:
        """The federated threshold and calibration, and the site's BatchNorm statistics, go with the
        bundle that carries the federated head (the site overlay; the backbone is the parent's, so
        the statistics fit it); with a final bundle, ``final.json`` records it."""
        from shared.plumbing.atomic import write_json

        from .overlay import SiteOverlay, save_overlay

        source = "site-calibrated" if t_fed.reason is None else "bundle"
        save_overlay(self.config.state_dir, SiteOverlay(
            bundle_hash=final_hash or bundle.hash, threshold=float(t_fed.p), threshold_source=source,
            calibration=t_fed.calibration, site=self.name), norm_stats=norm_stats)
        if final_hash:
            write_json(Path(self.config.state_dir) / "final.json", {
                "bundle_hash": final_hash,
                "bundle_path": str(self.bundles.folder / final_hash),
                "parent_bundle_hash": bundle.hash,
                "threshold": t_fed.p,
                "threshold_source": source,
                "threshold_scores": f"out-of-fold ({cross_fit} cross-fit folds)" if cross_fit else "in-sample",
                "rounds": rounds,
                "adoption": adoption,
            })
            log.info("site %s: final bundle %s kept with local threshold %.4f", self.name, final_hash[:12], t_fed.p)

    # -- query.stats ---------------------------------------------------------------------------
    def stats(self, content):
        """The site's Table 1: counts and fixed-bin histograms only, suppressed at the site (``client.stats``)."""
        from .stats import NeedsBundle, site_table1

        wanted = str(content[P.CONFIG].get(P.CFG_BUNDLE_HASH, ""))
        bundle = self.bundles.get(wanted) if wanted else None  # segments cases without reference masks
        try:
            t1 = site_table1(self.config, bundle, self.device())
        except NeedsBundle as e:
            log.error("site %s: %s", self.name, e)
            raise Refusal(P.REASON_BUNDLE_MISSING) from None
        if "table1.n" not in t1.metrics or t1.metrics["table1.n"] == 0:
            log.error("site %s: fewer usable cases than min_cases_for_metrics; no Table 1 sent", self.name)
            raise Refusal(P.REASON_TOO_FEW)
        return build_reply(self.name, metrics=t1.metrics, reasons=t1.reasons, scanner=t1.scanner)

    # -- train.segmenter, query.segmenter (client.segmenter_site) ---------------------------------
    def train_segmenter(self, content):
        """Fine-tune the received segmenter on the masked fine-tune cases; reply with its tensors."""
        return self.segmenter.train_round(content)

    def segmenter_arms(self, content):
        """Score the reference, federated and local-only segmenters on the held-out cases; decide."""
        return self.segmenter.evaluate(content)

    # -- helpers ---------------------------------------------------------------------------------
    def _run_bundle(self, cfg):
        """The bundle whose pipeline the site runs in this run: the run's bundle, or the federated
        segmenter's bundle named beside it where the site adopted that segmenter."""
        return self.segmenter.pipeline(self.bundles.get(str(cfg[P.CFG_BUNDLE_HASH])), cfg.get(P.CFG_SEG_BUNDLE_HASH))

    def _features(self, cfg) -> SiteFeatures:
        return self.store.features(self._run_bundle(cfg))

    def _folds(self, part: Part, n_folds: int) -> np.ndarray:
        return case_folds(part, n_folds, cross_fit_seed(self.config.seed)) if n_folds else np.zeros(part.n, np.int64)


def _same_backbone(a, b) -> bool:
    """Whether two v2 bundles embed a case identically (same backbone file, nnU-Net and crop spec)."""
    if a.manifest.head_file is None or b.manifest.head_file is None:
        return False
    return (a.manifest.files[a.manifest.classifier_file] == b.manifest.files[b.manifest.classifier_file]
            and a.nnunet_file_hashes == b.nnunet_file_hashes and a.crop_spec.key() == b.crop_spec.key())


def _keep_scores(state_dir, arms) -> None:
    """The held-out labels and every arm's scores, kept at the site (``final_scores.npz``): a
    simulation, whose sites share one machine, bootstraps its report from them. Never sent."""
    if arms.labels is None:
        return
    from shared.plumbing.atomic import atomic_path

    with atomic_path(Path(state_dir) / FINAL_SCORES, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, labels=arms.labels, **{k.replace("-", "_"): v for k, v in arms.scores.items()})


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _head_set(content) -> HeadSet:
    """The heads of a server message; a malformed head record is refused."""
    try:
        return HeadSet.from_record(content[P.HEAD])
    except (KeyError, IchfedError) as e:  # no record, its keys, or a head of the wrong shape
        log.error("head record unusable: %s", e)
        raise Refusal(P.REASON_SITE_ERROR) from None
