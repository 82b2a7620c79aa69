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
=======================  ====================  =================================================
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from shared.federation import protocol as P
from shared.models.head import Head
from shared.plumbing.errors import IchfedError

from .calibrate import SiteThreshold, site_threshold
from .cross_fit import HeadSet, case_folds, cross_fit_scores, train_head_set
from .features import FeatureStore, Part, SiteFeatures
from .privacy import build_reply
from .seeds import cross_fit_seed, fold_head_seed, round_seed
from .site_bundles import Refusal, SiteBundles
from .site_config import SiteConfig

log = logging.getLogger(__name__)


class SiteSession:
    """The protocol of one site for one run. Each public method takes a message's content and
    returns the reply's content; it raises ``Refusal`` when the site declines."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.bundles = SiteBundles(config)
        self.store = FeatureStore(config)

    @property
    def name(self) -> str:
        return self.config.name

    def device(self) -> str:
        """The torch device of this site's training and scoring (``device`` in its config)."""
        from shared.plumbing.device import pick_device

        return str(pick_device(self.config.device))

    # -- query.bundle --------------------------------------------------------------------
    def prepare(self, content):
        """Say whether the site holds the announced bundle (verifying it), receiving it when sent."""
        cfg = content[P.CONFIG]
        wanted = str(cfg[P.CFG_BUNDLE_HASH])
        if cfg.get(P.CFG_DELIVER, False):
            got = self.bundles.receive(content[P.BUNDLE_ARRAYS], content[P.BUNDLE_CONFIG])
            if got != wanted:
                log.error("site %s: delivered bundle %s is not the announced %s", self.name, got[:12], wanted[:12])
                raise Refusal(P.REASON_BUNDLE_VERIFICATION)
        if not self.bundles.has(wanted):
            return build_reply(self.name, P.STATUS_NEED)
        self.bundles.get(wanted)  # full verification before the site says it has it
        return build_reply(self.name, P.STATUS_HAVE, bundle_hash=wanted)

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
        return build_reply(self.name, head=trained.to_arrays(),
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
        bundle = self.bundles.get(str(cfg[P.CFG_BUNDLE_HASH]))
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
        if heads.n_folds:
            scores = cross_fit_scores(heads, fine, self._folds(fine, heads.n_folds))
        else:
            scores = heads.main.p_neoplastic(fine.features)
        return site_threshold(fine.labels, scores, fallback)

    # -- query.final ---------------------------------------------------------------------------
    def final_comparison(self, content):
        """The four arms on the held-out split (``client.final``); keep the final bundle and its overlay."""
        from .final import final_arms

        cfg = content[P.CONFIG]
        bundle = self.bundles.get(str(cfg[P.CFG_BUNDLE_HASH]))
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
        final_hash, problem = None, None
        if cfg.get(P.CFG_DELIVER, False):
            try:
                final_hash = self.bundles.receive(content[P.BUNDLE_ARRAYS], content[P.BUNDLE_CONFIG])
                self.bundles.get(final_hash)
            except Refusal as refusal:
                final_hash, problem = None, refusal.reason
        self._keep(bundle, final_hash, t_fed, rounds, cross_fit=heads.n_folds, norm_stats=feats.norm_stats)
        return build_reply(self.name, metrics={**feats.counts(feats.held_out.n), **arms.metrics},
                           reasons=arms.reasons, reason=problem, bundle_hash=final_hash)

    def _keep(self, bundle, final_hash: str | None, t_fed: SiteThreshold, rounds: int, cross_fit: int,
              norm_stats=None) -> None:
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

    # -- helpers ---------------------------------------------------------------------------------
    def _features(self, cfg) -> SiteFeatures:
        return self.store.features(self.bundles.get(str(cfg[P.CFG_BUNDLE_HASH])))

    def _folds(self, part: Part, n_folds: int) -> np.ndarray:
        return case_folds(part, n_folds, cross_fit_seed(self.config.seed)) if n_folds else np.zeros(part.n, np.int64)


def _head_set(content) -> HeadSet:
    """The heads of a server message; a malformed head record is refused."""
    try:
        return HeadSet.from_arrays(content[P.HEAD])
    except (KeyError, ValueError, IchfedError) as e:  # keys, or a head of the wrong shape
        log.error("head record unusable: %s", e)
        raise Refusal(P.REASON_SITE_ERROR) from None
